"""Tests of Model Breadcrumbs: the two-tailed mask worked by hand, per layer, the merger, its guards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mergescope.components import Context
from mergescope.errors import ConfigError
from mergescope.task_vectors import example_finetunes
from mergescope.testing import check_component, example_dataset, example_models
from mergescope_plugins.breadcrumbs import Breadcrumbs, breadcrumb_mask

# One layer's task vectors: two rows of ten entries.
TAUS = torch.tensor(
    [
        [0.1, -5.0, 2.0, 0.3, -1.0, 0.05, 4.0, -0.2, 3.0, 0.5],
        [1.0, 0.0, -0.4, 6.0, 0.2, -2.0, 0.1, 0.3, -0.6, 0.7],
    ],
    dtype=torch.float64,
)


def test_mask_drops_both_tails_of_each_row() -> None:
    # Half the entries are dropped from the bottom, one (10 %) from the top.
    mask = breadcrumb_mask(TAUS, 0.5, 0.1)
    # Row 0: the five smallest |tau| are 0.05, 0.1, -0.2, 0.3, 0.5; the largest is -5.
    assert mask[0].tolist() == [False, False, True, False, True, False, True, False, True, False]
    # Row 1: the five smallest are 0.0, 0.1, 0.2, 0.3, -0.4; the largest is 6.
    assert mask[1].tolist() == [True, False, False, False, False, True, False, False, True, True]


def test_ties_in_magnitude_are_broken_by_position() -> None:
    mask = breadcrumb_mask(torch.ones(1, 4, dtype=torch.float64), 0.5, 0.25)
    assert mask[0].tolist() == [False, False, True, False]


def test_masks_are_per_layer_not_over_the_network() -> None:
    # Layer 1 moves by 0.01..0.04, layer 2 by 1..4: per layer, each keeps its own middle.
    base = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    tuned = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    steps = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    with torch.no_grad():
        base[0].weight.fill_(10.0)
        base[1].weight.fill_(10.0)
        tuned[0].weight.copy_(base[0].weight + 0.01 * steps)
        tuned[1].weight.copy_(base[1].weight + steps)
    out = Breadcrumbs(drop_small=0.25, drop_large=0.25, scaling=1.0).merge(
        {"base": base, "tuned": tuned}, Context(quiet=True)
    )
    keep = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # the 2nd and 3rd of 1, 2, 3, 4 in each layer
    torch.testing.assert_close(out.model[0].weight, base[0].weight + 0.01 * steps * keep)
    torch.testing.assert_close(out.model[1].weight, base[1].weight + steps * keep)
    np.testing.assert_allclose(out.results["kept"].values, [0.5])


def test_merger_adds_lambda_times_the_sum_of_breadcrumbs() -> None:
    base = nn.Sequential(nn.Flatten(), nn.Linear(10, 1, bias=False))
    with torch.no_grad():
        base[1].weight.fill_(10.0)  # far enough from the task vectors to be their base
    tuned = {}
    for i, tau in enumerate(TAUS):
        model = nn.Sequential(nn.Flatten(), nn.Linear(10, 1, bias=False))
        with torch.no_grad():
            model[1].weight.copy_(base[1].weight + tau.float())
        tuned[f"ft{i}"] = model
    out = Breadcrumbs(drop_small=0.5, drop_large=0.1, scaling=0.5, base="base").merge(
        {"base": base, **tuned}, Context(quiet=True)
    )
    # Row 0 keeps 2, -1, 4, 3; row 1 keeps 1, -2, -0.6, 0.7.
    summed = torch.tensor([[1.0, 0.0, 2.0, 0.0, -1.0, -2.0, 4.0, 0.0, 2.4, 0.7]], dtype=torch.float64)
    torch.testing.assert_close(out.model[1].weight, (base[1].weight.double() + 0.5 * summed).float())
    np.testing.assert_allclose(out.results["kept"].values, [0.4, 0.4])
    assert float(out.results["merged_density"]) == pytest.approx(0.7)


def test_results_describe_and_search() -> None:
    out = Breadcrumbs(scalings=[0.3, 1.0]).merge(example_finetunes(2), Context(data=example_dataset(), quiet=True))
    assert out.results["search_accuracy"].dims == ("scaling",)
    assert Breadcrumbs().describe(out.results).startswith("base 'model0', kept ")


def test_raw_independent_weights_are_rejected() -> None:
    with pytest.raises(ConfigError, match="does not look like a fine-tune"):
        Breadcrumbs().merge(example_models(2), Context(quiet=True))


def test_options() -> None:
    with pytest.raises(ValueError, match=r"'drop_small' must be a number in \[0, 1\)"):
        Breadcrumbs(drop_small=1.0)
    with pytest.raises(ConfigError, match="would remove every entry"):
        Breadcrumbs(drop_small=0.9, drop_large=0.1)
    assert (Breadcrumbs().drop_small, Breadcrumbs().drop_large, Breadcrumbs().scaling) == (0.9, 0.01, 0.3)


@pytest.mark.parametrize("component", [Breadcrumbs, Breadcrumbs(drop_small=0.5, drop_large=0.0)])
def test_conformance(component) -> None:
    check_component(component)
