from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from mergescope.errors import ConfigError
from mergescope.options import structure_options
from mergescope.testing import check_component
from mergescope_plugins import categories as categories_module
from mergescope_plugins.categories import (
    CATEGORIES,
    ChannelCategories,
    categorise,
    classify_merge,
    classify_models,
    gather_scores,
)

T = 0.5
HI, LO = 0.9, 0.1


def metric_node(scores, models, reference, layer, variable="kendall_tau"):
    """One layer of a metric step, built as the runner's ``_score`` builds it."""
    parts = [
        xr.DataArray(np.asarray(row, dtype=float), dims="unit", coords={"unit": np.arange(len(row))}, name=variable)
        .assign_coords(model=m, reference=reference, layer=layer)
        for row, m in zip(scores, models)
    ]
    ds = xr.concat(parts, dim="model").to_dataset(name=variable)
    if ds.sizes["model"] > 1:
        ds[f"{variable}_mean"] = ds[variable].mean("model")
        ds[f"{variable}_std"] = ds[variable].std("model")
    return ds


# 4 models aligned to "a"; unit by unit: all, 3 of 4, 2 of 4, 1 of 4, none, undefined
FIVE = np.array(
    [
        [HI, HI, HI, HI, LO, np.nan],
        [HI, HI, HI, LO, LO, np.nan],
        [HI, HI, LO, LO, LO, np.nan],
        [HI, LO, LO, LO, LO, np.nan],
    ]
)
ALIGNED = ["b@wm", "c@wm", "d@wm", "e@wm"]


def five_models_tree():
    return xr.DataTree.from_dict(
        {
            "kendall-tau/relu1": metric_node(FIVE, ALIGNED, "a", "relu1"),
            "kendall-tau/relu2": metric_node(FIVE[:, :3], ALIGNED, "a", "relu2"),
            "wm": xr.Dataset({"matched": 0.5}),
        }
    )


def test_classify_models_counts_how_many_models_match():
    codes = classify_models(FIVE, T, exceptions=2)
    names = CATEGORIES["n-models"]
    assert [names[c] for c in codes] == [
        "all similar",
        "most similar",
        "most similar",
        "all dissimilar",
        "all dissimilar",
        "undefined",
    ]
    assert classify_models(FIVE, T, exceptions=1).tolist() == [0, 1, 2, 2, 2, 3]
    # one compared model: similar or not; lower-is-similar flips the test
    assert classify_models(np.array([[0.7, 0.2, np.nan]]), T).tolist() == [0, 2, 3]
    assert classify_models(np.array([[0.7, 0.2]]), T, higher=False).tolist() == [2, 0]
    # a NaN among defined scores counts as not similar
    assert classify_models(np.array([[HI, HI], [np.nan, HI]]), T, exceptions=1).tolist() == [1, 0]


def test_classify_merge_follows_observation_2():
    s1 = np.array([HI, LO, HI, LO, np.nan, np.nan])
    s2 = np.array([LO, HI, HI, LO, HI, np.nan])
    names = CATEGORIES["merge"]
    assert [names[c] for c in classify_merge(s1, s2, T)] == [
        "model 1 dominates",
        "model 2 dominates",
        "both",
        "neither",
        "model 2 dominates",
        "undefined",
    ]


