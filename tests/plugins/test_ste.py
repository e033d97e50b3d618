"""The straight-through estimator (Git Re-Basin STE): its gradient, its projection, its results and its guards."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from simulated_device import SimulatedAccelerator
from torch import nn

from mergescope import Context, TensorImageDataset
from mergescope.errors import ConfigError
from mergescope.groups import align_to_reference, channel_groups, example_input, perm_from_matrix, permute
from mergescope.options import structure_options
from mergescope.testing import example_dataset, example_models
from mergescope_plugins.ste import (
    StraightThroughEstimator,
    midpoint,
    midpoint_loss,
    permute_tensors,
    straight_through,
)
from mergescope_plugins.weight_matching import WeightMatching, match_weights, permute_arrays

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _arrays(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}


def _perms(alignment, model: str) -> dict[str, np.ndarray]:
    return {g: perm_from_matrix(t) for g, t in alignment.transforms[model].items()}


def _batchnorm_mlp(seed: int) -> nn.Module:
    """flatten -> linear(16 -> 8) -> BatchNorm1d -> relu -> linear(8 -> 3), with stored statistics of its own."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[2].running_mean.normal_()
        model[2].running_var.uniform_(0.5, 2.0)
        model[2].weight.uniform_(0.5, 1.5)
        model[2].bias.normal_(0, 0.1)
    return model


# --------------------------------------------------------------------- the estimator


def test_the_forward_uses_the_projection_and_the_gradient_reaches_the_free_weights_halved():
    # A linear classifier: logits = x W^T + b. The midpoint is (theta_A + pi(theta_B)) / 2
    # whatever W~ is; d loss / d W~ = 1/2 * d loss / d midpoint, and for softmax
    # cross-entropy d loss / d logits = (softmax - onehot) / N, so by hand:
    #   d loss / d W_mid = G^T x,  d loss / d b_mid = sum of G's rows,  G = (softmax - onehot) / N.
    g = torch.Generator().manual_seed(0)
    theta_a = {"weight": torch.randn(2, 3, generator=g), "bias": torch.randn(2, generator=g)}
    projected = {"weight": torch.randn(2, 3, generator=g), "bias": torch.randn(2, generator=g)}
    free = {k: torch.randn(v.shape, generator=g).requires_grad_(True) for k, v in theta_a.items()}
    x = torch.randn(5, 3, generator=g)
    y = torch.tensor([0, 1, 1, 0, 1])

    loss = midpoint_loss(nn.Linear(3, 2), midpoint(theta_a, straight_through(projected, free)), x, y)
    loss.backward()

    w_mid = (theta_a["weight"] + projected["weight"]) / 2
    b_mid = (theta_a["bias"] + projected["bias"]) / 2
    logits = x @ w_mid.T + b_mid
    p = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
    onehot = torch.eye(2)[y]
    expected_loss = -(torch.log(p) * onehot).sum() / 5
    grad = (p - onehot) / 5
    torch.testing.assert_close(loss.detach(), expected_loss)
    torch.testing.assert_close(free["weight"].grad, 0.5 * grad.T @ x)
    torch.testing.assert_close(free["bias"].grad, 0.5 * grad.sum(dim=0))


def test_straight_through_keeps_the_projected_values_and_passes_other_keys_unchanged():
    projected = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    free = {"a": torch.tensor([10.0, -4.0], requires_grad=True)}
    out = straight_through(projected, free)
    assert out["a"].tolist() == [1.0, 2.0] and out["a"].requires_grad
    assert out["b"] is projected["b"]


def test_permute_tensors_moves_every_axis_of_a_group_as_permute_arrays_does():
    data = example_dataset()
    model = example_models(hidden=5)["model0"]
    groups = channel_groups(model, example_input(data))
    perms = {groups[0].name: np.array([2, 0, 4, 1, 3])}
    state = {k: v.detach() for k, v in model.state_dict().items()}
    moved = permute_tensors(state, groups, perms)
    # By hand: hidden unit j of the result is unit perm[j]: rows of the first layer, columns of the second.
    torch.testing.assert_close(moved["1.weight"], state["1.weight"][[2, 0, 4, 1, 3]])
    torch.testing.assert_close(moved["1.bias"], state["1.bias"][[2, 0, 4, 1, 3]])
    torch.testing.assert_close(moved["3.weight"], state["3.weight"][:, [2, 0, 4, 1, 3]])
    assert moved["3.bias"] is state["3.bias"]
    expected = permute_arrays(_arrays(model), groups, perms)
    for k, v in expected.items():
        np.testing.assert_allclose(moved[k].double().numpy(), v)


