"""Component options: TOML tables <-> attrs instances, through one cattrs converter.

Unknown keys are an error naming the key, the component and the accepted keys.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard, TypeVar, get_origin

import attrs
import cattrs
from cattrs.cols import list_structure_factory

from .errors import ConfigError, did_you_mean

__all__ = [
    "converter",
    "option_names",
    "structure_options",
    "unstructure_options",
    "describe",
    "PATH",
    "path_if",
    "component_tables",
    "component_options",
    "resolve_paths",
    "canonical_path",
    "path_options",
    "CACHE_PATH",
]

#: ``attrs`` field metadata of an option that is a file or folder path: a relative path
#: in a pipeline file is taken relative to that file's folder, as ``checkpoint`` is.
PATH = {"mergescope.path": True}

#: ``attrs`` field metadata of a path option that is a cache (where downloads are kept):
#: resolved like :data:`PATH`, but what it holds is not part of step keys (see
#: :func:`path_options`).
CACHE_PATH = {"mergescope.path": True, "mergescope.cache": True}


def path_if(is_path: Callable[[str], bool]) -> dict[str, Any]:
    """``attrs`` field metadata of an option that is a path only when ``is_path(value)``.

    For options that take either a name or a file (a pretrained tag or a checkpoint): a
    value ``is_path`` accepts is resolved like a :data:`PATH` option, others are kept.
    """
    return {"mergescope.path": is_path}


def component_options(kind: str, use: str) -> dict[str, Any]:
    """``attrs`` field metadata of a table of options for a component of ``kind``.

    The component is named by the sibling option ``use`` (an ``embedder`` name beside
    its ``embedder_options``, say); its path options in the table are resolved like the
    component's own (see :func:`resolve_paths`).
    """
    return {"mergescope.options_of": (kind, use)}


def component_tables(kind: str) -> dict[str, str]:
    """``attrs`` field metadata of an option holding tables of components of ``kind``.

    Their path options are resolved like the component's own (see :func:`resolve_paths`).
    """
    return {"mergescope.tables": kind}


T = TypeVar("T")

converter = cattrs.Converter(forbid_extra_keys=True)
converter.register_structure_hook(Path, lambda value, _: Path(value))
converter.register_unstructure_hook(Path, str)


# cattrs would coerce with str()/int()/float(); a pipeline value of the wrong type must
# be an error instead (e.g. a table where a string belongs, or 0.5 where an int does).
def _strict(tp: type, accepted: tuple[type, ...], convert: Any = None) -> None:
    def hook(value: Any, _: Any) -> Any:
        if isinstance(value, bool) and bool not in accepted or not isinstance(value, accepted):
            raise TypeError(f"expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return convert(value) if convert else value

    converter.register_structure_hook(tp, hook)


def _is_list(tp: Any) -> bool:
    return get_origin(tp) is list or tp is list


def _strict_list(tp: Any, conv: cattrs.Converter) -> Any:
    inner = list_structure_factory(tp, conv)

    def hook(value: Any, _: Any) -> Any:
        if not isinstance(value, (list, tuple)):  # a string is iterable, but not a list of options
            raise TypeError(f"expected a list, got {type(value).__name__} {value!r}")
        return inner(value, _)

    return hook


converter.register_structure_hook_factory(_is_list, _strict_list)
_strict(str, (str,))
_strict(int, (int,))
_strict(float, (int, float), float)
_strict(bool, (bool,))


def describe(cls: type) -> str:
    """``"component 'interpolation'"``-style label for error messages."""
    return f"component {getattr(cls, 'name', cls.__qualname__)!r}"


def option_names(cls: type) -> list[str]:
    """The option keys ``cls`` accepts (its attrs fields that take an init argument)."""
    return [f.alias or f.name for f in attrs.fields(cls) if f.init]


if sys.version_info >= (3, 11):
    from builtins import BaseExceptionGroup as _ExceptionGroup
else:  # pragma: no cover - cattrs depends on the backport there
    from exceptiongroup import BaseExceptionGroup as _ExceptionGroup


def _first_leaf(exc: BaseException) -> tuple[BaseException, list[str]]:
    """Walk cattrs' nested exception groups down to the first real error and its key path."""
    path: list[str] = []
    while isinstance(exc, _ExceptionGroup) and exc.exceptions:
        inner = exc.exceptions[0]
        note = next((n for n in getattr(inner, "__notes__", []) if isinstance(n, str)), "")
        m = re.search(r"attribute (\w+)|index (\d+)|key '?([^'\s]+)'?", note)
        if m:
            path.append(next(g for g in m.groups() if g is not None))
        exc = inner
    return exc, path


