"""Top-k image grids: the dataset images that activate each unit most, one row per model.

For every layer of the step and every unit, one PNG shows the ``k`` dataset images with
the highest recorded activation of that unit in each model (rank 0 on the left), one row
per model, with the model's name and, optionally, per-unit metric values on the left: the
thesis's Figures 3.3 and 3.4 (model 1, model 2, permuted model 2, permuted merge and
direct merge; or N models aligned to one reference with Kendall-tau beside each row).

The top-k comes from the recording's streaming statistics (``Context.topk``), so drawing
needs no further pass over the data; only the images shown are loaded, each once.
Extra rows come from earlier results that hold ``topk_sample`` (and ``topk_value``) on
dims ``(rank, unit)`` at ``/<step>/<layer>`` (e.g. the top-k of regression-aligned
activations).

Layout of one grid (all sizes in pixels)::

    +---------------------------------------------------------+
    | header: "<layer>, unit <u>", unit-wide metric values     |
    +-----------+----------+-----+----------+-----+------------+
    | label     | rank 0   | gap | rank 1   | ... | rank k-1   |   row 0 (tile high)
    +-----------+----------+-----+----------+-----+------------+
    |  (gap)                                                   |
    | label     | ...                                          |   row 1
    +---------------------------------------------------------+

The tiles fill the bottom-right ``rows * tile + (rows - 1) * gap`` by
``k * tile + (k - 1) * gap`` pixels; the label column and the header take the rest. With
an optimised image, its column (``tile`` wide) sits ``tile + gap + 2 * _PAD`` pixels left of
rank 0, and the header gains a line naming it.

**Where it fires** (``heatmaps = true``). For the models' rows, the unit's activation map
``A_u(x)`` (``(h, w)`` at a convolutional layer) on each image ``x`` of its top-k is drawn
over the image: one forward pass over just the images shown, so memory follows the grids,
not the dataset. The map is resized to the displayed image bilinearly (``align_corners =
False``: map cell ``(i, j)`` covers the image block ``[i H / h, (i + 1) H / h) x [j W / w,
(j + 1) W / w)``), scaled ``m = clip(A, 0, v) / v`` and blended as a colour map,
``(1 - alpha) x + alpha c(m)`` (:func:`mergescope.heatmaps.overlay`). ``v`` is the largest
activation of the image's own map, of the row's k maps or of every map of the grid
(``heatmap_scale``). A unit's heatmaps form a second grid, ``unit-<NNNN>-heatmap.png``, of
the same layout; the browser toggles between the two. Token layers (``(batch, token,
unit)``) become maps through ``mergescope.activations.token_grid`` (the class token
dropped); layers without positions get no heatmap.

**The optimised image** (``optimised = "<feature-vis step>"``). Beside every model's row,
in a column of its own left of rank 0, the image an earlier ``feature-vis`` step optimised
to excite the unit in that model (its best image when it made several): what the unit
wants beside what the data gave it. Rows whose model, layer or unit the feature-vis step
did not visualise get an empty tile.

In the report (``report.html``), the step's panel is a unit browser
(:meth:`TopKGrids.report_panel`, :func:`unit_browser`): a layer selector, the layer's units
with the values of every metric step that scored them (sortable), and the grid of the chosen
unit, read from ``topk-index.nc``. The report itself knows nothing of this layout; the
panel is built from ``mergescope.report``'s public building blocks. Its script and style
are package data of this package (``templates/topk_browser.js`` and ``.css``): the panel
returns them with its HTML as a ``mergescope.report.Panel``, and the report inlines them
once, however many top-k steps the run has, keeping the page one file. The script starts
every browser through the report's generic hook, ``mergescope.panel(selector, init)``
(the report's ``report.js``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar
from urllib.parse import quote

import attrs
import numpy as np
import torch
import xarray as xr

from mergescope import activations
from mergescope.activations import attach_recorders
from mergescope.components import Context
from mergescope.devices import autocast
from mergescope.errors import ConfigError
from mergescope.heatmaps import overlay
from mergescope.hookspecs import hookimpl
from mergescope.report import (
    IMAGE_SUFFIXES,
    Panel,
    default_panel,
    file_list,
    guess_metric_steps,
    node_files,
    unit_scores,
)
from mergescope.storage import load_tree
from mergescope.validators import boolean, non_empty_str, one_of, optional, probability
from mergescope.values import model_device

__all__ = [
    "TopKGrids",
    "display_image",
    "display_images",
    "grid_layout",
    "safe_name",
    "spatial_maps",
    "map_peak",
    "has_unit_index",
    "unit_browser",
    "unit_browser_panel",
    "register_visualizers",
]

log = logging.getLogger("mergescope")

INDEX_FILE = "topk-index.nc"
HEATMAP_SUFFIX = "-heatmap"  # a unit's heatmap grid: unit-<NNNN>-heatmap.png
HEATMAP_SCALES = ("image", "row", "unit")
OPTIMISED_LABEL = "optimised"
_PAD = 4  # pixels around text
_INK = 0  # text colour (black), drawn on white
_PAPER = 255  # background of labels, header, gaps and letterboxing
# Ids loaded per call of Context.images: bounds the memory of full-size images in flight.
_LOAD_CHUNK = 2048


# --------------------------------------------------------------------------- images


def display_images(images: Any, size: int) -> np.ndarray:
    """Images of one shape as ``(n, size, size, 3)`` uint8 tiles for display.

    Every image (``(n, C, H, W)`` with 1 or 3 channels; a tensor or an array, in whatever
    value range the dataset uses) is min-max normalised to [0, 255] over all its pixels
    and channels at once (so colours keep their balance; a constant image becomes
    black; NaN and infinities count as 0), a single channel becomes grey RGB, and it is
    scaled with PIL so its longer side is ``size``: nearest-neighbour when enlarging
    (small images such as MNIST stay sharp), bicubic with antialiasing when shrinking. A
    non-square image is centred on a white square.

    Raises
    ------
    ValueError
        For shapes other than ``(n, 1 or 3, H, W)``.
    """
    from PIL import Image

    array = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if array.ndim != 4 or array.shape[1] not in (1, 3) or 0 in array.shape[2:]:
        raise ValueError(f"top-k grids show images (1 or 3, H, W) or (H, W), got shape {tuple(array.shape[1:])}")
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
    low = array.min(axis=(1, 2, 3), keepdims=True)
    span = array.max(axis=(1, 2, 3), keepdims=True) - low
    scale = np.divide(255.0, span, out=np.zeros_like(span), where=span > 0)
    pixels = np.rint((array - low) * scale).astype(np.uint8).transpose(0, 2, 3, 1)  # (n, H, W, C)
    n, h, w, channels = pixels.shape
    top, left, new_h, new_w = _placement(h, w, size)
    if (new_h, new_w) != (h, w):
        # Resize before making grey images RGB: a third of the work.
        resample = Image.Resampling.NEAREST if size > max(h, w) else Image.Resampling.BICUBIC
        planes = pixels[..., 0] if channels == 1 else pixels
        pixels = np.stack([np.asarray(Image.fromarray(p).resize((new_w, new_h), resample)) for p in planes])
        pixels = pixels.reshape(n, new_h, new_w, channels)
    if channels == 1:
        pixels = np.repeat(pixels, 3, axis=3)
    if (new_h, new_w) == (size, size):
        return np.ascontiguousarray(pixels)
    tiles = np.full((n, size, size, 3), _PAPER, dtype=np.uint8)
    tiles[:, top : top + new_h, left : left + new_w] = pixels
    return tiles


def _placement(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """Where an ``h`` x ``w`` image lies in its ``size`` square tile: top, left, height, width."""
    factor = size / max(h, w)
    new_h, new_w = max(1, round(h * factor)), max(1, round(w * factor))
    return (size - new_h) // 2, (size - new_w) // 2, new_h, new_w


def display_image(image: Any, size: int) -> np.ndarray:
    """One image, ``(C, H, W)`` with 1 or 3 channels or ``(H, W)``, as a ``(size, size, 3)`` tile.

    As :func:`display_images` (per-image min-max normalisation, grey as RGB, scaled to fit).
    """
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"top-k grids show images (1 or 3, H, W) or (H, W), got shape {tuple(array.shape)}")
    return display_images(array[None], size)[0]


class _Tiles:
    """Display tiles by sample id: each image is loaded and converted once per render."""

    def __init__(self, context: Context, size: int) -> None:
        self.context = context
        self.size = size
        self.tiles: dict[int, np.ndarray] = {}
        self.shapes: dict[int, tuple[int, int]] = {}  # each image's (H, W), to place a heatmap on its tile
        self.colour = False  # whether any image shown has three channels

    def load(self, ids: np.ndarray) -> None:
        """Load the tiles of ``ids`` not loaded yet (one ``Context.images`` call per chunk)."""
        missing = np.asarray([int(i) for i in np.unique(ids) if int(i) not in self.tiles], dtype=np.int64)
        for start in range(0, len(missing), _LOAD_CHUNK):
            self.batches(missing[start : start + _LOAD_CHUNK])

    def batches(self, ids: np.ndarray) -> list[tuple[np.ndarray, torch.Tensor]]:
        """The images of ``ids``, in one batch or one by one when their sizes differ; their tiles kept.

        The heatmap pass feeds these batches to the models, so every image shown is loaded once.
        """
        try:
            batches = [(ids, self.context.images(ids))]
        except RuntimeError:  # Context.images stacks the images, which fails when their sizes differ
            batches = [(ids[i : i + 1], self.context.images(ids[i : i + 1])) for i in range(len(ids))]
        for batch_ids, images in batches:
            self.colour = self.colour or (images.ndim == 4 and images.shape[1] == 3)
            for i, tile in zip(batch_ids, display_images(images, self.size)):
                self.tiles[int(i)] = tile
                self.shapes[int(i)] = (int(images.shape[-2]), int(images.shape[-1]))
        return batches

    def bank(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tiles of the unique ``ids`` stacked ``(n, size, size, 3)``, and each id's position in it."""
        unique = np.unique(ids)
        return np.stack([self.tiles[int(i)] for i in unique]), np.searchsorted(unique, ids)


