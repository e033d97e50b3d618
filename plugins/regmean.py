"""RegMean: merge every linear layer by regression on the inputs it sees (Jin et al. 2023).

"Dataless Knowledge Fusion by Merging Weights of Language Models" (Jin et al., ICLR 2023)
merges a linear layer so that the merged layer's outputs stay as close as possible to
each model's own outputs on the inputs that model feeds the layer. With ``X_i`` those
inputs (one row per input vector) and ``W_i`` the layer's weight (inputs x outputs),

    W* = argmin_W sum_i ||X_i W - X_i W_i||^2 = (sum_i G_i)^{-1} sum_i G_i W_i,    G_i = X_i^T X_i

so the Gram matrices ``G_i`` are all that is needed of the data. To make the sum well
conditioned the paper shrinks the off-diagonal entries of every Gram by ``alpha``:

    G~_i = alpha G_i + (1 - alpha) diag(G_i)

``alpha = 1`` is the exact regression (the least-squares fit to every model's
input/output pairs at once); ``alpha = 0`` averages each input feature's weights in
proportion to the energy of that feature in each model. The authors' code uses
``alpha = 0.9``. Parameters of other layers are averaged.

Here:

- Every ``nn.Linear`` and every ``nn.Conv2d`` with ``groups == 1`` that the forward pass
  calls once is regressed. A convolution is the linear regression of its output on the
  input patches it reads, so its Gram is over the unfolded patches (``C_in * kh * kw``
  features, one row per output position of every image; recorded as ``conv@patches``,
  see :func:`mergescope.activations.input_patches`); a linear layer's over its input
  (``linear@in``).
- The Grams of every model and layer come from one recording pass over the step's data
  (:meth:`~mergescope.Context.record`): the store's streaming count ``n``, mean ``m``
  and co-moment ``C`` give the uncentred Gram ``G = C + n m m^T``. The models run on the
  same images (in the paper each model brings its own data), but each feeds a layer its
  own features; a layer that reads the images themselves (the first) has one Gram for
  every model, so its RegMean is the plain average.
- Biases are averaged, as in the authors' code (``bias = "average"``); ``bias =
  "regress"`` appends a constant input feature 1 so that weight and bias are regressed
  together (``alpha`` then shrinks the constant's entries like any other feature's).
- Grouped and depthwise convolutions, norm layers and every other parameter are
  averaged uniformly; BatchNorm running statistics are averaged, then measured again on
  the data when ``reset_batchnorm`` is on.
- An input direction that no model's inputs reach (a feature that is 0 on all the data,
  as a dead ReLU unit's) leaves the regression undetermined there. The solution used is
  ``W* = W_avg + (sum_i G~_i)^+ sum_i G~_i (W_i - W_avg)``: the closed form above when
  the sum is invertible, and the models' average weights along unreached directions.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import attrs
import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from mergescope.activations import INPUT_SUFFIX, PATCHES_SUFFIX
from mergescope.components import Alignment, Context, MergeResult
from mergescope.errors import ConfigError, ContractError
from mergescope.groups import example_input
from mergescope.hookspecs import hookimpl
from mergescope.states import average_states, build_model, check_compatible
from mergescope.task_vectors import aligned_models
from mergescope.validators import as_float, boolean, one_of, probability

if TYPE_CHECKING:
    from mergescope.store import Store

__all__ = [
    "shrink_off_diagonal",
    "input_gram",
    "layer_matrix",
    "regmean_solve",
    "merge_layer",
    "relative_residual",
    "Regression",
    "LayerPlan",
    "plan_layers",
    "RegMean",
    "register_mergers",
]

BIAS = ("average", "regress")


# ------------------------------------------------------------------------ the math


def shrink_off_diagonal(gram: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha G + (1 - alpha) diag(G)``: the off-diagonal entries scaled by ``alpha``, the diagonal kept."""
    return alpha * gram + (1.0 - alpha) * np.diag(np.diag(gram))


