"""Model Breadcrumbs: drop each layer's smallest and largest task-vector entries, then add (Davari & Belilovsky 2024).

Model Breadcrumbs sparsifies every task vector ``tau_i = theta_i - theta_base`` layer by
layer with a deterministic mask that removes both tails of the magnitudes: the many
small entries, which are mostly fine-tuning noise, and the few largest, outliers that
interfere most with other tasks. What remains, the "breadcrumbs", is added to the base
as in task arithmetic:

    theta = theta_base + lambda * sum_i m_i * tau_i,

where, in every layer (every parameter tensor) of ``tau_i``, the mask ``m_i`` is 0 for
the ``drop_small`` fraction of entries of smallest ``|tau|`` and for the ``drop_large``
fraction of largest, 1 elsewhere. The paper's settings remove about 90 % of the small
and 1 % of the large entries. The counts are ``round(fraction * n)`` per tensor, so a
small tensor (a bias) may lose none of its largest entries; ties in magnitude are broken
by position, so that each tensor loses exactly those counts.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from mergescope.errors import ConfigError
from mergescope.hookspecs import hookimpl
from mergescope.task_vectors import TaskVectorMerger, TaskVectors
from mergescope.validators import as_float, finite, in_range

__all__ = ["breadcrumb_mask", "Breadcrumbs", "register_mergers"]


def breadcrumb_mask(tau: Tensor, drop_small: float, drop_large: float) -> Tensor:
    """The mask of one layer's task vectors, row by row: 0 on both tails of ``|tau|``.

    Parameters
    ----------
    tau
        ``(n_models, n_entries)``: one layer's task vectors as rows.
    drop_small, drop_large
        Fractions of each row's entries removed from the bottom and the top of ``|tau|``.

    Returns
    -------
    Tensor
        Boolean, the shape of ``tau``; ``round(drop_small * n)`` smallest and
        ``round(drop_large * n)`` largest entries of each row are ``False``.
    """
    n = tau.shape[1]
    small, large = round(drop_small * n), round(drop_large * n)
    order = torch.argsort(tau.abs(), dim=1, stable=True)  # smallest first; equal magnitudes by position
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=tau.device).expand_as(order))
    return (ranks >= small) & (ranks < n - large)


@attrs.define
class Breadcrumbs(TaskVectorMerger):
    """Add to the base the fine-tunes' task vectors without each layer's smallest and largest entries.

    In every parameter tensor of every task vector ``theta_i - theta_base``, the
    ``drop_small`` fraction of entries of smallest magnitude and the ``drop_large``
    fraction of largest are set to zero; ``lambda`` times the sum of what remains is
    added to the base. BatchNorm running statistics are the fine-tunes' average,
    recomputed on the step's data when ``reset_batchnorm`` is on. The models must be
    fine-tunes of the base.

    Parameters
    ----------
    drop_small
        Fraction of each layer's entries removed from the bottom of ``|tau|``.
    drop_large
        Fraction removed from the top (the outliers).
    base, scaling, scalings, reset_batchnorm
        As for every task-vector merger; ``scaling`` is ``lambda``.
    """

    name: ClassVar[str] = "breadcrumbs"
    paper: ClassVar[str] = (
        "Davari & Belilovsky 2024, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks"
    )

    scaling: float = attrs.field(default=0.3, converter=as_float, validator=finite)
    drop_small: float = attrs.field(default=0.9, converter=as_float, validator=in_range(0, 1, hi_open=True))
    drop_large: float = attrs.field(default=0.01, converter=as_float, validator=in_range(0, 1, hi_open=True))

    def __attrs_post_init__(self) -> None:
        if self.drop_small + self.drop_large >= 1.0:
            raise ConfigError(
                f"drop_small + drop_large = {self.drop_small + self.drop_large:g} would remove every entry; "
                "their sum must stay below 1",
                where="key 'drop_large'",
            )

    def combine(self, inputs: TaskVectors) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The sum of the masked task vectors, layer by layer.

        Extra results: ``kept`` (dim ``model``: fraction of each task vector's entries the
        masks keep) and ``merged_density`` (fraction of entries the merged vector changes).
        """
        merged: dict[str, Tensor] = {}
        kept = torch.zeros(len(inputs.vectors), dtype=torch.float64)
        total = 0
        changed = 0
        for key in inputs.vector_keys:
            tau = inputs.rows(key)
            mask = breadcrumb_mask(tau, self.drop_small, self.drop_large)
            summed = (tau * mask).sum(dim=0)
            merged[key] = summed.reshape(inputs.vectors[0][key].shape)
            kept += mask.sum(dim=1).double().cpu()
            total += tau.shape[1]
            changed += int((summed != 0).sum())
        fractions = (kept / max(total, 1)).numpy()
        return merged, {"kept": ("model", fractions), "merged_density": changed / max(total, 1)}


@hookimpl
def register_mergers(register):
    """Register :class:`Breadcrumbs`."""
    register(Breadcrumbs)
