"""Tests of the correlation metric: agreement with numpy, streaming over chunks, constant units, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

from mergescope import make_activation
from mergescope.errors import ContractError
from mergescope.testing import check_component, example_activations
from mergescope_plugins.correlation import Correlation, PairedMoments


def numpy_corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant columns: NaN
        return np.array([np.corrcoef(x[:, j], y[:, j])[0, 1] for j in range(x.shape[1])])


def pair(x: np.ndarray, y: np.ndarray, ids=None) -> tuple[xr.DataArray, xr.DataArray]:
    ids = np.arange(len(x)) * 2 + 5 if ids is None else ids
    labels = np.zeros(len(x), dtype=np.int64)
    return (
        make_activation(x, sample_ids=ids, labels=labels, model="m1", layer="fc"),
        make_activation(y, sample_ids=ids, labels=labels, model="m2", layer="fc"),
    )


def test_conformance():
    check_component(Correlation)


@pytest.mark.parametrize("offset, scale", [(0.0, 1.0), (1e6, 1e-3), (-50.0, 1e4)])
def test_matches_numpy_corrcoef(offset, scale):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 9))
    y = 0.6 * x + rng.normal(size=(300, 9))
    y[:, 0] = -x[:, 0]  # exactly anti-correlated
    a, b = pair(offset + scale * x, y)
    result = Correlation().score(a, b)
    assert result.name == "correlation" and result.dims == ("unit",) and result.dtype == np.float64
    np.testing.assert_allclose(result.values, numpy_corr(offset + scale * x, y), rtol=0, atol=1e-12)
    assert result.values[0] == pytest.approx(-1.0, abs=1e-12)
    assert result["model"].item() == "m2" and result["reference"].item() == "m1" and result["layer"].item() == "fc"


def test_float32_inputs_are_accumulated_in_float64():
    a, b = example_activations(samples=200, units=5)
    expected = numpy_corr(a.values.astype(np.float64), b.values.astype(np.float64))
    np.testing.assert_allclose(Correlation().score(a, b).values, expected, rtol=0, atol=1e-12)


def test_dask_backed_inputs_stream_and_agree():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(250, 7)) + 3.0
    y = x**2 + rng.normal(size=(250, 7))
    a, b = pair(x, y)
    eager = Correlation().score(a, b)
    lazy = Correlation().score(a.chunk(sample=37), b.chunk(sample=100))
    np.testing.assert_allclose(lazy.values, numpy_corr(x, y), rtol=0, atol=1e-12)
    np.testing.assert_allclose(lazy.values, eager.values, rtol=0, atol=1e-12)


def test_small_in_memory_chunks_agree(monkeypatch):
    import functools

    from mergescope.activations import paired_chunks
    from mergescope_plugins import correlation

    # 20 // 4 units = 5 samples per chunk
    monkeypatch.setattr(correlation, "paired_chunks", functools.partial(paired_chunks, elements=20))
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(53, 4)), rng.normal(size=(53, 4))
    np.testing.assert_allclose(Correlation().score(*pair(x, y)).values, numpy_corr(x, y), rtol=0, atol=1e-12)


def test_paired_moments_in_uneven_batches_equal_one_batch():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(100, 3)) * 1e3 + 1e7, rng.normal(size=(100, 3))
    streamed, whole = PairedMoments(3), PairedMoments(3)
    for lo, hi in ((0, 1), (1, 40), (40, 40), (40, 100)):
        streamed.update(x[lo:hi], y[lo:hi])
    whole.update(x, y)
    assert streamed.count == whole.count == 100
    np.testing.assert_allclose(streamed.comoment, whole.comoment, rtol=1e-12)
    np.testing.assert_allclose(streamed.correlation, numpy_corr(x, y), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        streamed.update(x[:3], y[:2])


def test_constant_units_are_nan_and_named_in_a_warning():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    x[:, 1] = 2.5
    y[:, 3] = 0.0
    a, b = pair(x, y)
    b = b.assign_coords(unit=[10, 11, 12, 13])
    a, b = a.assign_coords(model="m1", layer="relu2"), b.assign_coords(model="m2@wm", layer="relu2")
    with pytest.warns(RuntimeWarning, match=r"unit\(s\) 11, 13 of 'm2@wm' \(against 'm1'\) at 'relu2' are constant"):
        result = Correlation().score(a, b)
    assert np.isnan(result.values[[1, 3]]).all()
    np.testing.assert_allclose(result.values[[0, 2]], numpy_corr(x, y)[[0, 2]], atol=1e-12)
    assert list(result["unit"].values) == [10, 11, 12, 13]
    assert "2 NaN units" in Correlation().describe(result)


def test_no_warning_without_constant_units():
    a, b = example_activations()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Correlation().score(a, b)


def test_spatial_positions_count_as_observations():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(20, 3, 4, 5))  # (sample, unit, y, x)
    y = x + rng.normal(size=x.shape)
    ids = np.arange(20)
    a = xr.DataArray(x, dims=("sample", "unit", "y", "x"), coords={"sample": ids, "unit": np.arange(3)})
    b = xr.DataArray(y, dims=("sample", "unit", "y", "x"), coords={"sample": ids, "unit": np.arange(3)})
    flat = lambda v: v.transpose(0, 2, 3, 1).reshape(-1, 3)  # noqa: E731
    expected = numpy_corr(flat(x), flat(y))
    np.testing.assert_allclose(Correlation().score(a, b).values, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(Correlation().score(a.chunk(sample=6), b).values, expected, rtol=0, atol=1e-12)
    # Dim order does not matter.
    np.testing.assert_allclose(
        Correlation().score(a.transpose("unit", "x", "sample", "y"), b).values, expected, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a, b: (a, b.assign_coords(sample=b["sample"].values + 1)), "different sample ids"),
        (lambda a, b: (a, b.isel(sample=slice(None, None, -1))), "different order"),
        (lambda a, b: (a, b.isel(sample=slice(0, 10))), "b has 10"),
        (lambda a, b: (a, b.isel(unit=[0, 1])), "b has 2;"),
        (lambda a, b: (a.isel(sample=[0]), b.isel(sample=[0])), "at least 2 samples"),
        (lambda a, b: (a.isel(unit=0), b.isel(unit=0)), "missing the dim"),
        (lambda a, b: (a.expand_dims(y=2, axis=2), b), "spatial dims"),
        (lambda a, b: (a.values, b), "must be an xarray.DataArray"),
    ],
)
def test_bad_input_raises_contract_errors(change, match):
    a, b = example_activations(samples=20, units=3)
    bad_a, bad_b = change(a, b)
    with pytest.raises(ContractError, match=match):
        Correlation().score(bad_a, bad_b)


def test_non_finite_values_are_an_error_naming_the_sample():
    a, b = example_activations(samples=20, units=3)
    values = a.values.copy()
    values[7, 2] = np.inf
    with pytest.raises(ContractError, match=r"a holds NaN or infinite values \(first at sample id 21, unit position 2"):
        Correlation().score(a.copy(data=values), b)