def test_n_models_fractions_per_layer_and_overall(tmp_path):
    files = ChannelCategories(metric="kendall-tau").render(five_models_tree(), tmp_path / "out")
    assert [f.name for f in files] == ["categories.nc", "categories.png"]
    assert all(f.stat().st_size > 0 for f in files)
    ds = xr.open_dataset(files[0]).load()
    assert list(ds["layer"].values) == ["relu1", "relu2"]
    assert list(ds["category"].values) == list(CATEGORIES["n-models"])
    assert list(ds["compared"].values) == ALIGNED and ds["reference"].item() == "a"
    count = ds["category_count"]
    assert count.sel(layer="relu1").values.tolist() == [1, 2, 2, 1]
    assert count.sel(layer="relu2").values.tolist() == [1, 2, 0, 0]
    np.testing.assert_allclose(ds["category_fraction"].sel(layer="relu1"), [1 / 6, 2 / 6, 2 / 6, 1 / 6])
    np.testing.assert_allclose(ds["category_fraction"].sel(layer="relu2"), [1 / 3, 2 / 3, 0, 0])
    np.testing.assert_allclose(ds["total_fraction"], [2 / 9, 4 / 9, 2 / 9, 1 / 9])
    assert ds["unit_category"].sel(layer="relu2").values.tolist() == [0, 1, 1, -1, -1, -1]
    assert ds["variable"].item() == "kendall_tau" and ds["similar_is"].item() == ">="
    assert ChannelCategories().describe(ds) == (
        "9 channels in 2 layers: 22% all similar, 44% most similar, 22% all dissimilar, 11% undefined"
    )


def test_the_variable_and_step_are_found_when_there_is_one():
    ds = ChannelCategories().categories(five_models_tree())  # no metric, no variable given
    assert ds["metric_step"].item() == "kendall-tau" and ds["variable"].item() == "kendall_tau"
    tree = five_models_tree()
    tree["correlation/relu1"] = xr.DataTree(metric_node(FIVE, ALIGNED, "a", "relu1", "correlation"))
    with pytest.raises(ConfigError, match="several steps.*correlation, kendall-tau|several steps.*kendall-tau"):
        ChannelCategories().categories(tree)
    with pytest.raises(ConfigError, match="no step 'kendal-tau'.*Did you mean 'kendall-tau'"):
        ChannelCategories(metric="kendal-tau").categories(tree)
    with pytest.raises(ConfigError, match="variable"):
        ChannelCategories(metric="kendall-tau", variable="tau").categories(tree)
    assert ChannelCategories().categories(xr.DataTree.from_dict({"wm": xr.Dataset({"x": 1})})).data_vars == {}


def test_threshold_direction_and_exceptions():
    tree = five_models_tree()
    strict = ChannelCategories(exceptions=1).categories(tree)["category_count"].sel(layer="relu1")
    assert strict.values.tolist() == [1, 1, 3, 1]
    low = ChannelCategories(similar=0.05).categories(tree)["category_count"].sel(layer="relu1")
    assert low.values.tolist() == [5, 0, 0, 1]
    lower = ChannelCategories(direction="lower").categories(tree)["category_count"].sel(layer="relu1")
    assert lower.values.tolist() == [1, 2, 2, 1]  # the table is symmetric under swapping HI and LO
    clip = xr.DataTree.from_dict({"clip-delta/relu1": metric_node([[0.1, 0.9]], ["b@wm"], "a", "relu1", "clip_delta")})
    ds = ChannelCategories().categories(clip)  # auto: lower CLIP-δ is more alike
    assert ds["unit_category"].values.tolist() == [[0, 2]] and ds["similar_is"].item() == "<="


def test_merge_mode_from_one_step_with_both_parents(tmp_path):
    s_a = [HI, LO, HI, LO]
    s_b = [LO, HI, HI, LO]
    tree = xr.DataTree.from_dict({"tau/relu1": metric_node([s_a, s_b], ["a", "b@wm"], "avg", "relu1")})
    visualizer = ChannelCategories(mode="merge")
    ds = visualizer.categories(tree)
    assert list(ds["compared"].values) == ["a", "b@wm"] and ds["reference"].item() == "avg"
    assert ds["category_count"].sel(layer="relu1").values.tolist() == [1, 1, 1, 1, 0]
    swapped = ChannelCategories(mode="merge", parents=["b@wm", "a"]).categories(tree)
    assert swapped["unit_category"].values.tolist() == [[1, 0, 2, 3]]
    assert visualizer.render(tree, tmp_path)[1].name == "categories.png"


