"""Tests of AdaMerging: the merge equations and the entropy gradient by hand, the optimisation, BatchNorm, guards."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from mergescope.components import Alignment, Context, TensorImageDataset
from mergescope.errors import ConfigError
from mergescope.groups import channel_groups, permutation_matrix, permute
from mergescope.options import structure_options
from mergescope.task_vectors import example_finetunes
from mergescope.testing import check_component, example_dataset, example_models
from mergescope_plugins.adamerging import (
    AdaMerging,
    coefficients_in_use,
    learn_coefficients,
    merged_parameters,
    shuffled_batches,
    softmax_entropy,
    weighted_task_vector,
)
from mergescope_plugins.task_arithmetic import TaskArithmetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quiet(data=None, **kwargs) -> Context:
    return Context(data=data, quiet=True, **kwargs)


def finetunes_with_bn() -> dict[str, nn.Module]:
    """A base MLP with a BatchNorm layer and two fine-tunes whose running statistics differ."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    out = {"base": base}
    for i, name in enumerate(["ft_a", "ft_b"]):
        tuned = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
            tuned[2].running_mean.normal_(generator=gen)
            tuned[2].running_var.uniform_(0.5, 2.0, generator=gen)
        out[name] = tuned
    return out


# ----------------------------------------------------------------------- equations


def test_softmax_entropy_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 5.0]], dtype=torch.float64)
    # p = (1/2, 1/2) -> log 2; p = (1/4, 3/4) -> -(1/4 log 1/4 + 3/4 log 3/4); shifts do not matter.
    expected = [math.log(2.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2.0)]
    torch.testing.assert_close(softmax_entropy(logits), torch.tensor(expected, dtype=torch.float64))
    # One overwhelming logit: a certain prediction, entropy 0 and not NaN.
    assert float(softmax_entropy(torch.tensor([[1000.0, 0.0]]))[0]) == 0.0


def test_merged_parameters_task_wise_and_layer_wise_by_hand() -> None:
    base = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    taus = [
        {"w": torch.tensor([1.0, -1.0]), "b": torch.tensor([2.0])},
        {"w": torch.tensor([0.0, 4.0]), "b": torch.tensor([-1.0])},
    ]
    keys = ["w", "b"]
    # Task-wise: theta = theta_0 + 0.5 tau_1 + 0.25 tau_2 on every tensor.
    task = merged_parameters(base, taus, torch.tensor([[0.5], [0.25]]), keys)
    assert task["w"].tolist() == [1.5, 2.5] and task["b"].tolist() == [1.25]
    # Layer-wise: column l holds the coefficients of tensor keys[l].
    layer = merged_parameters(base, taus, torch.tensor([[0.5, 1.0], [0.25, 0.0]]), keys)
    assert layer["w"].tolist() == [1.5, 2.5] and layer["b"].tolist() == [2.5]
    delta = weighted_task_vector(taus, torch.tensor([[0.5, 1.0], [0.25, 0.0]]), keys)
    assert delta["w"].tolist() == [0.5, 0.5] and delta["b"].tolist() == [2.0]
    with pytest.raises(ValueError, match=r"\(2, 1\) or \(2, 2\); got \(2, 3\)"):
        merged_parameters(base, taus, torch.zeros(2, 3), keys)


