"""PCB-Merging: parameter competition balancing (Du et al. 2024).

Given task vectors ``tau_i = theta_i - theta_base`` of ``N`` fine-tunes of one base, PCB
weighs every entry of every task vector by a *balancing matrix* ``beta`` that combines
how large the entry is within its own task vector (intra-balancing) and how much it
agrees with the other task vectors (inter-balancing), drops the low-scoring entries
and takes the ``beta``-weighted mean of what is left. The equations of Sec. 3.2 of the
paper, labelled here (P1)-(P6) in the paper's order (intra-balancing, inter-balancing,
drop and rescale, merge)::

    (P1) beta_intra_i = Softmax(N * Norm(tau_i * tau_i))
    (P2) beta_inter_i = sum_{j=1..N} Softmax(Norm(tau_i * tau_j))
    (P3) beta_i       = beta_intra_i * beta_inter_i
    (P4) m_i          = beta_i >= sorted(beta_i)[(1 - r) * D],   beta_hat_i = m_i * beta_i
    (P5) tau          = sum_i (beta_hat_i * tau_i) / sum_i beta_hat_i
    (P6) theta        = theta_base + lambda * tau

Products are element-wise; ``D`` is the number of entries of a task vector and ``r`` the
kept ``ratio``. What the equations leave open, and what is done here:

- ``Norm`` is min-max normalisation over all ``D`` entries of the vector it is applied
  to, ``(x - min x) / (max x - min x)``, as in the authors' code (``normalize(x, dim=1)``
  on the rows of the flattened ``(N, D)`` matrix); a constant vector maps to 0.
- Each ``Softmax`` runs over the ``D`` entries of one vector (one task in P1, one pair of
  tasks in P2): the balance is among the parameters of a task, with the whole network
  flattened into one vector, not layer by layer. In P1 the factor ``N`` sharpens the
  softmax as more models compete. The ``j = i`` term is part of the sum in P2.
- (P4) keeps ``max(1, round(r * D))`` entries of each ``beta_i`` (all entries tied with
  the last one kept); entries that no model keeps stay at the base's value.

The authors' released code (``pcb-merging.py``) departs from these equations; this
module follows the paper. The code clips ``|tau|`` at its 0.01 % and 99.99 % quantiles,
uses ``exp(N * Norm(|tau_i|)**2)`` without the softmax denominator for P1, replaces P2 by
``tanh(tau_i * sum_j tau_j)``, and min-max normalises the kept ``beta`` of each task
before P5. The paper tunes ``lambda`` (and per-model coefficients) with an evolutionary
search (CMA-ES) on validation data; here ``scalings`` is a plain grid search of one
``lambda``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from mergescope.hookspecs import hookimpl
from mergescope.task_vectors import TaskVectorMerger, sign_conflicts, top_fraction_mask
from mergescope.validators import as_float, fraction

__all__ = [
    "minmax_normalize",
    "intra_balancing",
    "inter_balancing",
    "balancing_matrix",
    "drop",
    "rescale",
    "PcbMerge",
    "pcb_merge",
    "Pcb",
    "register_mergers",
]


# ------------------------------------------------------------------- pure functions


def minmax_normalize(x: Tensor, dim: int = -1) -> Tensor:
    """``Norm``: ``(x - min x) / (max x - min x)`` along ``dim``; 0 where ``x`` is constant."""
    low = x.amin(dim=dim, keepdim=True)
    span = x.amax(dim=dim, keepdim=True) - low
    # A constant vector (e.g. an all-zero task vector) has no scale: map it to 0.
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (x - low) / safe, torch.zeros_like(x))


def intra_balancing(flat: Tensor) -> Tensor:
    """(P1) ``Softmax(N * Norm(tau_i * tau_i))`` over the entries of each row.

    Parameters
    ----------
    flat
        Task vectors as rows, ``(N, D)``.

    Returns
    -------
    Tensor
        ``(N, D)``; each row sums to 1.
    """
    n = flat.shape[0]
    if flat.shape[1] == 0:
        return torch.zeros_like(flat)
    return torch.softmax(n * minmax_normalize(flat * flat, dim=1), dim=1)


def inter_balancing(flat: Tensor) -> Tensor:
    """(P2) ``sum_j Softmax(Norm(tau_i * tau_j))`` over the entries, for every row ``i``.

    Returns
    -------
    Tensor
        ``(N, D)``; each row sums to ``N``. The pair term is symmetric, so each pair is
        computed once (memory ``O(N * D)``).
    """
    n = flat.shape[0]
    out = torch.zeros_like(flat)
    if flat.shape[1] == 0:
        return out
    for i in range(n):
        for j in range(i, n):
            pair = torch.softmax(minmax_normalize(flat[i] * flat[j], dim=0), dim=0)
            out[i] += pair
            if j != i:
                out[j] += pair
    return out


def balancing_matrix(flat: Tensor) -> Tensor:
    """(P3) ``beta_i = beta_intra_i * beta_inter_i``, ``(N, D)``."""
    return intra_balancing(flat) * inter_balancing(flat)


def drop(beta: Tensor, ratio: float) -> Tensor:
    """(P4) The mask ``m_i`` keeping the top-``ratio`` fraction of each row of ``beta``."""
    return top_fraction_mask(beta, ratio)


def rescale(flat: Tensor, beta: Tensor, mask: Tensor) -> Tensor:
    """(P5) ``sum_i (m_i * beta_i * tau_i) / sum_i (m_i * beta_i)`` per entry; 0 where nothing is kept."""
    kept = beta * mask
    total = kept.sum(dim=0)
    merged = (kept * flat).sum(dim=0)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, merged / safe, torch.zeros_like(total))


@attrs.frozen
class PcbMerge:
    """Every stage of a PCB merge of flat task vectors.

    Attributes
    ----------
    intra, inter, beta
        ``(N, D)``: (P1), (P2) and their product (P3).
    mask
        ``(N, D)`` boolean: the entries kept by the drop (P4).
    merged
        ``(D,)``: the rescaled merged task vector (P5), before ``lambda``.
    """

    intra: Tensor
    inter: Tensor
    beta: Tensor
    mask: Tensor
    merged: Tensor

    def kept(self) -> Tensor:
        """Fraction of each task vector's entries kept by the drop, ``(N,)``."""
        return self.mask.double().mean(dim=1)

    def share(self) -> Tensor:
        """Each model's mean rescaling weight ``beta_hat_i / sum_j beta_hat_j``, ``(N,)``.

        Averaged over the entries some model keeps; the shares sum to 1.
        """
        kept = self.beta * self.mask
        total = kept.sum(dim=0)
        used = total > 0
        if not bool(used.any()):
            return torch.zeros(self.beta.shape[0], dtype=torch.float64)
        return (kept[:, used] / total[used]).mean(dim=1).double()


