from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import xarray as xr

import mergescope_plugins.lasso as lasso_module
from mergescope import ConfigError, Context
from mergescope.groups import channel_groups, example_input, permute
from mergescope.options import structure_options
from mergescope.testing import check_component, example_dataset
from mergescope_plugins.lasso import (
    RegressionAlignment,
    fit_regression,
    jaccard,
    r2_score,
    sparsity_levels,
    truncate_coefficients,
)
from mergescope_plugins.zoo import MLP, SmallCNN

# ------------------------------------------------------------------------- kernels


def _sparse_problem(seed: int = 0):
    """Targets that are exact sparse combinations of inputs of different scales and means."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 12)) * rng.uniform(0.5, 3, size=12) + rng.normal(size=12)
    w = np.zeros((12, 5))
    w[[0, 3], 0] = [2.0, -1.0]
    w[5, 1] = 0.5
    w[[7, 8, 11], 2] = [1.5, 1.0, -2.0]
    w[1, 3] = 3.0
    w[[2, 10], 4] = [-0.7, 0.4]
    b = rng.normal(size=5)
    return x, w, b, x @ w + b


def test_ols_recovers_an_exact_linear_map():
    x, w, b, y = _sparse_problem()
    fit = fit_regression(x, y, "ols")
    np.testing.assert_allclose(fit.coef, w, atol=1e-9)
    np.testing.assert_allclose(fit.intercept, b, atol=1e-9)
    np.testing.assert_allclose(r2_score(y, x @ fit.coef + fit.intercept), 1.0)


def test_lasso_with_a_small_alpha_finds_the_support():
    x, w, b, y = _sparse_problem()
    fit = fit_regression(x, y, "lasso", alpha=1e-3)
    np.testing.assert_array_equal(fit.coef != 0, w != 0)
    np.testing.assert_allclose(fit.coef, w, atol=0.02)
    np.testing.assert_allclose(fit.intercept, b, atol=0.02)
    # A stronger penalty keeps fewer coefficients.
    assert (fit_regression(x, y, "lasso", alpha=0.3).coef != 0).sum() < (w != 0).sum()


def test_truncation_keeps_the_largest_contributions():
    coef = np.array([[1.0, -3.0], [-2.0, 0.5], [0.5, 0.0]])
    np.testing.assert_array_equal(truncate_coefficients(coef, 1), [[0, -3], [-2, 0], [0, 0]])
    # Ranked by |coef| x input scale: input 2 varies most.
    np.testing.assert_array_equal(truncate_coefficients(coef, 1, scale=[1, 1, 10]), [[0, -3], [0, 0], [0.5, 0]])
    np.testing.assert_array_equal(truncate_coefficients(coef, 5), coef)


def test_sparsity_levels_and_overlap():
    levels = sparsity_levels([1.0, 0.5, 0.25, 0.1], [5])
    assert [lv[0] for lv in levels] == ["100%", "50%", "25%", "10%", "top-5"]
    assert [lv[0] for lv in sparsity_levels([0.125], [])] == ["100%", "12.5%"]  # the full map always comes first
    assert [lasso_module._kept(lv, 10) for lv in levels] == [10, 5, 3, 1, 5]
    a = np.array([[1, 2], [3, 4], [5, -1]])
    b = np.array([[3, 2], [1, 9], [7, -1]])
    np.testing.assert_allclose(jaccard(a, b), [2 / 4, 1 / 3])


def test_constant_units_are_dropped_not_fatal():
    x, w, b, y = _sparse_problem()
    x[:, 4] = 2.5  # a dead input (unused by the true map)
    y[:, 1] = -1.0  # a constant target
    fit = fit_regression(x, y, "ols")
    assert fit.constant_input.tolist() == [i == 4 for i in range(12)]
    assert fit.constant_target.tolist() == [j == 1 for j in range(5)]
    assert not fit.coef[4].any() and not fit.coef[:, 1].any()
    assert fit.intercept[1] == -1.0
    r2 = r2_score(y, x @ fit.coef + fit.intercept)
    assert np.isnan(r2[1]) and np.allclose(np.delete(r2, 1), 1.0)
    everything_constant = fit_regression(np.ones((5, 3)), np.ones((5, 2)))
    assert not everything_constant.coef.any()


def test_bad_kernel_input_is_a_clear_error():
    with pytest.raises(ValueError, match="same n"):
        fit_regression(np.zeros((4, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="finite"):
        fit_regression(np.array([[np.nan], [1.0]]), np.ones((2, 1)))
    with pytest.raises(ValueError, match="unknown method"):
        fit_regression(np.eye(3), np.eye(3), "ridge")


# ------------------------------------------------------------------------ aligner


@pytest.fixture(scope="module")
def data():
    return example_dataset(n=120, shape=(1, 8, 8))


def _context(data, tmp_path, layers):
    return Context(data=data, quiet=True, workdir=tmp_path, layers=list(layers))


def _mlp(seed: int, hidden: int = 16):
    torch.manual_seed(seed)
    return MLP(hidden=[hidden]).build((1, 8, 8), 3).eval()


def test_a_permuted_copy_is_recovered_exactly(data, tmp_path):
    model = _mlp(0)
    groups = channel_groups(model, example_input(data))
    perm = np.random.default_rng(1).permutation(16)
    other = permute(model, {"fc1": perm}, groups)
    aligner = RegressionAlignment(method="ols", per_class=10, sparsity=[0.5, 0.1], top_m=[1])
    result = aligner.align({"a": model, "b": other}, "a", _context(data, tmp_path, ["fc1"]))
    t = result.transforms["b"]["fc1"]
    assert t.dims == ("unit", "unit_ref") and t["unit_ref"].values.tolist() == list(range(16))
    expected = np.zeros((16, 16))
    expected[np.argsort(perm), np.arange(16)] = 1.0  # b's unit i is a's unit perm[i]
    np.testing.assert_allclose(t.values, expected, atol=1e-6)
    tree = result.to_tree()
    node = tree["b/fc1"].to_dataset()
    assert node["sparsity"].values.tolist() == ["100%", "50%", "10%", "top-1"]
    np.testing.assert_allclose(node["r2"].values, 1.0, atol=1e-6)
    np.testing.assert_allclose(node["overlap"].values, 1.0)  # same top images as a's own
    np.testing.assert_array_equal(node["topk_sample"].sel(sparsity="100%"), node["reference_topk_sample"])
    grid = tree["fc1"].to_dataset()
    assert grid["topk_sample"].dims == ("sparsity", "rank", "unit") and grid["topk_value"].dims == grid["topk_sample"].dims
    np.testing.assert_array_equal(grid["topk_sample"], node["topk_sample"])  # every level, for rows_select
    assert grid["unit"].values.tolist() == list(range(16)) and str(grid["aligned_model"].values) == "b"
    assert "transform" in tree["b/fc1"].ds  # transforms keep their place
    assert result.diagnostics["fit_samples"] == 30


def test_models_of_different_widths_and_the_sparsity_sweep(data, tmp_path):
    torch.manual_seed(0)
    reference = SmallCNN(widths=[4, 6]).build((1, 8, 8), 3).eval()
    torch.manual_seed(1)
    other = SmallCNN(widths=[5, 9]).build((1, 8, 8), 3).eval()
    torch.manual_seed(2)
    third = SmallCNN(widths=[4, 6]).build((1, 8, 8), 3).eval()
    aligner = RegressionAlignment(alpha=0.05, per_class=5, top_m=[2], topk=4)
    models = {"r": reference, "o": other, "t": third}
    result = aligner.align(models, "r", _context(data, tmp_path, ["conv2", "relu1"]))
    assert set(result.transforms["o"]) == {"conv2", "relu1"}
    assert result.transforms["o"]["conv2"].shape == (9, 6) and result.transforms["o"]["relu1"].shape == (5, 4)
    node = result.to_tree()["o/conv2"].to_dataset()
    nonzero = node["nonzero"].sel(sparsity=["100%", "50%", "25%", "10%"]).values
    assert (np.diff(nonzero, axis=0) <= 0).all()  # fewer coefficients at every step of the sweep
    assert (node["nonzero"].sel(sparsity="top-2") <= 2).all()
    assert node["kept"].values.tolist() == [9, 5, 3, 1, 2]
    assert node["topk_sample"].dims == ("sparsity", "rank", "unit_ref") and node.sizes["rank"] == 4
    # Several aligned models: one top-k grid row per model and sparsity level.
    grid = result.to_tree()["conv2"].to_dataset()  # the model labels are the root's, inherited
    assert grid["topk_sample"].dims == ("model", "sparsity", "rank", "unit") and grid["model"].values.tolist() == ["o", "t"]
    np.testing.assert_array_equal(grid["topk_sample"].sel(model="o").values, node["topk_sample"].values)
    d = result.diagnostics
    assert d["mean_r2"].dims == ("model", "layer", "sparsity") and d["layer"].values.tolist() == ["conv2", "relu1"]
    assert np.isfinite(d["mean_r2"]).all() and (d["mean_r2_fit"].sel(sparsity="100%") > 0).all()
    assert "o: R²" in aligner.describe(d)


def test_streaming_in_blocks_gives_the_same_result(data, tmp_path, monkeypatch):
    models = {"a": _mlp(0), "b": _mlp(1, hidden=10)}
    context = _context(data, tmp_path, ["fc1"])
    whole = RegressionAlignment().align(models, "a", context).to_tree()
    monkeypatch.setattr(lasso_module, "_CHUNK", 7)
    blocks = RegressionAlignment().align(models, "a", context).to_tree()
    for name in ("transform", "intercept", "r2_fit", "topk_sample", "overlap"):
        np.testing.assert_array_equal(whole["b/fc1"][name], blocks["b/fc1"][name])
    for name in ("topk_value", "r2"):  # products and sums of other block shapes: equal up to rounding
        np.testing.assert_allclose(whole["b/fc1"][name], blocks["b/fc1"][name], rtol=1e-10)
    np.testing.assert_array_equal(whole["fc1"]["topk_sample"], blocks["fc1"]["topk_sample"])


def test_a_constant_unit_warns_and_is_skipped(data, tmp_path):
    reference, other = _mlp(0), _mlp(1, hidden=10)
    with torch.no_grad():
        for model, unit in ((reference, 2), (other, 7)):
            model.fc1.weight[unit] = 0.0
            model.fc1.bias[unit] = 0.5
    with pytest.warns(UserWarning) as caught:
        result = RegressionAlignment().align({"a": reference, "b": other}, "a", _context(data, tmp_path, ["fc1"]))
    messages = [str(w.message) for w in caught]
    assert any("model 'b', layer 'fc1'" in m and "(7)" in m for m in messages), messages
    assert any("reference 'a', layer 'fc1'" in m and "(2)" in m for m in messages), messages
    node = result.to_tree()["b/fc1"].to_dataset()
    assert not node["transform"].sel(unit=7).any() and not node["transform"].sel(unit_ref=2).any()
    assert np.isnan(node["r2"].sel(unit_ref=2)).all() and np.isfinite(node["r2"].drop_sel(unit_ref=2)).all()
    np.testing.assert_allclose(node["intercept"].sel(unit_ref=2), 0.5)
    assert int(result.diagnostics["constant_inputs"].sel(model="b", layer="fc1")) == 1


def test_layers_default_and_errors(data, tmp_path):
    models = {"a": _mlp(0), "b": _mlp(1)}
    # No step layers: the layers whose outputs form channel groups (the hidden Linear).
    result = RegressionAlignment().align(models, "a", _context(data, tmp_path, []))
    assert list(result.transforms["b"]) == ["fc1"]

    class Untraceable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 3)

        def forward(self, x):
            x = x.flatten(1)
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(ConfigError, match="set 'layers' on the step"):
        RegressionAlignment().align({"a": Untraceable(), "b": Untraceable()}, "a", _context(data, tmp_path, []))
    with pytest.raises(ConfigError, match="needs \\[data\\]"):
        RegressionAlignment().align(models, "a", Context(quiet=True, layers=["fc1"]))
    with pytest.raises(ConfigError, match="'per_class' = 50"):
        RegressionAlignment(per_class=50).align(models, "a", _context(data, tmp_path, ["fc1"]))
    with pytest.raises(ConfigError, match="names of models"):
        RegressionAlignment().align({"fc1": models["a"], "b": models["b"]}, "fc1", _context(data, tmp_path, ["fc1"]))


@pytest.mark.parametrize(
    "options, key",
    [
        ({"method": "ridge"}, "method"),
        ({"alpha": 0.0}, "alpha"),
        ({"sparsity": [0.5, 1.5]}, "sparsity"),
        ({"top_m": [0]}, "top_m"),
        ({"topk": 0}, "topk"),
    ],
)
def test_bad_options_name_the_key(options, key):
    with pytest.raises(ConfigError, match=key):
        structure_options(RegressionAlignment, options)


def test_conformance():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny random MLPs: convergence notes are not the point here
        check_component(RegressionAlignment)


def test_in_a_pipeline_the_grid_row_sits_at_step_layer(fresh_registry, tmp_path):
    from mergescope import Pipeline, run
    from mergescope.pipeline import ModelSpec, Step
    from mergescope.storage import load_tree

    if "lasso" not in fresh_registry.get_registry().names("aligner"):
        fresh_registry.register_plugin(lasso_module, name="lasso-under-test")
    data = fresh_registry.get_registry().get("dataset", "digits")(split="test", per_class=10)
    torch.manual_seed(0)
    a, b = (MLP(hidden=[12]).build((1, 8, 8), 10).eval() for _ in range(2))
    pipeline = Pipeline(
        data=data,
        models=[ModelSpec("a", module=a), ModelSpec("b", module=b)],
        steps=[Step(RegressionAlignment(per_class=5), name="regress", models=["a", "b"], layers=["fc1"])],
    )
    first = run(pipeline, tmp_path / "run", quiet=True)
    saved = load_tree(tmp_path / "run" / "results.nc")
    grid = saved["regress/fc1"].to_dataset(inherit=False)
    assert grid["topk_sample"].dims == ("sparsity", "rank", "unit")
    assert grid.sizes == {"sparsity": 5, "rank": 10, "unit": 12}  # 100%, 50%, 25%, 10%, top-5
    assert int(grid["count"]) == 100 and str(grid["aligned_model"].values) == "b"
    assert saved["regress/b/fc1"]["transform"].dims == ("unit", "unit_ref")
    assert int(saved["regress"]["fit_samples"]) == 50
    again = run(pipeline, tmp_path / "run", quiet=True)  # cached step: read back from its result file
    assert again.results["regress/fc1"].identical(first.results["regress/fc1"])


def test_sparsity_panels_are_drawn_for_regression_results(tmp_path):
    from mergescope.testing import check_component
    from mergescope_plugins.lasso import RegressionSparsity

    levels = ["100%", "50%", "top-5"]
    root = xr.Dataset(
        {
            "mean_r2": (("model", "layer", "sparsity"), np.array([[[0.9, 0.8, 0.5], [0.95, 0.9, 0.7]]])),
            "mean_overlap": (("model", "layer", "sparsity"), np.array([[[0.6, 0.5, 0.3], [0.7, 0.6, 0.4]]])),
            "mean_nonzero": (("model", "layer", "sparsity"), np.array([[[20.0, 10.0, 5.0], [30.0, 15.0, 5.0]]])),
        },
        coords={"model": ["b"], "layer": ["relu1", "relu2"], "sparsity": levels},
    )
    tree = xr.DataTree.from_dict({"regression": root, "other": xr.Dataset({"x": 1.0})})
    files = RegressionSparsity().render(tree, tmp_path / "out")
    assert [f.name for f in files] == ["regression-sparsity.png"]
    from PIL import Image

    assert Image.open(files[0]).size[0] > 600
    assert RegressionSparsity().render(xr.DataTree.from_dict({"other": xr.Dataset({"x": 1.0})}), tmp_path / "none") == []
    check_component(RegressionSparsity)
