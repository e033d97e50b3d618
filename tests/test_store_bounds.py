"""The activation store's memory bounds: chunks capped in bytes, large activations opened lazily."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from mergescope import store as store_module
from mergescope.store import StoreSpec, collect_store
from mergescope.testing import example_dataset
from tests.test_store import ConvNet


def _spec(**kw) -> StoreSpec:
    return StoreSpec(layers={"a": ["conv"], "b": ["conv"]}, batch_size=8, chunk_size=64, reduce="none", **kw)


def test_chunks_are_capped_in_bytes_and_give_the_same_store(tmp_path, monkeypatch):
    data = example_dataset(n=60)
    models = {"a": ConvNet(0).eval(), "b": ConvNet(1).eval()}
    whole = collect_store(models, data, _spec(), tmp_path / "whole", key="k")
    flushed: list[int] = []
    flush = store_module._flush

    def counting_flush(work, data, spec, chunk, *args):
        flushed.append(chunk.size)
        return flush(work, data, spec, chunk, *args)

    # Full 6-channel float32 maps of two models; the cap holds 2.5 batches of 8: chunks of 2 batches.
    _, height, width = data.input_shape
    per_sample = 2 * 6 * height * width * 4
    monkeypatch.setattr(store_module, "CHUNK_BYTES", int(2.5 * 8 * per_sample))
    monkeypatch.setattr(store_module, "_flush", counting_flush)
    capped = collect_store(models, data, _spec(), tmp_path / "capped", key="k")
    assert flushed == [16, 16, 16, 12]  # instead of one chunk of 60 samples
    for m in models:
        xr.testing.assert_equal(capped.activation(m, "conv"), whole.activation(m, "conv"))
        np.testing.assert_array_equal(capped.moments(m, "conv").mean, whole.moments(m, "conv").mean)


def test_large_activations_are_opened_lazily(tmp_path, monkeypatch):
    pytest.importorskip("dask.array")
    data = example_dataset(n=40)
    models = {"a": ConvNet(0).eval(), "b": ConvNet(1).eval()}
    store = collect_store(models, data, _spec(), tmp_path / "s", key="k")
    eager = store.activation("a", "conv")
    assert eager.chunks is None
    monkeypatch.setattr(store_module, "EAGER_BYTES", 1024)
    lazy = store.activation("a", "conv")
    assert lazy.chunks is not None  # read on demand, not loaded
    xr.testing.assert_equal(lazy.compute(), eager)