# --------------------------------------------------------------------- the aligner


def test_zero_epochs_give_weight_matching_of_the_reference_onto_the_other():
    data = example_dataset()
    models = example_models(n=2, hidden=8)
    groups = channel_groups(models["model0"], example_input(data))
    alignment = StraightThroughEstimator(epochs=0, seed=3, max_iter=50).align(
        models, "model0", Context(data=data, quiet=True)
    )
    expected, _ = match_weights(_arrays(models["model0"]), _arrays(models["model1"]), groups, seed=3, max_iter=50)
    found = _perms(alignment, "model1")
    assert found.keys() == expected.keys()
    for g in expected:
        np.testing.assert_array_equal(found[g], expected[g])
    d = alignment.diagnostics
    assert d.sizes["iteration"] == 0 and d["epoch"].values.tolist() == [0]
    assert float(d["final_loss"].item()) == float(d["weight_matching_loss"].item())


@pytest.mark.parametrize("statistics", [True, False])
def test_zero_epochs_follow_batchnorm_statistics_as_weight_matching_does(statistics):
    data = example_dataset()
    models = {"a": _batchnorm_mlp(0), "b": _batchnorm_mlp(1)}
    context = Context(data=data, quiet=True)
    ste = StraightThroughEstimator(epochs=0, batchnorm_statistics=statistics).align(models, "a", context)
    wm = WeightMatching(batchnorm_statistics=statistics).align(models, "a", context)
    for g, t in wm.transforms["b"].items():
        np.testing.assert_array_equal(perm_from_matrix(ste.transforms["b"][g]), perm_from_matrix(t))


@pytest.mark.parametrize("keep", ["best", "last"])
def test_a_permuted_copy_of_the_reference_is_recovered_exactly(keep):
    data = example_dataset(n=32)
    model = _batchnorm_mlp(0)
    groups = channel_groups(model, example_input(data))
    rng = np.random.default_rng(1)
    hidden = {g.name: rng.permutation(g.size) for g in groups}
    other = permute(model, hidden, groups)
    alignment = StraightThroughEstimator(epochs=3, batch_size=8, keep=keep).align(
        {"ref": model, "other": other}, "ref", Context(data=data, quiet=True)
    )
    for g in groups:
        found = perm_from_matrix(alignment.transforms["other"][g.name])
        np.testing.assert_array_equal(hidden[g.name][found], np.arange(g.size))
    d = alignment.diagnostics
    # The midpoint is the reference itself all along: no unit ever moves, every epoch scores alike.
    assert int(d["iteration_changes"].sum()) == 0 and int(d["from_weight_matching"].sum()) == 0
    np.testing.assert_allclose(d["epoch_loss"].values[0], float(d["weight_matching_loss"].item()), rtol=1e-6)


def _midpoint_model(models, alignment, data, reference="a", other="b") -> nn.Module:
    """The midpoint of the reference and the aligned other model, built independently of the aligner."""
    groups = channel_groups(models[reference], example_input(data))
    aligned = align_to_reference({other: models[other]}, alignment, groups)[other]
    merged = copy.deepcopy(models[reference])
    state_a, state_b = models[reference].state_dict(), aligned.state_dict()
    merged.load_state_dict({k: (v + state_b[k]) / 2 if v.is_floating_point() else v for k, v in state_a.items()})
    return merged


def _loss(model: nn.Module, data, *, train_batchnorm: bool) -> float:
    model.eval()
    if train_batchnorm:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.train()
    with torch.no_grad():
        logits = model(data.images)
    return float(nn.functional.cross_entropy(logits, torch.as_tensor(data.labels)))


@pytest.mark.parametrize("statistics", ["batch", "running"])
def test_the_reported_loss_is_the_midpoint_loss_with_the_chosen_batchnorm_statistics(statistics):
    # One batch holds the whole data, so "batch" is the midpoint normalising with the data's own statistics.
    data = example_dataset(n=24)
    models = {"a": _batchnorm_mlp(0), "b": _batchnorm_mlp(1)}
    alignment = StraightThroughEstimator(epochs=0, batch_size=24, midpoint_statistics=statistics).align(
        models, "a", Context(data=data, quiet=True)
    )
    merged = _midpoint_model(models, alignment, data)
    expected = _loss(merged, data, train_batchnorm=statistics == "batch")
    other_mode = _loss(merged, data, train_batchnorm=statistics != "batch")
    assert abs(expected - other_mode) > 1e-3  # the two modes really differ on this toy
    assert float(alignment.diagnostics["weight_matching_loss"].item()) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------- two independently trained models


