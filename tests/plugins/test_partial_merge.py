from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from mergescope import Context
from mergescope.batchnorm import reset_batchnorm
from mergescope.errors import ConfigError, UnknownComponentError
from mergescope.groups import channel_groups, example_input
from mergescope.options import structure_options
from mergescope.states import average_states
from mergescope.testing import check_component, example_dataset
from mergescope_plugins import partial_merge as partial_merge_module
from mergescope_plugins.partial_merge import (
    PartialMerge,
    channel_masks,
    merge_channels,
    rank_channels,
    selection_size,
)
from mergescope_plugins.zoo import MLP, SmallCNN

HIDDEN = 8
SAME = [0, 1, 2, 3]  # hidden units where model b equals model a


@pytest.fixture(scope="module")
def data():
    return example_dataset(n=96, shape=(1, 4, 4))


@pytest.fixture(scope="module")
def pair(data):
    """Model a, trained; model b equal to a on units SAME and a scrambled copy elsewhere."""
    torch.manual_seed(0)
    a = MLP(hidden=[HIDDEN]).build((1, 4, 4), 3)
    labels = torch.as_tensor(data.labels)
    for _ in range(150):  # plain gradient descent: a few milliseconds per step
        a.zero_grad()
        nn.functional.cross_entropy(a(data.images), labels).backward()
        with torch.no_grad():
            for p in a.parameters():
                p -= 0.1 * p.grad
    a.eval()
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        other = [u for u in range(HIDDEN) if u not in SAME]
        b.fc1.weight[other] = 3 * torch.randn(len(other), 16, generator=g)
        b.fc1.bias[other] = torch.randn(len(other), generator=g)
        b.head.weight.add_(0.5 * torch.randn(b.head.weight.shape, generator=g))
    return a, b


def context(data):
    return Context(data=data, batch_size=1000, quiet=True)


# ----------------------------------------------------------------- pure functions


def test_ranking_puts_nan_last_and_keeps_ties_in_channel_order():
    scores = np.array([0.5, np.nan, 0.9, 0.5, -0.2])
    assert rank_channels(scores, "top").tolist() == [2, 0, 3, 4, 1]
    assert rank_channels(scores, "bottom").tolist() == [4, 0, 3, 2, 1]
    drawn = rank_channels(scores, "random", np.random.default_rng(0))
    assert sorted(drawn.tolist()) == [0, 1, 2, 3, 4]
    assert drawn.tolist() == rank_channels(scores, "random", np.random.default_rng(0)).tolist()
    with pytest.raises(ValueError, match="order"):
        rank_channels(scores, "middle")


def test_selection_size_rounds_to_the_nearest_channel():
    assert [selection_size(f, 10) for f in (0.0, 0.1, 0.25, 0.3, 1.0)] == [0, 1, 3, 3, 10]
    assert [selection_size(f, 8) for f in (0.1, 0.5, 0.9)] == [1, 4, 7]


def test_a_channel_owns_its_filter_and_batchnorm_entries_not_the_next_layers_columns():
    model = SmallCNN(widths=[4, 6], batchnorm=True).build((1, 8, 8), 3)
    groups = channel_groups(model, torch.randn(2, 1, 8, 8))
    masks = channel_masks(model.state_dict(), groups, {"conv1": np.array([2])})
    assert masks["conv1.weight"][2].all() and masks["conv1.weight"].sum() == masks["conv1.weight"][2].numel()
    for key in ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):
        assert masks[key].tolist() == [False, False, True, False]
    assert not masks["conv2.weight"].any() and not masks["head.weight"].any()
    assert not masks["bn1.num_batches_tracked"].any()


def test_merging_channels_is_exact_at_both_ends():
    torch.manual_seed(0)
    a, b = (MLP(hidden=[5]).build((1, 2, 2), 3).state_dict() for _ in range(2))
    none = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in a.items()}
    every = {k: torch.ones(v.shape, dtype=torch.bool) for k, v in a.items()}
    for key, value in merge_channels(a, b, none, 0.3).items():
        assert torch.equal(value, a[key])
    full = average_states([a, b], [0.7, 0.3])
    for key, value in merge_channels(a, b, every, 0.3).items():
        assert torch.equal(value, full[key])


# --------------------------------------------------------------------- the merger


