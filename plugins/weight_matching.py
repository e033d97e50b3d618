"""Weight matching (Git Re-Basin): permute units so the weights themselves line up.

Ainsworth et al. (2023), Algorithm 1: for the permutation ``P_g`` of every channel group
``g`` in turn (random order), with the others held fixed, maximise
``sum over axes of g  <W_ref, P_g W_other (other permutations applied)>``, a linear
assignment problem (:func:`scipy.optimize.linear_sum_assignment`); repeat until no
group improves. Every parameter axis of a group counts: producers' output axes,
BatchNorm parameters, consumers' input axes (found by tracing, :mod:`mergescope.groups`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import attrs
import numpy as np
import xarray as xr
from scipy.optimize import linear_sum_assignment
from torch import nn

from mergescope.components import Alignment, Context
from mergescope.groups import Axis, ChannelGroup, channel_groups, example_input, permutation_matrix
from mergescope.hookspecs import hookimpl

__all__ = ["match_weights", "WeightMatching", "register_aligners"]


def _block(perm: np.ndarray, ax: Axis, size: int, length: int) -> np.ndarray:
    """Index along an axis of ``length`` entries applying ``perm`` to the group's block."""
    index = np.arange(length)
    start, stop = ax.span(size)
    index[start:stop] = ax.offset + (perm[:, None] * ax.repeat + np.arange(ax.repeat)[None, :]).reshape(-1)
    return index


def _rows(tensor: np.ndarray, ax: Axis, size: int) -> np.ndarray:
    """The group's block of ``tensor`` as a ``(size, -1)`` matrix, one row per unit."""
    start, stop = ax.span(size)
    block = np.take(tensor, np.arange(start, stop), axis=ax.axis)
    block = np.moveaxis(block, ax.axis, 0)
    return block.reshape(size, -1)


def match_weights(
    reference: Mapping[str, np.ndarray],
    other: Mapping[str, np.ndarray],
    groups: Sequence[ChannelGroup],
    *,
    seed: int = 0,
    max_iter: int = 100,
) -> tuple[dict[str, np.ndarray], int]:
    """Git Re-Basin weight matching of ``other`` onto ``reference``.

    Parameters
    ----------
    reference, other
        State dicts as float64 arrays (same keys and shapes).
    groups
        The architecture's channel groups.
    seed
        Seeds the random order in which groups are visited.
    max_iter
        Sweeps over all groups at most.

    Returns
    -------
    perms
        ``{group: perm}``, ``perm[j]`` the unit of ``other`` placed at position ``j``.
    sweeps
        The number of sweeps until no group improved.
    """
    perms = {g.name: np.arange(g.size) for g in groups}
    touching: dict[str, list[tuple[ChannelGroup, Axis]]] = {}
    for g in groups:
        for ax in g.axes:
            touching.setdefault(ax.param, []).append((g, ax))
    rng = np.random.default_rng(seed)
    for sweep in range(1, max_iter + 1):
        improved = False
        for index in rng.permutation(len(groups)):
            g = groups[index]
            score = np.zeros((g.size, g.size))
            for ax in g.axes:
                w = other[ax.param]
                # Hold every other permutation fixed on this parameter's other axes.
                for g2, ax2 in touching[ax.param]:
                    if g2.name != g.name or ax2.axis != ax.axis:
                        w = np.take(w, _block(perms[g2.name], ax2, g2.size, w.shape[ax2.axis]), axis=ax2.axis)
                score += _rows(reference[ax.param], ax, g.size) @ _rows(w, ax, g.size).T
            rows, cols = linear_sum_assignment(score, maximize=True)
            new = cols[np.argsort(rows)]
            old_value = score[np.arange(g.size), perms[g.name]].sum()
            if score[np.arange(g.size), new].sum() > old_value + 1e-12 * max(1.0, abs(old_value)):
                perms[g.name] = new
                improved = True
        if not improved:
            return perms, sweep
    return perms, max_iter


def _as_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().double().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}


@attrs.define
class WeightMatching:
    """Permute units so each model's weights best match the reference's (Git Re-Basin coordinate descent).

    Parameters
    ----------
    seed
        Seeds the random order of the groups in every sweep.
    max_iter
        At most this many sweeps over all groups.
    """

    name: ClassVar[str] = "weight-matching"
    paper: ClassVar[str] = "Ainsworth et al. 2023, Git Re-Basin: Merging Models modulo Permutation Symmetries"

    seed: int = attrs.field(default=0, validator=attrs.validators.instance_of(int))
    max_iter: int = attrs.field(default=100, validator=[attrs.validators.instance_of(int), attrs.validators.gt(0)])

    def align(self, models: Mapping[str, nn.Module], reference: str, context: Context) -> Alignment:
        """Match every other model's weights to the reference's."""
        groups = channel_groups(models[reference], example_input(context.data))
        ref = _as_arrays(models[reference])
        transforms: dict[str, dict[str, xr.DataArray]] = {}
        others = [m for m in models if m != reference]
        sweeps = np.zeros(len(others), dtype=np.int64)
        for i, m in enumerate(others):
            other = _as_arrays(models[m])
            for key, value in ref.items():
                if key not in other or other[key].shape != value.shape:
                    found = other[key].shape if key in other else "nothing"
                    raise ValueError(
                        f"weight matching needs one architecture: {key!r} is {value.shape} in {reference!r} "
                        f"but {found} in {m!r}"
                    )
            perms, sweeps[i] = match_weights(ref, other, groups, seed=self.seed, max_iter=self.max_iter)
            transforms[m] = {name: permutation_matrix(p) for name, p in perms.items()}
        diagnostics = xr.Dataset({"sweeps": ("model", sweeps)}, coords={"model": others})
        return Alignment(reference, transforms, diagnostics)

    def describe(self, result: xr.Dataset) -> str:
        """Sweeps until convergence per model."""
        if "sweeps" not in result:
            return "aligned"
        return "; ".join(f"{m}: converged in {int(s)} sweeps" for m, s in zip(result["model"].values, result["sweeps"].values))


@hookimpl
def register_aligners(register):
    """Register :class:`WeightMatching`."""
    register(WeightMatching)