@pytest.fixture(scope="module")
def rings():
    """Three classes by the radius of a 4-d Gaussian point (not linearly separable), as 1x2x2 images."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(192, 4, generator=g)
    labels = torch.bucketize(x.norm(dim=1), torch.tensor([1.6, 2.2])).numpy()
    return TensorImageDataset("rings", x.view(-1, 1, 2, 2), labels, np.arange(192), ["in", "mid", "out"])


@pytest.fixture(scope="module")
def trained(rings, one_torch_thread):
    """Two MLPs trained from different seeds (full-batch Adam) on the rings.

    Seeds 4 and 5 give a pair whose weight-matched midpoint is poor (loss 0.98, each
    model about 0.03): the case the estimator is for. On a pair whose weight-matched
    midpoint is already good (seeds 0 and 1, 0.238) the last projection ends level
    (0.239 after 10 epochs at ``lr = 1e-2``), which ``keep = "best"`` guards against.
    """
    models = {}
    for name, seed in (("a", 4), ("b", 5)):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        labels = torch.as_tensor(rings.labels)
        for _ in range(200):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(rings.images), labels).backward()
            optimizer.step()
        models[name] = model.eval()
    return models


def test_ste_lowers_the_midpoint_loss_of_weight_matching_on_trained_models(rings, trained):
    # keep = "last": the final projection, not a choice among candidates that include weight matching's.
    alignment = StraightThroughEstimator(epochs=6, lr=1e-2, batch_size=32, keep="last").align(
        trained, "a", Context(data=rings, quiet=True)
    )
    d = alignment.diagnostics.sel(model="b")
    assert int(d["kept_epoch"]) == 6
    assert float(d["final_loss"]) < float(d["weight_matching_loss"])
    assert int(d["from_weight_matching"].isel(epoch=-1)) > 0
    # The reported loss is that of the midpoint the alignment gives.
    merged = _midpoint_model(trained, alignment, rings)
    assert float(d["final_loss"]) == pytest.approx(_loss(merged, rings, train_batchnorm=False), rel=1e-5)


def test_keep_best_is_the_lowest_scored_epoch_and_never_worse_than_weight_matching(rings, trained):
    alignment = StraightThroughEstimator(epochs=4, lr=3e-2, batch_size=32).align(
        trained, "a", Context(data=rings, quiet=True)
    )
    d = alignment.diagnostics.sel(model="b")
    kept = int(d["kept_epoch"])
    assert kept == int(np.argmin(d["epoch_loss"].values))
    assert float(d["final_loss"]) == float(d["epoch_loss"].isel(epoch=kept))
    assert float(d["final_loss"]) <= float(d["weight_matching_loss"])
    merged = _midpoint_model(trained, alignment, rings)
    assert float(d["final_loss"]) == pytest.approx(_loss(merged, rings, train_batchnorm=False), rel=1e-5)


def test_diagnostics_are_labelled_and_consistent(rings, trained):
    alignment = StraightThroughEstimator(epochs=2, lr=1e-2, batch_size=64).align(
        trained, "a", Context(data=rings, quiet=True)
    )
    d = alignment.diagnostics
    assert d["iteration_loss"].dims == ("model", "iteration") and d.sizes["iteration"] == 2 * 3
    assert d["iteration_epoch"].values.tolist() == [1, 1, 1, 2, 2, 2]
    assert d["epoch_loss"].dims == ("model", "epoch") and d["epoch"].values.tolist() == [0, 1, 2]
    assert int(d["units"]) == 24 and int(d["epoch_changes"].sel(model="b", epoch=0)) == 0
    assert np.isfinite(d["iteration_loss"].values).all()
    # Counts of units placed otherwise: the distance from weight matching is at most the sum of the changes.
    assert (d["from_weight_matching"] <= d["epoch_changes"].cumsum("epoch")).all()
    line = StraightThroughEstimator().describe(d)
    assert line.startswith("b: midpoint loss ") and "weight matching" in line and "of 24 units" in line


# ------------------------------------------------------------------------ behaviour


def test_the_same_seed_gives_the_same_alignment_and_another_seed_another_order():
    data = example_dataset()
    models = example_models()
    context = Context(data=data, quiet=True)

    def run(seed):
        return StraightThroughEstimator(epochs=2, lr=1e-2, batch_size=8, seed=seed).align(models, "model0", context)

    first, second, third = run(0), run(0), run(1)
    assert first.to_tree().identical(second.to_tree())
    assert not np.array_equal(first.diagnostics["iteration_loss"].values, third.diagnostics["iteration_loss"].values)


def test_every_other_model_is_aligned_to_the_reference():
    data = example_dataset()
    models = example_models(n=3)
    alignment = StraightThroughEstimator(epochs=1, batch_size=24).align(
        models, "model1", Context(data=data, quiet=True)
    )
    assert sorted(alignment.transforms) == ["model0", "model2"]
    assert alignment.diagnostics["model"].values.tolist() == ["model0", "model2"]
    assert alignment.diagnostics["iteration_loss"].shape == (2, 2)


@pytest.mark.parametrize("statistics", ["batch", "running"])
def test_the_input_models_are_left_untouched(statistics):
    data = example_dataset()
    models = {"a": _batchnorm_mlp(0), "b": _batchnorm_mlp(1)}
    before = {m: copy.deepcopy(models[m].state_dict()) for m in models}
    StraightThroughEstimator(epochs=2, lr=1e-2, batch_size=8, midpoint_statistics=statistics).align(
        models, "a", Context(data=data, quiet=True)
    )
    for m in models:
        for k, v in models[m].state_dict().items():
            assert torch.equal(v, before[m][k]), f"{m}.{k} changed"
        assert not models[m].training


def test_a_last_batch_of_one_image_joins_the_one_before_under_batch_statistics():
    # 17 images in batches of 8: 8, 8 and 1; BatchNorm1d cannot normalise the single image alone.
    data = example_dataset(n=17)
    models = {"a": _batchnorm_mlp(0), "b": _batchnorm_mlp(1)}
    alignment = StraightThroughEstimator(epochs=1, batch_size=8).align(models, "a", Context(data=data, quiet=True))
    assert alignment.diagnostics.sizes["iteration"] == 2
    assert np.isfinite(alignment.diagnostics["epoch_loss"].values).all()


def test_on_a_device_every_tensor_stays_there_and_the_result_is_the_cpu_result():
    # A distinct device object on the CPU: a host tensor meeting a device tensor fails as on a GPU.
    data = example_dataset()
    aligner = StraightThroughEstimator(epochs=2, lr=1e-2, batch_size=16)
    expected = aligner.align({"a": _batchnorm_mlp(0), "b": _batchnorm_mlp(1)}, "a", Context(data=data, quiet=True))
    with SimulatedAccelerator() as gpu:
        models = {"a": _batchnorm_mlp(0).to(gpu.device), "b": _batchnorm_mlp(1).to(gpu.device)}
        result = aligner.align(models, "a", Context(data=data, quiet=True, device=gpu.device))
    assert result.to_tree().identical(expected.to_tree())


# --------------------------------------------------------------------------- guards


def test_no_data_is_refused_naming_the_data_table():
    with pytest.raises(ConfigError, match=r"needs \[data\]"):
        StraightThroughEstimator().align(example_models(), "model0", Context(quiet=True))


def test_a_single_model_is_refused():
    models = example_models(n=1)
    with pytest.raises(ConfigError, match="key 'models'"):
        StraightThroughEstimator().align(models, "model0", Context(data=example_dataset(), quiet=True))


def test_models_of_different_widths_are_refused():
    models = {"a": example_models(hidden=8)["model0"], "b": example_models(hidden=5)["model1"]}
    with pytest.raises(ConfigError, match="cannot align models"):
        StraightThroughEstimator().align(models, "a", Context(data=example_dataset(), quiet=True))


def test_models_without_a_logit_per_class_are_refused():
    models = example_models(classes=2)  # the data has three classes
    with pytest.raises(ConfigError, match="one logit per class"):
        StraightThroughEstimator().align(models, "model0", Context(data=example_dataset(), quiet=True))


def test_batches_of_one_image_are_refused_under_batch_statistics_only():
    data = example_dataset()
    models = {"a": _batchnorm_mlp(0), "b": _batchnorm_mlp(1)}
    with pytest.raises(ConfigError, match=r"key 'batch_size'.*two images or more"):
        StraightThroughEstimator(batch_size=1).align(models, "a", Context(data=data, quiet=True))
    running = StraightThroughEstimator(epochs=0, batch_size=1, midpoint_statistics="running")
    assert "b" in running.align(models, "a", Context(data=data, quiet=True)).transforms


@pytest.mark.parametrize(
    "options, key",
    [
        ({"lr": 0.0}, "lr"),
        ({"epochs": -1}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_iter": 0}, "max_iter"),
        ({"midpoint_statistics": "stored"}, "midpoint_statistics"),
        ({"keep": "first"}, "keep"),
        ({"batchnorm_statistics": "yes"}, "batchnorm_statistics"),
    ],
)
def test_bad_options_name_their_key(options, key):
    with pytest.raises(ConfigError, match=key):
        structure_options(StraightThroughEstimator, options)
