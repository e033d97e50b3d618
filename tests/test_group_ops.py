"""One tiny model per op handler of the channel-group analyzer (mergescope.groups.handlers).

Each case states, from a hand analysis of its ``forward``, exactly which parameter axes
every group holds (so a handler that ties, records or drops one axis too many fails),
then checks that permuting every group leaves the function unchanged. The refusals
check that an op whose effect on channels cannot be expressed raises an
:class:`UnsupportedLayerError` naming that op's node.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergescope.groups import Axis, ChannelGroup, UnsupportedLayerError, channel_groups, check_equivalence

_G = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_G)


def A(param: str, axis: int, role: str, repeat: int = 1, offset: int = 0) -> Axis:
    return Axis(param, axis, repeat=repeat, offset=offset, role=role)


def producer(name: str, *, bias: bool = True, axis: int = 0) -> set[Axis]:
    """The output axis (and bias) of a layer ``name``."""
    return {A(f"{name}.weight", axis, "output")} | ({A(f"{name}.bias", 0, "output")} if bias else set())


def reader(name: str, axis: int = 1, **kw) -> set[Axis]:
    """The input axis of a layer ``name``."""
    return {A(f"{name}.weight", axis, "input", **kw)}


def per_channel(name: str, *params: str) -> set[Axis]:
    return {A(f"{name}.{p}", 0, "channel") for p in params}


BN = ("weight", "bias", "running_mean", "running_var")
# conv c1 -> (op) -> conv c2: the plain chain every pass-through op must keep.
CHAIN = {"c1": producer("c1") | reader("c2")}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial parameters and statistics everywhere, so no norm or scale is the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim <= 1 else 1 / max(1, p[0].numel()) ** 0.5))
            if name.endswith(("norm.weight", "bn.weight", "gn.weight", "ln.weight")):
                p.add_(1)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    return model


def groups_of(model: nn.Module, x: torch.Tensor) -> dict[str, ChannelGroup]:
    """The groups by name; a warning (channels silently left out) fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return {g.name: g for g in channel_groups(model, x)}


def check(model: nn.Module, x: torch.Tensor, expected: dict[str, set[Axis]]) -> dict[str, ChannelGroup]:
    """Exactly the ``expected`` groups and axes, and the model unchanged with every group permuted."""
    model = randomize(model)
    groups = groups_of(model, x)
    assert {name: set(g.axes) for name, g in groups.items()} == expected
    for name, g in groups.items():
        assert len(g.axes) == len(set(g.axes)), name
    for seed in (0, 1):
        assert check_equivalence(model, x, groups=list(groups.values()), seed=seed) <= 1e-4
    return groups


def refused(model: nn.Module, x: torch.Tensor, node: str, op: str, reason: str) -> UnsupportedLayerError:
    with pytest.raises(UnsupportedLayerError, match=reason) as info:
        channel_groups(model, x)
    assert (info.value.node, info.value.op) == (node, op)
    assert f"node {node!r} ({op})" in str(info.value)
    return info.value


class Chain(nn.Module):
    """``c2(op(c1(x)))`` with ``c1``: 3 -> 4 channels and ``c2`` reading ``mid`` channels."""

    def __init__(self, op: Callable | nn.Module, mid: int = 4, dims: int = 2, c2: nn.Module | None = None) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.c1 = conv(3, 4, 3, padding=1)
        if isinstance(op, nn.Module):
            self.op = op
        else:
            self.fn = op
        self.c2 = c2 if c2 is not None else conv(mid, 2, 1)

    def forward(self, x):
        y = self.c1(x)
        return self.c2(self.op(y) if hasattr(self, "op") else self.fn(y))


# A batch size unlike every channel count, so that no reshape can take one for the other.
X1, X2, X3 = randn(5, 3, 6), randn(5, 3, 6, 6), randn(5, 3, 4, 4, 4)


# ------------------------------------------------------------------------------ conv


class FunctionalConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(randn(4, 3, 3, 3)), nn.Parameter(randn(4))
        self.dw = nn.Parameter(randn(4, 1, 3, 3))  # depthwise, groups=4 passed positionally
        self.w2 = nn.Parameter(randn(2, 4, 1, 1))

    def forward(self, x):
        y = torch.relu(F.conv2d(x, self.w1, self.b1, 1, 1))
        y = F.conv2d(y, self.dw, None, 1, 1, 1, 4)
        return F.conv2d(y, self.w2)


