"""RegMean: the closed form against least squares, the Grams of one recording pass, and the merger's guards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mergescope import Context
from mergescope.errors import ConfigError
from mergescope.groups import channel_groups, example_input, permute
from mergescope.statistics import CoMoments
from mergescope.testing import check_component
from mergescope.values import TensorImageDataset
from mergescope_plugins.regmean import (
    RegMean,
    input_gram,
    merge_layer,
    plan_layers,
    regmean_solve,
    relative_residual,
    shrink_off_diagonal,
)
from mergescope_plugins.weight_matching import WeightMatching
from mergescope_plugins.zoo import MLP

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    images = torch.randn((30, 1, 4, 4), generator=g)
    labels = np.arange(30) % 3
    return TensorImageDataset("toy", images, labels, np.arange(30), ["a", "b", "c"])


@pytest.fixture
def context(data, tmp_path):
    """A context whose recordings go to a fresh folder (no store of another test is reused)."""
    return Context(data=data, batch_size=7, quiet=True, workdir=tmp_path)


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


def cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).eval()


def lstsq(inputs: list[np.ndarray], outputs: list[np.ndarray]) -> np.ndarray:
    """The least-squares fit to every model's input/output pairs at once (RegMean with alpha = 1)."""
    return np.linalg.lstsq(np.vstack(inputs), np.vstack(outputs), rcond=None)[0]


def with_ones(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((len(x), 1))])


# ------------------------------------------------------------------------ the math


def test_shrinking_scales_only_the_off_diagonal():
    gram = np.array([[4.0, 2.0], [2.0, 9.0]])
    np.testing.assert_array_equal(shrink_off_diagonal(gram, 0.25), [[4.0, 0.5], [0.5, 9.0]])
    np.testing.assert_array_equal(shrink_off_diagonal(gram, 1.0), gram)
    np.testing.assert_array_equal(shrink_off_diagonal(gram, 0.0), np.diag([4.0, 9.0]))


def test_a_hand_worked_shrunk_merge():
    # G~1 = [[2, .5], [.5, 1]], G~2 = G2; (G~1 + G~2) w = G~1 e1 + G~2 e2 = [2, 4.5]
    # with G~1 + G~2 = [[3, .5], [.5, 5]], det 14.75: w = [7.75, 12.5] / 14.75 = [31/59, 50/59].
    g1 = np.array([[2.0, 1.0], [1.0, 1.0]])
    g2 = np.array([[1.0, 0.0], [0.0, 4.0]])
    fit = regmean_solve([g1, g2], [np.array([[1.0], [0.0]]), np.array([[0.0], [1.0]])], alpha=0.5)
    np.testing.assert_allclose(fit.weight, [[31 / 59], [50 / 59]], rtol=1e-12)
    assert fit.undetermined == 0 and fit.condition_number > 1


def test_the_gram_comes_from_streaming_moments():
    rng = np.random.default_rng(0)
    x = rng.normal(loc=2.0, size=(50, 4))
    moments = CoMoments.within(4)
    for part in np.array_split(x, 3):
        moments.update(part)
    np.testing.assert_allclose(input_gram(moments.count, moments.mean_x, moments.comoment), x.T @ x, rtol=1e-10)
    augmented = input_gram(moments.count, moments.mean_x, moments.comoment, constant=True)
    np.testing.assert_allclose(augmented, with_ones(x).T @ with_ones(x), rtol=1e-10)


def test_alpha_one_is_least_squares_on_the_union_of_inputs():
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(40, 6)), rng.normal(size=(25, 6)) @ np.diag([3, 1, 1, 0.2, 1, 2])]
    ws = [rng.normal(size=(6, 3)), rng.normal(size=(6, 3))]
    fit = regmean_solve([x.T @ x for x in xs], ws, alpha=1.0)
    np.testing.assert_allclose(fit.weight, lstsq(xs, [x @ w for x, w in zip(xs, ws)]), rtol=1e-9, atol=1e-12)


