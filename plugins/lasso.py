"""Regression alignment: each reference unit as a (sparse) linear combination of another model's units.

A permutation assumes one-to-one matching between units. Regression drops that
assumption: for every layer and every reference unit ``i``, the activations of unit ``i``
are regressed on *all* units of the other model at that layer,

    a_ref[:, i]  ~  a_m @ w_i + b_i,

fitted (Lasso or ordinary least squares) on a small stratified subset of the data
(``per_class`` images of every class: 5 in the thesis) and then applied to the whole
dataset. The top-k images of the regression-aligned activations ``a_m @ w_i + b_i`` show
whether the reference's feature is recovered by a combination of the other model's
features (thesis, section 3.2.4, Figure 3.5 and Appendix A.3, Figures H and I).

Sparsity sweep. As in the thesis, sparser maps are made by *truncating* the fitted
coefficients, not by refitting: for every reference unit only the coefficients of largest
magnitude are kept (a fraction of the other model's units, e.g. 50%, 25%, 10%, or a
fixed number, e.g. the top 5) and the rest are set to 0. The intercept is then re-centred
(``b = mean(y) - mean(x) @ w``, over the fit subset) so a truncated map stays centred on
the reference's mean; the top-k images do not depend on the intercept. With
``standardize`` (the default) magnitudes are compared as contributions, ``|w| x`` the
input unit's standard deviation, so a unit with small activations does not win for its
large coefficient. For every level the aligner reports R² (on the fit subset and on the
whole dataset), the number of nonzero coefficients, and the Jaccard overlap of the
regression-aligned top-k images with the reference unit's own top-k images.

Regression alignment is per *layer*, not per channel group: the transforms are keyed by
layer name (``transforms[model][layer]``), and the models need not have the same widths
(the map is ``units x units_ref``, not square). It is a measurement of how features relate,
not a map meant to be pushed into a model's weights.

Results of a step ``<step>`` (see :meth:`RegressionAlignment.align` for every variable):
``/<step>/<layer>`` holds ``topk_sample`` / ``topk_value`` ``(sparsity, rank, unit)`` of
every sparsity level (``unit`` being the reference's units; ``(model, sparsity, rank,
unit)`` when several models are aligned), the layout a top-k grid reads to draw
"regression-aligned" rows (``rows_from``, with ``rows_select`` picking levels);
``/<step>/<model>/<layer>`` holds the ``transform`` and the whole sparsity sweep; the
step's root holds means per model, layer and sparsity level.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import numpy as np
import xarray as xr
from torch import nn

from mergescope.activations import read_rows
from mergescope.components import LAYERS, Alignment, Context
from mergescope.datasets import per_class_subset
from mergescope.errors import ConfigError
from mergescope.hookspecs import hookimpl
from mergescope.statistics import TopK
from mergescope.validators import (
    as_float,
    boolean,
    float_list,
    fraction,
    integer,
    list_of,
    non_negative_int,
    one_of,
    positive,
    positive_int,
    unique,
)

__all__ = [
    "RegressionFit",
    "fit_regression",
    "truncate_coefficients",
    "r2_score",
    "jaccard",
    "sparsity_levels",
    "RegressionAlignment",
    "RegressionSparsity",
    "register_aligners",
    "register_visualizers",
]

METHODS = ("lasso", "ols")
REDUCTIONS = ("mean", "max")
_CHUNK = 4096  # samples per streamed block when applying the maps to the whole dataset
# Most samples spanned by one read of the fit subset from a dask-backed recording.
_SPAN = 4096


# ------------------------------------------------------------------------- kernels


@attrs.frozen
class RegressionFit:
    """A fitted multi-output linear map ``y ~ x @ coef + intercept``.

    Attributes
    ----------
    coef
        ``(p, q)``: column ``i`` holds the coefficients of the ``p`` inputs for target ``i``,
        in the units of the data (not standardized).
    intercept
        ``(q,)``.
    x_mean, y_mean
        Means of inputs and targets over the fit samples (zeros without an intercept).
    scale
        ``(p,)``: how coefficient magnitudes are compared when truncating: the inputs'
        standard deviations when standardized (so ``|coef * scale|`` is a contribution in
        target units), ones otherwise.
    constant_input, constant_target
        Boolean masks of inputs (dropped from the design matrix) and targets (coefficients
        0, intercept their value) that do not vary over the fit samples.
    """

    coef: np.ndarray
    intercept: np.ndarray
    x_mean: np.ndarray
    y_mean: np.ndarray
    scale: np.ndarray
    constant_input: np.ndarray
    constant_target: np.ndarray


def fit_regression(
    x: Any,
    y: Any,
    method: str = "lasso",
    alpha: float = 0.01,
    *,
    fit_intercept: bool = True,
    standardize: bool = True,
    max_iter: int = 10_000,
    tol: float = 1e-4,
) -> RegressionFit:
    """Regress every column of ``y`` on all columns of ``x``, independently.

    Parameters
    ----------
    x
        Inputs ``(n, p)``: the other model's units.
    y
        Targets ``(n, q)``: the reference's units.
    method
        ``"lasso"`` (scikit-learn :class:`~sklearn.linear_model.Lasso`, one alpha for every
        target) or ``"ols"`` (least squares; the minimum-norm solution when there are more
        inputs than samples).
    alpha
        Lasso penalty, ``(1 / 2n) ||y - x w||² + alpha ||w||_1``. With ``standardize`` it
        applies to standardized inputs and targets, so one value suits every unit.
    fit_intercept
        Centre inputs and targets (fit an intercept).
    standardize
        Scale inputs and targets to unit standard deviation before fitting; the returned
        coefficients are in the data's units either way.
    max_iter, tol
        Lasso coordinate-descent limits.

    Returns
    -------
    RegressionFit

    Raises
    ------
    ValueError
        Shapes that do not fit, fewer than two samples, non-finite values or an unknown method.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"x must be (n, p) and y (n, q) with the same n, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"a regression needs at least two samples, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite (found NaN or inf)")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(METHODS)}")
    p, q = x.shape[1], y.shape[1]
    # Exact test: a dead unit is constant bit for bit, and a near-constant one is still usable.
    constant_input = np.ptp(x, axis=0) == 0
    constant_target = np.ptp(y, axis=0) == 0
    x_mean = x.mean(axis=0) if fit_intercept else np.zeros(p)
    y_mean = y.mean(axis=0) if fit_intercept else np.zeros(q)
    xs = x[:, ~constant_input] - x_mean[~constant_input]
    ys = y[:, ~constant_target] - y_mean[~constant_target]
    # Root mean square: the standard deviation once centred, and still > 0 for a varying column otherwise.
    sx = np.sqrt((xs**2).mean(axis=0)) if standardize else np.ones(xs.shape[1])
    sy = np.sqrt((ys**2).mean(axis=0)) if standardize else np.ones(ys.shape[1])
    w = np.zeros((xs.shape[1], ys.shape[1]))
    if w.size:
        xz, yz = xs / sx, ys / sy
        if method == "ols":
            w = np.linalg.lstsq(xz, yz, rcond=None)[0]
        else:
            from sklearn.linear_model import Lasso

            model = Lasso(alpha=alpha, fit_intercept=False, max_iter=max_iter, tol=tol, selection="cyclic")
            w = np.asarray(model.fit(xz, yz).coef_, dtype=np.float64).reshape(ys.shape[1], xs.shape[1]).T
    coef = np.zeros((p, q))
    coef[np.ix_(~constant_input, ~constant_target)] = w * sy[None, :] / sx[:, None]
    coef += 0.0  # no negative zeros (Lasso's exact zeros keep the sign of their scaling)
    scale = np.zeros(p)
    scale[~constant_input] = sx if standardize else 1.0
    intercept = y_mean - x_mean @ coef if fit_intercept else np.zeros(q)
    return RegressionFit(coef, intercept, x_mean, y_mean, scale, constant_input, constant_target)