@pytest.mark.parametrize(
    "model, x, expected",
    [
        pytest.param(Chain(nn.ReLU(), dims=1), X1, CHAIN, id="conv1d"),
        pytest.param(Chain(nn.ReLU(), dims=2), X2, CHAIN, id="conv2d"),
        pytest.param(Chain(nn.ReLU(), dims=3), X3, CHAIN, id="conv3d"),
        pytest.param(
            Chain(nn.Conv2d(4, 4, 3, padding=1, groups=4)),
            X2,
            {"c1": producer("c1") | {A("op.weight", 0, "channel"), A("op.bias", 0, "channel")} | reader("c2")},
            id="depthwise",
        ),
        pytest.param(
            Chain(nn.Conv2d(4, 12, 3, padding=1, groups=4, bias=False), mid=12),
            X2,
            {"c1": producer("c1") | {A("op.weight", 0, "channel", repeat=3)} | reader("c2", repeat=3)},
            id="depthwise-multiplier",
        ),
        pytest.param(
            FunctionalConv(),
            X2,
            {"w1": {A("w1", 0, "output"), A("b1", 0, "output"), A("dw", 0, "channel"), A("w2", 1, "input")}},
            id="functional",
        ),
    ],
)
def test_conv(model, x, expected):
    groups = check(model, x, expected)
    # A group is named by the layer that computes it, its first producer.
    assert all(g.producers[0] == name for name, g in groups.items())


def test_grouped_conv_is_refused_at_its_node():
    model = Chain(nn.Conv2d(4, 4, 3, padding=1, groups=2))
    error = refused(model, X2, "op", "call_module op (Conv2d)", r"grouped convolution \(groups=2\)")
    assert "channels produced by c1" in str(error)


# --------------------------------------------------------------------- conv transpose


class Up(nn.Module):
    """conv -> transposed conv (module or functional) -> conv."""

    def __init__(self, functional: bool, dims: int = 2) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        up = nn.ConvTranspose1d if dims == 1 else nn.ConvTranspose2d
        self.functional = functional
        self.c1 = conv(3, 4, 3, padding=1)
        if functional:
            self.w = nn.Parameter(randn(4, 5, *([2] * dims)))  # (in, out, *kernel)
            self.b = nn.Parameter(randn(5))
        else:
            self.up = up(4, 5, 2, stride=2)
        self.c2 = conv(5, 2, 1)
        self.dims = dims

    def forward(self, x):
        y = torch.relu(self.c1(x))
        if self.functional:
            f = F.conv_transpose1d if self.dims == 1 else F.conv_transpose2d
            y = f(y, self.w, self.b, stride=2)
        else:
            y = self.up(y)
        return self.c2(torch.relu(y))


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
@pytest.mark.parametrize("dims", [1, 2])
def test_conv_transpose(functional, dims):
    # A transposed convolution's weight is (in, out, ...): it reads on axis 0, writes on axis 1.
    if functional:
        up = {"w": {A("w", 1, "output"), A("b", 0, "output")} | reader("c2")}
        read = {A("w", 0, "input")}
    else:
        up = {"up": producer("up", axis=1) | reader("c2")}
        read = reader("up", axis=0)
    x = X1 if dims == 1 else X2
    check(Up(functional, dims), x, {"c1": producer("c1") | read, **up})


def test_grouped_conv_transpose_is_refused():
    # Even one group per channel: a transposed depthwise convolution is not passed through.
    model = Chain(nn.ConvTranspose2d(4, 4, 2, groups=4))
    refused(model, X2, "op", "call_module op (ConvTranspose2d)", r"grouped convolution \(groups=4\)")


# ---------------------------------------------------------------------------- linear


class Tokens(nn.Module):
    """Linear layers on (batch, tokens, features): the channels are the last dim."""

    def __init__(self, functional: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.functional = functional
        self.fc1 = nn.Linear(5, 6, bias=bias)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        if self.functional:
            return F.linear(torch.relu(F.linear(x, self.fc1.weight, self.fc1.bias)), self.fc2.weight, self.fc2.bias)
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize(
    "model, x, expected",
    [
        pytest.param(Tokens(), randn(3, 7, 5), {"fc1": producer("fc1") | reader("fc2")}, id="tokens"),
        pytest.param(Tokens(), randn(3, 5), {"fc1": producer("fc1") | reader("fc2")}, id="vectors"),
        pytest.param(
            Tokens(bias=False), randn(3, 5), {"fc1": producer("fc1", bias=False) | reader("fc2")}, id="no-bias"
        ),
        pytest.param(
            Tokens(functional=True), randn(3, 7, 5), {"fc1": producer("fc1") | reader("fc2")}, id="functional"
        ),
    ],
)
def test_linear(model, x, expected):
    check(model, x, expected)


# ------------------------------------------------------------------------- embedding


class Embed(nn.Module):
    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        if functional:
            self.table = nn.Parameter(randn(10, 6))
        else:
            self.emb = nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, ids):
        t = F.embedding(ids, self.table) if self.functional else self.emb(ids)
        return self.fc(torch.tanh(t)).mean(1)


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_embedding(functional):
    # An embedding table's columns are its channels (axis 1); the token ids are never permuted.
    name, param = ("table", "table") if functional else ("emb", "emb.weight")
    check(Embed(functional), torch.randint(0, 10, (3, 5), generator=_G), {name: {A(param, 1, "output")} | reader("fc")})


