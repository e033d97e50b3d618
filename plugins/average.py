"""Parameter averaging: the uniform or weighted "model soup" of several models.

``theta = sum_i w_i theta_i`` entry by entry, with ``w_i = 1 / n`` by default (Wortsman
et al. 2022, Model soups). Unlike the task-vector mergers this needs no base model: it
averages the weights themselves. It is meaningful for models in one linearly connected
basin (fine-tunes of one pre-trained model, or models aligned first); averaging
independently trained networks without alignment usually gives a poor model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import attrs
import numpy as np
import xarray as xr
from torch import Tensor, nn

from mergescope.batchnorm import running_stat_keys
from mergescope.components import Alignment, Context, MergeResult
from mergescope.errors import ConfigError
from mergescope.hookspecs import hookimpl
from mergescope.task_vectors import average_states, build_model, check_compatible, float_list

__all__ = ["average", "Average", "register_mergers"]

# Weights written in a pipeline file may miss 1 by float rounding (0.1 + 0.2 + 0.7).
_SUM_TOLERANCE = 1e-6


def average(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """The weighted average of state dicts as a complete state dict.

    Parameters
    ----------
    states
        State dicts of one architecture (see :func:`mergescope.task_vectors.check_compatible`).
    weights
        One weight per state dict (default uniform), used as given.

    Returns
    -------
    dict
        Floating entries (parameters, float buffers, BatchNorm running statistics)
        averaged in float64 and cast back; integer entries (``num_batches_tracked``)
        copied from the first state dict.
    """
    averaged = average_states(states, weights)
    return {key: averaged[key] if key in averaged else t.detach().clone() for key, t in states[0].items()}


def _check_weights(instance: Average, attribute: attrs.Attribute, value: list[float] | None) -> None:
    if value is None:
        return
    for i, w in enumerate(value):
        if not math.isfinite(w):
            raise ValueError(f"'weights' must be finite numbers, got {w} at position {i} of {value}")
    if len(value) < 2:
        raise ValueError(f"'weights' needs one weight per model (at least two), got {value}")
    if any(w < 0 for w in value):
        raise ValueError(f"'weights' must be non-negative, got {value}")
    total = math.fsum(value)
    if abs(total - 1.0) > _SUM_TOLERANCE:
        raise ValueError(f"'weights' must sum to 1, got {value} (sum {total:g})")


@attrs.define
class Average:
    """Average the weights of models, uniformly or with given weights (a model soup).

    ``theta = sum_i w_i theta_i`` over every floating entry, BatchNorm running
    statistics included; those are then recomputed on the pipeline's data when
    ``reset_batchnorm`` is on and there is data, since averaged statistics do not
    describe the averaged network's features.

    Parameters
    ----------
    weights
        One weight per model, in the step's model order, non-negative and summing to 1.
        ``None``: uniform.
    reset_batchnorm
        Recompute BatchNorm statistics on the pipeline's ``[data]`` after averaging.
    """

    name: ClassVar[str] = "average"
    paper: ClassVar[str] = (
        "Wortsman et al. 2022, Model soups: averaging weights of multiple fine-tuned models "
        "improves accuracy without increasing inference time"
    )

    weights: list[float] | None = attrs.field(default=None, converter=float_list, validator=_check_weights)
    reset_batchnorm: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))

    def merge(
        self, models: Mapping[str, nn.Module], context: Context, alignment: Alignment | None = None
    ) -> MergeResult:
        """Average ``models``; recompute BatchNorm statistics and evaluate when there is data.

        Returns
        -------
        MergeResult
            ``model``: a copy of the first model holding the average. ``results``:
            ``weights`` (dim ``model``, every model of the step), scalar
            ``batchnorm_statistics`` (``"recomputed"``, ``"averaged"`` or ``"none"``)
            and, with data, scalars ``loss`` and ``accuracy``.

        Raises
        ------
        ConfigError
            An alignment is passed, fewer than two models, a weight count that does not
            match the models, or models whose parameters do not match.
        """
        if alignment is not None:
            raise ConfigError(
                "average does not apply alignments: apply the aligner's transforms to the weights first, "
                "or drop 'alignment' from this step",
                where="key 'alignment'",
            )
        names = list(models)
        if len(names) < 2:
            raise ConfigError(f"average needs at least two models, got {names}", where="key 'models'")
        states = {name: models[name].state_dict() for name in names}
        try:
            check_compatible(states)
        except ValueError as exc:
            raise ConfigError(f"cannot average models {names}: {exc}", where="key 'models'") from exc
        if self.weights is not None and len(self.weights) != len(names):
            raise ConfigError(
                f"'weights' has {len(self.weights)} values but the step has {len(names)} models ({', '.join(names)})",
                where="key 'weights'",
            )
        weights = list(self.weights) if self.weights is not None else [1.0 / len(names)] * len(names)

        template = models[names[0]]
        state = average([states[n] for n in names], weights)
        merged = build_model(template, state, context, reset=self.reset_batchnorm)

        results = xr.Dataset({"weights": ("model", np.asarray(weights, dtype=float))}, coords={"model": names})
        if not running_stat_keys(template):
            results["batchnorm_statistics"] = "none"
        else:
            recomputed = self.reset_batchnorm and context.data is not None
            results["batchnorm_statistics"] = "recomputed" if recomputed else "averaged"
        if context.data is not None:
            evaluation = context.evaluate(merged)
            results["loss"] = float(evaluation.loss)
            results["accuracy"] = float(evaluation.accuracy)
        return MergeResult(merged, results)

    def describe(self, result: xr.Dataset) -> str:
        """One line: the weights and the merged model's score."""
        weights = "/".join(f"{w:.2f}" for w in np.atleast_1d(result["weights"].values)) if "weights" in result else "?"
        if "accuracy" in result:
            return f"weights {weights}: accuracy {float(result['accuracy']):.3f}, loss {float(result['loss']):.3f}"
        return f"weights {weights} (not evaluated: the pipeline has no data)"


@hookimpl
def register_mergers(register):
    """Register :class:`Average`."""
    register(Average)