def test_merging_the_most_similar_channels_first_keeps_model_1(pair, data):
    a, b = pair
    merger = PartialMerge(fractions=[0.5, 1.0], orders=["top", "bottom"], unranked="first")
    result = merger.merge({"a": a, "b": b}, context(data))
    ds = result.results
    score = ds["score"].sel(group="fc1").values
    np.testing.assert_allclose(score[SAME], 1.0)  # identical units
    assert (score[4:] < 0.9).all()
    # top 50% = the identical units: merging them changes nothing (the head stays a's)
    top, bottom = ds["loss"].sel(order="top", fraction=0.5), ds["loss"].sel(order="bottom", fraction=0.5)
    assert float(top) == pytest.approx(float(ds["endpoint_loss"].sel(endpoint="a")), abs=1e-6)
    assert float(ds["accuracy"].sel(order="top", fraction=0.5)) == float(ds["endpoint_accuracy"].sel(endpoint="a"))
    assert float(bottom) > float(top) + 0.05
    # at 100% both orders merge every channel: the same model
    assert ds["loss"].sel(fraction=1.0).values[0] == ds["loss"].sel(fraction=1.0).values[1]
    assert ds["merged_channels"].sel(group="fc1").values.tolist() == [4, 8]
    assert ds["merged_share"].values.tolist() == [0.5, 1.0]
    assert np.isnan(ds["accuracy_std"]).all()
    assert "seed" not in ds.dims and "random_accuracy" not in ds
    # the returned model: the first order at the largest fraction
    expected = merge_channels(
        a.state_dict(),
        b.state_dict(),
        channel_masks(a.state_dict(), channel_groups(a, example_input(data)), {"fc1": np.arange(8)}),
        0.5,
    )
    got = result.model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_fraction_zero_is_model_1_and_fraction_one_the_full_interpolation(pair, data):
    a, b = pair
    first = PartialMerge(fractions=[0.0], orders=["bottom"], unranked="first", alpha=0.3)
    model = first.merge({"a": a, "b": b}, context(data)).model
    assert all(torch.equal(model.state_dict()[k], v) for k, v in a.state_dict().items())
    full = PartialMerge(fractions=[1.0], orders=["random"], seeds=[5], alpha=0.3)
    model = full.merge({"a": a, "b": b}, context(data)).model
    expected = average_states([a.state_dict(), b.state_dict()], [0.7, 0.3])
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)
    # with unranked = "merge" (default) the classifier is merged even at 0%
    zero = PartialMerge(fractions=[0.0], orders=["top"]).merge({"a": a, "b": b}, context(data)).model
    assert torch.equal(zero.state_dict()["fc1.weight"], a.state_dict()["fc1.weight"])
    assert not torch.equal(zero.state_dict()["head.weight"], a.state_dict()["head.weight"])


def test_random_baseline_statistics_and_determinism(pair, data):
    a, b = pair
    merger = PartialMerge(fractions=[0.25, 0.5], orders=["random", "top"], seeds=[0, 1, 2])
    first = merger.merge({"a": a, "b": b}, context(data)).results
    second = merger.merge({"a": a, "b": b}, context(data)).results
    assert first.identical(second)
    assert first["random_accuracy"].dims == ("seed", "fraction") and first.sizes["seed"] == 3
    np.testing.assert_allclose(
        first["accuracy"].sel(order="random").values, first["random_accuracy"].mean("seed").values
    )
    np.testing.assert_allclose(
        first["accuracy_std"].sel(order="random").values, first["random_accuracy"].std("seed").values
    )
    assert np.isnan(first["accuracy_std"].sel(order="top")).all()
    assert merger.describe(first).startswith("accuracy merging 25% -> 50% of channels by kendall-tau: random ")


def test_batchnorm_statistics_are_recomputed_after_merging(data):
    arch = SmallCNN(widths=[4, 6], batchnorm=True)
    torch.manual_seed(0)
    a = arch.build((1, 4, 4), 3).eval()
    torch.manual_seed(1)
    b = arch.build((1, 4, 4), 3).eval()
    merged = PartialMerge(fractions=[1.0], orders=["top"]).merge({"a": a, "b": b}, context(data)).model
    expected = copy.deepcopy(a)
    expected.load_state_dict(average_states([a.state_dict(), b.state_dict()], [0.5, 0.5]))
    reset_batchnorm(expected, data, batch_size=1000)
    for key, value in expected.state_dict().items():
        assert torch.allclose(merged.state_dict()[key].double(), value.double(), atol=1e-6), key
    kept = PartialMerge(fractions=[1.0], orders=["top"], reset_batchnorm=False)
    state = kept.merge({"a": a, "b": b}, context(data)).model.state_dict()
    averaged = average_states([a.state_dict(), b.state_dict()], [0.5, 0.5])
    assert torch.equal(state["bn1.running_mean"], averaged["bn1.running_mean"])


def test_groups_restrict_what_is_ranked(data):
    arch = MLP(hidden=[6, 5])
    torch.manual_seed(0)
    a = arch.build((1, 4, 4), 3).eval()
    torch.manual_seed(1)
    b = arch.build((1, 4, 4), 3).eval()
    result = PartialMerge(fractions=[1.0], orders=["top"], groups=["fc2"], unranked="first").merge(
        {"a": a, "b": b}, context(data)
    )
    assert result.results["group"].values.tolist() == ["fc2"]
    state = result.model.state_dict()
    assert torch.equal(state["fc1.weight"], a.state_dict()["fc1.weight"])  # not ranked: kept as model 1
    assert not torch.equal(state["fc2.weight"], a.state_dict()["fc2.weight"])
    with pytest.raises(ConfigError, match="no channel group matches 'fc3'.*fc1, fc2"):
        PartialMerge(groups=["fc3"]).merge({"a": a, "b": b}, context(data))


