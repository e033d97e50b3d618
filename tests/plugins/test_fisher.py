"""Tests of Fisher merging: the Fisher of softmax regression in closed form, the weighted average by hand,
its reductions (equal Fishers, a zero Fisher), alignment, BatchNorm, determinism and the guards."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from simulated_device import SimulatedAccelerator
from torch import nn

from mergescope.components import Alignment, Context, TensorImageDataset
from mergescope.errors import ConfigError
from mergescope.groups import channel_groups, example_input, permutation_matrix, permute, random_permutations
from mergescope.testing import example_dataset, example_models
from mergescope_plugins.fisher import Fisher, diagonal_fisher, fisher_average, log_prob_gradients, merge_shares

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ a softmax regression toy


def softmax_regression(seed: int, features: int = 2, classes: int = 3) -> nn.Module:
    """``p(y | x) = softmax(W x + b)``: the model whose Fisher has a closed form."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, classes)).eval()


def toy_data(n: int = 6, features: int = 2, classes: int = 3, seed: int = 0) -> TensorImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn((n, 1, 1, features), generator=g)
    labels = np.arange(n) % classes
    return TensorImageDataset("toy", images, labels, np.arange(n), [str(c) for c in range(classes)])


def closed_form(model: nn.Module, data: TensorImageDataset, labels: torch.Tensor | None = None):
    """The Fisher of softmax regression, worked by hand.

    The gradient of ``log p(y | x)`` w.r.t. ``W`` is ``(onehot(y) - p) x^T`` and w.r.t. ``b``
    is ``onehot(y) - p``. Taking the expectation over ``y ~ p`` entry by entry:
    ``sum_y p_y (delta_yc - p_c)^2 = p_c (1 - p_c)^2 + (1 - p_c) p_c^2 = p_c (1 - p_c)``, so
    ``F_W[c, d] = mean_n p_nc (1 - p_nc) x_nd^2`` and ``F_b[c] = mean_n p_nc (1 - p_nc)``.
    With given labels (the empirical Fisher) the expectation is replaced by ``y_n``.
    """
    x = data.images.reshape(len(data), -1).double()
    weight, bias = model[1].weight.detach().double(), model[1].bias.detach().double()
    p = torch.softmax(x @ weight.T + bias, dim=1)
    if labels is None:
        per_class = p * (1 - p)
        return {"1.weight": (per_class.T @ x.pow(2)) / len(x), "1.bias": per_class.mean(dim=0)}
    residual = nn.functional.one_hot(labels, p.shape[1]).double() - p
    return {
        "1.weight": (residual.pow(2).T @ x.pow(2)) / len(x),
        "1.bias": residual.pow(2).mean(dim=0),
    }


def assert_fisher(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ the Fisher


def test_expected_fisher_of_softmax_regression_is_p_times_one_minus_p_times_x_squared() -> None:
    model, data = softmax_regression(0), toy_data()
    # Batches of 4 over 6 examples: the per-example squares are summed across batches.
    got = diagonal_fisher(model, data.images, mode="expected", batch_size=4)
    assert_fisher(got, closed_form(model, data))


def test_the_fisher_is_a_mean_of_per_example_squares_not_a_squared_batch_gradient() -> None:
    model, data = softmax_regression(0), toy_data()
    labels = torch.as_tensor(data.labels)
    got = diagonal_fisher(model, data.images, labels, mode="empirical", batch_size=6)
    # The square of the batch's mean gradient (onehot(y) - p for the bias) is another, smaller quantity.
    p = torch.softmax(model(data.images), dim=1).detach().double()
    batch_gradient = (nn.functional.one_hot(labels, 3).double() - p).mean(dim=0)
    assert not torch.allclose(got["1.bias"], batch_gradient.pow(2), rtol=0.1)
    # How the examples are batched changes nothing.
    for size in (1, 4):
        again = diagonal_fisher(model, data.images, labels, mode="empirical", batch_size=size)
        for key in got:
            torch.testing.assert_close(again[key], got[key], rtol=1e-6, atol=1e-9)


def test_empirical_fisher_uses_the_true_labels() -> None:
    model, data = softmax_regression(1), toy_data()
    labels = torch.as_tensor(data.labels)
    got = diagonal_fisher(model, data.images, labels, mode="empirical", batch_size=4)
    assert_fisher(got, closed_form(model, data, labels))


def test_sampled_fisher_draws_one_label_per_example_from_the_model() -> None:
    model, data = softmax_regression(2), toy_data()
    got = diagonal_fisher(model, data.images, mode="sampled", generator=torch.Generator().manual_seed(5), batch_size=6)
    # The same draws, made by hand: one multinomial draw per example from p(y | x).
    p = torch.softmax(model(data.images), dim=1).detach().double()
    drawn = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(5)).squeeze(1)
    assert_fisher(got, closed_form(model, data, drawn))


