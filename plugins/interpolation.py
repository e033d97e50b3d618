"""Linear interpolation of weights: the linear mode connectivity sweep and weighted averages.

Two models ``theta_0``, ``theta_1`` are interpolated as ``(1 - alpha) theta_0 + alpha
theta_1``; sweeping ``alpha`` and evaluating every point gives the loss / accuracy
curve whose bump above the straight line between the endpoints is the *barrier*
(Frankle et al. 2020; Entezari et al. 2022). N models are averaged with given weights
(a "model soup").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import numpy as np
import xarray as xr
from torch import nn

from mergescope.components import Alignment, Context, MergeResult
from mergescope.errors import ConfigError
from mergescope.groups import align_step_models, channel_groups, example_input
from mergescope.hookspecs import hookimpl
from mergescope.states import average_states, build_model, check_compatible
from mergescope.sweeps import default_alphas, evaluate_path, loss_barrier
from mergescope.validators import (
    as_float,
    boolean,
    finite,
    float_list,
    list_of,
    non_negative,
    probability,
    sums_to,
    unique,
)

__all__ = [
    "check_compatible",
    "loss_barrier",
    "default_alphas",
    "Interpolation",
    "register_mergers",
]


# ------------------------------------------------------------------ option checks


def _unless_extrapolating(
    instance: Interpolation, attribute: attrs.Attribute, value: Any, checks: list[Any], hint: str
) -> None:
    """Apply the validators ``checks`` unless ``extrapolate`` is on; their message says how to allow it."""
    if instance.extrapolate:
        return
    for check in checks:
        try:
            check(instance, attribute, value)
        except ValueError as exc:
            raise ValueError(f"{exc}; set extrapolate = true {hint}") from None


def _check_alphas(instance: Interpolation, attribute: attrs.Attribute, value: list[float] | None) -> None:
    if value is None:
        return
    list_of(finite)(instance, attribute, value)
    unique(instance, attribute, value)
    _unless_extrapolating(instance, attribute, value, [list_of(probability)], "to evaluate points beyond the endpoints")
    if instance.weights is not None:
        raise ValueError(
            "'alphas' and 'weights' exclude each other: give 'weights' for one merge, 'alphas' for a sweep"
        )


def _check_alpha(instance: Interpolation, attribute: attrs.Attribute, value: float) -> None:
    finite(instance, attribute, value)
    _unless_extrapolating(instance, attribute, value, [probability], "to extrapolate")


def _check_weights(instance: Interpolation, attribute: attrs.Attribute, value: list[float] | None) -> None:
    if value is None:
        return
    # One weight per model, so at least two.
    list_of(finite, min_length=2)(instance, attribute, value)
    checks = [list_of(non_negative), sums_to(1.0)]
    _unless_extrapolating(instance, attribute, value, checks, "to allow negative weights and other sums")


# ---------------------------------------------------------------------- component


@attrs.define
class Interpolation:
    """Linearly interpolate the weights of models: a mode connectivity sweep or a weighted average.

    With two models and no ``weights``, evaluates ``(1 - alpha) theta_A + alpha theta_B``
    at every point of ``alphas`` (plus 0, 1 and ``alpha``, which are always evaluated)
    and reports the loss / accuracy curves and barriers; the model at ``alpha`` is
    returned. With ``weights`` (one per model, any number of models) it returns
    ``sum_i w_i theta_i`` without a sweep; more than two models without ``weights``
    are averaged uniformly.

    Parameters
    ----------
    alphas
        The sweep for two models. ``None``: ``0, 0.05, ..., 1`` (21 points); ``[]``: no
        sweep (only the model at ``alpha``).
    alpha
        The interpolation coefficient of the returned model (two models).
    weights
        One weight per model, in the step's model order; one merge, no sweep.
    extrapolate
        Allow alphas outside ``[0, 1]`` and weights that are negative or do not sum to 1.
    """

    name: ClassVar[str] = "interpolation"
    paper: ClassVar[str] = "Frankle et al. 2020, Linear Mode Connectivity and the Lottery Ticket Hypothesis"

    alphas: list[float] | None = attrs.field(default=None, converter=float_list, validator=_check_alphas)
    alpha: float = attrs.field(default=0.5, converter=as_float, validator=_check_alpha)
    weights: list[float] | None = attrs.field(default=None, converter=float_list, validator=_check_weights)
    extrapolate: bool = attrs.field(default=False, validator=boolean)

    def merge(
        self, models: Mapping[str, nn.Module], context: Context, alignment: Alignment | None = None
    ) -> MergeResult:
        """Interpolate ``models``; evaluate on ``context.data`` when there is data.

        Returns
        -------
        MergeResult
            ``model``: the interpolated model (a copy of the first model's module with
            the interpolated state). ``results``:

            - always ``weights`` (dim ``model``, coord the model names): the weights of
              the returned model;
            - sweep (two models, data): ``loss`` and ``accuracy`` on dim ``alpha``,
              scalars ``loss_barrier`` and ``accuracy_barrier``, ``endpoints`` (dim
              ``endpoint``, the two model names) and the scalar ``merged_alpha``;
            - one merge with data: scalars ``loss`` and ``accuracy``.

        Raises
        ------
        ConfigError
            An alignment whose reference is not a step model, fewer than two models, a weight count that does not
            match the models, or models whose parameters do not match.
        """
        names = list(models)
        if len(names) < 2:
            raise ConfigError(f"interpolation needs at least two models, got {names}", where="key 'models'")
        if alignment is not None:  # every model in the reference's unit order before interpolating
            x = example_input(context.data)
            models = align_step_models(models, alignment, channel_groups(models[names[0]], x), x)
        states = {name: models[name].state_dict() for name in names}
        try:
            check_compatible(states)
        except ValueError as exc:
            raise ConfigError(f"cannot interpolate models {names}: {exc}", where="key 'models'") from exc

        if self.weights is not None:
            if len(self.weights) != len(names):
                raise ConfigError(
                    f"'weights' has {len(self.weights)} values but the step has {len(names)} models ({', '.join(names)})",
                    where="key 'weights'",
                )
            weights = list(self.weights)
        elif len(names) > 2:
            weights = [1.0 / len(names)] * len(names)
        else:
            weights = [1.0 - self.alpha, self.alpha]

        state_list = [states[name] for name in names]
        merged = build_model(models[names[0]], average_states(state_list, weights))
        results = xr.Dataset({"weights": ("model", np.asarray(weights, dtype=float))}, coords={"model": names})

        single = self.weights is not None or len(names) > 2 or self.alphas == []
        if single:  # one merge, no sweep
            if context.data is not None:
                evaluation = context.evaluate(merged)
                results["loss"] = evaluation.loss
                results["accuracy"] = evaluation.accuracy
            return MergeResult(merged, results)

        results["endpoints"] = ("endpoint", np.asarray(names, dtype=str))
        results["merged_alpha"] = self.alpha
        if context.data is None:
            return MergeResult(merged, results)

        requested = default_alphas() if self.alphas is None else self.alphas
        points = sorted(set(requested) | {0.0, 1.0, self.alpha})

        def state_at(a: float) -> dict[str, Any]:
            return average_states(state_list, [1.0 - a, a])

        path = evaluate_path(models[names[0]], state_at, points, context, names, desc="interpolation")
        return MergeResult(merged, xr.merge([results, path]))

    def endpoint_note(self, result: xr.Dataset) -> str:
        """Why the endpoints match the models' own accuracies (or may not)."""
        return (
            "Interpolation evaluates the endpoint models themselves at alpha 0 and 1 (weights 1 and 0), so with a "
            "permutation alignment (or none) on the models' own data they match the models' own accuracies up to "
            "float rounding; another data set or a non-permutation map makes them differ."
        )

    def describe(self, result: xr.Dataset) -> str:
        """One line: accuracy along the path and the loss barrier, or the merge's score."""
        weights = "/".join(f"{w:.2f}" for w in np.atleast_1d(result["weights"].values)) if "weights" in result else ""
        if "alpha" in result.dims and "accuracy" in result:
            acc = result["accuracy"]
            merged_alpha = float(result["merged_alpha"]) if "merged_alpha" in result else 0.5
            line = (
                f"accuracy {float(acc.sel(alpha=0.0)):.3f} -> {float(acc.sel(alpha=merged_alpha)):.3f} "
                f"(alpha {merged_alpha:.2f}) -> {float(acc.sel(alpha=1.0)):.3f}"
            )
            if "loss_barrier" in result:
                line += f"; loss barrier {float(result['loss_barrier']):.3f}"
            return line
        if "accuracy" in result:
            return f"weights {weights}: accuracy {float(result['accuracy']):.3f}, loss {float(result['loss']):.3f}"
        return f"weights {weights} (not evaluated: the pipeline has no data)"


@hookimpl
def register_mergers(register):
    """Register :class:`Interpolation`."""
    register(Interpolation)