def input_gram(count: int, mean: np.ndarray, comoment: np.ndarray, *, constant: bool = False) -> np.ndarray:
    """The uncentred Gram ``X^T X`` from streaming moments: ``C + n m m^T``.

    Parameters
    ----------
    count, mean, comoment
        ``n`` rows, their mean ``m`` and the co-moment ``C = sum_r (x_r - m)(x_r - m)^T``
        (a :class:`mergescope.statistics.CoMoments`' ``count``, ``mean_x``, ``comoment``).
    constant
        Append a constant input feature 1 (for a bias): the Gram of ``[X, 1]``, whose
        last row and column are ``n m`` and ``n``.
    """
    mean = np.asarray(mean, dtype=np.float64)
    gram = np.asarray(comoment, dtype=np.float64) + count * np.outer(mean, mean)
    if not constant:
        return gram
    sums = count * mean
    return np.block([[gram, sums[:, None]], [sums[None, :], np.array([[float(count)]])]])


def layer_matrix(weight: Tensor, bias: Tensor | None = None) -> np.ndarray:
    """A layer's weight as the float64 matrix ``W`` (inputs x outputs) of ``y = x W``.

    A convolution's ``(C_out, C_in, kh, kw)`` weight becomes ``(C_in * kh * kw, C_out)``,
    the order of its unfolded input patches. A ``bias`` is appended as the last row (the
    weight of a constant input 1).
    """
    matrix = weight.detach().reshape(weight.shape[0], -1).T.to("cpu", torch.float64).numpy()
    if bias is None:
        return matrix
    return np.vstack([matrix, bias.detach().to("cpu", torch.float64).numpy()[None, :]])


class Regression(NamedTuple):
    """The merged matrix of one layer and how well its regression was posed."""

    #: The merged ``W*`` (inputs x outputs).
    weight: np.ndarray
    #: Condition number of ``sum_i G~_i`` (the matrix solved with); ``inf`` when singular.
    condition_number: float
    #: Directions of ``sum_i G~_i`` too small to solve for, kept at the models' average.
    undetermined: int


def regmean_solve(grams: Sequence[np.ndarray], weights: Sequence[np.ndarray], alpha: float) -> Regression:
    """RegMean's merge of one layer: ``(sum_i G~_i)^{-1} sum_i G~_i W_i`` with ``G~_i`` shrunk by ``alpha``.

    Solved as ``W_avg + (sum_i G~_i)^+ sum_i G~_i (W_i - W_avg)`` by a symmetric
    eigendecomposition: the same matrix when the sum is invertible, and the average
    ``W_avg`` along directions whose eigenvalue is below ``n * eps * largest``.

    Parameters
    ----------
    grams
        One Gram ``X_i^T X_i`` per model, ``(inputs, inputs)``.
    weights
        One matrix ``W_i`` per model, ``(inputs, outputs)``.
    alpha
        Scale of the Grams' off-diagonal entries, in ``[0, 1]``.
    """
    if len(grams) != len(weights) or not grams:
        raise ValueError(f"need one Gram per weight matrix, got {len(grams)} Grams and {len(weights)} matrices")
    shrunk = [shrink_off_diagonal(np.asarray(g, dtype=np.float64), alpha) for g in grams]
    mats = [np.asarray(w, dtype=np.float64) for w in weights]
    average = sum(mats) / len(mats)
    total = sum(shrunk)
    rhs = sum(g @ (w - average) for g, w in zip(shrunk, mats))
    values, vectors = np.linalg.eigh((total + total.T) / 2)
    largest = float(values.max(initial=0.0))
    solvable = values > largest * len(values) * np.finfo(np.float64).eps
    basis = vectors[:, solvable]
    merged = average + basis @ ((basis.T @ rhs) / values[solvable, None])
    smallest = float(values.min())
    condition = largest / smallest if smallest > 0 else float("inf")
    return Regression(merged, condition, int((~solvable).sum()))


