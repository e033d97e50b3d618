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

from .fold import affine_free, is_centred_orthogonal, layernorm_paths
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
    does not commute with ``T``, which is the approximation CCA merging accepts. Two
    transformer groups are exact under more than permutations (Theus et al. 2025):

    - attention heads (``heads > 1``) under a whole-head permutation times an orthogonal
      map within each head (:func:`is_head_orthogonal`): ``q k^T`` and the value/output
      product keep their value; any other map is refused;
    - a stream normalised by LayerNorms without affine parameters (see
      :func:`~mergescope.groups.fold_layernorms`) under an orthogonal map that keeps the
      all-ones vector: their scale and shift are then one value for every channel, which
      the map leaves as it is. Other maps on a LayerNorm group are refused with
      ``per_channel="error"``, mixed as above with ``"mix"``.

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
    _check_head_orders(maps, groups)
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
            permutation = _is_permutation_matrix(t)
            if (group.heads > 1 or group.tied) and not permutation and not is_head_orthogonal(t, group.heads):
                # q k^T needs k's map to be the inverse transpose of q's: orthogonal blocks are their own.
                raise ValueError(
                    f"group {name!r} holds attention heads, which only whole-head permutations times orthogonal "
                    "maps within each head transform exactly; pass such a map"
                )
            norms = layernorm_paths(model, group)
            exact = permutation or (affine_free(model, norms) and is_centred_orthogonal(t))
            if norms and not exact and per_channel == "error":
                raise ValueError(
                    f"group {name!r} is normalised by LayerNorms ({', '.join(norms[:3])}, ...), which only "
                    "orthogonal maps keeping the all-ones vector commute with, and only without their affine "
                    "parameters: fold them first (fold_layernorms) and pass such a map"
                )
            exact_norms = {f"{path}.{p}" for path in norms for p in ("weight", "bias")} if norms else set()
            channel_axes = [ax for ax in group.axes if ax.role == "channel" and ax.param not in exact_norms]
            if channel_axes and per_channel == "error" and not permutation:
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


def is_head_orthogonal(t: np.ndarray, heads: int, atol: float = 1e-6) -> bool:
    """Whether ``t`` moves whole heads (one nonzero block per block row and column) by orthogonal blocks."""
    t = np.asarray(t, dtype=np.float64)
    size = t.shape[0]
    if heads < 1 or size % heads or t.shape != (size, size):
        return False
    d = size // heads
    blocks = t.reshape(heads, d, heads, d).transpose(0, 2, 1, 3)
    nonzero = np.abs(blocks).sum(axis=(2, 3)) > 0
    if not (np.all(nonzero.sum(axis=0) == 1) and np.all(nonzero.sum(axis=1) == 1)):
        return False
    eye = np.eye(d)
    return all(np.allclose(blocks[h, g] @ blocks[h, g].T, eye, atol=atol * d) for h, g in zip(*np.nonzero(nonzero)))


def head_order(t: np.ndarray, heads: int) -> np.ndarray:
    """``order[h]``: the head of the old channels that head ``h`` of ``T @ old`` is made from (largest block)."""
    t = np.asarray(t, dtype=np.float64)
    d = t.shape[0] // heads
    weight = np.abs(t).reshape(heads, d, heads, d).sum(axis=(1, 3))
    return weight.argmax(axis=1)


def _check_head_orders(maps: Mapping[str, tuple[np.ndarray, np.ndarray]], groups: Sequence[ChannelGroup]) -> None:
    """Tied attention groups must move their heads alike (a tied group left out keeps its heads in place)."""
    tied: dict[str, list[ChannelGroup]] = {}
    for g in groups:
        if g.tied:
            tied.setdefault(g.tied, []).append(g)
    for key, members in tied.items():
        mapped = [g for g in members if g.name in maps]
        if not mapped or not all(is_head_orthogonal(maps[g.name][0], g.heads) for g in mapped):
            continue  # nothing to compare, or a map apply_linear refuses for itself
        orders = {
            g.name: head_order(maps[g.name][0], g.heads) if g.name in maps else np.arange(g.heads) for g in members
        }
        first = next(iter(orders.values()))
        if any(not np.array_equal(o, first) for o in orders.values()):
            raise ValueError(
                f"the groups of attention layer {key!r} must move their heads alike; the maps move them as "
                + ", ".join(f"{name}: {o.tolist()}" for name, o in orders.items())
            )


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
