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
it as shared by all models, exclusive to one, or shared by a subset.

``sparsity = "batchtopk"`` (Bussmann et al. 2024; for crosscoders Minder et al. 2025)
drops the L1 term, whose shrinkage can create spurious exclusive latents: every batch
keeps its ``k * batch`` largest values of ``f_i * sum_m ||d_i^m||`` and zeroes the rest;
after training, a latent fires when that value exceeds a threshold estimated during
training (the mean over the last epoch's batches of the smallest value kept).

Training streams the activations chunk by chunk (they may be dask-backed, opened
lazily from netCDF), so memory does not grow with the dataset; it checkpoints to disk,
resumes an interrupted run, and stops cleanly when the loss diverges.
"""

from __future__ import annotations

import copy
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

from mergescope.components import Context
from mergescope.errors import ConfigError, ContractError
from mergescope.hookspecs import hookimpl
from mergescope.storage import atomic_path
from mergescope.validators import (
    as_float,
    boolean,
    in_range,
    integer,
    non_negative,
    one_of,
    positive,
    positive_int,
    probability,
)

__all__ = ["Crosscoder", "CrosscoderPlots", "classify", "register_differs", "register_visualizers"]

log = logging.getLogger(__name__)

# Bump when the checkpoint contents or the training procedure change: old checkpoints
# are then not resumed.
_FORMAT = 1
_CHECKPOINT = "checkpoint.pt"
# Rows per forward pass in the analysis pass (bounds the (rows, latents) buffers).
_EVAL_ROWS = 2048
# Fraction of the steps at the end over which the learning rate decays linearly to 0.
_LR_DECAY = 0.2

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


def _class_order(label: str) -> tuple[int, str]:
    """Shared first, then subsets, exclusive, and dead last."""
    rank = {"shared": 0, "dead": 4, "none": 3}.get(label, 1 if label.startswith("shared:") else 2)
    return rank, label


# ------------------------------------------------------------------------- inputs


@attrs.define
class _Inputs:
    """The activations of every model, checked, as readers of row chunks."""

    models: list[str]
    arrays: list[xr.DataArray]  # dims ("sample", "unit"[, "y", "x"])
    units: list[int]
    sample_ids: np.ndarray
    layers: list[str | None]  # each model's scalar 'layer' coord
    positions: int  # rows per sample: 1 when pooled, y * x for positions
    pool: bool  # maps averaged over space into one row per sample
    _whole: np.ndarray | None = attrs.field(default=None, init=False, repr=False)

    @property
    def samples(self) -> int:
        return len(self.sample_ids)

    @property
    def rows(self) -> int:
        return self.samples * self.positions

    @property
    def layer(self) -> str | None:
        """The layer of the first model that names one."""
        return next((layer for layer in self.layers if layer is not None), None)

    def where(self, model: str) -> str:
        layer = self.layers[self.models.index(model)]
        return f"model {model!r}" + (f" at layer {layer!r}" if layer is not None else " (no 'layer' coord)")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows of samples ``start:stop``, every model's units side by side: ``(rows, sum of units)`` float32."""
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
            if a.chunks is not None:
                # Every dask computation has a fixed cost: one per model for all the ranges.
                parts = [a.data[start:stop] for start, stop in ranges]
                values = (parts[0] if len(parts) == 1 else _dask_concatenate(parts)).compute()
            else:
                parts = [a.isel(sample=slice(start, stop)).values for start, stop in ranges]
                values = parts[0] if len(parts) == 1 else np.concatenate(parts)
            values = np.asarray(values, dtype=np.float32)
            if values.ndim == 4:
                if self.pool:
                    values = values.mean(axis=(2, 3), dtype=np.float32)
                else:  # every spatial position is a row, images stay contiguous
                    values = values.transpose(0, 2, 3, 1).reshape(-1, units)
            out[:, offset : offset + units] = values
            offset += units
            del values  # one model's block at a time besides the output
        return out


def _dask_concatenate(arrays: Sequence[Any]) -> Any:
    import dask.array

    return dask.array.concatenate(arrays, axis=0)


def _check_inputs(activations: Mapping[str, xr.DataArray], samples: str) -> _Inputs:
    if not isinstance(activations, Mapping) or len(activations) < 2:
        got = len(activations) if isinstance(activations, Mapping) else type(activations).__name__
        raise ContractError(f"crosscoder: needs the activations of at least 2 models, got {got}")
    models = [str(m) for m in activations]
    arrays, layers = [], []
    for name, a in activations.items():
        if not isinstance(a, xr.DataArray):
            raise ContractError(
                f"crosscoder: activations of model {name!r} must be an xarray.DataArray, got {type(a).__name__}"
            )
        has_layer = "layer" in a.coords and a.coords["layer"].ndim == 0
        layers.append(str(a.coords["layer"].values) if has_layer else None)
        dims = set(a.dims)
        if dims not in ({"sample", "unit"}, {"sample", "unit", "y", "x"}):
            raise ContractError(
                f"crosscoder: activations of model {name!r} have dims {a.dims}; expected ('sample', 'unit') "
                "or ('sample', 'unit', 'y', 'x')"
            )
        arrays.append(a.transpose("sample", "unit", *(("y", "x") if "y" in dims else ())))
    n = arrays[0].sizes["sample"]
    for name, a in zip(models, arrays):
        if a.sizes["sample"] != n:
            raise ContractError(
                f"crosscoder: model {models[0]!r} has {n} samples but {name!r} has {a.sizes['sample']}; "
                "every model must be recorded on the same samples"
            )
    ids = np.asarray(arrays[0]["sample"].values) if "sample" in arrays[0].coords else np.arange(n)
    for name, a in zip(models[1:], arrays[1:]):
        other = np.asarray(a["sample"].values) if "sample" in a.coords else np.arange(n)
        differ = int(np.count_nonzero(ids != other))
        if differ:
            raise ContractError(
                f"crosscoder: the 'sample' coords of {models[0]!r} and {name!r} differ at {differ} of {n} positions; "
                "every model must be recorded on the same samples in the same order"
            )
    if n == 0:
        raise ContractError("crosscoder: the activations hold no samples")
    maps = ["y" in a.dims for a in arrays]
    positions = 1
    if samples == "positions":
        if not all(maps):
            flat = [m for m, is_map in zip(models, maps) if not is_map]
            raise ContractError(
                f"crosscoder: samples = 'positions' needs spatial maps (sample, unit, y, x), but {flat} hold "
                "channel summaries (sample, unit); record with reduce = 'none' or use samples = 'pooled'"
            )
        shapes = {(a.sizes["y"], a.sizes["x"]) for a in arrays}
        if len(shapes) != 1:
            raise ContractError(
                f"crosscoder: samples = 'positions' needs maps of one spatial size in every model, got {sorted(shapes)}"
            )
        y, x = shapes.pop()
        positions = y * x
    units = [a.sizes["unit"] for a in arrays]
    return _Inputs(models, arrays, units, ids, layers, positions, pool=samples == "pooled")


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
    scale: np.ndarray  # (models,)
    mean: np.ndarray  # (sum of units,) of the scaled rows


def _survey(inputs: _Inputs, chunks: Sequence[tuple[int, int]], context: Context) -> _Survey:
    """Check for NaN, hash the contents and measure each model's scale, in one pass."""
    h = hashlib.sha256()
    h.update(json.dumps([inputs.models, inputs.units, inputs.positions, inputs.pool]).encode())
    h.update(np.ascontiguousarray(inputs.sample_ids).tobytes())
    sq = np.zeros(len(inputs.models))
    sums = [np.zeros(u) for u in inputs.units]
    offsets = np.cumsum([0, *inputs.units])
    for start, stop in context.progress(chunks, desc="crosscoder: reading activations", total=len(chunks)):
        rows = inputs.read(start, stop)
        h.update(memoryview(rows).cast("B"))
        for m in range(len(inputs.models)):
            values = rows[:, offsets[m] : offsets[m + 1]]
            if not np.isfinite(values).all():
                bad = ~np.isfinite(values).all(axis=1)
                first = inputs.sample_ids[start + int(np.argmax(bad)) // inputs.positions].item()
                what = "NaN" if np.isnan(values).any() else "infinite values"
                raise ContractError(
                    f"crosscoder: the activations of {inputs.where(inputs.models[m])} contain {what} "
                    f"(first at sample {first!r})"
                )
            sq[m] += float(np.einsum("ij,ij->", values, values, dtype=np.float64))
            sums[m] += values.sum(axis=0, dtype=np.float64)
        del rows, values  # before the next chunk is read
    rows = inputs.rows
    mean_sq = sq / rows
    units = np.asarray(inputs.units, dtype=float)
    scale = np.where(mean_sq > 0, np.sqrt(units / np.where(mean_sq > 0, mean_sq, 1.0)), 1.0)
    mean = np.concatenate([s / rows * c for s, c in zip(sums, scale)])
    return _Survey(h.hexdigest(), scale, mean)


# -------------------------------------------------------------------------- model


class _Coder(nn.Module):
    """Shared encoder over the concatenated inputs, one decoder block per model."""

    def __init__(self, units: Sequence[int], latents: int) -> None:
        super().__init__()
        width = int(sum(units))
        self.encoder = nn.Parameter(torch.empty(width, latents))
        self.encoder_bias = nn.Parameter(torch.zeros(latents))
        self.decoder = nn.Parameter(torch.empty(latents, width))
        self.decoder_bias = nn.Parameter(torch.zeros(width))
        member = torch.zeros(width, len(units))
        offsets = np.cumsum([0, *units])
        for m in range(len(units)):
            member[offsets[m] : offsets[m + 1], m] = 1.0
        self.register_buffer("membership", member)

    def decoder_norms(self) -> torch.Tensor:
        """``(latents, models)``: norm of each latent's decoder vector in each model."""
        # clamp: sqrt has an infinite gradient at 0 (a decoder block exactly zero).
        return ((self.decoder**2) @ self.membership).clamp_min(1e-20).sqrt()

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.decoder_bias) @ self.encoder + self.encoder_bias)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.decoder + self.decoder_bias