def merge_layer(
    grams: Sequence[np.ndarray], own: Sequence[np.ndarray], alpha: float, *, regress_bias: bool
) -> tuple[np.ndarray, Regression]:
    """One layer's merged matrix from every model's Gram and matrix, both with a bias row/column or both without.

    With a bias (the last input feature is the constant 1) and ``regress_bias`` off, the
    weights are regressed on the inputs alone and the bias row is the models' average.
    Returns the merged matrix (bias as its last row) and the regression's diagnostics.
    """
    if regress_bias:
        fit = regmean_solve(grams, own, alpha)
        return fit.weight, fit
    fit = regmean_solve([g[:-1, :-1] for g in grams], [w[:-1] for w in own], alpha)
    return np.vstack([fit.weight, sum(w[-1:] for w in own) / len(own)]), fit


def relative_residual(gram: np.ndarray, merged: np.ndarray, own: np.ndarray) -> float:
    """``||X (W - W_i)||^2 / ||X W_i||^2`` from the Gram ``X^T X``: how far a layer's outputs move.

    NaN when the model's own outputs are all 0 on the data.
    """
    delta = merged - own
    moved = float(np.einsum("ij,ik,kj->", delta, gram, delta))
    size = float(np.einsum("ij,ik,kj->", own, gram, own))
    return moved / size if size > 0 else float("nan")


# ------------------------------------------------------------------- which layers


class LayerPlan(NamedTuple):
    """Which layers RegMean regresses (with the recording that gives their Grams) and why others are averaged."""

    #: Layer name -> layer selector of its regression input (``"fc@in"``, ``"conv@patches"``).
    regressed: dict[str, str]
    #: Layer name -> why it is averaged.
    averaged: dict[str, str]


def plan_layers(model: nn.Module, example: Tensor) -> LayerPlan:
    """Every ``Linear`` and ``Conv2d`` of ``model``, regressed or averaged (with the reason).

    A copy of the model runs once on ``example`` to count each layer's calls: a layer
    called several times per forward pass has several inputs per image, and one never
    called (an auxiliary head in evaluation mode) has none; a ``Linear`` applied over
    more than one dimension (tokens) has inputs the recording does not give one per row.
    """
    probe = copy.deepcopy(model).eval()
    layers = {n: m for n, m in probe.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d))}
    calls: dict[str, list[int]] = {n: [] for n in layers}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, _n=n: calls[_n].append(args[0].ndim)) for n, m in layers.items()
    ]
    first = next(iter(probe.parameters()), torch.empty(0))
    try:
        with torch.no_grad():
            probe(example.to(first.device, first.dtype))
    finally:
        for handle in handles:
            handle.remove()
    regressed: dict[str, str] = {}
    averaged: dict[str, str] = {}
    for name, module in layers.items():
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            averaged[name] = f"grouped convolution (groups = {module.groups})"
        elif len(calls[name]) != 1:
            averaged[name] = f"called {len(calls[name])} times per forward pass"
        elif isinstance(module, nn.Linear) and calls[name][0] != 2:
            averaged[name] = f"a Linear applied to {calls[name][0]}-D inputs"
        elif "weight" not in dict(module.named_parameters(recurse=False)):
            averaged[name] = "its weight is not a plain parameter"
        else:
            regressed[name] = name + (PATCHES_SUFFIX if isinstance(module, nn.Conv2d) else INPUT_SUFFIX)
    return LayerPlan(regressed, averaged)


# ---------------------------------------------------------------------- component


