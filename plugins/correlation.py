"""Pearson correlation of each unit of one model with the same unit of another.

This is the matched correlation of permutation alignment read off per unit: after
model 2 is permuted onto model 1, unit ``j`` of both should respond alike, and
``corr(a[:, j], b[:, j])`` says how much. The statistics are accumulated chunk by
chunk over the samples in float64 (the pairwise update of Chan et al., the same one
:class:`mergescope.statistics.Moments` uses), so dask-backed recordings are read once
and never loaded whole, and the result agrees with :func:`numpy.corrcoef` to ~1e-12.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import attrs
import numpy as np
import xarray as xr

from mergescope.activations import check_metric_inputs, describe_scores, paired_chunks, score_coords, units_label
from mergescope.components import Context
from mergescope.errors import ContractError
from mergescope.hookspecs import hookimpl
from mergescope.statistics import Moments

__all__ = ["PairedMoments", "Correlation", "register_metrics"]


def _batch_mean(values: np.ndarray) -> np.ndarray:
    """Column means, shifted by the first row so a constant column gets exactly its value."""
    shift = values[0]
    return shift + (values - shift).mean(axis=0)


class PairedMoments:
    """Streaming per-unit correlation of matching columns of two arrays.

    Keeps a :class:`~mergescope.statistics.Moments` for each side and the co-moment of
    matching columns only, ``c[j] = sum_s (x[s, j] - mean_x[j]) (y[s, j] - mean_y[j])``:
    ``O(units)`` state and work per sample, where a full cross-covariance would cost
    ``O(units^2)``.

    Parameters
    ----------
    units
        Number of columns of every batch.
    """

    def __init__(self, units: int) -> None:
        self.x = Moments(units)
        self.y = Moments(units)
        self.units = self.x.units
        self._c = np.zeros(self.units)

    def update(self, x: Any, y: Any) -> None:
        """Add the batches ``x`` and ``y``, ``(n, units)`` each, over the same n samples.

        Raises
        ------
        ValueError
            On wrong shapes, different sample counts or non-finite values.
        """
        xs = np.asarray(x, dtype=np.float64)
        ys = np.asarray(y, dtype=np.float64)
        if xs.shape != ys.shape:
            raise ValueError(f"x {xs.shape} and y {ys.shape} must have one shape (n, {self.units})")
        n, seen = len(xs), self.x.count
        if n == 0:
            return
        old_x = self.x.mean if seen else np.zeros(self.units)
        old_y = self.y.mean if seen else np.zeros(self.units)
        self.x.update(xs)  # validates shape and finiteness
        self.y.update(ys)
        mean_x, mean_y = _batch_mean(xs), _batch_mean(ys)
        c = np.einsum("ij,ij->j", xs - mean_x, ys - mean_y)
        # Chan et al.: C = C_a + C_b + dx * dy * n_a n_b / (n_a + n_b).
        self._c = self._c + c + (mean_x - old_x) * (mean_y - old_y) * (seen * n / (seen + n))

    @property
    def count(self) -> int:
        """Number of samples seen."""
        return self.x.count

    @property
    def comoment(self) -> np.ndarray:
        """Co-moment of matching columns, ``(units,)``."""
        return self._c.copy()

    @property
    def correlation(self) -> np.ndarray:
        """Pearson correlation of matching columns, ``(units,)``, clipped to [-1, 1].

        NaN where either column is constant (zero ``M2``: exactly zero for a constant
        column, see :class:`~mergescope.statistics.Moments`) or before two samples.
        """
        scale = np.sqrt(self.x.m2) * np.sqrt(self.y.m2)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(scale > 0, self._c / np.where(scale > 0, scale, 1.0), np.nan)
        return np.clip(r, -1.0, 1.0)


# ------------------------------------------------------------------------ validation


def _first_bad(values: np.ndarray, ids: np.ndarray, observations: int) -> str:
    row, unit = (int(i) for i in np.argwhere(~np.isfinite(values))[0])
    return f"sample id {int(ids[row // observations])}, unit position {unit}"


@attrs.define
class Correlation:
    """Pearson correlation of each unit of one model with the same unit of another over the samples.

    Unit ``j`` of ``a`` is compared with unit ``j`` of ``b`` (by position), so it measures
    how well two models' units already match, or how well an alignment matched them
    (the matched correlation of permutation alignment). With full feature maps (dims
    ``("sample", "unit", "y", "x")``) every position of every sample is one observation,
    as in activation matching. Computed in float64, streaming over sample chunks.
    A unit constant in ``a`` or ``b`` has no correlation: NaN, with a warning naming it.
    """

    name: ClassVar[str] = "correlation"
    paper: ClassVar[str] = (
        "Zou 2025, Model Merging and Feature Visualization in Deep Neural Networks (sec. 3.1.4); "
        "Li et al. 2015, Convergent Learning"
    )

    def score(self, a: xr.DataArray, b: xr.DataArray, context: Context | None = None) -> xr.DataArray:
        """Correlation of every unit of ``b`` with the same unit of ``a``.

        Parameters
        ----------
        a
            Reference activations, dims ``("sample", "unit")`` or with spatial dims too;
            may be dask-backed.
        b
            Activations of the other model over the same samples, same units and spatial dims.
        context
            The step's context; not needed (everything is in ``a`` and ``b``).

        Returns
        -------
        xarray.DataArray
            Named ``"correlation"``, float64, dims ``("unit",)`` with ``b``'s ``unit``
            coords and scalar coords ``model`` (b's), ``reference`` (a's model) and
            ``layer`` (b's) when the inputs carry them.

        Raises
        ------
        mergescope.errors.ContractError
            (a ``ValueError``) when a dim is missing, the samples, unit counts or spatial
            dims differ, there are fewer than two samples, or a value is NaN or infinite.
        """
        check_metric_inputs(a, b, "correlation", spatial=True)
        units = a.sizes["unit"]
        moments = PairedMoments(units)
        # With spatial dims every position of every sample is one observation.
        observations = int(np.prod([a.sizes[d] for d in a.dims if d not in ("sample", "unit")], dtype=np.int64))
        for ids, x, y in paired_chunks(a, b):
            x, y = x.reshape(-1, units), y.reshape(-1, units)
            for which, values in (("a", x), ("b", y)):
                if not np.isfinite(values).all():
                    where = _first_bad(values, ids, observations)
                    raise ContractError(f"correlation: {which} holds NaN or infinite values (first at {where})")
            moments.update(x, y)
        r = moments.correlation
        constant = (moments.x.m2 == 0) | (moments.y.m2 == 0)
        if constant.any():
            warnings.warn(
                f"correlation: {units_label(a, b, constant)} are constant over the samples in a or b; "
                "their correlation is NaN",
                RuntimeWarning,
                stacklevel=2,
            )
        return xr.DataArray(r, dims=("unit",), coords=score_coords(a, b), name="correlation")

    def describe(self, result: xr.DataArray) -> str:
        """One line: mean and median correlation over units and how many units are NaN."""
        return describe_scores(result, "r", "constant activations")


@hookimpl
def register_metrics(register):
    """Register :class:`Correlation`."""
    register(Correlation)
