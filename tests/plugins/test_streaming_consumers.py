"""Consumers of recorded activations read dask-backed recordings in bounded pieces, never whole.

Kendall-tau, correlation, CLIP-δ and the regression aligner: the same results as on
in-memory inputs, reads bounded by a budget even when the recording is one stored chunk
(a shard of a joined store is one), and memory that does not grow with the rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

pytest.importorskip("dask.array")

import dask.array  # noqa: E402

from mergescope import (
    activations,  # noqa: E402
    make_activation,  # noqa: E402
)
from mergescope.activations import read_rows  # noqa: E402
from mergescope.statistics import TopK  # noqa: E402
from mergescope_plugins import clip_delta as cd  # noqa: E402
from mergescope_plugins import correlation as corr  # noqa: E402
from mergescope_plugins import kendall_tau as kt  # noqa: E402
from mergescope_plugins import lasso  # noqa: E402


class _Recording:
    """An array that records the rows of every read (and their bytes, in ``sizes``)."""

    def __init__(self, values: np.ndarray, reads: list[int], sizes: list[int] | None = None) -> None:
        self.values, self.reads, self.sizes = values, reads, sizes if sizes is not None else []
        self.shape, self.dtype, self.ndim = values.shape, values.dtype, values.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        out = self.values[key]
        if out.size:  # dask reads an empty corner for the array's meta
            self.reads.append(out.shape[0])
            self.sizes.append(out.nbytes)
        return out


def _pair(samples: int = 500, units: int = 6, seed: int = 0, ties: bool = False) -> tuple[xr.DataArray, xr.DataArray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, units))
    y = 0.5 * x + rng.normal(size=(samples, units))
    if ties:  # ReLU zeros and rounding: many tied values
        x, y = np.maximum(x, 0).round(1), np.maximum(y, 0).round(1)
    ids = 7 + 3 * np.arange(samples)
    labels = np.arange(samples) % 5
    return (
        make_activation(x.astype(np.float32), sample_ids=ids, labels=labels, model="a", layer="l"),
        make_activation(y.astype(np.float32), sample_ids=ids, labels=labels, model="b", layer="l"),
    )


def _one_chunk(a: xr.DataArray, reads: list[int], sizes: list[int] | None = None) -> xr.DataArray:
    """``a`` backed by one dask chunk over a recording array, like a file opened with open_mfdataset."""
    return a.copy(data=dask.array.from_array(_Recording(a.values, reads, sizes), chunks=-1))


# ------------------------------------------------------------------ kendall-tau


@pytest.mark.parametrize("options", [{}, {"per_class": 20, "seed": 3}, {"classes": [1, 4]}])
def test_kendall_tau_on_a_lazy_recording_equals_the_in_memory_score(monkeypatch, options):
    a, b = _pair(ties=True)
    metric = kt.KendallTau(**options)
    expected = metric.score(a, b)
    # Reads of at most 10 rows of the 6 float32 units; every sample scored 2 units at a time.
    monkeypatch.setattr(activations, "READ_BYTES", 24 * 10)
    monkeypatch.setattr(kt, "_BLOCK_BYTES", 2 * 4 * 2 * 500)
    reads: list[int] = []
    sizes: list[int] = []
    result = metric.score(_one_chunk(a, reads, sizes), _one_chunk(b, reads, sizes))
    xr.testing.assert_identical(result, expected)  # the in-memory score is the code path as it was
    assert sizes and max(sizes) <= 24 * 10 and sum(reads) < 2 * 6 * 500
    xr.testing.assert_identical(metric.score(a.chunk(sample=64), b.chunk(sample=100)), expected)


def test_kendall_tau_reads_only_around_the_subset():
    a, b = _pair(samples=5000, units=4)
    metric = kt.KendallTau(classes=[2], per_class=3, seed=1)
    reads: list[int] = []
    result = metric.score(_one_chunk(a, reads), _one_chunk(b, reads))
    xr.testing.assert_identical(result, metric.score(a, b))
    assert sum(reads) == 2 * (metric.subset(a)[-1] - metric.subset(a)[0] + 1)  # one range holds the 3 samples


def test_read_rows_reads_bounded_ranges_in_the_asked_order():
    """The reader Kendall-tau's D' and the regression's fit subset go through."""
    values = np.arange(120.0).reshape(40, 3)
    lazy = dask.array.from_array(values, chunks=(40, 3))  # one stored chunk, as a joined shard
    positions = np.array([31, 0, 9, 5, 1, 31, 10, 30])
    reads: list[tuple[int, int]] = []
    original = lazy.__getitem__

    class Recording:
        shape, dtype = lazy.shape, lazy.dtype

        def __getitem__(self, key):
            rows = key[0] if isinstance(key, tuple) else key
            if rows.stop - rows.start:
                reads.append((rows.start, rows.stop))
            return original(key)

    rows = read_rows(Recording(), positions, 10)
    np.testing.assert_array_equal(rows, values[positions])
    assert reads == [(0, 10), (10, 11), (30, 32)]  # each run spans fewer than 10 samples
    np.testing.assert_array_equal(read_rows(values, positions, 4, slice(1, 3)), values[positions, 1:3])


