"""Weight matching with and without the BatchNorm running statistics in the matching cost."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from mergescope import Context
from mergescope.errors import ConfigError
from mergescope.groups import align_to_reference, channel_groups, example_input, perm_from_matrix, permute
from mergescope.keys import cache_key
from mergescope.options import structure_options
from mergescope.testing import example_dataset
from mergescope_plugins.weight_matching import WeightMatching
from mergescope_plugins.zoo import SmallCNN


def _toy(running_mean: list[float]) -> nn.Module:
    """flatten -> linear(2 -> 2) -> BatchNorm1d(2) -> relu -> linear(2 -> 1) with hand-set weights.

    Only ``bn.running_mean`` differs between the two models built here.
    """
    model = nn.Sequential(
        OrderedDict(flat=nn.Flatten(), fc1=nn.Linear(2, 2), bn=nn.BatchNorm1d(2), relu=nn.ReLU(), fc2=nn.Linear(2, 1))
    ).eval()
    with torch.no_grad():
        model.fc1.weight.copy_(2 * torch.eye(2))
        model.fc1.bias.zero_()
        model.bn.weight.fill_(1.0)
        model.bn.bias.zero_()
        model.bn.running_var.fill_(1.0)
        model.bn.running_mean.copy_(torch.tensor(running_mean))
        model.fc2.weight.fill_(1.0)
        model.fc2.bias.zero_()
    return model


@pytest.fixture(scope="module")
def flat_data():
    return example_dataset(n=8, shape=(2, 1, 1))


@pytest.mark.parametrize("statistics, expected", [(True, [1, 0]), (False, [0, 1])])
def test_running_statistics_pull_the_toy_assignment_their_way(flat_data, statistics, expected):
    # The one group (fc1's outputs) has two units; score[i, j] sums, over every tensor
    # axis of the group, ref's entry i times other's entry j:
    #   fc1.weight (2 I in both) -> [[4, 0], [0, 4]]     fc1.bias, bn.bias (0) -> 0
    #   bn.weight, bn.running_var, fc2.weight (all 1) -> [[1, 1], [1, 1]] each
    #   bn.running_mean ([4, 0] in ref, [0, 4] in other) -> [[0, 16], [0, 0]]
    # Affine only: [[6, 2], [2, 6]]: keeping the order scores 12, swapping 4.
    # With the statistics: [[7, 19], [3, 7]]: keeping scores 14, swapping 22.
    ref, other = _toy([4.0, 0.0]), _toy([0.0, 4.0])
    aligner = WeightMatching(batchnorm_statistics=statistics)
    alignment = aligner.align({"ref": ref, "other": other}, "ref", Context(data=flat_data, quiet=True))
    assert perm_from_matrix(alignment.transforms["other"]["fc1"]).tolist() == expected
    # The statistics move with their channels either way.
    groups = channel_groups(ref, example_input(flat_data))
    aligned = align_to_reference({"ref": ref, "other": other}, alignment, groups)["other"]
    assert aligned.bn.running_mean.tolist() == ([4.0, 0.0] if statistics else [0.0, 4.0])


@pytest.mark.parametrize("statistics, expected", [(True, [1, 0]), (False, [0, 1])])
def test_merge_many_also_follows_the_option(flat_data, statistics, expected):
    # Two models: MergeMany matches each to the other, the same toy cost as above.
    ref, other = _toy([4.0, 0.0]), _toy([0.0, 4.0])
    aligner = WeightMatching(strategy="merge-many", batchnorm_statistics=statistics)
    alignment = aligner.align({"ref": ref, "other": other}, "ref", Context(data=flat_data, quiet=True))
    assert perm_from_matrix(alignment.transforms["other"]["fc1"]).tolist() == expected


@pytest.mark.parametrize("statistics", [True, False])
def test_a_hidden_permutation_is_recovered_either_way(statistics):
    data = example_dataset(n=32, shape=(1, 8, 8))
    torch.manual_seed(0)
    model = SmallCNN(widths=[8, 16], batchnorm=True).build((1, 8, 8), 3).eval()
    groups = channel_groups(model, example_input(data))
    rng = np.random.default_rng(1)
    perms = {g.name: rng.permutation(g.size) for g in groups}
    other = permute(model, perms, groups)
    alignment = WeightMatching(batchnorm_statistics=statistics).align(
        {"ref": model, "other": other}, "ref", Context(data=data, quiet=True)
    )
    for g in groups:
        found = perm_from_matrix(alignment.transforms["other"][g.name])
        np.testing.assert_array_equal(perms[g.name][found], np.arange(g.size))


def test_statistics_count_by_default_and_the_option_is_part_of_the_cache_key():
    assert WeightMatching().batchnorm_statistics is True
    assert cache_key(WeightMatching(batchnorm_statistics=True)) != cache_key(WeightMatching(batchnorm_statistics=False))
    assert cache_key(WeightMatching()) == cache_key(WeightMatching(batchnorm_statistics=True))


def test_a_non_boolean_value_names_the_key():
    with pytest.raises(ConfigError, match="batchnorm_statistics"):
        structure_options(WeightMatching, {"batchnorm_statistics": "no"})


@pytest.mark.parametrize("strategy", ["reference", "merge-many"])
def test_moved_units_count_what_the_permutations_move(strategy):
    from mergescope.testing import example_models

    data = example_dataset()
    model = example_models(1)["model0"]
    groups = channel_groups(model, example_input(data))
    (group,) = groups
    perm = np.array([1, 0, 2, 3, 4, 5, 7, 6])  # four units out of place
    shuffled = permute(model, {group.name: perm}, groups)
    models = {"a": model, "same": model, "shuffled": shuffled}
    result = WeightMatching(strategy=strategy).align(models, "a", Context(data=data, quiet=True))
    moved = result.diagnostics["moved_units"]
    assert int(moved.sel(model="same", group=group.name)) == 0
    assert int(moved.sel(model="shuffled", group=group.name)) == 4
    assert int(result.diagnostics["units"].sel(group=group.name)) == 8
    assert "25% of units moved" in WeightMatching(strategy=strategy).describe(result.diagnostics)
