"""Interpolation sweeps: the alpha grid and the barrier along a path.

Shared by every merger that evaluates a path between two models (``interpolation``,
``repair``, ...), so their curves and barriers are comparable.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["default_alphas", "loss_barrier"]


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