def truncate_coefficients(coef: Any, keep: int, scale: Any = None) -> np.ndarray:
    """Keep the ``keep`` coefficients of largest magnitude in every column, zero the rest.

    Parameters
    ----------
    coef
        ``(p, q)`` coefficients, one column per target.
    keep
        How many coefficients to keep per column (``>= p`` keeps all).
    scale
        ``(p,)`` weights of the magnitudes (e.g. input standard deviations, to rank by
        contribution); ties go to the lower input index.

    Returns
    -------
    numpy.ndarray
        ``(p, q)``, with at most ``keep`` nonzeros per column.
    """
    coef = np.asarray(coef, dtype=np.float64)
    p = coef.shape[0]
    if keep >= p:
        return coef.copy()
    magnitude = np.abs(coef) * (1.0 if scale is None else np.asarray(scale, dtype=np.float64)[:, None])
    order = np.argsort(-magnitude, axis=0, kind="stable")[: max(keep, 0)]
    mask = np.zeros(coef.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=0)
    return np.where(mask, coef, 0.0)


def r2_score(y: Any, prediction: Any) -> np.ndarray:
    """Coefficient of determination of every column; NaN where ``y`` does not vary."""
    y = np.asarray(y, dtype=np.float64)
    residual = ((y - np.asarray(prediction, dtype=np.float64)) ** 2).sum(axis=0)
    total = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    return _r2(residual, total)


