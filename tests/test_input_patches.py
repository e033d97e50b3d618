"""The ``@patches`` selector: a convolution's input unfolded into the patches it reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mergescope import ConfigError, collect
from mergescope.activations import PATCHES_SUFFIX, attach_recorders, input_patches, resolve_layers
from mergescope.store import StoreSpec, collect_store
from mergescope.testing import example_dataset


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2), nn.Flatten(), nn.Linear(8, 3)
    ).eval()


@pytest.mark.parametrize(
    "options",
    [
        dict(kernel_size=3),
        dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 2)),
        dict(kernel_size=3, dilation=2, padding=2),
        dict(kernel_size=1, stride=2),  # a downsampling 1x1 reads every other position only
        dict(kernel_size=3, padding="same"),
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
        dict(kernel_size=3, padding=(1, 2), padding_mode="circular"),
        dict(kernel_size=(3, 2), padding="same", padding_mode="replicate", dilation=(1, 2)),
    ],
)
def test_the_conv_is_its_weight_times_its_patches(options):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, **options)
    x = torch.randn(2, 3, 7, 9)
    patches = input_patches(conv, x)
    expected = conv(x)
    assert patches.shape == (2, 3 * conv.kernel_size[0] * conv.kernel_size[1], *expected.shape[2:])
    computed = torch.einsum("ok,nkyx->noyx", conv.weight.reshape(4, -1), patches) + conv.bias[:, None, None]
    torch.testing.assert_close(computed, expected, rtol=1e-5, atol=1e-5)


def test_a_patch_entry_by_hand():
    conv = nn.Conv2d(1, 1, 2, stride=2)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    patches = input_patches(conv, x)
    # Output position (1, 0) reads rows 2-3, columns 0-1: values 8, 9, 12, 13 in weight order.
    assert patches[0, :, 1, 0].tolist() == [8.0, 9.0, 12.0, 13.0]


def test_selectors():
    model = net()
    assert resolve_layers(model, ["2@patches"]) == {"2@patches": (model[2], True)}
    assert list(resolve_layers(model, [f"type:Conv2d{PATCHES_SUFFIX}"])) == ["0@patches", "2@patches"]
    with pytest.raises(ConfigError, match=r"'@patches' records the input patches of a Conv2d, but '4' .* is a Linear"):
        resolve_layers(model, ["4@patches"])
    with pytest.raises(ConfigError, match="has no layer '9'"):
        resolve_layers(model, ["9@patches"])
    with pytest.raises(ConfigError, match="a group selector takes no '@patches' suffix"):
        resolve_layers(model, ["group:*@patches"])


def test_recorders_hand_the_patches_to_the_sink():
    model = net()
    seen = {}

    def sink(layer: str, tensor: torch.Tensor) -> None:
        seen[layer] = tensor.clone()

    handles = attach_recorders(model, ["2@patches", "2@in"], sink)
    x = torch.randn(2, 1, 5, 5)
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    torch.testing.assert_close(seen["2@patches"], input_patches(model[2], seen["2@in"]))


def test_collected_patches_and_their_positional_gram(tmp_path):
    data = example_dataset(n=20, shape=(1, 5, 5))
    model = net()
    with torch.no_grad():
        expected = input_patches(model[2], model[:2](data.images))  # (20, 27, 2, 2)
    acts = collect(model, data, ["2@patches"], model_name="m", reduce="none")
    np.testing.assert_allclose(acts["2@patches"].values, expected.numpy(), rtol=1e-6, atol=1e-6)

    spec = StoreSpec(layers={"m": ["2@patches"]}, batch_size=6, topk=0, covariance=True, positions=True)
    store = collect_store({"m": model}, data, spec, tmp_path / "s", key="k")
    rows = expected.movedim(1, -1).reshape(-1, 27).double().numpy()  # one row per image and output position
    moments = store.covariance("m", "2@patches")
    assert moments.count == 20 * 2 * 2
    gram = moments.comoment + moments.count * np.outer(moments.mean_x, moments.mean_x)
    np.testing.assert_allclose(gram, rows.T @ rows, rtol=1e-6, atol=1e-6)