# ---------------------------------------------------------------------------- layout


@attrs.frozen
class GridLayout:
    """Pixel geometry of one grid: image size and where the tiles start."""

    height: int
    width: int
    tiles_top: int
    tiles_left: int
    tile: int
    gap: int
    lead_left: int | None = None  # left pixel column of the optimised images, when there are any

    def row_top(self, row: int) -> int:
        """Top pixel line of ``row``."""
        return self.tiles_top + row * (self.tile + self.gap)

    @property
    def labels_right(self) -> int:
        """The pixel column where the row labels must end."""
        return (self.lead_left if self.lead_left is not None else self.tiles_left) - _PAD


def lead_width(tile: int, gap: int) -> int:
    """Width of the optimised images' column with the space that sets it apart from rank 0."""
    return tile + gap + 2 * _PAD


def grid_layout(
    rows: int, k: int, tile: int, gap: int, label_width: int, header_height: int, *, lead: bool = False
) -> GridLayout:
    """The geometry of a grid of ``rows`` x ``k`` tiles with a label column and a header.

    The image is ``header_height + rows * tile + (rows - 1) * gap`` high and
    ``label_width + k * tile + (k - 1) * gap`` wide; the tiles sit in its bottom-right corner.
    With ``lead``, a column of one tile per row (the optimised images) sits between the
    labels and rank 0, :func:`lead_width` wide, and the image is that much wider.
    """
    grid_h, grid_w = rows * tile + (rows - 1) * gap, k * tile + (k - 1) * gap
    extra = lead_width(tile, gap) if lead else 0
    left = label_width + extra
    return GridLayout(
        header_height + grid_h, left + grid_w, header_height, left, tile, gap, label_width if lead else None
    )


class _Text:
    """Text stamps drawn once with PIL's default font and reused (labels repeat across units)."""

    def __init__(self) -> None:
        from PIL import ImageFont

        self.font = ImageFont.load_default()
        ascent, descent = self.font.getmetrics()
        self.line = ascent + descent + 1
        self._stamps: dict[str, np.ndarray] = {}

    def width(self, text: str) -> int:
        return math.ceil(self.font.getlength(text)) + 1

    def stamp(self, text: str) -> np.ndarray:
        """``text`` in black on white, ``(line, width)`` uint8."""
        found = self._stamps.get(text)
        if found is None:
            from PIL import Image, ImageDraw

            image = Image.new("L", (self.width(text), self.line), _PAPER)
            ImageDraw.Draw(image).text((0, 0), text, fill=_INK, font=self.font)
            found = self._stamps[text] = np.asarray(image)
        return found

    def draw(self, canvas: np.ndarray, text: str, top: int, left: int, right: int) -> None:
        """Write ``text`` into ``canvas`` at ``(top, left)``, clipped at column ``right`` and the bottom."""
        stamp = self.stamp(text)
        h = min(stamp.shape[0], canvas.shape[0] - top)
        w = min(stamp.shape[1], right - left)
        if h <= 0 or w <= 0:
            return
        region = canvas[top : top + h, left : left + w]
        np.minimum(region, stamp[:h, :w, None], out=region)


