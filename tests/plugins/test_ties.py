"""Tests of TIES-Merging: trim / elect / disjoint mean worked by hand, the merger, its guards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mergescope.components import Context, Merger
from mergescope.errors import ConfigError
from mergescope.task_vectors import example_finetunes
from mergescope.testing import check_component, example_dataset, example_models
from mergescope_plugins.ties import Ties, disjoint_mean, elect_signs, ties_merge, trim

# Three task vectors of five entries (rows: models, columns: entries).
TAUS = torch.tensor(
    [
        [0.5, -0.1, 0.3, 0.0, -0.8],
        [-0.2, 0.6, 0.1, -0.4, 0.9],
        [0.4, 0.2, -0.9, 0.05, 0.1],
    ],
    dtype=torch.float64,
)


def test_sign_election_worked_by_hand() -> None:
    # Trim with density 0.4: keep round(0.4 * 5) = 2 entries per row, the largest |tau|.
    #   row 1: |.| = .5 .1 .3 0 .8   -> keep .8 (entry 5) and .5 (entry 1) -> [ .5,  0,   0,  0, -.8]
    #   row 2: |.| = .2 .6 .1 .4 .9  -> keep .9 (entry 5) and .6 (entry 2) -> [  0, .6,   0,  0,  .9]
    #   row 3: |.| = .4 .2 .9 .05 .1 -> keep .9 (entry 3) and .4 (entry 1) -> [ .4,  0, -.9,  0,   0]
    trimmed = trim(TAUS, 0.4)
    expected_trimmed = [[0.5, 0, 0, 0, -0.8], [0, 0.6, 0, 0, 0.9], [0.4, 0, -0.9, 0, 0]]
    np.testing.assert_array_equal(trimmed.numpy(), expected_trimmed)

    # Elect: sign of the column sums of the trimmed vectors.
    #   sums = [.9, .6, -.9, 0, .1] -> signs [+, +, -, 0, +]; the zero column (all trimmed away)
    #   takes the majority of the elected signs, sign(1 + 1 - 1 + 1) = +.
    signs = elect_signs(trimmed)
    np.testing.assert_array_equal(signs.numpy(), [1, 1, -1, 1, 1])

    # Disjoint mean over the non-zero trimmed values that agree with the elected sign:
    #   entry 1: +.5 and +.4 agree with +        -> (.5 + .4) / 2 = .45
    #   entry 2: +.6                             -> .6
    #   entry 3: -.9                             -> -.9
    #   entry 4: nothing kept                    -> 0
    #   entry 5: -.8 disagrees with +, +.9 agrees -> .9   (a plain mean of the trimmed values gives .05)
    merged = disjoint_mean(trimmed, signs)
    np.testing.assert_allclose(merged.numpy(), [0.45, 0.6, -0.9, 0.0, 0.9], rtol=0, atol=1e-15)

    result = ties_merge(TAUS, 0.4)
    assert torch.equal(result.merged, merged) and torch.equal(result.signs, signs)
    np.testing.assert_array_equal(result.kept().numpy(), [0.4, 0.4, 0.4])
    # Kept entries agreeing with the elected sign: row 1 keeps entries 1 (+, agrees) and 5 (-, not);
    # rows 2 and 3 agree on both of theirs.
    np.testing.assert_array_equal(result.agreeing().numpy(), [0.5, 1.0, 1.0])


def test_exact_tie_takes_the_majority_sign_as_the_reference_code() -> None:
    # Column 1: +1 and -1 sum to exactly 0; the elected signs are [0, +, +] -> majority +,
    # so column 1 keeps the +1 (the paper's equations would give 0 here).
    taus = torch.tensor([[1.0, 0.5, 0.2], [-1.0, 0.5, 0.1]], dtype=torch.float64)
    result = ties_merge(taus, 1.0)
    np.testing.assert_array_equal(result.signs.numpy(), [1, 1, 1])
    np.testing.assert_allclose(result.merged.numpy(), [1.0, 0.5, 0.15])


def test_trimming_ranks_over_the_whole_network_not_per_layer() -> None:
    # One fine-tune moves layer 1 by 0.01..0.04 and layer 2 by 0.1..0.4. Density 0.5 keeps
    # 4 of the 8 entries: a global top-k keeps all of layer 2 and none of layer 1 (a per-layer
    # top-k would keep two of each).
    base = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        base[0].weight.fill_(1.0)
        base[1].weight.fill_(1.0)
    tuned = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    steps = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    with torch.no_grad():
        tuned[0].weight.copy_(1.0 + 0.01 * steps)
        tuned[1].weight.copy_(1.0 + 0.1 * steps)
    out = Ties(density=0.5).merge({"base": base, "tuned": tuned}, Context(quiet=True))
    assert torch.equal(out.model[0].weight, base[0].weight)
    assert torch.equal(out.model[1].weight, tuned[1].weight)
    flat = torch.tensor([[0.01, 0.02, 0.03, 0.04, 0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    np.testing.assert_array_equal(trim(flat, 0.5).numpy(), [[0, 0, 0, 0, 0.1, 0.2, 0.3, 0.4]])


def two_layer(weights: list[list[float]]) -> nn.Sequential:
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 1, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor(weights))
    return model


def test_merger_applies_the_hand_worked_merge() -> None:
    base_w = [[1.0, 2.0, -1.0, 0.5, 3.0]]
    base = two_layer(base_w)
    tuned = {f"ft{i}": two_layer((torch.tensor(base_w) + TAUS[i].float()).tolist()) for i in range(3)}
    out = Ties(density=0.4, scaling=0.5, base="base").merge({**tuned, "base": base}, Context(quiet=True))
    # theta = base + 0.5 * [.45, .6, -.9, 0, .9]
    expected = torch.tensor(base_w, dtype=torch.float64) + 0.5 * torch.tensor([[0.45, 0.6, -0.9, 0.0, 0.9]])
    torch.testing.assert_close(out.model[1].weight, expected.float())
    res = out.results
    assert list(res["model"].values) == ["ft0", "ft1", "ft2"]
    np.testing.assert_allclose(res["kept"].values, [0.4, 0.4, 0.4])
    np.testing.assert_allclose(res["agreeing"].values, [0.5, 1.0, 1.0])
    assert float(res["sign_conflicts"]) == pytest.approx(0.2)  # entry 5 of 5
    assert float(res["merged_density"]) == pytest.approx(0.8)  # entry 4 unchanged
    np.testing.assert_array_equal(res["coefficient"].values, [0.5, 0.5, 0.5])


def test_density_one_and_agreeing_vectors_give_their_mean() -> None:
    # No trimming and no conflict: the disjoint mean is the plain mean of the task vectors.
    taus = torch.tensor([[1.0, -2.0, 0.0], [3.0, -4.0, 1.0]], dtype=torch.float64)
    np.testing.assert_allclose(ties_merge(taus, 1.0).merged.numpy(), [2.0, -3.0, 1.0])


def test_results_describe_and_search() -> None:
    models = example_finetunes(2)
    data = example_dataset()
    out = Ties(scalings=[0.5, 1.0]).merge(models, Context(data=data, quiet=True))
    res = out.results
    assert res["search_accuracy"].dims == ("scaling",)
    assert float(res["merged_scaling"]) in (0.5, 1.0)
    np.testing.assert_allclose(res["kept"].values, [0.2, 0.2], atol=0.01)
    merger = Ties()
    assert isinstance(merger, Merger)
    text = merger.describe(merger.merge(models, Context(data=data, quiet=True)).results)
    assert text.startswith("base 'model0', kept 20% of each task vector, ") and "accuracy" in text


def test_raw_independent_weights_are_rejected() -> None:
    with pytest.raises(ConfigError, match="'model1' does not look like a fine-tune.*ties merges task vectors"):
        Ties().merge(example_models(2), Context(quiet=True))


def test_options() -> None:
    with pytest.raises(ValueError, match=r"'density' must be a number in \(0, 1\]"):
        Ties(density=0.0)
    with pytest.raises(ValueError, match=r"'density' must be a number in \(0, 1\]"):
        Ties(density=1.5)
    with pytest.raises(ValueError, match="exclude each other"):
        Ties(scaling=0.7, scalings=[0.5, 1.0])
    assert Ties().density == 0.2 and Ties().scaling == 1.0


@pytest.mark.parametrize("component", [Ties, Ties(density=0.5, scaling=0.8), Ties(scalings=[0.8, 1.0])])
def test_conformance(component) -> None:
    check_component(component)
