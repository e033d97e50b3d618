"""Statistics of batches that stay on their device: the same numbers as the host's NumPy path.

On an accelerator the activation store hands the moments and co-moments torch tensors that
live on the device (the products of every batch run there, in float64). Here the torch path
runs on CPU tensors, and the store is made to take it, so it is checked without a GPU; on a
machine with CUDA the same comparisons run on the GPU too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergescope import statistics
from mergescope.statistics import CoMoments, Moments
from mergescope.store import StoreSpec, collect_store
from mergescope.testing import example_dataset
from tests.test_store import ConvNet

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _batches(seed: int = 0):
    rng = np.random.default_rng(seed)
    # Large offsets with a small spread: what the shifted centring is there for.
    return [rng.normal(1e4, 0.5, (n, 5)) + rng.normal(size=(n, 1)) for n in (7, 1, 13, 30)]


@pytest.mark.parametrize("device", DEVICES)
def test_moments_of_tensors_equal_those_of_arrays(device):
    host, on_device = Moments(5), Moments(5)
    for batch in _batches():
        rows = batch.astype(np.float32)  # what a recording hands over
        host.update(rows)
        on_device.update(torch.as_tensor(rows, device=device))
    np.testing.assert_allclose(on_device.mean, host.mean, rtol=1e-14)
    np.testing.assert_allclose(on_device.variance, host.variance, rtol=1e-10)
    assert on_device.count == host.count == 51


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("within", [False, True])
def test_co_moments_of_tensors_equal_those_of_arrays(device, within):
    xs, ys = _batches(0), _batches(1)
    host = CoMoments.within(5) if within else CoMoments(5, 5)
    on_device = host.copy()
    for x, y in zip(xs, ys):
        host.update(x) if within else host.update(x, y)
        tx, ty = torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)
        on_device.update(tx) if within else on_device.update(tx, ty)
    np.testing.assert_allclose(on_device.covariance, host.covariance, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(on_device.correlation, host.correlation, rtol=1e-10, atol=1e-12)


def test_bad_tensors_are_refused_as_arrays_are():
    with pytest.raises(ValueError, match=r"expected shape \(n, 5\)"):
        Moments(5).update(torch.zeros(3, 4))
    bad = torch.zeros(3, 5)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite value"):
        CoMoments(5, 5).update(bad, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="3 samples but y has 2"):
        CoMoments(5, 5).update(torch.zeros(3, 5), torch.zeros(2, 5))


def test_a_device_without_float64_is_reduced_on_the_host(monkeypatch, caplog):
    """As on MPS: the batch goes to the host, and the log says so once."""
    monkeypatch.setattr(statistics, "_HOST_ONLY_DEVICES", ("cpu",))
    monkeypatch.setattr(statistics, "_said_host", set())
    host, moved = Moments(5), Moments(5)
    with caplog.at_level("INFO", logger="mergescope.statistics"):
        for batch in _batches():
            host.update(batch)
            moved.update(torch.as_tensor(batch))
    np.testing.assert_array_equal(moved.mean, host.mean)
    assert sum("no float64" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("positions", [False, True])
def test_a_store_with_products_on_the_device_equals_the_host_store(tmp_path, monkeypatch, positions):
    from mergescope import store as store_module

    data = example_dataset(n=60)
    spec = StoreSpec(
        layers={"a": ["conv", "relu"], "b": ["conv", "relu"]},
        batch_size=8,
        chunk_size=20,
        topk=3,
        covariance=True,
        pairs=[("a", "b")],
        positions=positions,
    )
    models = {"a": ConvNet(0).eval(), "b": ConvNet(1).eval()}
    host = collect_store(models, data, spec, tmp_path / "host", key="k")
    monkeypatch.setattr(store_module, "_statistics_on_device", lambda device: True)
    device = collect_store(models, data, spec, tmp_path / "device", key="k")
    for m in ("a", "b"):
        for layer in ("conv", "relu"):
            np.testing.assert_allclose(device.moments(m, layer).mean, host.moments(m, layer).mean, rtol=1e-12)
            np.testing.assert_allclose(device.moments(m, layer).variance, host.moments(m, layer).variance, rtol=1e-9)
            np.testing.assert_allclose(
                device.covariance(m, layer).covariance, host.covariance(m, layer).covariance, rtol=1e-9, atol=1e-12
            )
            np.testing.assert_array_equal(device.topk(m, layer).sample_ids, host.topk(m, layer).sample_ids)
    np.testing.assert_allclose(
        device.cross("a", "b", "conv").correlation, host.cross("a", "b", "conv").correlation, rtol=1e-9, atol=1e-12
    )