def test_alpha_zero_averages_each_input_feature_by_its_energy():
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(30, 4)) * [1, 2, 3, 4], rng.normal(size=(30, 4))]
    ws = [rng.normal(size=(4, 2)), rng.normal(size=(4, 2))]
    grams = [x.T @ x for x in xs]
    energy = np.stack([np.diag(g) for g in grams])  # (model, feature)
    expected = sum(e[:, None] * w for e, w in zip(energy, ws)) / energy.sum(axis=0)[:, None]
    np.testing.assert_allclose(regmean_solve(grams, ws, alpha=0.0).weight, expected, rtol=1e-12)


def test_an_unreached_input_keeps_the_average_weight():
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(20, 3)), rng.normal(size=(20, 3))]
    for x in xs:
        x[:, 1] = 0.0  # a dead unit: no model's inputs say anything about its weights
    ws = [rng.normal(size=(3, 2)), rng.normal(size=(3, 2))]
    fit = regmean_solve([x.T @ x for x in xs], ws, alpha=1.0)
    assert fit.undetermined == 1 and math.isinf(fit.condition_number)
    np.testing.assert_allclose(fit.weight[1], (ws[0][1] + ws[1][1]) / 2, rtol=1e-12)
    live = [0, 2]
    expected = lstsq([x[:, live] for x in xs], [x @ w for x, w in zip(xs, ws)])
    np.testing.assert_allclose(fit.weight[live], expected, rtol=1e-9)
    with pytest.raises(ValueError, match="one Gram per weight matrix"):
        regmean_solve([np.eye(3)], ws, alpha=1.0)


def test_a_bias_is_averaged_unless_regressed():
    rng = np.random.default_rng(4)
    xs = [with_ones(rng.normal(size=(20, 3))), with_ones(rng.normal(size=(15, 3)) + 1.0)]
    own = [rng.normal(size=(4, 2)), rng.normal(size=(4, 2))]  # last row: the bias
    grams = [x.T @ x for x in xs]
    merged, fit = merge_layer(grams, own, 1.0, regress_bias=False)
    np.testing.assert_allclose(merged[-1], (own[0][-1] + own[1][-1]) / 2, rtol=1e-12)
    weights_only = lstsq([x[:, :-1] for x in xs], [x[:, :-1] @ w[:-1] for x, w in zip(xs, own)])
    np.testing.assert_allclose(merged[:-1], weights_only, rtol=1e-9)
    assert fit.weight.shape == (3, 2)
    merged, fit = merge_layer(grams, own, 1.0, regress_bias=True)
    np.testing.assert_allclose(merged, lstsq(xs, [x @ w for x, w in zip(xs, own)]), rtol=1e-9)
    assert fit.weight.shape == (4, 2)


def test_relative_residual():
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    own, merged = np.array([[1.0], [1.0]]), np.array([[1.0], [0.5]])
    # X own = [1, 2] (squared norm 5); X (merged - own) = [0, -1] (squared norm 1)
    assert relative_residual(x.T @ x, merged, own) == pytest.approx(1 / 5)
    assert math.isnan(relative_residual(np.zeros((2, 2)), merged, own))


# ------------------------------------------------------------------- the merger


def hidden(model: nn.Sequential, upto: int, data) -> np.ndarray:
    """The input model's layer ``upto`` reads, one row per image."""
    with torch.no_grad():
        return model[:upto](data.images).double().numpy()


