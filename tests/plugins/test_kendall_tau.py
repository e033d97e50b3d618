"""Tests of the kendall-tau metric: the vectorised kernel against scipy, and the labelled wrapper."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr
from scipy import stats

from mergescope.components import Metric
from mergescope_plugins import kendall_tau as kt
from mergescope_plugins.kendall_tau import KendallTau, kendall_tau_b


def scipy_tau(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input warnings
        return np.array([stats.kendalltau(x[:, j], y[:, j]).statistic for j in range(x.shape[1])])


def assert_matches_scipy(x: np.ndarray, y: np.ndarray) -> None:
    ours = kendall_tau_b(x, y)
    ref = scipy_tau(x, y)
    assert ours.shape == (x.shape[1],)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9, equal_nan=True)


def make_case(kind: str, n: int, units: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if kind == "tied-int":  # few distinct values: ties in x, in y and joint
        x = rng.integers(0, 3, size=(n, units))
        y = rng.integers(0, 4, size=(n, units))
    elif kind == "relu":  # many exact zeros, as after a ReLU
        x = np.maximum(rng.normal(size=(n, units)), 0.0).astype(np.float32)
        y = np.maximum(0.7 * x + rng.normal(size=(n, units)), 0.0).astype(np.float32)
    elif kind == "continuous":
        x = rng.normal(size=(n, units))
        y = x + rng.normal(size=(n, units))
    elif kind == "mixed":  # rounded floats against binary values
        x = rng.normal(size=(n, units)).round(1)
        y = rng.integers(0, 2, size=(n, units)).astype(float)
    else:
        raise AssertionError(kind)
    return x, y


@pytest.mark.parametrize("kind", ["tied-int", "relu", "continuous", "mixed"])
@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 17, 64, 100, 257])
def test_kernel_matches_scipy(kind: str, n: int) -> None:
    rng = np.random.default_rng(n * 31 + len(kind))
    for _ in range(4):
        x, y = make_case(kind, n, units=7, rng=rng)
        assert_matches_scipy(x, y)


def test_kernel_matches_scipy_on_many_random_shapes() -> None:
    rng = np.random.default_rng(0)
    kinds = ["tied-int", "relu", "continuous", "mixed"]
    for trial in range(300):
        n = int(rng.integers(2, 60))
        x, y = make_case(kinds[trial % 4], n, units=int(rng.integers(1, 5)), rng=rng)
        assert_matches_scipy(x, y)


def test_constant_columns_are_nan_like_scipy() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4))
    y = rng.normal(size=(30, 4))
    x[:, 1] = 3.0  # constant in x
    y[:, 2] = 0.0  # constant in y
    ours = kendall_tau_b(x, y)
    assert np.isnan(ours[1]) and np.isnan(ours[2])
    assert np.isfinite(ours[[0, 3]]).all()
    assert_matches_scipy(x, y)


def test_perfect_agreement_and_reversal() -> None:
    x = np.arange(11.0)[:, None].repeat(2, axis=1)
    y = np.stack([x[:, 0] ** 3, -x[:, 1]], axis=1)
    np.testing.assert_array_equal(kendall_tau_b(x, y), [1.0, -1.0])


def test_two_samples() -> None:
    x = np.array([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    y = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 2.0]])
    np.testing.assert_array_equal(np.isnan(kendall_tau_b(x, y)), [False, False, True])
    np.testing.assert_array_equal(kendall_tau_b(x, y)[:2], [1.0, -1.0])


def test_nan_values_give_nan_like_scipy() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 3))
    y = rng.normal(size=(20, 3))
    x[4, 0] = np.nan
    ours = kendall_tau_b(x, y)
    assert np.isnan(ours[0]) and np.isfinite(ours[1:]).all()
    np.testing.assert_allclose(ours[1:], scipy_tau(x, y)[1:], atol=1e-9)


def test_chunking_gives_identical_results(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    x, y = make_case("relu", 50, units=23, rng=rng)
    whole = kendall_tau_b(x, y)
    monkeypatch.setattr(kt, "_CHUNK_ELEMENTS", 120)  # two units per chunk
    np.testing.assert_array_equal(kendall_tau_b(x, y), whole)


def test_long_columns_use_int64_keys() -> None:
    # 2 n (n + 1) exceeds int32 here, so the merge passes switch to int64 keys.
    rng = np.random.default_rng(4)
    x = rng.integers(0, 500, size=(33_000, 1))
    y = x + rng.integers(0, 300, size=(33_000, 1))
    assert_matches_scipy(x, y)


def test_count_inversions_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    for n in (1, 2, 3, 6, 9, 16, 31):
        ranks = rng.integers(1, n + 1, size=(4, n))
        brute = [sum(int(r[i] > r[j]) for i in range(n) for j in range(i + 1, n)) for r in ranks]
        np.testing.assert_array_equal(kt._count_inversions(ranks), brute)


def test_kernel_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        kendall_tau_b(np.zeros((5, 2)), np.zeros((5, 3)))


# ------------------------------------------------------------------- labelled wrapper


def activation(values: np.ndarray, model: str, layer: str = "fc1", samples=None, units=None) -> xr.DataArray:
    n, k = values.shape
    samples = np.arange(100, 100 + n) if samples is None else np.asarray(samples)
    return xr.DataArray(
        values,
        dims=("sample", "unit"),
        coords={
            "sample": samples,
            "unit": np.arange(k) if units is None else units,
            "label": ("sample", np.arange(n) % 3),
            "model": model,
            "layer": layer,
        },
        name="activation",
    )


@pytest.fixture
def pair() -> tuple[xr.DataArray, xr.DataArray]:
    rng = np.random.default_rng(6)
    x, y = make_case("relu", 40, units=6, rng=rng)
    return activation(x, "mA"), activation(y, "mB", units=np.arange(10, 16))


def test_score_is_labelled(pair: tuple[xr.DataArray, xr.DataArray]) -> None:
    a, b = pair
    metric = KendallTau()
    assert isinstance(metric, Metric)
    result = metric.score(a, b)
    assert result.name == "kendall_tau"
    assert result.dims == ("unit",)
    np.testing.assert_array_equal(result["unit"].values, np.arange(10, 16))
    assert result["model"].item() == "mB"
    assert result["reference"].item() == "mA"
    assert result["layer"].item() == "fc1"
    assert "sample" not in result.coords and "label" not in result.coords
    np.testing.assert_allclose(result.values, scipy_tau(a.values, b.values), atol=1e-9)


def test_score_accepts_transposed_input(pair: tuple[xr.DataArray, xr.DataArray]) -> None:
    a, b = pair
    expected = KendallTau().score(a, b)
    xr.testing.assert_identical(KendallTau().score(a.transpose("unit", "sample"), b), expected)


def test_score_rejects_different_samples(pair: tuple[xr.DataArray, xr.DataArray]) -> None:
    a, b = pair
    ids = b["sample"].values.copy()
    ids[:3] += 1000
    shifted = b.assign_coords(sample=ids)
    with pytest.raises(ValueError, match="3 of 40 positions differ"):
        KendallTau().score(a, shifted)
    with pytest.raises(ValueError, match="different order"):
        KendallTau().score(a, b.isel(sample=slice(None, None, -1)))
    with pytest.raises(ValueError, match="40 samples but b has 39"):
        KendallTau().score(a, b.isel(sample=slice(1, None)))


def test_score_rejects_different_unit_counts(pair: tuple[xr.DataArray, xr.DataArray]) -> None:
    a, b = pair
    with pytest.raises(ValueError, match="6 units but b has 5"):
        KendallTau().score(a, b.isel(unit=slice(0, 5)))


def test_score_rejects_bad_dims(pair: tuple[xr.DataArray, xr.DataArray]) -> None:
    a, b = pair
    with pytest.raises(ValueError, match="missing the dim"):
        KendallTau().score(a.rename(unit="channel"), b)
    maps = b.expand_dims(y=2, x=2).transpose("sample", "unit", "y", "x")
    with pytest.raises(ValueError, match="channel summaries"):
        KendallTau().score(a, maps)


def test_score_needs_two_samples(pair: tuple[xr.DataArray, xr.DataArray]) -> None:
    a, b = pair
    with pytest.raises(ValueError, match="at least 2 samples"):
        KendallTau().score(a.isel(sample=[0]), b.isel(sample=[0]))


def test_describe_counts_nan_units(pair: tuple[xr.DataArray, xr.DataArray]) -> None:
    a, b = pair
    b = b.copy(data=b.values.copy())
    b.values[:, 0] = 0.0  # a dead unit
    result = KendallTau().score(a, b)
    text = KendallTau().describe(result)
    values = result.values[1:]
    assert text == f"mean tau {values.mean():.3f} (median {np.median(values):.3f}, 1 NaN unit)"


def test_registers_the_metric() -> None:
    registered: list[type] = []
    kt.register_metrics(registered.append)
    assert registered == [KendallTau]
    assert KendallTau.name == "kendall-tau"


def test_subset_scores_only_the_chosen_samples():
    from scipy.stats import kendalltau

    from mergescope import make_activation

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(60, 4)), rng.normal(size=(60, 4))
    labels = np.arange(60) % 3
    a = make_activation(x, sample_ids=np.arange(60), labels=labels, model="a", layer="l")
    b = make_activation(y, sample_ids=np.arange(60), labels=labels, model="b", layer="l")
    metric = KendallTau(classes=[0, 2], per_class=5, seed=1)
    chosen = metric.subset(a)
    assert len(chosen) == 10 and set(labels[chosen]) == {0, 2}
    assert np.array_equal(chosen, KendallTau(classes=[0, 2], per_class=5, seed=1).subset(a))
    tau = metric.score(a, b).values
    expected = [kendalltau(x[chosen, j], y[chosen, j]).statistic for j in range(4)]
    assert np.allclose(tau, expected, atol=1e-12)
    with pytest.raises(ValueError, match="holds 0 sample"):
        KendallTau(classes=[7]).score(a, b)


def test_long_columns_take_the_compiled_count_and_agree_with_scipy():
    rng = np.random.default_rng(5)
    n = kt._COMPILED_FROM + 300
    x = np.maximum(rng.normal(size=(n, 3)), 0).round(1)  # many ties
    y = np.maximum(0.5 * x + rng.normal(size=(n, 3)), 0).round(1)
    ours = kendall_tau_b(x, y)
    expected = [stats.kendalltau(x[:, j], y[:, j]).statistic for j in range(3)]
    assert np.allclose(ours, expected, atol=1e-12, rtol=0)
    assert np.array_equal(kt._count_inversions(np.array([[3, 1, 2, 2]])), [3])
