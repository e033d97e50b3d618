"""Errors that mergescope raises on purpose.

Every error meant for a user derives from :class:`MergescopeError`; the CLI prints
those as one paragraph without a traceback (unless ``--debug``). Everything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "MergescopeError",
    "ConfigError",
    "UnknownComponentError",
    "DuplicateComponentError",
    "PluginError",
    "CheckpointError",
    "ContractError",
    "DataError",
    "MissingDependencyError",
    "closest",
    "did_you_mean",
    "article",
]


class MergescopeError(Exception):
    """Base class of every error mergescope reports to a user."""


class ConfigError(MergescopeError, ValueError):
    """A pipeline or component option is wrong.

    Parameters
    ----------
    message
        What was wrong and what is accepted.
    where
        Where it was found, e.g. ``"pipeline.toml, [[steps]] #2 (use = 'kendall-tau'), key 'layers'"``.
    """

    def __init__(self, message: str, where: str | None = None) -> None:
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)

    def located(self, where: str) -> ConfigError:
        """Return the same error with ``where`` prefixed to its location."""
        inner = f"{where}, {self.where}" if self.where else where
        return type(self)(self.message, inner)


class DataError(ConfigError):
    """The data a pipeline reads cannot be used: e.g. an image file that does not decode.

    A :class:`ConfigError` (the pipeline points at data that is wrong, not a bug), so the
    runner prefixes the place it was met and keeps the message, which names the dataset
    and the file. Raised inside a ``DataLoader`` worker process, torch re-raises it as
    ``DataError(<the worker's traceback>)``; only the original message is kept.
    """

    def __init__(self, message: str, where: str | None = None) -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message, where)


class UnknownComponentError(ConfigError, LookupError):
    """A component name that no loaded plugin registers."""


class DuplicateComponentError(MergescopeError):
    """Two plugins register the same name for one kind of component."""


class PluginError(MergescopeError):
    """A plugin is malformed (bad hook, bad component class)."""


class CheckpointError(MergescopeError):
    """A model checkpoint is missing, unsafe, or does not fit its architecture."""


class ContractError(MergescopeError, ValueError):
    """A labelled array does not follow the activation / result contract."""


class MissingDependencyError(ConfigError, ImportError):
    """A component needs an optional package that is not installed.

    Raised by :func:`mergescope.extras.require` when a component is used, never when its
    plugin is loaded. The message names the component and the extra that installs the
    package, e.g. ``pip install 'mergescope[clip]'``. It is a :class:`ConfigError` (the
    pipeline chose a component this installation cannot run) and an :class:`ImportError`.

    Parameters
    ----------
    message
        Which component needs which package, and the command that installs it.
    where
        Where the component was named, as for :class:`ConfigError`.
    module
        The module that could not be imported, e.g. ``"open_clip"``.
    extra
        The extra of the ``mergescope`` distribution that installs it, e.g. ``"clip"``.
    """

    def __init__(self, message: str, where: str | None = None, *, module: str = "", extra: str = "") -> None:
        super().__init__(message, where)
        self.name = module or None  # ImportError's attribute: the module that failed
        self.module = module
        self.extra = extra

    def located(self, where: str) -> MissingDependencyError:
        """Return the same error with ``where`` prefixed to its location."""
        inner = f"{where}, {self.where}" if self.where else where
        return type(self)(self.message, inner, module=self.module, extra=self.extra)


def article(word: str) -> str:
    """``"a merger"`` / ``"an aligner"``: the word with its indefinite article."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def closest(name: str, known: Iterable[str]) -> str | None:
    """Return the known name closest to ``name``, or ``None`` when nothing is close."""
    matches = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the known name closest to ``name``; empty when nothing is close."""
    guess = closest(name, known)
    return f" Did you mean {guess!r}?" if guess else ""
