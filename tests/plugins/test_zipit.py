"""ZipIt!: the greedy matcher worked by hand, the zip algebra, functional equivalences, partial zipping."""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from mergescope import Context
from mergescope.errors import ConfigError
from mergescope.groups import channel_groups, example_input, permute
from mergescope.testing import check_component, example_dataset
from mergescope_plugins.zipit import ZipIt, ZippedHeads, correlation_from_covariance, zip_match, zip_states
from mergescope_plugins.zoo import SmallCNN

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Features A0, A1 (model A) and B0, B1 (model B). A0 and A1 are the most correlated pair
# of all: a redundant pair within model A.
TOY = np.array(
    [
        [1.0, 0.9, 0.5, 0.3],
        [0.9, 1.0, 0.4, 0.6],
        [0.5, 0.4, 1.0, 0.25],
        [0.3, 0.6, 0.25, 1.0],
    ]
)


@pytest.fixture(scope="module")
def data():
    return example_dataset(n=120, shape=(1, 8, 8))


@pytest.fixture(scope="module")
def context(data):
    return Context(data=data, quiet=True)


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(widths=[4, 6, 5], batchnorm=True).build((1, 8, 8), 3).eval()


def outputs(model: nn.Module, data) -> torch.Tensor:
    with torch.no_grad():
        return model(data.images)


# ----------------------------------------------------------------- the matcher


