"""How batches reach the models: the options of every data loader the toolkit builds.

A pipeline's ``[loader]`` table (Python: :class:`LoaderOptions`) sets them once for the
run: worker processes that decode images in parallel, pinned host memory so that copies
to a CUDA device overlap with compute, workers kept alive between passes, and how many
batches each worker prepares ahead. They change how fast batches arrive, never which
batches or in which order, so they are not part of any cache key.

The runner installs the pipeline's options for the duration of a run
(:func:`loader_options`); evaluation, recording, training, BatchNorm resets and REPAIR
build their loaders with :func:`make_loader`, which reads them. Code outside a run gets
the defaults (no workers: the most portable choice, and the fastest for in-memory data).

:class:`TimedBatches` measures how much of a pass was spent waiting for the next batch,
which tells whether more workers would help.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

import attrs
import torch

from .errors import ConfigError

__all__ = [
    "PIN_MEMORY",
    "LoaderOptions",
    "TimedBatches",
    "current_loader_options",
    "loader_options",
    "make_loader",
    "to_device",
]

#: The accepted values of ``pin_memory``: ``"auto"`` pins when batches go to a CUDA device.
PIN_MEMORY = ("auto", True, False)

T = TypeVar("T")


def _non_negative(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"{attribute.name} must be a whole number >= 0, got {value!r}", where=f"key {attribute.name!r}"
        )


def _positive(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"{attribute.name} must be a whole number >= 1, got {value!r}", where=f"key {attribute.name!r}"
        )


def _pin_memory(_instance: Any, _attribute: attrs.Attribute, value: Any) -> None:
    if value not in PIN_MEMORY or (value == 1 and value is not True) or (value == 0 and value is not False):
        raise ConfigError(f"pin_memory must be 'auto', true or false, got {value!r}", where="key 'pin_memory'")


def _boolean(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name} must be true or false, got {value!r}", where=f"key {attribute.name!r}")


@attrs.frozen(kw_only=True)
class LoaderOptions:
    """Data-loading options of a run (the pipeline's ``[loader]`` table).

    Parameters
    ----------
    workers
        Worker processes that load and decode batches in parallel with the forward
        passes (``0``: in the main process). Image folders decode JPEG/PNG files, which
        is often slower than a GPU's forward pass: give them workers. In-memory tensor
        datasets (MNIST, the synthetic sets) gain nothing.
    pin_memory
        Page-locked host batches, so that copies to a CUDA device run asynchronously.
        ``"auto"`` (default) pins when the batches go to a CUDA device.
    persistent_workers
        Keep the workers alive between the epochs of one loader (training) instead of
        starting them again; only with ``workers > 0``.
    prefetch_factor
        Batches each worker prepares ahead; only with ``workers > 0``.
    """

    workers: int = attrs.field(default=0, validator=_non_negative)
    pin_memory: bool | str = attrs.field(default="auto", validator=_pin_memory)
    persistent_workers: bool = attrs.field(default=True, validator=_boolean)
    prefetch_factor: int = attrs.field(default=2, validator=_positive)

    def pins_for(self, device: torch.device | str | None) -> bool:
        """Whether batches bound for ``device`` are pinned."""
        if self.pin_memory == "auto":
            return device is not None and torch.device(device).type == "cuda"
        return bool(self.pin_memory)

    def to_table(self) -> dict[str, Any]:
        """The options that differ from the defaults, as a ``[loader]`` table."""
        default = LoaderOptions()
        return {
            field.name: getattr(self, field.name)
            for field in attrs.fields(LoaderOptions)
            if getattr(self, field.name) != getattr(default, field.name)
        }


_DEFAULT = LoaderOptions()
_CURRENT: contextvars.ContextVar[LoaderOptions | None] = contextvars.ContextVar(
    "mergescope_loader_options", default=None
)


def current_loader_options() -> LoaderOptions:
    """The options in force: those of the running pipeline, else the defaults."""
    return _CURRENT.get() or _DEFAULT


@contextlib.contextmanager
def loader_options(options: LoaderOptions) -> Iterator[LoaderOptions]:
    """Use ``options`` for every loader built inside the ``with`` block."""
    token = _CURRENT.set(options)
    try:
        yield options
    finally:
        _CURRENT.reset(token)


def make_loader(
    dataset: Any,
    batch_size: int,
    *,
    device: torch.device | str | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    workers: int | None = None,
) -> torch.utils.data.DataLoader:
    """A :class:`torch.utils.data.DataLoader` over ``dataset`` with the options in force.

    Parameters
    ----------
    dataset
        A map-style dataset.
    batch_size
        Items per batch; the last batch may be smaller.
    device
        Where the batches go (decides ``pin_memory = "auto"``).
    shuffle, generator
        A random order drawn from ``generator`` (the order does not depend on the
        number of workers: the sampler runs in the main process).
    workers
        Overrides the options' ``workers`` for this loader.
    """
    options = current_loader_options()
    workers = options.workers if workers is None else workers
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"persistent_workers": options.persistent_workers, "prefetch_factor": options.prefetch_factor}
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=workers,
        pin_memory=options.pins_for(device),
        **extra,
    )


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``; asynchronous when a pinned host tensor goes to CUDA.

    Only CUDA's pinned-memory allocator keeps a host buffer alive until an asynchronous
    copy is done, so copies to other devices wait.
    """
    to_cuda = torch.device(device).type == "cuda"
    return tensor.to(device, non_blocking=to_cuda and tensor.device.type == "cpu" and tensor.is_pinned())


class TimedBatches(Generic[T]):
    """Iterate ``batches`` and add up the time spent waiting for each next batch.

    ``waited`` is the seconds inside the loader; ``elapsed`` the seconds from the
    first request to the last batch's return; ``share`` their ratio: near 0 when the
    models are the bottleneck, near 1 when the data are (then add ``workers``).
    """

    def __init__(self, batches: Iterable[T]) -> None:
        self._batches = batches
        self.waited = 0.0
        self.elapsed = 0.0

    def __iter__(self) -> Iterator[T]:
        iterator = iter(self._batches)
        start = time.perf_counter()
        while True:
            asked = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                break
            finally:
                now = time.perf_counter()
                self.waited += now - asked
                self.elapsed = now - start
            yield item

    @property
    def share(self) -> float:
        """The fraction of the pass spent waiting for data (0 before any batch)."""
        return self.waited / self.elapsed if self.elapsed > 0 else 0.0
