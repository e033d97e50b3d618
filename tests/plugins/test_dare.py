"""Tests of DARE: drop and rescale worked by hand, its expectation, the merges it feeds, its guards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mergescope.components import Context
from mergescope.errors import ConfigError
from mergescope.task_vectors import example_finetunes
from mergescope.testing import check_component, example_dataset, example_models
from mergescope_plugins.dare import Dare, drop_and_rescale
from mergescope_plugins.ties import ties_merge


def test_drop_and_rescale_keeps_the_drawn_entries_times_one_over_one_minus_p() -> None:
    flat = torch.tensor([[1.0, -2.0, 3.0, -4.0, 5.0, 6.0]], dtype=torch.float64)
    # The draws that decide: an entry survives when its uniform number is >= p.
    draws = torch.rand(flat.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = torch.where(draws >= 0.5, flat * 2.0, torch.zeros_like(flat))
    out = drop_and_rescale(flat, 0.5, torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, expected)
    assert 0 < int((out != 0).sum()) < 6  # some kept, some dropped with this seed


def test_the_rescale_keeps_the_expected_task_vector() -> None:
    flat = torch.full((1, 200_000), 0.25, dtype=torch.float64)
    out = drop_and_rescale(flat, 0.9, torch.Generator().manual_seed(0))
    assert float((out != 0).double().mean()) == pytest.approx(0.1, abs=0.005)
    assert float(out.mean()) == pytest.approx(0.25, rel=0.02)  # E[(1 - m) tau / (1 - p)] = tau


def test_no_drop_is_task_arithmetic_or_ties() -> None:
    flat = torch.tensor([[0.5, -0.1, 0.3], [-0.2, 0.6, 0.1]], dtype=torch.float64)
    summed, _ = Dare(drop_rate=0.0).combine_flat(flat)
    torch.testing.assert_close(summed, flat.sum(dim=0))
    tied, _ = Dare(drop_rate=0.0, then="ties", density=1.0).combine_flat(flat)
    torch.testing.assert_close(tied, ties_merge(flat, 1.0).merged)


def test_merger_adds_lambda_times_the_sparse_sum_to_the_base() -> None:
    base = nn.Sequential(nn.Flatten(), nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        base[1].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    taus = torch.tensor([[0.1, 0.2, -0.3, 0.4], [0.2, -0.1, 0.1, 0.3]], dtype=torch.float64)
    tuned = {}
    for i, tau in enumerate(taus):
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 1, bias=False))
        with torch.no_grad():
            model[1].weight.copy_(base[1].weight + tau.float())
        tuned[f"ft{i}"] = model
    merger = Dare(drop_rate=0.5, seed=3, scaling=0.5, base="base")
    out = merger.merge({"base": base, **tuned}, Context(quiet=True))
    sparse = drop_and_rescale(taus, 0.5, torch.Generator().manual_seed(3))
    expected = base[1].weight.double() + 0.5 * sparse.sum(dim=0)
    torch.testing.assert_close(out.model[1].weight, expected.float())
    np.testing.assert_allclose(out.results["kept"].values, (sparse != 0).double().mean(dim=1).numpy())
    again = Dare(drop_rate=0.5, seed=3, scaling=0.5, base="base").merge({"base": base, **tuned}, Context(quiet=True))
    assert torch.equal(again.model[1].weight, out.model[1].weight)  # the seed decides the drop


def test_results_describe_and_search() -> None:
    models = example_finetunes(2)
    out = Dare(then="ties", scalings=[0.5, 1.0]).merge(models, Context(data=example_dataset(), quiet=True))
    assert out.results["search_accuracy"].dims == ("scaling",)
    np.testing.assert_allclose(out.results["kept"].values, [0.1, 0.1], atol=0.03)
    text = Dare().describe(out.results)
    assert text.startswith("base 'model0', kept ") and "sign conflicts, lambda 1 (best of 2): accuracy" in text


def test_raw_independent_weights_are_rejected() -> None:
    with pytest.raises(ConfigError, match="does not look like a fine-tune"):
        Dare().merge(example_models(2), Context(quiet=True))


def test_options() -> None:
    with pytest.raises(ValueError, match=r"'drop_rate' must be a number in \[0, 1\)"):
        Dare(drop_rate=1.0)
    with pytest.raises(ValueError, match="'then' must be one of 'task-arithmetic', 'ties'"):
        Dare(then="pcb")
    with pytest.raises(ValueError, match=r"'density' must be a number in \(0, 1\]"):
        Dare(density=0.0)
    assert (Dare().drop_rate, Dare().scaling, Dare().then) == (0.9, 0.3, "task-arithmetic")


@pytest.mark.parametrize("component", [Dare, Dare(then="ties", drop_rate=0.5), Dare(scalings=[0.3, 0.6])])
def test_conformance(component) -> None:
    check_component(component)
