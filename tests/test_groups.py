"""Channel groups found by tracing: which axes move together, and that moving them is harmless."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from mergescope import Alignment, MergescopeError
from mergescope.groups import (
    Axis,
    ChannelGroup,
    EquivalenceError,
    UnsupportedLayerError,
    apply_linear,
    channel_groups,
    check_equivalence,
    maps_from_transforms,
    perm_from_matrix,
    permutation_matrix,
    permute,
    random_permutations,
)
from mergescope_plugins.efficientnet_lite import EfficientNetLite0
from mergescope_plugins.zoo import MLP, SmallCNN


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so it is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                m.bias.copy_(0.3 * torch.randn(n, generator=g))
    return model


def by_name(groups: list[ChannelGroup]) -> dict[str, ChannelGroup]:
    return {g.name: g for g in groups}


def axes_of(group: ChannelGroup) -> set[tuple[str, int]]:
    return {(a.param, a.axis) for a in group.axes}


def all_axes(groups: list[ChannelGroup]) -> set[tuple[str, int]]:
    return {(a.param, a.axis) for g in groups for a in g.axes}


# ------------------------------------------------------------------ small models


def test_mlp_groups():
    model = MLP().build((1, 28, 28), 10)
    x = torch.randn(3, 1, 28, 28)
    groups = channel_groups(model, x)
    assert [(g.name, g.size) for g in groups] == [("fc1", 512), ("fc2", 512), ("fc3", 512)]
    fc1 = groups[0]
    assert fc1.axes == (
        Axis("fc1.weight", 0, role="output"),
        Axis("fc1.bias", 0, role="output"),
        Axis("fc2.weight", 1, role="input"),
    )
    assert fc1.producers == ("fc1",)
    assert ("head.weight", 1) in axes_of(groups[2])
    # The input pixels and the logits are never permuted.
    everything = all_axes(groups)
    assert ("fc1.weight", 1) not in everything
    assert ("head.weight", 0) not in everything and ("head.bias", 0) not in everything
    assert check_equivalence(model, x, groups=groups) <= 1e-4


@pytest.mark.parametrize("batchnorm", [False, True])
def test_cnn_groups(batchnorm):
    model = randomize_norms(SmallCNN(batchnorm=batchnorm).build((3, 16, 16), 10))
    x = torch.randn(3, 3, 16, 16)
    groups = channel_groups(model, x)
    assert [(g.name, g.size) for g in groups] == [("conv1", 32), ("conv2", 64), ("conv3", 64)]
    conv1 = by_name(groups)["conv1"]
    expected = {("conv1.weight", 0), ("conv2.weight", 1)}
    if batchnorm:
        expected |= {("bn1.weight", 0), ("bn1.bias", 0), ("bn1.running_mean", 0), ("bn1.running_var", 0)}
        assert conv1.producers == ("conv1", "bn1")
    else:
        expected |= {("conv1.bias", 0)}
        assert conv1.producers == ("conv1",)
    assert axes_of(conv1) == expected
    # Global pooling then flatten: one head input per channel.
    assert Axis("head.weight", 1, repeat=1, role="input") in by_name(groups)["conv3"].axes
    assert ("conv1.weight", 1) not in all_axes(groups) and ("head.weight", 0) not in all_axes(groups)
    assert check_equivalence(model, x, groups=groups) <= 1e-4


class FlattenNet(nn.Module):
    """Conv maps flattened straight into a linear layer (no pooling), and a cat of two branches."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.mix = nn.Conv2d(10, 5, 3, stride=2, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 7)
        self.out = nn.Linear(7, 2)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        y = torch.relu(self.mix(y))
        return self.out(torch.relu(self.fc(y.flatten(1))))


def test_flatten_repeat_and_cat_offsets():
    model = FlattenNet()
    x = torch.randn(3, 3, 8, 8)
    groups = by_name(channel_groups(model, x))
    assert set(groups) == {"a", "b", "mix", "fc"}
    # Each of the 5 channels owns a block of 4 x 4 = 16 consecutive features of fc's input.
    assert Axis("fc.weight", 1, repeat=16, role="input") in groups["mix"].axes
    # The concatenated channels: a at offset 0, b after a's 4 channels.
    assert Axis("mix.weight", 1, offset=0, role="input") in groups["a"].axes
    assert Axis("mix.weight", 1, offset=4, role="input") in groups["b"].axes
    assert check_equivalence(model, x, groups=list(groups.values())) <= 1e-4


