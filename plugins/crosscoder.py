"""Sparse crosscoders for model diffing (Lindsey et al. 2024), with a BatchTopK variant.

An acausal crosscoder reads the activations of N models at one layer for the same
inputs and explains them with one shared set of sparse latents. Each latent ``i`` has
one encoder vector over the concatenated activations of all models and one decoder
vector ``d_i^m`` per model (each model's decoder has that model's width, so the
models may have different unit counts):

.. code-block:: text

    f(x)   = ReLU((x - b_dec) W_enc + b_enc)          x = [s_1 x^1, ..., s_N x^N]
    x^m'   = f(x) W_dec^m + b_dec^m
    loss   = sum_m ||s_m x^m - x^m'||^2 + lambda * sum_i f_i(x) * sum_m ||d_i^m||

``s_m`` is a per-model scalar (``normalise``) that makes the mean squared norm of
model ``m``'s activations equal to its unit count, so no model dominates the loss
because its activations happen to be larger. The sparsity term weights each latent by
the sum of its decoder norms over models: a latent can lower it by dropping the
decoder vector of a model it does not help, so features used by only some models
end up with near-zero decoder norms in the others. That is what the analysis reads:
the relative decoder norm ``r_m = ||d^m|| / sum_n ||d^n||`` of every latent classifies
it as shared by all models, exclusive to one, or shared by a subset. With three models
or more, the relative norm within each pair, ``||d^b|| / (||d^a|| + ||d^b||)``, shows how
two of them split every latent, whatever the others hold.

``sparsity = "batchtopk"`` (Bussmann et al. 2024; for crosscoders Minder et al. 2025)
drops the L1 term, whose shrinkage can create spurious exclusive latents: every batch
keeps its ``k * batch`` largest values of ``f_i * sum_m ||d_i^m||`` and zeroes the rest;
after training, a latent fires when that value exceeds a threshold estimated during
training (the mean over the last epoch's batches of the smallest value kept).

A latent that never wins a place in the top-k gets no gradient and stays dead. With
``aux_k > 0`` BatchTopK adds the AuxK loss of Gao et al. 2024 (appendix A.2): a latent
is dead once it has not fired for ``dead_after`` training rows, and every row's
``aux_k`` largest dead activations must reconstruct the residual the live latents
leave, ``e = x - x'`` (detached, no decoder bias), normalised by the residual's spread:

.. code-block:: text

    loss += aux_coefficient * sum_s u_s ||e_s - e'_s||^2 / ||e_s - mean(e_s)||^2

(norms over the batch's rows; ``s`` runs over the models, or over every model's layers
when it gives several, and the unit count ``u_s`` puts the term in the units of the main
loss), so dead latents learn directions the live ones miss and come back to life.

A model may also give several layers at once: every (model, layer) pair then has its
own decoder block and its own scale, the sparsity term sums the norms of all blocks,
and a model's decoder norm (which the classes read) is the norm over all its blocks.

:func:`ablate_latents` removes chosen latents (a class, say) from one model's
activations: ``x^m - sum_{i chosen} f_i(x) d_i^m / s_m``, the other latents' share and the
crosscoder's error left as they were, to test what a class of features does when the
model's forward pass goes on from the edited layer.

Training streams the activations chunk by chunk (they may be dask-backed, opened
lazily from netCDF), so memory does not grow with the dataset; it runs on the step's
device at its precision, checkpoints to disk (device-independent), resumes an
interrupted run on any device, and stops cleanly when the loss diverges.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import numpy as np
import torch
import xarray as xr
from torch import nn

from mergescope.activations import attach_recorders, resolve_layers
from mergescope.components import Context
from mergescope.devices import autocast
from mergescope.errors import ConfigError, ContractError
from mergescope.hookspecs import hookimpl
from mergescope.keys import OMIT_DEFAULT_FROM_KEY
from mergescope.loading import make_loader, to_device
from mergescope.report import Panel
from mergescope.storage import atomic_path
from mergescope.tokens import restore_layout
from mergescope.validators import (
    Check,
    as_float,
    boolean,
    distinct,
    in_range,
    integer,
    list_of,
    non_empty_str,
    non_negative,
    non_negative_int,
    one_of,
    optional,
    positive,
    positive_int,
    probability,
)
from mergescope_plugins.latent_dashboard import dashboard_panel, write_dashboards

__all__ = [
    "Crosscoder",
    "CrosscoderPlots",
    "ablate_latents",
    "class_order",
    "possible_classes",
    "classify",
    "register_differs",
    "register_visualizers",
]

log = logging.getLogger(__name__)

# Bump when the checkpoint contents or the training procedure change: old checkpoints
# are then not resumed.
_FORMAT = 1
_CHECKPOINT = "checkpoint.pt"
# Rows per forward pass in the analysis pass (bounds the (rows, latents) buffers).
_EVAL_ROWS = 2048
# Fraction of the steps at the end over which the learning rate decays linearly to 0.
_LR_DECAY = 0.2
# Most training rows without firing before a latent counts as dead for AuxK: the
# 10M tokens of Gao et al. 2024 (fewer when one epoch has fewer rows, see dead_after).
_DEAD_AFTER_MAX = 10_000_000

# The relative-norm threshold of the classes: at most 1/2 (and at most 1/N, checked in fit()).
_threshold = in_range(0, 0.5, lo_open=True)


# ------------------------------------------------------------------------ classes


def classify(relative_norm: np.ndarray, models: Sequence[str], threshold: float) -> np.ndarray:
    """Class label of every latent from its relative decoder norms.

    Parameters
    ----------
    relative_norm
        ``(latents, models)``; each row sums to 1 (``r_m = ||d^m|| / sum_n ||d^n||``).
    models
        Model names, in column order.
    threshold
        A model *uses* a latent when its relative norm is ``>= threshold``.

    Returns
    -------
    numpy.ndarray
        One string per latent: ``"shared"`` when every model uses it,
        ``"exclusive:<model>"`` when exactly one does, ``"shared:<a>+<b>"`` (models in
        the given order) when more than one but not all do, and ``"none"`` when the row
        is not finite (a latent whose decoder vectors are all zero).
    """
    r = np.asarray(relative_norm, dtype=float)
    labels = []
    for row in r:
        if not np.isfinite(row).all():
            labels.append("none")
            continue
        users = [m for m, v in zip(models, row) if v >= threshold]
        if len(users) == len(models):
            labels.append("shared")
        elif len(users) == 1:
            labels.append(f"exclusive:{users[0]}")
        elif users:
            labels.append("shared:" + "+".join(users))
        else:
            labels.append("none")
    return np.array(labels, dtype=str)


def class_order(label: str) -> tuple[int, str]:
    """Sort key of latent classes: shared first, then subsets, exclusive, and dead last."""
    rank = {"shared": 0, "dead": 4, "none": 3}.get(label, 1 if label.startswith("shared:") else 2)
    return rank, label


def possible_classes(models: Sequence[str]) -> list[str]:
    """Every latent class ``N`` models allow: shared, shared by each proper subset of two or more, exclusive, dead."""
    subsets = [
        "shared:" + "+".join(c) for size in range(len(models) - 1, 1, -1) for c in itertools.combinations(models, size)
    ]
    return sorted(["shared", *subsets, *(f"exclusive:{m}" for m in models), "dead"], key=class_order)


# ------------------------------------------------------------------------- inputs


@attrs.define
class _Inputs:
    """The activations of every source (one layer of one model), checked, as readers of row chunks.

    A model gives one source per layer; its sources are adjacent, in the order given,
    and the encoder reads the units of all sources side by side in that order.
    """

    models: list[str]
    sources: list[tuple[str, str | None]]  # (model, layer) of every source
    arrays: list[xr.DataArray]  # per source, dims ("sample", "unit"[, "y", "x"]) or ("sample", "unit", "token")
    units: list[int]  # per source
    sample_ids: np.ndarray
    positions: int  # rows per sample: 1 when pooled, y * x (or the tokens) for positions
    pool: bool  # maps averaged over space into one row per sample
    multi: bool  # some model gives more than one layer
    _whole: np.ndarray | None = attrs.field(default=None, init=False, repr=False)

    @property
    def samples(self) -> int:
        return len(self.sample_ids)

    @property
    def rows(self) -> int:
        return self.samples * self.positions

    @property
    def owner(self) -> np.ndarray:
        """The model index of every source."""
        return np.array([self.models.index(m) for m, _ in self.sources], dtype=np.int64)

    @property
    def layer(self) -> str | None:
        """The layer of the first source that names one."""
        return next((layer for _, layer in self.sources if layer is not None), None)

    @property
    def source_names(self) -> list[str]:
        """``"<model>/<layer>"`` for every source (the model alone when it gives no layer name)."""
        return [m if layer is None else f"{m}/{layer}" for m, layer in self.sources]

    def label(self, source: int) -> str:
        """A source's name in messages: its model's, unless that model gives several layers."""
        return self.source_names[source] if self.multi else self.sources[source][0]

    def at(self) -> str:
        """`` at layer 'x'`` (or the list of layers) for messages; empty when no layer is named."""
        layers = list(dict.fromkeys(layer for _, layer in self.sources if layer is not None))
        if not layers:
            return ""
        if len(layers) == 1:
            return f" at layer {layers[0]!r}"
        return " at layers " + ", ".join(repr(layer) for layer in layers)

    def where(self, source: int) -> str:
        model, layer = self.sources[source]
        return f"model {model!r}" + (f" at layer {layer!r}" if layer is not None else " (no 'layer' coord)")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows of samples ``start:stop``, every source's units side by side: ``(rows, sum of units)`` float32."""
        if (start, stop) == (0, self.samples):
            return self.whole()
        return self.gather([(start, stop)])

    def whole(self) -> np.ndarray:
        """Every row, read once and kept: used only when all the data fit in one chunk."""
        if self._whole is None:
            self._whole = self.gather([(0, self.samples)])
        return self._whole

    def gather(self, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
        """The rows of several sample ranges, one range after the other (as :meth:`read`)."""
        samples = sum(stop - start for start, stop in ranges)
        out = np.empty((samples * self.positions, sum(self.units)), dtype=np.float32)
        offset = 0
        for a, units in zip(self.arrays, self.units):
            row = 0
            for start, stop in ranges:
                if a.chunks is not None:
                    # One computation per range: dask then reads only the range from a stored
                    # chunk, while ranges computed together read their whole chunks (and a file
                    # opened with open_mfdataset is a single chunk).
                    values = np.asarray(a.data[start:stop].compute(), dtype=np.float32)
                else:
                    values = np.asarray(a.isel(sample=slice(start, stop)).values, dtype=np.float32)
                if values.ndim == 4:
                    if self.pool:
                        values = values.mean(axis=(2, 3), dtype=np.float32)
                    else:  # every spatial position is a row, images stay contiguous
                        values = values.transpose(0, 2, 3, 1).reshape(-1, units)
                elif values.ndim == 3:  # a token map (sample, unit, token): the same, over tokens
                    if self.pool:
                        values = values.mean(axis=2, dtype=np.float32)
                    else:
                        values = values.transpose(0, 2, 1).reshape(-1, units)
                out[row : row + len(values), offset : offset + units] = values
                row += len(values)
                del values  # one range of one source at a time besides the output
            offset += units
        return out


_DIMS = ({"sample", "unit"}, {"sample", "unit", "y", "x"}, {"sample", "unit", "token"})


def _layers_of(model: str, given: Any) -> list[tuple[str | None, Any]]:
    """``(layer, array)`` of every layer a model gives: one DataArray, a mapping layer -> DataArray, or a list."""
    if isinstance(given, xr.DataArray):
        return [(_layer_coord(given), given)]
    if isinstance(given, Mapping):
        pairs = [(str(layer), a) for layer, a in given.items()]
        what = "mapping"
    elif isinstance(given, Sequence) and not isinstance(given, (str, bytes)):
        pairs = [(_layer_coord(a) if isinstance(a, xr.DataArray) else None, a) for a in given]
        what = "list"
    else:
        raise ContractError(
            f"crosscoder: activations of model {model!r} must be an xarray.DataArray, a mapping layer -> DataArray "
            f"or a list of DataArrays, got {type(given).__name__}"
        )
    if not pairs:
        raise ContractError(f"crosscoder: model {model!r} gives an empty {what} of layers; give at least one")
    for i, (layer, a) in enumerate(pairs):
        name = repr(layer) if what == "mapping" else f"#{i}"
        if not isinstance(a, xr.DataArray):
            raise ContractError(
                f"crosscoder: activations of model {model!r}, layer {name}, must be an xarray.DataArray, "
                f"got {type(a).__name__}"
            )
    if what == "list" and len(pairs) > 1:
        unnamed = [i for i, (layer, _) in enumerate(pairs) if layer is None]
        if unnamed:
            raise ContractError(
                f"crosscoder: the activations of model {model!r} are a list of {len(pairs)} layers, but #{unnamed[0]} "
                "has no scalar 'layer' coord to name it; give a mapping layer -> DataArray instead"
            )
    names = [layer for layer, _ in pairs]
    repeated = sorted({layer for layer in names if names.count(layer) > 1})
    if repeated:
        raise ContractError(f"crosscoder: model {model!r} gives layer {repeated[0]!r} more than once")
    return pairs


def _layer_coord(a: xr.DataArray) -> str | None:
    return str(a.coords["layer"].values) if "layer" in a.coords and a.coords["layer"].ndim == 0 else None


def _check_inputs(activations: Mapping[str, Any], samples: str) -> _Inputs:
    """Check the activations and make the readers; every message names the model and layer at fault.

    ``activations`` maps each model to one DataArray (one layer), to a mapping
    layer -> DataArray, or to a list of DataArrays named by their ``layer`` coord.
    """
    if not isinstance(activations, Mapping) or len(activations) < 2:
        got = len(activations) if isinstance(activations, Mapping) else type(activations).__name__
        raise ContractError(f"crosscoder: needs the activations of at least 2 models, got {got}")
    models = [str(m) for m in activations]
    if len(set(models)) != len(models):
        raise ContractError(f"crosscoder: model names must be distinct as strings, got {models}")
    sources: list[tuple[str, str | None]] = []
    arrays = []
    for model, given in zip(models, activations.values()):
        for layer, a in _layers_of(model, given):
            sources.append((model, layer))
            arrays.append(a)
    multi = len(sources) > len(models)
    inputs = _Inputs(models, sources, [], [], np.arange(0), 1, pool=samples == "pooled", multi=multi)
    checked = []
    for i, a in enumerate(arrays):
        where = inputs.where(i)
        dims = set(a.dims)
        if dims not in _DIMS or len(a.dims) != len(dims):
            raise ContractError(
                f"crosscoder: activations of {where} have dims {a.dims}; expected ('sample', 'unit'), "
                "('sample', 'unit', 'y', 'x') or ('sample', 'unit', 'token')"
            )
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise ContractError(f"crosscoder: activations of {where} have dtype {a.dtype}; expected real numbers")
        if a.sizes["unit"] == 0:
            raise ContractError(f"crosscoder: activations of {where} have no units")
        checked.append(a.transpose("sample", "unit", *(d for d in ("y", "x", "token") if d in dims)))
    arrays = checked
    first = inputs.label(0)
    n = arrays[0].sizes["sample"]
    for i, a in enumerate(arrays):
        if a.sizes["sample"] != n:
            raise ContractError(
                f"crosscoder: {first!r} has {n} samples but {inputs.label(i)!r} has {a.sizes['sample']}; "
                "every model must be recorded on the same samples"
            )
    ids = np.asarray(arrays[0]["sample"].values) if "sample" in arrays[0].coords else np.arange(n)
    for i, a in enumerate(arrays[1:], start=1):
        other = np.asarray(a["sample"].values) if "sample" in a.coords else np.arange(n)
        differ = int(np.count_nonzero(ids != other))
        if differ:
            raise ContractError(
                f"crosscoder: the 'sample' coords of {first!r} and {inputs.label(i)!r} differ at {differ} of {n} "
                "positions; every model must be recorded on the same samples in the same order"
            )
    if n == 0:
        raise ContractError("crosscoder: the activations hold no samples")
    positions = 1
    if samples == "positions":
        flat = [inputs.label(i) for i, a in enumerate(arrays) if a.ndim == 2]
        if flat:
            raise ContractError(
                f"crosscoder: samples = 'positions' needs spatial maps (sample, unit, y, x) or token maps (sample, "
                f"unit, token), but {flat} hold channel summaries (sample, unit); record with reduce = 'none' "
                "(tokens = 'all' for token layers) or use samples = 'pooled'"
            )
        # (y, x) of a map, (tokens,) of a token map: the rows of one sample
        shapes = [tuple(a.shape[2:]) for a in arrays]
        if len(set(shapes)) != 1:
            sizes = ", ".join(f"{inputs.where(i)}: {'x'.join(map(str, s))}" for i, s in enumerate(shapes))
            raise ContractError(
                "crosscoder: samples = 'positions' makes every spatial position a row, so the maps of every model "
                f"and layer need one spatial size, got {sizes} (a token map's size is its number of tokens); use "
                "samples = 'pooled' for layers of different sizes"
            )
        positions = int(np.prod(shapes[0]))
    inputs.arrays = arrays
    inputs.units = [a.sizes["unit"] for a in arrays]
    inputs.sample_ids = ids
    inputs.positions = positions
    return inputs


# Blocks per training chunk: more mixes the data better, fewer reads faster.
_BLOCKS_PER_CHUNK = 8


def _chunks(inputs: _Inputs, chunk_rows: int) -> list[tuple[int, int]]:
    """Sample ranges of about ``chunk_rows`` rows each (whole samples)."""
    per = max(1, chunk_rows // inputs.positions)
    return [(s, min(s + per, inputs.samples)) for s in range(0, inputs.samples, per)]


@attrs.define
class _Survey:
    """What one pass over the inputs learns before training."""

    digest: str
    scale: np.ndarray  # (sources,)
    mean: np.ndarray  # (sum of units,) of the scaled rows


def _survey(inputs: _Inputs, chunks: Sequence[tuple[int, int]], context: Context) -> _Survey:
    """Check for NaN, hash the contents and measure each source's scale, in one pass.

    This pass stays on the host in NumPy: it is bound by reading the data, and its
    float64 sums need no device.
    """
    h = hashlib.sha256()
    described: list[Any] = [inputs.models, inputs.units, inputs.positions, inputs.pool]
    if inputs.multi:  # which units belong to which layer of which model
        described.append([list(s) for s in inputs.sources])
    h.update(json.dumps(described).encode())
    h.update(np.ascontiguousarray(inputs.sample_ids).tobytes())
    n_sources = len(inputs.sources)
    sq = np.zeros(n_sources)
    sums = [np.zeros(u) for u in inputs.units]
    offsets = np.cumsum([0, *inputs.units])
    for start, stop in context.progress(chunks, desc="crosscoder: reading activations", total=len(chunks)):
        rows = inputs.read(start, stop)
        h.update(memoryview(rows).cast("B"))
        for s in range(n_sources):
            values = rows[:, offsets[s] : offsets[s + 1]]
            if not np.isfinite(values).all():
                bad = ~np.isfinite(values).all(axis=1)
                first = inputs.sample_ids[start + int(np.argmax(bad)) // inputs.positions].item()
                what = "NaN" if np.isnan(values).any() else "infinite values"
                raise ContractError(
                    f"crosscoder: the activations of {inputs.where(s)} contain {what} (first at sample {first!r})"
                )
            sq[s] += float(np.einsum("ij,ij->", values, values, dtype=np.float64))
            sums[s] += values.sum(axis=0, dtype=np.float64)
        del rows, values  # before the next chunk is read
    rows = inputs.rows
    mean_sq = sq / rows
    units = np.asarray(inputs.units, dtype=float)
    scale = np.where(mean_sq > 0, np.sqrt(units / np.where(mean_sq > 0, mean_sq, 1.0)), 1.0)
    mean = np.concatenate([s / rows * c for s, c in zip(sums, scale)])
    return _Survey(h.hexdigest(), scale, mean)


# -------------------------------------------------------------------------- model


class _Coder(nn.Module):
    """Shared encoder over the concatenated inputs, one decoder block per source."""

    def __init__(
        self, units: Sequence[int], latents: int, owner: Sequence[int] | None = None, track_dead: bool = False
    ) -> None:
        super().__init__()
        width = int(sum(units))
        self.encoder = nn.Parameter(torch.empty(width, latents))
        self.encoder_bias = nn.Parameter(torch.zeros(latents))
        self.decoder = nn.Parameter(torch.empty(latents, width))
        self.decoder_bias = nn.Parameter(torch.zeros(width))
        member = torch.zeros(width, len(units))
        offsets = np.cumsum([0, *units])
        for s in range(len(units)):
            member[offsets[s] : offsets[s + 1], s] = 1.0
        self.register_buffer("membership", member)
        # Which model owns each unit; derived, so not part of the saved state.
        owner = np.arange(len(units)) if owner is None else np.asarray(owner)
        models = torch.zeros(width, int(owner.max()) + 1)
        for s in range(len(units)):
            models[offsets[s] : offsets[s + 1], int(owner[s])] = 1.0
        self.register_buffer("model_membership", models, persistent=False)
        if track_dead:
            # Training rows since each latent last fired (AuxK). A buffer, so checkpoints,
            # resumption and the fallback after a divergence carry it with the weights.
            self.register_buffer("since_fired", torch.zeros(latents, dtype=torch.int64))

    def decoder_norms(self) -> torch.Tensor:
        """``(latents, sources)``: norm of each latent's decoder vector in each source."""
        # clamp: sqrt has an infinite gradient at 0 (a decoder block exactly zero).
        return ((self.decoder**2) @ self.membership).clamp_min(1e-20).sqrt()

    def model_norms(self) -> torch.Tensor:
        """``(latents, models)``: norm of each latent's decoder vector over all the layers of each model."""
        return ((self.decoder**2) @ self.model_membership).clamp_min(1e-20).sqrt()

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.decoder_bias) @ self.encoder + self.encoder_bias)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.decoder + self.decoder_bias


def _initialise(coder: _Coder, init: str, units: Sequence[int], norm: float, mean: np.ndarray, seed: int) -> None:
    """Seeded initial parameters, drawn on the host: the same on every device."""
    g = torch.Generator().manual_seed(seed)
    latents, width = coder.decoder.shape
    with torch.no_grad():
        if init == "transpose":
            # Random directions with a small norm in every source's block; the encoder
            # starts as the decoder's transpose (Anthropic's crosscoder setup).
            w = torch.randn(latents, width, generator=g)
            offsets = np.cumsum([0, *units])
            for s in range(len(units)):
                block = w[:, offsets[s] : offsets[s + 1]]
                block *= norm / block.norm(dim=1, keepdim=True).clamp_min(1e-12)
            coder.decoder.copy_(w)
            coder.encoder.copy_(w.T)
        else:  # PyTorch's default for nn.Linear weights
            coder.encoder.copy_((torch.rand(width, latents, generator=g) * 2 - 1) / math.sqrt(width))
            coder.decoder.copy_((torch.rand(latents, width, generator=g) * 2 - 1) / math.sqrt(latents))
        coder.encoder_bias.zero_()
        # Starting at the data mean spares the latents from learning it.
        coder.decoder_bias.copy_(torch.as_tensor(mean, dtype=torch.float32))


def _batchtopk(f: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k * batch`` largest ``f * weight`` of the batch; also the smallest positive value kept.

    The smallest value is a 0-d tensor on ``f``'s device (infinite when nothing positive
    was kept), so that reading it does not wait for the device.
    """
    score = f * weight
    keep = min(k * f.shape[0], score.numel())
    top = torch.topk(score.flatten(), keep, sorted=False)
    mask = torch.zeros(score.numel(), dtype=f.dtype, device=f.device).scatter_(0, top.indices, 1.0).view_as(f)
    kept = top.values.detach()
    smallest = torch.where(kept > 0, kept, torch.full_like(kept, math.inf)).min()
    return f * mask, smallest


def _auxk_loss(
    f: torch.Tensor,
    residual: torch.Tensor,
    decoder: torch.Tensor,
    dead: torch.Tensor,
    k: int,
    membership: torch.Tensor,
    precision: str = "fp32",
) -> torch.Tensor:
    """The AuxK loss of Gao et al. 2024 (appendix A.2): the residual explained by dead latents alone.

    Every row keeps its ``k`` largest activations among the dead latents; their decoded
    sum ``e'`` (no decoder bias) estimates the main reconstruction's residual ``e``. For
    every source ``s`` (the units of one model at one layer) the squared error is
    normalised by the residual's own spread over the batch, as the paper does, and
    multiplied by the source's unit count ``u_s``, which puts it in the units of the
    main loss (a sum over units of values whose mean square is 1):

    .. code-block:: text

        loss = sum_s u_s * sum_rows ||e_s - e'_s||^2 / sum_rows ||e_s - mean_rows(e_s)||^2

    Parameters
    ----------
    f
        ``(rows, latents)`` latent activations before any top-k selection, i.e. the ReLU of
        the pre-activations (the top ``k`` of those are the paper's top pre-activations).
    residual
        ``(rows, width)`` target minus reconstruction, detached.
    decoder
        ``(latents, width)`` decoder vectors, every source's block side by side.
    dead
        ``(latents,)`` bool: the latents that may take part.
    k
        Dead latents per row (``aux_k``); at most all latents.
    membership
        ``(width, sources)``: 1 where a unit belongs to a source.
    precision
        The decoding product runs under autocast at this precision; the rest in float32.

    Returns
    -------
    torch.Tensor
        0-d. A source whose residual is constant over the batch adds 0; with no dead
        latent firing, ``e' = 0`` and the loss has no gradient.
    """
    k = min(int(k), f.shape[1])
    candidates = torch.where(dead, f, torch.zeros_like(f))
    top = torch.topk(candidates, k, dim=1, sorted=False)
    chosen = torch.zeros_like(f).scatter(1, top.indices, top.values)
    with autocast(f.device, precision):
        estimate = chosen @ decoder
    error = ((residual - estimate.float()) ** 2).sum(dim=0) @ membership
    spread = ((residual - residual.mean(dim=0)) ** 2).sum(dim=0) @ membership
    # A where on the denominator too: dividing by 0 would give NaN gradients.
    safe = torch.where(spread > 0, spread, torch.ones_like(spread))
    return torch.where(spread > 0, membership.sum(dim=0) * error / safe, torch.zeros_like(spread)).sum()


def _to_device(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on ``device`` (no copy on the CPU; asynchronous to CUDA when pinned, see ``_pinned_take``)."""
    return to_device(torch.from_numpy(x) if isinstance(x, np.ndarray) else x, device)


def _pinned_take(rows: np.ndarray, index: np.ndarray) -> torch.Tensor:
    """``rows[index]`` gathered straight into pinned memory (one copy, ready for an asynchronous transfer)."""
    out = torch.empty((len(index), rows.shape[1]), dtype=torch.float32, pin_memory=True)
    torch.index_select(torch.from_numpy(rows), 0, torch.from_numpy(np.ascontiguousarray(index)), out=out)
    return out


def _host_float64(t: torch.Tensor) -> np.ndarray:
    """A device reduction as a float64 host array (MPS reduces in float32: no float64 there)."""
    return t.detach().cpu().numpy().astype(np.float64, copy=False)


def _on_host(obj: Any) -> Any:
    """``obj`` with every tensor on the host, for device-independent checkpoints (no copy on the CPU)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _on_host(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_on_host(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_on_host(v) for v in obj)
    return obj


# --------------------------------------------------------------------- component

# Training steps between checks of the loss for NaN: each check waits for the device.
_CHECK_EVERY = 16
# Latents per block when comparing decoder vectors (bounds the float64 copies).
_COSINE_ROWS = 1024


@attrs.define
class _Good:
    """The parameters training falls back to when the loss diverges.

    ``where`` is ``"initial"`` (made again from the seed), ``"checkpoint"`` (the
    checkpoint file holds them) or ``"host"`` (``params``, a copy in host memory,
    kept only for epochs that wrote no checkpoint).
    """

    where: str
    epoch: int
    history: list[float]
    threshold: float
    params: dict[str, torch.Tensor] | None = None


@attrs.define
class Crosscoder:
    """Sparse crosscoder over N models' activations: shared, exclusive and subset-shared features.

    One shared encoder reads the concatenated activations of the N models at a layer;
    every model has its own decoder (models may have different unit counts). The loss
    is the summed squared reconstruction error of every model plus
    ``l1 * sum_i f_i * sum_m ||d_i^m||`` (or, with ``sparsity = "batchtopk"``, a
    batch-level top-k of ``f_i * sum_m ||d_i^m||`` and no L1 term, optionally with the
    AuxK loss that revives dead latents, see ``aux_k``).

    Latent classes use the relative decoder norm ``r_m = ||d^m|| / sum_n ||d^n||``
    (for two models ``r_A = ||d_A|| / (||d_A|| + ||d_B||)``): a model *uses* a latent
    when ``r_m >= exclusive_threshold``. A latent is ``"shared"`` when every model
    uses it, ``"exclusive:<m>"`` when only ``m`` does (every other model's relative
    norm is below the threshold), ``"shared:<a>+<b>"`` when more than one but not all
    do (models in input order), and ``"dead"`` when its density is at most
    ``dead_density`` (``"none"`` for a live latent whose decoder vectors are all
    zero, which has no relative norm).

    **Several layers at once.** A model may give several layers (see :meth:`fit`).
    Every (model, layer) pair is then a *source*: its units join the encoder's input,
    it has its own decoder block ``d_i^{m,l}`` and its own ``normalise`` scale, and the
    sparsity term sums the norms of all blocks, ``sum_{m,l} ||d_i^{m,l}||``, so a
    latent can drop the layers it does not use. Classes stay per model: a model's
    decoder norm is the norm over all its blocks, ``||d^m|| = sqrt(sum_l ||d^{m,l}||^2)``,
    and the result also holds every block's norm, showing at which layers a latent lives.

    **Devices and precision.** The crosscoder trains and analyses on the step's
    ``context.device``: host batches go there asynchronously (through pinned memory
    on CUDA), the parameters and Adam's state stay float32. Under ``context.precision``
    (``"bf16"`` or ``"fp16"``) only the two large matrix products of training (encoder
    and decoder) run under autocast; the loss, the decoder norms, the sparsity term and
    BatchTopK's selection are computed in float32, and fp16 training uses a gradient
    scaler. The analysis always runs in float32, so its statistics depend on the
    trained parameters alone. Every statistic is accumulated in float64 (int64 for
    counts) on the host; per-batch reductions run on the device in float64, or in
    float32 where the device has no float64 (MPS); the running top-k of every latent
    (exact float32 activations) stays on the device. A precision other than ``"fp32"``
    trains other parameters, so it is part of the checkpoint key; the device is not:
    checkpoints hold host tensors and a run resumes on any device. With
    ``precision = "fp32"`` a device gives the CPU's results up to floating-point
    rounding (a different order of summation in the matrix products).

    Parameters
    ----------
    dictionary_size
        Number of latents.
    sparsity
        ``"l1"``: the decoder-norm-weighted L1 penalty of Lindsey et al. 2024.
        ``"batchtopk"``: keep the ``k * batch`` largest ``f_i * sum_m ||d_i^m||`` of
        every batch (no L1 term); after training a latent fires when that value
        exceeds a threshold estimated during training (the mean over the last epoch's
        batches of the smallest value kept).
    l1
        Sparsity coefficient ``lambda`` (``"l1"`` only). It ramps up linearly from 0
        over the first ``l1_warmup`` of the steps, which keeps latents from dying early.
    l1_warmup
        Fraction of the training steps over which ``l1`` ramps up.
    k
        Mean number of active latents per row (``"batchtopk"`` only); at most
        ``dictionary_size``.
    learning_rate
        Adam's learning rate; it decays linearly to 0 over the last 20 % of the steps.
    epochs
        Passes over the activations.
    batch_size
        Rows per optimisation step.
    init
        ``"transpose"``: decoder vectors of random direction with norm
        ``decoder_init_norm`` in every model, encoder = decoder transpose (Anthropic's
        setup). ``"random"``: PyTorch's default uniform initialisation of both. In both
        the decoder bias starts at the mean of the (normalised) activations.
    decoder_init_norm
        Norm of each latent's initial decoder vector in each model (``"transpose"``).
    seed
        Seeds the initialisation and the shuffling; two runs with one seed on the CPU
        give identical results.
    samples
        ``"pooled"``: one row per sample; spatial maps ``(sample, unit, y, x)`` are
        averaged over space (layers of any spatial size mix), token maps ``(sample,
        unit, token)`` over tokens. ``"positions"``: every spatial position of a map (or
        every token) is a row (the maps of all models and layers must have one spatial
        size, or number of tokens).
    normalise
        Scale each model's activations by one scalar so that their mean squared norm
        over the rows equals the model's unit count (the mean squared unit is 1), so no
        model dominates the loss by its scale (with several layers: one scalar per
        layer of each model). Decoder norms, FVU and the relative norms are measured in
        this normalised space.
    exclusive_threshold
        Relative-norm threshold of the classes (see above); at most ``1 / N``.
    dead_density
        A latent is dead when it fires on at most this fraction of the rows
        (default: it never fires).
    topk
        Top samples kept per latent (``topk_sample``, ``topk_value``).
    chunk_size
        Rows held in memory at once (whole samples); memory grows with this, not with
        the number of samples. Every epoch a chunk gathers 8 contiguous blocks of
        ``chunk_size / 8`` rows from random places in the data and shuffles their rows,
        so batches mix distant samples even when the data are sorted (e.g. by class).
        Data that fit in one chunk are read once and kept for every epoch.
    checkpoint_every
        Write a checkpoint every this many epochs (and after the last).
    joint_layers
        In a pipeline step with several layers: one crosscoder over all of them at once
        (every (model, layer) pair a source with its own decoder block; classes per
        model) instead of one crosscoder per layer. The step's node is named
        ``"layer_a+layer_b"``.
    aux_k
        ``"batchtopk"`` only: dead latents per row that the AuxK loss of Gao et al.
        2024 (appendix A.2) trains to reconstruct the residual of the live ones (see
        the module docstring); 0 (default) turns it off. The paper takes half the
        input width (``d_model / 2``); at most ``dictionary_size``. Dead latents have
        no other gradient: AuxK lowers the fraction of ``dead`` latents in the result.
    aux_coefficient
        Weight of the AuxK loss (the paper's ``1 / 32``).
    dead_after
        Training rows (``batch_size`` per step) without firing after which a latent
        counts as dead for AuxK. Default: the rows of one epoch, at most 10 million
        (the paper's 10M tokens): a latent silent for a whole epoch fired on no row of
        the data, which is what the result's ``dead`` means at ``dead_density = 0``.
        A latent fires in training when it wins a place in its batch's top-k. The count
        is kept in the checkpoints, so a resumed run continues it.
    ablation
        After fitting, test every latent class causally (see :meth:`intervene`): remove
        the class's decoded contribution from one model's activations at the layer,
        finish the forward pass, and measure each task's accuracy, against removing as
        many random live latents. Needs the step's models, one layer per crosscoder
        (not ``joint_layers``), and labelled ``[data]``.
    ablation_tasks
        The tasks of the ablation: names of parts of a ``concat`` ``[data]`` (each
        part's images, scored among that part's classes only). Default: every part of
        a ``concat``, or the whole ``[data]`` as one task.
    ablation_draws
        Random latent sets drawn per class (the control's spread).
    ablation_samples
        At most this many images per task, evenly spaced through the task's images
        (default: all of them).

    Notes
    -----
    Memory. With ``W`` input units in all (the sum over models and layers), ``L``
    latents and batches of ``B`` rows, the device holds the float32 encoder and
    decoder (``8 W L`` bytes), their gradients (``8 W L``) and Adam's two moments
    (``16 W L``): ``32 W L`` bytes. A step adds passing temporaries: the backward
    pass of the decoder norms and Adam's update (one tensor at a time) about
    ``14 W L``, and the batch about ``12 B L + 8 B W``. Measured on the CPU
    (W = 1536, L = 4096 and 8192) the peak of a step is ``46 W L + 12 B L + 8 B W``
    bytes within a few percent (without AuxK, whose step adds a few more ``(B, L)`` and
    ``(B, W)`` temporaries, not measured). For three ResNet-50s at layer4 (``W = 3 * 2048``),
    ``L = 16384`` and ``B = 4096``: parameters 0.8 GB, with gradients and Adam 3.2 GB,
    a peak near 5.6 GB (bf16 autocast adds its half-precision copies of the two
    matrices, ``4 W L``, 0.4 GB). The analysis holds the parameters, no gradients
    and no Adam state, and ``(2048, L)`` temporaries; its top-k stays
    ``(2 * topk, L)``. On the host: one chunk of ``chunk_size`` rows (``4 W chunk_size``
    bytes, 0.4 GB at the default 16384 rows), and a copy of the last good parameters
    only after an epoch that wrote no checkpoint (never with the default
    ``checkpoint_every = 1``); writing a checkpoint from another device copies the
    parameters and Adam's state to the host for the time of the write.
    """

    name: ClassVar[str] = "crosscoder"
    paper: ClassVar[str] = (
        "Lindsey et al. 2024, Sparse crosscoders for cross-layer features and model diffing; "
        "Minder et al. 2025 (BatchTopK crosscoders)"
    )

    dictionary_size: int = attrs.field(default=256, validator=positive_int)
    sparsity: str = attrs.field(default="l1", validator=one_of("l1", "batchtopk"))
    l1: float = attrs.field(default=2.0, converter=as_float, validator=non_negative)
    l1_warmup: float = attrs.field(default=0.05, converter=as_float, validator=probability)
    k: int = attrs.field(default=8, validator=positive_int)
    learning_rate: float = attrs.field(default=2e-3, converter=as_float, validator=positive)
    epochs: int = attrs.field(default=50, validator=positive_int)
    batch_size: int = attrs.field(default=256, validator=positive_int)
    init: str = attrs.field(default="transpose", validator=one_of("transpose", "random"))
    decoder_init_norm: float = attrs.field(default=0.1, converter=as_float, validator=positive)
    seed: int = attrs.field(default=0, validator=integer)
    samples: str = attrs.field(default="pooled", validator=one_of("pooled", "positions"))
    normalise: bool = attrs.field(default=True, validator=boolean)
    exclusive_threshold: float = attrs.field(default=0.05, converter=as_float, validator=_threshold)
    dead_density: float = attrs.field(default=0.0, converter=as_float, validator=probability)
    topk: int = attrs.field(default=10, validator=positive_int)
    chunk_size: int = attrs.field(default=16384, validator=positive_int)
    checkpoint_every: int = attrs.field(default=1, validator=positive_int)
    joint_layers: bool = attrs.field(default=False, validator=boolean, metadata={OMIT_DEFAULT_FROM_KEY: True})
    aux_k: int = attrs.field(default=0, validator=non_negative_int, metadata={OMIT_DEFAULT_FROM_KEY: True})
    aux_coefficient: float = attrs.field(
        default=1 / 32, converter=as_float, validator=non_negative, metadata={OMIT_DEFAULT_FROM_KEY: True}
    )
    dead_after: int | None = attrs.field(
        default=None, validator=optional(positive_int), metadata={OMIT_DEFAULT_FROM_KEY: True}
    )
    ablation: bool = attrs.field(default=False, validator=boolean, metadata={OMIT_DEFAULT_FROM_KEY: True})
    ablation_tasks: list[str] | None = attrs.field(
        default=None,
        validator=optional([list_of(non_empty_str, min_length=1), distinct("task")]),
        metadata={OMIT_DEFAULT_FROM_KEY: True},
    )
    ablation_draws: int = attrs.field(default=3, validator=positive_int, metadata={OMIT_DEFAULT_FROM_KEY: True})
    ablation_samples: int | None = attrs.field(
        default=None, validator=optional(positive_int), metadata={OMIT_DEFAULT_FROM_KEY: True}
    )

    # Options that change the trained parameters (the checkpoint key); the others only
    # change the analysis of a trained crosscoder.
    _TRAINING: ClassVar[tuple[str, ...]] = (
        "dictionary_size", "sparsity", "l1", "l1_warmup", "k", "learning_rate", "epochs", "batch_size",
        "init", "decoder_init_norm", "seed", "samples", "normalise", "chunk_size",
        "aux_k", "aux_coefficient", "dead_after",
    )  # fmt: skip
    _AUXILIARY: ClassVar[tuple[str, ...]] = ("aux_k", "aux_coefficient", "dead_after")

    def __attrs_post_init__(self) -> None:
        if self.sparsity == "batchtopk" and self.k > self.dictionary_size:
            raise ConfigError(
                f"k = {self.k} active latents per row is more than the dictionary_size = {self.dictionary_size} "
                "latents; choose k <= dictionary_size",
                where="key 'k'",
            )
        if self.aux_k > 0 and self.sparsity != "batchtopk":
            raise ConfigError(
                f"aux_k = {self.aux_k} asks for the AuxK loss, which only sparsity = 'batchtopk' trains with "
                f"(sparsity = {self.sparsity!r} here); set sparsity = 'batchtopk' or aux_k = 0",
                where="key 'aux_k'",
            )
        if self.ablation and self.joint_layers:
            raise ConfigError(
                "ablation removes latents at one layer and finishes the forward pass from there; a crosscoder "
                "over several layers at once (joint_layers = true) would need every layer edited in turn: set "
                "joint_layers = false or ablation = false",
                where="key 'ablation'",
            )
        if self.aux_k > self.dictionary_size:
            raise ConfigError(
                f"aux_k = {self.aux_k} dead latents per row is more than the dictionary_size = "
                f"{self.dictionary_size} latents; choose aux_k <= dictionary_size",
                where="key 'aux_k'",
            )

    # ------------------------------------------------------------------ public

    def check_activations(self, activations: Any) -> None:
        """Refuse, before anything is recorded, ``[activations]`` that cannot feed this crosscoder.

        ``samples = "positions"`` reads every spatial position of a map, which only
        recordings of full maps (``reduce = "none"``) or of every token (``tokens =
        "all"``) hold. The ablation edits a layer at every position, so it cannot follow
        a crosscoder of class tokens (``tokens = "cls"``).
        """
        tokens = getattr(activations, "tokens", "mean")
        if self.samples == "positions" and activations.reduce != "none" and tokens != "all":
            raise ConfigError(
                f"samples = 'positions' trains on every spatial position of a map, but [activations] "
                f"reduce = {activations.reduce!r} keeps one summary per channel and image; set reduce = 'none' "
                "in [activations] (tokens = 'all' for a transformer's token layers), or samples = 'pooled' here",
                where="key 'samples'",
            )
        if self.ablation and tokens == "cls":
            raise ConfigError(
                "the ablation removes latents from a layer's output at every token, but with [activations] "
                "tokens = 'cls' the crosscoder reads the class token only; record tokens = 'mean' or 'all', or "
                "turn the ablation off",
                where="key 'ablation'",
            )

    def fit(self, activations: Mapping[str, Any], context: Context) -> xr.Dataset:
        """Train the crosscoder on the activations of N models and describe every latent.

        Parameters
        ----------
        activations
            Model name -> its activations at one layer: a DataArray with dims
            ``("sample", "unit")``, ``("sample", "unit", "y", "x")`` or ``("sample",
            "unit", "token")``; every model
            over the same samples (same ``sample`` coord in the same order); may be
            dask-backed. Unit counts may differ. The scalar coord ``layer``, when
            present, names the layer in messages. For several layers at once, a model
            maps to a mapping layer name -> DataArray, or to a list of DataArrays named
            by their ``layer`` coords (see the class docstring); models may give
            different layers.
        context
            ``progress`` shows the training; ``device`` and ``precision`` say where
            and how it runs (see the class docstring); checkpoints go to
            ``<workdir>/crosscoder/<key>/`` (the system temp directory when
            ``workdir`` is ``None``), keyed by the training options, the precision and
            a hash of the activations, and an interrupted fit resumes from the last
            one, on any device.

        Returns
        -------
        xarray.Dataset
            Dims ``latent``, ``model``, ``pair`` (``"a~b"`` for every pair of models),
            ``rank`` (top samples), ``epoch`` and ``input`` (the concatenated units of
            all models; coords ``input_model``, ``input_unit``):

            - ``decoder_norm (latent, model)``, ``relative_norm (latent, model)``,
              ``latent_class (latent)`` (see the class docstring),
            - ``cosine (latent, pair)``: cosine similarity of a latent's decoder
              vectors in the two models (NaN when their unit counts differ; it
              compares unit j with unit j),
            - ``pair_relative_norm (latent, pair)``: for the pair ``"a~b"``, the
              relative norm of ``b`` within the pair, ``||d^b|| / (||d^a|| + ||d^b||)``
              (0: only ``a`` uses the latent, 1: only ``b``), whatever the other
              models hold; for two models it is ``relative_norm`` of the second,
            - ``density (latent)``: fraction of rows where the latent fires (> 0),
            - ``dead (latent)``: ``density <= dead_density``,
            - ``fvu (model)``: fraction of variance unexplained,
              ``sum ||x - x'||^2 / sum ||x - mean(x)||^2`` over the rows,
            - ``l0``: mean number of active latents per row,
            - ``topk_sample (rank, latent)`` / ``topk_value (rank, latent)``: the samples
              (``sample`` coord values; in positions mode the image of the position)
              with the largest activation of each latent (maximum over an image's
              positions), largest first; a value of 0 means the latent did not fire,
            - ``loss_history (epoch)``: mean training loss of every epoch (with
              ``aux_k``, including the weighted AuxK term),
            - ``diverged``, ``epochs_trained``: whether training stopped on a
              non-finite loss and how many epochs the returned parameters had,
            - ``scale (model)``, ``units (model)``, ``threshold`` (BatchTopK; NaN
              for L1), ``encoder (input, latent)``, ``encoder_bias (latent)``,
              ``decoder (latent, input)``, ``decoder_bias (input)``: the fitted
              crosscoder, applied to ``scale``-multiplied activations.

            When some model gives several layers the result also has the dim
            ``source`` (one per model and layer, named ``"<model>/<layer>"``, with
            coords ``source_model`` and ``source_layer``) and the coord
            ``input_layer``; ``scale`` and ``units`` are per source, and it adds
            ``source_norm (latent, source)`` (every decoder block's norm: at which
            layers a latent lives) and ``source_fvu (source)``. ``decoder_norm``,
            ``fvu`` and ``cosine`` (over the concatenated layers, for models with the
            same layers' unit counts) stay per model. With one layer per model the
            result has the scalar coord ``layer`` instead.

            The scalar coords ``sparsity``, ``seed`` and the sparsity's strength
            (``l1`` for ``"l1"``, ``k`` for ``"batchtopk"``) record how the result was
            trained, so that a sweep over them can be read back from the results.

        Raises
        ------
        mergescope.errors.ContractError
            (a ``ValueError``) fewer than 2 models, wrong dims or dtype, no units,
            different samples, NaN or infinite activations, layers of different
            spatial sizes with ``samples = "positions"`` (naming the model and layer).
        mergescope.errors.ConfigError
            ``context.precision`` is unknown or not supported on ``context.device``
            (fp16 on the CPU).

        Warns
        -----
        UserWarning
            ``dictionary_size`` exceeds the number of rows.
        RuntimeWarning
            The loss became NaN or infinite; training stopped and the parameters of
            the last finished epoch are returned (``diverged`` is true).
        """
        inputs = _check_inputs(activations, self.samples)
        n_models = len(inputs.models)
        if self.exclusive_threshold * n_models > 1.0 + 1e-12:
            raise ContractError(
                f"crosscoder: exclusive_threshold = {self.exclusive_threshold} is above 1/N = {1 / n_models:.3g} for "
                f"{n_models} models, so a latent could be used by no model; choose at most {1 / n_models:.3g}"
            )
        _device_of(context)  # an unsupported precision fails here, before any data is read
        if self.dictionary_size > inputs.rows:
            warnings.warn(
                f"crosscoder{inputs.at()}: dictionary_size = {self.dictionary_size} latents for only {inputs.rows} "
                "rows; most latents will stay dead or duplicate each other",
                UserWarning,
                stacklevel=2,
            )
        chunks = _chunks(inputs, self.chunk_size)
        survey = _survey(inputs, chunks, context)
        if not self.normalise:
            survey.mean = survey.mean / np.repeat(survey.scale, inputs.units)
            survey.scale = np.ones_like(survey.scale)
        state = self._train(inputs, survey, context)
        return self._analyse(inputs, chunks, survey, state, context)

    def intervene(
        self, result: xr.Dataset, models: Mapping[str, nn.Module], layer: str, context: Context
    ) -> xr.Dataset | None:
        """With ``ablation``: remove each latent class from each model and measure every task's accuracy.

        For every batch of a task's images, every model runs once and its activations at
        ``layer`` are captured; the fitted crosscoder gives the latents of every row from
        all models' activations together (as in the analysis). Then, for each chosen
        latent set and each model ``m``, ``m`` runs again with its activations at
        ``layer`` replaced by ``x^m - sum_{i in set} f_i(x) d_i^m / s_m`` (see
        :func:`ablate_latents`), and its predictions among the task's classes are
        scored. The sets are every class of live latents (``shared``, ``exclusive:<m>``,
        ``shared:<a>+<b>``) and, as the control, ``ablation_draws`` sets of as many
        latents drawn at random from all live latents (seeded by ``seed``).

        Returns
        -------
        xarray.Dataset or None
            ``None`` without ``ablation``. Otherwise, with dims ``removed`` (the
            classes), ``task``, ``model`` and ``draw``: ``ablation_latents (removed)``,
            ``ablation_baseline (model, task)`` (accuracy unedited),
            ``ablation_accuracy (removed, model, task)``,
            ``ablation_random_accuracy (removed, draw, model, task)``,
            ``ablation_change`` and ``ablation_random_change`` (accuracy minus the
            baseline; the latter the mean over draws, with ``ablation_random_change_std``),
            ``ablation_effect`` (the class's change minus the random sets' mean change)
            and ``ablation_images (task)``.

        Raises
        ------
        mergescope.errors.ConfigError
            ``ablation_tasks`` names no part of ``[data]`` (or ``[data]`` is not a
            ``concat``), or the step has no data.
        mergescope.errors.ContractError
            A model's head has fewer outputs than a task's classes need.
        """
        if not self.ablation:
            return None
        if context.data is None:
            raise ConfigError("ablation scores the models on [data], but the pipeline has none", where="key 'ablation'")
        tasks = _ablation_tasks(context.data, self.ablation_tasks, self.ablation_samples)
        classes = np.asarray(result["latent_class"].values).astype(str)
        live = np.flatnonzero(~np.asarray(result["dead"].values, dtype=bool) & (classes != "none"))
        labels = sorted({classes[i] for i in live}, key=class_order)
        rng = np.random.default_rng(self.seed)
        sets: list[np.ndarray] = []
        for label in labels:
            chosen = np.flatnonzero(classes == label)
            sets.append(chosen)
            sets += [np.sort(rng.choice(live, size=len(chosen), replace=False)) for _ in range(self.ablation_draws)]
        names = [str(m) for m in result["model"].values]
        editor = _LatentEditor(result, context.device)
        places = {m: resolve_layers(models[m], [layer], m)[layer] for m in names}
        correct = np.zeros((len(sets) + 1, len(names), len(tasks)), dtype=np.int64)
        for t, task in enumerate(tasks):
            loader = make_loader(task.data, context.batch_size, device=context.device)
            batches = context.progress(loader, desc=f"crosscoder ablation: {task.name}", total=len(loader))
            for images, labels_cpu in batches:
                images, target = to_device(images, context.device), labels_cpu.numpy()
                with torch.no_grad(), autocast(context.device, context.precision):
                    captured, logits = _capture({m: models[m] for m in names}, layer, images)
                    correct[0, :, t] += [task.hits(out, target) for out in logits]
                    f = editor.latents(captured, pooled=self.samples == "pooled")
                    for j, chosen in enumerate(sets):
                        for i, m in enumerate(names):
                            edited = captured[i] - editor.contribution(f, chosen, i, captured[i].shape, self.samples)
                            out = _forward_edited(models[m], places[m], images, edited.to(captured[i].dtype))
                            correct[j + 1, i, t] += task.hits(out, target)
        counts = np.array([task.size for task in tasks], dtype=np.float64)
        accuracy = correct / counts
        step = 1 + self.ablation_draws
        own = accuracy[1::step]  # (removed, model, task)
        drawn = np.stack([accuracy[2 + d :: step] for d in range(self.ablation_draws)], axis=1)
        baseline = accuracy[0]
        dims = ("removed", "model", "task")
        out = xr.Dataset(
            {
                "ablation_latents": ("removed", np.array([len(sets[j * step]) for j in range(len(labels))])),
                "ablation_baseline": (("model", "task"), baseline),
                "ablation_accuracy": (dims, own),
                "ablation_random_accuracy": (("removed", "draw", "model", "task"), drawn),
                "ablation_change": (dims, own - baseline),
                "ablation_random_change": (dims, drawn.mean(axis=1) - baseline),
                "ablation_random_change_std": (
                    dims,
                    drawn.std(axis=1, ddof=1) if self.ablation_draws > 1 else np.zeros_like(own),
                ),
                "ablation_images": ("task", counts.astype(np.int64)),
            },
            coords={
                "removed": labels,
                "model": names,
                "task": [task.name for task in tasks],
                "draw": np.arange(self.ablation_draws),
            },
        )
        out["ablation_effect"] = out["ablation_change"] - out["ablation_random_change"]
        return out

    def describe(self, result: xr.Dataset) -> str:
        """One line: how many latents fall in each class, the FVU per model and L0."""
        classes = [str(c) for c in result["latent_class"].values]
        counts: dict[str, int] = {}
        for c in classes:
            counts[c] = counts.get(c, 0) + 1
        parts = [f"{counts[c]} {c}" for c in sorted(counts, key=class_order)]
        fvu = ", ".join(f"{m} {float(v):.3f}" for m, v in zip(result["model"].values, result["fvu"].values))
        text = f"{len(classes)} latents: {', '.join(parts)}; FVU {fvu}; L0 {float(result['l0']):.1f}"
        if bool(result["diverged"]):
            text += f" (diverged: kept epoch {int(result['epochs_trained'])})"
        return text

    # ---------------------------------------------------------------- training

    def _key(self, survey: _Survey, precision: str = "fp32") -> str:
        unused = ("l1", "l1_warmup") if self.sparsity == "batchtopk" else ("k",)
        if self.aux_k == 0:  # keys without AuxK stay those written before it existed
            unused += self._AUXILIARY
        options: dict[str, Any] = {k: getattr(self, k) for k in self._TRAINING if k not in unused}
        if precision != "fp32":  # fp32 keys stay those of checkpoints written before precisions existed
            options["precision"] = precision
        payload = json.dumps({"format": _FORMAT, "options": options, "data": survey.digest}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def _directory(self, context: Context, key: str) -> Path:
        root = context.workdir if context.workdir is not None else Path(tempfile.gettempdir()) / "mergescope-crosscoder"
        return Path(root) / "crosscoder" / key[:16]

    def _initial(self, inputs: _Inputs, survey: _Survey) -> _Coder:
        """The seeded initial crosscoder, on the host."""
        coder = _Coder(inputs.units, self.dictionary_size, inputs.owner, track_dead=self.aux_k > 0)
        _initialise(coder, self.init, inputs.units, self.decoder_init_norm, survey.mean, self.seed)
        return coder

    def _train(self, inputs: _Inputs, survey: _Survey, context: Context) -> dict:
        device, precision = _device_of(context)
        coder = self._initial(inputs, survey).to(device)
        # One tensor at a time: the multi-tensor (foreach) Adam keeps temporaries as
        # large as all the parameters together.
        optimiser = torch.optim.Adam(coder.parameters(), lr=self.learning_rate, foreach=False)
        # fp16 gradients underflow without scaling; bf16 has float32's range.
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        key = self._key(survey, precision)
        path = self._directory(context, key) / _CHECKPOINT
        steps_per_epoch = math.ceil(inputs.rows / self.batch_size)
        total_steps = steps_per_epoch * self.epochs
        state = {"epoch": 0, "loss_history": [], "threshold": float("nan"), "diverged": False}
        resumed = _load_checkpoint(path, key)
        if resumed is not None:
            coder.load_state_dict(resumed["model"])
            optimiser.load_state_dict(resumed["optimiser"])  # moves Adam's moments to the device
            for group in optimiser.param_groups:
                group["foreach"] = False  # whatever the writer of the checkpoint used
            if scaler.is_enabled() and "scaler" in resumed:
                scaler.load_state_dict(resumed["scaler"])
            state.update(
                epoch=int(resumed["epoch"]),
                loss_history=[float(v) for v in resumed["loss_history"]],
                threshold=float(resumed["threshold"]),
            )
            log.info("crosscoder: resumed from %s after epoch %d", path, state["epoch"])
        good = _Good(
            "checkpoint" if resumed is not None else "initial",
            state["epoch"],
            list(state["loss_history"]),
            state["threshold"],
        )
        del resumed
        scale = torch.as_tensor(np.repeat(survey.scale, inputs.units), dtype=torch.float32).to(device)
        take = _pinned_take if device.type == "cuda" else None
        dead_after = self._dead_rows(inputs.rows)
        epochs = range(state["epoch"] + 1, self.epochs + 1)
        where = inputs.at()
        for epoch in context.progress(epochs, desc=f"crosscoder{where}: training", total=len(epochs)):
            losses: list[torch.Tensor] = []
            minima: list[torch.Tensor] = []
            first = step = (epoch - 1) * steps_per_epoch
            for x in self._batches(inputs, epoch, take):
                x = _to_device(x, device) * scale
                self._schedule(optimiser, step, total_steps)
                loss, smallest = self._loss(coder, x, step, total_steps, device, precision, dead_after)
                if smallest is not None:
                    minima.append(smallest)
                losses.append(loss.detach())
                step += 1
                optimiser.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimiser)
                scaler.update()
                # Looking at the loss waits for the device: only every few steps.
                if len(losses) % _CHECK_EVERY == 0 and not _finite(losses[-_CHECK_EVERY:]):
                    break  # diverged: the rest of the epoch is wasted work
            values = torch.stack(losses).cpu().numpy() if losses else np.zeros(0, dtype=np.float32)
            bad = None
            nonfinite = ~np.isfinite(values)
            if nonfinite.any():
                i = int(np.argmax(nonfinite))
                bad = (float(values[i]), first + i + 1)
            elif not all(torch.isfinite(p).all() for p in coder.parameters()):
                bad = (float("nan"), step)
            if bad is not None:
                self._restore(coder, good, path, key, inputs, survey)
                state.update(epoch=good.epoch, loss_history=good.history, threshold=good.threshold, diverged=True)
                warnings.warn(
                    f"crosscoder{where}: the loss became {bad[0]} at epoch {epoch} (step {bad[1]}); training "
                    f"stopped and the parameters after epoch {good.epoch} are kept (lower learning_rate?)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                break
            state["epoch"] = epoch
            state["loss_history"].append(float(np.mean(values.astype(np.float64))))
            kept = torch.stack(minima).cpu().numpy().astype(np.float64) if minima else np.zeros(0)
            kept = kept[np.isfinite(kept)]
            if len(kept):
                state["threshold"] = float(np.mean(kept))
            log.info("crosscoder%s: epoch %d/%d loss %.5g", where, epoch, self.epochs, state["loss_history"][-1])
            saved = epoch % self.checkpoint_every == 0 or epoch == self.epochs
            if saved:
                _save_checkpoint(path, key, coder, optimiser, scaler, state)
            good = _Good("checkpoint", epoch, list(state["loss_history"]), state["threshold"])
            if not saved:  # a copy on the host, never a second one on the device
                good.where = "host"
                good.params = {k: v.detach().to("cpu", copy=True) for k, v in coder.state_dict().items()}
        for p in coder.parameters():
            p.grad = None  # the analysis needs no gradients: free their memory
        state["coder"] = coder
        return state

    def _dead_rows(self, rows: int) -> int:
        """Training rows without firing after which a latent counts as dead (AuxK)."""
        return self.dead_after if self.dead_after is not None else min(rows, _DEAD_AFTER_MAX)

    def _loss(
        self,
        coder: _Coder,
        x: torch.Tensor,
        step: int,
        total: int,
        device: torch.device,
        precision: str,
        dead_after: int = _DEAD_AFTER_MAX,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss of one batch and, for BatchTopK, the smallest value kept.

        Only the encoder's and the decoder's matrix products run under autocast; the
        rest is float32 (a no-op at ``"fp32"``). With ``aux_k`` it adds the AuxK term
        and counts the rows since every latent last fired (``dead_after`` rows make it dead).
        """
        with autocast(device, precision):
            f = coder.activations(x)
        f = f.float()
        norms = coder.decoder_norms().sum(dim=1)
        if self.sparsity == "batchtopk":
            kept, smallest = _batchtopk(f, norms, self.k)
            with autocast(device, precision):
                x_hat = coder.decode(kept)
            x_hat = x_hat.float()
            loss = ((x_hat - x) ** 2).sum(dim=1).mean()
            if self.aux_k > 0:
                since = coder.since_fired
                dead = since >= dead_after  # from the batches before this one
                residual = (x - x_hat).detach()
                aux = _auxk_loss(f, residual, coder.decoder, dead, self.aux_k, coder.membership, precision)
                loss = loss + self.aux_coefficient * aux
                with torch.no_grad():  # on the device: no wait for it
                    fired = (kept > 0).any(dim=0)
                    since.copy_(torch.where(fired, torch.zeros_like(since), since + x.shape[0]))
            return loss, smallest
        coefficient = self.l1 * self._warmup(step, total)
        with autocast(device, precision):
            x_hat = coder.decode(f)
        recon = ((x_hat.float() - x) ** 2).sum(dim=1).mean()
        return recon + coefficient * (f * norms).sum(dim=1).mean(), None

    def _restore(self, coder: _Coder, good: _Good, path: Path, key: str, inputs: _Inputs, survey: _Survey) -> None:
        """Put the last good parameters back into ``coder``."""
        if good.where == "initial":
            params = self._initial(inputs, survey).state_dict()
        elif good.where == "checkpoint":
            payload = _load_checkpoint(path, key)
            if payload is None or int(payload["epoch"]) != good.epoch:
                raise RuntimeError(
                    f"crosscoder: training diverged and the checkpoint {path} that held the parameters after epoch "
                    f"{good.epoch} is gone or was replaced; run the step again"
                )
            params = payload["model"]
        else:
            assert good.params is not None
            params = good.params
        coder.load_state_dict(params)

    def _batches(self, inputs: _Inputs, epoch: int, take: Any = None) -> Iterator[Any]:
        """Shuffled batches of concatenated rows, one chunk in memory at a time.

        Every epoch the samples are cut into contiguous blocks of about
        ``chunk_size / 8`` rows; each chunk reads 8 random blocks and shuffles their rows.
        The shuffle depends on ``(seed, epoch)`` only, so a resumed run sees the same batches.
        ``take(rows, index)`` gathers a batch (default ``rows[index]``; for CUDA, into
        pinned memory).
        """
        if take is None:
            take = _take
        rng = np.random.default_rng([self.seed, epoch])
        size = self.batch_size
        # A chunk gathers a few random blocks from anywhere in the data, so a batch mixes
        # distant samples even when the data are stored sorted (e.g. by class).
        blocks = _chunks(inputs, self.chunk_size // _BLOCKS_PER_CHUNK)
        picks = rng.permutation(len(blocks))
        single = len(blocks) <= _BLOCKS_PER_CHUNK  # all the data in one chunk: read once, kept
        carry = np.zeros((0, sum(inputs.units)), dtype=np.float32)
        for g in range(0, len(picks), _BLOCKS_PER_CHUNK):
            group = [blocks[b] for b in np.sort(picks[g : g + _BLOCKS_PER_CHUNK])]
            rows = inputs.whole() if single else inputs.gather(group)
            order = rng.permutation(len(rows))
            first = 0
            if len(carry):  # the previous chunk's remainder starts this chunk's first batch
                first = min(size - len(carry), len(order))
                carry = np.concatenate([carry, rows[order[:first]]])
                if len(carry) < size:
                    continue
                yield carry
            # Batches index the chunk: no shuffled copy of it.
            full = first + (len(order) - first) // size * size
            for start in range(first, full, size):
                yield take(rows, order[start : start + size])
            carry = rows[order[full:]]
            del rows  # before the next chunk is read: one chunk in memory at a time
        if len(carry):
            yield carry

    def _warmup(self, step: int, total: int) -> float:
        ramp = self.l1_warmup * total
        return 1.0 if ramp <= 0 else min(1.0, (step + 1) / ramp)

    def _schedule(self, optimiser: torch.optim.Optimizer, step: int, total: int) -> None:
        decay = _LR_DECAY * total
        factor = min(1.0, (total - step) / decay) if decay > 0 else 1.0
        for group in optimiser.param_groups:
            group["lr"] = self.learning_rate * factor

    # ---------------------------------------------------------------- analysis

    def _analyse(
        self, inputs: _Inputs, chunks: Sequence[tuple[int, int]], survey: _Survey, state: dict, context: Context
    ) -> xr.Dataset:
        device, _ = _device_of(context)
        coder: _Coder = state["coder"]
        models, units = inputs.models, inputs.units
        n_models, latents = len(models), self.dictionary_size
        owner = inputs.owner
        offsets = np.cumsum([0, *units])
        scale = torch.as_tensor(np.repeat(survey.scale, units), dtype=torch.float32).to(device)
        threshold = state["threshold"] if self.sparsity == "batchtopk" else float("nan")
        reduce_dtype = torch.float32 if device.type == "mps" else torch.float64
        fired = np.zeros(latents, dtype=np.int64)
        sse = np.zeros(len(units))
        sums = np.zeros(offsets[-1])
        squares = np.zeros(offsets[-1])
        k = min(self.topk, inputs.samples)
        best_values = torch.zeros((0, latents), dtype=torch.float32, device=device)
        best_samples = torch.zeros((0, latents), dtype=torch.int64, device=device)
        with torch.no_grad():
            weight = coder.decoder_norms().sum(dim=1)
            for start, stop in context.progress(chunks, desc="crosscoder: analysing", total=len(chunks)):
                rows = inputs.read(start, stop)
                step = max(inputs.positions, _EVAL_ROWS // inputs.positions * inputs.positions)
                for i in range(0, len(rows), step):
                    x = _to_device(rows[i : i + step], device) * scale
                    f = coder.activations(x)
                    if self.sparsity == "batchtopk":
                        f = f * (f * weight > threshold)
                    error = ((coder.decode(f) - x) ** 2).sum(dim=0, dtype=reduce_dtype)
                    sse += np.add.reduceat(_host_float64(error), offsets[:-1])
                    fired += (f > 0).sum(dim=0).cpu().numpy()
                    sums += _host_float64(x.sum(dim=0, dtype=reduce_dtype))
                    squares += _host_float64((x * x).sum(dim=0, dtype=reduce_dtype))
                    # Per sample: the largest activation over its positions.
                    per_sample = f.view(-1, inputs.positions, latents).amax(dim=1)
                    best_values, best_samples = _merge_topk(
                        best_values, best_samples, per_sample, start + i // inputs.positions, k
                    )
                del rows  # before the next chunk is read
            source_norms = _host_float64(coder.decoder_norms())
            norms = _host_float64(coder.model_norms()) if inputs.multi else source_norms
        # Host views of the parameters, not copies: the crosscoder is not used after this.
        encoder, encoder_bias, decoder, decoder_bias = (
            p.detach().cpu().numpy() for p in (coder.encoder, coder.encoder_bias, coder.decoder, coder.decoder_bias)
        )
        best_ids = inputs.sample_ids[best_samples.cpu().numpy()]
        best_values = best_values.cpu().numpy()
        rows_total = inputs.rows
        sst = np.add.reduceat(squares - sums**2 / rows_total, offsets[:-1])
        model_sse = np.array([sse[owner == m].sum() for m in range(n_models)])
        model_sst = np.array([sst[owner == m].sum() for m in range(n_models)])
        fvu = np.where(model_sst > 0, model_sse / np.where(model_sst > 0, model_sst, 1.0), np.nan)
        total = norms.sum(axis=1, keepdims=True)
        relative = np.divide(norms, total, out=np.full_like(norms, np.nan), where=total > 0)
        density = fired / rows_total
        dead = density <= self.dead_density
        labels = classify(relative, models, self.exclusive_threshold)
        labels = np.where(dead, "dead", labels)
        pairs = list(itertools.combinations(range(n_models), 2))
        cosine = np.full((latents, len(pairs)), np.nan)
        columns = [np.flatnonzero(np.repeat(owner, units) == m) for m in range(n_models)]
        shapes = [[u for u, o in zip(units, owner) if o == m] for m in range(n_models)]
        for j, (a, b) in enumerate(pairs):
            if shapes[a] == shapes[b]:
                ca = slice(columns[a][0], columns[a][-1] + 1)  # a model's sources are adjacent
                cb = slice(columns[b][0], columns[b][-1] + 1)
                for lo in range(0, latents, _COSINE_ROWS):  # float64 copies of a block of latents only
                    hi = min(lo + _COSINE_ROWS, latents)
                    da = decoder[lo:hi, ca].astype(np.float64)
                    db = decoder[lo:hi, cb].astype(np.float64)
                    cosine[lo:hi, j] = (da * db).sum(axis=1) / (norms[lo:hi, a] * norms[lo:hi, b])
        unit_coords = np.concatenate([np.asarray(arr["unit"].values) if "unit" in arr.coords else np.arange(u)
                                      for arr, u in zip(inputs.arrays, units)])  # fmt: skip
        history = np.asarray(state["loss_history"], dtype=float)
        per = "source" if inputs.multi else "model"
        variables: dict[str, Any] = {
            "decoder_norm": (("latent", "model"), norms),
            "relative_norm": (("latent", "model"), relative),
            "latent_class": ("latent", labels.astype(str)),
            "cosine": (("latent", "pair"), cosine),
            "pair_relative_norm": (("latent", "pair"), _pair_relative_norm(norms, pairs)),
            "density": ("latent", density),
            "dead": ("latent", dead),
            "fvu": ("model", fvu),
            "l0": ((), float(fired.sum() / rows_total)),
            # (rank, latent), as top-k rows read them: top-k grids show each latent's images.
            "topk_sample": (("rank", "latent"), np.ascontiguousarray(best_ids)),
            "topk_value": (("rank", "latent"), np.ascontiguousarray(best_values.astype(np.float64))),
            "loss_history": ("epoch", history),
            "diverged": ((), bool(state["diverged"])),
            "epochs_trained": ((), int(state["epoch"])),
            "scale": (per, survey.scale.astype(np.float64)),
            "units": (per, np.asarray(units, dtype=np.int64)),
            "threshold": ((), float(threshold)),
            "encoder": (("input", "latent"), encoder),
            "encoder_bias": ("latent", encoder_bias),
            "decoder": (("latent", "input"), decoder),
            "decoder_bias": ("input", decoder_bias),
        }
        coords: dict[str, Any] = {
            "latent": np.arange(latents),
            "model": models,
            "pair": [f"{models[a]}~{models[b]}" for a, b in pairs],
            "rank": np.arange(k),
            "epoch": np.arange(1, len(history) + 1),
            "input_model": ("input", np.repeat([m for m, _ in inputs.sources], units)),
            "input_unit": ("input", unit_coords),
        }
        if inputs.multi:
            source_fvu = np.where(sst > 0, sse / np.where(sst > 0, sst, 1.0), np.nan)
            variables["source_norm"] = (("latent", "source"), source_norms)
            variables["source_fvu"] = ("source", source_fvu)
            layers = [layer if layer is not None else "" for _, layer in inputs.sources]
            coords["source"] = inputs.source_names
            coords["source_model"] = ("source", [m for m, _ in inputs.sources])
            coords["source_layer"] = ("source", layers)
            coords["input_layer"] = ("input", np.repeat(layers, units))
        ds = xr.Dataset(variables, coords=coords)
        if not inputs.multi and inputs.layer is not None:
            ds = ds.assign_coords(layer=inputs.layer)
        # What was trained, read back by sweeps over the sparsity and by the dashboards (visualizers see no
        # step options): with samples = "positions" every position of a map was a row.
        strength = {"l1": float(self.l1)} if self.sparsity == "l1" else {"k": int(self.k)}
        return ds.assign_coords(sparsity=self.sparsity, seed=int(self.seed), samples=self.samples, **strength)


def _pair_relative_norm(norms: np.ndarray, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """``(latents, pairs)``: ``||d^b|| / (||d^a|| + ||d^b||)`` for every pair ``(a, b)`` of model indices.

    NaN where both norms are zero. Unlike ``relative_norm`` it ignores the other
    models, so it shows how two models split a latent between them.
    """
    norms = np.asarray(norms, dtype=float)
    if not len(pairs):
        return np.zeros((len(norms), 0))
    a = norms[:, [i for i, _ in pairs]]
    b = norms[:, [j for _, j in pairs]]
    total = a + b
    return np.divide(b, total, out=np.full_like(total, np.nan), where=total > 0)


def _take(rows: np.ndarray, index: np.ndarray) -> np.ndarray:
    return rows[index]


def _finite(losses: Sequence[torch.Tensor]) -> bool:
    return bool(torch.isfinite(torch.stack(list(losses))).all())


def _device_of(context: Context) -> tuple[torch.device, str]:
    """The step's device and precision; an unknown precision, or fp16 on the CPU, is a ConfigError."""
    device = torch.device(getattr(context, "device", "cpu"))
    precision = getattr(context, "precision", "fp32")
    try:
        autocast(device, precision)
    except ConfigError as exc:
        raise ConfigError(f"crosscoder: {exc.message}", where=exc.where) from exc
    return device, precision


def _merge_topk(
    values: torch.Tensor, samples: torch.Tensor, new: torch.Tensor, first: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a batch's ``(samples, latents)`` activations into the running ``(k, latents)`` top-k.

    ``first`` is the index of the batch's first sample; the top-k holds sample indices.
    Ties keep the earlier sample, so the result does not depend on the chunking. Only
    the batch's own top k join the merge, so it never holds more than ``(2 k, latents)``.
    """
    new = new + 0.0  # -0.0 becomes 0.0: equal values must tie whatever their sign
    order = torch.sort(new, dim=0, descending=True, stable=True)
    top = min(k, new.shape[0])
    candidates = torch.cat([values, order.values[:top]])
    indices = torch.cat([samples, order.indices[:top] + first])
    keep = torch.sort(candidates, dim=0, descending=True, stable=True).indices[:k]
    return candidates.gather(0, keep), indices.gather(0, keep)


def _save_checkpoint(
    path: Path,
    key: str,
    coder: _Coder,
    optimiser: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: dict,
) -> None:
    payload = {
        "format": _FORMAT,
        "key": key,
        "epoch": int(state["epoch"]),
        "loss_history": torch.tensor(state["loss_history"], dtype=torch.float64),
        "threshold": float(state["threshold"]),
        # Host tensors: a checkpoint written on one device resumes on another.
        "model": _on_host(coder.state_dict()),
        "optimiser": _on_host(optimiser.state_dict()),
    }
    if scaler.is_enabled():
        payload["scaler"] = scaler.state_dict()
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(path: Path, key: str) -> dict | None:
    """The checkpoint at ``path`` when it belongs to ``key``; ``None`` otherwise."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign or damaged file: train from scratch instead
        warnings.warn(f"crosscoder: ignoring the unreadable checkpoint {path}: {exc}", RuntimeWarning, stacklevel=3)
        return None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT or payload.get("key") != key:
        return None
    return payload


# ---------------------------------------------------------------------- ablation


def ablate_latents(
    result: xr.Dataset | xr.DataTree,
    activations: Mapping[str, Any],
    model: str,
    latents: str | Sequence[int] | np.ndarray,
    *,
    samples: str = "pooled",
) -> xr.DataArray | dict[str, xr.DataArray] | list[xr.DataArray]:
    """Remove chosen latents' decoded contribution from one model's activations.

    For every row, the fitted crosscoder's latent activations ``f(x)`` are computed as in
    the analysis (ReLU, then, for BatchTopK, only values with ``f_i * sum ||d_i|| >
    threshold`` fire) and ``sum_{i in latents} f_i(x) d_i^m / s_m`` is subtracted from
    model ``m``'s activations (``s_m`` its ``normalise`` scale), in the units they were
    recorded in. Only the directions of the chosen latents change: what the crosscoder
    does not explain (its error) and every other latent's contribution stay. This is
    how a class of latents, e.g. features shared by two models but not the third, is
    tested causally: finish the forward pass from the edited layer and compare.

    Parameters
    ----------
    result
        What :meth:`Crosscoder.fit` returned (or its result node): the fitted
        ``encoder``, ``encoder_bias``, ``decoder``, ``decoder_bias``, ``scale``,
        ``threshold`` and, to choose latents by class, ``latent_class``.
    activations
        The activations of *every* model the crosscoder read, as :meth:`Crosscoder.fit`
        takes them (model -> DataArray, or -> layers for a crosscoder over several
        layers), over the same samples: the encoder reads all models at once, so one
        model's activations do not determine ``f(x)``. They need not be the activations
        it was trained on.
    model
        The model whose activations are edited.
    latents
        Latent indices, a boolean mask over the latents, or a class label of
        ``latent_class`` (``"shared"``, ``"exclusive:a"``, ``"shared:a+b"``, ...).
    samples
        The crosscoder's ``samples`` option: with ``"positions"`` every position of a
        map is a row; with ``"pooled"`` a map's rows are its spatial means and the
        contribution, computed from the means, is removed at every position (the
        means then change by exactly that contribution).

    Returns
    -------
    xarray.DataArray, dict or list
        ``model``'s activations with the latents removed, float32, with the dims,
        coords and name of the input, in the form it was given (one DataArray, or its
        mapping or list of layers). They are held in memory (dask input is read).

    Raises
    ------
    mergescope.errors.ContractError
        (a ``ValueError``) the activations do not fit the result (other models,
        layers or unit counts; see :meth:`Crosscoder.fit` for the rest), an unknown
        ``model``, a latent index out of range, or a class no latent has.
    """
    ds = result.to_dataset() if isinstance(result, xr.DataTree) else result
    missing = [v for v in ("encoder", "encoder_bias", "decoder", "decoder_bias", "scale", "threshold") if v not in ds]
    if missing:
        raise ContractError(f"ablate_latents: the result holds no {missing}; give what Crosscoder.fit returned")
    models = [str(m) for m in ds["model"].values]
    if model not in models:
        raise ContractError(f"ablate_latents: model {model!r} is not one of the crosscoder's models {models}")
    unknown = sorted(set(map(str, activations)) - set(models))
    absent = [m for m in models if m not in {str(k) for k in activations}]
    if unknown or absent:
        raise ContractError(
            f"ablate_latents: the crosscoder read the models {models}; the activations "
            + (f"lack {absent}" if absent else f"also hold {unknown}")
            + " (the encoder reads every model's activations together)"
        )
    given = {str(k): v for k, v in activations.items()}
    if samples not in ("pooled", "positions"):
        raise ValueError(f"ablate_latents: samples must be 'pooled' or 'positions', got {samples!r}")
    inputs = _check_inputs({m: given[m] for m in models}, samples)
    if "source" in ds.dims:
        expected = [str(s) for s in ds["source"].values]
        named = inputs.source_names
    else:
        expected = models
        named = [m for m, _ in inputs.sources]
    units = [int(u) for u in np.atleast_1d(ds["units"].values)]
    if named != expected or inputs.units != units:
        got = ", ".join(f"{n}: {u}" for n, u in zip(named, inputs.units))
        want = ", ".join(f"{n}: {u}" for n, u in zip(expected, units))
        raise ContractError(f"ablate_latents: the crosscoder read ({want}) units, the activations give ({got})")
    chosen = _chosen_latents(ds, latents)
    editor = _LatentEditor(ds, torch.device("cpu"))
    mine = np.flatnonzero(inputs.owner == models.index(model))  # this model's sources
    offsets = np.cumsum([0, *units])
    removed = np.empty((inputs.rows, sum(units[s] for s in mine)), dtype=np.float32)
    for start, stop in _chunks(inputs, _EVAL_ROWS):
        rows = torch.from_numpy(inputs.read(start, stop))
        f = editor.latents([rows[:, offsets[s] : offsets[s + 1]] for s in range(len(units))], pooled=True)
        first = start * inputs.positions
        parts = [editor.contribution(f, chosen, s, (len(rows), units[s]), samples) for s in mine]
        removed[first : first + len(rows)] = torch.cat(parts, dim=1).numpy()
    out: list[xr.DataArray] = []  # this model's sources, in the order it gave them
    col = 0
    for s in mine:
        a, u = inputs.arrays[s], units[s]
        values = np.asarray(a.values, dtype=np.float32)
        part = removed[:, col : col + u]
        col += u
        if values.ndim == 4:
            n, _, y, x = values.shape
            # Pooled: the same vector at every position, so the mean moves by it. Positions:
            # one row per position, images contiguous (as _Inputs.gather lays them out).
            part = part[:, :, None, None] if inputs.pool else part.reshape(n, y, x, u).transpose(0, 3, 1, 2)
        elif values.ndim == 3:  # token maps, as spatial maps over their tokens
            n, _, t = values.shape
            part = part[:, :, None] if inputs.pool else part.reshape(n, t, u).transpose(0, 2, 1)
        out.append(a.copy(data=values - part))
    layers = [a for _, a in _layers_of(model, given[model])]
    out = [edited.transpose(*a.dims) for edited, a in zip(out, layers)]  # the dims as given
    if isinstance(given[model], xr.DataArray):
        return out[0]
    if isinstance(given[model], Mapping):
        return dict(zip(given[model], out))
    return out


class _LatentEditor:
    """A fitted crosscoder as torch tensors, source by source: the latents of activations, and chosen latents' share.

    The rules are the analysis's: ``f = ReLU((s x - b_dec) W_enc + b_enc)`` over the
    concatenated scaled activations, and for BatchTopK only values with
    ``f_i * sum_m ||d_i^m|| > threshold`` fire. Spatial maps are read as the crosscoder
    read them: every position a row (``samples = "positions"``) or the spatial mean.
    """

    def __init__(self, ds: xr.Dataset, device: torch.device) -> None:
        units = [int(u) for u in np.atleast_1d(ds["units"].values)]
        self.coder = _Coder(units, ds.sizes["latent"])
        with torch.no_grad():
            for name in ("encoder", "encoder_bias", "decoder", "decoder_bias"):
                getattr(self.coder, name).copy_(torch.as_tensor(np.asarray(ds[name].values, dtype=np.float32)))
        self.coder.requires_grad_(False).to(device)
        self.scale = [float(s) for s in np.atleast_1d(ds["scale"].values)]
        self.threshold = float(ds["threshold"])
        self.offsets = np.cumsum([0, *units])
        with torch.no_grad():
            self.weight = self.coder.decoder_norms().sum(dim=1)

    @staticmethod
    def rows(x: torch.Tensor, pooled: bool) -> torch.Tensor:
        """``(rows, units)`` of a captured ``(batch, units[, y, x])`` tensor, or of a token layer's
        ``(batch, tokens, units)``."""
        if x.ndim == 2:
            return x.float()
        if x.ndim == 3:
            return x.float().mean(dim=1) if pooled else x.float().reshape(-1, x.shape[2])
        if pooled:
            return x.float().mean(dim=(2, 3))
        return x.float().permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    def latents(self, captured: Sequence[torch.Tensor], pooled: bool) -> torch.Tensor:
        """The latents of every row of the sources' activations (one tensor per source, in the crosscoder's order)."""
        x = torch.cat([self.rows(c, pooled) * s for c, s in zip(captured, self.scale)], dim=1)
        f = self.coder.activations(x)
        if math.isfinite(self.threshold):  # BatchTopK's rule after training, as in the analysis
            f = f * (f * self.weight > self.threshold)
        return f

    def contribution(
        self, f: torch.Tensor, chosen: np.ndarray, source: int, shape: Sequence[int], samples: str
    ) -> torch.Tensor:
        """``sum_{i in chosen} f_i d_i^source / s_source``, shaped like the captured tensor (``shape``)."""
        block = self.coder.decoder[:, self.offsets[source] : self.offsets[source + 1]]
        index = torch.as_tensor(chosen, dtype=torch.long, device=f.device)
        part = (f[:, index] @ block[index]) / self.scale[source]
        if len(shape) == 2:
            return part
        if len(shape) == 3:  # a token layer, (batch, tokens, units) as the forward pass has it
            n, tokens, units = shape
            return part[:, None, :].expand(n, tokens, units) if samples == "pooled" else part.reshape(n, tokens, units)
        n, units, y, x = shape
        if samples == "pooled":  # the same vector at every position: the mean moves by it
            return part[:, :, None, None].expand(n, units, y, x)
        return part.reshape(n, y, x, units).permute(0, 3, 1, 2)


@attrs.frozen
class _Task:
    """Images of one task of the ablation, scored among the task's classes."""

    name: str
    data: Any
    columns: np.ndarray  # the task's classes: columns of the models' logits

    @property
    def size(self) -> int:
        return len(self.data)

    def hits(self, logits: torch.Tensor, target: np.ndarray) -> int:
        if logits.shape[1] <= int(self.columns.max()):
            raise ContractError(
                f"crosscoder ablation: task {self.name!r} needs the classes up to {int(self.columns.max())} but "
                f"a model outputs {logits.shape[1]} classes; give the models one head over every task's classes"
            )
        scores = logits.float()[:, torch.as_tensor(self.columns, device=logits.device)]
        predicted = self.columns[scores.argmax(dim=1).cpu().numpy()]
        return int((predicted == target).sum())


def _ablation_tasks(data: Any, names: Sequence[str] | None, limit: int | None) -> list[_Task]:
    """The tasks of an ablation: the parts of a ``concat`` ``[data]`` (or all of it), at most ``limit`` images each."""
    parts = data.part_names if hasattr(data, "part_classes") else None  # a concat's parts
    if parts is None:
        if names is not None:
            raise ConfigError(
                f"ablation_tasks = {list(names)} names parts of a concat [data], but [data] {data.name!r} is one "
                "dataset: leave ablation_tasks unset (one task) or make [data] a concat",
                where="key 'ablation_tasks'",
            )
        groups = [(str(data.name), np.arange(len(data)), np.arange(len(data.classes)))]
    else:
        wanted = list(parts) if names is None else list(names)
        for name in wanted:
            if name not in parts:
                raise ConfigError(
                    f"ablation_tasks names {name!r}, but the parts of [data] are {list(parts)}",
                    where="key 'ablation_tasks'",
                )
        part_name = np.asarray(data.part_name).astype(str)
        groups = [
            (
                name,
                np.flatnonzero(part_name == name),
                np.asarray(data.part_classes(name)),
            )
            for name in wanted
        ]
    tasks = []
    for name, items, columns in groups:
        if not len(items):
            raise ConfigError(f"the ablation task {name!r} has no images in [data]", where="key 'ablation_tasks'")
        if limit is not None and len(items) > limit:
            items = items[np.linspace(0, len(items) - 1, limit).round().astype(np.int64)]
        tasks.append(_Task(name, data.subset(items), columns))
    return tasks


def _capture(
    models: Mapping[str, nn.Module], layer: str, images: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every model's activations at ``layer`` (copies) and its logits, for one batch, in the order of ``models``."""
    captured: list[torch.Tensor] = []
    logits = []
    for name, model in models.items():
        sink: list[torch.Tensor] = []
        handles = attach_recorders(model, [layer], lambda _layer, t, _s=sink: _s.append(t.detach().clone()), name)
        try:
            logits.append(model(images))
        finally:
            for handle in handles:
                handle.remove()
        if len(sink) != 1:
            raise ContractError(
                f"crosscoder ablation: layer {layer!r} of model {name!r} ran {len(sink)} times in one forward "
                "pass; only a layer that runs once can be edited"
            )
        captured.append(sink[0])
    return captured, logits


def _forward_edited(
    model: nn.Module, place: tuple[nn.Module, bool], images: torch.Tensor, edited: torch.Tensor
) -> torch.Tensor:
    """The model's logits with its activations at ``place`` (module, whether its input) replaced by ``edited``."""
    module, records_input = place
    if records_input:
        handle = module.register_forward_pre_hook(lambda m, args: (restore_layout(m, edited, args[0]), *args[1:]))
    else:
        handle = module.register_forward_hook(lambda m, _i, out: restore_layout(m, edited, out))
    try:
        return model(images)
    finally:
        handle.remove()


def _chosen_latents(ds: xr.Dataset, latents: str | Sequence[int] | np.ndarray) -> np.ndarray:
    """Indices of the latents named by indices, a boolean mask or a class label."""
    n = ds.sizes["latent"]
    if isinstance(latents, str):
        if "latent_class" not in ds:
            raise ContractError("ablate_latents: the result has no 'latent_class' to choose latents by class")
        classes = np.asarray(ds["latent_class"].values).astype(str)
        chosen = np.flatnonzero(classes == latents)
        if not len(chosen):
            raise ContractError(
                f"ablate_latents: no latent has the class {latents!r}; the classes are {sorted(set(classes))}"
            )
        return chosen
    index = np.asarray(latents)
    if index.dtype == bool:
        if index.shape != (n,):
            raise ContractError(f"ablate_latents: a mask of latents needs {n} values, got shape {index.shape}")
        return np.flatnonzero(index)
    index = index.astype(np.int64).ravel()
    bad = index[(index < 0) | (index >= n)]
    if len(bad):
        raise ContractError(f"ablate_latents: latent {int(bad[0])} is out of range; the crosscoder has {n} latents")
    return np.unique(index)


# -------------------------------------------------------------------- visualizer


def _even_bins(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 2 and value % 2 == 0


def _crosscoder_nodes(results: xr.DataTree) -> list[tuple[str, xr.Dataset]]:
    found = []
    for node in results.subtree:
        ds = node.to_dataset(inherit=False)
        if "relative_norm" in ds.data_vars and "model" in ds.dims:
            found.append((node.path.strip("/").replace("/", "-") or "root", ds))
    return found


@attrs.define
class CrosscoderPlots:
    """Plot every crosscoder result of the run: relative norms, cosines, classes and densities.

    For every result node holding ``relative_norm`` (a ``crosscoder`` step's layer),
    writes PNG files named after the node's path: ``<node>-relative-norm.png``
    (histogram of ``r_B`` for two models, one histogram per model for more),
    ``<node>-ternary.png`` (three models: every latent's relative norms on a
    triangle, coloured by class), ``<node>-pair-relative-norm.png`` (three models or
    more: for every pair ``a~b``, a histogram of ``||d^b|| / (||d^a|| + ||d^b||)``; for
    two models ``relative-norm`` is that histogram), ``<node>-cosine.png`` (decoder
    cosine similarity per pair of models of equal width), ``<node>-classes.png`` (latents per class),
    ``<node>-density.png`` (log10 density of shared and exclusive latents) and, for a
    crosscoder over several layers, ``<node>-layers.png`` (for every model, its latents
    by the layer holding most of their decoder norm in that model).
    Dead latents are left out of every plot but the class counts.

    With ``dashboard`` (and data), the latent dashboards of
    :mod:`mergescope_plugins.latent_dashboard` besides: one sheet per latent of its top
    images, ``<node>/latent-<NNNNN>.png`` (with heatmaps of where it fires when the step
    names the crosscoder's models and their layer is spatial: one forward pass over the
    top images only), its activation histograms (one pass over the run's recordings),
    and ``latent-dashboard.nc`` indexing them. The report shows every crosscoder result
    as a sortable, filterable table of its latents beside the chosen latent's numbers,
    decoder-norm bars, histograms and images (:meth:`report_panel`).

    Parameters
    ----------
    bins
        Histogram bins of the plots.
    dpi
        Resolution of the PNG files.
    dashboard
        Draw the latent dashboards' images and histograms (the report's table of
        latents needs neither).
    tile
        Side of one image in a latent's sheet, in pixels.
    histogram_bins
        Bins of every latent's activation histogram (even: the histogram widens its
        range by merging bins pairwise).
    """

    name: ClassVar[str] = "crosscoder-plots"
    paper: ClassVar[str] = "Lindsey et al. 2024, Sparse crosscoders for cross-layer features and model diffing"

    bins: int = attrs.field(default=50, validator=positive_int)
    dpi: int = attrs.field(default=120, validator=positive_int)
    dashboard: bool = attrs.field(default=True, validator=boolean)
    tile: int = attrs.field(default=56, validator=positive_int)
    histogram_bins: int = attrs.field(default=32, validator=Check(_even_bins, "an even integer >= 2", "even integers"))

    def render(self, results: xr.DataTree, out_dir: Path, context: Context | None = None) -> list[Path]:
        """Draw every crosscoder result in ``results`` into ``out_dir``; nothing when there is none."""
        nodes = _crosscoder_nodes(results)
        if not nodes:
            return []
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        files: list[Path] = []
        for label, ds in nodes:
            for suffix, draw in (
                ("relative-norm", self._relative),
                ("ternary", self._ternary),
                ("pair-relative-norm", self._pair_relative),
                ("cosine", self._cosine),
                ("classes", self._classes),
                ("density", self._density),
                ("layers", self._layers),
            ):
                fig = draw(plt, ds, label)
                if fig is None:
                    continue
                path = out_dir / f"{label}-{suffix}.png"
                fig.tight_layout()
                fig.savefig(path, dpi=self.dpi)
                plt.close(fig)
                files.append(path)
        if self.dashboard:
            files += write_dashboards(results, out_dir, context, tile=self.tile, bins=self.histogram_bins)
        return files

    def report_panel(
        self, node: xr.Dataset, files: list[Path], run_dir: Path, *, results: xr.DataTree | None = None
    ) -> Panel | str:
        """The step's panel: a latent dashboard per crosscoder result, then the plots and other files."""
        return dashboard_panel(node, files, run_dir, results)

    @staticmethod
    def _alive(ds: xr.Dataset) -> np.ndarray:
        return ~np.asarray(ds["dead"].values, dtype=bool) if "dead" in ds else np.ones(ds.sizes["latent"], bool)

    def _relative(self, plt: Any, ds: xr.Dataset, label: str) -> Any:
        models = [str(m) for m in ds["model"].values]
        r = np.asarray(ds["relative_norm"].values)[self._alive(ds)]
        if len(models) == 2:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.hist(r[:, 1], bins=self.bins, range=(0, 1), color="tab:blue")
            ax.set(
                xlabel=f"relative decoder norm of {models[1]} (0: only {models[0]}, 1: only {models[1]})",
                ylabel="latents",
            )
        else:
            fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.4), sharey=True)
            for ax, m, col in zip(axes, models, r.T):
                ax.hist(col, bins=self.bins, range=(0, 1), color="tab:blue")
                ax.set(xlabel=f"relative norm of {m}", title=m)
            axes[0].set_ylabel("latents")
        fig.suptitle(f"{label}: relative decoder norms")
        return fig

    def _pair_relative(self, plt: Any, ds: xr.Dataset, label: str) -> Any:
        models = [str(m) for m in ds["model"].values]
        if len(models) < 3:
            return None
        if "pair_relative_norm" in ds:
            r = np.asarray(ds["pair_relative_norm"].values)
            names = [str(p) for p in ds["pair"].values]
        else:  # a result written before the variable existed: the same from the decoder norms
            pairs = list(itertools.combinations(range(len(models)), 2))
            r = _pair_relative_norm(np.asarray(ds["decoder_norm"].values), pairs)
            names = [f"{models[a]}~{models[b]}" for a, b in pairs]
        r = r[self._alive(ds)]
        cols = min(len(names), 3)
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False, sharey=True)
        for ax, name, col in zip(axes.flat, names, r.T):
            a, b = name.split("~", 1)
            ax.hist(col[np.isfinite(col)], bins=self.bins, range=(0, 1), color="tab:blue")
            ax.set(xlabel=f"0: only {a}, 1: only {b}", title=name)
        for ax in axes.flat[len(names) :]:
            ax.axis("off")
        for ax in axes[:, 0]:
            ax.set_ylabel("latents")
        fig.suptitle(f"{label}: relative decoder norms per pair of models")
        return fig

    def _ternary(self, plt: Any, ds: xr.Dataset, label: str) -> Any:
        models = [str(m) for m in ds["model"].values]
        if len(models) != 3:
            return None
        alive = self._alive(ds)
        r = np.asarray(ds["relative_norm"].values)[alive]
        classes = np.asarray(ds["latent_class"].values).astype(str)[alive]
        corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
        xy = r @ corners  # barycentric -> plane
        fig, ax = plt.subplots(figsize=(6, 5.4))
        ax.plot(*np.vstack([corners, corners[:1]]).T, color="0.4", lw=1)
        for name, corner in zip(models, corners):
            ax.annotate(name, corner, textcoords="offset points", xytext=(0, -14 if corner[1] == 0 else 6), ha="center")
        for c in sorted(set(classes)):
            sel = classes == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=10, alpha=0.7, label=f"{c} ({sel.sum()})")
        ax.set_aspect("equal")
        ax.axis("off")
        ax.legend(fontsize="small", loc="upper right", bbox_to_anchor=(1.05, 1.0))
        ax.set_title(f"{label}: relative decoder norms of 3 models")
        return fig

    def _cosine(self, plt: Any, ds: xr.Dataset, label: str) -> Any:
        if "cosine" not in ds:
            return None
        alive = self._alive(ds)
        pairs = [(str(p), np.asarray(ds["cosine"].sel(pair=p).values)[alive]) for p in ds["pair"].values]
        pairs = [(p, v[np.isfinite(v)]) for p, v in pairs if np.isfinite(v).any()]
        if not pairs:
            return None
        fig, axes = plt.subplots(1, len(pairs), figsize=(3.6 * len(pairs), 3.4), squeeze=False, sharey=True)
        for ax, (p, v) in zip(axes[0], pairs):
            ax.hist(v, bins=self.bins, range=(-1, 1), color="tab:green")
            ax.set(xlabel="decoder cosine similarity", title=p)
        axes[0, 0].set_ylabel("latents")
        fig.suptitle(f"{label}: cosine similarity of decoder vectors")
        return fig

    def _classes(self, plt: Any, ds: xr.Dataset, label: str) -> Any:
        classes = np.asarray(ds["latent_class"].values).astype(str)
        names, counts = np.unique(classes, return_counts=True)
        order = sorted(range(len(names)), key=lambda i: class_order(names[i]))
        fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 4))
        bars = ax.bar([names[i] for i in order], [counts[i] for i in order], color="tab:purple")
        ax.bar_label(bars)
        ax.set(ylabel="latents", title=f"{label}: latents per class")
        ax.tick_params(axis="x", labelrotation=30)
        return fig

    def _density(self, plt: Any, ds: xr.Dataset, label: str) -> Any:
        if "density" not in ds:
            return None
        alive = self._alive(ds)
        density = np.asarray(ds["density"].values)[alive]
        classes = np.asarray(ds["latent_class"].values).astype(str)[alive]
        groups = {
            "shared": density[classes == "shared"],
            "exclusive": density[np.char.startswith(classes, "exclusive:")],
            "shared by a subset": density[np.char.startswith(classes, "shared:")],
        }
        groups = {k: v[v > 0] for k, v in groups.items() if (v > 0).any()}
        if not groups:
            return None
        logs = np.log10(np.concatenate(list(groups.values())))
        edges = np.linspace(logs.min() - 0.1, max(logs.max(), logs.min()) + 0.1, self.bins + 1)
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, v in groups.items():
            ax.hist(np.log10(v), bins=edges, alpha=0.6, density=True, label=f"{name} ({len(v)})")
        ax.set(xlabel="log10 density (fraction of rows where the latent fires)", ylabel="share of latents")
        ax.legend(fontsize="small")
        ax.set_title(f"{label}: feature density")
        return fig

    def _layers(self, plt: Any, ds: xr.Dataset, label: str) -> Any:
        if "source_norm" not in ds:
            return None
        models = [str(m) for m in ds["model"].values]
        owners = np.asarray(ds["source_model"].values).astype(str)
        layers = np.asarray(ds["source_layer"].values).astype(str)
        alive = self._alive(ds)
        norms = np.asarray(ds["source_norm"].values)[alive]
        model_norms = np.asarray(ds["decoder_norm"].values)[alive]
        fig, axes = plt.subplots(1, len(models), figsize=(3.4 * len(models), 3.4), squeeze=False)
        for ax, (m, model) in zip(axes[0], enumerate(models)):
            mine = np.flatnonzero(owners == model)
            # Latents this model holds at all (a dropped decoder is clamped to ~1e-10).
            used = model_norms[:, m] > 1e-6
            top = np.argmax(norms[used][:, mine], axis=1) if used.any() else np.zeros(0, dtype=int)
            counts = np.bincount(top, minlength=len(mine))
            bars = ax.bar(layers[mine], counts, color="tab:orange")
            ax.bar_label(bars)
            ax.set(title=model, xlabel="layer with the largest decoder norm")
            ax.tick_params(axis="x", labelrotation=30)
        axes[0, 0].set_ylabel("latents")
        fig.suptitle(f"{label}: where each model's latents live")
        return fig


@hookimpl
def register_differs(register):
    """Register :class:`Crosscoder`."""
    register(Crosscoder)


@hookimpl
def register_visualizers(register):
    """Register :class:`CrosscoderPlots`."""
    register(CrosscoderPlots)
