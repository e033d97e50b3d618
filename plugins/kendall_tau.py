"""Kendall's tau-b between the units of two models, computed for all units at once.

The kernel :func:`kendall_tau_b` is pure NumPy and vectorised across units: every step
(ranking, counting ties, counting discordant pairs) works on a ``(units, samples)``
array, so there is no Python loop over units. It gives the same value as
:func:`scipy.stats.kendalltau` (tau-b, ties included) for every column.

Tau-b ranks every sample of a unit against every other, so the samples it scores are
held in memory at once. Dask-backed recordings (a large or sharded activation store) are
never loaded whole: the subset D' is picked first and only its rows are read, in bounded
ranges; without a subset the units are scored a block at a time (see :class:`KendallTau`).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import numpy as np
import xarray as xr

from mergescope import activations
from mergescope.activations import check_metric_inputs, describe_scores, read_rows, score_coords
from mergescope.components import Context
from mergescope.errors import ContractError
from mergescope.hookspecs import hookimpl
from mergescope.validators import integer, list_of, non_negative_int

__all__ = ["kendall_tau_b", "KendallTau", "register_metrics"]

try:  # scipy's compiled merge-sort counter of discordant pairs (private, so optional)
    from scipy.stats._stats import _kendall_dis
except ImportError:  # pragma: no cover - other scipy layouts
    _kendall_dis = None

# From this many samples on, one compiled O(n log n) count per unit beats the
# vectorised O(n log^2 n) merge passes (measured in bench/bench_kendall.py).
_COMPILED_FROM = 1024

# Elements per chunk of units: keeps the handful of (units, samples) int64 work arrays
# at a few tens of MB each, so peak memory stays around a few hundred MB.
_CHUNK_ELEMENTS = 1 << 21

# Dask-backed inputs: most bytes of the (samples, units) block of both inputs scored at
# once when every sample is scored (each read is bounded by activations.READ_BYTES).
_BLOCK_BYTES = 256 * 2**20


def _rank_and_ties(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense ranks (1-based, int64) of each row and the number of tied pairs per row.

    Parameters
    ----------
    values
        ``(units, samples)``.

    Returns
    -------
    ranks
        ``(units, samples)``: equal values share a rank, ranks are consecutive.
    ties
        ``(units,)``: ``sum over groups of equal values of c * (c - 1) / 2``.
    """
    order = np.argsort(values, axis=1)
    ordered = np.take_along_axis(values, order, axis=1)
    new = _run_starts(ordered)
    sorted_ranks = np.cumsum(new, axis=1, dtype=np.int64)
    ranks = np.empty_like(sorted_ranks)
    np.put_along_axis(ranks, order, sorted_ranks, axis=1)
    return ranks, _tied_pairs(new)


def _run_starts(ordered: np.ndarray) -> np.ndarray:
    """Boolean mask of the first element of every run of equal values in sorted rows."""
    new = np.empty(ordered.shape, dtype=bool)
    new[:, :1] = True
    np.not_equal(ordered[:, 1:], ordered[:, :-1], out=new[:, 1:])
    return new


def _tied_pairs(new: np.ndarray) -> np.ndarray:
    """Tied pairs per row from the run-start mask of a sorted row.

    An element at position ``k`` inside its run is tied with the ``k`` elements before
    it in that run, so summing positions-within-run counts every tied pair once:
    a run of length ``c`` contributes ``0 + 1 + ... + (c - 1) = c (c - 1) / 2``.
    """
    n = new.shape[1]
    index = np.arange(n, dtype=np.int64)
    run_start = np.maximum.accumulate(np.where(new, index, 0), axis=1)
    return (index - run_start).sum(axis=1, dtype=np.int64)


