from __future__ import annotations

import numpy as np
import pytest
import torch

from mergescope import Context
from mergescope.groups import channel_groups, example_input
from mergescope.testing import check_component, example_dataset
from mergescope_plugins.repair import Repair, repair_layers
from mergescope_plugins.zoo import MLP, SmallCNN


@pytest.fixture(scope="module")
def data():
    return example_dataset(n=96, shape=(1, 8, 8))


def pair(arch, seed=0):
    torch.manual_seed(seed)
    a = arch.build((1, 8, 8), 3).eval()
    torch.manual_seed(seed + 1)
    b = arch.build((1, 8, 8), 3).eval()
    return a, b


def stats(model, data, layer):
    with torch.no_grad():
        out = {}
        h = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: out.setdefault("x", o))
        model(data.images)
        h.remove()
    rows = out["x"].movedim(1, -1).reshape(-1, out["x"].shape[1]).double() if out["x"].ndim > 2 else out["x"].double()
    return rows.mean(0).numpy(), rows.std(0, unbiased=False).numpy()


@pytest.mark.parametrize("arch", [MLP(hidden=[16, 16]), SmallCNN(widths=[4, 8], batchnorm=True), SmallCNN(widths=[4, 8])])
def test_repaired_channels_have_the_interpolated_statistics(arch, data):
    a, b = pair(arch)
    context = Context(data=data, batch_size=1000, quiet=True)
    merged = Repair(alpha=0.3, alphas=[]).merge({"a": a, "b": b}, context).model
    layers = repair_layers(a, channel_groups(a, example_input(data)))
    assert layers  # every architecture has something to correct
    # the last corrected layer sees all earlier corrections: check every layer
    for layer in layers:
        mean_a, std_a = stats(a, data, layer)
        mean_b, std_b = stats(b, data, layer)
        mean_m, std_m = stats(merged, data, layer)
        np.testing.assert_allclose(mean_m, 0.7 * mean_a + 0.3 * mean_b, atol=2e-3)
        np.testing.assert_allclose(std_m, 0.7 * std_a + 0.3 * std_b, rtol=2e-2, atol=2e-3)


def test_an_endpoint_repaired_on_data_stored_class_by_class_is_unchanged():
    # REPAIR at alpha = 0 asks model a for its own statistics: the result must compute
    # what a computes, even when the data come class by class in two batches.
    from mergescope.batchnorm import reset_batchnorm
    from mergescope.components import TensorImageDataset

    gen = torch.Generator().manual_seed(3)
    shift = torch.repeat_interleave(torch.tensor([-2.0, 2.0]), 48).view(-1, 1, 1, 1)
    images = torch.randn(96, 1, 8, 8, generator=gen) + shift
    sorted_data = TensorImageDataset("sorted", images, np.repeat([0, 1], 48), np.arange(96), ["a", "b"])
    a, b = pair(SmallCNN(widths=[4, 8], batchnorm=True))
    for model in (a, b):  # running statistics that describe the data, as after training
        reset_batchnorm(model, sorted_data, batch_size=96)
    context = Context(data=sorted_data, batch_size=48, quiet=True)
    merged = Repair(alpha=0.0, alphas=[]).merge({"a": a, "b": b}, context).model
    with torch.no_grad():
        expected, got = a(images), merged(images)
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 0.05 * scale


def test_the_sweep_and_the_reset_variant(data):
    a, b = pair(SmallCNN(widths=[4, 8], batchnorm=True))
    context = Context(data=data, quiet=True)
    result = Repair(alphas=[0.0, 0.5, 1.0]).merge({"a": a, "b": b}, context).results
    assert list(result["alpha"].values) == [0.0, 0.5, 1.0] and "loss_barrier" in result
    reset = Repair(variant="reset-bn", alphas=[]).merge({"a": a, "b": b}, context)
    assert reset.results["repaired_layers"].size == 0 and 0 <= float(reset.results["merged_accuracy"]) <= 1


def test_bad_input(data):
    context = Context(data=data, quiet=True)
    a, b = pair(MLP(hidden=[8]))
    with pytest.raises(ValueError, match="merges two models"):
        Repair().merge({"a": a}, context)
    with pytest.raises(ValueError, match="needs \\[data\\]"):
        Repair().merge({"a": a, "b": b}, Context())
    with pytest.raises(ValueError, match="variant"):
        Repair(variant="fix")


def test_conformance():
    check_component(Repair(alphas=[0.0, 1.0]))
