"""Permuting channel groups, and checking that permuting leaves the function unchanged.

:func:`permute` re-indexes every axis of the permuted groups in a copy of the model;
:func:`check_equivalence` permutes every group at random, compares the outputs and
names the groups that break the model; :func:`permutation_matrix` and
:func:`perm_from_matrix` convert between index permutations and the labelled
``("unit", "unit_ref")`` matrices stored in a :class:`mergescope.Alignment`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from .model import ChannelGroup, EquivalenceError, _group_lookup
from .trace import _eval_mode, channel_groups
from .values import _fetch_state


def _as_perm(perm: np.ndarray | torch.Tensor, size: int, name: str) -> np.ndarray:
    """``perm`` as int64, checked to hold each of ``0..size-1`` once (``name``: the group, for errors)."""
    p = perm.detach().cpu().numpy() if isinstance(perm, torch.Tensor) else np.asarray(perm)
    if p.shape != (size,) or not np.array_equal(np.sort(p), np.arange(size)):
        raise ValueError(f"the permutation of group {name!r} must hold each of 0..{size - 1} once, got shape {p.shape}")
    return p.astype(np.int64)


def permute(
    model: nn.Module, perms: Mapping[str, np.ndarray | torch.Tensor], groups: Sequence[ChannelGroup]
) -> nn.Module:
    """Return a copy of ``model`` with the channels of some groups permuted.

    Parameters
    ----------
    model
        The network; it is not modified.
    perms
        For a group name, a permutation ``perm`` of its channels: the new channel ``i``
        is the old channel ``perm[i]``. Groups not listed keep their order.
    groups
        The model's groups, from :func:`channel_groups`.

    Returns
    -------
    torch.nn.Module
        A deep copy with every axis of every permuted group (weights, biases,
        BatchNorm running statistics, ...) re-indexed. It computes the same function.

    Raises
    ------
    ValueError
        For an unknown group name, an array that is not a permutation of its size, a
        permutation of a group of attention heads that breaks a head apart, or groups
        tied to one head order (``tied``) whose permutations order the heads differently.
    """
    by_name = _group_lookup(groups, perms)
    checked = {name: _as_perm(perm, by_name[name].size, name) for name, perm in perms.items()}
    _check_heads(checked, by_name)
    new = copy.deepcopy(model)
    # One index per (parameter, axis): the groups touching it own disjoint blocks.
    index: dict[tuple[str, int], np.ndarray] = {}
    for name, p in checked.items():
        group = by_name[name]
        for ax in group.axes:
            key = (ax.param, ax.axis)
            if key not in index:
                index[key] = np.arange(_fetch_state(new, ax.param).shape[ax.axis])
            start, stop = ax.span(group.size)
            index[key][start:stop] = ax.entries(p)
    with torch.no_grad():
        for (param, axis), idx in index.items():
            tensor = _fetch_state(new, param)
            tensor.copy_(tensor.index_select(axis, torch.from_numpy(idx).to(tensor.device)))
    return new


def head_permutation(head_perm: np.ndarray | Sequence[int], within: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """The permutation of a group of attention heads built from a head order and orders within heads.

    Parameters
    ----------
    head_perm
        ``(heads,)``: ``head_perm[h]`` is the head placed at head position ``h``.
    within
        ``(heads, d)``: ``within[h]`` orders the ``d`` channels of the head placed at
        position ``h`` (``within[h][i]`` is its channel placed at ``i``).

    Returns
    -------
    numpy.ndarray
        ``perm`` of ``heads * d`` channels with ``perm[h * d + i] = head_perm[h] * d + within[h][i]``,
        in the convention of :func:`permute`.
    """
    heads = np.asarray(head_perm, dtype=np.int64)
    inner = np.asarray(within, dtype=np.int64)
    if inner.ndim != 2 or inner.shape[0] != len(heads):
        raise ValueError(f"within must be (heads, d) with heads = {len(heads)}, got shape {inner.shape}")
    return (heads[:, None] * inner.shape[1] + inner).reshape(-1)


def head_structure(perm: np.ndarray | Sequence[int], heads: int) -> tuple[np.ndarray, np.ndarray]:
    """The head order and orders within heads of a permutation (inverse of :func:`head_permutation`).

    Raises
    ------
    ValueError
        When ``perm`` moves some head's channels to more than one head position, or its
        length is not a multiple of ``heads``.
    """
    p = np.asarray(perm, dtype=np.int64)
    if heads < 1 or len(p) % heads:
        raise ValueError(f"a permutation of {len(p)} channels cannot hold {heads} heads of equal size")
    d = len(p) // heads
    blocks = p.reshape(heads, d)
    source = blocks // d
    if not np.all(source == source[:, :1]):
        raise ValueError(f"the permutation mixes channels of different heads ({heads} heads of {d} channels)")
    return source[:, 0].copy(), blocks - source[:, :1] * d


def _check_heads(perms: Mapping[str, np.ndarray], by_name: Mapping[str, ChannelGroup]) -> None:
    """Refuse permutations of head groups that break heads apart, or tied groups that order heads differently."""
    orders: dict[str, tuple[str, np.ndarray]] = {}
    for name, perm in perms.items():
        group = by_name[name]
        if group.heads <= 1 and not group.tied:
            continue
        try:
            order, _ = head_structure(perm, group.heads)
        except ValueError as exc:
            raise ValueError(f"group {name!r}: {exc}") from None
        if group.tied:
            first = orders.setdefault(group.tied, (name, order))
            if not np.array_equal(first[1], order):
                raise ValueError(
                    f"groups {first[0]!r} and {name!r} share the head order of {group.tied!r} but order heads "
                    f"differently ({first[1].tolist()} and {order.tolist()})"
                )


def random_permutations(groups: Iterable[ChannelGroup], seed: int = 0) -> dict[str, np.ndarray]:
    """Draw one random permutation per group.

    Groups of attention heads get a random head order (one per ``tied`` key, shared by
    its groups) and a random order within each head (:func:`head_permutation`).

    Parameters
    ----------
    groups
        Channel groups.
    seed
        Seed of the NumPy generator; the same seed gives the same permutations.

    Returns
    -------
    dict[str, numpy.ndarray]
        ``{group name: permutation of range(size)}``.
    """
    rng = np.random.default_rng(seed)
    orders: dict[str, np.ndarray] = {}
    perms = {}
    for g in groups:
        if g.heads <= 1 and not g.tied:
            perms[g.name] = rng.permutation(g.size)
            continue
        order = orders.get(g.tied) if g.tied else None
        if order is None:
            order = rng.permutation(g.heads)
            if g.tied:
                orders[g.tied] = order
        within = np.stack([rng.permutation(g.head_size) for _ in range(g.heads)])
        perms[g.name] = head_permutation(order, within)
    return perms


def _output_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model's output: a tensor, or mappings, lists and tuples of them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _output_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _output_tensors(v)]
    return []


def _relative_difference(a: Any, b: Any) -> float:
    """The largest absolute difference between outputs ``a`` and ``b``, relative to ``a``'s largest entry."""
    ta, tb = _output_tensors(a), _output_tensors(b)
    scale = max((float(t.abs().max()) for t in ta if t.numel()), default=0.0)
    diff = max((float((x - y).abs().max()) for x, y in zip(ta, tb) if x.numel()), default=0.0)
    return diff / scale if scale > 0 else diff