def _count_inversions(ranks: np.ndarray) -> np.ndarray:
    """Strict inversions ``#{i < j : r[i] > r[j]}`` of every row, by bottom-up merge.

    Parameters
    ----------
    ranks
        ``(units, samples)`` integers in ``[1, samples]``.

    Returns
    -------
    ``(units,)`` int64.

    Notes
    -----
    Pass ``w`` merges adjacent sorted runs of width ``w`` (left) and ``w`` (right) into
    blocks of ``2 w``. A right element ``r`` forms an inversion with every left element
    greater than it, i.e. ``w - #{left <= r}``. Sorting a block puts ``r`` at position
    ``#{left <= r} + #{right before r}`` when equal values keep left before right, so
    the sum over right elements of ``#{left <= r}`` is the sum of their positions in
    the merged block minus a constant. That tie order is obtained with a plain value
    sort by appending an "is right" bit to each key, and each block is kept apart from
    the others by adding ``block * (samples + 1)``. One ``np.sort`` per pass both counts
    and merges, for every unit at once.
    """
    units, n = ranks.shape
    inversions = np.zeros(units, dtype=np.int64)
    if n < 2:
        return inversions
    # int32 keys sort about twice as fast; they fit while 2 * n * (n + 1) < 2**31.
    dtype = np.int32 if 2 * (n + 1) * n < np.iinfo(np.int32).max else np.int64
    values = ranks.astype(dtype)
    position = np.arange(n, dtype=np.int64)
    width = 1
    while width < n:
        block = position // (2 * width)
        in_block = position % (2 * width)
        is_right = in_block >= width
        offset = (block * (n + 1)).astype(dtype)
        keys = ((values + offset) << 1) | is_right.astype(dtype)
        keys.sort(axis=1)
        right_positions = ((keys & 1) * in_block).sum(axis=1, dtype=np.int64)
        # Sum over right elements of (index within the right run), same for every unit.
        right_index_sum = int((in_block[is_right] - width).sum())
        left_le = right_positions - right_index_sum
        # Every block that has right elements has a full left run of `width`.
        inversions += int(is_right.sum()) * width - left_le
        values = (keys >> 1) - offset
        width *= 2
    return inversions


