"""Finding plugins and the components they register.

Plugins are modules exposed under the entry-point group ``mergescope.plugins``. The
bundled ones (``mergescope_plugins.*``) are declared there too, so they load exactly
like a third party's.

Two environment variables choose what loads, both comma-separated entry-point names:

``MERGESCOPE_PLUGINS``
    Load only these plugins (an empty value loads none).
``MERGESCOPE_BLOCK_PLUGINS``
    Never load these plugins.

``MERGESCOPE_TRACE_PLUGINS``
    Set to ``1`` to log every hook call (which hook, which plugin, what it returned)
    to standard error.

A plugin that fails to import, or whose hook raises, is reported by name (a warning,
:meth:`Registry.failed`, ``mergescope plugins``); the others still load. Hooks are
called through pluggy's hook relay, one plugin at a time (so that one plugin's error
cannot hide another's components): pluggy's hook-call monitoring sees every call.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
import types
import warnings
from collections.abc import Iterable
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .errors import DuplicateComponentError, PluginError, UnknownComponentError, article, did_you_mean
from .kinds import KINDS, Kind, takes_context

__all__ = [
    "ENTRY_POINT_GROUP",
    "SELECT_ENV",
    "BLOCK_ENV",
    "TRACE_ENV",
    "ComponentEntry",
    "PluginInfo",
    "Registry",
    "get_registry",
    "reset",
    "register_plugin",
]

ENTRY_POINT_GROUP = "mergescope.plugins"
SELECT_ENV = "MERGESCOPE_PLUGINS"
BLOCK_ENV = "MERGESCOPE_BLOCK_PLUGINS"
TRACE_ENV = "MERGESCOPE_TRACE_PLUGINS"


@attrs.frozen
class PluginInfo:
    """A plugin as loaded (or not): its name, distribution, version and any load error."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    error: str | None = None


@attrs.frozen
class ComponentEntry:
    """One registered component class and where it came from."""

    kind: str
    name: str
    cls: type
    plugin: str

    @property
    def module(self) -> str:
        return self.cls.__module__

    @property
    def summary(self) -> str:
        doc = (self.cls.__doc__ or "").strip()
        return doc.splitlines()[0].strip() if doc else ""

    @property
    def paper(self) -> str:
        return str(getattr(self.cls, "paper", "") or "")


def _env_names(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


def _check_component(kind: Kind, cls: Any, plugin: str) -> str:
    """Validate a registered class; return its name."""
    where = f"plugin {plugin!r} ({kind.hook})"
    if not isinstance(cls, type):
        raise PluginError(f"{where} registered {cls!r}, which is not a class; register the class itself")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"{where}: {cls.__qualname__} needs a non-empty string class attribute 'name'")
    if not attrs.has(cls):
        raise PluginError(f"{where}: {cls.__qualname__} must be an attrs class (its fields are its options)")
    method = getattr(cls, kind.method, None)
    if not callable(method):
        raise PluginError(
            f"{where}: {cls.__qualname__} is registered as a {kind.name} but has no {kind.method}() method"
        )
    if kind.is_step and not takes_context(method):
        raise PluginError(
            f"{where}: {cls.__qualname__}.{kind.method}() must accept the step's context as a parameter named "
            f"'context' (declare it 'context: Context | None = None' to call it without one)"
        )
    return name


