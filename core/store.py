"""The activation store: one streaming pass over the data records every model at once.

:func:`collect_store` runs every model on each batch (one forward pass per model),
and in the same pass

- writes the channel summaries (or, opt-in, full maps; for token layers the class
  token, the mean token or every token, see :mod:`mergescope.tokens`) chunk by chunk,
- updates per-unit statistics: mean and variance (:class:`~mergescope.statistics.Moments`),
  top-k samples (:class:`~mergescope.statistics.TopK`), the within-model covariance and
  the cross-model covariance of chosen pairs (:class:`~mergescope.statistics.CoMoments`).

Memory does not grow with the dataset: a chunk is written to its own netCDF file and
the accumulators are fixed-size. After every chunk but the last the accumulators are
checkpointed, so a killed collection resumes from the last checkpointed chunk and ends
with results identical to an uninterrupted run (the last chunk's statistics go straight
into ``statistics.nc``). At the end the chunks are joined into one netCDF
file per model (groups ``/<layer>``) plus ``statistics.nc``, each written under a
temporary name and renamed; a ``COMPLETE`` marker is written last.

A collection directory::

    <model>.nc         /<layer>/activation  (sample, unit[, y, x]) or (sample, unit, token)
    statistics.nc      /<model>/<layer>/{moments,topk,covariance}, /cross/<a>/<b>/<layer>
    COMPLETE           JSON: key, samples, shard -- written last
    .work/             chunks and the checkpoint while collecting (removed at the end)

Shards (``shard=(i, n)``) collect contiguous slices of the dataset into separate
directories; :func:`join_stores` merges their statistics exactly and their activations
with :func:`xarray.open_mfdataset`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import attrs
import netCDF4
import numpy as np
import threadpoolctl
import torch
import xarray as xr
from torch import nn

from .activations import (
    REDUCTIONS,
    VARIABLE,
    attach_recorders,
    owned_array,
    resolve_layers,
    spatial_summary,
    summarise,
    uses_groups,
    validate_activation,
)
from .devices import device_mix, float64_device
from .errors import ConfigError, ContractError
from .extras import require
from .groups import example_input
from .keys import cache_key
from .loading import TimedBatches, make_loader, to_device
from .progress import Progress, silent
from .statistics import CoMoments, Moments, TopK
from .storage import atomic_path, load_tree, save_tree
from .tokens import DEFAULT_TOKENS, check_tokens, require_token_layers, token_rows
from .values import Evaluation, ImageDataset, model_device

log = logging.getLogger(__name__)

__all__ = [
    "StoreSpec",
    "Store",
    "collect_store",
    "join_stores",
    "shard_positions",
    "dataset_identity",
    "recording_key",
    "MARKER",
    "RECORDING_FORMAT",
]

MARKER = "COMPLETE"

#: Most bytes of activations a collection holds in memory before writing them (one
#: chunk): full feature maps of large layers reach this long before ``chunk_size`` samples.
CHUNK_BYTES = 512 * 2**20
#: Most bytes per storage chunk of a joined activation file: what one read decompresses.
STORAGE_CHUNK_BYTES = 64 * 2**20
#: Activation arrays larger than this are opened lazily (dask) rather than loaded.
EAGER_BYTES = 256 * 2**20

#: Part of every recording's identity. Raise it when recording changes what a store
#: holds for the same models, data and options (2: outputs changed in place by a later
#: layer are recorded as the layer returned them; 3: (N, T, D) outputs are token layers,
#: summarised over tokens rather than over channels).
RECORDING_FORMAT = 3

_WORK = ".work"
_CHECKPOINT = "checkpoint.nc"


@attrs.define
class StoreSpec:
    """What a collection records.

    Parameters
    ----------
    layers
        Layer names per model.
    reduce
        ``"mean"`` or ``"max"`` over space for channel summaries, or ``"none"`` to keep
        full ``(unit, y, x)`` maps (statistics are then taken on the spatial means).
    batch_size
        Images per forward pass.
    chunk_size
        Samples per written chunk and checkpoint (rounded up to whole batches), fewer
        where that many would hold more than :data:`CHUNK_BYTES` of activations (full
        maps of large layers): the memory of a collection does not grow with the data.
    topk
        Top-k samples kept per unit (0: none).
    covariance
        Also accumulate each layer's within-model covariance (units x units).
    pairs
        ``(model_a, model_b)`` pairs whose cross-covariance is accumulated at every layer
        both record (the alignment statistics).
    keep_activations
        Write the activations; ``False`` keeps only the statistics.
    workers
        Data-loading worker processes (image decoding in parallel with the models);
        ``None`` (default) takes the options in force (a pipeline's ``[loader]``, see
        :mod:`mergescope.loading`).
    positions
        Take the moments and covariances of conv maps over every spatial position
        (samples x positions rows), as activation matching and REPAIR do, and those of
        token layers over every token; top-k stays per image. Default: over the
        per-image summaries.
    tokens
        What token layers (outputs ``(N, T, D)``, see :mod:`mergescope.tokens`) record:
        ``"mean"`` over tokens, ``"cls"`` (position 0), or ``"all"``, ``(unit, token)``
        maps whose moments and covariances are taken over every token (samples x tokens
        rows) and whose top-k ranks images by their mean token. Another choice than
        ``"mean"`` where no recorded layer is a token layer is a ``ConfigError`` at the
        first batch.
    """

    layers: dict[str, list[str]]
    reduce: str = "mean"
    batch_size: int = 256
    chunk_size: int = 4096
    topk: int = 10
    covariance: bool = False
    pairs: list[tuple[str, str]] = attrs.field(factory=list)
    keep_activations: bool = True
    workers: int | None = None
    positions: bool = False
    tokens: str = DEFAULT_TOKENS

    def identity(self) -> dict[str, Any]:
        """What a store made with this spec holds, for cache keys.

        The options that change the recorded values (not ``workers``, which changes
        only how fast they are made), and the recording format: a store made by an
        older recorder is made again rather than reused.
        """
        options = attrs.asdict(self, filter=lambda a, _v: a.name != "workers")
        return {**options, "format": RECORDING_FORMAT}

    def __attrs_post_init__(self) -> None:
        if self.reduce not in (*REDUCTIONS, "none"):
            raise ConfigError(f"unknown reduction {self.reduce!r}; accepted: mean, max, none", where="key 'reduce'")
        check_tokens(self.tokens)
        for a, b in self.pairs:
            shared = set(self.layers.get(a, [])) & set(self.layers.get(b, []))
            if a not in self.layers or b not in self.layers or not shared:
                raise ConfigError(f"pair ({a!r}, {b!r}): both models must be recorded with a layer in common")


def shard_positions(n: int, shard: tuple[int, int]) -> np.ndarray:
    """Dataset positions of shard ``i`` of ``count``: a contiguous slice, the shards cover ``range(n)``."""
    i, count = shard
    if not (count >= 1 and 0 <= i < count):
        raise ConfigError(f"shard must be i/n with 0 <= i < n, got {i}/{count}")
    return np.arange(i * n // count, (i + 1) * n // count)


# ------------------------------------------------------------------ accumulators


class _Accumulators:
    """Every statistic of one collection, with a netCDF form for checkpoints."""

    def __init__(self) -> None:
        self.moments: dict[tuple[str, str], Moments] = {}
        self.topk: dict[tuple[str, str], TopK] = {}
        self.covariance: dict[tuple[str, str], CoMoments] = {}
        self.cross: dict[tuple[str, str, str], CoMoments] = {}
        # Per model: summed cross-entropy, correct predictions, samples (classifier outputs only).
        self.evaluation: dict[str, np.ndarray] = {}

    def score(self, model: str, logits: torch.Tensor, labels: torch.Tensor, classes: int) -> None:
        """Add one batch of classifier outputs to the model's loss and accuracy."""
        if logits.ndim != 2 or logits.shape[1] != classes:
            return  # not a classifier over the dataset's classes: nothing to evaluate
        # NumPy, float64: torch's cross_entropy spreads a (batch x classes) input over its
        # threads and costs 0.4-1 ms per batch, this about 0.2 ms. float64 keeps the sum
        # independent of where batches (and shards) start, to ~1e-12.
        z = logits.detach().float().cpu().numpy().astype(np.float64)
        y = labels.cpu().numpy()
        top = z.max(axis=1)
        log_norm = np.log(np.exp(z - top[:, None]).sum(axis=1)) + top
        loss = float((log_norm - z[np.arange(len(y)), y]).sum())
        correct = float((z.argmax(axis=1) == y).sum())
        totals = self.evaluation.setdefault(model, np.zeros(3))
        totals += (loss, correct, len(labels))

    def update(
        self,
        spec: StoreSpec,
        summaries: Mapping[str, Mapping[str, np.ndarray]],
        rows: Mapping[str, Mapping[str, np.ndarray]],
        ids: np.ndarray,
    ) -> None:
        """Add a batch: ``summaries`` (one row per sample) feed top-k, ``rows`` the moments."""
        # Each array is converted to float64 once, not once per accumulator that reads it
        # (rows and summaries are the same arrays unless spec.positions).
        wide: dict[int, np.ndarray] = {}

        def f64(values: Any) -> Any:
            if isinstance(values, torch.Tensor):
                return values  # on an accelerator: the accumulators reduce it there
            if id(values) not in wide:
                wide[id(values)] = np.asarray(values, dtype=np.float64)
            return wide[id(values)]

        for model, layers in rows.items():
            for layer, values in layers.items():
                key = (model, layer)
                units = values.shape[1]
                self.moments.setdefault(key, Moments(units)).update(f64(values))
                if spec.topk:
                    self.topk.setdefault(key, TopK(units, spec.topk)).update(f64(summaries[model][layer]), ids)
                if spec.covariance:
                    self.covariance.setdefault(key, CoMoments.within(units)).update(f64(values))
        for a, b in spec.pairs:
            for layer in rows[a].keys() & rows[b].keys():
                x, y = f64(rows[a][layer]), f64(rows[b][layer])
                self.cross.setdefault((a, b, layer), CoMoments(x.shape[1], y.shape[1])).update(x, y)

    def to_nodes(self, prefix: str = "") -> dict[str, xr.Dataset]:
        """``{path: Dataset}`` of every accumulator, paths under ``prefix``."""
        nodes: dict[str, xr.Dataset] = {}
        for (m, layer), moments in self.moments.items():
            nodes[f"{prefix}{m}/{layer}/moments"] = moments.to_dataset()
        for (m, layer), topk in self.topk.items():
            nodes[f"{prefix}{m}/{layer}/topk"] = topk.to_dataset()
        for (m, layer), covariance in self.covariance.items():
            nodes[f"{prefix}{m}/{layer}/covariance"] = covariance.to_dataset()
        for (a, b, layer), cross in self.cross.items():
            nodes[f"{prefix}cross/{a}/{b}/{layer}"] = cross.to_dataset()
        for m, (loss, correct, count) in self.evaluation.items():
            nodes[f"{prefix}evaluation/{m}"] = xr.Dataset({"loss_sum": loss, "correct": correct, "count": count})
        return nodes

    def to_tree(self) -> xr.DataTree:
        return xr.DataTree.from_dict(self.to_nodes())

    @classmethod
    def from_tree(cls, tree: xr.DataTree) -> _Accumulators:
        readers: dict[str, tuple[str, type[Moments | TopK | CoMoments]]] = {
            "moments": ("moments", Moments),
            "topk": ("topk", TopK),
            "covariance": ("covariance", CoMoments),
        }
        acc = cls()
        for node in tree.subtree:
            if node is tree or not node.has_data:
                continue
            parts = node.relative_to(tree).split("/")
            ds = node.to_dataset(inherit=False)
            if parts[0] == "evaluation" and len(parts) == 2:
                acc.evaluation[parts[1]] = np.array([float(ds[v]) for v in ("loss_sum", "correct", "count")])
            elif parts[0] == "cross" and len(parts) == 4:
                acc.cross[(parts[1], parts[2], parts[3])] = CoMoments.from_dataset(ds)
            elif len(parts) == 3 and parts[2] in readers:
                attr, kind = readers[parts[2]]
                getattr(acc, attr)[(parts[0], parts[1])] = kind.from_dataset(ds)
        return acc

    def merge(self, other: _Accumulators) -> _Accumulators:
        out = _Accumulators()
        for name in ("moments", "topk", "covariance", "cross", "evaluation"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine.keys() != theirs.keys():
                raise ContractError(
                    f"cannot merge stores that recorded different {name}: {sorted(mine)} vs {sorted(theirs)}"
                )
            combine = (lambda a, b: a + b) if name == "evaluation" else (lambda a, b: a.merge(b))
            setattr(out, name, {k: combine(mine[k], theirs[k]) for k in mine})
        return out


# ----------------------------------------------------------------------- reading


class Store:
    """A finished collection: activations and statistics, read lazily from netCDF.

    Open one with :meth:`open`; :func:`collect_store` and :func:`join_stores` return one.
    """

    def __init__(self, directories: Sequence[Path], stats: _Accumulators, info: Mapping[str, Any]) -> None:
        self.directories = [Path(d) for d in directories]
        self._stats = stats
        self.info = dict(info)

    @classmethod
    def open(cls, directory: str | Path) -> Store:
        """Open a complete collection; an incomplete one is an error saying so."""
        directory = Path(directory)
        marker = directory / MARKER
        if not marker.is_file():
            done = _checkpoint_samples(directory)
            progress = f" ({done} samples recorded so far)" if done is not None else ""
            raise ContractError(
                f"the activation store {directory} is incomplete{progress}: its collection was interrupted "
                "or is still running; run the collection again to resume it"
            )
        info = json.loads(marker.read_text(encoding="utf-8"))
        stats = _Accumulators.from_tree(load_tree(directory / "statistics.nc"))
        return cls([directory], stats, info)

    @property
    def models(self) -> list[str]:
        return list(self.info["layers"])

    def layers(self, model: str) -> list[str]:
        return list(self.info["layers"][self._model(model)])

    def _model(self, model: str) -> str:
        if model not in self.info["layers"]:
            raise ContractError(f"the store holds no model {model!r}; it holds {', '.join(self.info['layers'])}")
        return model

    def activation(self, model: str, layer: str) -> xr.DataArray:
        """The activations of ``model`` at ``layer`` (dask-backed when the store has several shards)."""
        if layer not in self.layers(model):
            raise ContractError(f"the store did not record layer {layer!r} of {model!r}; it has {self.layers(model)}")
        if not self.info.get("keep_activations", True):
            raise ContractError("this store kept only statistics (keep_activations = false)")
        files = [d / f"{model}.nc" for d in self.directories]
        if len(files) == 1:
            with xr.open_dataset(files[0], group=layer, engine="netcdf4") as ds:
                size = ds[VARIABLE].size * ds[VARIABLE].dtype.itemsize
                if size <= EAGER_BYTES or not _has_dask():
                    return validate_activation(ds[VARIABLE].load(), where=f"{files[0]}:/{layer}")
            # Large: read on demand, chunk by chunk, so that memory does not grow with the samples.
            ds = xr.open_dataset(files[0], group=layer, engine="netcdf4", chunks={})
            return validate_activation(ds[VARIABLE], where=f"{files[0]}:/{layer}")
        # Several shards are opened lazily as one dask-backed array (the 'dask' extra).
        require("dask.array", "dask", f"reading {model!r} at {layer!r} from a store of {len(files)} shards")
        # chunks={}: one dask chunk per storage chunk of a file, not one per shard.
        ds = xr.open_mfdataset(files, group=layer, engine="netcdf4", combine="nested", concat_dim="sample", chunks={})
        return validate_activation(ds[VARIABLE], where=f"{files[0].name} (+{len(files) - 1} shards):/{layer}")

    def moments(self, model: str, layer: str) -> Moments:
        return self._stats.moments[(self._model(model), layer)]

    def topk(self, model: str, layer: str) -> TopK:
        return self._stats.topk[(self._model(model), layer)]

    def covariance(self, model: str, layer: str) -> CoMoments:
        return self._stats.covariance[(self._model(model), layer)]

    def cross(self, model_a: str, model_b: str, layer: str) -> CoMoments:
        """Cross-moments of ``model_a`` (x) against ``model_b`` (y) at ``layer``."""
        key = (model_a, model_b, layer)
        if key not in self._stats.cross:
            raise ContractError(f"no cross statistics for {key}; recorded pairs: {sorted(self._stats.cross)}")
        return self._stats.cross[key]

    def evaluation(self, model: str) -> Evaluation:
        """Loss and accuracy of ``model`` over the recorded samples, measured in the same pass."""
        totals = self._stats.evaluation.get(self._model(model))
        if totals is None:
            raise ContractError(f"model {model!r} does not output one logit per class, so it was not evaluated")
        loss, correct, count = totals
        return Evaluation(loss=loss / count, accuracy=correct / count)

    def statistics_tree(self) -> xr.DataTree:
        """Every statistic as a DataTree (the content of ``statistics.nc``)."""
        return self._stats.to_tree()


# --------------------------------------------------------------------- collection


def _checkpoint_samples(directory: Path) -> int | None:
    path = directory / _WORK / _CHECKPOINT
    if not path.is_file():
        return None
    try:
        return int(load_tree(path).ds["samples_done"])
    except (ContractError, KeyError):
        return None


def _batches(
    data: ImageDataset,
    positions: np.ndarray,
    batch_size: int,
    workers: int | None = None,
    device: torch.device | None = None,
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    # An ImageDataset is a map-style dataset of (image, label) pairs, as the loader expects.
    dataset = cast("torch.utils.data.Dataset[tuple[torch.Tensor, int]]", data)
    subset = torch.utils.data.Subset(dataset, positions.tolist())
    loader = make_loader(subset, batch_size, device=device, workers=workers)
    start = 0
    for images, labels in loader:
        yield positions[start : start + len(images)], images, labels
        start += len(images)


def _has_dask() -> bool:
    try:
        import dask.array  # noqa: F401
    except ImportError:
        return False
    return True


def _statistics_on_device(device: torch.device) -> bool:
    """Whether the statistics' products of a model on ``device`` run there (CUDA) or on the host."""
    # The host (the CPU device itself, compared as a device) takes NumPy's BLAS; MPS has no float64.
    return float64_device(device) != torch.device("cpu")


def _forward(model: nn.Module, images: torch.Tensor, name: str, data: ImageDataset) -> torch.Tensor:
    try:
        return model(to_device(images, model_device(model)))
    except RuntimeError as exc:  # almost always an input the architecture cannot take
        if device_mix(exc) is not None:
            raise  # the model itself keeps a tensor on another device: the runner says which
        raise ConfigError(
            f"model {name!r} cannot run on images of shape {tuple(images.shape[1:])} from dataset "
            f"{data.name!r}: {str(exc).splitlines()[0]}"
        ) from exc


def _write_chunk(path: Path, arrays: Mapping[str, np.ndarray], ids: np.ndarray, labels: np.ndarray) -> None:
    """One chunk of one model: plain variables per layer, written atomically."""
    with atomic_path(path) as tmp, netCDF4.Dataset(tmp, "w") as nc:
        nc.createDimension("sample", len(ids))
        nc.createVariable("sample", "i8", ("sample",))[:] = ids
        nc.createVariable("label", "i8", ("sample",))[:] = labels
        for i, (layer, values) in enumerate(arrays.items()):
            dims = ["sample"] + [nc.createDimension(f"d{i}_{j}", s).name for j, s in enumerate(values.shape[1:])]
            var = nc.createVariable(f"layer{i}", "f4", dims)
            var[:] = values
            var.layer = layer


def _join_chunks(path: Path, chunk_files: Sequence[Path], model: str, layers: Sequence[str], total: int) -> None:
    """Copy every chunk into one file with a group per layer, chunk by chunk (constant memory)."""
    with atomic_path(path) as tmp, netCDF4.Dataset(tmp, "w") as out:
        groups = {}
        for layer in layers:
            g = out.createGroup(layer)
            g.createDimension("sample", total)
            g.createVariable("sample", "i8", ("sample",))
            g.createVariable("label", "i8", ("sample",))
            g.createVariable("model", str, ())[0] = model
            g.createVariable("layer", str, ())[0] = layer
            groups[layer] = g
        offset = 0
        for chunk in chunk_files:
            with netCDF4.Dataset(chunk, "r") as nc:
                n = len(nc.dimensions["sample"])
                ids, labels = nc["sample"][:], nc["label"][:]
                for i, layer in enumerate(layers):
                    g, values = groups[layer], nc[f"layer{i}"][:]
                    if VARIABLE not in g.variables:
                        dims = (
                            ("sample", "unit", "token")
                            if values.ndim == 3
                            else ("sample", "unit", "y", "x")[: values.ndim]
                        )
                        for dim, size in zip(dims[1:], values.shape[1:]):
                            g.createDimension(dim, size)
                            g.createVariable(dim, "i8", (dim,))[:] = np.arange(size)
                        per_sample = 4 * int(np.prod(values.shape[1:]))
                        rows = max(1, min(n, 1024, STORAGE_CHUNK_BYTES // per_sample))
                        var = g.createVariable(VARIABLE, "f4", dims, zlib=False, chunksizes=(rows, *values.shape[1:]))
                        var.coordinates = "label model layer"
                    g[VARIABLE][offset : offset + n] = values
                    g["sample"][offset : offset + n] = ids
                    g["label"][offset : offset + n] = labels
            offset += n


def dataset_identity(data: ImageDataset) -> dict[str, str]:
    """What identifies a loaded dataset in recording keys: its name, its sample ids and a few images.

    Two loads of one dataset may differ in preprocessing (size, normalisation) but not
    in name or ids: the first few images themselves tell them apart.
    """
    ids = hashlib.sha256(np.asarray(data.sample_ids, dtype=np.int64).tobytes()).hexdigest()
    first = hashlib.sha256()
    for i in range(min(4, len(data))):
        first.update(np.ascontiguousarray(np.asarray(data[i][0], dtype=np.float32)).tobytes())
    return {"name": data.name, "sample_ids": ids, "first_images": first.hexdigest()}


def recording_key(fingerprints: Sequence[str], data: ImageDataset, spec: StoreSpec, precision: str = "fp32") -> str:
    """The key of a recording: the models' fingerprints, the dataset's identity and what is recorded.

    A ``precision`` other than ``"fp32"`` (forward passes under autocast) is part of the
    key; full-precision recordings keep the keys they always had.
    """
    if precision != "fp32":
        return cache_key(list(fingerprints), dataset_identity(data), spec.identity(), {"precision": precision})
    return cache_key(list(fingerprints), dataset_identity(data), spec.identity())


def collect_store(
    models: Mapping[str, nn.Module],
    data: ImageDataset,
    spec: StoreSpec,
    directory: str | Path,
    *,
    key: str = "",
    shard: tuple[int, int] = (0, 1),
    progress: Progress | None = None,
) -> Store:
    """Record ``models`` over ``data`` into ``directory`` in one pass, resuming if interrupted.

    Parameters
    ----------
    models
        Name -> module; each records ``spec.layers[name]``.
    data
        The images; their stable sample ids label every row.
    spec
        What to record (see :class:`StoreSpec`).
    directory
        The collection directory. A complete collection there with the same ``key``
        is returned as is; an interrupted one with the same ``key`` is resumed; one with
        another key is discarded.
    key
        Identifies the inputs (models, data, spec); mismatching work is never reused.
    shard
        ``(i, n)``: record only the i-th of n contiguous slices of the dataset.
    progress
        Shows how far the recording has come (see :mod:`mergescope.progress`); silent when ``None``.

    Returns
    -------
    Store
    """
    directory = Path(directory)
    progress = progress or silent
    full_key = json.dumps({"key": key, "shard": list(shard), "spec": spec.identity()}, sort_keys=True)
    marker = directory / MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("key") == full_key:
        return Store.open(directory)
    missing = [m for m in models if m not in spec.layers]
    if missing:
        raise ConfigError(f"no layers given for models {missing}")
    for a, b in spec.pairs:
        if type(models[a]) is not type(models[b]):
            raise ConfigError(
                f"cross-model statistics need models of one architecture, but {a!r} is a "
                f"{type(models[a]).__name__} and {b!r} a {type(models[b]).__name__}"
            )
    # Selectors (globs, "type:Conv2d", "relu1@in", "group:*") become concrete layer names here.
    x = example_input(data) if len(data) and any(uses_groups(spec.layers[m]) for m in models) else None
    spec = attrs.evolve(
        spec, layers={m: list(resolve_layers(models[m], spec.layers[m], m, example_input=x)) for m in models}
    )
    positions = shard_positions(len(data), shard)
    if len(positions) == 0:
        raise ConfigError(f"dataset {data.name!r} has no samples for shard {shard[0]}/{shard[1]}; nothing to collect")

    work = directory / _WORK
    acc, done = _resume(work, full_key)
    if done == 0:  # stale or foreign work: start it over (a complete store stays until the swap)
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    captured: dict[str, dict[str, np.ndarray]] = {m: {} for m in models}
    # The rows the moments and co-moments read: host arrays, or on an accelerator tensors
    # that stay there (the products of every batch run on the device, see CoMoments.update).
    captured_rows: dict[str, dict[str, Any]] = {m: {} for m in models}
    shapes: dict[str, tuple[int, ...]] = {}  # "<model> <layer>" -> output shape, for the tokens check
    handles = []
    for m in models:
        on_device = _statistics_on_device(model_device(models[m]))

        def sink(layer: str, output: torch.Tensor, _m: str = m, _on_device: bool = on_device) -> None:
            shapes.setdefault(f"{_m} {layer}", tuple(output.shape))
            if output.ndim == 3 and (spec.positions or spec.tokens == "all"):
                rows = token_rows(output.detach())  # one row per (sample, token)
                captured_rows[_m][layer] = rows.float().clone() if _on_device else owned_array(rows, output)
            elif spec.positions and output.ndim > 2:
                # channels last, then one row per (sample, position)
                rows = output.detach().movedim(1, -1).reshape(-1, output.shape[1])
                captured_rows[_m][layer] = rows.float().clone() if _on_device else owned_array(rows, output)
            elif _on_device:
                # The per-sample rows: a map's spatial mean (its max for "max"), a token layer's
                # summary; cloned, as a later in-place op of the forward pass must not change them.
                rows = spatial_summary(output, "max" if spec.reduce == "max" else "mean", spec.tokens)
                captured_rows[_m][layer] = rows.float().clone()
            captured[_m][layer] = summarise(output, spec.reduce, spec.tokens)

        handles += attach_recorders(models[m], spec.layers[m], sink, m)
    per_chunk = max(1, -(-spec.chunk_size // spec.batch_size)) * spec.batch_size
    chunk = _Chunk(per_chunk, spec.layers if spec.keep_activations else {})
    modes = {m: models[m].training for m in models}
    sample_ids = np.asarray(data.sample_ids)
    try:
        for model in models.values():
            model.eval()
        remaining = positions[done:]
        total_batches = -(-len(remaining) // spec.batch_size)
        first_device = model_device(next(iter(models.values())))
        timed = TimedBatches(_batches(data, remaining, spec.batch_size, spec.workers, first_device))
        batches = progress(timed, desc=f"collecting {', '.join(models)}", total=total_batches)
        # NumPy's BLAS (the covariance products) single-threaded: its idle threads spin
        # after each product and take the cores from torch's threads in the next forward
        # pass. Only BLAS libraries are limited; torch's OpenMP pool keeps its size.
        with torch.no_grad(), threadpoolctl.threadpool_limits(1, user_api="blas"):
            for batch_positions, images, labels in batches:
                for m, model in models.items():
                    acc.score(m, _forward(model, images, m, data), labels, len(data.classes))
                require_token_layers(spec.tokens, shapes, "models " + ", ".join(map(repr, models)))
                ids = sample_ids[batch_positions]
                summaries = {m: {layer: captured[m][layer] for layer in spec.layers[m]} for m in models}
                per_sample = {
                    m: {
                        layer: (v if v.ndim == 2 else v.reshape(*v.shape[:2], -1).mean(axis=2))
                        for layer, v in layers.items()
                    }
                    for m, layers in summaries.items()
                }
                rows = {
                    m: {layer: captured_rows[m].get(layer, v) for layer, v in layers.items()}
                    for m, layers in per_sample.items()
                }
                acc.update(spec, per_sample, rows, ids)
                chunk.add(batch_positions, summaries)
                if chunk.full:
                    done = _flush(work, data, spec, chunk, acc, done, full_key, len(positions))
            if chunk.size:
                done = _flush(work, data, spec, chunk, acc, done, full_key, len(positions))
        # Whether more loader workers would help: the share of the pass spent waiting for batches.
        log.info("collecting: %.0f%% of %.1f s waiting for data", 100 * timed.share, timed.elapsed)
    finally:
        for h in handles:
            h.remove()
        for m, was_training in modes.items():
            models[m].train(was_training)
    return _finish(directory, data, spec, acc, full_key, shard, len(positions))


def _resume(work: Path, full_key: str) -> tuple[_Accumulators, int]:
    path = work / _CHECKPOINT
    if not path.is_file():
        return _Accumulators(), 0
    try:
        tree = load_tree(path)
    except ContractError:
        return _Accumulators(), 0
    if str(tree.ds["key"].values) != full_key:
        return _Accumulators(), 0
    stats = tree.children["stats"] if "stats" in tree.children else xr.DataTree()
    return _Accumulators.from_tree(stats), int(tree.ds["samples_done"])


class _Chunk:
    """The samples of the chunk being collected: positions and, per (model, layer), one reused array.

    The arrays are allocated at the first batch and filled in place for every chunk, so
    collecting allocates nothing per batch that lives longer than the batch: per-batch
    arrays kept for a whole chunk among the large, short-lived activation tensors make
    glibc's heap fragment and grow.
    """

    def __init__(self, capacity: int, layers: Mapping[str, Sequence[str]]) -> None:
        self.capacity = capacity
        self.layers = {m: list(ls) for m, ls in layers.items()}
        self.positions = np.empty(capacity, dtype=np.int64)
        self.arrays: dict[str, dict[str, np.ndarray]] = {m: {} for m in layers}
        self.size = 0

    @property
    def full(self) -> bool:
        return self.size >= self.capacity

    def add(self, positions: np.ndarray, summaries: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        if not any(self.arrays.values()):
            self._bound(len(positions), summaries)
        start, stop = self.size, self.size + len(positions)
        self.positions[start:stop] = positions
        for m, layers in self.layers.items():
            for layer in layers:
                values = summaries[m][layer]
                buffer = self.arrays[m].get(layer)
                if buffer is None:
                    buffer = self.arrays[m][layer] = np.empty((self.capacity, *values.shape[1:]), dtype=np.float32)
                buffer[start:stop] = values
        self.size = stop

    def clear(self) -> None:
        self.size = 0

    def _bound(self, batch: int, summaries: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Fewer samples per chunk when ``capacity`` of them would pass :data:`CHUNK_BYTES` (whole batches)."""
        per_sample = sum(
            4 * int(np.prod(summaries[m][layer].shape[1:])) for m, layers in self.layers.items() for layer in layers
        )
        if per_sample * self.capacity > CHUNK_BYTES:
            self.capacity = max(batch, CHUNK_BYTES // per_sample // batch * batch)


def _flush(
    work: Path,
    data: ImageDataset,
    spec: StoreSpec,
    chunk: _Chunk,
    acc: _Accumulators,
    done: int,
    full_key: str,
    total: int,
) -> int:
    """Write the buffered chunk, then checkpoint; a kill between the two only redoes this chunk.

    After the last chunk there is no checkpoint: :func:`_finish` writes the same
    statistics to ``statistics.nc`` right away, and a kill before that redoes the last
    chunk only.
    """
    positions = chunk.positions[: chunk.size]
    if spec.keep_activations:
        ids = np.asarray(data.sample_ids)[positions]
        labels = np.asarray(data.labels)[positions]
        for m, layers in chunk.arrays.items():
            arrays = {layer: layers[layer][: chunk.size] for layer in spec.layers[m]}
            _write_chunk(work / m / f"{done:012d}.nc", arrays, ids, labels)
    done += chunk.size
    chunk.clear()
    if done < total:
        root = xr.Dataset({"key": full_key, "samples_done": np.int64(done)})
        tree = xr.DataTree.from_dict({"/": root, **acc.to_nodes(prefix="stats/")})
        save_tree(tree, work / _CHECKPOINT)
    return done


def _finish(
    directory: Path,
    data: ImageDataset,
    spec: StoreSpec,
    acc: _Accumulators,
    full_key: str,
    shard: tuple[int, int],
    total: int,
) -> Store:
    work = directory / _WORK
    final = work / "final"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()
    # Everything is built inside .work first: a failure here (disk full, kill) leaves any
    # previous complete store in `directory` as it was.
    if spec.keep_activations:
        for model, layers in spec.layers.items():
            chunks = sorted((work / model).glob("*.nc"))
            _join_chunks(final / f"{model}.nc", chunks, model, layers, total)
    save_tree(acc.to_tree(), final / "statistics.nc")
    info = {
        "key": full_key,
        "samples": total,
        "shard": list(shard),
        "dataset": data.name,
        "layers": spec.layers,
        "keep_activations": spec.keep_activations,
    }
    # The swap needs no new disk space: drop the old marker, move the files, write the marker.
    (directory / MARKER).unlink(missing_ok=True)
    for old in directory.glob("*.nc"):
        old.unlink()
    for new in final.iterdir():
        os.replace(new, directory / new.name)
    with atomic_path(directory / MARKER) as tmp:
        tmp.write_text(json.dumps(info, indent=2), encoding="utf-8")
    shutil.rmtree(work, ignore_errors=True)
    # The accumulators just written, not a re-read of statistics.nc: its round trip is exact.
    return Store([directory], acc, info)


def join_stores(directories: Sequence[str | Path]) -> Store:
    """Join shard stores: statistics merged exactly, activations concatenated along ``sample``.

    Raises
    ------
    ContractError
        A shard is incomplete, or the shards recorded different models or layers.
    """
    stores = [Store.open(d) for d in directories]
    first = stores[0]
    for s in stores[1:]:
        if s.info["layers"] != first.info["layers"]:
            raise ContractError(f"shard {s.directories[0]} recorded other models/layers than {first.directories[0]}")
    stats = first._stats
    for s in stores[1:]:
        stats = stats.merge(s._stats)
    info = {**first.info, "samples": sum(s.info["samples"] for s in stores), "shard": None}
    return Store([s.directories[0] for s in stores], stats, info)