def _discordant(joint: np.ndarray, n: int) -> np.ndarray:
    """Discordant pairs per row from keys ``x_rank * (n + 1) + y_rank`` sorted along rows."""
    y_in_x_order = joint % (n + 1)
    if _kendall_dis is None or n < _COMPILED_FROM:
        return _count_inversions(y_in_x_order)
    x_sorted = (joint // (n + 1)).astype(np.intp)
    y_in_x_order = y_in_x_order.astype(np.intp)
    return np.array([_kendall_dis(x_sorted[i], y_in_x_order[i]) for i in range(len(joint))], dtype=np.int64)


def _tau_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row pair of ``(units, samples)`` arrays (no chunking)."""
    units, n = x.shape
    tau = np.full(units, np.nan)
    if n < 2 or units == 0:
        return tau
    rx, xtie = _rank_and_ties(x)
    ry, ytie = _rank_and_ties(y)
    # Sorting the combined key orders each row by x then y; y ranks read off it.
    joint = np.sort(rx * (n + 1) + ry, axis=1)
    ntie = _tied_pairs(_run_starts(joint))
    discordant = _discordant(joint, n)
    total = n * (n - 1) // 2
    con_minus_dis = total - xtie - ytie + ntie - 2 * discordant
    valid = (xtie < total) & (ytie < total)  # a constant row has no defined tau
    with np.errstate(invalid="ignore", divide="ignore"):
        # Same expression and order of operations as scipy.stats.kendalltau.
        value = con_minus_dis / np.sqrt(total - xtie) / np.sqrt(total - ytie)
    tau[valid] = np.clip(value[valid], -1.0, 1.0)
    return tau


def _tau_rows_chunked(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """:func:`_tau_rows` over chunks of units, with NaN for rows that contain NaN."""
    units, n = x.shape
    out = np.full(units, np.nan)
    chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, units, chunk):
        stop = min(start + chunk, units)
        out[start:stop] = _tau_rows(x[start:stop], y[start:stop])
    # NaN has no rank; scipy's default (nan_policy="propagate") returns NaN too.
    for values in (x, y):
        if values.dtype.kind in "fc":
            out[np.isnan(values).any(axis=1)] = np.nan
    return out


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b between matching columns of ``x`` and ``y``.

    Parameters
    ----------
    x, y
        Arrays of shape ``(n_samples, n_units)``.

    Returns
    -------
    numpy.ndarray
        ``(n_units,)`` float64: tau-b of ``x[:, j]`` and ``y[:, j]``, equal to
        ``scipy.stats.kendalltau(x[:, j], y[:, j]).statistic``. NaN where a column is
        constant, contains NaN, or there are fewer than two samples.

    Notes
    -----
    Per unit the cost is ``O(n log^2 n)`` in vectorised NumPy: three sorts for ranks
    and ties, then ``ceil(log2 n)`` merge passes that count discordant pairs. With
    ``n0 = n (n - 1) / 2`` pairs, ``n1`` / ``n2`` pairs tied in x / y, ``n3`` pairs tied in
    both and ``d`` discordant pairs, ``tau_b = (n0 - n1 - n2 + n3 - 2 d) /
    sqrt((n0 - n1) (n0 - n2))``.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(
            f"kendall_tau_b needs two (n_samples, n_units) arrays of one shape, got {x.shape} and {y.shape}"
        )
    return _tau_rows_chunked(np.ascontiguousarray(x.T), np.ascontiguousarray(y.T))


def _gather(a: xr.DataArray, positions: np.ndarray, units: slice) -> np.ndarray:
    """Rows ``positions`` and columns ``units`` of a ``(sample, unit)`` array, at most ``READ_BYTES`` at a time."""
    count = len(range(*units.indices(a.shape[1])))
    return read_rows(a.data, positions, activations.READ_BYTES // max(1, count * a.dtype.itemsize), units)


def _tau_streamed(a: xr.DataArray, b: xr.DataArray, positions: np.ndarray) -> np.ndarray:
    """Tau-b of every unit over the samples ``positions``, reading ``a`` and ``b`` a block of units at a time."""
    a, b = a.transpose("sample", "unit"), b.transpose("sample", "unit")
    units = a.sizes["unit"]
    itemsize = max(a.dtype.itemsize, b.dtype.itemsize)
    block = max(1, _BLOCK_BYTES // max(1, 2 * len(positions) * itemsize))
    tau = np.full(units, np.nan)
    for start in range(0, units, block):
        columns = slice(start, min(start + block, units))
        x, y = _gather(a, positions, columns), _gather(b, positions, columns)
        tau[columns] = _tau_rows_chunked(np.ascontiguousarray(x.T), np.ascontiguousarray(y.T))
        del x, y
    return tau


def _tau_last_axis(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """apply_ufunc kernel: tau-b along the last axis (samples), any leading dims."""
    lead = x.shape[:-1]
    n = x.shape[-1]
    out = _tau_rows_chunked(np.ascontiguousarray(x.reshape(-1, n)), np.ascontiguousarray(y.reshape(-1, n)))
    return out.reshape(lead)


@attrs.define
class KendallTau:
    """Kendall's tau-b rank correlation of each unit of one model with the same unit of another.

    Compares units position by position (unit ``j`` of ``a`` with unit ``j`` of ``b``),
    so it measures how well two models' units already match, or how well an alignment
    matched them. Ties (e.g. the many zeros after a ReLU) are handled by tau-b.

    Memory. Tau-b needs every scored sample of a unit at once. With ``classes`` or
    ``per_class`` only the subset D' is read (its size, not the recording's, bounds the
    memory; from a dask-backed recording its rows are read range by range). Without
    them every sample is scored, and memory grows with the samples: from a dask-backed
    recording the units are scored a block at a time (about 256 MiB of both inputs, at
    least one unit, plus the ranking's int64 work arrays), each block one pass over the
    recording; in-memory inputs are scored as given.

    Parameters
    ----------
    classes
        Rank only the samples of these classes (by the ``label`` coord); empty: all.
    per_class
        Rank only this many samples per class, drawn with ``seed`` (the subset D' of
        the thesis); 0: every sample of the chosen classes.
    seed
        Seed of the per-class draw.
    """

    name: ClassVar[str] = "kendall-tau"
    paper: ClassVar[str] = "Kendall 1945, The treatment of ties in ranking problems (tau-b)"

    classes: list[int] = attrs.field(factory=list, validator=list_of(integer))
    per_class: int = attrs.field(default=0, validator=non_negative_int)
    seed: int = attrs.field(default=0, validator=integer)

    def subset(self, a: xr.DataArray) -> np.ndarray:
        """Positions along ``sample`` of the samples scored (the subset D').

        Raises
        ------
        mergescope.errors.ContractError
            When a subset is asked for but ``a`` has no ``label`` coord, or it is empty.
        """
        n = a.sizes["sample"]
        if not self.classes and not self.per_class:
            return np.arange(n)
        if "label" not in a.coords:
            raise ContractError("kendall-tau: 'classes' and 'per_class' need a 'label' coord on the samples")
        labels = np.asarray(a.coords["label"].values)
        wanted = np.asarray(self.classes) if self.classes else np.unique(labels)
        rng = np.random.default_rng(self.seed)
        keep = []
        for c in wanted:
            members = np.flatnonzero(labels == c)
            if self.per_class and len(members) > self.per_class:
                members = np.sort(rng.choice(members, self.per_class, replace=False))
            keep.append(members)
        positions = np.sort(np.concatenate(keep)) if keep else np.arange(0)
        if len(positions) < 2:
            raise ContractError(
                f"kendall-tau: the subset (classes {self.classes or 'all'}, per_class {self.per_class}) "
                f"holds {len(positions)} sample(s); at least 2 are needed"
            )
        return positions

    def score(self, a: xr.DataArray, b: xr.DataArray, context: Context | None = None) -> xr.DataArray:
        """Tau-b of every unit of ``b`` against the same unit of ``a``.

        Parameters
        ----------
        a
            Reference activations, dims ``("sample", "unit")``.
        b
            Activations of the other model over the same samples, same number of units.
        context
            The step's context; not needed (everything is in ``a`` and ``b``).

        Returns
        -------
        xarray.DataArray
            Named ``"kendall_tau"``, dims ``("unit",)`` with ``b``'s ``unit`` coord and
            scalar coords ``model`` (b's), ``reference`` (a's model) and ``layer``
            (b's) when the inputs carry them. NaN for units constant in ``a`` or ``b``.

        Raises
        ------
        mergescope.errors.ContractError
            (a ``ValueError``) when a dim is missing or extra, the samples differ,
            the unit counts differ, or there are fewer than two samples.
        """
        check_metric_inputs(a, b, "kendall-tau")
        positions = self.subset(a)
        if a.chunks is not None or b.chunks is not None:
            # Dask-backed: only the subset's rows are read, a bounded range at a time.
            tau = _tau_streamed(a, b, positions)
            return xr.DataArray(
                tau,
                dims=("unit",),
                coords=score_coords(a, b),
                name="kendall_tau",
                attrs={"long_name": "Kendall's tau-b"},
            )
        if len(positions) < a.sizes["sample"]:
            a, b = a.isel(sample=positions), b.isel(sample=positions)
        # Variables carry no indexes, so xarray cannot re-align the two models' unit
        # labels against each other; units are compared by position.
        tau = xr.apply_ufunc(
            _tau_last_axis,
            a.variable,
            b.variable,
            input_core_dims=[["sample"], ["sample"]],
            output_core_dims=[[]],
            dask="parallelized",
            output_dtypes=[float],
            dask_gufunc_kwargs={"allow_rechunk": True},
        )
        return xr.DataArray(
            tau,
            coords=score_coords(a, b),
            name="kendall_tau",
            attrs={"long_name": "Kendall's tau-b"},
        )

    def describe(self, result: xr.DataArray) -> str:
        """One line: mean and median tau over units and how many units are NaN."""
        return describe_scores(result, "tau", "constant activations")


@hookimpl
def register_metrics(register):
    """Register :class:`KendallTau`."""
    register(KendallTau)
