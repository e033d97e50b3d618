"""DARE: drop and rescale each task vector, then merge (Yu et al. 2024).

Fine-tuning deltas are highly redundant: "Language Models are Super Mario" (Yu et al.
2024) drops most of each task vector at random and rescales the rest so that its
expectation is unchanged (Drop And REscale, their equation 1):

    m_i ~ Bernoulli(p) entry by entry,    tau_i' = (1 - m_i) * tau_i / (1 - p)

and then merges the sparse ``tau_i'`` with an existing method; the paper pairs DARE with
task arithmetic and with TIES-Merging among others. Here ``then`` picks the method:

- ``"task-arithmetic"``: ``tau = sum_i tau_i'`` (Ilharco et al. 2023);
- ``"ties"``: TIES's trim (keeping ``density`` of each sparse vector; 1 keeps all of it,
  since DARE has already sparsified), sign election and disjoint mean (Yadav et al. 2023).

The merged model is ``theta_base + lambda * tau``. The drop is drawn from ``seed`` with
torch's CPU generator over the task vectors flattened in state-dict order, so a merge is
the same on every device.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from mergescope.hookspecs import hookimpl
from mergescope.task_vectors import TaskVectorMerger, sign_conflicts
from mergescope.validators import as_float, finite, fraction, in_range, integer, one_of
from mergescope_plugins.ties import ties_merge

__all__ = ["drop_and_rescale", "Dare", "register_mergers"]

THEN = ("task-arithmetic", "ties")


def drop_and_rescale(flat: Tensor, drop_rate: float, generator: torch.Generator) -> Tensor:
    """Drop each entry of each row with probability ``drop_rate`` and rescale the rest by ``1 / (1 - drop_rate)``.

    Parameters
    ----------
    flat
        Task vectors as rows, ``(n_models, n_entries)``.
    drop_rate
        ``p`` in ``[0, 1)``.
    generator
        A CPU generator: the draws are made on the CPU, then moved to ``flat``'s device.
    """
    kept = torch.rand(flat.shape, generator=generator, dtype=torch.float64) >= drop_rate
    return flat * kept.to(flat.device) / (1.0 - drop_rate)


@attrs.define
class Dare(TaskVectorMerger):
    """Drop and rescale each task vector at random (DARE), then merge them by task arithmetic or TIES.

    Each entry of each task vector ``theta_i - theta_base`` is dropped with probability
    ``drop_rate`` and the rest are scaled by ``1 / (1 - drop_rate)``; the sparse vectors
    are summed (``then = "task-arithmetic"``) or TIES-merged (``then = "ties"``), and
    ``lambda`` times the result is added to the base. BatchNorm running statistics are
    the fine-tunes' average, recomputed on the step's data when ``reset_batchnorm`` is
    on. The models must be fine-tunes of the base.

    Parameters
    ----------
    drop_rate
        ``p``, the probability of dropping an entry (the paper goes up to 0.9 and beyond).
    seed
        Seed of the drop.
    then
        ``"task-arithmetic"`` or ``"ties"``: how the sparse task vectors are merged.
    density
        With ``then = "ties"``: the fraction of each sparse vector TIES's trim keeps
        (1: no trim, only sign election and the disjoint mean).
    base, scaling, scalings, reset_batchnorm
        As for every task-vector merger; ``scaling`` is ``lambda``.
    """

    name: ClassVar[str] = "dare"
    paper: ClassVar[str] = (
        "Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch"
    )

    scaling: float = attrs.field(default=0.3, converter=as_float, validator=finite)
    # 1 would drop everything and divide by zero.
    drop_rate: float = attrs.field(default=0.9, converter=as_float, validator=in_range(0, 1, hi_open=True))
    seed: int = attrs.field(default=0, validator=integer)
    then: str = attrs.field(default="task-arithmetic", validator=one_of(*THEN))
    density: float = attrs.field(default=1.0, converter=as_float, validator=fraction)

    def combine_flat(self, flat: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Drop and rescale every row, then sum or TIES-merge them.

        Extra results: ``kept`` (dim ``model``: fraction of each task vector the drop
        kept) and ``sign_conflicts`` (fraction of entries where kept values have both signs).
        """
        generator = torch.Generator().manual_seed(self.seed)
        sparse = drop_and_rescale(flat, self.drop_rate, generator)
        kept = (sparse != 0).double().mean(dim=1).cpu().numpy()
        merged = sparse.sum(dim=0) if self.then == "task-arithmetic" else ties_merge(sparse, self.density).merged
        return merged, {"kept": ("model", kept), "sign_conflicts": sign_conflicts(sparse)}


@hookimpl
def register_mergers(register):
    """Register :class:`Dare`."""
    register(Dare)
