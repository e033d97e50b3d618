"""Parameter averaging: the uniform or weighted "model soup" of several models.

``theta = sum_i w_i theta_i`` entry by entry, with ``w_i = 1 / n`` by default (Wortsman
et al. 2022, Model soups). Unlike the task-vector mergers this needs no base model: it
averages the weights themselves. It is meaningful for models in one linearly connected
basin (fine-tunes of one pre-trained model, or models aligned first); averaging
independently trained networks without alignment usually gives a poor model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import attrs
import numpy as np
import xarray as xr
from torch import nn

from mergescope.batchnorm import running_stat_keys
from mergescope.components import Alignment, Context, MergeResult
from mergescope.errors import ConfigError
from mergescope.hookspecs import hookimpl
from mergescope.states import average_states, build_model, check_compatible
from mergescope.task_vectors import aligned_models
from mergescope.validators import boolean, finite, float_list, list_of, non_negative, optional, sums_to

__all__ = ["Average", "register_mergers"]

# One weight per model (so at least two), finite, non-negative, summing to 1.
_WEIGHTS = optional([list_of(finite, min_length=2), list_of(non_negative, min_length=2), sums_to(1.0)])


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

    weights: list[float] | None = attrs.field(default=None, converter=float_list, validator=_WEIGHTS)
    reset_batchnorm: bool = attrs.field(default=True, validator=boolean)

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
            An alignment whose reference is not a step model, fewer than two models, a
            weight count that does not
            match the models, or models whose parameters do not match.
        """
        models = aligned_models(models, alignment, context)
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
        state = average_states([states[n] for n in names], weights)
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
