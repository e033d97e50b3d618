"""REPAIR's LayerNorm path: each LayerNorm's output renormalised to the interpolated endpoint statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mergescope import Context
from mergescope.components import TensorImageDataset
from mergescope.errors import ConfigError
from mergescope.testing import example_dataset
from mergescope_plugins.repair import (
    Repair,
    layernorm_layers,
    renormalise,
    repair_points,
)
from mergescope_plugins.zoo import MLP, SmallCNN, ViT

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_data(shape: tuple[int, ...]) -> TensorImageDataset:
    # Four rows (x1, x2): three with x1 > x2, one with x1 < x2. A LayerNorm over two
    # channels (eps 0) maps every row to (+1, -1) or (-1, +1): channel 0 of x_hat is
    # [1, 1, 1, -1] (mean 1/2, std sqrt(3/4)), channel 1 its negation.
    rows = torch.tensor([[1.0, 0.0], [3.0, 1.0], [2.0, -2.0], [0.0, 5.0]])
    images = rows.reshape(shape)
    return TensorImageDataset("toy", images, np.zeros(len(images)), np.arange(len(images)), ["x"])


def toy_norm(reshape: nn.Module) -> nn.Sequential:
    norm = nn.LayerNorm(2, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, 1.5]))
        norm.bias.copy_(torch.tensor([-0.5, 1.5]))
    return nn.Sequential(reshape, norm)


@pytest.mark.parametrize(
    ("shape", "reshape"),
    [
        ((4, 1, 1, 2), nn.Flatten()),  # one row per sample: (N, C)
        ((2, 1, 2, 2), nn.Flatten(1, 2)),  # two tokens per sample: (N, T, C), the channel last
    ],
)
def test_the_correction_folds_into_gamma_and_beta_as_worked_by_hand(shape, reshape):
    # Output: channel 0 = 2 x_hat0 - 0.5 (mean 0.5, std 2 s), channel 1 = 1.5 x_hat1 + 1.5
    # (mean 0.75, std 1.5 s), s = sqrt(3/4). Targets: means (1, 0), stds (s, 3 s).
    # scale = (1/2, 2), shift = target - scale * mean = (0.75, -1.5), so
    # gamma' = (2 * 1/2, 1.5 * 2) = (1, 3) and beta' = (-0.5 * 1/2 + 0.75, 1.5 * 2 - 1.5) = (0.5, 1.5).
    s = math.sqrt(0.75)
    model, data = toy_norm(reshape), toy_data(shape)
    measured: dict = {}
    renormalise(
        model,
        ["1"],
        {"1": np.array([1.0, 0.0])},
        {"1": np.array([s, 3 * s])},
        Context(data=data, batch_size=8, quiet=True),
        eps=0.0,
        measured=measured,
    )
    np.testing.assert_allclose(model[1].weight.detach().numpy(), [1.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(model[1].bias.detach().numpy(), [0.5, 1.5], rtol=1e-6, atol=1e-6)
    mean, std = measured["1"]
    np.testing.assert_allclose(mean, [0.5, 0.75], rtol=1e-6)
    np.testing.assert_allclose(std, [2 * s, 1.5 * s], rtol=1e-6)
    # and the corrected model has the target statistics, measured independently
    moments = recorded_moments(model, data, batch_size=3)
    np.testing.assert_allclose(moments.mean, [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(moments.std, [s, 3 * s], rtol=1e-6)


def recorded_moments(model: nn.Module, data, batch_size: int):
    """The per-channel moments of layer "1" as REPAIR records its endpoints: every sample and token a row."""
    store = Context(data=data, batch_size=batch_size, quiet=True).record(
        {"m": model}, {"m": ["1"]}, keep_activations=False, positions=True
    )
    return store.moments("m", "1")


def test_the_endpoint_statistics_read_the_last_axis_of_token_outputs():
    data = toy_data((2, 1, 2, 2))
    model = nn.Sequential(nn.Flatten(1, 2), nn.Linear(2, 3))
    moments = recorded_moments(model, data, batch_size=1)
    with torch.no_grad():
        rows = model(data.images).reshape(-1, 3).double()
    np.testing.assert_allclose(moments.mean, rows.mean(0).numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(moments.std, rows.std(0, unbiased=False).numpy(), rtol=1e-6)


def layernorm_stats(model: nn.Module, images: torch.Tensor, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """Straightforward per-channel statistics of a LayerNorm's output over samples and tokens."""
    out = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: out.setdefault("x", o))
    with torch.no_grad():
        model(images)
    handle.remove()
    rows = out["x"].reshape(-1, out["x"].shape[-1]).double()
    return rows.mean(0).numpy(), rows.std(0, unbiased=False).numpy()