def check_equivalence(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    *,
    groups: Sequence[ChannelGroup] | None = None,
    seed: int = 0,
    rtol: float = 1e-4,
) -> float:
    """Check that permuting every group leaves the model's function unchanged.

    Every group is permuted at random and both models are run on ``example_input`` in
    eval mode (the model's own training flags are restored afterwards).

    Parameters
    ----------
    model
        The network; it is not modified.
    example_input
        A batch the model accepts, or a tuple of positional inputs.
    groups
        The groups to permute; by default :func:`channel_groups` of the model.
    seed
        Seed of the random permutations.
    rtol
        Largest accepted difference, relative to the largest absolute output.

    Returns
    -------
    float
        ``max |permuted - original| / max |original|`` over the outputs.

    Raises
    ------
    EquivalenceError
        When the difference exceeds ``rtol``; the message names the groups whose
        permutation alone changes the output.
    """
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    groups = channel_groups(model, example_input) if groups is None else list(groups)
    perms = random_permutations(groups, seed)
    with _eval_mode(model), torch.no_grad():
        reference = model(*inputs)
        permuted = permute(model, perms, groups).eval()
        err = _relative_difference(reference, permuted(*inputs))
        if err <= rtol:
            return err
        culprits = []
        for g in groups:  # find the groups that break the model on their own
            alone = permute(model, {g.name: perms[g.name]}, groups).eval()
            if _relative_difference(reference, alone(*inputs)) > rtol:
                culprits.append(g.name)
    names = culprits or [g.name for g in groups]
    which = "groups whose permutation alone changes it" if culprits else "no single group does it alone; groups"
    raise EquivalenceError(
        f"the permuted {type(model).__name__} differs from the original by {err:.3g} (relative, rtol {rtol:g}); "
        f"{which}: {', '.join(repr(n) for n in names)}",
        groups=names,
    )