def test_a_redundant_pair_within_a_model_is_zipped_first_and_alpha_zero_lets_it_take_a_third_feature():
    # beta = 1: floor(1 * floor((4 - 2) / 2)) = 1 merge within each model.
    # 1. (A0, A1) at 0.9, within A. Its correlations: min over members, to B0 0.4, to B1 0.3.
    # 2. alpha = 0 only forbids model A again, so {A0, A1} takes B0 at 0.4 (> B0-B1 0.25).
    z = zip_match(TOY, 2, alpha=0.0, beta=1.0)
    np.testing.assert_allclose(z.merge, [[1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(z.unmerge, [[1, 0], [1, 0], [1, 0], [0, 1]])
    assert (z.within, z.cross, z.forced) == (1, 1, 0)
    np.testing.assert_allclose(z.correlations, [0.9, 0.4])
    np.testing.assert_allclose(z.model_merge(1), [[1 / 3, 0], [0, 1]])
    np.testing.assert_array_equal(z.model_unmerge(0), [[1, 0], [1, 0]])
    np.testing.assert_array_equal(z.assignment(), [[0, 0], [0, 1]])


def test_alpha_makes_a_merged_feature_wait_so_each_model_keeps_its_own_features():
    # 1. (A0, A1) at 0.9; its correlations become 0.5 * (0.4, 0.3) = (0.2, 0.15).
    # 2. B0-B1 at 0.25 is now the best pair: two within-model pairs, the tasks kept apart.
    z = zip_match(TOY, 2, alpha=0.5, beta=1.0)
    assert z.merge.shape == (2, 4) and z.unmerge.shape == (4, 2)
    np.testing.assert_allclose(z.merge, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_array_equal(z.unmerge, [[1, 0], [1, 0], [0, 1], [0, 1]])
    assert (z.within, z.cross) == (2, 0)
    np.testing.assert_allclose(z.correlations, [0.9, 0.25])


def test_beta_zero_forbids_merges_within_a_model():
    # Only A-B pairs: (A1, B1) at 0.6, then alpha = 0 retires both, leaving (A0, B0) at 0.5.
    for beta in (0.0, 0.5):  # floor(0.5 * 1) = 0: no budget either
        z = zip_match(TOY, 2, alpha=0.0, beta=beta)
        np.testing.assert_allclose(z.merge, [[0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5]])
        np.testing.assert_array_equal(z.unmerge, [[1, 0], [0, 1], [1, 0], [0, 1]])
        assert (z.within, z.cross) == (0, 2)


def test_without_within_model_merges_the_matcher_is_greedy_bipartite_matching():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(500, 12))
    corr = np.corrcoef(features.T)
    z = zip_match(corr, 2, alpha=0.0, beta=0.0)
    # An independent greedy matching: cross pairs by decreasing correlation, both ends free.
    pairs = sorted(((corr[i, 6 + j], i, j) for i in range(6) for j in range(6)), reverse=True)
    taken_a, taken_b, expected = set(), set(), {}
    for _, i, j in pairs:
        if i not in taken_a and j not in taken_b:
            taken_a.add(i)
            taken_b.add(j)
            expected[i] = j
    got = z.assignment()
    assert {i: int(np.flatnonzero(got[1] == got[0, i])[0]) for i in range(6)} == expected
    assert z.merge.shape == (6, 12) and np.allclose(z.merge.sum(axis=1), 1)


def test_three_models_merge_into_one_width_through_repeated_matches():
    rng = np.random.default_rng(0)
    corr = np.corrcoef(rng.normal(size=(300, 9)).T)
    z = zip_match(corr, 3, alpha=0.0, beta=0.0)
    assert z.merge.shape == (3, 9) and z.unmerge.shape == (9, 3)
    np.testing.assert_array_equal(z.unmerge.sum(axis=1), 1)  # every feature in one cluster
    np.testing.assert_allclose(z.merge @ z.unmerge, np.eye(3))  # M averages what U copies
    assert z.within == 0 and z.within + z.cross == 6


def test_the_matcher_refuses_what_does_not_stack():
    with pytest.raises(ValueError, match="square"):
        zip_match(np.ones((2, 3)), 2)
    with pytest.raises(ValueError, match="does not stack 3 models"):
        zip_match(np.eye(4), 3)


def test_correlation_from_covariance_marks_constant_units():
    corr = correlation_from_covariance(np.array([[4.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(corr[:2, :2], [[1.0, 1.0], [1.0, 1.0]])
    assert np.isnan(corr[2]).all() and np.isnan(corr[:, 2]).all()


# ------------------------------------------------------------ the zip algebra


def test_zipped_weights_are_the_merge_and_unmerge_of_each_layer():
    """W* = sum_i M_i W_i for the hidden layer (and its BatchNorm), 1/N sum_i W_i U_i for the logits."""

    def mlp(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(16, 4),
                bn=nn.BatchNorm1d(4),
                relu=nn.ReLU(),
                fc2=nn.Linear(4, 3),
            )
        ).eval()
        with torch.no_grad():  # statistics and an affine map that are not the defaults
            for t in (model.bn.weight, model.bn.bias, model.bn.running_mean):
                t.normal_()
            model.bn.running_var.uniform_(0.5, 2.0)
        return model

    models = [mlp(0), mlp(1)]
    groups = channel_groups(models[0], torch.randn(3, 1, 4, 4))
    assert [g.name for g in groups] == ["fc1"]
    rng = np.random.default_rng(1)
    z = zip_match(np.corrcoef(rng.normal(size=(100, 8)).T), 2, alpha=0.5, beta=1.0)
    state = zip_states(models, groups, {"fc1": z})
    m = [torch.from_numpy(z.model_merge(i)).float() for i in range(2)]
    u = [torch.from_numpy(z.model_unmerge(i)).float() for i in range(2)]
    s = [model.state_dict() for model in models]
    torch.testing.assert_close(state["fc1.weight"], m[0] @ s[0]["fc1.weight"] + m[1] @ s[1]["fc1.weight"])
    torch.testing.assert_close(state["fc1.bias"], m[0] @ s[0]["fc1.bias"] + m[1] @ s[1]["fc1.bias"])
    for key in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        torch.testing.assert_close(state[key], m[0] @ s[0][key] + m[1] @ s[1][key])
    torch.testing.assert_close(state["fc2.weight"], (s[0]["fc2.weight"] @ u[0] + s[1]["fc2.weight"] @ u[1]) / 2)
    torch.testing.assert_close(state["fc2.bias"], (s[0]["fc2.bias"] + s[1]["fc2.bias"]) / 2)
    # The same in the paper's stacked form: M [W_a; W_b] and [W_a, W_b] U / 2.
    merge, unmerge = torch.from_numpy(z.merge).float(), torch.from_numpy(z.unmerge).float()
    stacked = torch.cat([s[0]["fc1.weight"], s[1]["fc1.weight"]])
    torch.testing.assert_close(state["fc1.weight"], merge @ stacked)
    wide = torch.cat([s[0]["fc2.weight"], s[1]["fc2.weight"]], dim=1)
    torch.testing.assert_close(state["fc2.weight"], wide @ unmerge / 2)


# ----------------------------------------------------- functional equivalences


def test_zipping_a_model_with_itself_gives_the_model(data, context):
    model = cnn(0)
    result = ZipIt(reset_batchnorm=False).merge({"a": model, "b": copy.deepcopy(model)}, context)
    torch.testing.assert_close(outputs(result.model, data), outputs(model, data), atol=1e-5, rtol=1e-5)
    r = result.results
    assert r["zipped"].all() and (r["within_merges"] == 0).all()
    np.testing.assert_allclose(r["merged_correlation"], 1.0)
    # every unit of b joins its twin in a
    for g in r["group"].values:
        size = int(r["units"].sel(group=g))
        a, b = r["assignment"].sel(group=g).values[:, :size]
        np.testing.assert_array_equal(a, b)


def test_zipping_a_model_with_a_permuted_copy_gives_the_model(data, context):
    model = cnn(0)
    groups = channel_groups(model, example_input(data))
    rng = np.random.default_rng(5)
    other = permute(model, {g.name: rng.permutation(g.size) for g in groups}, groups)
    result = ZipIt(reset_batchnorm=False).merge({"a": model, "b": other}, context)
    torch.testing.assert_close(outputs(result.model, data), outputs(model, data), atol=1e-5, rtol=1e-5)
    assert (result.results["cross_merges"] == 1).all()


def test_two_different_models_zip_into_the_architecture(data, context):
    a, b = cnn(0), cnn(1)
    result = ZipIt().merge({"a": a, "b": b}, context)
    got, ref = result.model.state_dict(), a.state_dict()
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    r = result.results
    assert r["assignment"].dims == ("group", "model", "unit")
    assert 0 <= float(r["accuracy"]) <= 1 and np.isfinite(float(r["loss"]))
    np.testing.assert_allclose(r["within_merges"] + r["cross_merges"], 1.0)
    assert "zipped 2 models fully: accuracy" in ZipIt().describe(r)


def test_three_models_are_zipped_at_once(data, context):
    models = {name: cnn(seed) for name, seed in (("a", 0), ("b", 1), ("c", 2))}
    result = ZipIt(r=2 / 3).merge(models, context)
    assert result.results.sizes["model"] == 3
    assert {k: v.shape for k, v in result.model.state_dict().items()} == {
        k: v.shape for k, v in models["a"].state_dict().items()
    }


# --------------------------------------------------------------- partial zipping


def test_partial_zipping_at_the_last_group_is_the_full_zip(data, context):
    """The heads' logits averaged: 1/N sum_i W_i U_i z, which is the full zip's last layer."""
    models = {"a": cnn(0), "b": cnn(1)}
    full = ZipIt(reset_batchnorm=False).merge(models, context)
    part = ZipIt(reset_batchnorm=False, stop_at="relu3", combine="logits").merge(models, context)
    assert isinstance(part.model, ZippedHeads)
    torch.testing.assert_close(outputs(part.model, data), outputs(full.model, data), atol=1e-5, rtol=1e-5)
    # stopping earlier gives another model
    early = ZipIt(reset_batchnorm=False, stop_at="relu1", combine="logits").merge(models, context)
    assert not torch.allclose(outputs(early.model, data), outputs(full.model, data), atol=1e-3)


def test_partial_zip_of_a_model_with_itself_is_the_model_as_an_ensemble_of_two_heads(data, context):
    model = cnn(0)
    result = ZipIt(reset_batchnorm=False, stop_at="relu1").merge({"a": model, "b": copy.deepcopy(model)}, context)
    torch.testing.assert_close(
        outputs(result.model, data), torch.log_softmax(outputs(model, data), dim=-1), atol=1e-5, rtol=1e-5
    )
    own = context.evaluate(model)
    np.testing.assert_allclose(result.results["head_accuracy"], own.accuracy)
    assert result.results["zipped"].values.tolist() == [True, False, False]
    assert str(result.results["stop_at"].values) == "relu1"


def test_partial_zipping_zips_the_groups_up_to_the_layer(data, context):
    result = ZipIt(stop_at="relu2").merge({"a": cnn(0), "b": cnn(1)}, context)
    r = result.results
    assert r["zipped"].values.tolist() == [True, True, False]
    assert np.isnan(float(r["within_merges"].sel(group="conv3")))
    assert (r["assignment"].sel(group="conv3") == -1).all()
    assert r["head_accuracy"].dims == ("model",)
    assert "up to relu2 (2 of 3 groups)" in ZipIt(stop_at="relu2").describe(r)


def test_a_saved_partial_zip_is_rebuilt_from_the_models(data, context):
    models = {"a": cnn(0), "b": cnn(1)}
    for zipit in (ZipIt(stop_at="bn2", combine="max-probability"), ZipIt()):
        merged = zipit.merge(models, context).model
        state = {k: v.clone() for k, v in merged.state_dict().items()}
        rebuilt = zipit.rebuild(models, state)
        rebuilt.load_state_dict(state, strict=True)
        torch.testing.assert_close(outputs(rebuilt, data), outputs(merged, data))


class _Residual(nn.Module):
    """A stem and one residual block: relu_a sits inside the skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.relu0 = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()
        self.conv_a, self.relu_a = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.conv_b, self.relu_b = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu0(self.stem(x))
        h = self.relu_b(h + self.conv_b(self.relu_a(self.conv_a(h))))
        return self.fc(self.pool(h).flatten(1))


def test_stop_at_must_be_a_layer_every_later_layer_reads_through(context):
    torch.manual_seed(0)
    models = {"a": _Residual().eval(), "b": _Residual().eval()}
    with pytest.raises(ConfigError, match="skip connection across it") as info:
        ZipIt(stop_at="relu_a").merge(models, context)
    assert info.value.where == "key 'stop_at'"
    for layer in ("relu0", "relu_b"):  # before the block, and the block's output
        assert isinstance(ZipIt(stop_at=layer).merge(models, context).model, ZippedHeads)


def test_stop_at_names_a_layer_with_channels(context):
    models = {"a": cnn(0), "b": cnn(1)}
    with pytest.raises(ConfigError, match=r"does not output a channel group's units.*relu1.*Did you mean 'relu2'"):
        ZipIt(stop_at="relu22").merge(models, context)
    with pytest.raises(ConfigError, match="'pool' does not output"):
        ZipIt(stop_at="pool").merge(models, context)


# --------------------------------------------------------------------- guards


def test_guards_name_what_is_wrong(data, context):
    a, b = cnn(0), cnn(1)
    with pytest.raises(ConfigError, match="two models or more") as info:
        ZipIt().merge({"a": a}, context)
    assert info.value.where == "key 'models'"
    with pytest.raises(ConfigError, match=r"needs r = 1 - 1/2 = 0.5: leave 'r' unset") as info:
        ZipIt(r=0.3).merge({"a": a, "b": b}, context)
    assert info.value.where == "key 'r'"
    with pytest.raises(ConfigError, match="needs \\[data\\]"):
        ZipIt().merge({"a": a, "b": b}, Context(quiet=True))
    wider = SmallCNN(widths=[4, 7, 5], batchnorm=True).build((1, 8, 8), 3)
    with pytest.raises(ConfigError, match="cannot zip models"):
        ZipIt().merge({"a": a, "b": wider}, context)
    with pytest.raises(ValueError, match="'alpha' must be a number in \\[0, 1\\]"):
        ZipIt(alpha=1.5)
    with pytest.raises(ValueError, match="'combine' must be one of"):
        ZipIt(combine="vote")
    assert ZipIt(r=0.5).merge({"a": a, "b": b}, context).model is not None


def test_conformance():
    check_component(ZipIt)