# ------------------------------------------------------------------ correlation


def test_correlation_reads_a_one_chunk_recording_in_bounded_ranges(monkeypatch):
    a, b = _pair(samples=700, units=5)
    expected = corr.Correlation().score(a, b)
    monkeypatch.setattr(activations, "READ_BYTES", 20 * 64)  # 64 rows of 5 float32 units
    reads: list[int] = []
    result = corr.Correlation().score(_one_chunk(a, reads), _one_chunk(b, reads))
    assert reads and max(reads) <= 64 and sum(reads) == 2 * 700
    np.testing.assert_allclose(result.values, expected.values, rtol=0, atol=1e-12)
    xr.testing.assert_identical(result.copy(data=expected.values), expected)  # the same labels


def test_correlation_of_small_lazy_chunks_is_unchanged(monkeypatch):
    # Chunks under the budget are read as they are, as before: the same sums, bit for bit.
    a, b = _pair(samples=300, units=4, seed=2)
    before = corr.Correlation().score(a.chunk(sample=37), b.chunk(sample=50))
    monkeypatch.setattr(activations, "READ_BYTES", 16 * 37)
    xr.testing.assert_identical(corr.Correlation().score(a.chunk(sample=37), b.chunk(sample=50)), before)


# ------------------------------------------------------------------- clip-delta


def test_clip_delta_top_sets_read_a_one_chunk_recording_in_bounded_ranges(monkeypatch):
    a, b = _pair(samples=600, units=6, seed=4)
    expected = cd._top_sets(a, b, 5)
    monkeypatch.setattr(activations, "READ_BYTES", 24 * 50)
    reads: list[int] = []
    result = cd._top_sets(_one_chunk(a, reads), _one_chunk(b, reads), 5)
    assert reads and max(reads) <= 50 and sum(reads) == 2 * 600
    for got, want in zip(result, expected):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- regression


def test_the_regression_fit_subset_is_read_around_its_samples(monkeypatch):
    a, b = _pair(samples=3000, units=5, seed=5)
    ids = np.asarray(a["sample"].values)[[2900, 15, 16, 1200, 17, 2999]]  # unsorted, as a per-class draw is
    monkeypatch.setattr(lasso, "_SPAN", 100)
    reads: list[int] = []
    np.testing.assert_array_equal(lasso._select(_one_chunk(a, reads), ids), a.sel(sample=ids).values)
    assert sorted(reads) == [1, 3, 100]  # 15-17; 1200; 2900 and 2999 in one span of 100
    with pytest.raises(KeyError):
        lasso._select(_one_chunk(a, []), np.array([8]))


def test_the_regression_on_a_lazy_recording_equals_the_in_memory_fit(monkeypatch):
    x, y = _pair(samples=900, units=5, seed=6)
    ids = np.random.default_rng(0).choice(np.asarray(x["sample"].values), 40, replace=False)
    aligner = lasso.RegressionAlignment(method="ols", topk=4, sparsity=[0.5], top_m=[2])
    levels = lasso.sparsity_levels(aligner.sparsity, aligner.top_m)
    reference = TopK(5, 4)
    reference.update(y.values, y["sample"].values)
    monkeypatch.setattr(lasso, "_CHUNK", 128)
    expected = aligner._fit_one(x, y, ids, levels, reference, "b", "a", "l")
    monkeypatch.setattr(lasso, "_SPAN", 64)
    reads: list[int] = []
    result = aligner._fit_one(_one_chunk(x, reads), _one_chunk(y, reads), ids, levels, reference, "b", "a", "l")
    xr.testing.assert_identical(result, expected)
    assert reads and max(reads) <= 128


# ------------------------------------------------------------------------ memory

