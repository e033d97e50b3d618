"""Task arithmetic: add the scaled sum of task vectors to the pre-trained base.

``theta = theta_base + lambda * sum_i tau_i`` with ``tau_i = theta_i - theta_base``
(Ilharco et al. 2023, Editing Models with Task Arithmetic). The paper chooses ``lambda``
on held-out validation data; without validation data, values of 0.3 to 0.4 are the
common choice when adding a handful of task vectors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import attrs
import torch
import xarray as xr
from torch import Tensor

from mergescope.hookspecs import hookimpl
from mergescope.task_vectors import TaskVectorMerger, TaskVectors
from mergescope.validators import as_float, finite

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
class TaskArithmetic(TaskVectorMerger):
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

    scaling: float = attrs.field(default=0.3, converter=as_float, validator=finite)

    def combine(self, inputs: TaskVectors) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The sum of the task vectors; no extra results."""
        return sum_task_vectors(inputs.vectors), {}

    def describe(self, result: xr.Dataset) -> str:
        """One line: base, scaling and the merged model's score."""
        n = result.sizes.get("model", 0)
        line = (
            f"base {str(result['base'].values)!r} + {self.chosen_scaling(result)} x sum of "
            f"{n} task vector{'s' * (n != 1)}"
        )
        return self.scored(line, result)


@hookimpl
def register_mergers(register):
    """Register :class:`TaskArithmetic`."""
    register(TaskArithmetic)
