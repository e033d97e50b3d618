from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import xarray as xr

from mergescope.activations import make_activation
from mergescope.errors import ContractError
from mergescope.statistics import CoMoments, Moments, TopK

# --------------------------------------------------------------------------- helpers


def batches(rng: np.random.Generator, n: int, max_size: int = 40) -> Iterator[slice]:
    """Consecutive slices of random sizes covering ``range(n)``, often of size 1."""
    start = 0
    while start < n:
        size = 1 if rng.random() < 0.3 else int(rng.integers(1, max_size + 1))
        yield slice(start, min(start + size, n))
        start += size


def feed(update: Callable[[slice], None], rng: np.random.Generator, n: int, max_size: int = 40) -> None:
    for part in batches(rng, n, max_size):
        update(part)


def brute_topk(values: np.ndarray, ids: np.ndarray, k: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Full sort per unit: better value first, then smaller id; padded with NaN / -1."""
    n, units = values.shape
    out_v = np.full((k, units), np.nan)
    out_i = np.full((k, units), -1, dtype=np.int64)
    for u in range(units):
        primary = -values[:, u] if largest else values[:, u]
        order = np.lexsort((ids, primary))[:k]
        out_v[: len(order), u] = values[order, u]
        out_i[: len(order), u] = ids[order]
    return out_v, out_i


def assert_same_topk(a: TopK, b: TopK) -> None:
    np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
    assert np.array_equal(a.values, b.values, equal_nan=True)


def close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-10) -> None:
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


# --------------------------------------------------------------------------- moments


@pytest.mark.parametrize("seed", range(4))
def test_moments_match_numpy(seed):
    rng = np.random.default_rng(seed)
    n, units = int(rng.integers(2, 300)), int(rng.integers(1, 9))
    data = (rng.normal(size=(n, units)) * rng.uniform(0.1, 10, units) + rng.normal(0, 5, units)).astype(np.float32)
    m = Moments(units)
    feed(lambda s: m.update(data[s]), rng, n)
    ref = data.astype(np.float64)
    assert m.count == n
    close(m.mean, ref.mean(axis=0))
    close(m.variance, ref.var(axis=0))
    close(m.std, ref.std(axis=0))
    close(m.sample_variance, ref.var(axis=0, ddof=1))


def test_moments_batches_of_one_and_empty():
    rng = np.random.default_rng(7)
    data = rng.normal(size=(50, 4))
    m = Moments(4)
    assert np.isnan(m.mean).all() and np.isnan(m.variance).all()
    m.update(np.empty((0, 4)))
    for row in data:
        m.update(row[None, :])
    assert m.count == 50
    close(m.mean, data.mean(axis=0))
    close(m.variance, data.var(axis=0))
    one = Moments(4)
    one.update(data[:1])
    assert np.isnan(one.sample_variance).all() and (one.variance == 0).all()
    assert not m.m2.flags.writeable


def test_moments_numerically_hard_data():
    # Values near 1e8 with unit spread: E[x^2] - E[x]^2 cancels catastrophically in float64.
    rng = np.random.default_rng(3)
    data = 1e8 + rng.normal(size=(5000, 6)) * rng.uniform(0.5, 2.0, 6)
    naive = (data**2).mean(axis=0) - data.mean(axis=0) ** 2
    expected = data.var(axis=0)
    assert np.abs(naive / expected - 1).max() > 1e-3  # the naive formula does fail here
    m = Moments(6)
    feed(lambda s: m.update(data[s]), rng, len(data), max_size=200)
    np.testing.assert_allclose(m.variance, expected, rtol=1e-6)
    w = CoMoments.within(6)
    feed(lambda s: w.update(data[s]), rng, len(data), max_size=200)
    np.testing.assert_allclose(np.diag(w.covariance), expected, rtol=1e-6)
    np.testing.assert_allclose(w.covariance, np.cov(data.T, bias=True), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ co-moments


def correlated(rng: np.random.Generator, n: int, px: int, py: int) -> tuple[np.ndarray, np.ndarray]:
    base = rng.normal(size=(n, 3))
    x = base @ rng.normal(size=(3, px)) + rng.normal(size=(n, px)) + rng.normal(0, 3, px)
    y = base @ rng.normal(size=(3, py)) + 0.5 * rng.normal(size=(n, py)) - 2.0
    return x, y


@pytest.mark.parametrize("seed", range(4))
def test_comoments_match_numpy(seed):
    rng = np.random.default_rng(100 + seed)
    n, px, py = int(rng.integers(3, 300)), int(rng.integers(1, 7)), int(rng.integers(1, 7))
    x, y = correlated(rng, n, px, py)
    c = CoMoments(px, py)
    feed(lambda s: c.update(x[s], y[s]), rng, n)
    assert c.count == n
    close(c.covariance, np.cov(x.T, y.T, bias=True)[:px, px:])
    close(c.correlation, np.corrcoef(x.T, y.T)[:px, px:])
    close(c.within_x, x.var(axis=0))
    close(c.within_y, y.var(axis=0))
    close(np.asarray(c.mean_x), x.mean(axis=0))
    close(np.asarray(c.mean_y), y.mean(axis=0))


def test_within_matches_numpy_cov():
    rng = np.random.default_rng(11)
    x, _ = correlated(rng, 200, 5, 1)
    w = CoMoments.within(5)
    feed(lambda s: w.update(x[s]), rng, len(x))
    close(w.covariance, np.cov(x.T, bias=True))
    close(w.correlation, np.corrcoef(x.T))
    np.testing.assert_array_equal(w.mean_x, w.mean_y)
    np.testing.assert_array_equal(w.within_x, w.within_y)


def test_correlation_with_constant_units_is_nan_not_inf():
    rng = np.random.default_rng(5)
    x, y = correlated(rng, 120, 4, 3)
    x[:, 2] = 0.1  # not exactly representable: a plain batch mean could be off by an ulp
    y[:, 0] = -7.3
    c = CoMoments(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feed(lambda s: c.update(x[s], y[s]), rng, len(x))
        corr = c.correlation
    assert c.within_x[2] == 0 and c.within_y[0] == 0
    assert np.isnan(corr[2]).all() and np.isnan(corr[:, 0]).all()
    finite = np.ix_([0, 1, 3], [1, 2])
    assert np.isfinite(corr[finite]).all()
    close(corr[finite], np.corrcoef(x.T, y.T)[:4, 4:][finite])
    assert np.isnan(CoMoments(2, 2).correlation).all()  # nothing seen yet


def test_correlation_da_layout():
    rng = np.random.default_rng(6)
    x, y = correlated(rng, 60, 3, 4)
    c = CoMoments(3, 4)
    c.update(x, y)
    da = c.correlation_da(unit=[10, 11, 12])
    assert da.dims == ("unit", "unit_ref") and da.shape == (3, 4)
    assert list(da["unit"].values) == [10, 11, 12] and list(da["unit_ref"].values) == [0, 1, 2, 3]
    np.testing.assert_array_equal(da.values, c.correlation)
    assert c.covariance_da().dims == ("unit", "unit_ref")
    with pytest.raises(ValueError, match="length 3"):
        c.correlation_da(unit=[1, 2])


def test_dataarray_batches():
    rng = np.random.default_rng(9)
    values = rng.normal(size=(20, 3)).astype(np.float32)
    ids = rng.permutation(1000)[:20]
    da = make_activation(values, sample_ids=ids, labels=np.zeros(20), model="m", layer="l")
    m, t = Moments(3), TopK(3, 2)
    m.update(da.transpose("unit", "sample"))
    t.update(da)
    close(m.mean, values.astype(np.float64).mean(axis=0))
    ref_v, ref_i = brute_topk(values.astype(np.float64), ids, 2, True)
    np.testing.assert_array_equal(t.sample_ids, ref_i)
    np.testing.assert_array_equal(t.values, ref_v)


# --------------------------------------------------------------------------- sharding


def shard_bounds(rng: np.random.Generator, n: int, shards: int) -> list[slice]:
    cuts = np.sort(rng.choice(np.arange(1, n), size=shards - 1, replace=False))
    edges = [0, *cuts.tolist(), n]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


@pytest.mark.parametrize("shards", [2, 3])
def test_shards_merge_to_single_pass(shards):
    rng = np.random.default_rng(20 + shards)
    n, px, py = 400, 5, 4
    x, y = correlated(rng, n, px, py)
    x[:, 1] = np.round(x[:, 1])  # ties for TopK
    ids = rng.permutation(10 * n)[:n]

    def accumulate(part: slice) -> tuple[Moments, CoMoments, CoMoments, TopK, TopK]:
        accs = Moments(px), CoMoments(px, py), CoMoments.within(px), TopK(px, 7), TopK(px, 7, largest=False)
        xs, ys, ids_part = x[part], y[part], ids[part]

        def update(s: slice) -> None:
            accs[0].update(xs[s])
            accs[1].update(xs[s], ys[s])
            accs[2].update(xs[s])
            accs[3].update(xs[s], ids_part[s])
            accs[4].update(xs[s], ids_part[s])

        feed(update, rng, len(xs))
        return accs

    single = accumulate(slice(0, n))
    parts = [accumulate(s) for s in shard_bounds(rng, n, shards)]
    for order in itertools.permutations(range(shards)):
        merged = list(parts[order[0]])
        for i in order[1:]:
            merged = [a.merge(b) for a, b in zip(merged, parts[i])]
        m, c, w, top, bottom = merged
        assert m.count == c.count == w.count == top.count == n
        for got, want in [
            (m.mean, single[0].mean),
            (m.variance, single[0].variance),
            (c.covariance, single[1].covariance),
            (c.correlation, single[1].correlation),
            (c.within_y, single[1].within_y),
            (w.covariance, single[2].covariance),
        ]:
            assert np.abs(got - want).max() <= 1e-12
        assert_same_topk(top, single[3])
        assert_same_topk(bottom, single[4])
    # Right-nested merging of three shards agrees as well.
    if shards == 3:
        nested = parts[0][3].merge(parts[1][3].merge(parts[2][3]))
        assert_same_topk(nested, single[3])


def test_merge_leaves_inputs_unchanged():
    rng = np.random.default_rng(1)
    a, b = CoMoments.within(3), CoMoments.within(3)
    a.update(rng.normal(size=(10, 3)))
    b.update(rng.normal(size=(5, 3)))
    before = a.covariance.copy()
    merged = a.merge(b)
    np.testing.assert_array_equal(a.covariance, before)
    assert (a.count, b.count, merged.count) == (10, 5, 15)
    merged.update(rng.normal(size=(4, 3)))
    np.testing.assert_array_equal(a.covariance, before)


# ------------------------------------------------------------------------------ top-k


@pytest.mark.parametrize(
    ("seed", "largest", "integer", "n", "k"),
    [
        (0, True, False, 300, 5),
        (1, False, False, 300, 5),
        (2, True, True, 300, 8),  # heavy ties
        (3, False, True, 300, 8),
        (4, True, True, 500, 1),
        (5, False, False, 3, 6),  # fewer samples than k
        (6, True, True, 10, 10),
    ],
)
def test_topk_matches_brute_force(seed, largest, integer, n, k):
    rng = np.random.default_rng(seed)
    units = 6
    values = rng.integers(0, 4, size=(n, units)).astype(np.float64) if integer else rng.normal(size=(n, units))
    ids = rng.permutation(5 * n)[:n]
    t = TopK(units, k, largest=largest)
    feed(lambda s: t.update(values[s], ids[s]), rng, n)
    ref_v, ref_i = brute_topk(values, ids, k, largest)
    np.testing.assert_array_equal(t.sample_ids, ref_i)
    assert np.array_equal(t.values, ref_v, equal_nan=True)
    assert t.count == n
    # Any batch order gives the same result.
    order = rng.permutation(n)
    again = TopK(units, k, largest=largest)
    feed(lambda s: again.update(values[order][s], ids[order][s]), rng, n)
    assert_same_topk(again, t)


def test_topk_empty_slots():
    t = TopK(2, 3)
    assert np.isnan(t.values).all() and (t.sample_ids == -1).all()
    t.update(np.array([[1.0, 2.0]]), [4])
    np.testing.assert_array_equal(t.sample_ids, [[4, 4], [-1, -1], [-1, -1]])
    assert np.isnan(t.values[1:]).all() and t.values[0].tolist() == [1.0, 2.0]
    t.update(np.empty((0, 2)), np.empty(0, dtype=np.int64))
    assert t.count == 1
    empty = TopK(2, 3).merge(TopK(2, 3))
    assert np.isnan(empty.values).all() and (empty.sample_ids == -1).all()
    assert_same_topk(t.merge(TopK(2, 3)), t)
    assert_same_topk(TopK(2, 3).merge(t), t)


# ----------------------------------------------------------------------- round trips


def filled(rng: np.random.Generator) -> list:
    x, y = correlated(rng, 50, 4, 3)
    ids = np.arange(100, 150)
    m, c, w = Moments(4), CoMoments(4, 3), CoMoments.within(4)
    top, bottom, partial = TopK(4, 5), TopK(4, 3, largest=False), TopK(4, 9)
    m.update(x)
    c.update(x, y)
    w.update(x)
    top.update(np.round(x), ids)
    bottom.update(x, ids)
    partial.update(x[:4], ids[:4])
    return [m, c, w, top, bottom, partial]


def state(acc) -> list[np.ndarray]:
    if isinstance(acc, Moments):
        return [np.asarray(acc.count), acc.mean, acc.m2]
    if isinstance(acc, CoMoments):
        return [np.asarray(acc.count), acc.mean_x, acc.mean_y, acc.m2_x, acc.m2_y, acc.comoment]
    return [np.asarray(acc.count), acc.values, acc.sample_ids]


def assert_same_state(a, b) -> None:
    assert type(a) is type(b)
    for u, v in zip(state(a), state(b)):
        assert u.dtype == v.dtype and np.array_equal(u, v, equal_nan=True)


def test_netcdf_round_trip(tmp_path):
    rng = np.random.default_rng(12)
    x, y = correlated(rng, 20, 4, 3)
    for i, acc in enumerate(filled(rng)):
        path = tmp_path / f"acc{i}.nc"
        acc.to_dataset().to_netcdf(path)
        with xr.open_dataset(path) as ds:
            rebuilt = type(acc).from_dataset(ds.load())
        assert_same_state(rebuilt, acc)
        if isinstance(acc, CoMoments):
            assert rebuilt.is_within == acc.is_within
        if isinstance(acc, TopK):
            assert (rebuilt.k, rebuilt.largest) == (acc.k, acc.largest)
        # Both continue identically.
        for a in (acc, rebuilt):
            if isinstance(a, Moments):
                a.update(x)
            elif isinstance(a, CoMoments):
                a.update(x) if a.is_within else a.update(x, y)
            else:
                a.update(x, np.arange(500, 520))
        assert_same_state(rebuilt, acc)


def test_dataset_layout():
    rng = np.random.default_rng(13)
    m, c, w, top, *_ = filled(rng)
    ds = m.to_dataset(unit=np.arange(10, 14))
    assert ds["count"].dtype == np.int64 and ds["count"].ndim == 0
    assert ds["mean"].dims == ("unit",) and list(ds["unit"].values) == [10, 11, 12, 13]
    ds = c.to_dataset()
    assert ds["comoment"].dims == ("unit", "unit_y") and ds["mean_y"].dims == ("unit_y",)
    assert not bool(ds["within"]) and bool(w.to_dataset()["within"])
    ds = top.to_dataset()
    assert ds["topk_value"].dims == ("rank", "unit") and ds["topk_sample"].dtype == np.int64
    assert int(ds["k"]) == 5 and bool(ds["largest"])


# ---------------------------------------------------------------------------- errors


def test_bad_batches():
    m = Moments(3)
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        m.update(np.zeros(3))
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        m.update(np.zeros((4, 2)))
    bad = np.zeros((5, 3))
    bad[3, 1], bad[4, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"2 non-finite .* row 3, unit 1"):
        m.update(bad)
    assert m.count == 0  # a rejected batch changes nothing
    t = TopK(3, 2)
    with pytest.raises(ValueError, match=r"row 3 \(sample id 13\), unit 1"):
        t.update(bad, np.arange(10, 15))
    with pytest.raises(ValueError, match="1 samples but sample_ids has 2"):
        t.update(np.zeros((1, 3)), [1, 2])
    with pytest.raises(ValueError, match="repeat"):
        t.update(np.zeros((2, 3)), [1, 1])
    with pytest.raises(ValueError, match=">= 0"):
        t.update(np.zeros((2, 3)), [1, -4])
    with pytest.raises(ValueError, match="integers"):
        t.update(np.zeros((2, 3)), [1.0, 2.0])
    with pytest.raises(ValueError, match="needs sample_ids"):
        t.update(np.zeros((2, 3)))
    c = CoMoments(3, 2)
    with pytest.raises(ValueError, match="x has 4 samples but y has 5"):
        c.update(np.zeros((4, 3)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="y: expected shape"):
        c.update(np.zeros((4, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="needs both"):
        c.update(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="one array"):
        CoMoments.within(3).update(np.zeros((4, 3)), np.zeros((4, 3)))


@pytest.mark.parametrize(
    "make", [lambda: TopK(3, 0), lambda: TopK(3, -1), lambda: Moments(0), lambda: CoMoments(2, 1.5)]
)
def test_bad_sizes(make):
    with pytest.raises(ValueError, match="integer >= 1"):
        make()


def test_bad_merges():
    with pytest.raises(ValueError, match="3 units with Moments over 4"):
        Moments(3).merge(Moments(4))
    with pytest.raises(ValueError, match="3 x 2 units"):
        CoMoments(3, 2).merge(CoMoments(3, 3))
    with pytest.raises(ValueError, match="within"):
        CoMoments(3, 3).merge(CoMoments.within(3))
    with pytest.raises(ValueError, match="different"):
        TopK(3, 2).merge(TopK(3, 3))
    with pytest.raises(ValueError, match="different"):
        TopK(3, 2).merge(TopK(3, 2, largest=False))
    with pytest.raises(TypeError):
        Moments(3).merge(TopK(3, 2))


def test_from_dataset_rejects_other_data():
    ds = Moments(3).to_dataset()
    with pytest.raises(ContractError, match="comoment"):
        CoMoments.from_dataset(ds)
    with pytest.raises(ContractError, match="topk_value"):
        TopK.from_dataset(ds)
    with pytest.raises(ValueError, match="m2"):
        Moments.from_dataset(ds.drop_vars("m2"))
