"""Component protocols and the values they exchange.

A component is an ``attrs`` class with a ``name`` class attribute and one method,
depending on its kind:

==============  ==========================  =====================================
kind            hook                        method
==============  ==========================  =====================================
aligner         ``register_aligners``       ``align(models, reference, context)``
merger          ``register_mergers``        ``merge(models, context, alignment)``
visualizer      ``register_visualizers``    ``render(results, out_dir)``
metric          ``register_metrics``        ``score(a, b)``
differ          ``register_differs``        ``fit(activations, context)``
dataset         ``register_datasets``       ``load()``
architecture    ``register_architectures``  ``build(input_shape, num_classes)``
embedder        ``register_embedders``      ``embed(images)``
==============  ==========================  =====================================

Metrics and visualizers that need more than their arguments (the dataset's images,
the store's top-k, other models' activations) accept an optional keyword argument
``context``: the runner then passes the step's :class:`Context`.

Optional class attributes: ``paper`` (the reference a method reproduces, shown in the
registry). Optional method: ``describe(result) -> str``, a short human summary of the
component's result used in run summaries.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import attrs
import numpy as np
import torch
import xarray as xr
from torch import nn

__all__ = [
    "Kind",
    "KINDS",
    "Aligner",
    "Merger",
    "Visualizer",
    "Metric",
    "Differ",
    "DatasetSource",
    "Architecture",
    "Embedder",
    "ImageDataset",
    "TensorImageDataset",
    "Alignment",
    "MergeResult",
    "Evaluation",
    "Context",
    "evaluate",
    "context_keyword",
]

T = TypeVar("T")


# --------------------------------------------------------------------------- data


@runtime_checkable
class ImageDataset(Protocol):
    """A labelled image dataset with stable sample ids.

    ``dataset[i]`` returns ``(image, label)`` with ``image`` a float tensor ``(C, H, W)``.
    ``sample_ids[i]`` is the stable id of item ``i`` (its index in the full source
    dataset), so results that store ids (top-k, activations) point back to images.
    """

    name: str
    classes: tuple[str, ...]
    sample_ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...

    @property
    def input_shape(self) -> tuple[int, ...]: ...


@attrs.define(eq=False)
class TensorImageDataset(torch.utils.data.Dataset):
    """An in-memory :class:`ImageDataset` backed by one image tensor.

    Parameters
    ----------
    name
        A short name used in labels, e.g. ``"mnist5000/test"``.
    images
        Float tensor ``(N, C, H, W)``.
    labels
        Integer class of every image, ``(N,)``.
    sample_ids
        Stable id of every image, ``(N,)``.
    classes
        Class names, indexed by label.
    """

    name: str
    images: torch.Tensor
    labels: np.ndarray = attrs.field(converter=lambda a: np.asarray(a, dtype=np.int64))
    sample_ids: np.ndarray = attrs.field(converter=lambda a: np.asarray(a, dtype=np.int64))
    classes: tuple[str, ...] = attrs.field(converter=tuple)

    def __attrs_post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4:
            raise ValueError(f"dataset {self.name!r}: images must be (N, C, H, W), got {tuple(self.images.shape)}")
        if len(self.labels) != n or len(self.sample_ids) != n:
            raise ValueError(
                f"dataset {self.name!r}: {n} images but {len(self.labels)} labels and {len(self.sample_ids)} sample ids"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def subset(self, indices: Sequence[int], name: str | None = None) -> "TensorImageDataset":
        """Return the items at ``indices`` (positions, not sample ids), keeping their ids."""
        idx = np.asarray(indices, dtype=np.int64)
        return TensorImageDataset(
            name or self.name, self.images[torch.from_numpy(idx)], self.labels[idx], self.sample_ids[idx], self.classes
        )


# ------------------------------------------------------------------ result values


@attrs.frozen
class Evaluation:
    """Mean cross-entropy loss and top-1 accuracy of a classifier on a dataset."""

    loss: float
    accuracy: float


@attrs.define
class Alignment:
    """Transforms mapping each model's channels onto the reference model's.

    ``transforms[model][group]`` is a DataArray with dims ``("unit", "unit_ref")``: a
    permutation matrix, an invertible map or a general linear map from ``model``'s units
    of channel group ``group`` to the reference's (aligned activations are ``a @ M``).
    ``diagnostics`` holds whatever the aligner measured (matched correlations,
    iterations, ...) as labelled variables. ``results`` holds further result nodes by
    path relative to the step: ``"<layer>"`` for per-layer results (e.g. the top-k of
    aligned activations, ``topk_sample`` / ``topk_value``, which top-k grids draw), or
    ``"<model>/<group>"`` to sit beside that transform.
    """

    reference: str
    transforms: dict[str, dict[str, xr.DataArray]] = attrs.field(factory=dict)
    diagnostics: xr.Dataset = attrs.field(factory=xr.Dataset)
    results: dict[str, xr.Dataset] = attrs.field(factory=dict)

    def to_tree(self) -> xr.DataTree:
        """Return the alignment as a DataTree: ``reference`` and diagnostics at the root, ``/<model>/<group>`` transforms."""
        root = self.diagnostics.assign(reference=self.reference)
        children: dict[str, xr.Dataset] = {"/": root}
        for model, groups in self.transforms.items():
            for group, t in groups.items():
                children[f"{model}/{group}"] = xr.Dataset({"transform": t})
        for path, ds in self.results.items():
            path = path.strip("/")
            children[path] = children[path].merge(ds) if path in children else ds
        return xr.DataTree.from_dict(children)

    @classmethod
    def from_tree(cls, tree: xr.DataTree) -> "Alignment":
        """Rebuild an alignment written by :meth:`to_tree`."""
        transforms: dict[str, dict[str, xr.DataArray]] = {}
        results: dict[str, xr.Dataset] = {}
        for node in tree.subtree:
            if node is tree:
                continue
            ds = node.to_dataset(inherit=False)
            relative = node.relative_to(tree)
            if "transform" in ds and node.parent is not None and node.parent.parent is tree:
                transforms.setdefault(node.parent.name, {})[node.name] = ds["transform"]
                ds = ds.drop_vars("transform")
            if ds.data_vars:
                results[relative] = ds
        root = tree.to_dataset(inherit=False)
        return cls(str(root["reference"].item()), transforms, root.drop_vars("reference"), results)


@attrs.define
class MergeResult:
    """What a merger returns.

    Parameters
    ----------
    model
        The merged model, or ``None`` when the merger only measures (e.g. a sweep).
        Later pipeline steps can use it by the step's name.
    results
        Labelled results (curves, tables, scalars) stored in ``results.nc``.
    """

    model: nn.Module | None
    results: xr.Dataset = attrs.field(factory=xr.Dataset)


# ------------------------------------------------------------------------ context


def evaluate(
    model: nn.Module, data: ImageDataset, batch_size: int = 256, restrict_to: Sequence[int] | None = None
) -> Evaluation:
    """Mean cross-entropy and top-1 accuracy of a classifier on ``data``.

    Parameters
    ----------
    restrict_to
        Only these classes compete (the logits of the others are dropped before the
        softmax and the argmax): a task-specific head carved out of a shared one.
    """
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    keep = None if restrict_to is None else torch.as_tensor(sorted(restrict_to), dtype=torch.long)
    with torch.no_grad():
        for images, labels in loader:
            logits = model(images)
            if int(labels.max()) >= logits.shape[1]:
                raise ValueError(
                    f"{data.name!r} has labels up to {int(labels.max())} but the model outputs {logits.shape[1]} "
                    "classes: evaluate it on a dataset of its own classes"
                )
            if keep is not None:
                if not bool(torch.isin(labels, keep).all()):
                    raise ValueError(f"{data.name!r} holds labels outside the classes {keep.tolist()} it is restricted to")
                logits = logits[:, keep]
                labels = torch.searchsorted(keep, labels)  # class c -> its position among the kept
            total_loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=1) == labels).sum())
            count += len(labels)
    if count == 0:
        raise ValueError(f"cannot evaluate on the empty dataset {data.name!r}")
    return Evaluation(loss=total_loss / count, accuracy=correct / count)


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
    """

    data: ImageDataset | None = None
    seed: int = 0
    batch_size: int = 256
    quiet: bool = False
    workdir: Path | None = None
    models: list[str] = attrs.field(factory=list)
    layers: list[str] = attrs.field(factory=list)
    stores: Callable[[str], Any] | None = attrs.field(default=None, eq=False, repr=False)

    def evaluate(self, model: nn.Module) -> Evaluation:
        """Loss and accuracy of ``model`` on :attr:`data`."""
        if self.data is None:
            raise ValueError("this step needs data to evaluate models, but the pipeline has no [data]")
        return evaluate(model, self.data, self.batch_size)

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
    ) -> Any:
        """Record ``models`` over :attr:`data` in one pass: activations and streaming statistics.

        Parameters
        ----------
        models
            Name -> module.
        layers
            Layer selectors per model (see :func:`mergescope.activations.resolve_layers`).
        pairs
            Model pairs whose cross-covariance is accumulated (alignment statistics).
        covariance, topk, keep_activations, reduce, positions
            As in :class:`mergescope.store.StoreSpec`.

        Returns
        -------
        mergescope.store.Store
            Identical inputs (weights, data, options) reuse an earlier recording.
        """
        import tempfile

        from .checkpoints import state_digest
        from .store import StoreSpec, collect_store
        from .training import cache_key

        if self.data is None:
            raise ValueError("recording activations needs data, but the context has none")
        spec = StoreSpec(
            layers={m: list(layers[m]) for m in models},
            reduce=reduce,
            batch_size=self.batch_size,
            topk=topk,
            covariance=covariance,
            pairs=[tuple(p) for p in pairs],
            keep_activations=keep_activations,
            positions=positions,
        )
        ids = hashlib.sha256(np.asarray(self.data.sample_ids, dtype=np.int64).tobytes()).hexdigest()
        # Two loads of one dataset may differ in preprocessing (size, normalisation) but
        # not in name or ids: a few of the images themselves tell them apart.
        first = hashlib.sha256()
        for i in range(min(4, len(self.data))):
            first.update(np.ascontiguousarray(np.asarray(self.data[i][0], dtype=np.float32)).tobytes())
        key = cache_key(
            [state_digest(m) for m in models.values()], self.data.name, ids, first.hexdigest(), spec.identity()
        )
        root = self.workdir if self.workdir is not None else Path(tempfile.gettempdir()) / "mergescope-records"
        return collect_store(models, self.data, spec, root / key[:16], key=key, context=self)

    def _store(self, model: str) -> Any:
        if self.stores is None:
            raise ValueError(f"no recorded activations of {model!r}: this context has no stores (it runs outside a pipeline)")
        return self.stores(model)

    def activation(self, model: str, layer: str) -> xr.DataArray:
        """The recorded activations of ``model`` at ``layer`` over :attr:`data` (activation contract)."""
        return self._store(model).activation(model, layer)

    def topk(self, model: str, layer: str) -> Any:
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
        from tqdm.auto import tqdm

        return iter(tqdm(iterable, desc=desc, total=total, disable=self.quiet, leave=False, dynamic_ncols=True))


