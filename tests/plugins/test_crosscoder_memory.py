"""Memory of the crosscoder differ: flat in the number of rows, reads bounded by a chunk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import dask.array
import numpy as np
import pytest
import torch
import xarray as xr

from mergescope.components import Context
from mergescope_plugins import crosscoder as cc
from mergescope_plugins.crosscoder import Crosscoder

# One torch thread (tests/plugins/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# The child fits one epoch on lazily generated activations of each size and prints the
# growth of its resident memory over the fit (peak minus the resident memory before).
_CHILD = textwrap.dedent(
    """
    import gc, json, sys
    import dask, dask.array, numpy as np, torch, xarray as xr
    from mergescope.components import Context
    from mergescope_plugins.crosscoder import Crosscoder

    torch.set_num_threads(1)
    dask.config.set(scheduler="synchronous")

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    def lazy(rows, seed):
        # Generated chunk by chunk from the seed when read: nothing exists up front.
        rng = dask.array.random.default_rng(seed)
        x = rng.standard_normal((rows, 32), chunks=(2048, 32), dtype=np.float32)
        return xr.DataArray(dask.array.maximum(x, 0), dims=("sample", "unit"), coords={"sample": np.arange(rows)})

    crosscoder = Crosscoder(dictionary_size=128, epochs=1, batch_size=4096, topk=5)
    growth = {}
    for rows in [4096, *map(int, sys.argv[2:])]:  # the first fit warms up the libraries
        acts = {m: lazy(rows, seed) for seed, m in enumerate("abc")}
        gc.collect()  # the garbage of the fit before is not this fit's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak starts again at the resident memory now
        before = status("VmRSS")
        crosscoder.fit(acts, Context(quiet=True, workdir=sys.argv[1], device=torch.device("cpu")))
        growth[rows] = status("VmHWM") - before
    print(json.dumps(growth))
    """
)


def _peaks(tmp_path: Path, *rows: int) -> dict[int, int]:
    # A fixed, low mmap threshold returns every freed block above 64 KiB to the system,
    # so that the resident memory follows what is allocated (within 1 MiB from run to run).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), *map(str, rows)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc to reset the peak")
def test_memory_does_not_grow_with_the_rows(tmp_path):
    # All the rows of the larger set (3 models x 32 units, float32) are 77 MB, and its
    # (rows, latents) activations 102 MB: either would show far above the bound.
    small, large = 20_000, 200_000
    growth = _peaks(tmp_path, small, large)
    print(f"peak growth: {growth[small] / 2**20:.1f} MiB for {small} rows, {growth[large] / 2**20:.1f} MiB for {large}")
    assert growth[large] < 1.3 * growth[small], growth


class _Recording:
    """An array that records the rows every read asks for."""

    def __init__(self, values: np.ndarray, reads: list[int]) -> None:
        self.values, self.reads = values, reads
        self.shape, self.dtype, self.ndim = values.shape, values.dtype, values.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        out = self.values[key]
        self.reads.append(out.shape[0])
        return out


def _activations(samples: int, units: tuple[int, ...] = (6, 8), seed: int = 0) -> dict[str, xr.DataArray]:
    rng = np.random.default_rng(seed)
    return {
        m: xr.DataArray(
            np.maximum(rng.normal(size=(samples, u)), 0).astype(np.float32),
            dims=("sample", "unit"),
            coords={"sample": np.arange(samples), "layer": "block4"},
        )
        for m, u in zip("abc", units)
    }


def test_a_file_that_is_one_dask_chunk_is_read_a_range_at_a_time(tmp_path):
    # xarray.open_mfdataset makes each file one dask chunk: a chunk of the crosscoder
    # gathers several ranges, and must not read the whole file to get them.
    acts = _activations(600)
    reads: list[int] = []
    lazy = {
        name: a.copy(data=dask.array.from_array(_Recording(a.values, reads), chunks=(-1, -1)))
        for name, a in acts.items()
    }
    crosscoder = Crosscoder(dictionary_size=16, epochs=1, batch_size=32, chunk_size=64)
    result = crosscoder.fit(lazy, Context(quiet=True, workdir=tmp_path / "lazy", device=torch.device("cpu")))
    assert reads and max(reads) <= 64
    expected = crosscoder.fit(acts, Context(quiet=True, workdir=tmp_path / "memory", device=torch.device("cpu")))
    xr.testing.assert_identical(result, expected)


def test_all_rows_are_read_at_once_only_when_they_fit_in_one_chunk(tmp_path, monkeypatch):
    whole = cc._Inputs.whole
    calls: list[int] = []

    def counted(self):
        calls.append(self.rows)
        return whole(self)

    monkeypatch.setattr(cc._Inputs, "whole", counted)
    options = dict(dictionary_size=16, epochs=2, batch_size=32)
    cpu = Context(quiet=True, workdir=tmp_path, device=torch.device("cpu"))
    Crosscoder(**options, chunk_size=64).fit(_activations(600), cpu)
    assert calls == []  # 600 rows in chunks of 64: never all at once
    Crosscoder(**options, chunk_size=1024).fit(_activations(600), cpu)
    assert calls and set(calls) == {600}


def test_the_analysis_keeps_a_bounded_top_k(tmp_path, monkeypatch):
    merge = cc._merge_topk
    shapes: list[tuple[int, ...]] = []

    def watched(values, samples, new, first, k):
        out = merge(values, samples, new, first, k)
        shapes.append(tuple(out[0].shape))
        return out

    monkeypatch.setattr(cc, "_merge_topk", watched)
    monkeypatch.setattr(cc, "_EVAL_ROWS", 50)
    Crosscoder(dictionary_size=16, epochs=1, batch_size=32, chunk_size=128, topk=4).fit(
        _activations(600), Context(quiet=True, workdir=tmp_path, device=torch.device("cpu"))
    )
    # Chunks of 128 rows in batches of 50: 3 batches for each of 4 chunks, 2 for the last 88 rows.
    assert len(shapes) == 14 and set(shapes) == {(4, 16)}  # (k, latents) after every batch


def test_merged_top_k_equals_a_stable_sort_of_all_samples():
    rng = np.random.default_rng(0)
    # Many exact ties (zeros and repeated values) test which sample a tie keeps.
    f = np.maximum(rng.integers(-3, 4, size=(97, 5)), 0).astype(np.float32)
    f[f == 0] = -0.0 * (rng.random(np.count_nonzero(f == 0)) < 0.5)
    values = torch.zeros((0, 5))
    samples = torch.zeros((0, 5), dtype=torch.int64)
    for start in range(0, 97, 10):
        values, samples = cc._merge_topk(values, samples, torch.from_numpy(f[start : start + 10]), start, 6)
    order = np.argsort(-f, axis=0, kind="stable")[:6]
    np.testing.assert_array_equal(samples.numpy(), order)
    np.testing.assert_array_equal(values.numpy(), np.take_along_axis(f, order, axis=0))
