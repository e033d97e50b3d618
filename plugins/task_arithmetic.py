"""Task arithmetic: add the scaled sum of task vectors to the pre-trained base.

``theta = theta_base + lambda * sum_i tau_i`` with ``tau_i = theta_i - theta_base``
(Ilharco et al. 2023, Editing Models with Task Arithmetic). The paper chooses ``lambda``
on held-out validation data; without validation data, values of 0.3 to 0.4 are the
common choice when adding a handful of task vectors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import attrs
import torch
import xarray as xr
from torch import Tensor, nn

from mergescope.components import Alignment, Context, MergeResult
from mergescope.errors import ConfigError
from mergescope.hookspecs import hookimpl
from mergescope.task_vectors import (
    check_scaling,
    check_scalings,
    example_finetunes,
    finish_merge,
    float_list,
    prepare,
)

__all__ = ["sum_task_vectors", "TaskArithmetic", "register_mergers"]


def sum_task_vectors(vectors: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """``sum_i tau_i`` entry by entry, in float64 (the merged task vector before scaling).

    Parameters
    ----------
    vectors
        Task vectors with the same keys and shapes (see
        :func:`mergescope.task_vectors.task_vectors`).
    """
    if not vectors:
        raise ValueError("no task vectors to sum")
    out = {}
    for key in vectors[0]:
        total = torch.zeros(vectors[0][key].shape, dtype=torch.float64, device=vectors[0][key].device)
        for tau in vectors:
            total += tau[key].to(torch.float64)
        out[key] = total
    return out


@attrs.define
class TaskArithmetic:
    """Add the scaled sum of the fine-tunes' task vectors to their pre-trained base.

    ``theta = theta_base + lambda * sum_i (theta_i - theta_base)`` over every floating
    parameter and buffer. BatchNorm running statistics are the fine-tunes' average,
    recomputed on the pipeline's data when ``reset_batchnorm`` is on and there is data.
    The models must be fine-tunes of the base: independently trained models are
    rejected (use ``interpolation`` for those).

    Parameters
    ----------
    base
        Name of the pre-trained base among the step's models (default: the first).
    scaling
        ``lambda``.
    scalings
        Choose ``lambda`` from this grid by accuracy on the pipeline's ``[data]`` (which
        should then be a validation split, not the test set). Excludes ``scaling``.
    reset_batchnorm
        Recompute BatchNorm statistics on the pipeline's ``[data]`` after merging.
    """

    name: ClassVar[str] = "task-arithmetic"
    paper: ClassVar[str] = "Ilharco et al. 2023, Editing Models with Task Arithmetic"

    base: str | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.instance_of(str)))
    scaling: float = attrs.field(default=0.3, converter=float, validator=check_scaling)
    scalings: list[float] | None = attrs.field(default=None, converter=float_list, validator=check_scalings)
    reset_batchnorm: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))

    @classmethod
    def conformance_models(cls) -> dict[str, nn.Module]:
        """A base (``model0``) and two small fine-tunes of it, for conformance checks."""
        return example_finetunes(2)

    def merge(
        self, models: Mapping[str, nn.Module], context: Context, alignment: Alignment | None = None
    ) -> MergeResult:
        """Merge the fine-tunes into the base; search ``lambda`` and evaluate when there is data.

        Returns
        -------
        MergeResult
            ``model``: a copy of the base holding the merge. ``results``: see
            :func:`mergescope.task_vectors.finish_merge` (``coefficient`` and
            ``relative_distance`` on dim ``model``, ``base``, ``merged_scaling``,
            ``loss`` / ``accuracy`` with data, the search curve on dim ``scaling``).

        Raises
        ------
        ConfigError
            An alignment is passed, ``base`` is not a model of the step, no fine-tune,
            models of different architectures, models that are not fine-tunes of the
            base, or ``scalings`` without data.
        """
        if alignment is not None:
            raise ConfigError(
                "task-arithmetic merges fine-tunes of one base, which share its coordinates and need no "
                "alignment; drop 'alignment' from this step",
                where="key 'alignment'",
            )
        inputs = prepare(models, self.base, method=self.name)
        delta = sum_task_vectors(inputs.vectors)
        merged, results = finish_merge(
            inputs,
            delta,
            scaling=self.scaling,
            scalings=self.scalings,
            context=context,
            reset=self.reset_batchnorm,
            method=self.name,
        )
        return MergeResult(merged, results)

    def describe(self, result: xr.Dataset) -> str:
        """One line: base, scaling and the merged model's score."""
        n = result.sizes.get("model", 0)
        scaling = float(result["merged_scaling"]) if "merged_scaling" in result else float("nan")
        chosen = f" (best of {result.sizes['scaling']})" if "scaling" in result.dims else ""
        line = f"base {str(result['base'].values)!r} + {scaling:g}{chosen} x sum of {n} task vector{'s' * (n != 1)}"
        if "accuracy" in result:
            return f"{line}: accuracy {float(result['accuracy']):.3f}, loss {float(result['loss']):.3f}"
        return f"{line} (not evaluated: the pipeline has no data)"


@hookimpl
def register_mergers(register):
    """Register :class:`TaskArithmetic`."""
    register(TaskArithmetic)