class Registry:
    """The loaded plugins and every component they register, by kind and name.

    Use :func:`get_registry` for the process-wide instance built from entry points.
    """

    def __init__(self, pm: pluggy.PluginManager, plugins: Iterable[PluginInfo]) -> None:
        self.pm = pm
        self.plugins: dict[str, PluginInfo] = {p.name: p for p in plugins}
        self._entries: dict[str, dict[str, list[ComponentEntry]]] = {k: {} for k in KINDS}
        for kind in KINDS.values():
            relay = getattr(pm.hook, kind.hook)
            for impl in relay.get_hookimpls():
                plugin = impl.plugin_name

                def register(cls: Any, _kind: Kind = kind, _plugin: str = plugin) -> None:
                    try:
                        name = _check_component(_kind, cls, _plugin)
                    except PluginError as exc:  # skip the bad class, keep the rest of the plugin
                        self._fail(_plugin, str(exc))
                        return
                    self._entries[_kind.name].setdefault(name, []).append(
                        ComponentEntry(_kind.name, name, cls, _plugin)
                    )

                # Through the relay (monitoring and the plugin's own wrappers apply), one
                # plugin at a time: a hook body that raises loses only its own plugin.
                others = [p for p in pm.get_plugins() if p is not impl.plugin]
                try:
                    pm.subset_hook_caller(kind.hook, remove_plugins=others)(register=register)
                except Exception as exc:
                    self._fail(plugin, f"hook {kind.hook} of plugin {plugin!r} raised {type(exc).__name__}: {exc}")

    def _fail(self, plugin: str, message: str) -> None:
        warnings.warn(f"mergescope: {message}", stacklevel=3)
        info = self.plugins.get(plugin) or PluginInfo(plugin, "?")
        error = f"{info.error}; {message}" if info.error else message
        self.plugins[plugin] = attrs.evolve(info, error=error)

    # -- queries ---------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        """Sorted component names of ``kind``."""
        return sorted(self._entries[self._kind(kind)])

    def entries(self, kind: str | None = None) -> list[ComponentEntry]:
        """Every registered component (of ``kind``), duplicates included."""
        kinds = [self._kind(kind)] if kind else list(KINDS)
        return [e for k in kinds for name in sorted(self._entries[k]) for e in self._entries[k][name]]

    def duplicates(self) -> list[list[ComponentEntry]]:
        """Groups of entries that share one kind and name."""
        return [v for k in KINDS for v in self._entries[k].values() if len(v) > 1]

    def entry(self, kind: str, name: str) -> ComponentEntry:
        """The entry registered as ``name`` for ``kind``.

        Raises
        ------
        UnknownComponentError
            No plugin registers ``name``; the message lists the known names and the closest.
        DuplicateComponentError
            Two or more plugins register ``name``; the message names them.
        """
        kind = self._kind(kind)
        found = self._entries[kind].get(name)
        if not found:
            known = self.names(kind)
            hint = did_you_mean(name, known)
            # Say when the name exists under another kind: a common slip in pipeline files.
            other = [k for k in KINDS if k != kind and name in self._entries[k]]
            if other:
                hint += f" ({name!r} is {article(other[0])}, not {article(kind)}.)"
            raise UnknownComponentError(
                f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(known) or '(none loaded)'}."
            )
        if len(found) > 1:
            who = " and ".join(f"plugin {e.plugin!r} ({e.module}.{e.cls.__qualname__})" for e in found)
            raise DuplicateComponentError(
                f"{kind} name {name!r} is registered by {who}; block one of them with {BLOCK_ENV}=<plugin>"
            )
        return found[0]

    def get(self, kind: str, name: str) -> type:
        """The component class registered as ``name`` for ``kind``."""
        return self.entry(kind, name).cls

    def kind_of(self, cls: type) -> str:
        """The kind under which ``cls`` is registered."""
        for k, by_name in self._entries.items():
            if any(e.cls is cls for entries in by_name.values() for e in entries):
                return k
        raise UnknownComponentError(
            f"{cls.__qualname__} is not registered by any loaded plugin; register it with a hook "
            f"(see docs/plugins.md) or mergescope.plugins.register_plugin()"
        )

    def failed(self) -> list[PluginInfo]:
        """Plugins that failed to import or registered a malformed component."""
        return [p for p in self.plugins.values() if p.error]

    @staticmethod
    def _kind(kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
        return kind


def _new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if os.environ.get(TRACE_ENV, "").strip() not in ("", "0"):
        _trace_hook_calls(pm)
    return pm


def _trace_hook_calls(pm: pluggy.PluginManager) -> None:
    """Log every hook call and its outcome to standard error."""

    def before(hook_name: str, hook_impls: Any, kwargs: Any) -> None:
        plugins = ", ".join(repr(impl.plugin_name) for impl in hook_impls) or "(none)"
        print(f"mergescope trace: {hook_name} called on plugin {plugins}", file=sys.stderr)

    def after(outcome: Any, hook_name: str, hook_impls: Any, kwargs: Any) -> None:
        plugins = ", ".join(repr(impl.plugin_name) for impl in hook_impls) or "(none)"
        if outcome.exception is not None:
            result = f"raised {type(outcome.exception).__name__}: {outcome.exception}"
        else:
            result = "returned"
        print(f"mergescope trace: {hook_name} on plugin {plugins} {result}", file=sys.stderr)

    pm.add_hookcall_monitoring(before, after)


def _load_entry_points(pm: pluggy.PluginManager) -> list[PluginInfo]:
    select, block = _env_names(SELECT_ENV), _env_names(BLOCK_ENV) or set()
    infos: list[PluginInfo] = []
    seen: set[str] = set()
    for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        # One distribution can be visible twice on sys.path (e.g. editable + test copy).
        if ep.name in seen or ep.name in block or (select is not None and ep.name not in select):
            continue
        seen.add(ep.name)
        dist = ep.dist.name if ep.dist else None
        version = ep.dist.version if ep.dist else None
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the others down
            message = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"mergescope plugin {ep.name!r} ({ep.value}) failed to load: {message}", stacklevel=2)
            infos.append(PluginInfo(ep.name, ep.value, dist, version, error=message))
            continue
        infos.append(PluginInfo(ep.name, ep.value, dist, version))
    return infos


_registry: Registry | None = None
_extra: list[tuple[object, str]] = []


def get_registry() -> Registry:
    """The process-wide registry: entry-point plugins plus any added with :func:`register_plugin`."""
    global _registry
    if _registry is None:
        pm = _new_plugin_manager()
        infos = _load_entry_points(pm)
        for plugin, name in _extra:
            pm.register(plugin, name=name)
            infos.append(PluginInfo(name, getattr(plugin, "__name__", repr(plugin))))
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or repr(exc.plugin)
            raise PluginError(
                f"plugin {name!r} implements a hook mergescope does not define ({exc}); "
                f"the hooks are: {', '.join(k.hook for k in KINDS.values())}"
            ) from exc
        _registry = Registry(pm, infos)
    return _registry


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Add an in-process plugin (a module or object with ``@hookimpl`` functions).

    Useful in notebooks and tests; installed plugins use the entry-point group instead.
    """
    if isinstance(plugin, types.ModuleType):
        name = name or plugin.__name__
    if not name:
        raise ValueError("register_plugin() needs a name for a plugin that is not a module")
    try:
        hash(plugin)
    except TypeError:  # pluggy keeps plugins in sets: hold the hooks of an unhashable one (a SimpleNamespace)
        plugin = _HookHolder(vars(plugin))
    _extra.append((plugin, name))
    reset(keep_extra=True)


class _HookHolder:
    """A hashable object carrying the hook functions of a plugin object that is not hashable."""

    def __init__(self, attributes: dict[str, Any]) -> None:
        self.__dict__.update(attributes)


def reset(keep_extra: bool = False) -> None:
    """Forget the loaded registry so the next :func:`get_registry` reloads (tests, env changes)."""
    global _registry
    _registry = None
    if not keep_extra:
        _extra.clear()
