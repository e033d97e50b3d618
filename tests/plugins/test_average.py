"""Tests of the average merger (model soup): hand-computed means, weights, BatchNorm, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mergescope.components import Context, Merger, TensorImageDataset
from mergescope.errors import ConfigError
from mergescope.options import option_names, structure_options
from mergescope.states import average_states
from mergescope.testing import check_component, example_models
from mergescope_plugins.average import Average


def scalar_model(w: float, b: float) -> nn.Sequential:
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 1))
    with torch.no_grad():
        model[1].weight.fill_(w)
        model[1].bias.fill_(b)
    return model


def with_bn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    model[2].running_mean.normal_()
    model[2].running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture
def data() -> TensorImageDataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(30, 1, 2, 2, generator=gen)
    return TensorImageDataset("random", images, np.arange(30) % 3, np.arange(30), ["a", "b", "c"])


def test_uniform_average_is_the_hand_mean() -> None:
    models = {"a": scalar_model(1.0, -3.0), "b": scalar_model(2.0, 0.0), "c": scalar_model(6.0, 1.5)}
    out = Average().merge(models, Context(quiet=True))
    # weight: (1 + 2 + 6) / 3 = 3; bias: (-3 + 0 + 1.5) / 3 = -0.5
    assert out.model[1].weight.item() == pytest.approx(3.0)
    assert out.model[1].bias.item() == pytest.approx(-0.5)
    np.testing.assert_allclose(out.results["weights"].values, [1 / 3] * 3)
    assert list(out.results["model"].values) == ["a", "b", "c"]
    assert "loss" not in out.results  # no data, no evaluation
    assert str(out.results["batchnorm_statistics"].values) == "none"


def test_weighted_average_is_the_hand_sum() -> None:
    models = {"a": scalar_model(1.0, -3.0), "b": scalar_model(2.0, 0.0), "c": scalar_model(6.0, 1.5)}
    out = Average(weights=[0.2, 0.3, 0.5]).merge(models, Context(quiet=True))
    # weight: 0.2 * 1 + 0.3 * 2 + 0.5 * 6 = 3.8; bias: 0.2 * -3 + 0 + 0.5 * 1.5 = 0.15
    assert out.model[1].weight.item() == pytest.approx(3.8)
    assert out.model[1].bias.item() == pytest.approx(0.15)


def test_average_of_real_networks_matches_float64_mean() -> None:
    states = [m.state_dict() for m in example_models(3).values()]
    out = average_states(states)
    for key in states[0]:
        expected = (sum(s[key].double() for s in states) / 3).float()
        torch.testing.assert_close(out[key], expected, rtol=1e-7, atol=1e-7)


def test_batchnorm_statistics_averaged_or_recomputed(data: TensorImageDataset) -> None:
    models = {"a": with_bn(0), "b": with_bn(1)}
    expected_mean = (models["a"][2].running_mean + models["b"][2].running_mean) / 2

    kept = Average(reset_batchnorm=False).merge(models, Context(data=data, quiet=True))
    torch.testing.assert_close(kept.model[2].running_mean, expected_mean)
    assert str(kept.results["batchnorm_statistics"].values) == "averaged"

    no_data = Average().merge(models, Context(quiet=True))
    torch.testing.assert_close(no_data.model[2].running_mean, expected_mean)
    assert str(no_data.results["batchnorm_statistics"].values) == "averaged"

    reset = Average().merge(models, Context(data=data, quiet=True, batch_size=64))
    assert str(reset.results["batchnorm_statistics"].values) == "recomputed"
    with torch.no_grad():
        features = reset.model[1](reset.model[0](data.images))
    torch.testing.assert_close(reset.model[2].running_mean, features.mean(dim=0), rtol=1e-5, atol=1e-5)
    assert not reset.model.training
    # Scores are those of the returned model.
    assert float(reset.results["accuracy"]) == Context(data=data).evaluate(reset.model).accuracy
    # The inputs are untouched.
    assert torch.equal(models["a"][2].running_mean, with_bn(0)[2].running_mean)


def test_describe(data: TensorImageDataset) -> None:
    models = {"a": with_bn(0), "b": with_bn(1)}
    merger = Average()
    assert isinstance(merger, Merger)
    text = merger.describe(merger.merge(models, Context(data=data, quiet=True)).results)
    assert text.startswith("weights 0.50/0.50: accuracy ")
    assert "not evaluated" in merger.describe(merger.merge(models, Context(quiet=True)).results)


def test_options_and_errors() -> None:
    assert option_names(Average) == ["weights", "reset_batchnorm"]  # no base: it averages weights
    with pytest.raises(ValueError, match="sum to 1"):
        Average(weights=[0.5, 0.6])
    with pytest.raises(ValueError, match="non-negative"):
        Average(weights=[1.5, -0.5])
    with pytest.raises(ValueError, match="finite"):
        Average(weights=[0.5, float("nan")])
    with pytest.raises(ConfigError, match="'weights'"):
        structure_options(Average, {"weights": "0.5"})

    models = example_models(2)
    with pytest.raises(ConfigError, match="'weights' has 3 values but the step has 2 models"):
        Average(weights=[0.2, 0.3, 0.5]).merge(models, Context(quiet=True))
    with pytest.raises(ConfigError, match="at least two models"):
        Average().merge({"a": models["model0"]}, Context(quiet=True))
    with pytest.raises(ConfigError, match="the alignment's reference 'other' is not among this step's models"):
        from mergescope.components import Alignment

        Average().merge(models, Context(quiet=True), alignment=Alignment("other"))
    models["model1"] = example_models(2, hidden=5)["model1"]
    with pytest.raises(ConfigError, match=r"'1\.weight' has shape \(8, 16\) in model 'model0' but \(5, 16\)"):
        Average().merge(models, Context(quiet=True))


@pytest.mark.parametrize("component", [Average, Average(weights=[0.25, 0.75]), Average(reset_batchnorm=False)])
def test_conformance(component) -> None:
    check_component(component)