@pytest.mark.parametrize("bias", ["regress", "average"])
def test_merged_linear_layers_are_least_squares_fits(bias, data, context):
    models = {"a": mlp(0), "b": mlp(1)}
    result = RegMean(alpha=1.0, bias=bias, reset_batchnorm=False).merge(models, context)
    merged = result.model.state_dict()
    # The first layer reads the images, the same for both models: the merge is their average.
    for key in ("1.weight", "1.bias"):
        torch.testing.assert_close(merged[key], (models["a"].state_dict()[key] + models["b"].state_dict()[key]) / 2)
    # The head reads each model's own hidden features.
    xs = [hidden(m, 3, data) for m in models.values()]
    ys = [m(data.images).detach().double().numpy() for m in models.values()]
    if bias == "regress":
        fit = lstsq([with_ones(x) for x in xs], ys)
        weight, head_bias = fit[:-1].T, fit[-1]
    else:
        head_bias = sum(m[3].bias.detach().double().numpy() for m in models.values()) / 2
        weight = lstsq(xs, [y - m[3].bias.detach().double().numpy() for y, m in zip(ys, models.values())]).T
    np.testing.assert_allclose(merged["3.weight"].double().numpy(), weight, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(merged["3.bias"].double().numpy(), head_bias, rtol=1e-4, atol=1e-5)
    assert result.results["regressed"].values.tolist() == [True, True]
    assert result.results["features"].values.tolist() == ([16, 5] if bias == "average" else [17, 6])


def test_alpha_shrinks_the_grams_of_the_recorded_inputs(data, context):
    models = {"a": mlp(0), "b": mlp(1)}
    alpha = 0.3
    merged = RegMean(alpha=alpha, bias="regress", reset_batchnorm=False).merge(models, context).model.state_dict()
    # An independent computation: Grams of the inputs with a constant 1, off-diagonal entries times alpha.
    grams, rhs = [], []
    for m in models.values():
        x = with_ones(hidden(m, 3, data))
        g = x.T @ x
        g = np.where(np.eye(len(g), dtype=bool), g, alpha * g)
        grams.append(g)
        rhs.append(g @ np.vstack([m[3].weight.detach().double().numpy().T, m[3].bias.detach().double().numpy()]))
    expected = np.linalg.solve(sum(grams), sum(rhs))
    np.testing.assert_allclose(merged["3.weight"].double().numpy(), expected[:-1].T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(merged["3.bias"].double().numpy(), expected[-1], rtol=1e-4, atol=1e-5)


def test_a_merged_conv_is_least_squares_on_unfolded_patches(data, context):
    models = {"a": cnn(0), "b": cnn(1)}
    merged = RegMean(alpha=1.0, bias="regress", reset_batchnorm=False).merge(models, context).model.state_dict()
    patches, outputs = [], []
    for m in models.values():
        with torch.no_grad():
            h = m[:2](data.images)  # what the strided, reflect-padded conv reads
            padded = nn.functional.pad(h, (1, 1, 1, 1), mode="reflect")
            cols = nn.functional.unfold(padded, 3, stride=2)  # (n, 3 * 3 * 3, positions)
            patches.append(with_ones(cols.transpose(1, 2).reshape(-1, 27).double().numpy()))
            outputs.append(m[2](h).flatten(2).transpose(1, 2).reshape(-1, 4).double().numpy())
    fit = lstsq(patches, outputs)
    np.testing.assert_allclose(merged["2.weight"].double().numpy(), fit[:-1].T.reshape(4, 3, 3, 3), atol=1e-4)
    np.testing.assert_allclose(merged["2.bias"].double().numpy(), fit[-1], atol=1e-4)


def test_one_recording_pass_per_model(data, context):
    models = {"a": cnn(0), "b": cnn(1), "c": cnn(2)}
    passes = {name: 0 for name in models}

    def counter(name, original):
        def count(module, _args):
            if module is original:  # copies of the model (the merge, its evaluation) carry the hook too
                passes[name] += 1

        return count

    for name, model in models.items():
        model.register_forward_pre_hook(counter(name, model))
    result = RegMean().merge(models, context)
    assert int(result.results["regressed"].sum()) == 3  # two convs and the head, all from that one pass
    assert passes == {name: math.ceil(len(data) / context.batch_size) for name in models}


def test_aligned_models_merge_into_the_model(data, context):
    model = MLP(hidden=[8]).build((1, 4, 4), 3).eval()
    groups = channel_groups(model, example_input(data))
    other = permute(model, {g.name: np.random.default_rng(0).permutation(g.size) for g in groups}, groups)
    models = {"ref": model, "other": other}
    alignment = WeightMatching().align(models, "ref", context)
    aligned = RegMean(reset_batchnorm=False).merge(models, context, alignment)
    naive = RegMean(reset_batchnorm=False).merge(models, context)
    with torch.no_grad():
        assert torch.allclose(aligned.model(data.images), model(data.images), atol=1e-4)
        assert not torch.allclose(naive.model(data.images), model(data.images), atol=1e-2)
    np.testing.assert_allclose(aligned.results["residual"].values, 0.0, atol=1e-8)


def test_layers_that_cannot_be_regressed_are_averaged_with_a_reason():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.twice = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)
            self.tokens = nn.Linear(4, 3)

        def forward(self, x):
            h = self.depthwise(self.conv(x)).mean(dim=(2, 3))
            h = self.twice(self.twice(h))
            return self.tokens(h[:, None, :].expand(-1, 2, -1)).mean(dim=1)

    plan = plan_layers(Odd(), torch.randn(2, 2, 5, 5))
    assert plan.regressed == {"conv": "conv@patches"}
    assert plan.averaged == {
        "depthwise": "grouped convolution (groups = 4)",
        "twice": "called 2 times per forward pass",
        "unused": "called 0 times per forward pass",
        "tokens": "a Linear applied to 3-D inputs",
    }


def test_batchnorm_statistics_are_averaged_or_measured_again(data, tmp_path):
    def bn_model(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3))
        model[1].running_mean.normal_()
        return model.eval()

    models = {"a": bn_model(0), "b": bn_model(1)}
    average = (models["a"][1].running_mean + models["b"][1].running_mean) / 2
    kept = RegMean(reset_batchnorm=False).merge(models, Context(data=data, quiet=True, workdir=tmp_path))
    torch.testing.assert_close(kept.model[1].running_mean, average)
    reset = RegMean(reset_batchnorm=True).merge(models, Context(data=data, quiet=True, workdir=tmp_path))
    with torch.no_grad():
        measured = reset.model[0](data.images).mean(dim=(0, 2, 3))
    torch.testing.assert_close(reset.model[1].running_mean, measured, rtol=1e-4, atol=1e-5)