def _r2(residual: np.ndarray, total: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 1.0 - residual / total, np.nan)


def jaccard(a: Any, b: Any) -> np.ndarray:
    """Jaccard overlap of two top-k id sets per unit, ``(k, units)`` each; ``-1`` (empty slots) ignored."""
    a, b = np.asarray(a), np.asarray(b)
    out = np.full(a.shape[1], np.nan)
    for j in range(a.shape[1]):
        sa, sb = set(a[:, j][a[:, j] >= 0].tolist()), set(b[:, j][b[:, j] >= 0].tolist())
        if sa or sb:
            out[j] = len(sa & sb) / len(sa | sb)
    return out


def sparsity_levels(fractions: Sequence[float], top_m: Sequence[int]) -> list[tuple[str, float | None, int | None]]:
    """``(label, fraction, count)`` of every sparsity level; the full map ``"100%"`` comes first."""
    levels: list[tuple[str, float | None, int | None]] = [("100%", 1.0, None)]
    for f in fractions:
        if f != 1.0:
            levels.append((f"{100 * f:g}%", float(f), None))
    levels += [(f"top-{m}", None, int(m)) for m in top_m]
    return levels


def _kept(level: tuple[str, float | None, int | None], units: int) -> int:
    _, fraction, count = level
    if count is not None:
        return min(count, units)
    assert fraction is not None
    # round() first: 0.1 * 10 is 1.0000000000000002, whose ceiling would be 2.
    return max(1, math.ceil(round(fraction * units, 9)))


# ------------------------------------------------------------------------ options


# ------------------------------------------------------------------------ aligner


