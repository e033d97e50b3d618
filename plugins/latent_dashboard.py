"""Latent dashboards of a crosscoder: every latent in one table, and one latent at a time in detail.

A crosscoder (Lindsey et al. 2024; :mod:`mergescope_plugins.crosscoder`) explains the
activations of N models with one set of sparse latents. Its result describes every latent
by numbers (decoder norms, relative norms, cosines, density, top samples); the dashboard
puts them in a sortable, filterable table and shows, for the latent a reader picks, the
images it fires on most, where in those images it fires, how its activations are
distributed and how its decoder splits over the models (as Anthropic's feature dashboards
do for one model, and Lindsey et al. for crosscoders).

**What is drawn.** With ``x = [s_1 x^1, ..., s_N x^N]`` the scaled activations of the N
models (``s_m`` the crosscoder's ``scale``), ``b_dec`` / ``b_enc`` its biases and
``W_enc`` its encoder, every model's *part* of latent ``i``'s pre-activation is

.. code-block:: text

    e_i^m(x) = sum_{j in model m} (x_j - b_dec_j) W_enc[j, i]       so  u_i(x) = sum_m e_i^m(x) + b_enc_i

and the crosscoder's activation is ``f_i(x) = g(u_i(x))`` with ``g(u) = max(u, 0)`` (for
BatchTopK also set to 0 unless ``g(u) * sum_m ||d_i^m|| > threshold``). The dashboard
reads the latent on one model alone, ``a_i^m(x) = g(e_i^m(x) + b_enc_i)``: the latent's
activation when the other models' activations sit at their mean (``x_j = b_dec_j``), so
what model ``m``'s own activations make of it.

- **Activation histograms** (one pass over the recorded activations, in chunks): per
  latent, the distribution of ``f_i`` (row ``"all models"``) and of every ``a_i^m`` over
  the rows where it is positive, on one axis ``[0, high_i]`` shared by the rows. The
  histogram is streamed: ``high_i`` starts at the latent's largest activation (its top-1
  value) and doubles, merging bins pairwise, whenever a value exceeds it, so every count
  is exact after one pass and memory grows with the latents, not the data.
- **Top images and heatmaps**: the latent's top samples (the crosscoder's
  ``topk_sample``), one sprite sheet per latent. Where the layer is spatial and the step
  has the models, a forward pass over those images only (in batches) gives each model's
  map ``x^m_p`` at every position ``p``; each map is resized to the finest grid among the
  models (bilinear) and every position is encoded as a row: the sheet's first row shows
  ``f_i(x_p)``, then one row per model ``a_i^m(x_p)``, all drawn with
  :func:`mergescope.heatmaps.overlay`'s blend on one scale per latent. Since ``u_i`` is
  affine in ``x``, for a crosscoder of average-pooled rows the mean of ``u_i(x_p)`` over
  positions is the pooled row's pre-activation: the heatmap shows where the pooled
  activation comes from.
- **Decoder-norm bars**: ``||d_i^m||`` per model, from the result.

The table (latent, class, relative norm per model, cosine per pair, density, largest
activation) holds 10,000 latents without freezing the page: the data are one JSON blob of
typed columns (base64 little-endian arrays, decoded into typed arrays), the rows are
virtualised (only those in view are in the DOM), and a latent's sheet is an image loaded
when the latent is opened (``loading="lazy"``).

:func:`write_dashboards` draws the sheets and histograms into a visualizer's folder and
indexes them (``latent-dashboard.nc``, dims ``entry`` = one latent of one crosscoder
node, ``row``, ``bin``); :func:`dashboard_panel` builds the report panel from the run's
crosscoder results and that index. The panel's script and style are package data
(``templates/latent_dashboard.js`` and ``.css``), started through the report's
``mergescope.panel`` hook.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import html
import importlib.resources
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import attrs
import numpy as np
import torch
import xarray as xr
from torch import nn

from mergescope.activations import attach_recorders
from mergescope.components import Context
from mergescope.errors import MergescopeError
from mergescope.heatmaps import colourize
from mergescope.report import IMAGE_SUFFIXES, Panel, file_list, image_gallery
from mergescope.storage import load_tree
from mergescope_plugins.topk import display_images, safe_name

__all__ = [
    "INDEX_FILE",
    "JOINT",
    "crosscoder_nodes",
    "model_parts",
    "gate",
    "add_to_histogram",
    "latent_histograms",
    "position_activations",
    "overlay_tiles",
    "write_dashboards",
    "typed_column",
    "dashboard_data",
    "latent_dashboard",
    "dashboard_panel",
]

log = logging.getLogger("mergescope")

#: The index of the sheets and histograms, in the visualizer's folder.
INDEX_FILE = "latent-dashboard.nc"
#: The row of the latent's own activation (the other rows are the models alone).
JOINT = "all models"
# Latents drawn together: bounds the maps and tiles held at once.
_LATENT_BLOCK = 256
# Numbers in a (rows, latents) block of the histogram pass.
_BLOCK_VALUES = 4_000_000
# Positions x units gathered at once when encoding the maps of top images.
_GATHER_VALUES = 4_000_000
_PAPER = 255  # white gaps and empty tiles


# --------------------------------------------------------------------------- results


def crosscoder_nodes(results: xr.DataTree) -> list[tuple[str, xr.Dataset]]:
    """``(path, dataset)`` of every node of ``results`` holding one crosscoder's latents.

    A node counts when its ``relative_norm`` is on ``(latent, model)`` and it has
    ``latent_class``; a sweep's node with further dims is left out. The path has no
    leading slash (``"crosscoder/relu4"``).
    """
    found = []
    for node in results.subtree:
        ds = node.to_dataset(inherit=False)
        if "latent_class" in ds and "relative_norm" in ds and ds["relative_norm"].dims == ("latent", "model"):
            found.append((node.path.strip("/"), ds))
    return found


def _label(path: str) -> str:
    """A node's name in file names: its path with ``-`` for ``/`` (the crosscoder plots' prefix)."""
    return safe_name(path.replace("/", "-") or "root")


@attrs.frozen
class _Inputs:
    """How a crosscoder result reads its input: the sources in order and every column's model."""

    models: list[str]
    sources: list[tuple[str, str | None]]  # (model, layer) per source, in input order
    units: np.ndarray  # per source
    scale: np.ndarray  # per source
    owner: np.ndarray  # model index of every input column

    @property
    def multi(self) -> bool:
        return len(self.sources) != len(self.models)


