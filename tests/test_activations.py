from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from mergescope import ConfigError, ContractError, collect, load_collection, save_collection, validate_activation
from mergescope.activations import make_activation, to_tree
from mergescope.testing import example_dataset


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))

    def forward(self, x):
        return self.head(self.relu(self.conv(x)))


@pytest.fixture
def data():
    return example_dataset(n=10)


def test_collect_labels_and_reduces(data):
    torch.manual_seed(0)
    model = TinyCNN()
    acts = collect(model, data, ["relu", "head.1"], model_name="m", batch_size=4)
    relu = acts["relu"]
    validate_activation(relu)
    assert relu.dims == ("sample", "unit") and relu.shape == (10, 3)
    assert list(relu["sample"].values) == list(data.sample_ids)
    assert list(relu["label"].values) == list(data.labels)
    assert relu["model"].item() == "m" and relu["layer"].item() == "relu"
    with torch.no_grad():
        maps = model.relu(model.conv(data.images))
    np.testing.assert_allclose(relu.values, maps.mean(dim=(2, 3)).numpy(), rtol=1e-6)
    top = collect(model, data, ["relu"], model_name="m", reduce="max")["relu"]
    np.testing.assert_allclose(top.values, maps.amax(dim=(2, 3)).numpy(), rtol=1e-6)
    assert acts["head.1"].shape == (10, 3)


def test_netcdf_round_trip_is_identical(tmp_path, data):
    acts = collect(TinyCNN(), data, ["relu", "conv"], model_name="m")
    tree = to_tree({"m": acts})
    path = save_collection(tree, tmp_path / "acts.nc")
    back = load_collection(path)
    for layer in ("relu", "conv"):
        xr.testing.assert_identical(back[f"m/{layer}"].ds["activation"], acts[layer])
    assert not list(tmp_path.glob("*.partial"))


def test_unknown_layer_lists_layers_and_closest(data):
    with pytest.raises(ConfigError) as info:
        collect(TinyCNN(), data, ["rellu"], model_name="m")
    message = str(info.value)
    assert "no layer 'rellu'" in message and "Did you mean 'relu'" in message and "conv, relu, head" in message


def test_bad_reduction_and_empty_data(data):
    with pytest.raises(ConfigError, match="unknown reduction 'median'"):
        collect(TinyCNN(), data, ["relu"], model_name="m", reduce="median")
    with pytest.raises(ConfigError, match="is empty"):
        collect(TinyCNN(), data.subset([]), ["relu"], model_name="m")


def test_validator_names_what_is_wrong():
    good = make_activation(np.zeros((3, 2)), sample_ids=[1, 2, 3], labels=[0, 1, 0], model="m", layer="l")
    validate_activation(good)
    with pytest.raises(ContractError, match="dims must be"):
        validate_activation(good.rename(unit="channel"))
    with pytest.raises(ContractError, match="'label'"):
        validate_activation(good.drop_vars("label"))
    with pytest.raises(ContractError, match="scalar coord 'model'"):
        validate_activation(good.drop_vars("model"))
    with pytest.raises(ContractError, match="not unique"):
        validate_activation(good.assign_coords(sample=[1, 1, 2]))


def test_truncated_file_is_reported(tmp_path, data):
    path = save_collection(to_tree({"m": collect(TinyCNN(), data, ["relu"], model_name="m")}), tmp_path / "a.nc")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ContractError, match="truncated or corrupt"):
        load_collection(path)


def test_layer_selectors_by_type_glob_and_input(data):
    from mergescope.activations import resolve_layers

    model = TinyCNN()
    assert list(resolve_layers(model, ["type:Conv2d", "type:Linear"])) == ["conv", "head.1"]
    assert list(resolve_layers(model, ["head.*"])) == ["head.0", "head.1"]
    assert list(resolve_layers(model, ["type:Module"]))[:2] == ["conv", "relu"]  # subclasses count
    with pytest.raises(ConfigError, match="no module of type 'Conv3d'.*Did you mean 'type:Conv2d'"):
        resolve_layers(model, ["type:Conv3d"])
    with pytest.raises(ConfigError, match="no layer of model 'model' matches 'tail.*'"):
        resolve_layers(model, ["tail.*"])
    acts = collect(model, data, ["relu@in", "relu"], model_name="m")
    with torch.no_grad():
        pre = model.conv(data.images).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(acts["relu@in"].values, pre, rtol=1e-5, atol=1e-6)  # the pre-activation
    assert (acts["relu"].values >= 0).all() and (acts["relu@in"].values < 0).any()