class TinyConvNeXt(nn.Module):
    """Channels-last MLP with a layer norm, a layer scale, a depthwise conv with multiplier and a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # two outputs per input channel
        self.bn = nn.BatchNorm2d(16)
        self.reduce = nn.Conv2d(16, 8, 1)
        self.norm = nn.LayerNorm(8)
        self.up = nn.Linear(8, 32)
        self.down = nn.Linear(32, 8)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.reduce(torch.relu(self.bn(self.dw(x))))
        y = self.norm(x.permute(0, 2, 3, 1))
        y = self.down(nn.functional.gelu(self.up(y))).permute(0, 3, 1, 2)
        x = x + self.gamma * y
        return self.head(x.mean(dim=(2, 3)))


def test_channels_last_layer_scale_and_depthwise_multiplier():
    model = randomize_norms(TinyConvNeXt())
    with torch.no_grad():
        model.norm.weight.normal_(1, 0.3)
        model.norm.bias.normal_(0, 0.3)
    x = torch.randn(3, 3, 6, 6)
    groups = by_name(channel_groups(model, x))
    assert set(groups) == {"stem", "up"}
    stem = groups["stem"]
    assert stem.size == 8
    expected = {("gamma", 0), ("norm.weight", 0), ("down.weight", 0), ("up.weight", 1), ("reduce.weight", 0)}
    assert expected <= axes_of(stem)
    assert Axis("dw.weight", 0, repeat=2, role="channel") in stem.axes
    assert Axis("bn.running_var", 0, repeat=2, role="channel") in stem.axes
    assert Axis("reduce.weight", 1, repeat=2, role="input") in stem.axes
    assert check_equivalence(model, x, groups=list(groups.values())) <= 1e-4


class Shared(nn.Module):
    """One convolution applied twice: its two outputs must be permuted alike."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.left = nn.Conv2d(6, 4, 1)
        self.right = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        a = self.left(torch.relu(self.conv(x)))
        b = self.right(torch.relu(self.conv(x.flip(3))))
        return self.head(torch.cat([a, b], 1).mean(dim=(2, 3)))


def test_shared_module_ties_its_outputs():
    model = Shared()
    x = torch.randn(3, 3, 5, 5)
    groups = channel_groups(model, x)
    conv = by_name(groups)["conv"]
    assert {("left.weight", 1), ("right.weight", 1), ("conv.weight", 0)} <= axes_of(conv)
    assert check_equivalence(model, x, groups=groups) <= 1e-4