def structure_options(
    cls: type[T], options: Mapping[str, Any], label: str | None = None, reserved: Sequence[str] = ()
) -> T:
    """Build ``cls`` from a table of options.

    Parameters
    ----------
    cls
        An attrs component class.
    options
        Option values, e.g. a TOML table without the pipeline's own keys.
    label
        How to name the component in errors; defaults to ``component 'name'``.
    reserved
        Keys the surrounding table accepts besides the options (e.g. a step's ``models``),
        offered as suggestions for a misspelled key.

    Raises
    ------
    ConfigError
        An unknown key, a value of the wrong type, or a value the component rejects;
        the message names the key, the component and what is accepted.
    """
    label = label or describe(cls)
    accepted = option_names(cls)
    for key in options:
        if key not in accepted:
            hint = did_you_mean(key, [*accepted, *reserved])
            also = f" Also accepted here: {', '.join(reserved)}." if reserved else ""
            raise ConfigError(
                f"unknown option {key!r} for {label}.{hint} Accepted options: {', '.join(accepted) or '(none)'}.{also}",
                where=f"key {key!r}",
            )
    try:
        return converter.structure(dict(options), cls)
    except cattrs.BaseValidationError as exc:
        leaf, path = _first_leaf(exc)
        if not path:  # an attrs validator failed in __init__: its message quotes the option
            path = [k for k in re.findall(r"'(\w+)'", str(leaf)) if k in accepted][:1]
        key = ".".join(path) or "?"
        raise ConfigError(f"bad value for option {key!r} of {label}: {leaf}", where=f"key {key!r}") from exc
    except (ValueError, TypeError) as exc:
        # attrs validators raise these; their message names the attribute.
        m = re.search(r"'(\w+)'", str(exc))
        named = m.group(1) if m and m.group(1) in accepted else None
        raise ConfigError(f"bad options for {label}: {exc}", where=f"key {named!r}" if named else None) from exc


def unstructure_options(component: Any) -> dict[str, Any]:
    """The options of a component instance as a TOML-ready table (``None`` values left out)."""
    raw = converter.unstructure(component)
    return {k: _tomlable(v) for k, v in raw.items() if v is not None}


def _tomlable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_tomlable(v) for v in value]
    if isinstance(value, list):
        return [_tomlable(v) for v in value]
    if isinstance(value, dict):
        return {k: _tomlable(v) for k, v in value.items() if v is not None}
    return value


def resolve_paths(component: Any, base_dir: Path, lookup: Any) -> Any:
    """``component`` with its relative path options taken relative to ``base_dir``.

    Options flagged with :data:`PATH` are resolved; options flagged with
    :func:`component_tables` hold tables whose components' path options are resolved in
    turn (``lookup(kind, name)`` gives a component class). Every path becomes absolute and
    canonical (:func:`canonical_path`), so the same file has one spelling whatever the working directory.
    """
    if not attrs.has(type(component)):
        return component
    values = {f.alias: getattr(component, f.name) for f in attrs.fields(type(component)) if f.init}
    changes = _resolved_options(type(component), values, base_dir, lookup)
    return attrs.evolve(component, **changes) if changes else component


def canonical_path(path: str | Path, base_dir: Path) -> Path:
    """``path`` as an absolute, canonical path (``~`` expanded, symlinks and ``..`` resolved).

    A relative path is taken relative to ``base_dir``, which is made absolute first.
    """
    path = Path(path).expanduser()
    return (path if path.is_absolute() else Path(base_dir) / path).resolve()