def pcb_merge(flat: Tensor, ratio: float) -> PcbMerge:
    """Balance, drop and rescale task vectors given as rows of ``flat`` (P1-P5).

    Parameters
    ----------
    flat
        ``(N, D)`` task vectors (float64 recommended: the softmax weights are about
        ``1 / D``).
    ratio
        ``r``, the fraction of each ``beta_i`` kept by the drop.
    """
    intra = intra_balancing(flat)
    inter = inter_balancing(flat)
    beta = intra * inter
    mask = drop(beta, ratio)
    return PcbMerge(intra, inter, beta, mask, rescale(flat, beta, mask))


# ---------------------------------------------------------------------- component


@attrs.define
class Pcb(TaskVectorMerger):
    """Merge fine-tunes with PCB: balance each task-vector entry within and across tasks, drop, rescale.

    ``theta = theta_base + lambda * tau_PCB``, where ``tau_PCB`` is the mean of the task
    vectors ``theta_i - theta_base`` weighted entry by entry by the balancing matrix
    (intra-balancing times inter-balancing), keeping the top ``ratio`` of each task's
    entries. BatchNorm running statistics are not task vectors: they are the fine-tunes'
    average, recomputed on the pipeline's data when ``reset_batchnorm`` is on and there is
    data. The models must be fine-tunes of the base: raw weights of independently
    trained models are rejected.

    Parameters
    ----------
    base
        Name of the pre-trained base among the step's models (default: the first).
    ratio
        ``r``: the fraction of each task vector's entries kept (0.1 keeps the top 10 %
        by balancing score).
    scaling
        ``lambda``.
    scalings
        Choose ``lambda`` from this grid by accuracy on the pipeline's ``[data]`` (a
        validation split); a grid search standing in for the paper's evolutionary
        search. Excludes ``scaling``.
    reset_batchnorm
        Recompute BatchNorm statistics on the pipeline's ``[data]`` after merging.
    """

    name: ClassVar[str] = "pcb"
    paper: ClassVar[str] = "Du et al. 2024, Parameter Competition Balancing for Model Merging"

    ratio: float = attrs.field(default=0.1, converter=as_float, validator=fraction)

    def combine_flat(self, flat: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Balance, drop and rescale; diagnostics of the drop and the balancing.

        Extra results: ``kept`` (dim ``model``, fraction of each task vector kept by the
        drop), ``share`` (dim ``model``, mean rescaling weight of each model) and
        ``sign_conflicts`` (fraction of entries where kept values have both signs); the
        base class adds ``merged_density`` (fraction of entries the merged task vector
        changes).
        """
        pcb = pcb_merge(flat, self.ratio)
        # The (N, D) matrices, the largest objects of the merge, go when this returns.
        return pcb.merged, {
            "kept": ("model", pcb.kept().cpu().numpy()),
            "share": ("model", pcb.share().cpu().numpy()),
            "sign_conflicts": sign_conflicts(flat * pcb.mask),
        }


@hookimpl
def register_mergers(register):
    """Register :class:`Pcb`."""
    register(Pcb)