@attrs.define
class RegressionAlignment:
    """Regress every reference unit on all units of each other model, layer by layer (Lasso or OLS).

    Layers: the step's ``layers`` key. Without it, every layer whose outputs form a channel
    group of the reference (the layers the other aligners match: each Linear / Conv output
    that feeds the next layer) is used; a model the tracer cannot follow then needs ``layers``.

    Memory. The fit reads only its subset (``per_class`` images of every class; from a
    dask-backed recording, a bounded range around those samples at a time) and holds it
    in float64; the maps are then applied to the whole dataset in blocks of 4096 samples,
    so memory does not grow with the recording. ``per_class = 0`` fits on every sample:
    the regression needs its whole design matrix, so the fit then holds both layers'
    activations of every sample, ``8 * (units + units_ref)`` bytes per sample, plus the
    solver's copies.

    Parameters
    ----------
    method
        ``"lasso"`` or ``"ols"`` (ordinary least squares, minimum-norm when underdetermined).
    alpha
        Lasso penalty (scikit-learn ``Lasso(alpha=...)``), on standardized units when
        ``standardize``.
    per_class
        Fit on this many images of every class of the data, drawn with ``seed`` (5 in the
        thesis); 0 fits on the whole dataset.
    seed
        Seed of the fit subset.
    sparsity
        Fractions of the other model's units kept per reference unit (top magnitude,
        truncated, not refitted). The full map (``1.0``, label ``"100%"``) is always the first level.
    top_m
        Also keep only the ``m`` largest coefficients, for each ``m`` (label ``"top-m"``).
    topk
        How many top images per unit to keep, for the regression-aligned activations and
        the reference's own.
    fit_intercept
        Fit an intercept.
    standardize
        Scale units to unit variance before fitting; magnitudes are then compared as
        contributions (coefficient x input standard deviation) when truncating.
    reduce
        Channel summary of conv maps per image: ``"mean"`` or ``"max"`` over space.
    max_iter, tol
        Lasso coordinate-descent limits.
    """

    name: ClassVar[str] = "lasso"
    #: Its maps are keyed by layer and act on recorded activations; no model can be built from them.
    space: ClassVar[str] = LAYERS
    paper: ClassVar[str] = (
        "Model Merging and Feature Visualization in Deep Neural Networks (2025 thesis), "
        "3.2.4 Aligning Models Using Linear Regression"
    )

    method: str = attrs.field(default="lasso", validator=one_of(*METHODS))
    alpha: float = attrs.field(default=0.01, converter=as_float, validator=positive)
    per_class: int = attrs.field(default=5, validator=non_negative_int)
    seed: int = attrs.field(default=0, validator=integer)
    sparsity: list[float] = attrs.field(
        factory=lambda: [1.0, 0.5, 0.25, 0.1], converter=float_list, validator=[list_of(fraction), unique]
    )
    top_m: list[int] = attrs.field(factory=lambda: [5], validator=[list_of(positive_int), unique])
    topk: int = attrs.field(default=10, validator=positive_int)
    fit_intercept: bool = attrs.field(default=True, validator=boolean)
    standardize: bool = attrs.field(default=True, validator=boolean)
    reduce: str = attrs.field(default="mean", validator=one_of(*REDUCTIONS))
    max_iter: int = attrs.field(default=10_000, validator=positive_int)
    tol: float = attrs.field(default=1e-4, converter=as_float, validator=positive)

    def _layers(self, reference: nn.Module, context: Context) -> list[str]:
        """The step's layers, or else the reference's channel-group layers (found by tracing)."""
        if context.layers:
            return list(context.layers)
        from mergescope.groups import UnsupportedLayerError, channel_groups, example_input

        try:
            groups = channel_groups(reference, example_input(context.data))
        except UnsupportedLayerError as exc:
            raise ConfigError(
                f"regression alignment: the step names no layers and tracing the reference to find them failed "
                f"({exc}); set 'layers' on the step",
                where="key 'layers'",
            ) from exc
        layers = sorted({p for g in groups for p in g.producers})
        if not layers:
            raise ConfigError(
                "regression alignment: the step names no layers and the reference has no channel groups to "
                "default to; set 'layers' on the step",
                where="key 'layers'",
            )
        return layers

    def align(self, models: Mapping[str, nn.Module], reference: str, context: Context) -> Alignment:
        """Fit the regression maps of every other model onto ``reference`` at every layer.

        Returns
        -------
        Alignment
            - ``transforms[model][layer]``: the full map, dims ``(unit, unit_ref)`` with the
              models' unit ids as coords (regression-aligned activations are ``a @ M + b``);
            - ``/<model>/<layer>`` (next to ``transform``): ``coefficient (sparsity, unit,
              unit_ref)``, ``intercept``, ``r2_fit``, ``r2``, ``nonzero``, ``overlap``
              (sparsity, unit_ref), ``topk_sample`` / ``topk_value`` (sparsity, rank,
              unit_ref), ``reference_topk_sample`` (rank, unit_ref), ``constant_input``
              (unit), ``constant_target`` (unit_ref), ``samples`` (how many were ranked);
              coord ``kept`` (sparsity, the coefficients kept per reference unit);
            - ``/<layer>``: ``topk_sample`` / ``topk_value`` (sparsity, rank, unit) of every
              sparsity level, ``unit`` = the reference's unit ids, and ``count``; with one
              other model (named by the scalar coord ``aligned_model``), or (model, sparsity,
              rank, unit) with several;
            - root diagnostics (model, layer, sparsity): ``mean_r2``, ``mean_r2_fit``,
              ``mean_overlap``, ``mean_nonzero``; (model, layer): ``constant_inputs``,
              ``constant_targets``; scalar ``fit_samples``.

        Raises
        ------
        mergescope.errors.ConfigError
            No data; no layers (none given and none found by tracing); a layer named like a model;
            a class with fewer than ``per_class`` images.
        ValueError
            Activations that are not ``(sample, unit)``.
        """
        data = context.data
        if data is None:
            raise ConfigError("regression alignment records activations and needs [data], but there is none")
        others = [m for m in models if m != reference]
        layers = self._layers(models[reference], context)
        clash = sorted(set(layers) & set(models))
        if clash:
            raise ConfigError(
                f"regression alignment writes a result node per layer and per model, so layers {clash} cannot "
                "share the names of models; rename the models",
                where="key 'layers'",
            )
        store = context.record(
            models, {m: layers for m in models}, topk=self.topk, keep_activations=True, reduce=self.reduce
        )
        ids = np.asarray(data.sample_ids, dtype=np.int64)
        if self.per_class:
            fit_ids = ids[per_class_subset(data.labels, self.per_class, seed=self.seed, names=data.classes)]
        else:
            fit_ids = ids
        levels = sparsity_levels(self.sparsity, self.top_m)
        labels = [lv[0] for lv in levels]
        shape = (len(others), len(layers), len(levels))
        summary = {v: np.full(shape, np.nan) for v in ("mean_r2", "mean_r2_fit", "mean_overlap", "mean_nonzero")}
        constants = {v: np.zeros(shape[:2], dtype=np.int64) for v in ("constant_inputs", "constant_targets")}
        transforms: dict[str, dict[str, xr.DataArray]] = {m: {} for m in others}
        nodes: dict[str, xr.Dataset] = {}
        jobs = [(j, layer, i, m) for j, layer in enumerate(layers) for i, m in enumerate(others)]
        targets: dict[str, xr.DataArray] = {}
        for j, layer, i, m in context.progress(jobs, desc="regression alignment", total=len(jobs)):
            if layer not in targets:  # read the reference once per layer, not once per model
                targets = {layer: _activation(store, reference, layer)}
            y_act = targets[layer]
            x_act = _activation(store, m, layer)
            if not np.array_equal(x_act["sample"].values, y_act["sample"].values):
                raise ValueError(f"layer {layer!r}: {m!r} and {reference!r} were recorded over different samples")
            node = self._fit_one(x_act, y_act, fit_ids, levels, store.topk(reference, layer), m, reference, layer)
            transforms[m][layer] = node["coefficient"].isel(sparsity=0, drop=True).rename("transform")
            nodes[f"{m}/{layer}"] = node
            summary["mean_r2"][i, j] = _nanmean(node["r2"].values, axis=1)
            summary["mean_r2_fit"][i, j] = _nanmean(node["r2_fit"].values, axis=1)
            summary["mean_overlap"][i, j] = _nanmean(node["overlap"].values, axis=1)
            summary["mean_nonzero"][i, j] = node["nonzero"].values.mean(axis=1)
            constants["constant_inputs"][i, j] = int(node["constant_input"].sum())
            constants["constant_targets"][i, j] = int(node["constant_target"].sum())
            if i == len(others) - 1:  # every model of this layer is done
                nodes[layer] = _layer_node([nodes[f"{o}/{layer}"] for o in others], others)
        diagnostics = xr.Dataset(
            {
                **{k: (("model", "layer", "sparsity"), v) for k, v in summary.items()},
                **{k: (("model", "layer"), v) for k, v in constants.items()},
                "fit_samples": np.int64(len(fit_ids)),
            },
            coords={"model": others, "layer": layers, "sparsity": labels},
        )
        return Alignment(reference, transforms, diagnostics, results=nodes, space=LAYERS)

    def _fit_one(
        self,
        x_act: xr.DataArray,
        y_act: xr.DataArray,
        fit_ids: np.ndarray,
        levels: list[tuple[str, float | None, int | None]],
        reference_topk: TopK,
        model: str,
        reference: str,
        layer: str,
    ) -> xr.Dataset:
        """Fit one (model, layer), sweep the sparsity levels and stream the maps over the data."""
        x_fit = np.asarray(_select(x_act, fit_ids), dtype=np.float64)
        y_fit = np.asarray(_select(y_act, fit_ids), dtype=np.float64)
        try:
            fit = fit_regression(
                x_fit,
                y_fit,
                self.method,
                self.alpha,
                fit_intercept=self.fit_intercept,
                standardize=self.standardize,
                max_iter=self.max_iter,
                tol=self.tol,
            )
        except ValueError as exc:
            raise ValueError(f"regression of {reference!r} on {model!r} at layer {layer!r}: {exc}") from exc
        units, units_ref = x_act["unit"].values, y_act["unit"].values
        _warn_constant(fit.constant_input, units, f"model {model!r}", layer, "dropped from the regression inputs")
        _warn_constant(
            fit.constant_target, units_ref, f"reference {reference!r}", layer, "their coefficients are 0 and R² is NaN"
        )
        p, q = fit.coef.shape
        kept = [_kept(lv, p) for lv in levels]
        coefs = np.stack([truncate_coefficients(fit.coef, k, fit.scale) for k in kept])
        if self.fit_intercept:
            intercepts = fit.y_mean[None, :] - np.einsum("p,lpq->lq", fit.x_mean, coefs)
        else:
            intercepts = np.zeros((len(levels), q))
        r2_fit = np.stack([r2_score(y_fit, x_fit @ c + b) for c, b in zip(coefs, intercepts)])

        # Whole dataset, block by block: top-k of every level and the R² sums; sums are
        # taken around the fit mean so they do not cancel catastrophically.
        tops = [TopK(q, self.topk) for _ in levels]
        residual = np.zeros((len(levels), q))
        centre = y_fit.mean(axis=0)
        s1, s2, n = np.zeros(q), np.zeros(q), 0
        low, high = np.full(q, np.inf), np.full(q, -np.inf)
        for start in range(0, x_act.sizes["sample"], _CHUNK):
            block = slice(start, start + _CHUNK)
            x = np.asarray(x_act.isel(sample=block).values, dtype=np.float64)
            y = np.asarray(y_act.isel(sample=block).values, dtype=np.float64)
            ids = np.asarray(x_act["sample"].values[block], dtype=np.int64)
            for level, (c, b) in enumerate(zip(coefs, intercepts)):
                pred = x @ c + b
                tops[level].update(pred, ids)
                residual[level] += ((y - pred) ** 2).sum(axis=0)
            low, high = np.minimum(low, y.min(axis=0)), np.maximum(high, y.max(axis=0))
            y = y - centre  # not in place: y may be a view of the recorded activations
            s1 += y.sum(axis=0)
            s2 += (y**2).sum(axis=0)
            n += len(y)
        total = s2 - s1**2 / max(n, 1)
        # A unit constant over the whole data has total 0 up to rounding: call it exactly 0.
        total = np.where(high > low, total, 0.0)
        r2 = _r2(residual, total[None, :])
        reference_ids = reference_topk.sample_ids
        overlap = np.stack([jaccard(t.sample_ids, reference_ids) for t in tops])

        sparsity, rank = [lv[0] for lv in levels], np.arange(self.topk)
        return xr.Dataset(
            {
                "coefficient": (("sparsity", "unit", "unit_ref"), coefs),
                "intercept": (("sparsity", "unit_ref"), intercepts),
                "r2_fit": (("sparsity", "unit_ref"), r2_fit),
                "r2": (("sparsity", "unit_ref"), r2),
                "nonzero": (("sparsity", "unit_ref"), (coefs != 0).sum(axis=1)),
                "overlap": (("sparsity", "unit_ref"), overlap),
                "topk_sample": (("sparsity", "rank", "unit_ref"), np.stack([t.sample_ids for t in tops])),
                "topk_value": (("sparsity", "rank", "unit_ref"), np.stack([t.values for t in tops])),
                "reference_topk_sample": (("rank", "unit_ref"), reference_ids),
                "constant_input": ("unit", fit.constant_input),
                "constant_target": ("unit_ref", fit.constant_target),
                "samples": np.int64(n),
            },
            coords={
                "sparsity": sparsity,
                "kept": ("sparsity", kept),
                "rank": rank,
                "unit": units,
                "unit_ref": units_ref,
            },
        )

    def describe(self, result: xr.Dataset) -> str:
        """Mean R² and top-k overlap with the reference, full map and sparsest level, per model."""
        if "mean_r2" not in result:
            return "aligned"
        first, last = result["sparsity"].values[0], result["sparsity"].values[-1]
        parts = []
        for m in result["model"].values:
            r = result.sel(model=m)
            parts.append(
                f"{m}: R² {float(r['mean_r2'].sel(sparsity=first).mean()):.3f} ({first}), "
                f"{float(r['mean_r2'].sel(sparsity=last).mean()):.3f} ({last}); top-k overlap "
                f"{float(r['mean_overlap'].sel(sparsity=first).mean()):.2f} ({first}), "
                f"{float(r['mean_overlap'].sel(sparsity=last).mean()):.2f} ({last})"
            )
        return "; ".join(parts)