# ------------------------------------------------------------------ group selectors

RESNET18_GROUP_LAYERS = [
    "relu", "layer1.0", "layer1.1",  # group "conv1": the stem's output and the stream of layer1
    "layer1.0.conv2@in",  # group "layer1.0.conv1": read only by the block's conv2
    "layer1.1.conv2@in",
    "layer2.0.conv2@in",
    "layer2.0", "layer2.1",  # group "layer2": the residual stream of layer2
    "layer2.1.conv2@in",
    "layer3.0.conv2@in",
    "layer3.0", "layer3.1",
    "layer3.1.conv2@in",
    "layer4.0.conv2@in",
    "layer4.0", "layer4.1",
    "layer4.1.conv2@in",
]  # fmt: skip


def _outputs(model, layers, x):
    """Every selected layer's tensor for input ``x`` (outputs, or inputs for ``@in``)."""
    from mergescope.activations import attach_recorders

    seen = {}
    handles = attach_recorders(model, layers, lambda name, t: seen.__setitem__(name, t.detach().clone()))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _assert_layers_carry_their_groups(model, x, by_group):
    """Permuting a group's channels permutes exactly those channels at each of its layers."""
    from mergescope.groups import channel_groups, permute, random_permutations

    groups = channel_groups(model, x)
    perms = random_permutations(groups, seed=1)
    layers = [layer for ls in by_group.values() for layer in ls]
    before, after = _outputs(model, layers, x), _outputs(permute(model, perms, groups), layers, x)
    for group, ls in by_group.items():
        for layer in ls:
            torch.testing.assert_close(after[layer], before[layer][:, perms[group]], rtol=1e-4, atol=1e-5)


def test_group_selectors_on_the_zoo_cnn(data):
    from mergescope.activations import resolve_layers
    from mergescope.groups import group_layers
    from mergescope_plugins.zoo import MLP, SmallCNN

    x = torch.randn(2, 1, 28, 28)
    for batchnorm in (False, True):
        model = SmallCNN(batchnorm=batchnorm).build((1, 28, 28), 10)
        # After each convolution (and batchnorm) the relu; the last one is read through the pooling.
        assert group_layers(model, x) == {"conv1": ["relu1"], "conv2": ["relu2"], "conv3": ["relu3"]}
        assert list(resolve_layers(model, ["group:*"], example_input=x)) == ["relu1", "relu2", "relu3"]
        assert list(resolve_layers(model, ["group:conv2", "relu1"], example_input=x)) == ["relu2", "relu1"]
        # Without an example input a batch shaped for the first convolution is traced.
        assert list(resolve_layers(model, ["group:conv[13]"])) == ["relu1", "relu3"]
    _assert_layers_carry_their_groups(model, x, group_layers(model, x))
    mlp = MLP(hidden=[8, 8]).build((1, 4, 4), 3)
    assert list(resolve_layers(mlp, ["group:*"])) == ["relu1", "relu2"]
    # Recording by group: the relu maps, reduced like any other layer.
    small = SmallCNN(widths=[4, 6]).build((1, 4, 4), 3)
    acts = collect(small, data, ["group:*"], model_name="m")
    assert list(acts) == ["relu1", "relu2"] and acts["relu2"].shape == (10, 6)


def test_group_selectors_on_resnet18():
    import torchvision

    from mergescope.activations import resolve_layers
    from mergescope.groups import group_layers

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    x = torch.randn(2, 3, 64, 64)
    by_group = group_layers(model, x)
    assert [layer for ls in by_group.values() for layer in ls] == RESNET18_GROUP_LAYERS
    # The residual streams resolve to the block outputs carrying them: one unit per channel.
    assert list(resolve_layers(model, ["group:layer2", "group:layer4"], example_input=x)) == [
        "layer2.0",
        "layer2.1",
        "layer4.0",
        "layer4.1",
    ]
    assert by_group["conv1"] == ["relu", "layer1.0", "layer1.1"]
    # At 32 px the last maps are 1x1 and global pooling keeps their shape: still the blocks.
    small = torch.randn(2, 3, 32, 32)
    assert group_layers(model, small) == by_group
    assert list(resolve_layers(model, ["group:layer4"])) == ["layer4.0", "layer4.1"]
    blocks = list(resolve_layers(model, ["type:BasicBlock"]))
    every = resolve_layers(model, ["group:*"], example_input=x)
    assert list(every) == RESNET18_GROUP_LAYERS and set(blocks) <= set(every)
    # Inside a block the relu module runs twice, so the activation is recorded as conv2's input.
    assert every["layer1.0.conv2@in"] == (model.layer1[0].conv2, True)
    assert list(resolve_layers(model, ["group:layer*.conv1"])) == [
        layer for layer in RESNET18_GROUP_LAYERS if layer.endswith("@in")
    ]  # the same without an example input: a guessed 32x32 batch traces the same graph
    _assert_layers_carry_their_groups(model, x, by_group)