class Tokens(nn.Module):
    """Token embeddings, an expanded class token, a position embedding and a pre-norm MLP block."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 6, 8))
        self.ln = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        t = self.emb(ids)
        t = torch.cat([self.cls.expand(ids.shape[0], -1, -1), t], dim=1) + self.pos
        t = t + self.fc2(nn.functional.gelu(self.fc1(self.ln(t))))
        return self.head(t[:, 0])


def test_token_stream_with_class_token_and_position_embedding():
    model = Tokens()
    ids = torch.randint(0, 20, (3, 5))
    groups = by_name(channel_groups(model, ids))
    assert set(groups) == {"emb", "fc1"}
    expected = {("emb.weight", 1), ("cls", 2), ("pos", 2), ("ln.weight", 0), ("fc2.weight", 0), ("head.weight", 1)}
    assert expected <= axes_of(groups["emb"])
    assert check_equivalence(model, ids, groups=list(groups.values())) <= 1e-4


def test_tracing_leaves_the_model_alone():
    model = randomize_norms(SmallCNN(batchnorm=True).build((3, 8, 8), 10)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = channel_groups(model, torch.randn(4, 3, 8, 8))
    check_equivalence(model, torch.randn(4, 3, 8, 8), groups=groups)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------- torchvision zoo


def torchvision_model(name: str) -> nn.Module:
    return randomize_norms(torchvision.models.get_model(name, weights=None, num_classes=10))


ZOO = {
    # name: (number of groups, input side)
    "alexnet": (7, 64),
    "vgg11": (10, 32),
    "vgg16_bn": (15, 32),
    "resnet18": (12, 32),
    "resnet50": (37, 64),
    "mobilenet_v2": (25, 64),
    "efficientnet_b0": (40, 64),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_torchvision_models_are_equivalent_after_permutation(name):
    torch.manual_seed(0)
    count, side = ZOO[name]
    model = torchvision_model(name)
    x = torch.randn(2, 3, side, side)
    groups = channel_groups(model, x)
    assert len(groups) == count
    assert len({g.name for g in groups}) == count
    assert check_equivalence(model, x, groups=groups) <= 1e-4


def test_efficientnet_lite0_is_equivalent_after_permutation():
    torch.manual_seed(0)
    model = randomize_norms(EfficientNetLite0(pretrained=False).build((3, 64, 64), 10))
    x = torch.randn(2, 3, 64, 64)
    groups = channel_groups(model, x)
    # 16 MBConv blocks, 15 with an expansion, 7 stages, stem and head convolutions.
    assert len(groups) == 24
    assert groups[0].name == "_conv_stem"
    stem = groups[0]
    # The stem feeds block 0's depthwise convolution (traced through F.conv2d) directly.
    assert Axis("_blocks.0._depthwise_conv.weight", 0, role="channel") in stem.axes
    assert ("_fc.weight", 1) in axes_of(groups[-1])
    assert check_equivalence(model, x, groups=groups) <= 1e-4


def test_resnet18_residual_streams():
    model = torchvision_model("resnet18")
    groups = by_name(channel_groups(model, torch.randn(2, 3, 32, 32)))
    bn = lambda m: {(f"{m}.{p}", 0) for p in ("weight", "bias", "running_mean", "running_var")}  # noqa: E731
    stem = groups["conv1"]
    expected_stem = {("conv1.weight", 0), ("layer2.0.conv1.weight", 1), ("layer2.0.downsample.0.weight", 1)}
    expected_stem |= bn("bn1")
    for block in ("layer1.0", "layer1.1"):
        expected_stem |= {(f"{block}.conv1.weight", 1), (f"{block}.conv2.weight", 0)} | bn(f"{block}.bn2")
    assert axes_of(stem) == expected_stem
    assert stem.size == 64
    stage2 = groups["layer2"]
    expected = {
        ("layer2.0.conv2.weight", 0),
        ("layer2.0.downsample.0.weight", 0),
        ("layer2.1.conv1.weight", 1),
        ("layer2.1.conv2.weight", 0),
        ("layer3.0.conv1.weight", 1),
        ("layer3.0.downsample.0.weight", 1),
    }
    expected |= bn("layer2.0.bn2") | bn("layer2.0.downsample.1") | bn("layer2.1.bn2")
    assert axes_of(stage2) == expected
    assert stage2.size == 128
    first = ("layer2.0.conv2", "layer2.0.bn2", "layer2.0.downsample.0", "layer2.0.downsample.1")
    assert stage2.producers[:4] == first
    assert ("fc.weight", 1) in axes_of(groups["layer4"])
    # Inside a block: conv1's output only.
    assert axes_of(groups["layer2.1.conv1"]) == {("layer2.1.conv1.weight", 0), ("layer2.1.conv2.weight", 1)} | bn(
        "layer2.1.bn1"
    )


# --------------------------------------------------------------- what we refuse


class Rolled(nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        self.dims = dims
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 2, 3)

    def forward(self, x):
        return self.conv2(torch.roll(self.conv1(x), 1, self.dims))


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.conv2(self.conv1(x).transpose(1, 2))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:  # data-dependent control flow
            return y.relu()
        return y


def test_roll_along_channels_is_refused():
    x = torch.randn(2, 3, 7, 7)
    with pytest.raises(UnsupportedLayerError, match=r"node 'roll' \(call_function torch\.roll\)") as info:
        channel_groups(Rolled(dims=1), x)
    assert info.value.node == "roll" and info.value.op == "call_function torch.roll"
    assert "conv1" in str(info.value) and isinstance(info.value, MergescopeError)
    # Along the width the channels stay put.
    model = Rolled(dims=3)
    assert [g.name for g in channel_groups(model, x)] == ["conv1"]
    assert check_equivalence(model, x) <= 1e-4


def test_transposed_channels_are_refused_where_they_are_read():
    with pytest.raises(UnsupportedLayerError, match=r"node 'conv2'.*dim 2.*'transpose'"):
        channel_groups(Transposed(), torch.randn(2, 3, 7, 7))


def test_grouped_convolution_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.Linear(32, 2))
    with pytest.raises(UnsupportedLayerError, match="grouped convolution"):
        channel_groups(model, torch.randn(2, 3, 4, 4))


class Standardised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 2, 3)

    def forward(self, x):
        w = self.conv2.weight
        return nn.functional.conv2d(torch.relu(self.conv1(x)), w - w.mean(dim=(1, 2, 3), keepdim=True))


def test_computed_weights_are_refused():
    with pytest.raises(UnsupportedLayerError, match="conv1: node 'conv2d'.*weight is computed"):
        channel_groups(Standardised(), torch.randn(2, 3, 7, 7))


def test_untraceable_model_names_the_tracing_error():
    with pytest.raises(UnsupportedLayerError, match="torch.fx cannot trace Branchy.*control flow"):
        channel_groups(Branchy(), torch.randn(2, 3, 5, 5))


class Mixed(nn.Module):
    """An unknown op whose result is added back: the channels stay in place (with a warning)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 2, 3)

    def forward(self, x):
        y = self.conv1(x)
        return self.conv2(y + torch.roll(y, 1, 1))