def safe_name(name: str) -> str:
    """``name`` as one path component: letters, digits, ``.``, ``_`` and ``-`` kept, the rest ``_``."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "_"
    return cleaned


def _format(value: float) -> str:
    return f"{value:.2f}" if np.isfinite(value) else "nan"


def _max_abs(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0


def _label_mode(tile: int, line: int, metrics: int) -> str:
    """How a row shows its metric values: one line each, all on one line, or not at all (tile too short)."""
    fit = (tile - _PAD) // line  # lines that fit beside a tile, the name included
    if metrics == 0 or fit < 2:
        return "none"
    return "lines" if 1 + metrics <= fit else "one"


# ------------------------------------------------------------------------ row sources


@attrs.define
class _Row:
    """One row of every grid of a layer: its label and its top-k per unit."""

    label: str
    ids: np.ndarray  # (available k, units) int64, -1 in empty slots
    values: np.ndarray  # (available k, units) float64
    samples: int | None  # samples the top-k was taken over, when known
    source: str  # for messages


def _store_row(context: Context, model: str, layer: str) -> _Row:
    try:
        top = context.topk(model, layer)
    except KeyError as exc:
        raise ConfigError(
            f"the recording of {model!r} has no top-k at layer {layer!r} ({exc}); "
            "the step's models are recorded with [activations] topk > 0"
        ) from exc
    ids = np.asarray(top.sample_ids, dtype=np.int64)
    values = np.asarray(getattr(top, "values", np.full(ids.shape, np.nan)), dtype=np.float64)
    if ids.ndim != 2 or values.shape != ids.shape:
        raise ValueError(f"the top-k of {model!r} at {layer!r} must hold (k, unit) arrays, got {ids.shape}")
    count = getattr(top, "count", None)
    if count is None and context.data is not None:
        count = len(context.data)
    return _Row(model, ids, values, None if count is None else int(count), f"the store of {model!r}")


def _result_node(results: xr.DataTree, step: str, layer: str, option: str) -> xr.Dataset | None:
    """The Dataset at ``/<step>/<layer>``; ``None`` when the step has no such layer."""
    if step not in results.children:
        known = ", ".join(results.children) or "none"
        raise ConfigError(
            f"{step!r} is not a step whose results this step can read (earlier steps: {known})", where=f"key '{option}'"
        )
    node = results[step]
    if layer not in node.children:
        return None
    # Coords such as a sweep's levels may sit on the step's node and be inherited.
    return node[layer].to_dataset(inherit=True)


def _result_rows(
    results: xr.DataTree, step: str, layer: str, select: Mapping[str, list[Any]]
) -> tuple[list[_Row], set[str]]:
    """Rows from an earlier step's ``topk_sample`` (+ ``topk_value``).

    Dims besides ``(rank, unit)`` (e.g. ``model``, a regression's ``sparsity``) give one
    row per value (of the values ``select`` keeps), labelled ``<step>:<value>...``.
    Returns the rows and those dims.
    """
    ds = _result_node(results, step, layer, "rows_from")
    if ds is None or "topk_sample" not in ds:
        held = "nothing" if ds is None else ", ".join(map(str, ds.data_vars)) or "no variables"
        raise ConfigError(
            f"'rows_from' step {step!r} has no 'topk_sample' at layer {layer!r} (it holds {held}); "
            "a row needs topk_sample (rank, unit) at /<step>/<layer>",
            where="key 'rows_from'",
        )
    ids = ds["topk_sample"]
    values = ds["topk_value"] if "topk_value" in ds else xr.full_like(ids, np.nan, dtype=np.float64)
    if "latent" in ids.dims and "unit" not in ids.dims:  # a dictionary's latents are its units (crosscoder)
        ids, values = ids.rename(latent="unit"), values.rename(latent="unit")
    if not {"rank", "unit"} <= set(ids.dims):
        raise ConfigError(
            f"'rows_from' step {step!r}: topk_sample at {layer!r} has dims {ids.dims}; expected (rank, unit) "
            "plus any dims that make one row per value, e.g. (model, rank, unit)",
            where="key 'rows_from'",
        )
    for dim, wanted in select.items():
        if dim not in ids.dims:
            continue
        have = [v.item() for v in ids[dim].values] if dim in ids.coords else list(range(ids.sizes[dim]))
        missing = [v for v in wanted if v not in have]
        if missing:
            raise ConfigError(
                f"'rows_select' asks for {dim} = {missing[0]!r}, but step {step!r} at layer {layer!r} has "
                f"{dim} values {have}",
                where="key 'rows_select'",
            )
        index = [have.index(v) for v in wanted]
        ids, values = ids.isel({dim: index}), values.isel({dim: index})
    count = int(ds["count"]) if "count" in ds and ds["count"].ndim == 0 else None
    extra = [d for d in ids.dims if d not in ("rank", "unit")]
    rows = []
    for position in np.ndindex(*(ids.sizes[d] for d in extra)):
        at = dict(zip(extra, position))
        names = [str(ids[d].values[i]) if d in ids.coords else str(i) for d, i in at.items()]
        label = ":".join([step, *names])
        rows.append(_Row(label, _ranked(ids.isel(at)), _ranked(values.isel(at), float), count, f"step {step!r}"))
    return rows, set(extra)


def _ranked(array: xr.DataArray, dtype: type = np.int64) -> np.ndarray:
    return np.asarray(array.transpose("rank", "unit").values, dtype=dtype)


# ---------------------------------------------------------------------- where it fires


def spatial_maps(output: torch.Tensor, units: int) -> np.ndarray | None:
    """A recorded layer output as one map per unit, ``(batch, unit, y, x)`` float32.

    Parameters
    ----------
    output
        What the layer gave for a batch: ``(batch, unit, h, w)`` (a convolution's maps,
        kept as they are) or ``(batch, token, unit)`` (a transformer's tokens, laid out on
        their grid by ``mergescope.activations.token_grid``: a square number of tokens is
        taken for the patches alone, any other for a class token and the patches);
        ``(batch, unit)`` has no positions.
    units
        The layer's unit count (the top-k's), which tells the two 3-D layouts apart.

    Returns
    -------
    numpy.ndarray or None
        The maps, sharing no memory with ``output``; ``None`` for a layer without positions.

    Raises
    ------
    ConfigError
        For token outputs when the installed core has no ``token_grid``, or an output whose
        unit axis does not hold ``units`` units.
    """
    values = output.detach().float().cpu()
    if values.ndim == 2:
        return None
    if values.ndim == 4 and values.shape[1] == units:
        return values.numpy().copy()
    if values.ndim == 3 and values.shape[2] == units:
        token_grid = getattr(activations, "token_grid", None)
        if token_grid is None:
            raise ConfigError(
                "heatmaps of a token layer need mergescope.activations.token_grid (a ViT's patch tokens laid out "
                "on their grid), which this installation lacks; draw the layer with heatmaps = false",
                where="key 'heatmaps'",
            )
        # A square number of tokens is a patch grid alone (no class token); else a class token leads.
        tokens = values.shape[1]
        prefix = 0 if math.isqrt(tokens) ** 2 == tokens else 1
        # (batch, token, unit) -> (batch, unit, token): the tokens on the last axis, where token_grid reads them.
        return np.asarray(token_grid(values.transpose(1, 2).numpy(), prefix=prefix), dtype=np.float32)
    raise ConfigError(
        f"heatmaps need a layer's output as (batch, unit, y, x) or (batch, token, unit) with the top-k's {units} "
        f"units; got shape {tuple(values.shape)}",
        where="key 'heatmaps'",
    )


def map_peak(amap: np.ndarray) -> tuple[float, float]:
    """Where a map is highest: the centre of its largest cell as fractions ``(y, x)`` of the image's height and width.

    Map cell ``(i, j)`` of an ``(h, w)`` map covers the image block whose centre is at
    ``((i + 0.5) / h, (j + 0.5) / w)`` of the image (the geometry of
    :func:`mergescope.heatmaps.upsample`); ties go to the first cell in row-major order.
    """
    h, w = amap.shape
    i, j = np.unravel_index(int(np.argmax(amap)), amap.shape)
    return (i + 0.5) / h, (j + 0.5) / w


class _evaluating:
    """Models in eval mode for a pass, each module's own mode restored after."""

    def __init__(self, models: Iterable[Any]) -> None:
        self.modes = [(m, m.training) for model in models for m in model.modules()]

    def __enter__(self) -> None:
        for module, _ in self.modes:
            module.training = False

    def __exit__(self, *exc: Any) -> None:
        for module, mode in self.modes:
            module.training = mode


def _record_maps(plans: Sequence[_Layer], models: Sequence[str], context: Context, tiles: _Tiles) -> None:
    """Fill every plan's ``maps``: each model row's map of each drawn unit on each of its top-k images.

    One pass over the union of the images the model rows show, in batches of the context's
    batch size; each batch is loaded once (its display tiles kept in ``tiles`` for the
    grids) and given to every model. Only the maps shown are kept, so memory grows with the
    grids, not the dataset.
    """
    modules = {m: context.modules[m] for m in models}
    rows = {m: plans[0].labels.index(m) for m in models}
    wanted = [p.ids[rows[m]][:, p.units] for p in plans for m in models]
    union = np.unique(np.concatenate([w.ravel() for w in wanted])) if wanted else np.zeros(0, np.int64)
    layers = [p.name for p in plans]
    for plan in plans:
        plan.maps = np.full((len(plan.labels), plan.ids.shape[1], len(plan.units)), None, dtype=object)
    captured: dict[str, torch.Tensor] = {}

    def sink(layer: str, output: torch.Tensor) -> None:
        captured[layer] = output.detach()  # a module called twice keeps its last call, as the recording does

    handles = [h for m in models for h in attach_recorders(modules[m], layers, sink, m)]
    chunks = [union[i : i + context.batch_size] for i in range(0, len(union), context.batch_size)]
    try:
        with _evaluating(modules.values()), torch.no_grad(), autocast(context.device, context.precision):
            for chunk in context.progress(chunks, desc="top-k heatmaps", total=len(chunks)):
                batches = tiles.batches(chunk)
                for model in models:
                    for batch_ids, images in batches:
                        captured.clear()
                        modules[model](images.to(model_device(modules[model])))
                        for plan in plans:
                            _keep_maps(plan, rows[model], batch_ids, captured[plan.name])
    finally:
        for handle in handles:
            handle.remove()


def _keep_maps(plan: _Layer, row: int, batch_ids: np.ndarray, output: torch.Tensor) -> None:
    """Store in ``plan.maps[row]`` the maps of ``output`` (one batch) that the row's grids show."""
    assert plan.maps is not None
    shown = plan.ids[row][:, plan.units]  # (rank, drawn unit)
    order = np.argsort(batch_ids)
    found = np.searchsorted(batch_ids, shown, sorter=order)
    found = np.minimum(found, len(batch_ids) - 1)
    position = order[found]
    hit = batch_ids[position] == shown
    if not hit.any():
        return
    maps = spatial_maps(output, plan.ids.shape[2])
    if maps is None:
        plan.spatial = False
        return
    for rank, j in zip(*np.nonzero(hit)):
        plan.maps[row, rank, j] = maps[position[rank, j], plan.units[j]]


