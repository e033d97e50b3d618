"""Tests of SLERP: the arc worked by hand, its linear fall-backs, the sweep, its guards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mergescope.components import Context
from mergescope.errors import ConfigError
from mergescope.testing import check_component, example_dataset, example_models
from mergescope_plugins.slerp import Slerp, slerp, slerp_states


def test_the_arc_between_orthogonal_unit_vectors() -> None:
    # 90 degrees apart: halfway is (cos 45, sin 45), of norm 1 (a linear midpoint has norm 0.71).
    out = slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    torch.testing.assert_close(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    # A third of the way: (cos 30, sin 30).
    third = slerp(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]]), 1 / 3)
    torch.testing.assert_close(third, torch.tensor([[2 * math.cos(math.pi / 6), 2 * math.sin(math.pi / 6)]]))
    assert third.shape == (1, 2)


def test_endpoints_and_linear_fall_backs() -> None:
    v0, v1 = torch.tensor([3.0, -1.0, 2.0]), torch.tensor([-1.0, 2.0, 0.5])
    torch.testing.assert_close(slerp(v0, v1, 0.0), v0)
    torch.testing.assert_close(slerp(v0, v1, 1.0), v1)
    # Parallel, and zero: linear.
    torch.testing.assert_close(slerp(v0, 2 * v0, 0.5), 1.5 * v0)
    torch.testing.assert_close(slerp(torch.zeros(3), v1, 0.25), 0.25 * v1)


def test_statistics_are_interpolated_linearly_and_counters_kept() -> None:
    first = {"w": torch.tensor([1.0, 0.0]), "bn.running_var": torch.tensor([1.0]), "bn.n": torch.tensor(5)}
    second = {"w": torch.tensor([0.0, 1.0]), "bn.running_var": torch.tensor([3.0]), "bn.n": torch.tensor(9)}
    out = slerp_states(first, second, 0.5, {"bn.running_var"})
    torch.testing.assert_close(out["w"], torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    assert float(out["bn.running_var"]) == 2.0 and int(out["bn.n"]) == 5


def test_the_merger_sweeps_the_arc() -> None:
    models = example_models(2)
    out = Slerp(alphas=[0.0, 0.5, 1.0]).merge(models, Context(data=example_dataset(), quiet=True))
    res = out.results
    assert list(res["alpha"].values) == [0.0, 0.5, 1.0]
    own = [Context(data=example_dataset(), quiet=True).evaluate(m).accuracy for m in models.values()]
    np.testing.assert_allclose(res["accuracy"].sel(alpha=[0.0, 1.0]).values, own)
    assert float(res["loss_barrier"]) >= 0 and 0 <= float(res["linear_fraction"]) < 1
    first, second = (m.state_dict() for m in models.values())
    for key, value in out.model.state_dict().items():
        torch.testing.assert_close(value, slerp(first[key], second[key], 0.5))
    assert Slerp().describe(res).startswith("accuracy ")


def test_two_models_only() -> None:
    with pytest.raises(ConfigError, match="slerp interpolates two models, got 3"):
        Slerp().merge(example_models(3), Context(quiet=True))
    mismatched = {"a": nn.Linear(2, 2), "b": nn.Linear(3, 2)}
    with pytest.raises(ConfigError, match="cannot interpolate models"):
        Slerp().merge(mismatched, Context(quiet=True))


def test_options() -> None:
    with pytest.raises(ValueError, match=r"'alpha' must be a number in \[0, 1\]"):
        Slerp(alpha=1.5)
    with pytest.raises(ValueError, match="'alphas'"):
        Slerp(alphas=[0.5, 2.0])


@pytest.mark.parametrize("component", [Slerp, Slerp(alphas=[], alpha=0.3)])
def test_conformance(component) -> None:
    check_component(component)