def test_channels_tied_to_an_unknown_op_are_left_out_with_a_warning():
    with pytest.warns(UserWarning, match="channels produced by conv1 are left out.*'roll'"):
        assert channel_groups(Mixed(), torch.randn(2, 3, 7, 7)) == []


class RolledLogits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return torch.roll(self.head(torch.relu(self.fc(x))), 1, 1)


def test_unknown_op_on_the_logits_is_fine():
    # The logits are never permuted, so what happens to them afterwards does not matter.
    model = RolledLogits()
    assert [g.name for g in channel_groups(model, torch.randn(2, 5))] == ["fc"]
    assert check_equivalence(model, torch.randn(2, 5)) <= 1e-4


def test_a_wrong_group_fails_the_equivalence_check():
    model = MLP(hidden=[6, 5]).build((4,), 3)
    x = torch.randn(8, 4)
    groups = channel_groups(model, x)
    broken = ChannelGroup("fc1", 6, groups[0].axes[:-1], ("fc1",))  # forgets fc2's input axis
    with pytest.raises(EquivalenceError, match="'fc1'") as info:
        check_equivalence(model, x, groups=[broken, groups[1]])
    assert info.value.groups == ("fc1",)


# ----------------------------------------------------------- permutations, maps


def test_identity_permutation_keeps_every_weight():
    model = randomize_norms(torchvision_model("resnet18"))
    groups = channel_groups(model, torch.randn(2, 3, 32, 32))
    same = permute(model, {g.name: np.arange(g.size) for g in groups}, groups)
    assert same is not model
    for (k, v), (k2, v2) in zip(model.state_dict().items(), same.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_permute_moves_rows_and_checks_its_input():
    model = MLP(hidden=[4]).build((3,), 2)
    groups = channel_groups(model, torch.randn(2, 3))
    perm = np.array([2, 0, 3, 1])
    new = permute(model, {"fc1": torch.as_tensor(perm)}, groups)
    assert torch.equal(new.fc1.weight, model.fc1.weight[perm])
    assert torch.equal(new.head.weight, model.head.weight[:, perm])
    with pytest.raises(ValueError, match="unknown channel groups"):
        permute(model, {"nope": perm}, groups)
    with pytest.raises(ValueError, match="each of 0..3 once"):
        permute(model, {"fc1": np.array([0, 0, 1, 2])}, groups)


def test_random_permutations_are_seeded():
    groups = channel_groups(MLP(hidden=[7, 9]).build((3,), 2), torch.randn(2, 3))
    a, b = random_permutations(groups, 3), random_permutations(groups, 3)
    assert set(a) == {"fc1", "fc2"} and all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(a["fc2"]) == list(range(9))


def test_permutation_matrix_round_trip():
    perm = np.array([3, 0, 2, 1])
    da = permutation_matrix(perm, unit_coords=[10, 11, 12, 13])
    assert da.dims == ("unit", "unit_ref")
    assert list(da["unit_ref"].values) == [10, 11, 12, 13]
    assert da.values[3, 0] == 1 and da.values.sum() == 4
    assert np.array_equal(perm_from_matrix(da), perm)
    assert np.array_equal(perm_from_matrix(da.transpose("unit_ref", "unit")), perm)
    alignment = Alignment("a", {"b": {"fc1": da}})
    assert np.array_equal(perm_from_matrix(Alignment.from_tree(alignment.to_tree()).transforms["b"]["fc1"]), perm)
    with pytest.raises(ValueError, match="not a permutation matrix"):
        perm_from_matrix(np.full((3, 3), 1 / 3))


@pytest.mark.parametrize("make", [TinyConvNeXt, FlattenNet])
def test_apply_linear_with_permutations_equals_permute(make):
    # Residuals, BatchNorm, a depthwise multiplier, a layer scale, cat offsets, flatten blocks.
    model = randomize_norms(make())
    groups = channel_groups(model, torch.randn(2, 3, 8, 8))
    perms = random_permutations(groups, 1)
    transforms = {name: permutation_matrix(p) for name, p in perms.items()}
    expected = permute(model, perms, groups)
    for per_channel in ("error", "mix"):
        got = apply_linear(model, maps_from_transforms(transforms), groups, per_channel=per_channel)
        for (k, v), v2 in zip(expected.state_dict().items(), got.state_dict().values()):
            assert torch.equal(v, v2), k


class LinearConvNet(nn.Module):
    """No nonlinearity: any invertible map on a group leaves the function unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3 * 2 * 2, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.fc(self.conv(x).flatten(1)))


def test_apply_linear_with_invertible_maps_on_a_linear_network():
    torch.manual_seed(0)
    model = LinearConvNet().double()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    groups = channel_groups(model, x)
    assert [g.name for g in groups] == ["conv", "fc"]
    rng = np.random.default_rng(0)
    maps = {}
    for g in groups:
        t = rng.normal(size=(g.size, g.size)) + 3 * np.eye(g.size)
        maps[g.name] = (t, np.linalg.inv(t))
    mapped = apply_linear(model, maps, groups)
    with torch.no_grad():
        assert torch.allclose(model(x), mapped(x), atol=1e-9)
        assert not torch.allclose(model.conv.weight, mapped.conv.weight)


def test_apply_linear_refuses_general_maps_on_batchnorm_groups_unless_mixing():
    model = randomize_norms(SmallCNN(widths=[4], batchnorm=True).build((3, 6, 6), 2))
    groups = channel_groups(model, torch.randn(2, 3, 6, 6))
    t = np.eye(4) + 0.1
    with pytest.raises(ValueError, match="per-channel parameters"):
        apply_linear(model, {"conv1": (t, np.linalg.inv(t))}, groups)
    mixed = apply_linear(model, {"conv1": (t, np.linalg.inv(t))}, groups, per_channel="mix")
    weights = np.abs(t) / np.abs(t).sum(1, keepdims=True)
    expected = torch.from_numpy(weights) @ model.bn1.running_var.double()
    assert torch.allclose(mixed.bn1.running_var.double(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="must be 4 x 4"):
        apply_linear(model, {"conv1": (np.eye(3), np.eye(3))}, groups)


def test_axis_role_is_checked():
    with pytest.raises(ValueError, match="role"):
        Axis("w", 0, role="sideways")
