"""Interpolation sweeps: the alpha grid and the barrier along a path.

Shared by every merger that evaluates a path between two models (``interpolation``,
``repair``, ...), so their curves and barriers are comparable.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import xarray as xr
from torch import Tensor, nn

from .components import Context

__all__ = ["default_alphas", "loss_barrier", "evaluate_path"]


def default_alphas() -> list[float]:
    """``0, 0.05, ..., 1`` (21 points), rounded so that ``0.15`` is exactly ``0.15``."""
    return [round(i / 20, 10) for i in range(21)]


def loss_barrier(alphas: Sequence[float], losses: Sequence[float]) -> float:
    """Height of the loss barrier along an interpolation path.

    ``max over alpha in [0, 1] of L(alpha) - ((1 - alpha) L(0) + alpha L(1))``, the
    definition of Frankle et al. (2020) and Entezari et al. (2022). For an accuracy
    barrier pass negated accuracies.

    Parameters
    ----------
    alphas
        Interpolation coefficients; must contain 0 and 1. Points outside ``[0, 1]``
        (extrapolation) are ignored.
    losses
        ``L(alpha)`` at every alpha.

    Returns
    -------
    float
        The barrier; ``>= 0`` because the endpoints contribute 0. NaN if a loss is NaN.
    """
    a = np.asarray(alphas, dtype=float)
    values = np.asarray(losses, dtype=float)
    if a.ndim != 1 or a.shape != values.shape:
        raise ValueError(f"alphas and losses must be 1-D of one length, got shapes {a.shape} and {values.shape}")
    at0 = np.flatnonzero(a == 0.0)
    at1 = np.flatnonzero(a == 1.0)
    if not len(at0) or not len(at1):
        raise ValueError(f"the barrier needs the endpoints alpha = 0 and alpha = 1 among the alphas, got {a.tolist()}")
    start, end = values[at0[0]], values[at1[0]]
    # Extrapolated points have no straight line to compare with; the barrier is on [0, 1].
    inside = (a >= 0.0) & (a <= 1.0)
    a, values = a[inside], values[inside]
    line = (1.0 - a) * start + a * end
    return float(np.max(values - line))


def evaluate_path(
    template: nn.Module,
    state_at: Callable[[float], Mapping[str, Tensor]],
    points: Sequence[float],
    context: Context,
    names: Sequence[str],
    desc: str,
) -> xr.Dataset:
    """Loss and accuracy of the models along a path between two models, and its barriers.

    Parameters
    ----------
    template
        A module of the models' architecture; a copy of it holds each point's state.
    state_at
        The state dict at ``alpha`` (``alpha = 0``: the first model, ``1``: the second).
    points
        The alphas to evaluate; must contain 0 and 1.
    context
        The step's context: its data and ``evaluate``.
    names
        The two models, for the ``alpha`` axis's description.
    desc
        The progress bar's label.

    Returns
    -------
    xr.Dataset
        ``loss`` and ``accuracy`` on dim ``alpha``, and the scalars ``loss_barrier``
        and ``accuracy_barrier`` (:func:`loss_barrier`).
    """
    work = copy.deepcopy(template)
    losses, accuracies = [], []
    for alpha in context.progress(points, desc=desc, total=len(points)):
        work.load_state_dict(state_at(alpha))
        evaluation = context.evaluate(work)
        losses.append(evaluation.loss)
        accuracies.append(evaluation.accuracy)
    path = xr.Dataset(coords={"alpha": ("alpha", np.asarray(points, dtype=float))})
    path["loss"] = ("alpha", np.asarray(losses, dtype=float))
    path["accuracy"] = ("alpha", np.asarray(accuracies, dtype=float))
    path["loss_barrier"] = loss_barrier(points, losses)
    path["accuracy_barrier"] = loss_barrier(points, [-acc for acc in accuracies])
    path["alpha"].attrs["long_name"] = f"weight of {names[1]!r} (1 - alpha on {names[0]!r})"
    return path