# ------------------------------------------------------------- per-channel (batch norm)


class NormChain(nn.Module):
    """c1 -> norm -> relu -> c2 with a norm given as a module or a function of one."""

    def __init__(self, norm: nn.Module, functional: Callable | None = None, dims: int = 2, linear: bool = False):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
        self.c1 = nn.Linear(3, 4) if linear else conv(3, 4, 3, padding=1)
        self.bn = norm
        self.functional = functional
        self.c2 = nn.Linear(4, 2) if linear else conv(4, 2, 1)

    def forward(self, x):
        y = self.c1(x)
        y = self.functional(self, y) if self.functional else self.bn(y)
        return self.c2(torch.relu(y))


def functional_bn(self, y):
    return F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias)


def functional_in(self, y):
    return F.instance_norm(y, weight=self.bn.weight, bias=self.bn.bias)


NORMED = {"c1": producer("c1") | per_channel("bn", *BN) | reader("c2")}


@pytest.mark.parametrize(
    "model, x, expected",
    [
        pytest.param(NormChain(nn.BatchNorm2d(4)), X2, NORMED, id="batchnorm2d"),
        pytest.param(NormChain(nn.BatchNorm1d(4), dims=1), X1, NORMED, id="batchnorm1d-maps"),
        pytest.param(NormChain(nn.BatchNorm1d(4), linear=True), randn(5, 3), NORMED, id="batchnorm1d-vectors"),
        pytest.param(
            NormChain(nn.BatchNorm2d(4, affine=False)),
            X2,
            {"c1": producer("c1") | per_channel("bn", "running_mean", "running_var") | reader("c2")},
            id="no-affine",
        ),
        pytest.param(
            NormChain(nn.InstanceNorm2d(4, affine=True, track_running_stats=True)), X2, NORMED, id="instancenorm"
        ),
        pytest.param(NormChain(nn.BatchNorm2d(4), functional_bn), X2, NORMED, id="functional-batchnorm"),
        pytest.param(
            NormChain(nn.InstanceNorm2d(4, affine=True), functional_in),
            X2,
            {"c1": producer("c1") | per_channel("bn", "weight", "bias") | reader("c2")},
            id="functional-instancenorm",
        ),
    ],
)
def test_per_channel_norms(model, x, expected):
    groups = check(model, x, expected)
    assert groups["c1"].producers == ("c1", "bn")


# ------------------------------------------------------------------------- layer norm


class LayerNormed(nn.Module):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        if where in ("last", "functional"):
            self.c1, self.c2 = nn.Linear(3, 4), nn.Linear(4, 2)
            self.ln = nn.LayerNorm(4)
        else:
            self.c1, self.c2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)
            self.ln = nn.LayerNorm([4, 4, 4] if where == "chw" else 4)  # over (C, H, W), or over W alone

    def forward(self, x):
        y = self.c1(x)
        y = F.layer_norm(y, (4,), self.ln.weight, self.ln.bias) if self.where == "functional" else self.ln(y)
        return self.c2(torch.relu(y))


@pytest.mark.parametrize(
    "where, x, expected",
    [
        # Channels last, normalised over them: weight and bias have one entry per channel.
        ("last", randn(3, 5, 3), {"c1": producer("c1") | per_channel("ln", "weight", "bias") | reader("c2")}),
        (
            "functional",
            randn(3, 5, 3),
            {"c1": producer("c1") | per_channel("ln", "weight", "bias") | reader("c2")},
        ),
        # Over (C, H, W) of conv maps: axis 0 of the (4, 4, 4) affine parameters indexes the channels.
        ("chw", X2, {"c1": producer("c1") | per_channel("ln", "weight", "bias") | reader("c2")}),
        # Over the width alone: the statistics and parameters do not involve the channels.
        ("width", X2, CHAIN),
    ],
)
def test_layer_norm(where, x, expected):
    check(LayerNormed(where), x, expected)


# ------------------------------------------------------------------------- group norm


class GroupNormed(nn.Module):
    def __init__(self, groups: int, functional: bool = False) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)
        self.gn = nn.GroupNorm(groups, 4)
        self.functional = functional

    def forward(self, x):
        y = self.c1(x)
        y = F.group_norm(y, self.gn.num_groups, self.gn.weight, self.gn.bias) if self.functional else self.gn(y)
        return self.c2(torch.relu(y))


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_group_norm_with_one_or_all_groups(groups, functional):
    expected = {"c1": producer("c1") | per_channel("gn", "weight", "bias") | reader("c2")}
    check(GroupNormed(groups, functional), X2, expected)