def _is_path_option(value: Any, field: Any) -> TypeGuard[str | Path]:
    """Whether ``value`` of option ``field`` is a path (:data:`PATH`, or :func:`path_if` accepts it)."""
    is_path = field.metadata.get("mergescope.path")
    return bool(is_path) and isinstance(value, (str, Path)) and (is_path is True or is_path(str(value)))


def _resolved_options(cls: type, values: Mapping[str, Any], base_dir: Path, lookup: Any) -> dict[str, Any]:
    """The options of ``cls`` among ``values`` that change once their paths are resolved."""
    changes: dict[str, Any] = {}
    for field in attrs.fields(cls):
        value = values.get(field.alias)
        if _is_path_option(value, field):
            resolved = type(value)(canonical_path(value, base_dir))
            if resolved != value:
                changes[field.alias] = resolved
        kind = field.metadata.get("mergescope.tables")
        if kind and isinstance(value, list):
            changes[field.alias] = [
                _resolve_table(t, t.get("use") if isinstance(t, dict) else None, base_dir, kind, lookup) for t in value
            ]
        options_of = field.metadata.get("mergescope.options_of")
        if options_of and isinstance(value, dict):
            kind, use_field = options_of
            use = values[use_field] if use_field in values else _default(cls, use_field)
            resolved = _resolve_table(value, use, base_dir, kind, lookup)
            if resolved != value:
                changes[field.alias] = resolved
    return changes


def path_options(component: Any, lookup: Any) -> dict[str, str]:
    """Every path option of ``component`` that is an input, by its key, e.g. ``{"root": "/data/images"}``.

    Options flagged with :data:`PATH` (or :func:`path_if`, when the value is a path), also
    inside tables of components (:func:`component_tables`, keyed ``"parts.0.root"``) and
    tables of a named component's options (:func:`component_options`); ``lookup(kind,
    name)`` gives a component class. Options flagged :data:`CACHE_PATH` are left out.
    """
    if not attrs.has(type(component)):
        return {}
    values = {f.alias: getattr(component, f.name) for f in attrs.fields(type(component)) if f.init}
    return _path_values(type(component), values, lookup)


def _path_values(cls: type, values: Mapping[str, Any], lookup: Any, prefix: str = "") -> dict[str, str]:
    found: dict[str, str] = {}
    for field in attrs.fields(cls):
        value = values.get(field.alias)
        if _is_path_option(value, field) and not field.metadata.get("mergescope.cache"):
            found[f"{prefix}{field.alias}"] = str(value)
        kind = field.metadata.get("mergescope.tables")
        if kind and isinstance(value, list):
            for i, table in enumerate(value):
                part = _table_class(table, table.get("use") if isinstance(table, dict) else None, kind, lookup)
                if part is not None:
                    found.update(_path_values(part, table, lookup, f"{prefix}{field.alias}.{i}."))
        options_of = field.metadata.get("mergescope.options_of")
        if options_of and isinstance(value, dict):
            kind, use_field = options_of
            use = values[use_field] if use_field in values else _default(cls, use_field)
            part = _table_class(value, use, kind, lookup)
            if part is not None:
                found.update(_path_values(part, value, lookup, f"{prefix}{field.alias}."))
    return found


def _table_class(table: Any, use: Any, kind: str, lookup: Any) -> type | None:
    """The attrs class of the ``kind`` component named ``use`` whose options ``table`` holds, if any."""
    if not isinstance(table, dict) or not isinstance(use, str):
        return None
    try:
        cls = lookup(kind, use)
    except Exception:  # an unknown name is reported where the table is built
        return None
    return cls if attrs.has(cls) else None


def _default(cls: type, name: str) -> Any:
    default = attrs.fields_dict(cls)[name].default
    return None if isinstance(default, attrs.Factory) else default  # type: ignore[arg-type]


def _resolve_table(table: Any, use: Any, base_dir: Path, kind: str, lookup: Any) -> Any:
    """``table`` (options of the ``kind`` component named ``use``) with its paths resolved."""
    cls = _table_class(table, use, kind, lookup)
    return table if cls is None else {**table, **_resolved_options(cls, table, base_dir, lookup)}
