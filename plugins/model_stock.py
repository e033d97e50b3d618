"""Model Stock: average the fine-tunes, then move back toward the base by their angle (Jang et al. 2024).

Fine-tuned weights of one base lie, layer by layer, on a thin shell around a centre that
generalises better than any of them; the average of a few fine-tunes is still far from
that centre. Model Stock estimates how far from the angle between the fine-tunes' task
vectors and interpolates between their average and the pre-trained base (the paper's
equation 2), for every layer ``l`` separately:

    cos theta_l = mean over pairs i < j of cos(tau_i^l, tau_j^l),     tau_i = theta_i - theta_base
    t_l = k cos theta_l / (1 + (k - 1) cos theta_l)
    theta^l = t_l * mean_i theta_i^l + (1 - t_l) * theta_base^l
            = theta_base^l + t_l * mean_i tau_i^l

with ``k`` fine-tunes. Here a layer is a parameter tensor. The paper's derivation
assumes the fine-tunes agree more than they disagree; a negative mean cosine is taken as
0 (``t = 0``: the base), which keeps ``t`` in ``[0, 1]``. A tensor that no fine-tune
changed stays the base's. With ``scaling`` (``lambda``, 1 by default) the merge is
``theta_base + lambda * t * mean tau`` like every task-vector merger.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import attrs
import numpy as np
import torch
import xarray as xr
from torch import Tensor

from mergescope.errors import ConfigError
from mergescope.hookspecs import hookimpl
from mergescope.task_vectors import TaskVectorMerger, TaskVectors

__all__ = ["mean_pairwise_cosine", "stock_ratio", "ModelStock", "register_mergers"]


def mean_pairwise_cosine(tau: Tensor) -> float:
    """The mean cosine over every pair of rows of ``tau`` (``(k, n)``, ``k >= 2``); NaN when a row is zero."""
    unit = tau / tau.norm(dim=1, keepdim=True)
    cosines = unit @ unit.T
    k = tau.shape[0]
    pairs = torch.triu_indices(k, k, offset=1)
    return float(cosines[pairs[0], pairs[1]].mean())


def stock_ratio(cosine: float, k: int) -> float:
    """``t = k cos / (1 + (k - 1) cos)`` with the cosine clamped to ``[0, 1]`` (0 for NaN)."""
    if math.isnan(cosine):  # a fine-tune left the tensor unchanged
        return 0.0
    c = min(max(cosine, 0.0), 1.0)
    return k * c / (1.0 + (k - 1) * c)


@attrs.define
class ModelStock(TaskVectorMerger):
    """Interpolate, layer by layer, between the fine-tunes' average and the base by the angle of their task vectors.

    Every parameter tensor is ``theta_base + t * mean_i (theta_i - theta_base)`` with
    ``t = k cos / (1 + (k - 1) cos)``, ``cos`` the mean cosine between the ``k``
    fine-tunes' task vectors in that tensor. Needs at least two fine-tunes. BatchNorm
    running statistics are the fine-tunes' average, recomputed on the step's data when
    ``reset_batchnorm`` is on.

    Parameters
    ----------
    base, scaling, scalings, reset_batchnorm
        As for every task-vector merger; ``scaling`` multiplies the result (1: the paper's).
    """

    name: ClassVar[str] = "model-stock"
    paper: ClassVar[str] = "Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models"

    def combine(self, inputs: TaskVectors) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``t_l`` times the mean task vector, tensor by tensor.

        Extra results: ``cosine`` and ``ratio`` (dim ``parameter``: the mean pairwise
        cosine and ``t`` of every tensor).
        """
        k = len(inputs.vectors)
        if k < 2:
            raise ConfigError(
                f"model-stock reads the angle between fine-tunes, so it needs at least two besides the base; got {k}",
                where="key 'models'",
            )
        merged: dict[str, Tensor] = {}
        cosines, ratios = [], []
        for key in inputs.vector_keys:
            tau = inputs.rows(key)
            cosine = mean_pairwise_cosine(tau) if bool((tau.norm(dim=1) > 0).all()) else float("nan")
            ratio = stock_ratio(cosine, k)
            merged[key] = ratio * tau.mean(dim=0).reshape(inputs.vectors[0][key].shape)
            cosines.append(cosine)
            ratios.append(ratio)
        coords = {"parameter": list(inputs.vector_keys)}
        return merged, {
            "cosine": xr.DataArray(cosines, dims="parameter", coords=coords),
            "ratio": xr.DataArray(ratios, dims="parameter", coords=coords),
        }

    def describe(self, result: xr.Dataset) -> str:
        """One line: the base, the range of ``t`` over the tensors, ``lambda`` and the score."""
        ratio = result["ratio"].values
        line = (
            f"base {str(result['base'].values)!r}, t from {float(ratio.min()):.2f} to {float(ratio.max()):.2f} "
            f"(median {float(np.median(ratio)):.2f}), lambda {self.chosen_scaling(result)}"
        )
        return self.scored(line, result)


@hookimpl
def register_mergers(register):
    """Register :class:`ModelStock`."""
    register(ModelStock)