def test_results_and_summary(data, context):
    models = {"a": mlp(0), "b": mlp(1)}
    merge = RegMean().merge(models, context)
    results = merge.results
    assert results["residual"].dims == ("model", "layer") and list(results["model"].values) == ["a", "b"]
    # The head's output change on model a's own features, bias included.
    x = with_ones(hidden(models["a"], 3, data))
    own = np.vstack([models["a"][3].weight.detach().double().numpy().T, models["a"][3].bias.detach().double()])
    new = np.vstack([merge.model[3].weight.detach().double().numpy().T, merge.model[3].bias.detach().double()])
    expected = np.sum((x @ (new - own)) ** 2) / np.sum((x @ own) ** 2)
    assert float(results["residual"].sel(model="a", layer="3")) == pytest.approx(expected, rel=1e-4)
    # The first layer's merge is the average (same images for both models).
    np.testing.assert_allclose(results["residual"].sel(layer="1"), results["average_residual"].sel(layer="1"))
    for name, model in models.items():
        with torch.no_grad():
            own = (model(data.images).argmax(dim=1).numpy() == data.labels).mean()
        assert float(results["model_accuracy"].sel(model=name)) == pytest.approx(own)
    line = RegMean().describe(results)
    assert line.startswith("2 of 2 layers regressed (alpha 0.9), mean output residual ")
    assert f"accuracy {float(results['accuracy']):.3f}" in line


def test_guards(data, context):
    with pytest.raises(ValueError, match=r"'alpha' must be a number in \[0, 1\], got 1.5"):
        RegMean(alpha=1.5)
    with pytest.raises(ValueError, match="'bias' must be one of 'average', 'regress', got 'fit'"):
        RegMean(bias="fit")
    with pytest.raises(ConfigError, match="at least two models"):
        RegMean().merge({"a": mlp(0)}, context)
    with pytest.raises(ConfigError, match=r"needs data: give the pipeline \[data\]"):
        RegMean().merge({"a": mlp(0), "b": mlp(1)}, Context(quiet=True))
    wide = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(ConfigError, match=r"cannot merge models \['a', 'b'\]: parameter '1.weight' has shape"):
        RegMean().merge({"a": mlp(0), "b": wide}, context)


def test_merges_are_repeatable(data, tmp_path):
    models = {"a": cnn(0), "b": cnn(1)}
    first = RegMean().merge(models, Context(data=data, quiet=True, workdir=tmp_path / "1"))
    second = RegMean().merge(models, Context(data=data, quiet=True, workdir=tmp_path / "2"))
    assert first.results.identical(second.results)
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key


def test_conformance():
    check_component(RegMean)
