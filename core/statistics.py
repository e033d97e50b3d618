"""Streaming statistics of activations, reduced batch by batch during the forward pass.

Three accumulators keep what aligners, metrics and visualizers need without holding
every activation in memory:

- :class:`Moments`: per-unit count, mean and sum of squared deviations (``M2``);
- :class:`CoMoments`: the cross-covariance (and correlation) between two blocks of
  units seen over the same samples, or the covariance of one block with itself;
- :class:`TopK`: the ``k`` largest (or smallest) values of every unit and the ids of
  the samples where they occur.

All state is float64 NumPy. Every accumulator has ``update(...)`` for one batch,
``merge(other)`` returning a new accumulator that combines two (the pairwise formulas
of Chan, Golub & LeVeque, so accumulating shards separately and merging gives the
one-pass result up to rounding, ~1e-12), ``copy()``, and ``to_dataset()`` /
``from_dataset()`` for a labelled :class:`xarray.Dataset` that round-trips exactly
through netCDF.

Batches are arrays ``(sample, unit)``, as in the activation contract; an
:class:`xarray.DataArray` with dims ``("sample", "unit")`` (in either order) is
accepted as well. NaN or inf in a batch is an error, never silently absorbed.

The accumulators have no ``__eq__``: compare their arrays.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import numpy as np
import xarray as xr

from .errors import ContractError

__all__ = ["Moments", "CoMoments", "TopK"]

log = logging.getLogger(__name__)

_ID_MAX = np.iinfo(np.int64).max
_ID_LIMIT = 2**62  # ranks above this mark empty slots in TopK's tie cut


# --------------------------------------------------------------------------- helpers


def _positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an int >= 1, or raise ValueError naming ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {number}")
    return number


def _batch(values: Any, units: int, name: str = "values", sample_ids: np.ndarray | None = None) -> np.ndarray:
    """Check one batch ``(sample, unit)`` and return it as float64.

    Parameters
    ----------
    values
        Array-like ``(n, units)``, or a DataArray with dims ``sample`` and ``unit``.
    units
        Expected number of units.
    name
        How the batch is called in error messages.
    sample_ids
        When given, the first bad value is reported with its sample id too.

    Raises
    ------
    ValueError
        On a wrong shape or on NaN / inf, naming how many values are bad and where the
        first one is.
    """
    if isinstance(values, xr.DataArray):
        if set(values.dims) != {"sample", "unit"}:
            raise ValueError(f"{name}: a DataArray batch must have dims ('sample', 'unit'), got {values.dims}")
        values = values.transpose("sample", "unit").values
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a numeric array (sample, unit): {exc}") from None
    if array.ndim != 2 or array.shape[1] != units:
        raise ValueError(f"{name}: expected shape (n, {units}) (sample, unit), got {array.shape}")
    # Fast path: one reduction; the details are only worked out for the error message.
    if not np.isfinite(array).all():
        bad = ~np.isfinite(array)
        row, unit = (int(i) for i in np.argwhere(bad)[0])
        where = f"row {row}"
        if sample_ids is not None and row < len(sample_ids):
            where += f" (sample id {int(sample_ids[row])})"
        raise ValueError(
            f"{name}: {int(bad.sum())} non-finite value(s) (NaN or inf) in the batch; the first at {where}, unit {unit}"
        )
    return array


# A batch may be a torch tensor on the device that computed it (the activation store
# passes them on a GPU): its centring and products then run there, in float64, and only
# the per-unit results cross to the host. Devices without float64 (Apple's MPS) hand the
# batch to the host instead.
_HOST_ONLY_DEVICES = ("mps",)
_said_host: set[str] = set()


def _is_tensor(values: Any) -> bool:
    return type(values).__module__.startswith("torch") and hasattr(values, "device")


def _device_batch(values: Any, units: int, name: str) -> Any:
    """A torch batch checked and widened to float64 on its own device, or ``None`` for the host path."""
    device = values.device.type
    if device in _HOST_ONLY_DEVICES:
        if device not in _said_host:
            _said_host.add(device)
            log.info("statistics: %s has no float64; batches are accumulated on the host", device)
        return None
    if values.ndim != 2 or values.shape[1] != units:
        raise ValueError(f"{name}: expected shape (n, {units}) (sample, unit), got {tuple(values.shape)}")
    wide = values.detach().double()
    if not bool(wide.isfinite().all()):
        return None  # the host path names the first bad value
    return wide


def _device_centred(batch: Any) -> tuple[Any, Any]:
    """:func:`_centred` of a float64 torch batch, on its device."""
    shift = batch[0]
    shifted = batch - shift
    offset = shifted.mean(dim=0)
    shifted -= offset
    return shift + offset, shifted


def _host(values: Any) -> np.ndarray:
    return values.detach().cpu().numpy()


def _centred(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the batch mean and the centred batch.

    The batch is shifted by its first row before averaging: a unit that is constant
    in the batch then has a mean equal to that constant and deviations of exactly
    zero (a plain ``mean`` may be off by an ulp), and large offsets (values near 1e8
    with a small spread) lose no precision.
    """
    shift = array[0]
    shifted = array - shift
    offset = shifted.mean(axis=0)
    shifted -= offset
    return shift + offset, shifted