def test_merge_mode_joining_one_step_per_parent():
    # each parent is the reference of its own step, the merge the compared model
    tree = xr.DataTree.from_dict(
        {
            "tau-a/relu1": metric_node([[HI, LO, LO]], ["avg"], "a", "relu1"),
            "tau-b/relu1": metric_node([[HI, HI, LO]], ["avg"], "b@wm", "relu1"),
        }
    )
    ds = ChannelCategories(metric="tau-a", join=["tau-b"], mode="merge").categories(tree)
    assert list(ds["compared"].values) == ["a", "b@wm"] and ds["reference"].item() == "avg"
    assert ds["unit_category"].values.tolist() == [[2, 1, 3]]
    with pytest.raises(ConfigError, match="parent 'c'"):
        ChannelCategories(metric="tau-a", join=["tau-b"], mode="merge", parents=["a", "c"]).categories(tree)
    other = tree.copy()
    other["tau-b/relu1"] = xr.DataTree(metric_node([[HI, HI, LO]], ["ties"], "b@wm", "relu1"))
    with pytest.raises(ConfigError, match="same merged model"):
        ChannelCategories(metric="tau-a", join=["tau-b"], mode="merge").categories(other)
    three = five_models_tree()
    with pytest.raises(ConfigError, match="4 comparisons.*'parents'"):
        ChannelCategories(mode="merge").categories(three)


def test_a_unit_only_variable_is_one_compared_model():
    tree = xr.DataTree.from_dict({"metric/layer": xr.Dataset({"score": ("unit", [0.7, 0.1, np.nan])})})
    ds = ChannelCategories().categories(tree)
    assert ds["unit_category"].values.tolist() == [[0, 2, 3]] and list(ds["compared"].values) == ["metric"]
    variable, scores = gather_scores(tree, ["metric"])
    assert variable == "score" and scores["layer"].dims == ("comparison", "unit")


def test_categorise_without_layers_is_empty():
    ds = categorise({}, "n-models", T)
    assert ds.sizes["layer"] == 0 and np.isnan(ds["total_fraction"]).all()


def test_bad_options():
    for options, key in (
        ({"mode": "pairs"}, "mode"),
        ({"direction": "up"}, "direction"),
        ({"exceptions": -1}, "exceptions"),
        ({"parents": ["a"]}, "parents"),
        ({"similar": float("nan")}, "similar"),
    ):
        with pytest.raises(ConfigError, match=key):
            structure_options(ChannelCategories, options)


def test_conformance():
    check_component(ChannelCategories)


def test_in_a_pipeline_the_categories_join_the_step_results(fresh_registry, tmp_path):
    import torch

    from mergescope import Pipeline, run
    from mergescope.pipeline import ModelSpec, Step
    from mergescope.storage import load_tree
    from mergescope_plugins.zoo import MLP

    registry = fresh_registry.get_registry()
    if "channel-categories" not in registry.names("visualizer"):
        fresh_registry.register_plugin(categories_module, name="categories-under-test")
        registry = fresh_registry.get_registry()
    data = registry.get("dataset", "digits")(split="test", per_class=8)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(ModelSpec(f"m{seed}", module=MLP(hidden=[6]).build((1, 8, 8), 10).eval()))
    pipeline = Pipeline(
        data=data,
        models=models,
        steps=[
            Step(registry.get("aligner", "activation-matching")(), name="am", models=["m0", "m1", "m2"]),
            Step(
                registry.get("metric", "kendall-tau")(), name="tau", models=["m0", "m1@am", "m2@am"], layers=["relu1"]
            ),
            Step(ChannelCategories(metric="tau", similar=0.3), name="categories"),
        ],
    )
    result = run(pipeline, tmp_path / "run", quiet=True)
    node = load_tree(tmp_path / "run" / "results.nc")["categories"].to_dataset(inherit=False)
    assert {"files", "unit_category", "category_fraction"} <= set(node.data_vars)
    assert node["category_count"].sel(layer="relu1").sum() == 6
    assert list(node["compared"].values) == ["m1@am", "m2@am"] and node["reference"].item() == "m0"
    assert "categories (channel-categories): 6 channels in 1 layer: " in result.summary