@attrs.define
class RegMean:
    """Merge by regression: every linear and conv layer fits each model's outputs on that model's inputs (RegMean).

    For every ``Linear`` and ``Conv2d`` (``groups == 1``), ``W* = (sum_i G~_i)^{-1} sum_i
    G~_i W_i`` with ``G_i`` the Gram of the inputs model ``i`` feeds the layer (conv: its
    input patches) and ``G~_i`` its off-diagonal entries scaled by ``alpha``. The Grams of
    every model come from one recording pass over the step's data. All other parameters
    are averaged. The models must share one architecture: fine-tunes of one base, or
    models aligned onto one (``"b@<aligner step>"``, or ``alignment``).

    Parameters
    ----------
    alpha
        Scale of the Grams' off-diagonal entries, in ``[0, 1]``: 1 is the exact
        regression, 0 a per-feature weighted average.
    bias
        ``"average"`` (as the paper's code) or ``"regress"``: regress each bias with its
        weight, as the weight of a constant input 1.
    reset_batchnorm
        Recompute the merge's BatchNorm statistics on the step's data.
    """

    name: ClassVar[str] = "regmean"
    paper: ClassVar[str] = "Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models"

    alpha: float = attrs.field(default=0.9, converter=as_float, validator=probability)
    bias: str = attrs.field(default="average", validator=one_of(*BIAS))
    reset_batchnorm: bool = attrs.field(default=True, validator=boolean)

    def merge(
        self, models: Mapping[str, nn.Module], context: Context, alignment: Alignment | None = None
    ) -> MergeResult:
        """Regress every linear and conv layer on the Grams of one recording pass; average the rest.

        Returns
        -------
        MergeResult
            ``model``: the merge (a copy of the first model's module). ``results``, on
            dims ``layer`` (every ``Linear`` and ``Conv2d``) and ``model``:

            - ``regressed`` (bool), ``reason`` (why a layer is averaged), ``features``
              (size of its Gram), ``condition_number`` and ``undetermined`` (directions
              kept at the average) of the summed shrunk Gram;
            - ``residual`` and ``average_residual`` (``model, layer``): the layer's
              relative squared output change ``||X_i (W - W_i)||^2 / ||X_i W_i||^2`` on
              model ``i``'s own inputs, bias included, for the merge and for the plain
              average;
            - ``model_loss`` and ``model_accuracy`` (``model``): each model on the data,
              measured in the recording pass; ``loss``, ``accuracy`` of the merge and
              ``alpha``.

        Raises
        ------
        ConfigError
            Fewer than two models, no data, models of different architectures, or an
            alignment whose reference is not a step model.
        """
        names = list(models)
        if len(names) < 2:
            raise ConfigError(f"regmean merges at least two models, got {names}", where="key 'models'")
        if context.data is None:
            raise ConfigError(
                "regmean regresses every layer on the Gram matrices of its inputs and needs data: give the "
                "pipeline [data] (or the step its own data)"
            )
        try:
            check_compatible({n: models[n].state_dict() for n in names})
        except ValueError as exc:
            raise ConfigError(
                f"cannot merge models {names}: {exc}; models of different inits must be aligned first "
                "(name them as 'b@<aligner step>')",
                where="key 'models'",
            ) from exc
        example = example_input(context.data)
        models = aligned_models(models, alignment, context)  # the reference's unit order before regressing
        plan = plan_layers(models[names[0]], example)
        states = {n: models[n].state_dict() for n in names}
        merged_state = average_states([states[n] for n in names])

        store = None
        if plan.regressed:  # one pass over the data records every model's Grams at once
            selectors = list(plan.regressed.values())
            store = context.record(
                models, {n: selectors for n in names}, covariance=True, positions=True, keep_activations=False
            )
        layers = [n for n, _ in models[names[0]].named_modules() if n in plan.regressed or n in plan.averaged]
        column = {layer: j for j, layer in enumerate(layers)}
        rows = {
            "features": np.zeros(len(layers), dtype=np.int64),
            "condition_number": np.full(len(layers), np.nan),
            "undetermined": np.zeros(len(layers), dtype=np.int64),
            "residual": np.full((len(names), len(layers)), np.nan),
            "average_residual": np.full((len(names), len(layers)), np.nan),
        }
        for layer in context.progress(list(plan.regressed), desc="regmean", total=len(plan.regressed)):
            assert store is not None
            j = column[layer]
            has_bias = f"{layer}.bias" in merged_state
            grams = []
            for n in names:
                moments = store.covariance(n, plan.regressed[layer])
                grams.append(input_gram(moments.count, moments.mean_x, moments.comoment, constant=has_bias))
            own = [layer_matrix(states[n][f"{layer}.weight"], states[n].get(f"{layer}.bias")) for n in names]
            merged, fit = merge_layer(grams, own, self.alpha, regress_bias=not has_bias or self.bias == "regress")
            self._write(merged_state, layer, merged, has_bias)
            rows["features"][j] = fit.weight.shape[0]
            rows["condition_number"][j] = fit.condition_number
            rows["undetermined"][j] = fit.undetermined
            average = sum(own) / len(own)
            for i, (gram, w) in enumerate(zip(grams, own)):
                rows["residual"][i, j] = relative_residual(gram, merged, w)
                rows["average_residual"][i, j] = relative_residual(gram, average, w)

        merged_model = build_model(models[names[0]], merged_state, context, reset=self.reset_batchnorm)
        evaluation = context.evaluate(merged_model)
        results = xr.Dataset(
            {
                "regressed": ("layer", np.array([layer in plan.regressed for layer in layers], dtype=bool)),
                "reason": ("layer", np.array([plan.averaged.get(layer, "") for layer in layers], dtype=str)),
                "features": ("layer", rows["features"]),
                "condition_number": ("layer", rows["condition_number"]),
                "undetermined": ("layer", rows["undetermined"]),
                "residual": (("model", "layer"), rows["residual"]),
                "average_residual": (("model", "layer"), rows["average_residual"]),
                "alpha": self.alpha,
                "loss": evaluation.loss,
                "accuracy": evaluation.accuracy,
            },
            coords={"layer": np.array(layers, dtype=str), "model": np.array(names, dtype=str)},
        )
        own_scores = _model_scores(store, names)
        if own_scores is not None:
            results["model_loss"] = ("model", own_scores[0])
            results["model_accuracy"] = ("model", own_scores[1])
        return MergeResult(merged_model, results)

    @staticmethod
    def _write(state: dict[str, Tensor], layer: str, merged: np.ndarray, has_bias: bool) -> None:
        """Put the merged matrix (inputs x outputs, bias as its last row) back in the layer's shapes."""
        weight = state[f"{layer}.weight"]
        rows = merged[:-1] if has_bias else merged
        state[f"{layer}.weight"] = torch.from_numpy(np.ascontiguousarray(rows.T)).reshape(weight.shape).to(weight)
        if has_bias:
            bias = state[f"{layer}.bias"]
            state[f"{layer}.bias"] = torch.from_numpy(np.ascontiguousarray(merged[-1])).to(bias)

    def describe(self, result: xr.Dataset) -> str:
        """Layers regressed, the mean output residual against the plain average's, and the merge's score."""
        regressed = result["regressed"].values
        line = f"{int(regressed.sum())} of {regressed.size} layers regressed (alpha {float(result['alpha']):g})"
        if regressed.any():
            ours = float(np.nanmean(result["residual"].values[:, regressed]))
            plain = float(np.nanmean(result["average_residual"].values[:, regressed]))
            line += f", mean output residual {ours:.3g} (average: {plain:.3g})"
        return f"{line}; accuracy {float(result['accuracy']):.3f}, loss {float(result['loss']):.3f}"


def _model_scores(store: Store | None, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Each model's loss and accuracy from the recording pass, or ``None`` (no pass, or not classifiers)."""
    if store is None:
        return None
    try:
        scores = [store.evaluation(n) for n in names]
    except ContractError:
        return None
    return np.array([s.loss for s in scores]), np.array([s.accuracy for s in scores])


@hookimpl
def register_mergers(register):
    """Register :class:`RegMean`."""
    register(RegMean)
