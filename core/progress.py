"""Progress reporting as a plain callable, so that low-level work needs no run context.

Long loops (training, recording, BatchNorm statistics) take a ``progress`` argument: a
callable ``progress(iterable, desc, total)`` that yields the items of ``iterable`` and
may show how far it has come. :func:`progress_bar` makes the usual one (tqdm, hidden
when quiet); :func:`silent` shows nothing. A run's :class:`~mergescope.context.Context`
hands its own as ``context.progress``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

__all__ = ["Progress", "progress_bar", "silent"]

T = TypeVar("T")


class Progress(Protocol):
    """``progress(iterable, desc, total=None)``: iterate over ``iterable``, showing how far it has come."""

    def __call__(self, iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]: ...


def silent(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Iterate without showing anything."""
    return iter(iterable)


def progress_bar(quiet: bool = False) -> Progress:
    """A :class:`Progress` that draws a tqdm bar (in a terminal or a notebook), or nothing when ``quiet``."""
    if quiet:
        return silent

    def bar(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        from tqdm.auto import tqdm

        return iter(tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True))

    return bar
