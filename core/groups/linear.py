"""General linear maps on channel groups: :func:`apply_linear` and its helpers.

Where :mod:`.permute` only reorders channels, :func:`apply_linear` multiplies a group's
producers by a map ``T`` and its consumers by ``T^-1`` (as CCA merging needs), with a
chosen treatment of per-channel quantities that no general map transforms exactly;
:func:`maps_from_transforms` builds the maps from an alignment's transforms.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
import xarray as xr
from torch import nn

from .model import Axis, ChannelGroup, _group_lookup
from .values import _fetch_state


def maps_from_transforms(transforms: Mapping[str, xr.DataArray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Turn an alignment's transforms into the maps :func:`apply_linear` takes.

    Parameters
    ----------
    transforms
        ``{group: M}`` with ``M`` of dims ``("unit", "unit_ref")``, as in
        ``Alignment.transforms[model]``: aligned activations are ``a @ M``.

    Returns
    -------
    dict[str, tuple[numpy.ndarray, numpy.ndarray]]
        ``{group: (T, T_inv)}`` with ``T = M.T`` (so ``new = T @ old``) and ``T_inv`` its
        inverse (the pseudo-inverse when ``T`` is singular).
    """
    maps = {}
    for name, m in transforms.items():
        t = np.asarray(m.transpose("unit", "unit_ref").values, dtype=np.float64).T
        try:
            t_inv = np.linalg.inv(t)
        except np.linalg.LinAlgError:
            t_inv = np.linalg.pinv(t)
        maps[name] = (t, t_inv)
    return maps


def _is_permutation_matrix(t: np.ndarray) -> bool:
    """Whether ``t`` holds only 0 and 1 with exactly one 1 in every row and every column."""
    return bool(np.all((t == 0) | (t == 1)) and np.all(t.sum(axis=0) == 1) and np.all(t.sum(axis=1) == 1))


def apply_linear(
    model: nn.Module,
    maps: Mapping[str, tuple[np.ndarray, np.ndarray]],
    groups: Sequence[ChannelGroup],
    *,
    per_channel: Literal["error", "mix"] = "error",
) -> nn.Module:
    """Return a copy of ``model`` with the channels of some groups transformed by linear maps.

    For group ``g`` with maps ``(T, T_inv)`` (both ``size x size``, ``T`` acting on the
    group's activation vectors: ``new = T @ old``):

    - axes with role ``"output"`` (producers' weights and biases) are multiplied by ``T``,
      so the producers compute ``T @ h``;
    - axes with role ``"input"`` (consumers' weights) are multiplied by ``T_inv`` on the
      right, so ``W @ h = (W T_inv) @ (T h)``; ``repeat`` blocks (a flatten before a
      linear layer) are transformed block by block;
    - axes with role ``"channel"`` (BatchNorm scale, shift and running statistics,
      depthwise filters, layer scales) hold one value per channel, which a general
      linear map cannot transform exactly. With ``per_channel="error"`` (the default) a
      group that has such axes accepts only permutation matrices. With
      ``per_channel="mix"`` every new channel ``i`` takes the average of the old
      channels' values weighted by ``|T[i, j]|`` (rows of ``|T|`` normalised to sum 1;
      an all-zero row keeps channel ``i``'s value), which is exact for permutations and
      an approximation otherwise — re-estimate BatchNorm statistics afterwards.

    The result computes the same function when every ``T`` is a permutation matrix (it
    then equals :func:`permute`). For other maps it is exact only when nothing between
    producers and consumers acts per channel: an elementwise nonlinearity such as ReLU
    does not commute with ``T``, which is the approximation CCA merging accepts.

    Parameters
    ----------
    model
        The network; it is not modified.
    maps
        ``{group name: (T, T_inv)}``; groups not listed are unchanged. ``T_inv`` may be
        ``None`` for ``inv(T)``. :func:`maps_from_transforms` builds these from an
        alignment's transforms.
    groups
        The model's groups, from :func:`channel_groups`.
    per_channel
        ``"error"`` or ``"mix"``, see above.

    Returns
    -------
    torch.nn.Module
        The transformed deep copy.

    Raises
    ------
    ValueError
        For an unknown group, maps of the wrong shape, a map that is not a permutation
        on a group of attention heads, or (with ``per_channel="error"``) a map that is
        not a permutation on a group with per-channel axes.
    """
    if per_channel not in ("error", "mix"):
        raise ValueError(f"per_channel must be 'error' or 'mix', got {per_channel!r}")
    by_name = _group_lookup(groups, maps)
    new = copy.deepcopy(model)
    with torch.no_grad():
        for name, (t, t_inv) in maps.items():
            group = by_name[name]
            t = np.asarray(t, dtype=np.float64)
            t_inv = np.linalg.inv(t) if t_inv is None else np.asarray(t_inv, dtype=np.float64)
            if t.shape != (group.size, group.size) or t_inv.shape != (group.size, group.size):
                raise ValueError(
                    f"the maps of group {name!r} must be {group.size} x {group.size}, got {t.shape} and {t_inv.shape}"
                )
            if (group.heads > 1 or group.tied) and not _is_permutation_matrix(t):
                # q k^T needs k's map to be the inverse transpose of q's: only permutations keep both.
                raise ValueError(
                    f"group {name!r} holds attention heads, which only permutations of whole heads and of the "
                    "channels within each head transform exactly; pass a permutation matrix"
                )
            channel_axes = [ax for ax in group.axes if ax.role == "channel"]
            if channel_axes and per_channel == "error" and not _is_permutation_matrix(t):
                listed = ", ".join(sorted({ax.param for ax in channel_axes})[:4])
                raise ValueError(
                    f"group {name!r} has per-channel parameters ({listed}, ...) that a general linear map cannot "
                    "transform exactly; pass a permutation matrix, or per_channel='mix' to average them"
                )
            weights = np.abs(t)
            rows = weights.sum(axis=1, keepdims=True)
            mix = np.where(rows > 0, weights / np.where(rows > 0, rows, 1.0), np.eye(group.size))
            matrices = {"output": t, "input": t_inv.T, "channel": mix}
            for ax in group.axes:
                _transform_axis(_fetch_state(new, ax.param), ax, group.size, matrices[ax.role])
    return new


def _transform_axis(tensor: torch.Tensor, ax: Axis, size: int, matrix: np.ndarray) -> None:
    """In place: entries of ``ax``'s block become ``matrix @ block`` over the channel index."""
    start, stop = ax.span(size)
    moved = tensor.movedim(ax.axis, 0)
    block = moved[start:stop]
    rest = block.shape[1:]
    values = block.reshape(size, ax.repeat, -1).double()
    m = torch.from_numpy(matrix).to(device=tensor.device)
    result = torch.einsum("ij,jrk->irk", m, values).reshape(size * ax.repeat, *rest)
    block.copy_(result.to(tensor.dtype))