def test_entropy_gradient_matches_the_hand_derivation_and_finite_differences() -> None:
    """For logits z = W x + b: dH/dz = -p (log p + H), so dH/dlambda_k^W = g^T T_k x and dH/dlambda_k^b = g^T t_k."""
    gen = torch.Generator().manual_seed(0)
    module = nn.Linear(3, 2).double()
    base = {
        "weight": torch.randn(2, 3, generator=gen, dtype=torch.float64),
        "bias": torch.randn(2, generator=gen).double(),
    }
    taus = [{k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in base.items()} for _ in range(2)]
    keys = ["weight", "bias"]
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)

    def objective(coefficients: torch.Tensor) -> torch.Tensor:
        params = merged_parameters(base, taus, coefficients, keys)
        return softmax_entropy(functional_call(module, params, (x,))).mean()

    lam = torch.tensor([[0.3, 0.6], [0.2, 0.9]], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(objective(lam), lam)

    # By hand, in NumPy.
    lam_np = lam.detach().numpy()
    w = base["weight"].numpy() + sum(lam_np[k, 0] * taus[k]["weight"].numpy() for k in range(2))
    b = base["bias"].numpy() + sum(lam_np[k, 1] * taus[k]["bias"].numpy() for k in range(2))
    z = x.numpy() @ w.T + b
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    h = -(p * log_p).sum(axis=1, keepdims=True)
    g = -p * (log_p + h)  # dH_i / dz_i, one row per example
    expected = np.zeros((2, 2))
    for k in range(2):
        expected[k, 0] = np.mean(np.sum(g * (x.numpy() @ taus[k]["weight"].numpy().T), axis=1))
        expected[k, 1] = np.mean(g @ taus[k]["bias"].numpy())
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-10, atol=1e-12)

    # Task-wise: one coefficient per task vector, whose gradient is the sum over its tensors.
    task = torch.tensor([[0.4], [0.7]], dtype=torch.float64, requires_grad=True)
    (task_grad,) = torch.autograd.grad(objective(task), task)
    eps = 1e-6
    for k in range(2):
        up, down = task.detach().clone(), task.detach().clone()
        up[k, 0] += eps
        down[k, 0] -= eps
        finite = (float(objective(up)) - float(objective(down))) / (2 * eps)
        assert float(task_grad[k, 0]) == pytest.approx(finite, rel=1e-6, abs=1e-10)


def test_coefficients_in_use_clip_only_when_asked() -> None:
    raw = torch.tensor([[-0.5, 0.3, 1.7]])
    assert coefficients_in_use(raw, True).tolist() == [[0.0, pytest.approx(0.3), 1.0]]
    assert coefficients_in_use(raw, False) is raw