@pytest.mark.parametrize(
    "functional, op", [(False, "call_module gn (GroupNorm)"), (True, "call_function torch.nn.functional.group_norm")]
)
def test_group_norm_with_blocks_of_channels_is_refused(functional, op):
    node = "group_norm" if functional else "gn"
    refused(GroupNormed(2, functional), X2, node, op, "GroupNorm with 2 groups of 2 channels")


# ------------------------------------------------------------------------------ prelu


class FunctionalPReLU(nn.Module):
    def __init__(self, slopes: int) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)
        self.slope = nn.Parameter(torch.full((slopes,), 0.25))

    def forward(self, x):
        return self.c2(F.prelu(self.c1(x), self.slope))


@pytest.mark.parametrize(
    "model, expected, producers",
    [
        pytest.param(
            Chain(nn.PReLU(4)),
            {"c1": producer("c1") | per_channel("op", "weight") | reader("c2")},
            ("c1", "op"),
            id="per-channel",
        ),
        pytest.param(Chain(nn.PReLU()), CHAIN, ("c1",), id="shared"),
        pytest.param(
            FunctionalPReLU(4),
            {"c1": producer("c1") | {A("slope", 0, "channel")} | reader("c2")},
            None,  # not checked: a top-level slope parameter gives the producer name "" (an open question)
            id="functional",
        ),
        pytest.param(FunctionalPReLU(1), CHAIN, ("c1",), id="functional-shared"),
    ],
)
def test_prelu(model, expected, producers):
    groups = check(model, X2, expected)
    # One slope per channel makes the PReLU a producer of the group (where it records); a shared one does not.
    if producers is not None:
        assert groups["c1"].producers == producers


# ------------------------------------------------------------ elementwise, activations


ELEMENTWISE: dict[str, Callable | nn.Module] = {
    "ReLU": nn.ReLU(),
    "GELU": nn.GELU(),
    "Hardswish": nn.Hardswish(),
    "LeakyReLU": nn.LeakyReLU(0.2),
    "Softmax-over-channels": nn.Softmax(dim=1),
    "Dropout": nn.Dropout(0.5),
    "Identity": nn.Identity(),
    "torch.sigmoid": torch.sigmoid,
    "F.silu": F.silu,
    "F.normalize": lambda y: F.normalize(y, dim=1),
    ".clamp": lambda y: y.clamp(min=-0.5, max=0.5),
    ".tanh": lambda y: y.tanh(),
    "arithmetic": lambda y: (2 * y - 1) / 3 + y**2,
    "torch.where": lambda y: torch.where(y > 0, y, 0.1 * y),
    ".contiguous().float()": lambda y: y.contiguous().float(),
    ".to(dtype)": lambda y: y.to(torch.float32).clone(),
}


@pytest.mark.parametrize("op", list(ELEMENTWISE.values()), ids=list(ELEMENTWISE))
def test_elementwise_ops_pass_channels_through(op):
    check(Chain(op), X2, CHAIN)


class Scaled(nn.Module):
    """Parameters broadcast along the channels: a layer scale and a per-channel shift."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)
        self.scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)  # (C, 1, 1): channel axis 0
        self.shift = nn.Parameter(randn(1, 4, 1, 1))  # (1, C, 1, 1): channel axis 1
        self.scalar = nn.Parameter(torch.ones(1))  # the same for every channel

    def forward(self, x):
        return self.c2(self.c1(x) * self.scale + self.shift - self.scalar)


def test_parameters_along_the_channels_are_per_channel():
    # A parameter multiplied with the channels is per channel; one added to them writes them, as a bias does.
    check(Scaled(), X2, {"c1": producer("c1") | {A("scale", 0, "channel"), A("shift", 1, "output")} | reader("c2")})


class Constant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        # A tensor that is not a parameter, laid along the channels, cannot be permuted with them.
        return self.c2(self.c1(x) * torch.linspace(0.5, 1.5, 4).view(1, 4, 1, 1))


def test_a_constant_along_the_channels_keeps_them_in_place():
    assert groups_of(Constant(), X2) == {}


# ------------------------------------------------------------------ sums and residuals


class Residual(nn.Module):
    def __init__(self, combine: Callable) -> None:
        super().__init__()
        self.combine = combine
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, padding=1))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.stem(x)
        return self.head(torch.relu(self.combine(y, self.block(y))))


SUMS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "torch.add": lambda a, b: torch.add(a, b, alpha=0.5),
    "torch.sub": torch.sub,
    ".add": lambda a, b: a.add(b),
    ".sub_": lambda a, b: a.clone().sub_(b),
}


@pytest.mark.parametrize("combine", list(SUMS.values()), ids=list(SUMS))
def test_residual_sum_ties_the_stream(combine):
    # The stem and the block's last conv write the same stream; the block's first conv its own group.
    stream = producer("stem") | reader("block.0") | producer("block.2") | reader("head")
    check(Residual(combine), X2, {"stem": stream, "block.0": producer("block.0") | reader("block.2")})


class Stage(nn.Module):
    """Two convolutions of one module summed, then a gate multiplied in."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = nn.ModuleDict({"a": nn.Conv2d(3, 4, 3, padding=1), "b": nn.Conv2d(3, 4, 1)})
        self.gate = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.stage["a"](x) + self.stage["b"](x)
        y = y * torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))
        return self.head(y)