def _inputs(ds: xr.Dataset) -> _Inputs:
    models = [str(m) for m in ds["model"].values]
    if "source" in ds.dims:
        sources = [(str(m), str(lay) or None) for m, lay in zip(ds["source_model"].values, ds["source_layer"].values)]
    else:
        layer = str(ds["layer"].values) if "layer" in ds.coords else None
        sources = [(m, layer) for m in models]
    units = np.asarray(ds["units"].values, dtype=np.int64)
    owner = np.repeat([models.index(m) for m, _ in sources], units)
    return _Inputs(models, sources, units, np.asarray(ds["scale"].values, dtype=np.float64), owner)


def _gate_weight(ds: xr.Dataset) -> np.ndarray:
    """``sum_m ||d_i^m||`` over every decoder block: what BatchTopK's threshold is compared against."""
    norms = ds["source_norm"] if "source_norm" in ds else ds["decoder_norm"]
    return np.asarray(norms.values, dtype=np.float64).sum(axis=1)


def _threshold(ds: xr.Dataset) -> float:
    return float(ds["threshold"].values) if "threshold" in ds else float("nan")


# --------------------------------------------------------------------------- the math


def model_parts(
    x: np.ndarray,
    encoder: np.ndarray,
    decoder_bias: np.ndarray,
    owner: np.ndarray,
    models: int,
    latents: np.ndarray | None = None,
) -> np.ndarray:
    """Every model's part of the latents' pre-activations, ``e_i^m(x) = sum_{j in m} (x_j - b_dec_j) W_enc[j, i]``.

    Parameters
    ----------
    x
        ``(rows, inputs)``: rows of the scaled, concatenated activations of all models.
    encoder
        ``(inputs, latents)``, the crosscoder's ``encoder``.
    decoder_bias
        ``(inputs,)``, its ``decoder_bias``.
    owner
        ``(inputs,)``: the model index of every input column.
    models
        The number of models.
    latents
        ``(rows,)``: one latent per row, whose part only is computed (the maps of top
        images, each for its own latent); default: every latent for every row.

    Returns
    -------
    numpy.ndarray
        ``(models, rows, latents)`` float32, or ``(models, rows)`` with ``latents``.
        Summed over models and added to ``encoder_bias``, it is the pre-activation.
    """
    centred = np.asarray(x, dtype=np.float32) - np.asarray(decoder_bias, dtype=np.float32)
    encoder = np.asarray(encoder, dtype=np.float32)
    owner = np.asarray(owner)
    parts = []
    for m in range(models):
        columns = np.flatnonzero(owner == m)
        if latents is None:
            parts.append(centred[:, columns] @ encoder[columns])
        else:
            # Each row meets its own latent's encoder column: a row-wise dot product.
            parts.append(np.einsum("rj,rj->r", centred[:, columns], encoder[columns][:, latents].T))
    return np.stack(parts)


def gate(pre: np.ndarray, weight: np.ndarray | None = None, threshold: float = float("nan")) -> np.ndarray:
    """The crosscoder's activation of pre-activations: ``g(u) = max(u, 0)``, gated by BatchTopK's threshold.

    Parameters
    ----------
    pre
        Pre-activations, latents (or each value's latent) on the last axis.
    weight
        ``sum_m ||d_i^m||`` broadcastable to ``pre`` (BatchTopK only).
    threshold
        BatchTopK's threshold: a value stays only where ``g(u) * weight > threshold``;
        NaN (an L1 crosscoder): no gate.
    """
    f = np.maximum(pre, 0)
    if np.isfinite(threshold):
        if weight is None:
            raise ValueError("a BatchTopK threshold needs the latents' decoder-norm weight")
        f = np.where(f * weight > threshold, f, 0)
    return f