def _initialise(coder: _Coder, init: str, units: Sequence[int], norm: float, mean: np.ndarray, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    latents, width = coder.decoder.shape
    with torch.no_grad():
        if init == "transpose":
            # Random directions with a small norm in every model's block; the encoder
            # starts as the decoder's transpose (Anthropic's crosscoder setup).
            w = torch.randn(latents, width, generator=g)
            offsets = np.cumsum([0, *units])
            for m in range(len(units)):
                block = w[:, offsets[m] : offsets[m + 1]]
                block *= norm / block.norm(dim=1, keepdim=True).clamp_min(1e-12)
            coder.decoder.copy_(w)
            coder.encoder.copy_(w.T)
        else:  # PyTorch's default for nn.Linear weights
            coder.encoder.copy_((torch.rand(width, latents, generator=g) * 2 - 1) / math.sqrt(width))
            coder.decoder.copy_((torch.rand(latents, width, generator=g) * 2 - 1) / math.sqrt(latents))
        coder.encoder_bias.zero_()
        # Starting at the data mean spares the latents from learning it.
        coder.decoder_bias.copy_(torch.as_tensor(mean, dtype=torch.float32))


def _batchtopk(f: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, float | None]:
    """Keep the ``k * batch`` largest ``f * weight`` of the batch; also the smallest positive value kept."""
    score = f * weight
    keep = min(k * f.shape[0], score.numel())
    top = torch.topk(score.flatten(), keep, sorted=False)
    mask = torch.zeros(score.numel(), dtype=f.dtype).scatter_(0, top.indices, 1.0).view_as(f)
    kept = top.values.detach()
    positive = kept[kept > 0]
    return f * mask, (float(positive.min()) if positive.numel() else None)


# --------------------------------------------------------------------- component


@attrs.define
class Crosscoder:
    """Sparse crosscoder over N models' activations: shared, exclusive and subset-shared features.

    One shared encoder reads the concatenated activations of the N models at a layer;
    every model has its own decoder (models may have different unit counts). The loss
    is the summed squared reconstruction error of every model plus
    ``l1 * sum_i f_i * sum_m ||d_i^m||`` (or, with ``sparsity = "batchtopk"``, a
    batch-level top-k of ``f_i * sum_m ||d_i^m||`` and no L1 term).

    Latent classes use the relative decoder norm ``r_m = ||d^m|| / sum_n ||d^n||``
    (for two models ``r_A = ||d_A|| / (||d_A|| + ||d_B||)``): a model *uses* a latent
    when ``r_m >= exclusive_threshold``. A latent is ``"shared"`` when every model
    uses it, ``"exclusive:<m>"`` when only ``m`` does (every other model's relative
    norm is below the threshold), ``"shared:<a>+<b>"`` when more than one but not all
    do (models in input order), and ``"dead"`` when its density is at most
    ``dead_density`` (``"none"`` for a live latent whose decoder vectors are all
    zero, which has no relative norm).

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
        Mean number of active latents per row (``"batchtopk"`` only).
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
        averaged over space. ``"positions"``: every spatial position of a map is a row
        (the maps of all models must have one spatial size).
    normalise
        Scale each model's activations by one scalar so that their mean squared norm
        over the rows equals the model's unit count (the mean squared unit is 1), so no
        model dominates the loss by its scale. Decoder norms, FVU and the relative norms
        are measured in this normalised space.
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

    # Options that change the trained parameters (the checkpoint key); the others only
    # change the analysis of a trained crosscoder.
    _TRAINING: ClassVar[tuple[str, ...]] = (
        "dictionary_size", "sparsity", "l1", "l1_warmup", "k", "learning_rate", "epochs", "batch_size",
        "init", "decoder_init_norm", "seed", "samples", "normalise", "chunk_size",
    )  # fmt: skip

    # ------------------------------------------------------------------ public

    def check_activations(self, activations: Any) -> None:
        """Refuse, before anything is recorded, ``[activations]`` that cannot feed this crosscoder.

        ``samples = "positions"`` reads every spatial position of a map, which only
        recordings of full maps (``reduce = "none"``) hold.
        """
        if self.samples == "positions" and activations.reduce != "none":
            raise ConfigError(
                f"samples = 'positions' trains on every spatial position of a map, but [activations] "
                f"reduce = {activations.reduce!r} keeps one summary per channel and image; set reduce = 'none' "
                "in [activations] (or samples = 'pooled' here)",
                where="key 'samples'",
            )

    def fit(self, activations: Mapping[str, xr.DataArray], context: Context) -> xr.Dataset:
        """Train the crosscoder on the activations of N models at one layer and describe every latent.

        Parameters
        ----------
        activations
            Model name -> DataArray with dims ``("sample", "unit")`` or
            ``("sample", "unit", "y", "x")`` over the same samples (same ``sample``
            coord in the same order); may be dask-backed. Unit counts may differ. The
            scalar coord ``layer``, when present, names the layer in messages.
        context
            ``progress`` shows the training; checkpoints go to
            ``<workdir>/crosscoder/<key>/`` (the system temp directory when
            ``workdir`` is ``None``), keyed by the training options and a hash of
            the activations, and an interrupted fit resumes from the last one.

        Returns
        -------
        xarray.Dataset
            Dims ``latent``, ``model``, ``pair`` (``"a~b"`` for every pair of models),
            ``k`` (top samples), ``epoch`` and ``input`` (the concatenated units of all
            models; coords ``input_model``, ``input_unit``):

            - ``decoder_norm (latent, model)``, ``relative_norm (latent, model)``,
              ``latent_class (latent)`` (see the class docstring),
            - ``cosine (latent, pair)``: cosine similarity of a latent's decoder
              vectors in the two models (NaN when their unit counts differ; it
              compares unit j with unit j),
            - ``density (latent)``: fraction of rows where the latent fires (> 0),
            - ``dead (latent)``: ``density <= dead_density``,
            - ``fvu (model)``: fraction of variance unexplained,
              ``sum ||x - x'||^2 / sum ||x - mean(x)||^2`` over the rows,
            - ``l0``: mean number of active latents per row,
            - ``topk_sample (rank, latent)`` / ``topk_value (rank, latent)``: the samples
              (``sample`` coord values; in positions mode the image of the position)
              with the largest activation of each latent (maximum over an image's
              positions), largest first; a value of 0 means the latent did not fire,
            - ``loss_history (epoch)``: mean training loss of every epoch,
            - ``diverged``, ``epochs_trained``: whether training stopped on a
              non-finite loss and how many epochs the returned parameters had,
            - ``scale (model)``, ``units (model)``, ``threshold`` (BatchTopK; NaN
              for L1), ``encoder (input, latent)``, ``encoder_bias (latent)``,
              ``decoder (latent, input)``, ``decoder_bias (input)``: the fitted
              crosscoder, applied to ``scale``-multiplied activations.

        Raises
        ------
        mergescope.errors.ContractError
            (a ``ValueError``) fewer than 2 models, wrong dims, different samples,
            NaN or infinite activations (naming the model and layer).

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
        where = f" at layer {inputs.layer!r}" if inputs.layer is not None else ""
        if self.dictionary_size > inputs.rows:
            warnings.warn(
                f"crosscoder{where}: dictionary_size = {self.dictionary_size} latents for only {inputs.rows} "
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

    def describe(self, result: xr.Dataset) -> str:
        """One line: how many latents fall in each class, the FVU per model and L0."""
        classes = [str(c) for c in result["latent_class"].values]
        counts: dict[str, int] = {}
        for c in classes:
            counts[c] = counts.get(c, 0) + 1
        parts = [f"{counts[c]} {c}" for c in sorted(counts, key=_class_order)]
        fvu = ", ".join(f"{m} {float(v):.3f}" for m, v in zip(result["model"].values, result["fvu"].values))
        text = f"{len(classes)} latents: {', '.join(parts)}; FVU {fvu}; L0 {float(result['l0']):.1f}"
        if bool(result["diverged"]):
            text += f" (diverged: kept epoch {int(result['epochs_trained'])})"
        return text

    # ---------------------------------------------------------------- training

    def _key(self, survey: _Survey) -> str:
        unused = ("l1", "l1_warmup") if self.sparsity == "batchtopk" else ("k",)
        options = {k: getattr(self, k) for k in self._TRAINING if k not in unused}
        payload = json.dumps({"format": _FORMAT, "options": options, "data": survey.digest}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def _directory(self, context: Context, key: str) -> Path:
        root = context.workdir if context.workdir is not None else Path(tempfile.gettempdir()) / "mergescope-crosscoder"
        return Path(root) / "crosscoder" / key[:16]

    def _train(self, inputs: _Inputs, survey: _Survey, context: Context) -> dict:
        coder = _Coder(inputs.units, self.dictionary_size)
        _initialise(coder, self.init, inputs.units, self.decoder_init_norm, survey.mean, self.seed)
        optimiser = torch.optim.Adam(coder.parameters(), lr=self.learning_rate)
        key = self._key(survey)
        path = self._directory(context, key) / _CHECKPOINT
        steps_per_epoch = math.ceil(inputs.rows / self.batch_size)
        total_steps = steps_per_epoch * self.epochs
        state = {"epoch": 0, "loss_history": [], "threshold": float("nan"), "diverged": False}
        resumed = _load_checkpoint(path, key)
        if resumed is not None:
            coder.load_state_dict(resumed["model"])
            optimiser.load_state_dict(resumed["optimiser"])
            state.update(
                epoch=int(resumed["epoch"]),
                loss_history=[float(v) for v in resumed["loss_history"]],
                threshold=float(resumed["threshold"]),
            )
            log.info("crosscoder: resumed from %s after epoch %d", path, state["epoch"])
        good = (copy.deepcopy(coder.state_dict()), state["epoch"], list(state["loss_history"]), state["threshold"])
        scale = torch.as_tensor(np.repeat(survey.scale, inputs.units), dtype=torch.float32)
        epochs = range(state["epoch"] + 1, self.epochs + 1)
        where = f" at layer {inputs.layer!r}" if inputs.layer is not None else ""
        for epoch in context.progress(epochs, desc=f"crosscoder{where}: training", total=len(epochs)):
            losses, minima = [], []
            step = (epoch - 1) * steps_per_epoch
            bad = None
            for x in self._batches(inputs, epoch):
                x = torch.from_numpy(x) * scale
                self._schedule(optimiser, step, total_steps)
                f = coder.activations(x)
                norms = coder.decoder_norms().sum(dim=1)
                if self.sparsity == "batchtopk":
                    f, smallest = _batchtopk(f, norms, self.k)
                    if smallest is not None:
                        minima.append(smallest)
                    loss = ((coder.decode(f) - x) ** 2).sum(dim=1).mean()
                else:
                    coefficient = self.l1 * self._warmup(step, total_steps)
                    recon = ((coder.decode(f) - x) ** 2).sum(dim=1).mean()
                    loss = recon + coefficient * (f * norms).sum(dim=1).mean()
                value = float(loss.detach())
                step += 1
                if not math.isfinite(value):
                    bad = (value, step)
                    break
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                losses.append(value)
            if bad is None and not all(torch.isfinite(p).all() for p in coder.parameters()):
                bad = (float("nan"), step)
            if bad is not None:
                params, kept, history, threshold = good
                coder.load_state_dict(params)
                state.update(epoch=kept, loss_history=history, threshold=threshold, diverged=True)
                warnings.warn(
                    f"crosscoder{where}: the loss became {bad[0]} at epoch {epoch} (step {bad[1]}); training "
                    f"stopped and the parameters after epoch {kept} are kept (lower learning_rate?)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                break
            state["epoch"] = epoch
            state["loss_history"].append(float(np.mean(losses)))
            if minima:
                state["threshold"] = float(np.mean(minima))
            log.info("crosscoder%s: epoch %d/%d loss %.5g", where, epoch, self.epochs, state["loss_history"][-1])
            good = (copy.deepcopy(coder.state_dict()), epoch, list(state["loss_history"]), state["threshold"])
            if epoch % self.checkpoint_every == 0 or epoch == self.epochs:
                _save_checkpoint(path, key, coder, optimiser, state)
        state["coder"] = coder
        return state

    def _batches(self, inputs: _Inputs, epoch: int) -> Iterator[np.ndarray]:
        """Shuffled batches of concatenated rows, one chunk in memory at a time.

        Every epoch the samples are cut into contiguous blocks of about
        ``chunk_size / 8`` rows; each chunk reads 8 random blocks and shuffles their rows.
        The shuffle depends on ``(seed, epoch)`` only, so a resumed run sees the same batches.
        """
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
                yield rows[order[start : start + size]]
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
        coder: _Coder = state["coder"]
        models, units = inputs.models, inputs.units
        n_models, latents = len(models), self.dictionary_size
        offsets = np.cumsum([0, *units])
        scale = torch.as_tensor(np.repeat(survey.scale, units), dtype=torch.float32)
        threshold = state["threshold"] if self.sparsity == "batchtopk" else float("nan")
        fired = np.zeros(latents, dtype=np.int64)
        sse = np.zeros(n_models)
        sums = np.zeros(offsets[-1])
        squares = np.zeros(offsets[-1])
        k = min(self.topk, inputs.samples)
        best_values = np.zeros((latents, 0), dtype=np.float32)
        best_ids = np.zeros((latents, 0), dtype=inputs.sample_ids.dtype)
        with torch.no_grad():
            weight = coder.decoder_norms().sum(dim=1)
            for start, stop in context.progress(chunks, desc="crosscoder: analysing", total=len(chunks)):
                rows = inputs.read(start, stop)
                step = max(inputs.positions, _EVAL_ROWS // inputs.positions * inputs.positions)
                for i in range(0, len(rows), step):
                    x = torch.from_numpy(rows[i : i + step]) * scale
                    f = coder.activations(x)
                    if self.sparsity == "batchtopk":
                        f = f * (f * weight > threshold)
                    error = ((coder.decode(f) - x) ** 2).sum(dim=0, dtype=torch.float64)
                    sse += np.add.reduceat(error.numpy(), offsets[:-1])
                    fired += (f > 0).sum(dim=0).numpy()
                    sums += x.sum(dim=0, dtype=torch.float64).numpy()
                    squares += (x * x).sum(dim=0, dtype=torch.float64).numpy()
                    # Per sample: the largest activation over its positions.
                    per_sample = f.view(-1, inputs.positions, latents).amax(dim=1).numpy()
                    first = start + i // inputs.positions
                    ids = inputs.sample_ids[first : first + len(per_sample)]
                    best_values, best_ids = _merge_topk(best_values, best_ids, per_sample, ids, k)
                del rows  # before the next chunk is read
            norms = coder.decoder_norms().numpy().astype(np.float64)
            decoder = coder.decoder.detach().numpy().copy()
        rows_total = inputs.rows
        sst = np.add.reduceat(squares - sums**2 / rows_total, offsets[:-1])
        fvu = np.where(sst > 0, sse / np.where(sst > 0, sst, 1.0), np.nan)
        total = norms.sum(axis=1, keepdims=True)
        relative = np.divide(norms, total, out=np.full_like(norms, np.nan), where=total > 0)
        density = fired / rows_total
        dead = density <= self.dead_density
        labels = classify(relative, models, self.exclusive_threshold)
        labels = np.where(dead, "dead", labels)
        pairs = list(itertools.combinations(range(n_models), 2))
        cosine = np.full((latents, len(pairs)), np.nan)
        for j, (a, b) in enumerate(pairs):
            if units[a] == units[b]:
                da = decoder[:, offsets[a] : offsets[a + 1]].astype(np.float64)
                db = decoder[:, offsets[b] : offsets[b + 1]].astype(np.float64)
                cosine[:, j] = (da * db).sum(axis=1) / (norms[:, a] * norms[:, b])
        unit_coords = np.concatenate([np.asarray(arr["unit"].values) if "unit" in arr.coords else np.arange(u)
                                      for arr, u in zip(inputs.arrays, units)])  # fmt: skip
        history = np.asarray(state["loss_history"], dtype=float)
        ds = xr.Dataset(
            {
                "decoder_norm": (("latent", "model"), norms),
                "relative_norm": (("latent", "model"), relative),
                "latent_class": ("latent", labels.astype(str)),
                "cosine": (("latent", "pair"), cosine),
                "density": ("latent", density),
                "dead": ("latent", dead),
                "fvu": ("model", fvu),
                "l0": ((), float(fired.sum() / rows_total)),
                # (rank, latent), as top-k rows read them: top-k grids show each latent's images.
                "topk_sample": (("rank", "latent"), np.ascontiguousarray(best_ids.T)),
                "topk_value": (("rank", "latent"), np.ascontiguousarray(best_values.T.astype(np.float64))),
                "loss_history": ("epoch", history),
                "diverged": ((), bool(state["diverged"])),
                "epochs_trained": ((), int(state["epoch"])),
                "scale": ("model", survey.scale.astype(np.float64)),
                "units": ("model", np.asarray(units, dtype=np.int64)),
                "threshold": ((), float(threshold)),
                "encoder": (("input", "latent"), coder.encoder.detach().numpy().copy()),
                "encoder_bias": ("latent", coder.encoder_bias.detach().numpy().copy()),
                "decoder": (("latent", "input"), decoder),
                "decoder_bias": ("input", coder.decoder_bias.detach().numpy().copy()),
            },
            coords={
                "latent": np.arange(latents),
                "model": models,
                "pair": [f"{models[a]}~{models[b]}" for a, b in pairs],
                "rank": np.arange(k),
                "epoch": np.arange(1, len(history) + 1),
                "input_model": ("input", np.repeat(models, units)),
                "input_unit": ("input", unit_coords),
            },
        )
        if inputs.layer is not None:
            ds = ds.assign_coords(layer=inputs.layer)
        return ds


def _merge_topk(
    values: np.ndarray, ids: np.ndarray, new: np.ndarray, new_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge a chunk's ``(samples, latents)`` activations into the running ``(latents, k)`` top-k.

    Ties keep the earlier sample, so the result does not depend on the chunking.
    """
    cand = np.concatenate([values, new.T], axis=1)
    cand_ids = np.concatenate([ids, np.broadcast_to(new_ids, (new.shape[1], len(new_ids)))], axis=1)
    order = np.argsort(-cand, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cand, order, axis=1), np.take_along_axis(cand_ids, order, axis=1)


def _save_checkpoint(path: Path, key: str, coder: _Coder, optimiser: torch.optim.Optimizer, state: dict) -> None:
    payload = {
        "format": _FORMAT,
        "key": key,
        "epoch": int(state["epoch"]),
        "loss_history": torch.tensor(state["loss_history"], dtype=torch.float64),
        "threshold": float(state["threshold"]),
        "model": coder.state_dict(),
        "optimiser": optimiser.state_dict(),
    }
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


# -------------------------------------------------------------------- visualizer


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
    triangle, coloured by class), ``<node>-cosine.png`` (decoder cosine similarity
    per pair of models of equal width), ``<node>-classes.png`` (latents per class)
    and ``<node>-density.png`` (log10 density of shared and exclusive latents).
    Dead latents are left out of every plot but the class counts.

    Parameters
    ----------
    bins
        Histogram bins.
    dpi
        Resolution of the PNG files.
    """

    name: ClassVar[str] = "crosscoder-plots"
    paper: ClassVar[str] = "Lindsey et al. 2024, Sparse crosscoders for cross-layer features and model diffing"

    bins: int = attrs.field(default=50, validator=positive_int)
    dpi: int = attrs.field(default=120, validator=positive_int)

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
                ("cosine", self._cosine),
                ("classes", self._classes),
                ("density", self._density),
            ):
                fig = draw(plt, ds, label)
                if fig is None:
                    continue
                path = out_dir / f"{label}-{suffix}.png"
                fig.tight_layout()
                fig.savefig(path, dpi=self.dpi)
                plt.close(fig)
                files.append(path)
        return files

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
        order = sorted(range(len(names)), key=lambda i: _class_order(names[i]))
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


@hookimpl
def register_differs(register):
    """Register :class:`Crosscoder`."""
    register(Crosscoder)


@hookimpl
def register_visualizers(register):
    """Register :class:`CrosscoderPlots`."""
    register(CrosscoderPlots)