def test_group_selectors_that_match_nothing_are_named():
    from mergescope.activations import resolve_layers
    from mergescope_plugins.zoo import SmallCNN

    model = SmallCNN().build((1, 28, 28), 10)
    with pytest.raises(
        ConfigError,
        match=r"selector 'group:conv9'.*'cnn' has no channel group 'conv9'\. "
        r"Did you mean 'group:conv3'\? Its channel groups: conv1, conv2, conv3\.",
    ):
        resolve_layers(model, ["relu1", "group:conv9"], "cnn")
    with pytest.raises(ConfigError, match=r"selector 'group:layer\*'.*no channel group matching 'layer\*'"):
        resolve_layers(model, ["group:layer*"], "cnn")
    with pytest.raises(ConfigError, match=r"selector 'group:\*@in'.*no '@in' suffix"):
        resolve_layers(model, ["group:*@in"], "cnn")

    class Branchy(nn.Module):  # data-dependent control flow cannot be traced
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    with pytest.raises(ConfigError, match=r"selector 'group:\*' of model 'b'.*channel groups cannot be found"):
        resolve_layers(Branchy(), ["group:*"], "b", example_input=torch.randn(2, 1, 8, 8))
    with pytest.raises(ConfigError, match=r"selector 'group:\*'.*needs an example input"):
        resolve_layers(nn.Sequential(nn.ReLU()), ["group:*"], "r")


class ChannelsLastBlock(nn.Module):
    """A ConvNeXt/Swin-style block: LayerNorm and linear layers applied to (N, H, W, C) maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 1)
        self.norm = nn.LayerNorm(6)
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.conv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        h = self.fc2(torch.relu(self.fc1(self.norm(h))))
        return self.head(h.mean(dim=(1, 2)))


def test_channels_last_linear_and_layernorm_maps_are_recorded_channels_first():
    torch.manual_seed(0)
    model = ChannelsLastBlock().eval()
    data = example_dataset(n=6, shape=(1, 4, 3))
    acts = collect(model, data, ["norm", "fc1", "fc1@in"], model_name="m", reduce="none")
    assert acts["fc1"].dims == ("sample", "unit", "y", "x") and acts["fc1"].sizes == {
        "sample": 6,
        "unit": 5,
        "y": 4,
        "x": 3,
    }
    with torch.no_grad():
        h = model.norm(model.conv(data.images).permute(0, 2, 3, 1))
        np.testing.assert_allclose(acts["norm"].values, h.permute(0, 3, 1, 2).numpy(), rtol=1e-6)
        np.testing.assert_allclose(acts["fc1"].values, model.fc1(h).permute(0, 3, 1, 2).numpy(), rtol=1e-6)
    np.testing.assert_allclose(acts["fc1@in"].values, acts["norm"].values)


def test_restore_layout_undoes_batch_first():
    from mergescope.tokens import batch_first, restore_layout

    torch.manual_seed(0)
    cases = [
        (nn.Linear(4, 5), torch.randn(2, 3, 3, 5)),  # channels last
        (nn.MultiheadAttention(4, 2), (torch.randn(7, 2, 4), None)),  # (T, N, D) with its weights
        (nn.Conv2d(1, 4, 1), torch.randn(2, 4, 3, 3)),  # already channels first
    ]
    for module, value in cases:
        recorded = batch_first(module, value, 2, "layer")
        assert recorded.shape[0] == 2 and recorded.ndim in (3, 4)
        back = restore_layout(module, recorded, value)
        if isinstance(value, tuple):
            assert torch.equal(back[0], value[0]) and back[1] is None
        else:
            assert torch.equal(back, value)