def add_to_histogram(counts: np.ndarray, high: np.ndarray, values: np.ndarray) -> None:
    """Count positive ``values`` into a per-latent histogram on ``[0, high]`` whose range doubles as needed.

    Bin ``b`` of latent ``i`` holds the values in ``[b h_i / B, (b + 1) h_i / B)`` (the
    last bin includes ``h_i``). A latent whose chunk holds a value above ``h_i`` first
    doubles ``h_i`` and merges its bins pairwise (``B`` is even), as often as needed, so
    the counts stay exact whatever order the values come in. Values ``<= 0`` are not
    counted (the rows where the latent does not fire).

    Parameters
    ----------
    counts
        ``(latents, rows, bins)`` integers, updated in place.
    high
        ``(latents,)`` positive upper ends, updated in place.
    values
        ``(n, rows, latents)``: ``n`` values of every histogram row and latent.
    """
    latents, rows, bins = counts.shape
    if bins % 2:
        raise ValueError(f"the histogram needs an even number of bins, got {bins}")
    if not len(values):
        return
    top = values.max(axis=(0, 1))
    while True:
        grow = np.flatnonzero(top > high)
        if not len(grow):
            break
        merged = counts[grow, :, 0::2] + counts[grow, :, 1::2]
        counts[grow] = 0
        counts[grow, :, : bins // 2] = merged
        high[grow] *= 2
    n, r, i = np.nonzero(values > 0)
    b = np.minimum((values[n, r, i] / high[i] * bins).astype(np.int64), bins - 1)
    flat = (i * rows + r) * bins + b
    counts += np.bincount(flat, minlength=latents * rows * bins).reshape(counts.shape).astype(counts.dtype)


def latent_histograms(
    ds: xr.Dataset,
    read: Callable[[int, int], np.ndarray],
    items: int,
    bins: int,
    progress: Callable[[Any, str, int], Any] | None = None,
    rows_per_item: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Histograms of ``f_i`` and every ``a_i^m`` over the rows where they fire, in one pass.

    Parameters
    ----------
    ds
        A crosscoder result (``encoder``, ``encoder_bias``, ``decoder_bias``, ``scale``,
        ``units``, ``topk_value``; for BatchTopK ``threshold`` and the decoder norms).
    read
        ``read(start, stop)`` -> ``(rows, inputs)``: the crosscoder's input rows (the
        scaled, concatenated activations of all models) of items ``start`` to ``stop``
        (samples; ``rows_per_item`` rows each).
    items
        How many items there are.
    bins
        Bins per histogram (even).
    progress
        ``progress(iterable, desc, total)``.
    rows_per_item
        Rows of one item: 1 for pooled samples, the positions of a map when every
        position is a row.

    Returns
    -------
    tuple of numpy.ndarray
        ``counts (latents, 1 + models, bins)`` (row 0: ``f_i``, then ``a_i^m`` in model
        order) and ``high (latents,)``, the upper end of every latent's axis.
    """
    inputs = _inputs(ds)
    n_models = len(inputs.models)
    encoder = np.asarray(ds["encoder"].values, dtype=np.float32)
    latents = encoder.shape[1]
    bias = np.asarray(ds["encoder_bias"].values, dtype=np.float32)
    weight, threshold = _gate_weight(ds), _threshold(ds)
    top = np.asarray(ds["topk_value"].values, dtype=np.float64)
    high = top.max(axis=0) if top.size else np.zeros(latents)
    high = np.where(np.isfinite(high) & (high > 0), high, 1.0)
    counts = np.zeros((latents, 1 + n_models, bins), dtype=np.int64)
    step = max(1, _BLOCK_VALUES // max(1, latents * (1 + n_models) * rows_per_item))
    starts = range(0, items, step)
    if progress is not None:
        starts = progress(starts, "latent dashboards: histograms", len(starts))
    for start in starts:
        x = read(start, min(start + step, items))
        parts = model_parts(x, encoder, ds["decoder_bias"].values, inputs.owner, n_models)
        values = np.empty((len(x), 1 + n_models, latents), dtype=np.float32)
        values[:, 0] = gate(parts.sum(axis=0) + bias, weight, threshold)
        for m in range(n_models):
            values[:, 1 + m] = gate(parts[m] + bias, weight, threshold)
        add_to_histogram(counts, high, values)
    return counts, high


def position_activations(
    maps: Sequence[np.ndarray], ds: xr.Dataset, latents: np.ndarray
) -> tuple[np.ndarray, tuple[int, int]]:
    """Every position of every map encoded for its own latent: ``f_i(x_p)`` and each ``a_i^m(x_p)``.

    Parameters
    ----------
    maps
        Per model, in the result's model order: ``(P, C_m, h_m, w_m)`` activation maps of
        ``P`` images, unscaled (as the model computes them). Maps of other sizes are
        resized to the finest grid among them (bilinear, ``align_corners=False``).
    ds
        The crosscoder result (one layer per model).
    latents
        ``(P,)``: the latent each image is encoded for.

    Returns
    -------
    tuple
        ``(P, 1 + models, h, w)`` float32 (``f_i``, then ``a_i^m`` in model order) and
        the grid ``(h, w)``.
    """
    inputs = _inputs(ds)
    n_models = len(inputs.models)
    h = max(int(m.shape[2]) for m in maps)
    w = max(int(m.shape[3]) for m in maps)
    resized = []
    for m, array in enumerate(maps):
        t = torch.as_tensor(np.asarray(array, dtype=np.float32))
        if tuple(t.shape[2:]) != (h, w):
            t = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
        resized.append(t.numpy() * np.float32(inputs.scale[m]))
    x = np.concatenate(resized, axis=1)  # (P, inputs, h, w)
    P = len(x)
    rows = x.transpose(0, 2, 3, 1).reshape(P * h * w, -1)
    each = np.repeat(np.asarray(latents, dtype=np.int64), h * w)
    parts = model_parts(rows, ds["encoder"].values, ds["decoder_bias"].values, inputs.owner, n_models, each)
    bias = np.asarray(ds["encoder_bias"].values, dtype=np.float32)[each]
    weight, threshold = _gate_weight(ds)[each], _threshold(ds)
    out = np.empty((1 + n_models, P * h * w), dtype=np.float32)
    out[0] = gate(parts.sum(axis=0) + bias, weight, threshold)
    for m in range(n_models):
        out[1 + m] = gate(parts[m] + bias, weight, threshold)
    return out.reshape(1 + n_models, P, h, w).transpose(1, 0, 2, 3), (h, w)


def _image_box(shape: tuple[int, int], tile: int) -> tuple[int, int, int, int]:
    """Where :func:`~mergescope_plugins.topk.display_images` puts an image of ``shape`` in its tile: top, left, h, w."""
    height, width = shape
    factor = tile / max(height, width)
    h, w = max(1, round(height * factor)), max(1, round(width * factor))
    return (tile - h) // 2, (tile - w) // 2, h, w


def overlay_tiles(
    tiles: np.ndarray,
    maps: np.ndarray,
    vmax: np.ndarray,
    box: tuple[int, int, int, int],
    *,
    alpha: float = 0.5,
    cmap: str = "inferno",
) -> np.ndarray:
    """Activation maps over image tiles, as :func:`mergescope.heatmaps.overlay` draws one, for many at once.

    ``out = (1 - alpha) * tile + alpha * cmap(clip(upsample(map), 0, vmax) / vmax)`` inside
    the image's box of the tile (the rest, letterboxing, is left as it is). The colour map
    is read from a table of 4096 levels in single precision (thousands of tiles are drawn
    per crosscoder), so a pixel may differ from ``overlay``'s by one 8-bit step.

    Parameters
    ----------
    tiles
        ``(n, tile, tile, 3)`` uint8.
    maps
        ``(n, h, w)`` finite maps, one per tile.
    vmax
        ``(n,)``: the value at the top of the colour map; a tile whose ``vmax`` is not
        positive gets the bottom colour (its map never fires).
    box
        ``(top, left, height, width)`` of the image inside a tile.
    alpha, cmap
        As in :func:`mergescope.heatmaps.overlay`.
    """
    top, left, h, w = box
    with torch.no_grad():
        resized = torch.nn.functional.interpolate(
            torch.as_tensor(np.asarray(maps, dtype=np.float32))[:, None], size=(h, w), mode="bilinear",
            align_corners=False,
        )[:, 0].numpy()  # fmt: skip
    vmax = np.asarray(vmax, dtype=np.float32)
    # Levels of the colour table: clip(a, 0, vmax) / vmax, and 0 where vmax is not positive.
    factor = np.where(vmax > 0, (_LEVELS - 1) / np.where(vmax > 0, vmax, 1), 0).astype(np.float32)
    resized *= factor[:, None, None]
    level = np.rint(np.clip(resized, 0, _LEVELS - 1, out=resized)).astype(np.intp)
    table = _colour_table(cmap) * np.float32(alpha * 255.0)
    out = tiles.copy()
    region = out[:, top : top + h, left : left + w].astype(np.float32)
    region *= np.float32(1.0 - alpha)
    region += table[level]
    # A blend of two values in [0, 255] stays in it.
    out[:, top : top + h, left : left + w] = np.rint(region, out=region).astype(np.uint8)
    return out


_LEVELS = 4096


@functools.cache
def _colour_table(cmap: str) -> np.ndarray:
    """``cmap`` at 4096 evenly spaced values in [0, 1], float32 RGB in [0, 1]."""
    return colourize(np.linspace(0.0, 1.0, _LEVELS), cmap).astype(np.float32)


# --------------------------------------------------------------------------- drawing


class _Capture:
    """The output of one layer of a model on a batch (a forward hook, removed on close)."""

    def __init__(self, model: nn.Module, layer: str, name: str) -> None:
        self.model, self.layer = model, layer
        self.seen: torch.Tensor | None = None
        self.handles = attach_recorders(model, [layer], self._sink, name)

    def _sink(self, _layer: str, tensor: torch.Tensor) -> None:
        self.seen = tensor.detach().float().cpu().clone()

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        device = next(iter(self.model.parameters()), torch.empty(0)).device
        self.seen = None
        self.model(images.to(device))
        assert self.seen is not None
        return self.seen.numpy()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def _evaluating(models: Sequence[nn.Module]) -> Iterator[None]:
    """The models in evaluation mode (BatchNorm on running statistics) and without gradients, then as they were."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.train(mode)


def _recorded_reader(ds: xr.Dataset, context: Context) -> tuple[Callable[[int, int], np.ndarray], int, int] | None:
    """The crosscoder's input rows by samples from the run's recordings (reader, samples, rows per sample).

    ``None`` when the recordings cannot be read (a result loaded from another run).
    """
    inputs = _inputs(ds)
    try:
        arrays = [context.activation(m, layer) for m, layer in inputs.sources if layer is not None]
    except (KeyError, ValueError, MergescopeError) as exc:
        log.info("latent dashboards: no histograms (the recordings cannot be read: %s)", exc)
        return None
    if len(arrays) != len(inputs.sources):
        return None
    arrays = [a.transpose("sample", "unit", ...) for a in arrays]
    positions = str(ds.coords["samples"].values) == "positions" if "samples" in ds.coords else False
    samples = arrays[0].sizes["sample"]

    def rows_of(a: xr.DataArray, start: int, stop: int) -> np.ndarray:
        values = np.asarray(a.isel(sample=slice(start, stop)).values, dtype=np.float32)
        if values.ndim > 2:  # a map (y, x) or tokens: pooled as the crosscoder pools it, or every position a row
            spread = tuple(range(2, values.ndim))
            if positions:
                values = values.transpose(0, *spread, 1).reshape(-1, values.shape[1])
            else:
                values = values.mean(axis=spread)
        return values

    def read(start: int, stop: int) -> np.ndarray:
        parts = [rows_of(a, start, stop) * np.float32(s) for a, s in zip(arrays, inputs.scale)]
        return np.concatenate(parts, axis=1)

    per = int(np.prod(arrays[0].shape[2:])) if positions else 1  # rows of one sample
    return read, samples, per


@attrs.define
class _Sheets:
    """The sprite sheets of one crosscoder node: one PNG per latent, its top images in a row per map."""

    ds: xr.Dataset
    folder: Path
    context: Context
    tile: int
    gap: int
    alpha: float
    modules: dict[str, nn.Module] | None  # the models when heatmaps can be drawn
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # where an image lies in its tile

    def draw(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Draw every sheet; returns each latent's file name ("" without one), its rows and the heatmaps' scale."""
        ds = self.ds
        ids = np.asarray(ds["topk_sample"].values, dtype=np.int64).T  # (latent, rank)
        values = np.asarray(ds["topk_value"].values, dtype=np.float64).T
        latents = len(ids)
        names = [""] * latents
        rows = np.zeros(latents, dtype=np.int64)
        vmax = np.full(latents, np.nan)
        self.folder.mkdir(parents=True, exist_ok=True)
        blocks = range(0, latents, _LATENT_BLOCK)
        for start in self.context.progress(blocks, desc="latent dashboards: images", total=len(blocks)):
            chosen = np.arange(start, min(start + _LATENT_BLOCK, latents))
            fired = values[chosen] > 0  # a top sample on which the latent is 0 shows nothing of it
            if not fired.any():
                continue
            tiles, maps = self._block(ids[chosen], fired, chosen)
            for j, latent in enumerate(chosen):
                if not fired[j].any():
                    continue
                sheet, top = self._sheet(ids[latent], fired[j], tiles, None if maps is None else maps[j])
                name = f"latent-{latent:05d}.png"
                _save_png(sheet, self.folder / name)
                names[latent], rows[latent], vmax[latent] = name, 1 if maps is None else maps.shape[2], top
        return names, rows, vmax

    def _block(
        self, ids: np.ndarray, fired: np.ndarray, latents: np.ndarray
    ) -> tuple[dict[int, np.ndarray], np.ndarray | None]:
        """The tiles of a block's top images and, with the models, their maps ``(latent, rank, row, h, w)``."""
        unique = np.unique(ids[fired])
        tiles: dict[int, np.ndarray] = {}
        maps: np.ndarray | None = None
        captures = (
            [_Capture(self.modules[m], str(self.ds["layer"].values), m) for m in _inputs(self.ds).models]
            if self.modules
            else []
        )
        batch = max(1, int(self.context.batch_size))
        try:
            with _evaluating(list(self.modules.values()) if self.modules else []):
                for start in range(0, len(unique), batch):
                    chunk = unique[start : start + batch]
                    images = self.context.images(chunk)
                    for i, t in zip(chunk, display_images(images, self.tile)):
                        tiles[int(i)] = t
                    self.box = _image_box(tuple(images.shape[2:]), self.tile)
                    if not captures:
                        continue
                    layer_maps = [c(images) for c in captures]
                    if any(m.ndim != 4 for m in layer_maps):  # not a spatial layer: images only
                        for c in captures:
                            c.close()
                        captures = []
                        maps = None
                        continue
                    maps = self._encode(maps, layer_maps, chunk, ids, fired, latents)
        finally:
            for c in captures:
                c.close()
        return tiles, maps

    def _encode(
        self,
        maps: np.ndarray | None,
        layer_maps: list[np.ndarray],
        chunk: np.ndarray,
        ids: np.ndarray,
        fired: np.ndarray,
        latents: np.ndarray,
    ) -> np.ndarray:
        """Add the maps of the (latent, rank) pairs whose image is in ``chunk``."""
        where = np.isin(ids, chunk) & fired
        pairs_l, pairs_r = np.nonzero(where)
        position = np.searchsorted(chunk, ids[pairs_l, pairs_r])
        width = sum(m.shape[1] * m.shape[2] * m.shape[3] for m in layer_maps)
        step = max(1, _GATHER_VALUES // max(1, width))
        for s in range(0, len(pairs_l), step):
            sel = slice(s, s + step)
            encoded, _ = position_activations([m[position[sel]] for m in layer_maps], self.ds, latents[pairs_l[sel]])
            if maps is None:
                maps = np.zeros((*ids.shape, *encoded.shape[1:]), dtype=np.float32)
            maps[pairs_l[sel], pairs_r[sel]] = encoded
        assert maps is not None
        return maps

    def _sheet(
        self, ids: np.ndarray, fired: np.ndarray, tiles: dict[int, np.ndarray], maps: np.ndarray | None
    ) -> tuple[np.ndarray, float]:
        """One latent's sheet ``(rows * tile + gaps, k * tile + gaps, 3)`` and its heatmaps' top value."""
        k, tile, gap = len(ids), self.tile, self.gap
        n_rows = 1 if maps is None else maps.shape[1]
        sheet = np.full((n_rows * tile + (n_rows - 1) * gap, k * tile + (k - 1) * gap, 3), _PAPER, dtype=np.uint8)
        shown = np.flatnonzero(fired)
        base = np.stack([tiles[int(ids[r])] for r in shown])
        top = float("nan")
        if maps is not None:
            top = float(maps[shown].max())
            drawn = overlay_tiles(
                np.repeat(base, n_rows, axis=0),
                maps[shown].reshape(-1, *maps.shape[2:]),
                np.full(len(shown) * n_rows, top),
                self.box,
                alpha=self.alpha,
            ).reshape(len(shown), n_rows, tile, tile, 3)
        else:
            drawn = base[:, None]
        for j, r in enumerate(shown):
            for row in range(n_rows):
                y, x = row * (tile + gap), r * (tile + gap)
                sheet[y : y + tile, x : x + tile] = drawn[j, row]
        return sheet, top


def _save_png(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    grey = bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())
    Image.fromarray(pixels[..., 0] if grey else pixels).save(path, compress_level=1)


def write_dashboards(
    results: xr.DataTree,
    out_dir: str | Path,
    context: Context | None,
    *,
    tile: int = 56,
    gap: int = 2,
    bins: int = 32,
    alpha: float = 0.5,
) -> list[Path]:
    """Draw the latent dashboards of every crosscoder result in ``results`` into ``out_dir``.

    For every crosscoder node (:func:`crosscoder_nodes`), one sheet per latent that fired
    on any top sample, ``<node>/latent-<NNNNN>.png`` (needs ``context.data``; with
    heatmaps when ``context.modules`` holds the node's models and its layer is spatial),
    and the activation histograms (when the run's recordings of the node's models can
    be read through ``context.activation``). ``latent-dashboard.nc`` indexes them.

    Parameters
    ----------
    results
        The run's results.
    out_dir
        The visualizer's folder.
    context
        The step's context; without one (or without data) nothing is drawn.
    tile, gap
        Side of an image in a sheet, and the white pixels between images, in pixels.
    bins
        Bins of every histogram (even).
    alpha
        Weight of the heatmap in its blend with the image.

    Returns
    -------
    list of Path
        The sheets and the index; empty without a context, data or crosscoder results.
    """
    nodes = crosscoder_nodes(results)
    if context is None or context.data is None or not nodes:
        return []
    out_dir = Path(out_dir)
    entries: list[xr.Dataset] = []
    paths: list[Path] = []
    all_models = list(dict.fromkeys(str(m) for _, ds in nodes for m in ds["model"].values))
    row_names = [JOINT, *all_models]
    modules = dict(getattr(context, "modules", None) or {})
    for path, ds in nodes:
        label = _label(path)
        inputs = _inputs(ds)
        heat = (
            {m: modules[m] for m in inputs.models}
            if not inputs.multi and inputs.sources[0][1] is not None and all(m in modules for m in inputs.models)
            else None
        )
        sheets = _Sheets(ds, out_dir / label, context, tile, gap, alpha, heat)
        names, rows, vmax = sheets.draw()
        paths += [out_dir / label / n for n in names if n]
        latents = ds.sizes["latent"]
        counts = np.zeros((latents, len(row_names), bins), dtype=np.int32)
        high = np.full(latents, np.nan)
        reader = _recorded_reader(ds, context)
        if reader is not None:
            read, samples, per = reader
            node_counts, high = latent_histograms(ds, read, samples, bins, context.progress, per)
            columns = [0, *(1 + all_models.index(m) for m in inputs.models)]
            counts[:, columns] = node_counts
        entries.append(
            xr.Dataset(
                {
                    "sprite_file": ("entry", np.array([f"{label}/{n}" if n else "" for n in names], dtype=str)),
                    "sprite_rows": ("entry", rows),
                    "heatmap_vmax": ("entry", vmax),
                    "histogram": (("entry", "row", "bin"), counts),
                    "histogram_high": ("entry", high),
                },
                coords={
                    "crosscoder": ("entry", np.full(latents, path, dtype=object).astype(str)),
                    "latent": ("entry", np.arange(latents)),
                },
            )
        )
    index = xr.concat(entries, dim="entry").assign_coords(row=row_names, bin=np.arange(bins))
    index["sprite_tile"] = ((), int(tile))
    index["sprite_gap"] = ((), int(gap))
    index_path = out_dir / INDEX_FILE
    index.to_netcdf(index_path)
    return [*paths, index_path]


# --------------------------------------------------------------------------- the panel


def typed_column(values: Any, dtype: str) -> dict[str, Any]:
    """An array as a typed JSON column: ``{"t": dtype, "s": shape, "b": base64 of its little-endian bytes}``.

    ``dtype`` is one of ``"f4"``, ``"i4"``, ``"u4"``, ``"u2"``, ``"u1"`` (the script makes
    ``Float32Array``, ``Int32Array``, ...). NaN stays NaN in ``"f4"``, which JSON numbers
    cannot say.
    """
    if dtype not in {"f4", "i4", "u4", "u2", "u1"}:
        raise ValueError(f"unknown column type {dtype!r}")
    array = np.ascontiguousarray(np.asarray(values), dtype=np.dtype(dtype).newbyteorder("<"))
    return {"t": dtype, "s": list(array.shape), "b": base64.b64encode(array.tobytes()).decode("ascii")}


def _quantised(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Histogram counts as bar heights 0..255 of each histogram's peak (a non-zero count stays >= 1), and the peaks."""
    counts = np.asarray(counts, dtype=np.int64)
    peak = counts.max(axis=-1)
    height = np.ceil(counts * 255 / np.maximum(peak, 1)[..., None]).astype(np.uint8)
    return height, peak


def dashboard_data(ds: xr.Dataset, index: xr.Dataset | None = None, base: str = "") -> dict[str, Any]:
    """The data of one dashboard, as the script reads it: names, and typed columns of every latent.

    Parameters
    ----------
    ds
        A crosscoder result (one node of :func:`crosscoder_nodes`).
    index
        This node's entries of ``latent-dashboard.nc`` in latent order, or ``None`` (no
        images, no histograms).
    base
        The folder of the index relative to the report (posix): the sheets' paths in the
        index are relative to it.
    """
    from mergescope_plugins.crosscoder import class_order  # the crosscoder imports this module

    n = ds.sizes["latent"]
    models = [str(m) for m in ds["model"].values]
    pairs = [str(p) for p in ds["pair"].values] if "pair" in ds.coords else []
    labels = np.asarray(ds["latent_class"].values).astype(str)
    classes = sorted(set(labels.tolist()), key=class_order)
    lookup = {c: i for i, c in enumerate(classes)}
    codes = np.array([lookup[c] for c in labels.tolist()], dtype=np.int64)
    top_value = np.asarray(ds["topk_value"].values, dtype=np.float64).T if "topk_value" in ds else np.zeros((n, 0))
    top_sample = np.asarray(ds["topk_sample"].values, dtype=np.int64).T if "topk_sample" in ds else np.zeros((n, 0))
    cosine = np.asarray(ds["cosine"].values) if "cosine" in ds else np.full((n, len(pairs)), np.nan)
    density = np.asarray(ds["density"].values) if "density" in ds else np.full(n, np.nan)
    data: dict[str, Any] = {
        "n": int(n),
        "models": models,
        "pairs": pairs,
        "classes": classes,
        "k": int(top_value.shape[1]),
        "cols": {
            "class": typed_column(codes, "u2"),
            "relative_norm": typed_column(ds["relative_norm"].values, "f4"),
            "decoder_norm": typed_column(ds["decoder_norm"].values, "f4"),
            "cosine": typed_column(cosine, "f4"),
            "density": typed_column(density, "f4"),
            "max": typed_column(top_value[:, 0] if top_value.shape[1] else np.full(n, np.nan), "f4"),
            "top_value": typed_column(top_value, "f4"),
            "top_sample": typed_column(top_sample, "i4"),
        },
    }
    if index is None or not index.sizes.get("entry"):
        return data
    rows = [str(r) for r in index["row"].values]
    wanted = [JOINT, *models]
    keep = [rows.index(r) for r in wanted]
    counts = np.asarray(index["histogram"].values)[:, keep]
    height, peak = _quantised(counts)
    high = np.asarray(index["histogram_high"].values, dtype=np.float64)
    if np.isfinite(high).any():
        data["hist"] = {
            "rows": wanted,
            "bins": int(counts.shape[-1]),
            "height": typed_column(height, "u1"),
            "peak": typed_column(peak, "u4"),
            "total": typed_column(counts.sum(axis=-1), "u4"),
            "high": typed_column(high, "f4"),
        }
    files = [str(f) for f in index["sprite_file"].values]
    sprite_rows = np.asarray(index["sprite_rows"].values, dtype=np.int64)
    if any(files):
        folder = next(PurePosixPath(f).parent for f in files if f)
        pattern = all(not f or f == f"{folder}/latent-{i:05d}.png" for i, f in enumerate(files))
        prefix = _joined(base, folder.as_posix())
        data["sheets"] = {
            "dir": quote(prefix + "/"),
            "files": None if pattern else [quote(_joined(base, f)) if f else "" for f in files],
            "rows": typed_column(sprite_rows, "u1"),
            "labels": [JOINT, *models] if sprite_rows.max() > 1 else ["top images"],
            "tile": int(index["sprite_tile"].values) if "sprite_tile" in index else 56,
            "gap": int(index["sprite_gap"].values) if "sprite_gap" in index else 2,
            "vmax": typed_column(index["heatmap_vmax"].values, "f4"),
        }
    return data


def _joined(base: str, path: str) -> str:
    return PurePosixPath(os.path.normpath(PurePosixPath(base or ".", path).as_posix())).as_posix()


def latent_dashboard(ds: xr.Dataset, path: str, index: xr.Dataset | None = None, base: str = "") -> str:
    """The HTML of one crosscoder node's dashboard; its script (:func:`dashboard_panel`) brings it to life.

    Parameters are :func:`dashboard_data`'s; ``path`` names the node in the heading.
    """
    payload = json.dumps({"title": path, **dashboard_data(ds, index, base)}, separators=(",", ":"), allow_nan=False)
    # Inside <script> only "</" could end the element early; escape every "<", ">" and "&".
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    ident = "ld-" + hashlib.sha1(payload.encode()).hexdigest()[:10]
    n = ds.sizes["latent"]
    return (
        f'<div class="ms-latent-dashboard" id="{ident}">'
        f"<h4>Latents of {html.escape(path)}</h4>"
        f'<script type="application/json" class="ld-data">{payload}</script>'
        '<div class="ld-controls"></div><div class="ld-body"><div class="ld-table"></div>'
        '<div class="ld-detail" aria-live="polite"></div></div>'
        f"<noscript><p>{n} latents; the dashboard needs JavaScript.</p></noscript></div>"
    )


@functools.cache
def _assets() -> tuple[str, str]:
    """The dashboard's CSS and script, package data of ``mergescope_plugins``."""
    folder = importlib.resources.files("mergescope_plugins") / "templates"
    css, js = ((folder / f"latent_dashboard.{ext}").read_text(encoding="utf-8") for ext in ("css", "js"))
    return css, js


def dashboard_panel(
    node: xr.Dataset, files: Sequence[Path], run_dir: str | Path, results: xr.DataTree | None = None
) -> Panel | str:
    """The panel of a visualizer of crosscoder results: a dashboard per crosscoder node, its plots, its files.

    Parameters
    ----------
    node
        The visualizer step's node: ``files`` and, when it drew them, the index of
        :func:`write_dashboards` (``sprite_file``, ``histogram``, ... on ``entry``).
    files
        The step's files, relative to ``run_dir``.
    run_dir
        The run directory, where the report is.
    results
        The run's results (the crosscoder nodes); read from ``run_dir/results.nc`` when
        not given.

    Returns
    -------
    Panel or str
        The dashboards with their CSS and script, a gallery of the other images and
        links to the rest; without crosscoder results, the gallery and links only.
    """
    run_dir = Path(run_dir)
    files = [Path(f) for f in files]
    if results is None and (run_dir / "results.nc").is_file():
        results = load_tree(run_dir / "results.nc")
    nodes = crosscoder_nodes(results) if results is not None else []
    index_file = next((f for f in files if f.name == INDEX_FILE), None)
    base = index_file.parent.as_posix() if index_file is not None else ""
    has_index = "sprite_file" in node.variables and "crosscoder" in node.coords
    dashboards = []
    for path, ds in nodes:
        index = None
        if has_index:
            mine = np.flatnonzero(np.asarray(node["crosscoder"].values).astype(str) == path)
            if len(mine) == ds.sizes["latent"]:
                index = node.isel(entry=mine).sortby("latent")
        dashboards.append(latent_dashboard(ds, path, index, base))
    sheets = {f"{base}/{s}" if base else s for s in (np.asarray(node["sprite_file"].values) if has_index else [])}
    rest = [f for f in files if f.as_posix() not in sheets]
    plots = [f for f in rest if f.suffix.lower() in IMAGE_SUFFIXES]
    others = [f for f in rest if f.suffix.lower() not in IMAGE_SUFFIXES]
    body = "".join(dashboards) + image_gallery(plots, run_dir) + file_list(others, run_dir)
    if not dashboards:
        return body
    css, js = _assets()
    return Panel(body, css=css, js=js)