def test_a_stream_is_named_by_its_summed_producers_not_its_gate():
    groups = check(
        Stage(),
        X2,
        {"stage": producer("stage.a") | producer("stage.b") | reader("gate") | producer("gate") | reader("head")},
    )
    assert groups["stage"].producers == ("stage.a", "stage.b", "gate")


class Mismatched(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        # Channels of a in dim 1 added to channels of b moved to dim 2: not one layout.
        return self.c(self.a(x) + self.b(x).transpose(1, 2))  # (B, 4, 4, 4) both


def test_sum_of_channels_in_different_dims_is_refused():
    refused(Mismatched(), randn(5, 3, 4, 4), "add", "call_function operator.add", r"different dims \[1, 2\]")


# ----------------------------------------------------------------------- spatial ops


SPATIAL: dict[str, Callable | nn.Module] = {
    "MaxPool2d": nn.MaxPool2d(2),
    "AvgPool2d": nn.AvgPool2d(3, stride=1, padding=1),
    "AdaptiveAvgPool2d": nn.AdaptiveAvgPool2d(1),
    "F.max_pool2d": lambda y: F.max_pool2d(y, 2),
    "F.adaptive_max_pool2d": lambda y: F.adaptive_max_pool2d(y, 3),
    "F.interpolate": lambda y: F.interpolate(y, scale_factor=2, mode="nearest"),
    "Upsample": nn.Upsample(scale_factor=2, mode="bilinear"),
    "F.pad": lambda y: F.pad(y, (1, 2, 0, 1)),
    "ReflectionPad2d": nn.ReflectionPad2d(1),
    "ZeroPad2d": nn.ZeroPad2d((1, 0, 1, 0)),
    ".flip(width)": lambda y: y.flip(3),
    "torch.roll(height)": lambda y: torch.roll(y, 1, 2),
}


@pytest.mark.parametrize("op", list(SPATIAL.values()), ids=list(SPATIAL))
def test_spatial_ops_pass_channels_through(op):
    check(Chain(op), X2, CHAIN)


@pytest.mark.parametrize(
    "op, dims", [(nn.MaxPool1d(2), 1), (nn.AvgPool3d(2), 3), (lambda y: F.interpolate(y, scale_factor=2), 1)]
)
def test_spatial_ops_in_other_dimensions(op, dims):
    check(Chain(op, dims=dims), {1: X1, 3: X3}[dims], CHAIN)


@pytest.mark.parametrize(
    "op, node, desc, reason",
    [
        (lambda y: F.pad(y, (0, 0, 0, 0, 1, 1)), "pad", "call_function torch.nn.functional.pad", "the channels"),
        (lambda y: y.flip(1), "flip", "call_method .flip()", "along the channel dim 1"),
        # A 3d pooling of a 4d tensor pools (C, H, W) of an unbatched input: across channels, same shape.
        (nn.MaxPool3d((3, 1, 1), stride=1, padding=(1, 0, 0)), "op", "call_module op (MaxPool3d)", "last 3 dims"),
    ],
)
def test_spatial_ops_on_the_channels_are_refused(op, node, desc, reason):
    error = refused(Chain(op, mid=6 if node == "pad" else 4), X2, node, desc, reason)
    assert "channels produced by c1" in str(error)


# ------------------------------------------------------------------- reshape, flatten


class Flat(Chain):
    """``fc(op(relu(c1(x))))``: conv maps (4 channels of 4 x 4) turned into ``features`` features."""

    def __init__(self, op: Callable | nn.Module, features: int) -> None:
        super().__init__(op, c2=nn.Linear(features, 2))
        self.c1 = nn.Conv2d(3, 4, 3)  # 6x6 -> 4x4 maps

    def forward(self, x):
        y = torch.relu(self.c1(x))
        return self.c2(self.op(y) if hasattr(self, "op") else self.fn(y))


FLATTENED = {"c1": producer("c1") | reader("c2", repeat=16)}


@pytest.mark.parametrize(
    "op",
    [
        nn.Flatten(),
        lambda y: y.flatten(1),
        lambda y: torch.flatten(y, 1),
        lambda y: y.view(y.size(0), -1),
        lambda y: y.reshape(-1, 64),
        lambda y: y.unsqueeze(2).flatten(1),
    ],
    ids=["Flatten", ".flatten", "torch.flatten", ".view", ".reshape", "unsqueeze-flatten"],
)
def test_flatten_makes_blocks_of_features(op):
    # Each of the 4 channels owns 4 x 4 = 16 consecutive inputs of fc.
    check(Flat(op, 64), X2, FLATTENED)


@pytest.mark.parametrize(
    "op",
    [
        lambda y: y.flatten(1).view(-1, 4, 6, 6),
        lambda y: nn.functional.relu(y.flatten(2)).unflatten(2, (6, 6)),
        lambda y: y.unsqueeze(-1).squeeze(-1),
        lambda y: torch.reshape(y, (y.shape[0], 4, 36)).view(y.shape),
    ],
    ids=["flatten-view-back", "flatten-unflatten", "unsqueeze-squeeze", "torch.reshape-view"],
)
def test_reshapes_that_restore_the_channels(op):
    check(Chain(op), X2, CHAIN)


class TokensFlattened(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(20, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)).flatten(1))  # (B, 5, 4) -> (B, 20): channels interleaved


