"""The context a component runs in: the step's data, models, recordings and progress.

The runner builds one :class:`Context` per step. Components read the dataset through
it, record activations with :meth:`Context.record` (the one way for aligners and
mergers to get activations with their statistics), read the run's recordings with
:meth:`Context.activation` and :meth:`Context.topk`, and show progress with
:meth:`Context.progress`. Below this module nothing needs a context: the store,
training and BatchNorm resets take a plain ``progress`` callable.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import attrs
import numpy as np
import torch
import xarray as xr
from torch import nn

from .devices import autocast
from .keys import state_digest
from .progress import progress_bar
from .statistics import TopK
from .store import Store, StoreSpec, collect_store, recording_key
from .tasks import ValidationTask, evaluate_on_task
from .values import Evaluation, ImageDataset, evaluate

__all__ = ["Context"]

T = TypeVar("T")


@attrs.define
class Context:
    """What the runner offers a component while it runs.

    Parameters
    ----------
    data
        The pipeline's dataset (evaluation and activations), or ``None``.
    seed
        The pipeline seed; components with randomness also take their own ``seed`` option.
    batch_size
        Batch size for passes over ``data``.
    quiet
        Hide progress bars.
    workdir
        Where :meth:`record` keeps its activation stores (the runner uses the run
        directory, so recordings are reused on a re-run); a temporary folder when ``None``.
    models, layers
        The models (declared or merged) and layer names of the running step.
    stores
        ``model -> Store``: where the runner recorded each model over :attr:`data`
        (behind :meth:`activation` and :meth:`topk`); ``None`` outside a run.
    device
        Where the run's models are (the runner moves every model there). Components that
        make tensors for a model make them on ``model``'s own device
        (``next(model.parameters()).device``); :meth:`evaluate` and :meth:`record` do.
    precision
        ``"fp32"``, ``"bf16"`` or ``"fp16"``: the precision of the forward passes of
        :meth:`evaluate` and :meth:`record` (see :func:`mergescope.devices.autocast`).
    modules
        The step's models as modules (name -> module), for a visualizer that runs them
        (feature visualisation optimises their inputs); empty where a step receives its
        models as an argument.
    tasks
        The pipeline's tasks that give validation data, each with its head (see
        :mod:`mergescope.tasks`): what a search over merge coefficients chooses on
        (:func:`mergescope.task_vectors.search_scaling`), scored with :meth:`evaluate_task`.
    """

    data: ImageDataset | None = None
    seed: int = 0
    batch_size: int = 256
    quiet: bool = False
    workdir: Path | None = None
    models: list[str] = attrs.field(factory=list)
    layers: list[str] = attrs.field(factory=list)
    stores: Callable[[str], Store] | None = attrs.field(default=None, eq=False, repr=False)
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    modules: Mapping[str, nn.Module] = attrs.field(factory=dict, eq=False, repr=False)
    tasks: Sequence[ValidationTask] = attrs.field(factory=list, eq=False, repr=False)

    def evaluate(self, model: nn.Module) -> Evaluation:
        """Loss and accuracy of ``model`` on :attr:`data`."""
        if self.data is None:
            raise ValueError("this step needs data to evaluate models, but the pipeline has no [data]")
        with autocast(self.device, self.precision):
            return evaluate(model, self.data, self.batch_size)

    def evaluate_task(self, model: nn.Module, task: ValidationTask) -> Evaluation:
        """Loss and accuracy of ``model`` on a task's validation data, with the task's head and classes."""
        with autocast(self.device, self.precision):
            return evaluate_on_task(model, task.load(), task.head, task.restrict, self.batch_size, task.where)

    def record(
        self,
        models: Mapping[str, nn.Module],
        layers: Mapping[str, Sequence[str]],
        *,
        pairs: Sequence[tuple[str, str]] = (),
        covariance: bool = False,
        topk: int = 0,
        keep_activations: bool = True,
        reduce: str = "mean",
        positions: bool = False,
        tokens: str = "mean",
    ) -> Store:
        """Record ``models`` over :attr:`data` in one pass: activations and streaming statistics.

        Parameters
        ----------
        models
            Name -> module.
        layers
            Layer selectors per model (see :func:`mergescope.activations.resolve_layers`).
        pairs
            Model pairs whose cross-covariance is accumulated (alignment statistics).
        covariance, topk, keep_activations, reduce, positions, tokens
            As in :class:`mergescope.store.StoreSpec`.

        Returns
        -------
        mergescope.store.Store
            Identical inputs (weights, data, options) reuse an earlier recording.
        """
        if self.data is None:
            raise ValueError("recording activations needs data, but the context has none")
        spec = StoreSpec(
            layers={m: list(layers[m]) for m in models},
            reduce=reduce,
            batch_size=self.batch_size,
            topk=topk,
            covariance=covariance,
            pairs=[(a, b) for a, b in pairs],
            keep_activations=keep_activations,
            positions=positions,
            tokens=tokens,
        )
        key = recording_key([state_digest(m) for m in models.values()], self.data, spec, self.precision)
        root = self.workdir if self.workdir is not None else Path(tempfile.gettempdir()) / "mergescope-records"
        with autocast(self.device, self.precision):
            return collect_store(models, self.data, spec, root / key[:16], key=key, progress=self.progress)

    def _store(self, model: str) -> Store:
        if self.stores is None:
            raise ValueError(
                f"no recorded activations of {model!r}: this context has no stores (it runs outside a pipeline)"
            )
        return self.stores(model)

    def activation(self, model: str, layer: str) -> xr.DataArray:
        """The recorded activations of ``model`` at ``layer`` over :attr:`data` (activation contract)."""
        return self._store(model).activation(model, layer)

    def topk(self, model: str, layer: str) -> TopK:
        """The streaming top-k of ``model`` at ``layer`` (a :class:`mergescope.statistics.TopK`)."""
        return self._store(model).topk(model, layer)

    def images(self, sample_ids: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The images of :attr:`data` with the given sample ids, ``(len(ids), C, H, W)``.

        Raises
        ------
        KeyError
            Naming the first id that is not in the dataset.
        """
        if self.data is None:
            raise ValueError("this step needs the dataset's images, but the pipeline has no [data]")
        wanted = np.asarray(sample_ids, dtype=np.int64).ravel()
        ids = np.asarray(self.data.sample_ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        pos = np.searchsorted(ids, wanted, sorter=order)
        pos = np.minimum(pos, len(ids) - 1)
        found = order[pos]
        missing = ids[found] != wanted
        if missing.any():
            raise KeyError(f"sample id {int(wanted[missing][0])} is not in the dataset {self.data.name!r}")
        if not len(wanted):
            return torch.empty((0, *self.data.input_shape))
        return torch.stack([self.data[int(i)][0] for i in found])

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        """Wrap ``iterable`` in a progress bar (silent when :attr:`quiet`)."""
        return progress_bar(self.quiet)(iterable, desc, total)