def _select(act: xr.DataArray, ids: np.ndarray) -> np.ndarray:
    """The rows of ``act`` with sample ids ``ids``, in that order.

    A dask-backed recording is read only where the ids are: their sorted positions are
    cut into runs spanning at most :data:`_SPAN` samples, each run read by one
    computation (which reads only that range of a stored chunk).
    """
    if act.chunks is None:
        return act.sel(sample=ids).values
    index = act.get_index("sample")
    if len(index) and index.is_monotonic_increasing:
        # A binary search: pandas' lookup would build a hash table of every sample id.
        values = index.to_numpy()
        positions = np.minimum(np.searchsorted(values, ids), len(values) - 1)
        positions[values[positions] != ids] = -1
    else:
        positions = index.get_indexer(ids)
    if (positions < 0).any():
        act.sel(sample=ids[positions < 0][:1])  # the KeyError naming the first missing id
    return read_rows(act.data, positions, _SPAN)


def _activation(store: Any, model: str, layer: str) -> xr.DataArray:
    act = store.activation(model, layer)
    if act.dims != ("sample", "unit"):
        raise ValueError(
            f"regression alignment needs (sample, unit) activations; {model!r} at {layer!r} has {act.dims}"
        )
    return act


def _layer_node(fits: Sequence[xr.Dataset], models: Sequence[str]) -> xr.Dataset:
    """Every sparsity level's top-k in the layout top-k grids read at ``/<step>/<layer>``.

    ``topk_sample`` / ``topk_value`` ``(sparsity, rank, unit)`` (``unit`` = the reference's
    units) for one other model, named by the scalar coord ``aligned_model``;
    ``(model, sparsity, rank, unit)`` for several. A grid draws one row per model and
    level (``rows_select`` picks levels). ``count`` is the number of samples ranked.
    """
    ids = np.stack([f["topk_sample"].values for f in fits])
    values = np.stack([f["topk_value"].values for f in fits])
    coords: dict[str, Any] = {
        "sparsity": fits[0]["sparsity"].values,
        "rank": fits[0]["rank"].values,
        "unit": fits[0]["unit_ref"].values,
    }
    if len(fits) == 1:
        dims: tuple[str, ...] = ("sparsity", "rank", "unit")
        ids, values = ids[0], values[0]
        coords["aligned_model"] = models[0]
    else:
        dims = ("model", "sparsity", "rank", "unit")
        coords["model"] = list(models)
    return xr.Dataset(
        {
            "topk_sample": (dims, ids),
            "topk_value": (dims, values),
            "count": np.int64(int(fits[0]["samples"])),
        },
        coords=coords,
    )


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (every unit constant) stay NaN
        return np.nanmean(values, axis=axis)