@pytest.fixture(scope="module")
def vit_pair():
    arch = ViT(patch_size=4, layers=2, heads=2, width=8, mlp_width=16)
    torch.manual_seed(0)
    a = arch.build((1, 8, 8), 3).eval()
    torch.manual_seed(1)
    b = arch.build((1, 8, 8), 3).eval()
    for model in (a, b):  # LayerNorms away from their initial (1, 0), as after training
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight.uniform_(0.5, 2.0)
                    module.bias.normal_(0.0, 0.5)
    return a, b


def test_a_merged_vit_gets_the_interpolated_layernorm_statistics(vit_pair):
    a, b = vit_pair
    data = example_dataset(n=40, shape=(1, 8, 8))
    context = Context(data=data, batch_size=1000, quiet=True)
    result = Repair(alpha=0.3, alphas=[]).merge({"a": a, "b": b}, context)
    merged, results = result.model, result.results
    layers = layernorm_layers(a)
    assert str(results["points"].values) == "layernorm"
    assert list(results["repaired_layers"].values) == layers
    assert layers == [
        "encoder.layers.encoder_layer_0.ln_1",
        "encoder.layers.encoder_layer_0.ln_2",
        "encoder.layers.encoder_layer_1.ln_1",
        "encoder.layers.encoder_layer_1.ln_2",
        "encoder.ln",
    ]
    for layer in layers:  # each layer sees every correction before it: check them all
        mean_a, std_a = layernorm_stats(a, data.images, layer)
        mean_b, std_b = layernorm_stats(b, data.images, layer)
        mean_m, std_m = layernorm_stats(merged, data.images, layer)
        np.testing.assert_allclose(mean_m, 0.7 * mean_a + 0.3 * mean_b, atol=1e-4)
        np.testing.assert_allclose(std_m, 0.7 * std_a + 0.3 * std_b, rtol=1e-4)
    # the structure is unchanged: the same parameters, only LayerNorm values moved
    plain = Repair(alpha=0.3, alphas=[], variant="reset-bn").merge({"a": a, "b": b}, context).model
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, plain.state_dict()[k])}
    assert changed == {f"{layer}.{p}" for layer in layers for p in ("weight", "bias")}
    assert results["std_ratio"].dims == ("layer",) and results["std_ratio"].size == len(layers)
    assert np.all(results["std_ratio"].values > 0) and np.all(results["mean_shift"].values >= 0)
    assert "5 LayerNorm outputs corrected" in Repair().describe(results)


def test_repairing_an_endpoint_gives_back_its_function(vit_pair):
    # At alpha 0 the targets are a's own statistics: the correction is the identity
    # (up to the batch statistics of the measuring pass, here one batch).
    a, b = vit_pair
    data = example_dataset(n=40, shape=(1, 8, 8))
    merged = Repair(alpha=0.0, alphas=[]).merge({"a": a, "b": b}, Context(data=data, batch_size=64, quiet=True)).model
    with torch.no_grad():
        torch.testing.assert_close(merged(data.images), a(data.images), rtol=1e-4, atol=1e-4)


def test_points_are_chosen_from_the_norms_and_can_be_forced():
    assert repair_points(ViT(layers=1, heads=1, width=4).build((1, 8, 8), 2)) == "layernorm"
    assert repair_points(SmallCNN(widths=[4], batchnorm=True).build((1, 8, 8), 2)) == "channel-groups"
    assert repair_points(MLP(hidden=[4]).build((1, 8, 8), 2)) == "channel-groups"
    mixed = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.LayerNorm(128))
    assert repair_points(mixed) == "channel-groups"  # a BatchNorm keeps the paper's path
    assert repair_points(mixed, "layernorm") == "layernorm"


def test_layernorm_points_on_a_model_without_layernorm_is_refused():
    data = example_dataset(n=12, shape=(1, 4, 4))
    torch.manual_seed(0)
    a, b = MLP(hidden=[4]).build((1, 4, 4), 3), MLP(hidden=[4]).build((1, 4, 4), 3)
    with pytest.raises(ConfigError, match=r"points = 'layernorm', but the model has no LayerNorm") as info:
        Repair(points="layernorm", alphas=[]).merge({"a": a, "b": b}, Context(data=data, quiet=True))
    assert info.value.where == "key 'points'"
    with pytest.raises(ValueError, match="'points'"):
        Repair(points="residual")


def test_a_layernorm_without_affine_parameters_cannot_absorb_the_correction():
    data = toy_data((4, 1, 1, 2))
    model = nn.Sequential(nn.Flatten(), nn.LayerNorm(2, elementwise_affine=False))
    with pytest.raises(ConfigError, match=r"layer '1' \(LayerNorm\), which has no per-channel scale and shift"):
        renormalise(model, ["1"], {"1": np.zeros(2)}, {"1": np.ones(2)}, Context(data=data, quiet=True))