def _readonly(array: np.ndarray) -> np.ndarray:
    """A read-only view, so callers cannot corrupt the running state."""
    view = array.view()
    view.flags.writeable = False
    return view


def _require(ds: xr.Dataset, names: tuple[str, ...], kind: str) -> None:
    missing = [n for n in names if n not in ds.variables]
    if missing:
        raise ContractError(f"dataset does not hold a {kind}: missing variable(s) {', '.join(missing)}")


def _unit_coord(values: Any, size: int, dim: str) -> dict[str, Any]:
    """Coordinate mapping for ``dim`` (empty when ``values`` is None), length-checked."""
    if values is None:
        return {}
    coord = np.asarray(values)
    if coord.shape != (size,):
        raise ValueError(f"coordinate {dim!r} must have length {size}, got shape {coord.shape}")
    return {dim: coord}


# --------------------------------------------------------------------------- moments


class Moments:
    """Per-unit count, mean and variance, updated one batch at a time.

    Each batch's mean and ``M2`` (sum of squared deviations from the batch mean) are
    computed in float64 and combined with the running ones by the pairwise formula of
    Chan et al.; the numerically fragile sum of squares is never formed.

    Parameters
    ----------
    units
        Number of units (columns of every batch).

    Examples
    --------
    >>> m = Moments(3)
    >>> m.update(np.ones((4, 3)))
    >>> m.count, m.variance.tolist()
    (4, [0.0, 0.0, 0.0])
    """

    __slots__ = ("units", "_count", "_mean", "_m2")

    def __init__(self, units: int) -> None:
        self.units = _positive_int(units, "units")
        self._count = 0
        self._mean = np.zeros(self.units)
        self._m2 = np.zeros(self.units)

    def __repr__(self) -> str:
        return f"Moments(units={self.units}, count={self._count})"

    # -- accumulation

    def update(self, values: Any) -> None:
        """Add a batch ``(n, units)``; an empty batch is a no-op.

        A torch tensor is reduced on its own device in float64 (see :meth:`CoMoments.update`).

        Raises
        ------
        ValueError
            On a wrong shape or non-finite values.
        """
        if _is_tensor(values):
            batch = _device_batch(values, self.units, "values")
            if batch is None:
                values = _host(values)
            elif len(batch):
                mean, centred = _device_centred(batch)
                self._absorb(len(batch), _host(mean), _host((centred * centred).sum(dim=0)))
                return
        array = _batch(values, self.units)
        if len(array) == 0:
            return
        mean, centred = _centred(array)
        self._absorb(len(array), mean, np.einsum("ij,ij->j", centred, centred))

    def _absorb(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        """Combine the running state with another (n, mean, m2)."""
        if n == 0:
            return
        total = self._count + n
        delta = mean - self._mean
        # New arrays, not in-place updates, so a state taken from another accumulator is never shared.
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + m2 + delta * delta * (self._count * n / total)
        self._count = total

    def merge(self, other: Moments) -> Moments:
        """Return a new accumulator holding both ``self`` and ``other``.

        Raises
        ------
        ValueError
            When the two accumulate different numbers of units.
        """
        if not isinstance(other, Moments):
            raise TypeError(f"cannot merge Moments with {type(other).__name__}")
        if other.units != self.units:
            raise ValueError(f"cannot merge Moments over {self.units} units with Moments over {other.units} units")
        merged = self.copy()
        merged._absorb(other._count, other._mean, other._m2)
        return merged

    def copy(self) -> Moments:
        """An independent copy."""
        new = Moments(self.units)
        new._count, new._mean, new._m2 = self._count, self._mean.copy(), self._m2.copy()
        return new

    # -- results

    @property
    def count(self) -> int:
        """Number of samples seen."""
        return self._count

    @property
    def m2(self) -> np.ndarray:
        """Sum of squared deviations from the mean, ``(units,)``."""
        return _readonly(self._m2)

    @property
    def mean(self) -> np.ndarray:
        """Per-unit mean, ``(units,)``; NaN before any sample."""
        return self._mean.copy() if self._count else np.full(self.units, np.nan)

    @property
    def variance(self) -> np.ndarray:
        """Population variance (ddof=0), ``(units,)``; NaN before any sample."""
        return self._m2 / self._count if self._count else np.full(self.units, np.nan)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0), ``(units,)``."""
        return np.sqrt(self.variance)

    @property
    def sample_variance(self) -> np.ndarray:
        """Unbiased variance (ddof=1), ``(units,)``; NaN before two samples."""
        return self._m2 / (self._count - 1) if self._count > 1 else np.full(self.units, np.nan)

    # -- labelled form

    def to_dataset(self, unit: Any = None) -> xr.Dataset:
        """The state as a Dataset: ``count`` (scalar int64), ``mean`` and ``m2`` on dim ``unit``.

        Parameters
        ----------
        unit
            Optional coordinate values for ``unit`` (e.g. an activation's ``unit`` coord).
        """
        return xr.Dataset(
            {"count": np.int64(self._count), "mean": ("unit", self._mean.copy()), "m2": ("unit", self._m2.copy())},
            coords=_unit_coord(unit, self.units, "unit"),
        )

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> Moments:
        """Rebuild the accumulator written by :meth:`to_dataset`.

        Raises
        ------
        ContractError
            When a variable is missing or the shapes disagree.
        """
        _require(ds, ("count", "mean", "m2"), "Moments")
        mean, m2 = (np.asarray(ds[v].values, dtype=np.float64) for v in ("mean", "m2"))
        if mean.ndim != 1 or m2.shape != mean.shape:
            raise ContractError(f"Moments dataset: 'mean' {mean.shape} and 'm2' {m2.shape} must be equal 1-D shapes")
        new = cls(mean.size)
        new._count, new._mean, new._m2 = int(ds["count"].values), mean.copy(), m2.copy()
        return new


# -------------------------------------------------------------------------- co-moments


class CoMoments:
    """Streaming cross-covariance between two blocks of units over the same samples.

    Keeps the count, both means, both ``M2`` and the co-moment
    ``C[i, j] = sum_s (x[s, i] - mean_x[i]) (y[s, j] - mean_y[j])``. A batch's
    centred co-moment is one matrix product; it is merged with the running one by
    ``C = C_a + C_b + outer(delta_x, delta_y) * n_a n_b / n``.

    Convention for alignment: ``x`` is the model being aligned and ``y`` the reference,
    so :meth:`correlation_da` has dims ``("unit", "unit_ref")``, like the transforms of
    :class:`~mergescope.Alignment`.

    Parameters
    ----------
    units_x, units_y
        Number of units of each block.

    See Also
    --------
    CoMoments.within : the covariance of one block with itself.
    """

    __slots__ = ("units_x", "units_y", "is_within", "_count", "_mean_x", "_mean_y", "_m2_x", "_m2_y", "_c")

    def __init__(self, units_x: int, units_y: int) -> None:
        self.units_x = _positive_int(units_x, "units_x")
        self.units_y = _positive_int(units_y, "units_y")
        self.is_within = False
        self._count = 0
        self._mean_x, self._m2_x = np.zeros(self.units_x), np.zeros(self.units_x)
        self._mean_y, self._m2_y = np.zeros(self.units_y), np.zeros(self.units_y)
        self._c = np.zeros((self.units_x, self.units_y))

    @classmethod
    def within(cls, units: int) -> CoMoments:
        """An accumulator of the covariance of one block with itself.

        Its :meth:`update` takes one array; ``y`` is the same block as ``x``.
        """
        new = cls(units, units)
        new.is_within = True
        new._mean_y, new._m2_y = new._mean_x, new._m2_x
        return new

    def __repr__(self) -> str:
        if self.is_within:
            return f"CoMoments.within(units={self.units_x}, count={self._count})"
        return f"CoMoments(units_x={self.units_x}, units_y={self.units_y}, count={self._count})"

    # -- accumulation

    def update(self, x: Any, y: Any = None) -> None:
        """Add a batch: ``x`` ``(n, units_x)`` and ``y`` ``(n, units_y)`` for the same n samples.

        For an accumulator made by :meth:`within`, pass only ``x``. Torch tensors are
        centred and multiplied on their own device, in float64 (on the host where the
        device has no float64, as MPS); only the per-unit results cross to the host.

        Raises
        ------
        ValueError
            On wrong shapes, different sample counts, or non-finite values.
        """
        if _is_tensor(x) and self._update_on_device(x, y):
            return
        if _is_tensor(x):
            x, y = _host(x), (None if y is None else _host(y))
        xs = _batch(x, self.units_x, "x")
        if self.is_within:
            if y is not None:
                raise ValueError("a CoMoments.within accumulator takes one array per update, got x and y")
        else:
            if y is None:
                raise ValueError("CoMoments.update needs both x and y (use CoMoments.within for one block)")
            ys = _batch(y, self.units_y, "y")
            if len(xs) != len(ys):
                raise ValueError(f"x has {len(xs)} samples but y has {len(ys)}; they must be the same samples")
        if len(xs) == 0:
            return
        mean_x, cx = _centred(xs)
        m2_x = np.einsum("ij,ij->j", cx, cx)
        if self.is_within:
            self._absorb(len(xs), mean_x, mean_x, m2_x, m2_x, cx.T @ cx)
        else:
            mean_y, cy = _centred(ys)
            self._absorb(len(xs), mean_x, mean_y, m2_x, np.einsum("ij,ij->j", cy, cy), cx.T @ cy)

    def _update_on_device(self, x: Any, y: Any) -> bool:
        """:meth:`update` with the products on the tensors' device; False when the host must do it."""
        if (y is None) != self.is_within or (y is not None and not _is_tensor(y)):
            return False  # the host path explains the misuse
        xs = _device_batch(x, self.units_x, "x")
        ys = xs if y is None else _device_batch(y, self.units_y, "y")
        if xs is None or ys is None or len(xs) != len(ys):
            return False
        if len(xs) == 0:
            return True
        mean_x, cx = _device_centred(xs)
        mean_y, cy = (mean_x, cx) if y is None else _device_centred(ys)
        m2_x = _host((cx * cx).sum(dim=0))
        m2_y = m2_x if y is None else _host((cy * cy).sum(dim=0))
        self._absorb(len(xs), _host(mean_x), _host(mean_y), m2_x, m2_y, _host(cx.T @ cy))
        return True

    def _absorb(
        self, n: int, mean_x: np.ndarray, mean_y: np.ndarray, m2_x: np.ndarray, m2_y: np.ndarray, c: np.ndarray
    ) -> None:
        """Combine the running state with another (n, means, M2s, co-moment)."""
        if n == 0:
            return
        total = self._count + n
        weight = self._count * n / total
        dx = mean_x - self._mean_x
        self._c += c
        if self.is_within:
            self._c += np.outer(dx * weight, dx)
        else:
            dy = mean_y - self._mean_y
            self._c += np.outer(dx * weight, dy)
            self._mean_y = self._mean_y + dy * (n / total)
            self._m2_y = self._m2_y + m2_y + dy * dy * weight
        self._mean_x = self._mean_x + dx * (n / total)
        self._m2_x = self._m2_x + m2_x + dx * dx * weight
        if self.is_within:  # y is the same block; keep the aliases current
            self._mean_y, self._m2_y = self._mean_x, self._m2_x
        self._count = total

    def merge(self, other: CoMoments) -> CoMoments:
        """Return a new accumulator holding both ``self`` and ``other``.

        Raises
        ------
        ValueError
            When the block sizes differ, or one is a :meth:`within` accumulator and
            the other is not.
        """
        if not isinstance(other, CoMoments):
            raise TypeError(f"cannot merge CoMoments with {type(other).__name__}")
        if (other.units_x, other.units_y) != (self.units_x, self.units_y):
            raise ValueError(
                f"cannot merge CoMoments over {self.units_x} x {self.units_y} units "
                f"with CoMoments over {other.units_x} x {other.units_y} units"
            )
        if other.is_within != self.is_within:
            raise ValueError("cannot merge a CoMoments.within accumulator with a cross-block one")
        merged = self.copy()
        merged._absorb(other._count, other._mean_x, other._mean_y, other._m2_x, other._m2_y, other._c)
        return merged

    def copy(self) -> CoMoments:
        """An independent copy."""
        new = CoMoments.within(self.units_x) if self.is_within else CoMoments(self.units_x, self.units_y)
        new._count = self._count
        new._mean_x, new._m2_x, new._c = self._mean_x.copy(), self._m2_x.copy(), self._c.copy()
        if self.is_within:
            new._mean_y, new._m2_y = new._mean_x, new._m2_x
        else:
            new._mean_y, new._m2_y = self._mean_y.copy(), self._m2_y.copy()
        return new

    # -- results

    @property
    def count(self) -> int:
        """Number of samples seen."""
        return self._count

    @property
    def mean_x(self) -> np.ndarray:
        """Per-unit mean of ``x``, ``(units_x,)`` (zeros before any sample)."""
        return _readonly(self._mean_x)

    @property
    def mean_y(self) -> np.ndarray:
        """Per-unit mean of ``y``, ``(units_y,)`` (zeros before any sample)."""
        return _readonly(self._mean_y)

    @property
    def m2_x(self) -> np.ndarray:
        """Sum of squared deviations of ``x``, ``(units_x,)``."""
        return _readonly(self._m2_x)

    @property
    def m2_y(self) -> np.ndarray:
        """Sum of squared deviations of ``y``, ``(units_y,)``."""
        return _readonly(self._m2_y)

    @property
    def comoment(self) -> np.ndarray:
        """Co-moment ``(units_x, units_y)``: the sum of products of deviations."""
        return _readonly(self._c)

    @property
    def within_x(self) -> np.ndarray:
        """Population variance (ddof=0) of every ``x`` unit, ``(units_x,)``; NaN before any sample."""
        return self._m2_x / self._count if self._count else np.full(self.units_x, np.nan)

    @property
    def within_y(self) -> np.ndarray:
        """Population variance (ddof=0) of every ``y`` unit, ``(units_y,)``; NaN before any sample."""
        return self._m2_y / self._count if self._count else np.full(self.units_y, np.nan)

    @property
    def covariance(self) -> np.ndarray:
        """Population cross-covariance (ddof=0), ``(units_x, units_y)``; NaN before any sample."""
        return self._c / self._count if self._count else np.full((self.units_x, self.units_y), np.nan)

    @property
    def correlation(self) -> np.ndarray:
        """Pearson correlation, ``(units_x, units_y)``.

        A unit with zero variance (constant over every sample seen) has no defined
        correlation: its row (an ``x`` unit) or column (a ``y`` unit) is NaN. Values
        are clipped to [-1, 1] against rounding.
        """
        # Constant units have M2 exactly 0 (see _centred), so the test is exact.
        scale = np.outer(np.sqrt(self._m2_x), np.sqrt(self._m2_y))
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = np.where(scale > 0, self._c / scale, np.nan)
        return np.clip(corr, -1.0, 1.0, out=corr)

    # -- labelled form

    def _labelled(self, values: np.ndarray, unit: Any, unit_ref: Any, dims: tuple[str, str], name: str) -> xr.DataArray:
        if len(dims) != 2 or dims[0] == dims[1]:
            raise ValueError(f"dims must be two distinct names, got {dims!r}")
        coords = {
            dims[0]: np.arange(self.units_x),
            dims[1]: np.arange(self.units_y),
            **_unit_coord(unit, self.units_x, dims[0]),
            **_unit_coord(unit_ref, self.units_y, dims[1]),
        }
        return xr.DataArray(values, dims=dims, coords=coords, name=name)

    def correlation_da(
        self, unit: Any = None, unit_ref: Any = None, dims: tuple[str, str] = ("unit", "unit_ref")
    ) -> xr.DataArray:
        """Pearson correlation as a DataArray with dims ``("unit", "unit_ref")``.

        Rows are the units of ``x`` (the model being aligned), columns the units of
        ``y`` (the reference), the layout an aligner needs to match a model's units to
        the reference's.

        Parameters
        ----------
        unit
            Coordinate values of the ``x`` units; ``arange(units_x)`` when omitted.
        unit_ref
            Coordinate values of the ``y`` units; ``arange(units_y)`` when omitted.
        dims
            Dim names, for other uses (e.g. ``("unit", "unit_other")`` for a
            :meth:`within` matrix).
        """
        return self._labelled(self.correlation, unit, unit_ref, dims, "correlation")

    def covariance_da(
        self, unit: Any = None, unit_ref: Any = None, dims: tuple[str, str] = ("unit", "unit_ref")
    ) -> xr.DataArray:
        """Population covariance as a DataArray; same layout as :meth:`correlation_da`."""
        return self._labelled(self.covariance, unit, unit_ref, dims, "covariance")

    def to_dataset(self, unit: Any = None, unit_y: Any = None) -> xr.Dataset:
        """The state as a Dataset on dims ``unit`` (x) and ``unit_y`` (y).

        Variables: ``count`` (scalar int64), ``mean_x``, ``m2_x`` (unit), ``mean_y``,
        ``m2_y`` (unit_y), ``comoment`` (unit, unit_y) and ``within`` (scalar bool, set
        for a :meth:`within` accumulator).

        Parameters
        ----------
        unit, unit_y
            Optional coordinate values for the two dims.
        """
        return xr.Dataset(
            {
                "count": np.int64(self._count),
                "mean_x": ("unit", self._mean_x.copy()),
                "mean_y": ("unit_y", self._mean_y.copy()),
                "m2_x": ("unit", self._m2_x.copy()),
                "m2_y": ("unit_y", self._m2_y.copy()),
                "comoment": (("unit", "unit_y"), self._c.copy()),
                "within": np.bool_(self.is_within),
            },
            coords={**_unit_coord(unit, self.units_x, "unit"), **_unit_coord(unit_y, self.units_y, "unit_y")},
        )

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> CoMoments:
        """Rebuild the accumulator written by :meth:`to_dataset`.

        Raises
        ------
        ContractError
            When a variable is missing or the shapes disagree.
        """
        _require(ds, ("count", "mean_x", "mean_y", "m2_x", "m2_y", "comoment"), "CoMoments")
        names = ("mean_x", "mean_y", "m2_x", "m2_y", "comoment")
        arrays = {v: np.asarray(ds[v].values, dtype=np.float64) for v in names}
        px, py = arrays["mean_x"].size, arrays["mean_y"].size
        shapes_ok = (
            arrays["mean_x"].shape == arrays["m2_x"].shape == (px,)
            and arrays["mean_y"].shape == arrays["m2_y"].shape == (py,)
            and arrays["comoment"].shape == (px, py)
        )
        if not shapes_ok:
            raise ContractError(f"CoMoments dataset: inconsistent shapes { {k: a.shape for k, a in arrays.items()} }")
        within = bool(ds["within"].values) if "within" in ds.variables else False
        if within and px != py:
            raise ContractError(f"CoMoments dataset: 'within' is set but the blocks have {px} and {py} units")
        new = cls.within(px) if within else cls(px, py)
        new._count = int(ds["count"].values)
        new._mean_x, new._m2_x, new._c = arrays["mean_x"].copy(), arrays["m2_x"].copy(), arrays["comoment"].copy()
        if within:
            new._mean_y, new._m2_y = new._mean_x, new._m2_x
        else:
            new._mean_y, new._m2_y = arrays["mean_y"].copy(), arrays["m2_y"].copy()
        return new


# ------------------------------------------------------------------------------ top-k


class TopK:
    """The ``k`` largest (or smallest) values of every unit and the samples holding them.

    Order is total and deterministic: a better value first, and among equal values the
    smaller sample id first. The result is therefore the same whatever the batch order
    or sharding, provided every sample id is fed once.

    Parameters
    ----------
    units
        Number of units.
    k
        How many values to keep per unit (>= 1).
    largest
        Keep the largest values (default) or the smallest.

    Notes
    -----
    Internally values are kept as keys where larger is better (the values, or their
    negation when ``largest`` is False), ``(units, k)`` so each unit is contiguous; an
    empty slot holds key -inf and id -1. Sample ids must be non-negative integers below
    2**62, unique across everything fed (a repeated id is only caught within a batch).

    An update concatenates the kept keys with the batch's, ``(units, k + n)``, and finds
    every unit's k-th best key with one vectorised ``np.partition`` (a value partition;
    ``np.argpartition`` was several times slower here). Units with more candidates tied
    at that threshold than free slots are cut by sample id with a second partition, on
    those rows only. The k kept are then ordered by ``np.lexsort`` on (key desc, id asc).
    """

    __slots__ = ("units", "k", "largest", "_count", "_keys", "_ids")

    def __init__(self, units: int, k: int, largest: bool = True) -> None:
        self.units = _positive_int(units, "units")
        self.k = _positive_int(k, "k")
        self.largest = bool(largest)
        self._count = 0
        self._keys = np.full((self.units, self.k), -np.inf)
        self._ids = np.full((self.units, self.k), -1, dtype=np.int64)

    def __repr__(self) -> str:
        return f"TopK(units={self.units}, k={self.k}, largest={self.largest}, count={self._count})"

    # -- accumulation

    def update(self, values: Any, sample_ids: Any = None) -> None:
        """Add a batch ``(n, units)`` with the stable id of each of its n samples.

        Parameters
        ----------
        values
            Array ``(n, units)``, or a DataArray with dims ``("sample", "unit")``.
        sample_ids
            Integer ids ``(n,)``, unique and >= 0. Taken from the ``sample`` coord when
            ``values`` is a DataArray and this is omitted.

        Raises
        ------
        ValueError
            On wrong shapes, bad ids, or non-finite values.
        """
        if sample_ids is None:
            if not isinstance(values, xr.DataArray) or "sample" not in values.coords:
                raise ValueError("TopK.update needs sample_ids (or a DataArray with a 'sample' coord)")
            sample_ids = values.coords["sample"].values
        ids = self._check_ids(sample_ids)
        array = _batch(values, self.units, sample_ids=ids)
        if len(array) != len(ids):
            raise ValueError(f"values has {len(array)} samples but sample_ids has {len(ids)}")
        if len(array) == 0:
            return
        keys = array.T if self.largest else -array.T
        self._absorb(keys, np.broadcast_to(ids, keys.shape), len(ids))

    @staticmethod
    def _check_ids(sample_ids: Any) -> np.ndarray:
        ids = np.asarray(sample_ids)
        if ids.ndim != 1:
            raise ValueError(f"sample_ids must be 1-D, got shape {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"sample_ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64, copy=False)
        if ids.size and ids.min() < 0:
            raise ValueError(f"sample_ids must be >= 0 (-1 marks an empty slot), got {int(ids.min())}")
        ordered = np.sort(ids)
        if ids.size and ordered[-1] >= _ID_LIMIT:
            raise ValueError(f"sample_ids must be < 2**62, got {int(ordered[-1])}")
        if (ordered[1:] == ordered[:-1]).any():
            raise ValueError("sample_ids repeat within the batch; every sample must have its own id")
        return ids

    def _absorb(self, keys: np.ndarray, ids: np.ndarray, count: int) -> None:
        """Keep the best k of the current state and candidates ``keys``/``ids`` ``(units, m)``."""
        k = self.k
        cand_keys = np.concatenate([self._keys, keys], axis=1)
        cand_ids = np.concatenate([self._ids, ids], axis=1)
        total = cand_keys.shape[1]
        # Threshold: the k-th best key of every unit (a value partition, much cheaper than an index one).
        threshold = np.partition(cand_keys, total - k, axis=1)[:, total - k, None]
        keep = cand_keys >= threshold
        # Units with more candidates at or above the threshold than slots have ties at it
        # (or have seen fewer than k samples: threshold -inf). Cut those rows by a rank:
        # strictly better -1, tied real samples their id, tied empty slots distinct ranks
        # above every id, the rest int64 max. Ranks of the first k are then unique, so a
        # value partition of the ranks picks exactly k.
        tied = np.flatnonzero(keep.sum(axis=1) > k)
        if tied.size:
            sub_keys, sub_ids, sub_thr = cand_keys[tied], cand_ids[tied], threshold[tied]
            tie_rank = np.where(sub_ids >= 0, sub_ids, _ID_MAX - 1 - np.arange(total))
            rank = np.where(sub_keys == sub_thr, tie_rank, _ID_MAX)
            rank[sub_keys > sub_thr] = -1
            cut = np.partition(rank, k - 1, axis=1)[:, k - 1, None]
            keep[tied] = rank <= cut
        # Exactly k kept per unit now; nonzero walks rows in order, so this reshapes cleanly.
        columns = np.nonzero(keep)[1].reshape(self.units, k)
        best_keys = np.take_along_axis(cand_keys, columns, axis=1)
        best_ids = np.take_along_axis(cand_ids, columns, axis=1)
        # Stable order within the k: key descending, then id ascending.
        order = np.lexsort((best_ids, -best_keys), axis=1)
        self._keys = np.take_along_axis(best_keys, order, axis=1)
        self._ids = np.take_along_axis(best_ids, order, axis=1)
        self._count += count

    def merge(self, other: TopK) -> TopK:
        """Return a new accumulator holding the best of both ``self`` and ``other``.

        Raises
        ------
        ValueError
            When units, ``k`` or ``largest`` differ.
        """
        if not isinstance(other, TopK):
            raise TypeError(f"cannot merge TopK with {type(other).__name__}")
        mine, theirs = (self.units, self.k, self.largest), (other.units, other.k, other.largest)
        if mine != theirs:
            raise ValueError(f"cannot merge TopK accumulators with different (units, k, largest): {mine} and {theirs}")
        merged = self.copy()
        merged._absorb(other._keys, other._ids, other._count)
        return merged

    def copy(self) -> TopK:
        """An independent copy."""
        new = TopK(self.units, self.k, self.largest)
        new._count, new._keys, new._ids = self._count, self._keys.copy(), self._ids.copy()
        return new

    # -- results

    @property
    def count(self) -> int:
        """Number of samples seen."""
        return self._count

    @property
    def values(self) -> np.ndarray:
        """The best values ``(k, units)``, rank 0 = best; NaN in slots not yet filled."""
        values = self._keys.T if self.largest else -self._keys.T
        return np.where(self._ids.T >= 0, values, np.nan)

    @property
    def sample_ids(self) -> np.ndarray:
        """Sample ids of :attr:`values`, ``(k, units)``; -1 in slots not yet filled."""
        return self._ids.T.copy()

    # -- labelled form

    def to_dataset(self, unit: Any = None) -> xr.Dataset:
        """The state as a Dataset on dims ``rank`` and ``unit``.

        Variables: ``topk_value`` (rank, unit) float64 with NaN in empty slots,
        ``topk_sample`` (rank, unit) int64 with -1 in empty slots, and scalars ``k``
        (int64), ``largest`` (bool) and ``count`` (int64, samples seen).

        Parameters
        ----------
        unit
            Optional coordinate values for ``unit``.
        """
        return xr.Dataset(
            {
                "topk_value": (("rank", "unit"), self.values),
                "topk_sample": (("rank", "unit"), self.sample_ids),
                "k": np.int64(self.k),
                "largest": np.bool_(self.largest),
                "count": np.int64(self._count),
            },
            coords={"rank": np.arange(self.k), **_unit_coord(unit, self.units, "unit")},
        )

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> TopK:
        """Rebuild the accumulator written by :meth:`to_dataset`.

        Raises
        ------
        ContractError
            When a variable is missing or the shapes disagree.
        """
        _require(ds, ("topk_value", "topk_sample", "k", "largest"), "TopK")
        values = np.asarray(ds["topk_value"].transpose("rank", "unit").values, dtype=np.float64)
        ids = np.asarray(ds["topk_sample"].transpose("rank", "unit").values).astype(np.int64)
        k = int(ds["k"].values)
        if values.ndim != 2 or values.shape != ids.shape or values.shape[0] != k:
            raise ContractError(
                f"TopK dataset: 'topk_value' {values.shape} and 'topk_sample' {ids.shape} must both be (k={k}, unit)"
            )
        new = cls(values.shape[1], k, bool(ds["largest"].values))
        keys = values.T if new.largest else -values.T
        new._ids = np.ascontiguousarray(ids.T)
        new._keys = np.ascontiguousarray(np.where(new._ids >= 0, keys, -np.inf))
        new._count = int(ds["count"].values) if "count" in ds.variables else int((ids >= 0).sum(axis=0).max())
        return new