def test_an_alignment_is_applied_before_ranking(pair, data):
    from mergescope.groups import permute
    from mergescope_plugins.activation_matching import ActivationMatching

    a, b = pair
    shuffled = permute(b, {"fc1": np.random.default_rng(0).permutation(HIDDEN)}, channel_groups(b, example_input(data)))
    alignment = ActivationMatching().align({"a": a, "b": shuffled}, "a", context(data))
    merger = PartialMerge(fractions=[0.5], orders=["top"], unranked="first")
    aligned = merger.merge({"a": a, "b": shuffled}, context(data), alignment=alignment).results
    direct = merger.merge({"a": a, "b": b}, context(data)).results
    xr.testing.assert_identical(aligned.drop_vars("score"), direct.drop_vars("score"))
    np.testing.assert_allclose(aligned["score"].sel(group="fc1").values[SAME], 1.0)


def test_metric_options_reach_the_metric(pair, data):
    a, b = pair
    merger = PartialMerge(metric="kendall-tau", metric_options={"per_class": 4}, fractions=[1.0], orders=["top"])
    assert merger.make_metric().per_class == 4
    ds = merger.merge({"a": a, "b": b}, context(data)).results
    np.testing.assert_allclose(ds["score"].sel(group="fc1").values[SAME], 1.0)
    with pytest.raises(ConfigError, match="per_clas.*kendall-tau"):
        PartialMerge(metric_options={"per_clas": 4}).make_metric()
    with pytest.raises(UnknownComponentError, match="kendall-tau"):
        PartialMerge(metric="kendal-tau").merge({"a": a, "b": b}, context(data))


def test_bad_options_and_inputs(pair, data):
    a, b = pair
    for options, key in (
        ({"fractions": [0.5, 1.5]}, "fractions"),
        ({"fractions": []}, "fractions"),
        ({"orders": ["top", "middle"]}, "orders"),
        ({"orders": ["random"], "seeds": []}, "seeds"),
        ({"alpha": 2.0}, "alpha"),
        ({"unranked": "second"}, "unranked"),
    ):
        with pytest.raises(ConfigError, match=key):
            structure_options(PartialMerge, options)
    with pytest.raises(ConfigError, match="merges two models"):
        PartialMerge().merge({"a": a}, context(data))
    with pytest.raises(ConfigError, match="needs \\[data\\]"):
        PartialMerge().merge({"a": a, "b": b}, Context())


def test_conformance():
    check_component(PartialMerge)


def test_in_a_pipeline_after_an_aligner(fresh_registry, tmp_path):
    from mergescope import Pipeline, run
    from mergescope.groups import permute
    from mergescope.pipeline import ModelSpec, Step
    from mergescope.storage import load_tree

    registry = fresh_registry.get_registry()
    if "partial-merge" not in registry.names("merger"):
        fresh_registry.register_plugin(partial_merge_module, name="partial-merge-under-test")
        registry = fresh_registry.get_registry()
    data = registry.get("dataset", "digits")(split="test", per_class=8)
    torch.manual_seed(0)
    a = MLP(hidden=[HIDDEN]).build((1, 8, 8), 10).eval()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.fc1.weight[4:] = torch.randn(HIDDEN - 4, 64)
    groups = channel_groups(b, torch.randn(2, 1, 8, 8))
    shuffled = permute(b, {"fc1": np.random.default_rng(0).permutation(HIDDEN)}, groups)
    pipeline = Pipeline(
        data=data,
        models=[ModelSpec("a", module=a), ModelSpec("b", module=shuffled)],
        steps=[
            Step(registry.get("aligner", "activation-matching")(), name="am", models=["a", "b"]),
            Step(
                PartialMerge(fractions=[0.5, 1.0], orders=["top", "random"], seeds=[0]), name="pm", models=["a", "b@am"]
            ),
        ],
    )
    result = run(pipeline, tmp_path / "run", quiet=True)
    saved = load_tree(tmp_path / "run" / "results.nc")["pm"].to_dataset(inherit=False)
    assert saved["accuracy"].dims == ("order", "fraction") and saved["random_accuracy"].dims == ("seed", "fraction")
    assert list(saved["endpoint"].values) == ["a", "b@am"] and str(saved["metric"].values) == "kendall-tau"
    # the aligner undid the shuffle, so the four identical units score 1 again
    assert np.isclose(saved["score"].sel(group="fc1").values, 1.0).sum() == 4
    assert "pm" in result.models
    assert "pm (partial-merge): accuracy merging 50% -> 100% of channels by kendall-tau: top" in result.summary
