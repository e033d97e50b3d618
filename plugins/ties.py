"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al. 2023).

Given task vectors ``tau_i = theta_i - theta_base`` of ``n`` fine-tunes of one base
(Algorithm 1 of the paper):

1. **Trim**: keep the top-``density`` fraction of each ``tau_i`` by magnitude, zero the
   rest. The ranking is per task vector over *all* its entries flattened together
   (one global top-k across the network, not one per layer), as in the authors' code
   (``topk_values_mask`` applied to the rows of the flattened ``(n, d)`` matrix); the
   paper's default keeps 20 %.
2. **Elect**: the sign of every entry is ``gamma = sgn(sum_i trimmed tau_i)`` (the
   "mass" rule: the sign with more total magnitude wins).
3. **Disjoint merge**: average, per entry, only the trimmed values that are non-zero
   and agree with the elected sign: ``tau = 1/|A| sum_{i in A} trimmed tau_i`` with
   ``A = {i : sgn(trimmed tau_i) = gamma}`` (0 where ``A`` is empty).

The merged model is ``theta_base + lambda * tau`` (``lambda = 1`` in the paper when no
validation set is used).

An entry whose trimmed values sum to exactly 0 while some are non-zero gets the sign
that most entries elected (the sign of the sum of all elected signs), as the authors'
code does (``resolve_zero_signs(..., "majority")``); the paper's equations leave it 0.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from mergescope.hookspecs import hookimpl
from mergescope.task_vectors import TaskVectorMerger, sign_conflicts, top_fraction_mask
from mergescope.validators import as_float, fraction

__all__ = ["trim", "elect_signs", "disjoint_mean", "TiesMerge", "ties_merge", "Ties", "register_mergers"]


# ------------------------------------------------------------------- pure functions


def trim(flat: Tensor, density: float) -> Tensor:
    """Step 1: zero all but the top-``density`` fraction of each row by magnitude.

    Parameters
    ----------
    flat
        Task vectors as rows, ``(n_models, n_entries)`` (see
        :func:`mergescope.task_vectors.flatten`).
    density
        Fraction kept per row, in ``(0, 1]``; see
        :func:`mergescope.task_vectors.top_fraction_mask` for the rounding and ties.
    """
    return flat * top_fraction_mask(flat.abs(), density)


def elect_signs(trimmed: Tensor) -> Tensor:
    """Step 2: ``sgn(sum_i trimmed_i)`` per entry; exact zeros take the majority sign.

    Returns
    -------
    Tensor
        ``(n_entries,)`` of -1, 0, +1. An entry with a zero sum gets the sign of the sum
        of all elected signs (the authors' tie rule); it stays 0 only if that is 0 too.
    """
    signs = torch.sign(trimmed.sum(dim=0))
    majority = torch.sign(signs.sum())
    return torch.where(signs == 0, majority, signs)


def disjoint_mean(trimmed: Tensor, signs: Tensor) -> Tensor:
    """Step 3: per entry, the mean of the non-zero trimmed values whose sign is the elected one.

    Entries where no value agrees (or the elected sign is 0) are 0.
    """
    agree = (torch.sign(trimmed) == signs.unsqueeze(0)) & (trimmed != 0)
    count = agree.sum(dim=0)
    total = (trimmed * agree).sum(dim=0)
    return total / count.clamp(min=1)


@attrs.frozen
class TiesMerge:
    """Every stage of a TIES merge of flat task vectors.

    Attributes
    ----------
    trimmed
        ``(n_models, n_entries)``, the task vectors after step 1.
    signs
        ``(n_entries,)``, the elected signs of step 2.
    merged
        ``(n_entries,)``, the disjoint mean of step 3 (before ``lambda``).
    """

    trimmed: Tensor
    signs: Tensor
    merged: Tensor

    def kept(self) -> Tensor:
        """Fraction of each task vector's entries kept by trimming, ``(n_models,)``."""
        return (self.trimmed != 0).double().mean(dim=1)

    def agreeing(self) -> Tensor:
        """Fraction of each task vector's kept entries whose sign was elected, ``(n_models,)``."""
        kept = self.trimmed != 0
        agree = kept & (torch.sign(self.trimmed) == self.signs.unsqueeze(0))
        return agree.sum(dim=1).double() / kept.sum(dim=1).clamp(min=1).double()


def ties_merge(flat: Tensor, density: float) -> TiesMerge:
    """Trim, elect and disjoint-merge task vectors given as rows of ``flat``.

    Parameters
    ----------
    flat
        ``(n_models, n_entries)`` task vectors.
    density
        Fraction of each task vector kept by trimming.
    """
    trimmed = trim(flat, density)
    signs = elect_signs(trimmed)
    return TiesMerge(trimmed, signs, disjoint_mean(trimmed, signs))


# ---------------------------------------------------------------------- component


@attrs.define
class Ties(TaskVectorMerger):
    """Merge fine-tunes with TIES: trim each task vector, elect signs, average the agreeing values.

    ``theta = theta_base + lambda * tau_TIES`` where ``tau_TIES`` is the disjoint mean of
    the trimmed task vectors ``theta_i - theta_base`` that agree with the elected sign.
    Trimming ranks each task vector's entries over the whole network. BatchNorm running
    statistics are not task vectors: they are the fine-tunes' average, recomputed on
    the pipeline's data when ``reset_batchnorm`` is on and there is data. The models
    must be fine-tunes of the base: independently trained models are rejected.

    Parameters
    ----------
    base
        Name of the pre-trained base among the step's models (default: the first).
    density
        Fraction of each task vector kept by trimming (0.2 keeps the top 20 %).
    scaling
        ``lambda``.
    scalings
        Choose ``lambda`` from this grid by accuracy on the pipeline's ``[data]`` (a
        validation split). Excludes ``scaling``.
    reset_batchnorm
        Recompute BatchNorm statistics on the pipeline's ``[data]`` after merging.
    """

    name: ClassVar[str] = "ties"
    paper: ClassVar[str] = "Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models"

    density: float = attrs.field(default=0.2, converter=as_float, validator=fraction)

    def combine_flat(self, flat: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Trim, elect signs and take the disjoint mean; diagnostics of the trimming and signs.

        Extra results: ``kept`` (dim ``model``, fraction of each task vector kept by
        trimming), ``agreeing`` (dim ``model``, fraction of its kept entries that agree
        with the elected sign) and ``sign_conflicts`` (fraction of entries where kept
        values have both signs); the base class adds ``merged_density`` (fraction of
        entries the merged task vector changes).
        """
        ties = ties_merge(flat, self.density)
        return ties.merged, {
            "kept": ("model", ties.kept().cpu().numpy()),
            "agreeing": ("model", ties.agreeing().cpu().numpy()),
            "sign_conflicts": sign_conflicts(ties.trimmed),
        }


@hookimpl
def register_mergers(register):
    """Register :class:`Ties`."""
    register(Ties)