def test_sampled_fisher_averages_to_the_expected_fisher() -> None:
    model = softmax_regression(2)
    data = toy_data(n=4)
    many = data.images.repeat(3000, 1, 1, 1)  # 12 000 draws over 4 examples
    sampled = diagonal_fisher(model, many, mode="sampled", batch_size=4000)
    expected = closed_form(model, data)
    for key in expected:
        torch.testing.assert_close(sampled[key], expected[key], rtol=0.05, atol=1e-3)


class ItemCalling(nn.Module):
    """Softmax regression whose forward pass reads a Python number: vmap cannot trace it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 if float(x.abs().sum().item()) >= 0 else 2.0
        return self.inner(x) * scale


def test_models_vmap_cannot_trace_fall_back_to_a_loop_with_the_same_fisher() -> None:
    inner, data = softmax_regression(0), toy_data()
    model = ItemCalling(inner).eval()
    targets = torch.eye(3)[torch.as_tensor(data.labels)]
    with pytest.raises(RuntimeError):
        log_prob_gradients(model, data.images, targets)
    looped = log_prob_gradients(model, data.images, targets, vectorize=False)
    vectorized = log_prob_gradients(inner, data.images, targets)
    torch.testing.assert_close(looped["inner.1.weight"], vectorized["1.weight"])
    got = diagonal_fisher(model, data.images, batch_size=4)
    expected = closed_form(inner, data)
    assert_fisher({k.removeprefix("inner."): v for k, v in got.items()}, expected)


def test_fisher_guards() -> None:
    model, data = softmax_regression(0), toy_data()
    with pytest.raises(ValueError, match="mode must be one of"):
        diagonal_fisher(model, data.images, mode="exact")
    with pytest.raises(ValueError, match="at least one example"):
        diagonal_fisher(model, data.images[:0])
    with pytest.raises(ValueError, match="one true label per example"):
        diagonal_fisher(model, data.images, mode="empirical")
    with pytest.raises(ValueError, match="label 5 but the model outputs 3 classes"):
        diagonal_fisher(model, data.images, torch.tensor([0, 1, 2, 5, 0, 1]), mode="empirical")


# ------------------------------------------------------------------ the weighted average


def test_merge_shares_and_the_average_by_hand() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [5.0, -2.0, 0.0]], dtype=torch.float64)
    fishers = torch.tensor([[1.0, 0.5, 0.0], [3.0, 0.5, 2.0]], dtype=torch.float64)
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    # Entry 0: (1*1 + 3*5) / 4 = 4; entry 1: equal Fishers, the plain mean 0; entry 2: only model 2 counts.
    merged = fisher_average(values, fishers, weights, epsilon=0.0)
    torch.testing.assert_close(merged, torch.tensor([4.0, 0.0, 0.0], dtype=torch.float64))
    shares = merge_shares(fishers, torch.tensor([1.0, 3.0]), epsilon=0.0)
    torch.testing.assert_close(shares[:, 0], torch.tensor([1 / 10, 9 / 10], dtype=torch.float64))
    torch.testing.assert_close(shares[:, 1], torch.tensor([1 / 4, 3 / 4], dtype=torch.float64))
    torch.testing.assert_close(shares.sum(dim=0), torch.ones(3, dtype=torch.float64))


def test_the_floor_and_entries_without_any_fisher() -> None:
    values = torch.tensor([[1.0, 4.0], [3.0, 8.0]], dtype=torch.float64)
    fishers = torch.tensor([[0.0, 0.0], [1e-3, 0.0]], dtype=torch.float64)
    weights = torch.tensor([1.0, 3.0], dtype=torch.float64)
    # Floored at 1e-3: entry 0 has equal Fishers (the weighted mean 2.5), entry 1 too (7).
    torch.testing.assert_close(
        fisher_average(values, fishers, weights, epsilon=1e-3), torch.tensor([2.5, 7.0]).double()
    )
    # No floor: entry 0 is model 2's alone; entry 1 has no Fisher at all and falls back to the weighted mean.
    torch.testing.assert_close(fisher_average(values, fishers, weights, epsilon=0.0), torch.tensor([3.0, 7.0]).double())


def test_equal_fishers_reduce_to_the_weighted_average() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randn((3, 4, 5), generator=g, dtype=torch.float64)
    fisher = torch.rand((4, 5), generator=g, dtype=torch.float64)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    merged = fisher_average(values, fisher.expand(3, 4, 5), weights)
    torch.testing.assert_close(merged, (weights.view(3, 1, 1) * values).sum(dim=0))


# ------------------------------------------------------------------ the merger


def hand_merge(models, data, weights, epsilon, normalize=False):
    """Fisher merging of softmax regressions with the closed-form Fishers, in float64."""
    fishers = [closed_form(m, data) for m in models]
    lam = torch.as_tensor(weights, dtype=torch.float64)
    if normalize:
        lam = lam / torch.stack([torch.cat([f.reshape(-1) for f in fi.values()]).norm() for fi in fishers])
    out = {}
    for key, attr in (("1.weight", "weight"), ("1.bias", "bias")):
        floored = torch.stack([fi[key].clamp_min(epsilon) for fi in fishers])
        values = torch.stack([getattr(m[1], attr).detach().double() for m in models])
        view = lam.view(-1, *[1] * (floored.ndim - 1))
        out[key] = (view * floored * values).sum(dim=0) / (view * floored).sum(dim=0)
    return out


@pytest.mark.parametrize("normalize", [False, True])
def test_merger_is_the_fisher_weighted_average_worked_by_hand(normalize: bool) -> None:
    models = [softmax_regression(0), softmax_regression(1)]
    data = toy_data()
    merger = Fisher(weights=[0.25, 0.75], epsilon=1e-4, normalize=normalize, batch_size=4)
    out = merger.merge({"a": models[0], "b": models[1]}, Context(data=data, quiet=True))
    expected = hand_merge(models, data, [0.25, 0.75], 1e-4, normalize)
    torch.testing.assert_close(out.model[1].weight.double(), expected["1.weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.model[1].bias.double(), expected["1.bias"], rtol=1e-5, atol=1e-6)
    plain = 0.25 * models[0][1].weight + 0.75 * models[1][1].weight
    assert not torch.allclose(out.model[1].weight, plain, atol=1e-3)  # the Fisher made a difference
    results = out.results
    fishers = [closed_form(m, data) for m in models]
    mass = [float(sum(f.sum() for f in fi.values())) for fi in fishers]
    np.testing.assert_allclose(results["fisher_mass"].values, mass, rtol=1e-5)
    np.testing.assert_allclose(results["weights"].values, [0.25, 0.75])
    np.testing.assert_allclose(results["share"].sum("model").values, [1.0])
    assert results["share"].dims == ("model", "layer") and list(results["layer"].values) == ["1"]
    assert int(results["samples"]) == 6 and str(results["labels"].values) == "expected"


def test_equal_fishers_merge_to_the_plain_average() -> None:
    # Adding one constant to every logit changes no probability, hence no Fisher: the merge is the plain average.
    a = softmax_regression(0)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[1].bias += 0.7
    out = Fisher(weights=[0.25, 0.75]).merge({"a": a, "b": b}, Context(data=toy_data(), quiet=True))
    torch.testing.assert_close(out.model[1].bias, a[1].bias + 0.75 * 0.7)
    torch.testing.assert_close(out.model[1].weight, a[1].weight)
    np.testing.assert_allclose(out.results["mean_share"].values, [0.25, 0.75], rtol=1e-6)
    assert float(out.results["accuracy"]) == float(out.results["average_accuracy"])


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 3)).eval()


def test_a_model_with_zero_fisher_on_an_entry_leaves_the_others_value() -> None:
    dead, alive = mlp(0), mlp(1)
    with torch.no_grad():  # hidden unit 0 of one model never fires: its weights do not change its output
        dead[1].bias[0] = -100.0
        alive[1].weight[0] = torch.tensor([1.0, -0.5])
        alive[1].bias[0] = 3.0
    data = toy_data()
    out = Fisher(epsilon=0.0).merge({"dead": dead, "alive": alive}, Context(data=data, quiet=True))
    merged = out.model
    torch.testing.assert_close(merged[1].weight[0], alive[1].weight[0])
    torch.testing.assert_close(merged[1].bias[0], alive[1].bias[0])
    torch.testing.assert_close(merged[3].weight[:, 0], alive[3].weight[:, 0])
    # With the default floor the dead model still counts, with the floor 1e-6 as its Fisher.
    floored = Fisher().merge({"dead": dead, "alive": alive}, Context(data=data, quiet=True)).model
    f_alive = float(diagonal_fisher(alive, data.images)["1.bias"][0].clamp_min(1e-6))
    expected = (1e-6 * -100.0 + f_alive * 3.0) / (1e-6 + f_alive)
    assert float(floored[1].bias[0].detach()) == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(3.0, abs=1e-3)
    assert float(out.results["below_floor"].sel(model="dead")) == 0.0  # no floor, nothing below it
    share = out.results["share"].sel(layer="1")
    assert float(share.sel(model="alive")) > 0.5


def test_an_alignment_maps_the_models_before_their_fishers_are_taken() -> None:
    data = example_dataset()
    model = example_models(1)["model0"]
    groups = channel_groups(model, example_input(data))
    perms = random_permutations(groups, seed=3)
    scrambled = permute(model, perms, groups)
    # The reference's unit j is the scrambled model's unit argsort(perm)[j].
    transforms = {g.name: permutation_matrix(np.argsort(perms[g.name])) for g in groups if g.name in perms}
    alignment = Alignment("a", {"b": transforms})
    context = Context(data=data, quiet=True)
    out = Fisher(samples=16).merge({"a": model, "b": scrambled}, context, alignment=alignment)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(out.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    unaligned = Fisher(samples=16).merge({"a": model, "b": scrambled}, context)
    assert not torch.allclose(unaligned.model[1].weight, model[1].weight, atol=1e-3)
    with pytest.raises(ConfigError, match="reference 'z' is not among"):
        Fisher(samples=16).merge({"a": model, "b": scrambled}, context, alignment=Alignment("z"))


def bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        net[2].running_mean.uniform_(-1, 1, generator=torch.Generator().manual_seed(seed))
        net[2].running_var.uniform_(0.5, 2, generator=torch.Generator().manual_seed(seed + 10))
    return net.eval()


def test_batchnorm_statistics_are_averaged_or_recomputed_and_fishers_are_taken_in_eval_mode() -> None:
    a, b = bn_net(0), bn_net(1)
    data = example_dataset()
    context = Context(data=data, quiet=True)
    kept = Fisher(reset_batchnorm=False, weights=[1, 3], samples=12).merge({"a": a, "b": b}, context)
    bn = kept.model[2]
    torch.testing.assert_close(bn.running_mean, 0.25 * a[2].running_mean + 0.75 * b[2].running_mean)
    torch.testing.assert_close(bn.running_var, 0.25 * a[2].running_var + 0.75 * b[2].running_var)
    assert str(kept.results["batchnorm_statistics"].values) == "averaged"
    reset = Fisher(weights=[1, 3], samples=12).merge({"a": a, "b": b}, context)
    assert str(reset.results["batchnorm_statistics"].values) == "recomputed"
    assert not torch.allclose(reset.model[2].running_mean, bn.running_mean)
    torch.testing.assert_close(reset.model[1].weight, kept.model[1].weight)  # the weights are the same merge

    # A model handed over in training mode is measured in eval mode (running statistics) and handed back as it was.
    a.train()
    images, _ = Fisher(samples=12).examples(data)
    in_train = Fisher(samples=12)._fisher(a, images, torch.zeros(12, dtype=torch.long), context, "a")
    assert a.training
    a.eval()
    in_eval = diagonal_fisher(a, images)
    for key in in_eval:
        torch.testing.assert_close(in_train[key], in_eval[key])


def test_examples_are_a_seeded_subset_shared_by_every_model_and_merges_are_deterministic() -> None:
    data = example_dataset()  # 48 items stored class by class
    images, labels = Fisher(samples=12, seed=1).examples(data)
    again, _ = Fisher(samples=12, seed=1).examples(data)
    other, _ = Fisher(samples=12, seed=2).examples(data)
    assert images.shape[0] == 12 and torch.equal(images, again) and not torch.equal(images, other)
    assert len(set(labels.tolist())) == 3  # a random draw, not the first class only
    assert Fisher(samples=1000).examples(data)[0].shape[0] == 48

    models = example_models(2)
    context = Context(data=data, quiet=True)
    for labels_mode in ("sampled", "empirical"):
        first = Fisher(samples=12, labels=labels_mode, seed=4).merge(copy.deepcopy(models), context)
        second = Fisher(samples=12, labels=labels_mode, seed=4).merge(copy.deepcopy(models), context)
        assert first.results.identical(second.results)
        for key, value in first.model.state_dict().items():
            assert torch.equal(value, second.model.state_dict()[key])
    seeded = Fisher(samples=12, seed=5, labels="sampled").merge(copy.deepcopy(models), context)
    assert not np.allclose(seeded.results["fisher_mass"].values, first.results["fisher_mass"].values)


def test_results_and_describe() -> None:
    out = Fisher(samples=24).merge(example_models(2), Context(data=example_dataset(), quiet=True))
    results = out.results
    assert set(results["layer"].values) == {"1", "3"}
    for name in ("fisher_mean", "share"):
        assert results[name].dims == ("model", "layer")
    for name in ("weights", "fisher_mass", "mean_share", "below_floor"):
        assert results[name].dims == ("model",)
    # The mean Fisher of a layer is its mass over its entries (16*8 + 8 and 8*3 + 3).
    total = results["fisher_mean"].sel(layer="1") * 136 + results["fisher_mean"].sel(layer="3") * 27
    np.testing.assert_allclose(total.values, results["fisher_mass"].values)
    assert 0.0 < float(results["distance_from_average"]) < 1.0 and int(results["unweighted_entries"]) == 0
    text = Fisher().describe(results)
    shares = "/".join(f"{v:.2f}" for v in results["mean_share"].values)
    assert text.startswith(f"expected Fisher on 24 samples, mean shares {shares}: accuracy ")
    assert "(plain average " in text


@pytest.mark.parametrize("labels", ["expected", "sampled"])
def test_every_tensor_stays_on_the_models_device_and_the_merge_equals_the_cpu_merge(labels: str) -> None:
    data = example_dataset()
    merger = Fisher(samples=12, labels=labels)
    on_cpu = merger.merge(example_models(2), Context(data=data, quiet=True))
    with SimulatedAccelerator() as gpu:
        models = {name: m.to(gpu.device) for name, m in example_models(2).items()}
        on_device = merger.merge(models, Context(data=data, quiet=True, device=gpu.device))
        assert all(gpu.on_device(p) for p in on_device.model.parameters())
    assert on_device.results.identical(on_cpu.results)
    for key, value in on_cpu.model.state_dict().items():
        assert torch.equal(on_device.model.state_dict()[key].cpu(), value)


# ------------------------------------------------------------------ guards


def test_guards_name_what_is_wrong() -> None:
    models = example_models(2)
    context = Context(data=example_dataset(), quiet=True)
    with pytest.raises(ConfigError, match=r"no \[data\]") as info:
        Fisher().merge(models, Context(quiet=True))
    assert "key 'data'" in str(info.value)
    with pytest.raises(ConfigError, match="at least two models"):
        Fisher().merge({"a": models["model0"]}, context)
    with pytest.raises(ConfigError, match="'weights' has 3 values but the step has 2 models"):
        Fisher(weights=[1, 1, 1]).merge(models, context)
    with pytest.raises(ConfigError, match="cannot merge models"):
        Fisher().merge({"a": models["model0"], "b": example_models(hidden=5)["model1"]}, context)
    empty = TensorImageDataset("empty", torch.zeros(0, 1, 4, 4), [], [], list("abc"))
    with pytest.raises(ConfigError, match="key 'data': .*the data is empty"):
        Fisher().merge(models, Context(data=empty, quiet=True))
    wide = TensorImageDataset("wide", torch.randn(6, 1, 4, 4), [0, 1, 2, 3, 4, 5], np.arange(6), list("abcdef"))
    with pytest.raises(ConfigError, match="key 'labels': .* the data has label 5 and the models output 3 classes"):
        Fisher(labels="empirical").merge(models, Context(data=wide, quiet=True))


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="'weights' must be a list of at least 2 non-negative numbers"):
        Fisher(weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="'weights' must hold a positive weight"):
        Fisher(weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="'epsilon' must be a non-negative number"):
        Fisher(epsilon=-1e-6)
    with pytest.raises(ValueError, match="'labels' must be one of 'expected', 'sampled', 'empirical'"):
        Fisher(labels="true")
    with pytest.raises(ValueError, match="'samples' must be a positive integer"):
        Fisher(samples=0)