def context_keyword(method: Any, context: "Context | None") -> dict[str, Any]:
    """``{"context": context}`` when ``method`` accepts the optional ``context`` keyword, else ``{}``.

    Metrics and visualizers may take the step's context (images, top-k, recordings);
    the runner and the conformance kit pass it only to those that ask for it.
    """
    try:
        takes = "context" in inspect.signature(method).parameters
    except (TypeError, ValueError):  # callables without a signature
        takes = False
    return {"context": context} if takes else {}


# ---------------------------------------------------------------------- protocols


@runtime_checkable
class Aligner(Protocol):
    """Map every model's channels onto a reference model's channels."""

    name: ClassVar[str]

    def align(self, models: Mapping[str, nn.Module], reference: str, context: Context) -> Alignment: ...


@runtime_checkable
class Merger(Protocol):
    """Combine several models of one architecture into one."""

    name: ClassVar[str]

    def merge(
        self, models: Mapping[str, nn.Module], context: Context, alignment: Alignment | None = None
    ) -> MergeResult: ...


@runtime_checkable
class Visualizer(Protocol):
    """Turn results into files (figures, image grids, panels of the report)."""

    name: ClassVar[str]

    def render(self, results: xr.DataTree, out_dir: Path) -> list[Path]: ...


@runtime_checkable
class Embedder(Protocol):
    """Embed images as vectors whose cosine similarity measures how alike they look.

    ``images`` is a float tensor ``(N, C, H, W)`` of dataset images (values as the
    dataset gives them); the result is a float array ``(N, d)``.
    """

    name: ClassVar[str]

    def embed(self, images: torch.Tensor) -> np.ndarray: ...