@pytest.mark.parametrize(
    "model, x, node, desc",
    [
        (Chain(lambda y: y.view(y.size(0), 2, -1), c2=nn.Conv1d(2, 2, 1)), X2, "view", "call_method .view()"),
        (TokensFlattened(), randn(3, 5, 3), "flatten", "call_method .flatten()"),
    ],
    ids=["splits-channels", "interleaves-channels"],
)
def test_reshapes_that_split_or_mix_channels_are_refused(model, x, node, desc):
    refused(model, x, node, desc, "splits or mixes the channels")


# ------------------------------------------------------------------------- reductions


@pytest.mark.parametrize(
    "op",
    [
        lambda y: y.mean(dim=(2, 3)),
        lambda y: torch.amax(y, dim=(-2, -1)),
        lambda y: y.sum(3).sum(2),
        lambda y: torch.std(y, dim=(2, 3)),
        lambda y: y.logsumexp(dim=3).mean(-1),
        lambda y: torch.max(y, dim=3)[0].min(2)[0],
        lambda y: y.mean((2, 3), keepdim=True).flatten(1),
    ],
    ids=["mean", "torch.amax", "sum-sum", "torch.std", "logsumexp-mean", "max-min-tuples", "keepdim-flatten"],
)
def test_reductions_over_space_keep_the_channels(op):
    check(Flat(op, 4), X2, {"c1": producer("c1") | reader("c2")})


@pytest.mark.parametrize(
    "op",
    [lambda y: y.mean(dim=1, keepdim=True), lambda y: torch.amax(y, 1, keepdim=True), lambda y: y.norm(dim=1)[:, None]],
    ids=["mean", "torch.amax", "norm"],
)
def test_reductions_over_the_channels_end_them(op):
    # Nothing reads the channels afterwards: the group holds its producer alone.
    check(Chain(op, mid=1), X2, {"c1": producer("c1")})


def test_elementwise_max_of_two_tensors_ties_them():
    class Maxed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.c(torch.max(self.a(x), self.b(x)))

    check(Maxed(), X2, {"a": producer("a") | producer("b") | reader("c")})


# ---------------------------------------------------------------------------- getitem


@pytest.mark.parametrize(
    "op, dims",
    [
        (lambda y: y[:, :, 1:], 2),
        (lambda y: y[..., ::2], 2),
        (lambda y: y[:, :], 2),
        (lambda y: y[:, 0:4, 2:], 2),
        (lambda y: y[:, None][:, 0], 2),
        (lambda y: y[:, :, 0], 1),
        (lambda y: y[..., -1, :], 1),
    ],
    ids=["slice-height", "ellipsis-step", "full", "full-channel-slice", "new-axis", "select-height", "ellipsis-select"],
)
def test_indexing_other_dims_keeps_the_channels(op, dims):
    c2 = nn.Conv1d(4, 2, 1) if dims == 1 else None
    check(Chain(op, c2=c2), X2, CHAIN)


@pytest.mark.parametrize(
    "op, mid, reason",
    [
        (lambda y: y[:, :2], 2, r"slices the channels \(dim 1\)"),
        (lambda y: y[:, 1:], 3, r"slices the channels \(dim 1\)"),
        (lambda y: y[:, 0], 6, r"selects a single channel \(dim 1\)"),
        (lambda y: y[:, [3, 2, 1, 0]], 4, "advanced indexing"),
    ],
    ids=["head", "tail", "single", "list"],
)
def test_indexing_the_channels_is_refused(op, mid, reason):
    c2 = nn.Conv1d(6, 2, 1) if mid == 6 else nn.Conv2d(mid, 2, 1)
    refused(Chain(op, c2=c2), X2, "getitem", "call_function operator.getitem", reason)


# -------------------------------------------------------------------------------- cat