# The child scores lazily generated activations of each size given with every streaming
# consumer and prints, per size and consumer, the growth of its resident memory over the
# call (peak minus the resident memory before). A warm-up at a few rows loads the libraries.
# One child measures every size: the interpreter and its imports start once.
_CHILD = textwrap.dedent(
    """
    import gc, json, sys, types, warnings
    import attrs, dask, dask.array, numpy as np, xarray as xr
    import mergescope
    from mergescope import hookimpl
    from mergescope.statistics import TopK
    from mergescope_plugins import clip_delta, correlation, kendall_tau, lasso

    dask.config.set(scheduler="synchronous")
    warnings.simplefilter("ignore")
    UNITS, BUDGET = 32, 2**20
    mergescope.activations.READ_BYTES = BUDGET  # below the smaller size's 2.6 MB, so both sizes are read in pieces

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    class Source:
        # Rows made from the seed when read, as a store file reads them: nothing exists up front.
        def __init__(self, rows, seed):
            self.shape, self.dtype, self.ndim, self.seed = (rows, UNITS), np.dtype(np.float32), 2, seed

        def __getitem__(self, key):
            rows, units = key
            r = np.arange(*rows.indices(self.shape[0]), dtype=np.float64)[:, None]
            u = np.arange(*units.indices(UNITS), dtype=np.float64)[None, :]
            x = np.sin(r * 12.9898 + u * 78.233 + self.seed) * 43758.5453
            return (x - np.floor(x)).astype(np.float32)

    def lazy(rows, seed):
        # One dask chunk for all rows, like each shard of a joined store.
        data = dask.array.from_array(Source(rows, seed), chunks=-1)
        coords = {"sample": np.arange(rows), "unit": np.arange(UNITS), "label": ("sample", np.arange(rows) % 10),
                  "model": "m%d" % seed, "layer": "l"}
        return xr.DataArray(data, dims=("sample", "unit"), coords=coords, name="activation")

    @attrs.define
    class Embedder:
        name = "ids"

        def embed(self, images):
            return np.abs(np.sin(np.outer(images, np.arange(1, 9)))) + 0.1

    class Plugin:
        @hookimpl
        def register_embedders(self, register):
            register(Embedder)

    mergescope.register_plugin(Plugin(), name="test-ids")
    context = types.SimpleNamespace(data=types.SimpleNamespace(name="lazy"), images=np.asarray, device=None)
    aligner = lasso.RegressionAlignment(method="ols", topk=5, sparsity=[0.5], top_m=[2])
    levels = lasso.sparsity_levels(aligner.sparsity, aligner.top_m)

    consumers = {
        "correlation": lambda a, b, ids: correlation.Correlation().score(a, b),
        "kendall-tau": lambda a, b, ids: kendall_tau.KendallTau(per_class=100).score(a, b),
        "clip-delta": lambda a, b, ids: clip_delta.ClipDelta(k=5, embedder="ids").score(a, b, context=context),
        "lasso": lambda a, b, ids: aligner._fit_one(a, b, ids, levels, TopK(UNITS, 5), "m1", "m0", "l"),
    }
    growth = {}
    for rows in (4096, *map(int, sys.argv[1:])):  # the first pass warms up the libraries
        a, b = lazy(rows, 0), lazy(rows, 1)
        ids = np.random.default_rng(0).choice(rows, 50, replace=False)
        growth[rows] = {}
        for name, run in consumers.items():
            gc.collect()  # the garbage of the call before is not this call's
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak starts again at the resident memory now
            before = status("VmRSS")
            run(a, b, ids)
            growth[rows][name] = status("VmHWM") - before
    print(json.dumps(growth))
    """
)


def _growth(*rows: int) -> list[dict[str, int]]:
    """The growth per consumer at each number of rows, in the order given."""
    # A fixed, low mmap threshold returns every freed block above 64 KiB to the system,
    # so that the resident memory follows what is allocated.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", MERGESCOPE_PLUGINS="clip_delta")
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *map(str, rows)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    growth = json.loads(done.stdout.strip().splitlines()[-1])
    return [growth[str(n)] for n in rows]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc to reset the peak")
def test_memory_does_not_grow_with_the_rows():
    # The larger recording is 25.6 MB per model (200,000 rows of 32 float32 units): read
    # whole (or converted to float64 whole), any consumer would show far above the bound.
    small, large = 20_000, 200_000
    at_small, at_large = _growth(small, large)
    for name in at_small:
        print(f"{name}: {at_small[name] / 2**20:.1f} MiB at {small} rows, {at_large[name] / 2**20:.1f} MiB at {large}")
    assert all(at_large[name] < 1.3 * at_small[name] for name in at_small), (at_small, at_large)
