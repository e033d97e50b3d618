"""The values components exchange: datasets, evaluations, alignments, merge results.

These are plain data, below everything that runs: the store, training, the context and
the components all build on them. The protocols of the kinds that are not pipeline
steps (datasets, architectures, embedders) live here too, since they describe how
such values are made.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar, Protocol, cast, runtime_checkable

import attrs
import numpy as np
import torch
import xarray as xr
from torch import nn

from .errors import ContractError
from .loading import make_loader, to_device

__all__ = [
    "ImageDataset",
    "TensorImageDataset",
    "Evaluation",
    "evaluate",
    "model_device",
    "Alignment",
    "ALIGNMENT_SPACES",
    "CHANNEL_GROUPS",
    "LAYERS",
    "MergeResult",
    "DatasetSource",
    "Architecture",
    "Embedder",
]

#: An alignment keyed by the architecture's channel groups: applicable to weights.
CHANNEL_GROUPS = "channel-groups"
#: An alignment keyed by layer names: a map between recorded activations only.
LAYERS = "layers"
#: What the keys of :attr:`Alignment.transforms` can be.
ALIGNMENT_SPACES = (CHANNEL_GROUPS, LAYERS)


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


def _str_tuple(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


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
    classes: tuple[str, ...] = attrs.field(converter=_str_tuple)

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

    def subset(self, indices: Sequence[int], name: str | None = None) -> TensorImageDataset:
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

    ``space`` says what the keys of ``transforms[model]`` are, and so what the
    alignment can be applied to:

    ``"channel-groups"`` (:data:`CHANNEL_GROUPS`)
        Channel groups of the architecture, as :func:`mergescope.groups.channel_groups`
        names them. Such an alignment can be applied to the model's weights
        (:func:`mergescope.groups.align_to_reference`), so ``"b@step"`` names a model.
    ``"layers"`` (:data:`LAYERS`)
        Layer names: a map between the recorded activations of two layers (a regression,
        say). It describes activations only; no model can be built from it.
    """

    reference: str
    transforms: dict[str, dict[str, xr.DataArray]] = attrs.field(factory=dict)
    diagnostics: xr.Dataset = attrs.field(factory=xr.Dataset)
    results: dict[str, xr.Dataset] = attrs.field(factory=dict)
    space: str = attrs.field(default="channel-groups", kw_only=True)

    @space.validator
    def _check_space(self, attribute: attrs.Attribute, value: str) -> None:
        if value not in ALIGNMENT_SPACES:
            raise ValueError(f"an Alignment's space is one of {', '.join(ALIGNMENT_SPACES)}, not {value!r}")

    @property
    def applies_to_weights(self) -> bool:
        """Whether the transforms are keyed by channel groups, so models can be mapped with them."""
        return self.space == CHANNEL_GROUPS

    def to_tree(self) -> xr.DataTree:
        """Return the alignment as a DataTree: ``reference`` and diagnostics at the root, ``/<model>/<group>`` transforms."""
        root = self.diagnostics.assign(reference=self.reference, space=self.space)
        children: dict[str, xr.Dataset] = {"/": root}
        for model, groups in self.transforms.items():
            for group, t in groups.items():
                children[f"{model}/{group}"] = xr.Dataset({"transform": t})
        for path, ds in self.results.items():
            path = path.strip("/")
            children[path] = children[path].merge(ds) if path in children else ds
        return xr.DataTree.from_dict(children)

    @classmethod
    def from_tree(cls, tree: xr.DataTree) -> Alignment:
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
        # Alignments written before spaces were recorded were all in channel-group space.
        space = str(root["space"].item()) if "space" in root else CHANNEL_GROUPS
        diagnostics = root.drop_vars([v for v in ("reference", "space") if v in root])
        return cls(str(root["reference"].item()), transforms, diagnostics, results, space=space)


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


# -------------------------------------------------------------------- evaluation


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (of its buffers when it has none; the CPU when it has neither)."""
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


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
    # An ImageDataset is a map-style dataset of (image, label) pairs, as the loader expects.
    dataset = cast("torch.utils.data.Dataset[tuple[torch.Tensor, int]]", data)
    model.eval()
    device = model_device(model)
    loader = make_loader(dataset, batch_size, device=device)
    total_loss, correct, count = 0.0, 0, 0
    keep = None if restrict_to is None else torch.as_tensor(sorted(restrict_to), dtype=torch.long, device=device)
    with torch.no_grad():
        for images, cpu_labels in loader:
            labels = to_device(cpu_labels, device)
            logits = model(to_device(images, device)).float()
            if int(labels.max()) >= logits.shape[1]:
                raise ContractError(
                    f"{data.name!r} has labels up to {int(labels.max())} but the model outputs {logits.shape[1]} "
                    "classes: evaluate it on a dataset of its own classes"
                )
            if keep is not None:
                if not bool(torch.isin(labels, keep).all()):
                    raise ValueError(
                        f"{data.name!r} holds labels outside the classes {keep.tolist()} it is restricted to"
                    )
                logits = logits[:, keep]
                labels = torch.searchsorted(keep, labels)  # class c -> its position among the kept
            total_loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=1) == labels).sum())
            count += len(labels)
    if count == 0:
        raise ValueError(f"cannot evaluate on the empty dataset {data.name!r}")
    return Evaluation(loss=total_loss / count, accuracy=correct / count)


# ---------------------------------------------------- protocols of value makers


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


@runtime_checkable
class Embedder(Protocol):
    """Embed images as vectors whose cosine similarity measures how alike they look.

    ``images`` is a float tensor ``(N, C, H, W)`` of dataset images (values as the
    dataset gives them); the result is a float array ``(N, d)``.
    """

    name: ClassVar[str]

    def embed(self, images: torch.Tensor) -> np.ndarray: ...