class Cat(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6 if how == "channels" else 4, 1)
        self.mix = nn.Conv2d({"channels": 10, "width": 4, "input-first": 7, "input-last": 7}[how], 2, 1)

    def forward(self, x):
        a = torch.relu(self.a(x))
        if self.how == "channels":
            return self.mix(torch.cat([a, torch.relu(self.b(x))], dim=1))
        if self.how == "width":
            return self.mix(torch.cat((a, torch.relu(self.b(x))), -1))
        if self.how == "input-first":
            return self.mix(torch.cat([x, a], 1))
        return self.mix(torch.concat([a, x], dim=1))


@pytest.mark.parametrize(
    "how, expected",
    [
        # Side by side: each part keeps its own group, read at its offset.
        ("channels", {"a": producer("a") | reader("mix"), "b": producer("b") | reader("mix", offset=4)}),
        # Along the width: both inputs' channels land in the same slots, so they are tied.
        ("width", {"a": producer("a") | producer("b") | reader("mix")}),
        # The input's 3 channels keep their slot; a's group is read after them, or before.
        ("input-first", {"a": producer("a") | reader("mix", offset=3)}),
        ("input-last", {"a": producer("a") | reader("mix")}),
    ],
)
def test_cat(how, expected):
    check(Cat(how), X2, expected)


# ------------------------------------------------------------------------------ stack


class Stacked(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        s = torch.stack([self.a(x), self.b(x)], dim=self.dim)
        return self.c(torch.relu(s.sum(self.dim)))


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_stack_ties_the_stacked_channels(dim):
    # Stacking puts both inputs' channels in one dim of the output: they are tied, wherever the new dim is.
    groups = check(Stacked(dim), X2, {"a": producer("a") | producer("b") | reader("c")})
    assert groups["a"].producers == ("a", "b")


class StackedToken(nn.Module):
    """A parameter stacked with channels, and another broadcast over them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.token = nn.Parameter(randn(1, 4))  # (1, C): channel axis 1

    def forward(self, x):
        h = torch.relu(self.fc1(x))  # (B, C)
        s = torch.stack([h, self.token.expand(h.shape[0], -1)], dim=1)  # (B, 2, C)
        return self.fc2(s).mean(1)


def test_stack_with_a_parameter_records_it_as_entries_of_the_channels():
    check(StackedToken(), randn(3, 3), {"fc1": producer("fc1") | {A("token", 1, "output")} | reader("fc2")})


# ------------------------------------------------------------- split, chunk, unbind


class Split(nn.Module):
    """A cat of two groups split back along the channels, each part read by its own layer."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4 if "chunk" in how else 6, 1)
        self.p, self.q = nn.Conv2d(4, 2, 1), nn.Conv2d(4 if "chunk" in how else 6, 2, 1)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        if self.how == "split":
            p, q = y.split([4, 6], dim=1)
        elif self.how == "torch.split":
            p, q = torch.split(y, [4, 6], 1)
        elif self.how == "tensor_split":
            p, q = torch.tensor_split(y, [4], dim=1)
        elif self.how == "chunk":
            p, q = y.chunk(2, dim=1)
        else:
            p, q = torch.chunk(y, 2, 1)
        return self.p(p) + self.q(q)


@pytest.mark.parametrize("how", ["split", "torch.split", "tensor_split", "chunk", "torch.chunk"])
def test_split_and_chunk_undo_a_cat(how):
    check(Split(how), X2, {"a": producer("a") | reader("p"), "b": producer("b") | reader("q")})


@pytest.mark.parametrize(
    "op",
    [
        lambda y: torch.cat(y.split(2, dim=3)[::-1], 3),
        lambda y: sum(torch.split(y, [1, 2, 3], dim=2)[i].mean(2, keepdim=True) for i in range(3)),
        lambda y: torch.cat(torch.chunk(y, 3, dim=-1), -1),
        lambda y: y.chunk(2, 2)[0] * y.chunk(2, 2)[1],
        lambda y: torch.stack(torch.unbind(y, 3), 3),
        lambda y: y.unbind(2)[0].unsqueeze(2) + y.unbind(-1)[1].unsqueeze(-1),
        lambda y: torch.tensor_split(y, 2, dim=2)[1],
    ],
    ids=["split", "torch.split", "torch.chunk", "chunk", "torch.unbind", "unbind", "tensor_split"],
)
def test_split_chunk_unbind_along_other_dims_keep_the_channels(op):
    check(Chain(op), X2, CHAIN)


@pytest.mark.parametrize(
    "op, node, desc, reason",
    [
        (lambda y: y.split(2, dim=1)[0], "split", "call_method .split()", "splits the channels of one group"),
        (lambda y: torch.chunk(y, 2, 1)[1], "chunk", "call_function torch.chunk", "splits the channels of one group"),
        (lambda y: y.unbind(1)[0][:, None], "unbind", "call_method .unbind()", "unbinds the channels"),
    ],
    ids=["split", "chunk", "unbind"],
)
def test_splitting_one_group_is_refused(op, node, desc, reason):
    mid = 1 if node == "unbind" else 2
    refused(Chain(op, mid=mid), X2, node, desc, reason)


def test_split_that_cuts_through_a_part_is_refused():
    class Cut(Split):
        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)  # 4 + 6 channels
            p, q = y.split([5, 5], dim=1)
            return self.p(p[:, :4]) + self.q(torch.cat([q, q[:, :1]], 1))

    refused(Cut("split"), X2, "split", "call_method .split()", "splits the channels of one group")