def test_learn_coefficients_is_adam_on_the_objective_and_clipping_stops_the_gradient() -> None:
    """A convex toy objective sum (c - target)^2 in place of the entropy: Adam walks to its minimum."""
    batches = iter(lambda: torch.zeros(1), None)  # endless dummy batches; the toy objective ignores them
    target = torch.tensor([[0.7], [1.5]])  # the second minimum lies beyond the clipping

    def objective(c: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return ((c - target) ** 2).sum()

    start = torch.tensor([[0.3], [0.9]])
    clipped = learn_coefficients(objective, start, batches, iterations=100, lr=0.03, clamp=True)
    assert clipped.entropy.shape == (100,) and clipped.path.shape == (100, 2)
    assert clipped.entropy[0] == pytest.approx(0.4**2 + 0.6**2)
    assert clipped.path[0].tolist() == pytest.approx([0.3, 0.9])  # the coefficients in use before each update
    assert float(clipped.coefficients[0, 0]) == pytest.approx(0.7, abs=0.01)
    # The used value stops at 1, where the clipped coefficient has no gradient left.
    assert float(clipped.coefficients[1, 0]) == 1.0
    assert clipped.entropy[-1] == pytest.approx(0.5**2, abs=1e-3)
    free = learn_coefficients(objective, start, batches, iterations=100, lr=0.03, clamp=False)
    assert free.coefficients[:, 0].tolist() == pytest.approx([0.7, 1.5], abs=0.01)
    assert torch.equal(start, torch.tensor([[0.3], [0.9]]))  # the start is not modified
    with pytest.raises(FloatingPointError, match="lower 'lr'"):
        learn_coefficients(lambda c, i: c.sum() * float("nan"), start, batches, iterations=1, lr=0.1, clamp=True)


def test_shuffled_batches_are_whole_seeded_permutations() -> None:
    data = example_dataset(n=10)
    first = shuffled_batches(data, 4, torch.Generator().manual_seed(3), torch.device("cpu"))
    batches = [next(first) for _ in range(4)]  # two epochs of two batches of 4 (2 of the 10 skipped each time)
    assert all(tuple(b.shape) == (4, 1, 4, 4) for b in batches)
    rows = {tuple(img.flatten().tolist()) for img in torch.cat(batches[:2])}
    assert len(rows) == 8  # no image twice within an epoch
    again = shuffled_batches(data, 4, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert all(torch.equal(b, next(again)) for b in batches)
    small = shuffled_batches(data, 64, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert tuple(next(small).shape) == (10, 1, 4, 4)  # fewer images than a batch: all of them


# ------------------------------------------------------------------------- merging


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_zero_iterations_is_task_arithmetic_with_the_initial_scaling(granularity: str) -> None:
    models = example_finetunes(2)
    data = example_dataset()
    out = AdaMerging(iterations=0, granularity=granularity).merge(models, quiet(data))
    arithmetic = TaskArithmetic(scaling=0.3).merge(models, quiet(data))
    for key, tensor in arithmetic.model.state_dict().items():
        torch.testing.assert_close(out.model.state_dict()[key], tensor, rtol=1e-7, atol=0)
    res = out.results
    np.testing.assert_array_equal(res["coefficient"].values, np.full(res["coefficient"].shape, 0.3))
    assert res.sizes["iteration"] == 0
    assert float(res["accuracy"]) == pytest.approx(float(arithmetic.results["accuracy"]))
    assert float(res["initial_loss"]) == float(res["loss"])
    assert float(res["initial_mean_entropy"]) == float(res["mean_entropy"])


def test_merged_model_is_the_base_plus_the_learned_layer_wise_combination() -> None:
    models = example_finetunes(2)
    out = AdaMerging(granularity="layer", iterations=15, lr=0.05).merge(models, quiet(example_dataset()))
    res = out.results
    keys = list(models["model0"].state_dict())
    assert res["coefficient"].dims == ("model", "layer")
    assert list(res["layer"].values) == keys and list(res["model"].values) == ["model1", "model2"]
    lam = res["coefficient"].values
    assert not np.allclose(lam, 0.3) and ((lam >= 0) & (lam <= 1)).all()
    np.testing.assert_allclose(res["mean_coefficient"].values, lam.mean(axis=1))
    base = models["model0"].state_dict()
    for position, key in enumerate(keys):
        expected = base[key].double() + sum(
            lam[k, position] * (models[f"model{k + 1}"].state_dict()[key].double() - base[key].double())
            for k in range(2)
        )
        torch.testing.assert_close(out.model.state_dict()[key], expected.float())
    assert res["entropy"].dims == ("iteration",) and res.sizes["iteration"] == 15
    assert res["coefficient_path"].dims == ("iteration", "model")
    np.testing.assert_allclose(res["coefficient_path"].values[0], [0.3, 0.3])
    assert "merged_scaling" not in res and str(res["granularity"].values) == "layer"


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_the_entropy_decreases(granularity: str) -> None:
    models = example_finetunes(2, scale=0.3)
    data = example_dataset()
    # Full batches: every step sees the same objective, the mean entropy over the data.
    out = AdaMerging(granularity=granularity, iterations=40, lr=0.02, batch_size=64).merge(models, quiet(data))
    res = out.results
    curve = res["entropy"].values
    assert curve[0] == pytest.approx(float(res["initial_mean_entropy"]), rel=1e-5)
    assert curve[-1] < curve[0] - 1e-3
    assert float(res["mean_entropy"]) < float(res["initial_mean_entropy"])
    assert float(res["mean_entropy"]) == pytest.approx(curve[-1], abs=0.02)  # one more step after the last measure


def test_deterministic_under_the_seed_and_the_seed_matters() -> None:
    models = example_finetunes(2, scale=0.3)
    data = example_dataset()

    def run(seed: int):
        return AdaMerging(iterations=10, lr=0.05, batch_size=8, seed=seed).merge(copy.deepcopy(models), quiet(data))

    first, second, other = run(1), run(1), run(2)
    assert first.results.identical(second.results)
    for key, tensor in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[key], tensor)
    assert not np.array_equal(first.results["entropy"].values, other.results["entropy"].values)


def test_inputs_are_left_untouched() -> None:
    models = finetunes_with_bn()
    before = copy.deepcopy(models)
    AdaMerging(iterations=3, batch_size=16).merge(models, quiet(example_dataset()))
    for name, model in models.items():
        assert not model.training
        for key, tensor in before[name].state_dict().items():
            assert torch.equal(model.state_dict()[key], tensor), (name, key)


# ----------------------------------------------------------------------- BatchNorm


def initial_merge(models: dict[str, nn.Module]) -> nn.Sequential:
    """base + 0.3 (tau_a + tau_b) with the fine-tunes' averaged running statistics."""
    merged = copy.deepcopy(models["base"])
    states = {n: m.state_dict() for n, m in models.items()}
    with torch.no_grad():
        for key, tensor in merged.state_dict().items():
            if key.endswith(("running_mean", "running_var")):
                tensor.copy_((states["ft_a"][key] + states["ft_b"][key]) / 2)
            elif tensor.is_floating_point():
                tensor.add_(
                    0.3 * (states["ft_a"][key] - states["base"][key] + states["ft_b"][key] - states["base"][key])
                )
    return merged


def test_batchnorm_uses_batch_statistics_while_learning_when_it_is_reset_after() -> None:
    models = finetunes_with_bn()
    data = example_dataset()
    merged = initial_merge(models)
    with torch.no_grad():
        running_stats = softmax_entropy(merged.eval()(data.images)).mean()
        # Training mode: the batch's own statistics (on a copy, whose running statistics it moves).
        batch_stats = softmax_entropy(copy.deepcopy(merged).train()(data.images)).mean()
    assert abs(float(batch_stats) - float(running_stats)) > 1e-3  # the two choices differ here

    reset = AdaMerging(iterations=2, batch_size=len(data)).merge(models, quiet(data))
    assert float(reset.results["entropy"][0]) == pytest.approx(float(batch_stats), rel=1e-5)
    assert str(reset.results["batchnorm_statistics"].values) == "recomputed"
    with torch.no_grad():
        features = reset.model[1](reset.model[0](data.images))
    torch.testing.assert_close(reset.model[2].running_mean, features.mean(dim=0), rtol=1e-5, atol=1e-5)

    kept = AdaMerging(iterations=2, batch_size=len(data), reset_batchnorm=False).merge(models, quiet(data))
    assert float(kept.results["entropy"][0]) == pytest.approx(float(running_stats), rel=1e-5)
    assert str(kept.results["batchnorm_statistics"].values) == "averaged"
    average = (models["ft_a"][2].running_var + models["ft_b"][2].running_var) / 2
    torch.testing.assert_close(kept.model[2].running_var, average)


def test_batch_statistics_need_two_images_per_batch() -> None:
    with pytest.raises(ConfigError, match="at least 2 images per batch") as info:
        AdaMerging(iterations=1, batch_size=1).merge(finetunes_with_bn(), quiet(example_dataset()))
    assert info.value.where == "key 'batch_size'"
    # Without BatchNorm layers, or with their running statistics kept, a batch of one is fine.
    AdaMerging(iterations=1, batch_size=1).merge(example_finetunes(2), quiet(example_dataset()))
    AdaMerging(iterations=1, batch_size=1, reset_batchnorm=False).merge(finetunes_with_bn(), quiet(example_dataset()))


# -------------------------------------------------------------------------- guards


def test_needs_data() -> None:
    with pytest.raises(ConfigError, match="needs data: add \\[data\\]") as info:
        AdaMerging().merge(example_finetunes(2), quiet())
    assert info.value.where == "key 'data'"


def test_models_must_be_finetunes_of_the_base() -> None:
    data = example_dataset()
    with pytest.raises(ConfigError, match="model 'model1' does not look like a fine-tune of the base model 'model0'"):
        AdaMerging(iterations=1).merge(example_models(2), quiet(data))
    with pytest.raises(ConfigError, match="needs the base and at least one fine-tune"):
        AdaMerging(iterations=1).merge({"model0": example_finetunes(1)["model0"]}, quiet(data))
    with pytest.raises(ConfigError, match="base model 'theta0' is not among the step's models"):
        AdaMerging(base="theta0").merge(example_finetunes(2), quiet(data))
    with pytest.raises(ConfigError, match="the alignment's reference 'elsewhere' is not among this step's models"):
        AdaMerging().merge(example_finetunes(2), quiet(data), alignment=Alignment("elsewhere"))


def test_an_alignment_maps_the_models_onto_its_reference_first() -> None:
    """A fine-tune given with its hidden units shuffled merges as the original once the alignment undoes it."""
    models = example_finetunes(2, scale=0.3)
    (group,) = channel_groups(models["model0"], torch.zeros(1, 16))
    perm = np.random.default_rng(0).permutation(group.size)
    shuffled = dict(models, model2=permute(models["model2"], {group.name: perm}, groups=[group]))
    back = Alignment("model0", {"model2": {group.name: permutation_matrix(np.argsort(perm))}})
    data = example_dataset()
    merger = AdaMerging(iterations=5, lr=0.05)
    expected = merger.merge(models, quiet(data))
    got = merger.merge(shuffled, quiet(data), alignment=back)
    for key, value in expected.model.state_dict().items():
        torch.testing.assert_close(got.model.state_dict()[key], value)
    np.testing.assert_allclose(got.results["coefficient"].values, expected.results["coefficient"].values, rtol=1e-6)
    with pytest.raises(ConfigError, match="does not look like a fine-tune"):
        merger.merge(shuffled, quiet(data))


def test_options() -> None:
    merger = AdaMerging()
    assert (merger.granularity, merger.iterations, merger.lr, merger.initial, merger.batch_size) == (
        "task",
        500,
        1e-3,
        0.3,
        32,
    )
    assert merger.clamp and merger.reset_batchnorm
    with pytest.raises(ValueError, match="'granularity' must be one of 'task', 'layer'"):
        AdaMerging(granularity="block")
    with pytest.raises(ValueError, match="'iterations' must be"):
        AdaMerging(iterations=-1)
    with pytest.raises(ValueError, match="'lr' must be"):
        AdaMerging(lr=0.0)
    with pytest.raises(ValueError, match=r"'initial' must be in \[0, 1\] while 'clamp' is on"):
        AdaMerging(initial=1.5)
    assert AdaMerging(initial=1.5, clamp=False).initial == 1.5
    with pytest.raises(ValueError, match="'batch_size' must be"):
        AdaMerging(batch_size=0)
    with pytest.raises(ConfigError, match="'initial'"):
        structure_options(AdaMerging, {"initial": -0.1})


def test_describe() -> None:
    models = example_finetunes(2)
    data = example_dataset()
    task = AdaMerging(iterations=3).merge(models, quiet(data)).results
    text = AdaMerging().describe(task)
    assert text.startswith("task-wise, base 'model0', lambda 0.3 -> model1 ") and " in 3 steps, entropy " in text
    assert ": accuracy " in text
    layer = AdaMerging(iterations=3, granularity="layer").merge(models, quiet(data)).results
    assert AdaMerging().describe(layer).startswith("layer-wise, base 'model0', mean lambda per tensor 0.3 -> model1 ")


def test_tensor_dataset_with_labels_outside_use_is_unlabeled_for_learning() -> None:
    """The labels never enter the objective: shuffling them changes the accuracy, not the coefficients."""
    models = example_finetunes(2, scale=0.3)
    data = example_dataset()
    shuffled = TensorImageDataset("shuffled", data.images, np.roll(data.labels, 1), data.sample_ids, data.classes)
    a = AdaMerging(iterations=5, lr=0.05).merge(models, quiet(data)).results
    b = AdaMerging(iterations=5, lr=0.05).merge(models, quiet(shuffled)).results
    np.testing.assert_array_equal(a["coefficient"].values, b["coefficient"].values)
    assert float(a["accuracy"]) != float(b["accuracy"])


@pytest.mark.parametrize("component", [AdaMerging(iterations=20), AdaMerging(iterations=5, granularity="layer")])
def test_conformance(component) -> None:
    check_component(component)