@runtime_checkable
class Metric(Protocol):
    """Score every unit of two activation tensors over the same samples.

    ``a`` and ``b`` follow the activation contract (dims ``("sample", "unit", ...)``
    with identical ``sample`` coords); the result has dims ``("unit",)`` with ``b``'s
    ``unit`` coord.
    """

    name: ClassVar[str]

    def score(self, a: xr.DataArray, b: xr.DataArray) -> xr.DataArray: ...


@runtime_checkable
class Differ(Protocol):
    """Fit a dictionary over the activations of N models and describe each feature."""

    name: ClassVar[str]

    def fit(self, activations: Mapping[str, xr.DataArray], context: Context) -> xr.Dataset: ...


@runtime_checkable
class DatasetSource(Protocol):
    """Load a labelled image dataset."""

    name: ClassVar[str]

    def load(self) -> ImageDataset: ...


@runtime_checkable
class Architecture(Protocol):
    """Build an untrained classifier for images of ``input_shape`` with ``num_classes`` outputs."""

    name: ClassVar[str]

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module: ...


@attrs.frozen
class Kind:
    """One kind of component: its hook, its protocol and the method that does the work."""

    name: str
    hook: str
    protocol: type
    method: str


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("aligner", "register_aligners", Aligner, "align"),
        Kind("merger", "register_mergers", Merger, "merge"),
        Kind("visualizer", "register_visualizers", Visualizer, "render"),
        Kind("metric", "register_metrics", Metric, "score"),
        Kind("differ", "register_differs", Differ, "fit"),
        Kind("dataset", "register_datasets", DatasetSource, "load"),
        Kind("architecture", "register_architectures", Architecture, "build"),
        Kind("embedder", "register_embedders", Embedder, "embed"),
    )
}
