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
        For an unknown group name or an array that is not a permutation of its size.
    """
    by_name = _group_lookup(groups, perms)
    new = copy.deepcopy(model)
    # One index per (parameter, axis): the groups touching it own disjoint blocks.
    index: dict[tuple[str, int], np.ndarray] = {}
    for name, perm in perms.items():
        group = by_name[name]
        p = _as_perm(perm, group.size, name)
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


def random_permutations(groups: Iterable[ChannelGroup], seed: int = 0) -> dict[str, np.ndarray]:
    """Draw one random permutation per group.

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
    return {g.name: rng.permutation(g.size) for g in groups}


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