# ---------------------------------------------------- transpose, permute, movedim


class ChannelsLast(nn.Module):
    """conv -> channels moved last -> linear -> channels moved back -> conv."""

    def __init__(self, there: Callable, back: Callable) -> None:
        super().__init__()
        self.there, self.back = there, back
        self.c1, self.fc, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 5), nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.c2(self.back(torch.relu(self.fc(self.there(self.c1(x))))))


MOVES = {
    "transpose": (lambda y: y.transpose(1, 3), lambda y: y.transpose(3, 1)),
    "torch.transpose": (lambda y: torch.transpose(y, 1, -1), lambda y: torch.transpose(y, -1, 1)),
    "swapaxes": (lambda y: y.swapaxes(1, 3), lambda y: torch.swapaxes(y, 1, 3)),
    "permute": (lambda y: y.permute(0, 2, 3, 1), lambda y: y.permute((0, 3, 1, 2))),
    "torch.permute": (lambda y: torch.permute(y, (0, 2, 3, 1)), lambda y: torch.permute(y, [0, 3, 1, 2])),
    "movedim": (lambda y: y.movedim(1, -1), lambda y: y.movedim(-1, 1)),
    "torch.movedim": (lambda y: torch.movedim(y, 1, 3), lambda y: torch.movedim(y, (3,), (1,))),
    "mixed": (lambda y: y.permute(0, 2, 1, 3).transpose(2, 3), lambda y: y.movedim((3, 1), (1, 2))),
}


@pytest.mark.parametrize("moves", list(MOVES.values()), ids=list(MOVES))
def test_dim_moves_carry_the_channels(moves):
    # The linear layer reads the conv's channels in the last dim; the conv reads the linear's back in dim 1.
    check(ChannelsLast(*moves), X2, {"c1": producer("c1") | reader("fc"), "fc": producer("fc") | reader("c2")})


@pytest.mark.parametrize(
    "there, moved",
    [
        (lambda y: y.transpose(1, 2), "transpose"),
        (lambda y: y.permute(0, 3, 1, 2), "permute"),
        (lambda y: torch.movedim(y, 1, 2), "movedim"),
    ],
)
def test_channels_moved_away_are_refused_where_they_are_read(there, moved):
    # The consumer (c2) reads dim 1, which no longer holds the channels: the error names it, and the move.
    error = refused(Chain(there, mid=6), X2, "c2", "call_module c2 (Conv2d)", "reads channels from dim 1")
    assert f"has them in dim 2 (moved to dim 2 by node {moved!r})" in str(error)


# ----------------------------------------------------------------------------- expand


@pytest.mark.parametrize(
    "op",
    [
        lambda y: y * y.mean((2, 3), keepdim=True).expand_as(y),
        lambda y: y.amax((2, 3), keepdim=True).expand(-1, -1, 6, 6),
        lambda y: y.mean(3, keepdim=True).broadcast_to(y.shape),
        lambda y: y.repeat(1, 1, 2, 1),
        lambda y: y[:, :, :1].expand(5, 4, 6, 6),
        lambda y: y.unsqueeze(0).expand(2, -1, -1, -1, -1).mean(0),
    ],
    ids=["expand_as", "expand", "broadcast_to", "repeat-height", "expand-sliced", "expand-new-dim"],
)
def test_expand_keeps_the_channels(op):
    check(Chain(op), X2, CHAIN)


class ClassToken(nn.Module):
    def __init__(self, method: str) -> None:
        super().__init__()
        self.method = method
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.cls = nn.Parameter(randn(1, 1, 4))

    def forward(self, x):
        t = self.fc1(x)  # (B, T, C)
        if self.method == "expand":
            cls = self.cls.expand(t.shape[0], -1, -1)
        elif self.method == "expand_as":
            cls = self.cls.expand_as(t[:, :1])
        else:
            cls = self.cls.broadcast_to((t.shape[0], 1, 4))
        return self.fc2(torch.relu(torch.cat([cls, t], 1)))[:, 0]


@pytest.mark.parametrize("method", ["expand", "expand_as", "broadcast_to"])
def test_an_expanded_parameter_is_still_that_parameter(method):
    check(ClassToken(method), randn(3, 5, 3), {"fc1": producer("fc1") | {A("cls", 2, "output")} | reader("fc2")})


def test_repeating_the_channels_is_refused():
    refused(Chain(lambda y: y.repeat(1, 2, 1, 1), mid=8), X2, "repeat", "call_method .repeat()", "repeats the channels")