def permutation_matrix(perm: np.ndarray | torch.Tensor | Sequence[int], unit_coords: Any = None) -> xr.DataArray:
    """A permutation as a labelled 0/1 matrix, as stored in an :class:`~mergescope.Alignment`.

    Parameters
    ----------
    perm
        ``perm[j]`` is the model's unit that goes to position ``j`` (the reference's unit
        ``j``), as in :func:`permute`.
    unit_coords
        Coordinate values of the units (both dims); ``range(len(perm))`` by default.

    Returns
    -------
    xarray.DataArray
        Dims ``("unit", "unit_ref")`` with ``P[perm[j], j] = 1`` and zeros elsewhere.
    """
    p = np.asarray(perm.detach().cpu().numpy() if isinstance(perm, torch.Tensor) else perm, dtype=np.int64)
    n = len(p)
    _as_perm(p, n, "perm")
    matrix = np.zeros((n, n))
    matrix[p, np.arange(n)] = 1.0
    coords = np.arange(n) if unit_coords is None else np.asarray(unit_coords)
    return xr.DataArray(matrix, dims=("unit", "unit_ref"), coords={"unit": coords, "unit_ref": coords})


def perm_from_matrix(matrix: xr.DataArray | np.ndarray, atol: float = 1e-6) -> np.ndarray:
    """The permutation held by a permutation matrix (inverse of :func:`permutation_matrix`).

    Parameters
    ----------
    matrix
        A DataArray with dims ``("unit", "unit_ref")`` (in any order) or a plain array
        indexed ``[unit, unit_ref]``.
    atol
        Tolerance on the 0 and 1 entries.

    Returns
    -------
    numpy.ndarray
        ``perm`` with ``perm[j]`` the unit (position, not coordinate) going to position ``j``.

    Raises
    ------
    ValueError
        When the matrix is not a permutation matrix.
    """
    values = matrix.transpose("unit", "unit_ref").values if isinstance(matrix, xr.DataArray) else np.asarray(matrix)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"a permutation matrix must be square, got shape {values.shape}")
    perm = values.argmax(axis=0)
    expected = np.zeros_like(values, dtype=float)
    expected[perm, np.arange(len(perm))] = 1.0
    if not np.allclose(values, expected, atol=atol) or len(set(perm.tolist())) != len(perm):
        raise ValueError("the matrix is not a permutation matrix (one 1 per row and column, zeros elsewhere)")
    return perm.astype(np.int64)