def _warn_constant(mask: np.ndarray, units: np.ndarray, who: str, layer: str, consequence: str) -> None:
    if not mask.any():
        return
    bad = units[mask].tolist()
    shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
    warnings.warn(
        f"regression alignment: {who}, layer {layer!r}: {len(bad)} unit(s) constant over the fit samples "
        f"({shown}); {consequence}",
        UserWarning,
        stacklevel=3,
    )


_SPARSITY_PANELS = (("mean_r2", "R² (all samples)"), ("mean_overlap", "top-k overlap"), ("mean_nonzero", "nonzero"))


@attrs.define
class RegressionSparsity:
    """Draw how regression alignment degrades as its maps are made sparse (R², top-k overlap, nonzeros).

    For every earlier ``lasso`` step (a results node with ``mean_r2``, ``mean_overlap``
    and ``mean_nonzero`` on ``(model, layer, sparsity)``), one PNG with three panels,
    each a line per (model, layer) across the sparsity levels: the thesis's Figures H and
    I as numbers. Nothing is drawn when no such step ran.
    """

    name: ClassVar[str] = "regression-sparsity"
    paper: ClassVar[str] = RegressionAlignment.paper

    def render(self, results: xr.DataTree, out_dir: Path, context: Context | None = None) -> list[Path]:
        """One figure per regression step; returns the PNG paths (``context`` is not needed)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        files = []
        for node in results.subtree:
            ds = node.to_dataset(inherit=False)
            if not all(v in ds for v, _ in _SPARSITY_PANELS):
                continue
            out_dir.mkdir(parents=True, exist_ok=True)
            labels = [str(x) for x in ds["sparsity"].values]
            fig, axes = plt.subplots(1, len(_SPARSITY_PANELS), figsize=(4.2 * len(_SPARSITY_PANELS), 3.4))
            for ax, (var, title) in zip(axes, _SPARSITY_PANELS):
                da = ds[var].transpose("model", "layer", "sparsity")
                for model in da["model"].values:
                    for layer in da["layer"].values:
                        ax.plot(labels, da.sel(model=model, layer=layer).values, marker="o", label=f"{model} {layer}")
                ax.set_title(title)
                ax.set_xlabel("coefficients kept")
            axes[0].legend(fontsize=7)
            step = node.path.strip("/").replace("/", "-") or "regression"
            fig.suptitle(f"{step}: sparse regression alignment")
            fig.tight_layout()
            path = out_dir / f"{step}-sparsity.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            files.append(path)
        return files


@hookimpl
def register_aligners(register):
    """Register :class:`RegressionAlignment`."""
    register(RegressionAlignment)


@hookimpl
def register_visualizers(register):
    """Register :class:`RegressionSparsity`."""
    register(RegressionSparsity)