def _heat_tiles(
    plan: _Layer, j: int, tiles: np.ndarray, shapes: np.ndarray, scale: str, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """The tiles ``(row, rank, tile, tile, 3)`` of drawn unit ``j`` with its maps laid over the images.

    Each map is drawn over the image's part of its tile (letterboxing stays white); rows
    without maps keep their plain tiles. Returns the tiles and the ``vmax`` of each map
    (NaN where none).
    """
    assert plan.maps is not None
    heat = tiles.copy()
    size = tiles.shape[2]
    rows, k = plan.maps.shape[:2]
    vmax = np.full((rows, k), np.nan)
    for r in range(rows):
        maps = [plan.maps[r, rank, j] for rank in range(k)]
        if any(m is None for m in maps):
            continue
        tops = np.array([float(m.max()) for m in maps])
        if scale == "unit":
            present = [plan.maps[q, rank, j] for q in range(rows) for rank in range(k)]
            tops[:] = max(float(m.max()) for m in present if m is not None)
        elif scale == "row":
            tops[:] = tops.max()
        for rank, amap in enumerate(maps):
            top, left, h, w = _placement(*shapes[r, rank], size)
            region = heat[r, rank, top : top + h, left : left + w]
            given = tops[rank] if tops[rank] > 0 else None  # a map with nothing positive draws as the bottom colour
            heat[r, rank, top : top + h, left : left + w] = overlay(region, amap, alpha=alpha, vmax=given)
            vmax[r, rank] = tops[rank]
    return heat, vmax


# ------------------------------------------------------------------- optimised images


def _optimised(results: xr.DataTree, step: str, plans: Sequence[_Layer], out_dir: Path, tile: int) -> None:
    """Fill every plan's optimised images from the feature-vis step ``step``.

    Per row (a model the step visualised) and drawn unit: the step's best image of the unit
    (largest ``activation_reached``), as a display tile, its activation and its PNG
    relative to ``out_dir``. Images come from the step's ``pixels`` or, where it kept
    none (large runs), from its PNGs in the step's figure folder, beside ``out_dir``.

    Raises
    ------
    ConfigError
        ``step`` is not an earlier step, holds no feature-vis results, or shares no model,
        layer and unit with the grids.
    """
    if step not in results.children:
        known = ", ".join(results.children) or "none"
        raise ConfigError(
            f"{step!r} is not a step whose results this step can read (earlier steps: {known}); name a feature-vis "
            "step that comes before this one",
            where="key 'optimised'",
        )
    ds = results[step].to_dataset(inherit=True)
    dims = ("model", "layer", "unit", "image")
    if (
        "activation_reached" not in ds
        or ds["activation_reached"].dims != dims
        or not ("pixels" in ds or "image_file" in ds)
    ):
        held = ", ".join(map(str, ds.data_vars)) or "no variables"
        raise ConfigError(
            f"step {step!r} holds no feature-vis images (it holds {held}); 'optimised' reads a feature-vis step's "
            "activation_reached (model, layer, unit, image) and its pixels or image_file",
            where="key 'optimised'",
        )
    models = [str(m) for m in ds["model"].values]
    layers = [str(layer) for layer in ds["layer"].values]
    units = [int(u) for u in ds["unit"].values]
    reached = np.asarray(ds["activation_reached"].values, dtype=np.float64)
    files = np.asarray(ds["image_file"].values).astype(str) if "image_file" in ds else None
    pixels = ds.get("pixels")
    folder = out_dir.parent / step  # a visualizer's files lie in figures/<step>
    found = 0
    for plan in plans:
        rows, count = len(plan.labels), len(plan.units)
        plan.optimised = np.full((rows, count, tile, tile, 3), _PAPER, dtype=np.uint8)
        plan.optimised_value = np.full((rows, count), np.nan)
        plan.optimised_file = np.full((rows, count), "", dtype=object)
        if plan.name not in layers:
            continue
        li = layers.index(plan.name)
        for r, label in enumerate(plan.labels):
            if label not in models:
                continue
            m = models.index(label)
            for j, unit in enumerate(plan.units.tolist()):
                if unit not in units:
                    continue
                u = units.index(unit)
                if not np.isfinite(reached[m, li, u]).any():
                    continue
                best = int(np.nanargmax(reached[m, li, u]))
                file = str(files[m, li, u, best]) if files is not None else ""
                if pixels is not None:
                    image = np.asarray(pixels[m, li, u, best].values)
                elif file and (folder / file).is_file():
                    image = _png_as_chw(folder / file)
                else:
                    continue
                plan.optimised[r, j] = display_image(image, tile)
                plan.optimised_value[r, j] = reached[m, li, u, best]
                if file:
                    plan.optimised_file[r, j] = os.path.relpath(folder / file, out_dir).replace(os.sep, "/")
                found += 1
    if not found:
        shown = sorted({label for p in plans for label in p.labels})
        raise ConfigError(
            f"feature-vis step {step!r} visualised models {models} at layers {layers} (units {units[:10]}"
            f"{', ...' if len(units) > 10 else ''}), none of which this step draws (rows {shown}, layers "
            f"{[p.name for p in plans]}); give both steps the same models and layers",
            where="key 'optimised'",
        )


def _png_as_chw(path: Path) -> np.ndarray:
    """A PNG as ``(C, H, W)`` with 1 or 3 channels."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("L" if image.mode in ("L", "I", "I;16", "1") else "RGB"))
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


# ---------------------------------------------------------------------------- metrics


@attrs.define
class _Metrics:
    """Metric values of one layer: per row (beside it) and per unit (in the header)."""

    row_names: list[str] = attrs.field(factory=list)  # "<step>:<variable>"
    row_labels: list[str] = attrs.field(factory=list)  # the variable names shown
    per_row: np.ndarray | None = None  # (rows, metrics, units), NaN where a row has no value
    unit_names: list[str] = attrs.field(factory=list)
    unit_labels: list[str] = attrs.field(factory=list)
    per_unit: np.ndarray | None = None  # (metrics, units)


def _metric_values(results: xr.DataTree, steps: Sequence[str], layer: str, rows: Sequence[str], units: int) -> _Metrics:
    out = _Metrics()
    per_row, per_unit = [], []
    for step in steps:
        ds = _result_node(results, step, layer, "metrics")
        if ds is None:  # the metric step did not score this layer
            continue
        for name, var in ds.data_vars.items():
            if "unit" not in var.dims or not set(var.dims) <= {"unit", "model"}:
                continue
            if "unit" in var.coords:  # align on unit indices; NaN where the metric has none
                var = var.reindex(unit=np.arange(units))
            elif var.sizes["unit"] != units:
                continue
            if "model" in var.dims:
                models = [str(m) for m in var["model"].values] if "model" in var.coords else []
                table = np.full((len(rows), units), np.nan)
                for r, row in enumerate(rows):
                    if row in models:
                        table[r] = np.asarray(var.isel(model=models.index(row)).values, dtype=np.float64)
                per_row.append(table)
                out.row_names.append(f"{step}:{name}")
                out.row_labels.append(str(name))
            else:
                per_unit.append(np.asarray(var.values, dtype=np.float64))
                out.unit_names.append(f"{step}:{name}")
                out.unit_labels.append(str(name))
    if per_row:
        out.per_row = np.stack(per_row, axis=1)
    if per_unit:
        out.per_unit = np.stack(per_unit)
    return out


@attrs.define
class _Layer:
    """What the grids of one layer show."""

    name: str
    folder: str  # the layer's folder under out_dir
    ids: np.ndarray  # (row, rank, unit) sample ids
    values: np.ndarray  # (row, rank, unit) activations
    units: np.ndarray  # the units drawn
    labels: list[str]  # row labels
    metrics: _Metrics
    # Where it fires: (row, rank, drawn unit) maps (h, w), None for rows without a model.
    maps: np.ndarray | None = None
    spatial: bool = True  # False when the layer's output has no positions
    # The optimised images: (row, drawn unit, tile, tile, 3) tiles, paper where none; values and files.
    optimised: np.ndarray | None = None
    optimised_value: np.ndarray | None = None
    optimised_file: np.ndarray | None = None

    @property
    def has_maps(self) -> bool:
        """Whether the layer's grids get heatmaps."""
        return self.maps is not None and self.spatial

    def entry(self, unit: int, j: int, file: str) -> dict[str, Any]:
        """The index entry of ``unit`` (the ``j``-th unit drawn)'s grid."""
        rows = len(self.labels)
        m = self.metrics
        entry = {
            "layer": self.name,
            "unit": unit,
            "file": file,
            "ids": self.ids[:, :, unit],
            "values": self.values[:, :, unit],
            "metric_names": m.row_names,
            "metrics": m.per_row[:, :, unit] if m.per_row is not None else np.zeros((rows, 0)),
            "unit_metric_names": m.unit_names,
            "unit_metrics": m.per_unit[:, unit] if m.per_unit is not None else np.zeros(0),
        }
        if self.optimised_value is not None and self.optimised_file is not None:
            entry["optimised_value"] = self.optimised_value[:, j]
            entry["optimised_file"] = self.optimised_file[:, j]
        return entry


# ------------------------------------------------------------------------- visualizer


def _unit_list(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, list) or any(isinstance(u, bool) or not isinstance(u, int) or u < 0 for u in value):
        raise ValueError(f"'{attribute.name}' must be a list of unit indices (integers >= 0), got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"'{attribute.name}' must not repeat a unit, got {value!r}")


def _names(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, list) or any(not isinstance(s, str) or not s for s in value):
        raise ValueError(f"'{attribute.name}' must be a list of step names, got {value!r}")


def _row_selection(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    ok = isinstance(value, dict) and all(
        isinstance(dim, str) and isinstance(v, list) and v and all(isinstance(x, (str, int)) for x in v)
        for dim, v in value.items()
    )
    if not ok:
        raise ValueError(
            f"'{attribute.name}' must map a dim name to a non-empty list of its values, "
            f'e.g. {{ sparsity = ["100%", "10%"] }}, got {value!r}'
        )


_non_negative_int = [attrs.validators.instance_of(int), attrs.validators.ge(0)]


@attrs.define
class TopKGrids:
    """Grid per unit of the k dataset images that activate it most, one row per model, metrics beside.

    One PNG per layer and unit, ``<layer>/unit-<NNNN>.png`` under the step's figure
    folder (layer names made safe for file names), plus ``topk-index.nc`` mapping every
    grid to its file, its rows' top-k sample ids and values and the metric values shown.

    Rows: the step's ``models`` in order (declared, merged or aligned models; their top-k
    is the recording's, ``[activations] topk``), then one row per step of ``rows_from``.

    Parameters
    ----------
    k
        Images per row; 0 (default): all the recording kept (``[activations] topk``).
        More than the recording kept, or than the dataset holds, is an error.
    units
        Units to draw (indices); empty (default): every unit of every layer.
    max_units
        Draw at most this many units per layer (the first ones); 0 (default): no cap.
    rows_from
        Earlier steps whose ``/<step>/<layer>`` results hold ``topk_sample`` (and
        ``topk_value``) on dims ``(rank, unit)``: each adds a row labelled with the step
        name, e.g. regression-aligned activations. Any further dim gives one row per
        value, labelled ``<step>:<value>`` (``(model, rank, unit)``: one row per model;
        a regression's ``(sparsity, rank, unit)``: one row per sparsity level);
        ``(rank, latent)`` counts latents as units (a crosscoder's).
    model_rows
        Draw the step's models as rows (default); ``false``: only the rows of
        ``rows_from``, e.g. one grid per crosscoder latent.
    rows_select
        Which values of the extra dims of ``rows_from`` results become rows, e.g.
        ``{sparsity = ["100%", "10%", "top-5"]}`` for a regression's sparsity sweep, or
        ``{model = ["b"]}``; a dim not named keeps all its values.
    metrics
        Earlier metric steps whose per-unit values are written beside the rows: a
        variable on dims ``(model, unit)`` beside the row of that model, one on ``(unit,)``
        (e.g. ``kendall_tau_mean``, ``kendall_tau_std``) in the grid's header. A metric
        step that did not score a layer adds nothing to that layer's grids.
    tile
        Side of every image tile in pixels; every image is scaled to fit it.
    gap
        White pixels between tiles and between rows.
    heatmaps
        Also draw where each unit fires: every model row's top-k images with the unit's
        activation map over them, in a second grid per unit (``unit-<NNNN>-heatmap.png``)
        that the report's browser toggles to. Costs one forward pass of the step's models
        over just the images shown. Layers without positions get none.
    heatmap_scale
        What a heatmap's brightest colour means: ``"row"`` (default) the largest
        activation over the row's k images (one model's images compare with each other),
        ``"unit"`` over the whole grid (models compare too), ``"image"`` each image's own
        largest.
    heatmap_alpha
        Weight of the colour map over the image, in [0, 1].
    optimised
        An earlier ``feature-vis`` step: beside each model's row, the image it optimised
        for the unit in that model (its best one when it made several), in a column left
        of rank 0. Unset (default): none.
    """

    name: ClassVar[str] = "top-k"
    paper: ClassVar[str] = (
        "Zou 2025, Model Merging and Feature Visualization in Deep Neural Networks "
        "(thesis, Concordia University; top-10 images per channel: Figs. 3.3, 3.4, appendices A and C)"
    )

    k: int = attrs.field(default=0, validator=_non_negative_int)
    units: list[int] = attrs.field(factory=list, validator=_unit_list)
    max_units: int = attrs.field(default=0, validator=_non_negative_int)
    rows_from: list[str] = attrs.field(factory=list, validator=_names)
    metrics: list[str] = attrs.field(factory=list, validator=_names)
    model_rows: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    rows_select: dict[str, list[Any]] = attrs.field(factory=dict, validator=_row_selection)
    tile: int = attrs.field(default=48, validator=[attrs.validators.instance_of(int), attrs.validators.ge(4)])
    gap: int = attrs.field(default=2, validator=_non_negative_int)
    heatmaps: bool = attrs.field(default=False, validator=boolean)
    heatmap_scale: str = attrs.field(default="row", validator=one_of(*HEATMAP_SCALES))
    heatmap_alpha: float = attrs.field(default=0.5, validator=probability)
    optimised: str | None = attrs.field(default=None, validator=optional(non_empty_str))

    def render(self, results: xr.DataTree, out_dir: Path, context: Context | None = None) -> list[Path]:
        """Draw the grids of every layer and unit of the step into ``out_dir``.

        Returns
        -------
        list of Path
            The PNGs and ``topk-index.nc``; nothing without a context, models or layers
            (e.g. outside a pipeline).

        Raises
        ------
        ConfigError
            ``k`` larger than the recorded top-k or the dataset, a unit outside a layer,
            a ``rows_from``, ``metrics`` or ``optimised`` step that does not exist, rows
            without top-k at a layer, or heatmaps without the models to run.
        """
        if context is None or not context.layers or not (context.models if self.model_rows else self.rows_from):
            return []
        self._check_heatmaps(context)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tiles, text = _Tiles(context, self.tile), _Text()
        folders: list[str] = []
        plans: list[_Layer] = []
        for layer in context.layers:
            plan = self._plan(results, context, layer, folders)
            if plans and plan.labels != plans[0].labels:
                raise ConfigError(
                    f"layer {layer!r} has rows {plan.labels} but an earlier layer had {plans[0].labels}",
                    where="key 'rows_from'",
                )
            folders.append(plan.folder)
            plans.append(plan)
        drawn = [p for p in plans if len(p.units)]
        if self.optimised is not None and drawn:
            _optimised(results, self.optimised, drawn, out_dir, self.tile)
        if self.heatmaps and drawn:
            _record_maps(drawn, list(context.models), context, tiles)
        entries: list[dict[str, Any]] = []
        paths: list[Path] = []
        for plan in drawn:
            paths += self._draw(plan, tiles, text, out_dir / plan.folder, context, entries)
        index_path = out_dir / INDEX_FILE
        _index(entries, plans[0].labels).to_netcdf(index_path)
        return [*paths, index_path]

    def _check_heatmaps(self, context: Context) -> None:
        """Refuse heatmaps without model rows or the models' modules, before any work."""
        if not self.heatmaps:
            return
        if not self.model_rows:
            raise ConfigError(
                "heatmaps draw where the step's models fire, but model_rows = false draws no model; "
                "set model_rows = true or heatmaps = false",
                where="key 'heatmaps'",
            )
        missing = [m for m in context.models if m not in context.modules]
        if missing:
            raise ConfigError(
                f"heatmaps run the step's models over their top-k images, but this context holds no module for "
                f"{', '.join(map(repr, missing))}; run the step in a pipeline (its 'models' key), or pass the "
                "modules in Context(modules=...)",
                where="key 'heatmaps'",
            )

    # -- what to draw

    def _plan(self, results: xr.DataTree, context: Context, layer: str, folders: list[str]) -> _Layer:
        rows = [_store_row(context, m, layer) for m in context.models] if self.model_rows else []
        found: set[str] = set()
        for step in self.rows_from:
            step_rows, dims = _result_rows(results, step, layer, self.rows_select)
            rows.extend(step_rows)
            found |= dims
        unknown = sorted(set(self.rows_select) - found)
        if unknown:
            raise ConfigError(
                f"'rows_select' names dim {unknown[0]!r}, which no 'rows_from' result has at layer {layer!r} "
                f"(their extra dims: {sorted(found) or 'none'})",
                where="key 'rows_select'",
            )
        labels = [r.label for r in rows]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"two rows share a label in {labels}; rename a step or a model", where="key 'rows_from'")
        k, units = self._k(rows, layer), self._units(rows, layer)
        ids = np.stack([r.ids[:k] for r in rows])  # (row, rank, unit)
        empty = (ids[:, :, units] < 0).any(axis=(1, 2))
        if empty.any():
            source = rows[int(np.flatnonzero(empty)[0])].source
            raise ConfigError(f"{source} has empty top-k slots at layer {layer!r} for k = {k}", where="key 'k'")
        return _Layer(
            name=layer,
            folder=_unique_folder(layer, folders),
            ids=ids,
            values=np.stack([r.values[:k] for r in rows]),
            units=units,
            labels=labels,
            metrics=_metric_values(results, self.metrics, layer, labels, rows[0].ids.shape[1]),
        )

    def _k(self, rows: Sequence[_Row], layer: str) -> int:
        """The k to draw: the option, or all that every row holds."""
        limits = [(r, min(r.ids.shape[0], r.samples if r.samples is not None else r.ids.shape[0])) for r in rows]
        if self.k == 0:
            return max(1, min(limit for _, limit in limits))
        for row, limit in limits:
            if self.k > limit:
                samples = f"{row.samples} samples" if row.samples is not None else "an unknown number of samples"
                raise ConfigError(
                    f"k = {self.k} but {row.source} at layer {layer!r} kept the top {row.ids.shape[0]} "
                    f"(the recording's k) of {samples}; set k <= {limit}"
                    + (" or raise [activations] topk" if row.ids.shape[0] < self.k else ""),
                    where="key 'k'",
                )
        return self.k

    def _units(self, rows: Sequence[_Row], layer: str) -> np.ndarray:
        count = rows[0].ids.shape[1]
        for row in rows[1:]:
            if row.ids.shape[1] != count:
                raise ConfigError(
                    f"layer {layer!r} has {count} units in {rows[0].source} but {row.ids.shape[1]} in {row.source}; "
                    "every row must describe the same units"
                )
        units = np.asarray(self.units or range(count), dtype=np.int64)
        outside = units[units >= count]
        if outside.size:
            raise ConfigError(
                f"unit {int(outside[0])} is outside layer {layer!r}, which has {count} units (0..{count - 1})",
                where="key 'units'",
            )
        if self.max_units and len(units) > self.max_units:
            log.info("top-k: drawing %d of the %d units of %s (max_units)", self.max_units, len(units), layer)
            units = units[: self.max_units]
        return units

    # -- drawing

    def _layout(self, plan: _Layer, text: _Text) -> GridLayout:
        """Label column as wide as the widest label or value of the layer; header above."""
        metrics, units = plan.metrics, plan.units
        rows, k = plan.ids.shape[:2]
        mode = _label_mode(self.tile, text.line, len(metrics.row_labels))
        widest = [text.width(name) for name in plan.labels]
        if metrics.per_row is not None and mode != "none":
            extremes = [
                f"{m} = {_format(-_max_abs(metrics.per_row[:, i, units]))}" for i, m in enumerate(metrics.row_labels)
            ]
            widest += [text.width(", ".join(extremes))] if mode == "one" else [text.width(e) for e in extremes]
        header = [text.width(f"{plan.name}, unit {units.max()}")]
        if metrics.per_unit is not None:
            header += [
                text.width(f"{m} = {_format(-_max_abs(metrics.per_unit[i, units]))}")
                for i, m in enumerate(metrics.unit_labels)
            ]
        lead = plan.optimised is not None
        grid_w = k * self.tile + (k - 1) * self.gap + (lead_width(self.tile, self.gap) if lead else 0)
        label_width = max(2 * _PAD + max(widest), max(header) + 2 * _PAD - grid_w)
        if lead:  # the caption above the optimised column, which starts at the label column's edge
            label_width = max(label_width, text.width(OPTIMISED_LABEL) + _PAD - grid_w)
        header_height = (1 + len(metrics.unit_labels) + lead) * text.line + 2 * _PAD
        return grid_layout(rows, k, self.tile, self.gap, label_width, header_height, lead=lead)

    def _draw(
        self, plan: _Layer, tiles: _Tiles, text: _Text, folder: Path, context: Context, entries: list[dict[str, Any]]
    ) -> list[Path]:
        shown = plan.ids[:, :, plan.units]
        tiles.load(shown)
        bank, position = tiles.bank(shown)  # position: (row, rank, index into plan.units)
        layout = self._layout(plan, text)
        colour = tiles.colour or plan.optimised is not None and bool((plan.optimised != plan.optimised[..., :1]).any())
        if plan.has_maps:
            shapes = np.array([tiles.shapes[int(i)] for i in shown.ravel()]).reshape(*shown.shape, 2)

        # What every grid of the layer shares: background and row names.
        base = np.full((layout.height, layout.width, 3), _PAPER, dtype=np.uint8)
        for r, name in enumerate(plan.labels):
            text.draw(base, name, layout.row_top(r) + _PAD // 2, _PAD, layout.labels_right)
        if layout.lead_left is not None:
            text.draw(base, OPTIMISED_LABEL, layout.tiles_top - text.line - _PAD // 2, layout.lead_left, layout.width)

        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        units = plan.units.tolist()
        for j, unit in enumerate(context.progress(units, desc=f"top-k grids {plan.name}", total=len(units))):
            ranked = bank[position[:, :, j]]  # (row, rank, tile, tile, 3)
            canvas = self._canvas(base, layout, ranked, plan, j)
            self._write_texts(canvas, text, layout, plan, unit)
            path = folder / f"unit-{unit:04d}.png"
            _save_grid(canvas, path, colour)
            paths.append(path)
            entry = plan.entry(unit, j, f"{folder.name}/{path.name}")
            if plan.has_maps:
                heat, vmax = _heat_tiles(plan, j, ranked, shapes[:, :, j], self.heatmap_scale, self.heatmap_alpha)
                canvas = self._canvas(base, layout, heat, plan, j)
                self._write_texts(canvas, text, layout, plan, unit)
                heat_path = folder / f"unit-{unit:04d}{HEATMAP_SUFFIX}.png"
                _save_grid(canvas, heat_path, True)
                paths.append(heat_path)
                entry |= _heat_entry(plan, j, vmax, f"{folder.name}/{heat_path.name}")
            entries.append(entry)
        return paths

    def _canvas(self, base: np.ndarray, layout: GridLayout, ranked: np.ndarray, plan: _Layer, j: int) -> np.ndarray:
        """One grid: ``base`` with the ranked tiles ``(row, rank, tile, tile, 3)`` and the optimised column."""
        rows, k = ranked.shape[:2]
        tile, gap = self.tile, self.gap
        block = np.full((rows, k, tile + gap, tile + gap, 3), _PAPER, dtype=np.uint8)
        block[:, :, :tile, :tile] = ranked
        # (row, rank, y, x, rgb) -> (row, y, rank, x, rgb): one image, then drop the trailing gap.
        grid = block.transpose(0, 2, 1, 3, 4).reshape(rows * (tile + gap), k * (tile + gap), 3)
        canvas = base.copy()
        grid_h, grid_w = layout.height - layout.tiles_top, layout.width - layout.tiles_left
        canvas[layout.tiles_top :, layout.tiles_left :] = grid[:grid_h, :grid_w]
        if layout.lead_left is not None and plan.optimised is not None:
            for r in range(rows):
                top = layout.row_top(r)
                canvas[top : top + tile, layout.lead_left : layout.lead_left + tile] = plan.optimised[r, j]
        return canvas

    def _write_texts(self, canvas: np.ndarray, text: _Text, layout: GridLayout, plan: _Layer, unit: int) -> None:
        """The unit's header and the metric values beside the rows."""
        metrics = plan.metrics
        right = canvas.shape[1] - _PAD
        text.draw(canvas, f"{plan.name}, unit {unit}", _PAD, _PAD, right)
        if metrics.per_unit is not None:
            for i, name in enumerate(metrics.unit_labels):
                line = f"{name} = {_format(metrics.per_unit[i, unit])}"
                text.draw(canvas, line, _PAD + (i + 1) * text.line, _PAD, right)
        mode = _label_mode(layout.tile, text.line, len(metrics.row_labels))
        if metrics.per_row is None or mode == "none":
            return
        for r in range(len(plan.labels)):
            shown = [
                f"{name} = {_format(metrics.per_row[r, i, unit])}"
                for i, name in enumerate(metrics.row_labels)
                if np.isfinite(metrics.per_row[r, i, unit])
            ]
            if mode == "one" and shown:
                shown = [", ".join(shown)]
            top = layout.row_top(r) + _PAD // 2
            for i, line in enumerate(shown):
                text.draw(canvas, line, top + (i + 1) * text.line, _PAD, layout.labels_right)

    def report_panel(
        self,
        node: xr.Dataset,
        files: list[Path],
        run_dir: Path,
        *,
        results: xr.DataTree | None = None,
        metric_steps: Sequence[str] | None = None,
    ) -> Panel | str:
        """The step's panel in the report: the unit browser of its grids (see :func:`unit_browser_panel`)."""
        return unit_browser_panel(node, run_dir, results, files=files, metric_steps=metric_steps)

    def describe(self, result: xr.Dataset) -> str:
        """How many grids over how many layers, and their rows."""
        if "grid_file" not in result:
            return "no top-k grids (no models or layers)"
        layers = list(dict.fromkeys(str(v) for v in result["layer"].values))
        rows = ", ".join(str(r) for r in result["row"].values)
        extras = []
        if "heatmap_file" in result:
            extras.append(f"heatmaps for {int((result['heatmap_file'] != '').sum())}")
        if "optimised_file" in result:
            shown = np.isfinite(np.asarray(result["optimised_activation"].values))
            extras.append(f"{int(shown.sum())} optimised images")
        more = f"; {', '.join(extras)}" if extras else ""
        return f"{result.sizes['entry']} top-k grids over {len(layers)} layers (rows: {rows}{more})"


def _save_grid(canvas: np.ndarray, path: Path, colour: bool) -> None:
    """Write a grid as PNG; grey grids as one channel, a third of the bytes to compress."""
    from PIL import Image

    Image.fromarray(canvas if colour else canvas[..., 0]).save(path, compress_level=1)  # fast; grids are small


def _heat_entry(plan: _Layer, j: int, vmax: np.ndarray, file: str) -> dict[str, Any]:
    """The index values of drawn unit ``j``'s heatmaps: file, peak of every map, its maximum and colour scale."""
    assert plan.maps is not None
    rows, k = plan.maps.shape[:2]
    peak = np.full((rows, k, 2), np.nan)
    top = np.full((rows, k), np.nan)
    for r in range(rows):
        for rank in range(k):
            amap = plan.maps[r, rank, j]
            if amap is not None:
                peak[r, rank] = map_peak(amap)
                top[r, rank] = float(amap.max())
    return {"heatmap_file": file, "peak": peak, "map_max": top, "vmax": vmax}


def _unique_folder(layer: str, taken: Iterable[str]) -> str:
    """A folder name for ``layer`` that no other layer of the render uses."""
    taken = set(taken)
    base = name = safe_name(layer)
    n = 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def _index(entries: list[dict[str, Any]], rows: list[str]) -> xr.Dataset:
    """Index of the grids: one ``entry`` per (layer, unit).

    Variables: ``grid_file`` (entry; path relative to the index file),
    ``topk_sample`` (entry, row, rank; -1 past a layer's k), ``topk_value`` (entry, row,
    rank), ``metric_value`` (entry, row, metric) and ``unit_metric_value`` (entry,
    unit_metric); coords ``layer`` and ``unit`` on ``entry``, ``row`` (row labels),
    ``rank``, ``metric`` and ``unit_metric`` (``"<step>:<variable>"``).

    With optimised images: ``optimised_file`` (entry, row; the feature-vis PNG relative to
    the index file, ``""`` where none) and ``optimised_activation`` (entry, row). With
    heatmaps: ``heatmap_file`` (entry; ``""`` for layers without positions),
    ``heatmap_peak_y`` / ``heatmap_peak_x`` (entry, row, rank; where the map is highest,
    as fractions of the image's height and width), ``heatmap_max`` (the map's largest
    activation) and ``heatmap_vmax`` (the activation drawn at the top of the colour map);
    NaN for rows without a model.
    """
    if not entries:
        return xr.Dataset(coords={"row": np.asarray(rows, dtype=str)})
    k = max(e["ids"].shape[1] for e in entries)
    metric_names = list(dict.fromkeys(n for e in entries for n in e["metric_names"]))
    unit_metric_names = list(dict.fromkeys(n for e in entries for n in e["unit_metric_names"]))
    n, r = len(entries), len(rows)
    ids = np.full((n, r, k), -1, dtype=np.int64)
    values = np.full((n, r, k), np.nan)
    metric = np.full((n, r, len(metric_names)), np.nan)
    unit_metric = np.full((n, len(unit_metric_names)), np.nan)
    for i, e in enumerate(entries):
        kk = e["ids"].shape[1]
        ids[i, :, :kk], values[i, :, :kk] = e["ids"], e["values"]
        for j, name in enumerate(e["metric_names"]):
            metric[i, :, metric_names.index(name)] = e["metrics"][:, j]
        for j, name in enumerate(e["unit_metric_names"]):
            unit_metric[i, unit_metric_names.index(name)] = e["unit_metrics"][j]
    ds = xr.Dataset(
        {
            "grid_file": ("entry", np.asarray([e["file"] for e in entries], dtype=str)),
            "topk_sample": (("entry", "row", "rank"), ids),
            "topk_value": (("entry", "row", "rank"), values),
        },
        coords={
            "layer": ("entry", np.asarray([e["layer"] for e in entries], dtype=str)),
            "unit": ("entry", np.asarray([e["unit"] for e in entries], dtype=np.int64)),
            "row": np.asarray(rows, dtype=str),
            "rank": np.arange(k),
        },
    )
    if metric_names:
        ds["metric_value"] = (("entry", "row", "metric"), metric)
        ds = ds.assign_coords(metric=np.asarray(metric_names, dtype=str))
    if unit_metric_names:
        ds["unit_metric_value"] = (("entry", "unit_metric"), unit_metric)
        ds = ds.assign_coords(unit_metric=np.asarray(unit_metric_names, dtype=str))
    if any("optimised_file" in e for e in entries):
        optimised_file = np.full((n, r), "", dtype=object)
        optimised_value = np.full((n, r), np.nan)
        for i, e in enumerate(entries):
            if "optimised_file" in e:
                optimised_file[i], optimised_value[i] = e["optimised_file"], e["optimised_value"]
        ds["optimised_file"] = (("entry", "row"), optimised_file.astype(str))
        ds["optimised_activation"] = (("entry", "row"), optimised_value)
    if any("heatmap_file" in e for e in entries):
        heat_file = np.full(n, "", dtype=object)
        peak = np.full((n, r, k, 2), np.nan)
        map_max, vmax = np.full((n, r, k), np.nan), np.full((n, r, k), np.nan)
        for i, e in enumerate(entries):
            if "heatmap_file" in e:
                kk = e["peak"].shape[1]
                heat_file[i], peak[i, :, :kk], map_max[i, :, :kk], vmax[i, :, :kk] = (
                    e["heatmap_file"],
                    e["peak"],
                    e["map_max"],
                    e["vmax"],
                )
        ds["heatmap_file"] = ("entry", heat_file.astype(str))
        ds["heatmap_peak_y"] = (("entry", "row", "rank"), peak[..., 0])
        ds["heatmap_peak_x"] = (("entry", "row", "rank"), peak[..., 1])
        ds["heatmap_max"] = (("entry", "row", "rank"), map_max)
        ds["heatmap_vmax"] = (("entry", "row", "rank"), vmax)
    return ds


# ------------------------------------------------------------------- report: unit browser


def _index_file_var(node: xr.Dataset) -> str | None:
    for name in ("grid_file", "file"):
        if name in node.variables and node[name].dims == ("entry",):
            return name
    return None


def has_unit_index(node: xr.Dataset) -> bool:
    """Whether ``node`` indexes one image per unit: ``layer``, ``unit`` and ``grid_file`` (or ``file``) on ``entry``."""
    return _index_file_var(node) is not None and all(
        name in node.variables and node[name].dims == ("entry",) for name in ("layer", "unit")
    )


def _index_files(node: xr.Dataset, run_dir: Path, files: Sequence[Path]) -> list[str]:
    """Every entry's image, relative to ``run_dir`` (posix).

    The index stores paths relative to the index file (``topk-index.nc`` in the step's
    figure folder); the folder is found from the step's ``.nc`` files, and paths that
    already resolve from ``run_dir`` are kept.
    """
    var = _index_file_var(node)
    assert var is not None
    names = [str(v) for v in node[var].values]
    if not names:
        return []
    base = _index_base(names[0], run_dir, files)
    return [_from_base(base, n) for n in names]


def _index_base(first: str, run_dir: Path, files: Sequence[Path]) -> Path:
    """The folder (relative to ``run_dir``) that the index's paths start from, found by its first image ``first``."""
    bases = [f.parent for f in files if f.suffix == ".nc"]
    bases += [f.parent for f in files if f.suffix.lower() in IMAGE_SUFFIXES][:1] + [Path(".")]
    return next((b for b in bases if (run_dir / b / first).is_file()), bases[0])


def _from_base(base: Path, name: str) -> str:
    """``name`` (relative to ``base``) relative to the run directory, posix; ``""`` stays ``""``."""
    return PurePosixPath(os.path.normpath((base / name).as_posix())).as_posix() if name else ""


def _extra_images(node: xr.Dataset, run_dir: Path, files: Sequence[Path]) -> tuple[list[str], list[list[str]]]:
    """Every entry's heatmap grid and optimised images (per row), relative to ``run_dir``; ``""`` where none."""
    entries = node.sizes.get("entry", 0)
    var = _index_file_var(node)
    if not entries or var is None:
        return [], []
    base = _index_base(str(node[var].values[0]), run_dir, files)
    heat = [""] * entries
    if "heatmap_file" in node and node["heatmap_file"].dims == ("entry",):
        heat = [_from_base(base, str(v)) for v in node["heatmap_file"].values]
    optimised: list[list[str]] = [[] for _ in range(entries)]
    if "optimised_file" in node and node["optimised_file"].dims == ("entry", "row"):
        optimised = [[_from_base(base, str(v)) for v in row] for row in node["optimised_file"].values]
    return heat, optimised


def _metric_columns(
    results: xr.DataTree, metric_steps: Sequence[str], layer: str, units: np.ndarray
) -> list[tuple[dict[str, str], list[float | None]]]:
    """(label, values per unit) of every per-unit score of ``layer`` in the metric steps."""
    columns = []
    for step in metric_steps:
        if step not in results.children or layer not in results[step].children:
            continue
        ds = results[step][layer].to_dataset(inherit=False)
        for var in unit_scores(ds):
            da = ds[var]
            if da.dims == ("unit",):
                columns.append(({"step": step, "var": var, "model": ""}, _per_unit(da, units)))
                continue
            for i in range(da.sizes["model"]):
                model = str(da["model"].values[i]) if "model" in da.coords else str(i)
                columns.append(({"step": step, "var": var, "model": model}, _per_unit(da.isel(model=i), units)))
    return columns


def _per_unit(da: xr.DataArray, units: np.ndarray) -> list[float | None]:
    if "unit" in da.indexes:
        values = da.reindex(unit=units).values.astype(float)
    else:
        raw = np.asarray(da.values, dtype=float)
        values = np.array([raw[u] if 0 <= u < raw.size else np.nan for u in units])
    return [float(v) if np.isfinite(v) else None for v in values]  # JSON has no NaN


def unit_browser(
    node: xr.Dataset,
    run_dir: str | Path,
    results: xr.DataTree | None = None,
    *,
    files: Sequence[Path] | None = None,
    metric_steps: Sequence[str] | None = None,
) -> str:
    """A per-layer, per-unit browser of images with the units' metric values.

    A layer selector, a table of the layer's units with every metric value beside each
    (click a column header to sort), and the image and values of the chosen unit.

    Parameters
    ----------
    node
        An index of images: variables ``layer``, ``unit`` and ``grid_file`` (or ``file``)
        on dim ``entry``, the image paths relative to the index's ``.nc`` file (as
        :class:`TopKGrids` writes ``topk-index.nc``) or to ``run_dir``.
    run_dir
        The run directory, where the report is.
    results
        The run's results, for the metric values (``/<step>/<layer>`` variables on dims
        ``(model, unit)``, one column per model, or ``(unit,)``); read from
        ``run_dir/results.nc`` when not given and present.
    files
        The step's files, relative to ``run_dir``; default: the node's ``files``.
    metric_steps
        The steps whose scores are shown; default: every step whose layer nodes hold them.

    Returns
    -------
    str
        An HTML fragment; the script of :func:`unit_browser_panel` brings it to life.
    """
    run_dir = Path(run_dir)
    if not has_unit_index(node):
        raise ValueError("unit_browser needs 'layer', 'unit' and 'grid_file' (or 'file') variables on dim 'entry'")
    files = list(files) if files is not None else node_files(node)
    if results is None and (run_dir / "results.nc").is_file():
        results = load_tree(run_dir / "results.nc")
    if metric_steps is None:
        metric_steps = guess_metric_steps(results) if results is not None else []
    paths = _index_files(node, run_dir, files)
    heat, optimised = _extra_images(node, run_dir, files)
    row_names = [str(r) for r in node["row"].values] if "row" in node.coords else []
    layer_of = [str(v) for v in node["layer"].values]
    unit_of = np.asarray(node["unit"].values).astype(np.int64)
    layers = []
    for layer in dict.fromkeys(layer_of):
        rows = [i for i, name in enumerate(layer_of) if name == layer]
        units = unit_of[rows]
        columns = _metric_columns(results, metric_steps, layer, units) if results is not None else []
        entry: dict[str, Any] = {
            "name": layer,
            "units": units.tolist(),
            "files": [quote(paths[i]) for i in rows],
            "columns": [c for c, _ in columns],
            "values": [v for _, v in columns],
        }
        # Only what a layer has: a browser of grids without extras reads as before.
        if any(heat[i] for i in rows):
            entry["heatmaps"] = [quote(heat[i]) for i in rows]
        if any(f for i in rows for f in optimised[i]):
            entry["rows"] = row_names
            entry["optimised"] = [[quote(f) for f in optimised[i]] for i in rows]
        layers.append(entry)
    data = json.dumps({"layers": layers}, separators=(",", ":"), allow_nan=False)
    # Inside <script> only "</" could end the element early; escape every "<", ">" and "&".
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    ident = "ub-" + hashlib.sha1(data.encode()).hexdigest()[:10]
    count = sum(len(layer["units"]) for layer in layers)
    return (
        f'<div class="ms-unit-browser" id="{ident}">'
        f'<script type="application/json" class="ms-data">{data}</script>'
        '<div class="ms-controls"><label>Layer <select class="ms-layer"></select></label> '
        '<span class="ms-hint">Click a unit to see its image and values; click a column header to sort.</span></div>'
        '<div class="ms-body"><div class="ms-list">'
        '<table class="ms-units num"><thead></thead><tbody></tbody></table></div>'
        '<div class="ms-detail" aria-live="polite"></div></div>'
        f"<noscript><p>{count} unit images; the browser needs JavaScript.</p></noscript>"
        "</div>"
    )


@functools.cache
def _browser_assets() -> tuple[str, str]:
    """The unit browser's CSS and script, package data of ``mergescope_plugins``."""
    folder = importlib.resources.files("mergescope_plugins") / "templates"
    css, js = ((folder / f"topk_browser.{ext}").read_text(encoding="utf-8") for ext in ("css", "js"))
    return css, js


def unit_browser_panel(
    node: xr.Dataset,
    run_dir: str | Path,
    results: xr.DataTree | None = None,
    *,
    files: Sequence[Path] | None = None,
    metric_steps: Sequence[str] | None = None,
) -> Panel | str:
    """The report panel of a step whose results index one image per unit (see :func:`has_unit_index`).

    The :func:`unit_browser` of the images and links to the step's other files, with the
    browser's CSS and script (a ``mergescope.report.Panel``); without an index, the report's
    default panel. The parameters are :func:`unit_browser`'s.
    """
    run_dir = Path(run_dir)
    files = list(files) if files is not None else node_files(node)
    if not has_unit_index(node):
        return default_panel(node, run_dir, results, files=files, metric_steps=metric_steps)
    heat, _ = _extra_images(node, run_dir, files)
    grids = set(_index_files(node, run_dir, files)) | set(heat)
    rest = [f for f in files if f.as_posix() not in grids]
    browser = unit_browser(node, run_dir, results, files=files, metric_steps=metric_steps)
    css, js = _browser_assets()
    return Panel(browser + file_list(rest, run_dir), css=css, js=js)


@hookimpl
def register_visualizers(register):
    """Register :class:`TopKGrids`."""
    register(TopKGrids)
