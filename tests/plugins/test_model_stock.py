"""Tests of Model Stock: the ratio worked by hand, per tensor, the merger, its guards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mergescope.components import Context
from mergescope.errors import ConfigError
from mergescope.task_vectors import example_finetunes
from mergescope.testing import check_component, example_dataset, example_models
from mergescope_plugins.model_stock import ModelStock, mean_pairwise_cosine, stock_ratio


def test_ratio_worked_by_hand() -> None:
    # Two fine-tunes at 45 degrees: cos = 1/sqrt(2), t = 2 cos / (1 + cos) = 0.8284.
    tau = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    assert mean_pairwise_cosine(tau) == pytest.approx(1 / math.sqrt(2))
    assert stock_ratio(1 / math.sqrt(2), 2) == pytest.approx(2 / (1 + math.sqrt(2)))
    # Three: the mean of the three pairwise cosines (1, 0, 0) = 1/3; t = 3 (1/3) / (1 + 2/3) = 0.6.
    three = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert mean_pairwise_cosine(three) == pytest.approx(1 / 3)
    assert stock_ratio(1 / 3, 3) == pytest.approx(0.6)
    # Agreeing fine-tunes keep their mean (t = 1); opposed ones, or an unchanged tensor, keep the base.
    assert stock_ratio(1.0, 5) == 1.0 and stock_ratio(-0.5, 2) == 0.0 and stock_ratio(float("nan"), 2) == 0.0


def _linear(weights: list[float]) -> nn.Sequential:
    model = nn.Sequential(nn.Flatten(), nn.Linear(len(weights), 1, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([weights]))
    return model


def test_merger_applies_the_ratio_tensor_by_tensor() -> None:
    base = nn.Sequential(nn.Linear(2, 1, bias=True))
    with torch.no_grad():
        base[0].weight.copy_(torch.tensor([[10.0, 10.0]]))
        base[0].bias.fill_(10.0)
    tuned = {}
    for name, (dw, db) in {"ft0": ([1.0, 0.0], 1.0), "ft1": ([1.0, 1.0], -1.0)}.items():
        model = nn.Sequential(nn.Linear(2, 1, bias=True))
        with torch.no_grad():
            model[0].weight.copy_(base[0].weight + torch.tensor([dw]))
            model[0].bias.copy_(base[0].bias + db)
        tuned[name] = model
    out = ModelStock(base="base").merge({"base": base, **tuned}, Context(quiet=True))
    t = 2 / (1 + math.sqrt(2))
    # weight: base + t * mean([1, 0], [1, 1]); bias: the two fine-tunes are opposed, so the base's.
    torch.testing.assert_close(out.model[0].weight, torch.tensor([[10.0 + t, 10.0 + 0.5 * t]]))
    torch.testing.assert_close(out.model[0].bias, torch.tensor([10.0]))
    res = out.results
    assert list(res["parameter"].values) == ["0.weight", "0.bias"]
    np.testing.assert_allclose(res["ratio"].values, [t, 0.0])
    np.testing.assert_allclose(res["cosine"].values, [1 / math.sqrt(2), -1.0])
    assert ModelStock().describe(res).startswith("base 'base', t from 0.00 to 0.83")


def test_one_fine_tune_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs at least two besides the base; got 1"):
        ModelStock().merge({"base": _linear([10.0, 10.0]), "ft": _linear([10.5, 10.0])}, Context(quiet=True))


def test_results_and_search() -> None:
    out = ModelStock(scalings=[0.5, 1.0]).merge(example_finetunes(2), Context(data=example_dataset(), quiet=True))
    assert out.results["search_accuracy"].dims == ("scaling",)
    assert ((out.results["ratio"] >= 0) & (out.results["ratio"] <= 1)).all()


def test_raw_independent_weights_are_rejected() -> None:
    with pytest.raises(ConfigError, match="does not look like a fine-tune"):
        ModelStock().merge(example_models(3), Context(quiet=True))


@pytest.mark.parametrize("component", [ModelStock, ModelStock(scaling=0.8)])
def test_conformance(component) -> None:
    check_component(component)
