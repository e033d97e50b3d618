"""Channel groups of transformer blocks: residual stream, attention heads (q/k and v/o), MLP units."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer
from vit_helpers import shaken

from mergescope.groups import (
    Axis,
    UnsupportedLayerError,
    apply_linear,
    channel_groups,
    check_equivalence,
    head_permutation,
    head_structure,
    permute,
    random_permutations,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def by_name(groups):
    return {g.name: g for g in groups}


# ---------------------------------------------------------------- a hand-made block


class Block(nn.Module):
    """Patch embedding, class token, position embedding, one pre-norm block with nn.MultiheadAttention, a head."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Conv2d(1, 8, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 5, 8))
        self.ln1 = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.ln2 = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        h = self.ln1(t)
        if not self.batch_first:
            h = h.transpose(0, 1)
        a = self.attn(h, h, h, need_weights=False)[0]
        t = t + (a if self.batch_first else a.transpose(0, 1))
        t = t + self.fc2(torch.relu(self.fc1(self.ln2(t))))
        return self.head(t[:, 0])


BLOCK_AXES = {
    "embed": {
        ("embed.weight", 0, 0, "output"),
        ("embed.bias", 0, 0, "output"),
        ("cls", 2, 0, "output"),
        ("pos", 2, 0, "output"),
        ("ln1.weight", 0, 0, "channel"),
        ("ln1.bias", 0, 0, "channel"),
        ("attn.in_proj_weight", 1, 0, "input"),
        ("attn.out_proj.weight", 0, 0, "output"),
        ("attn.out_proj.bias", 0, 0, "output"),
        ("ln2.weight", 0, 0, "channel"),
        ("ln2.bias", 0, 0, "channel"),
        ("fc1.weight", 1, 0, "input"),
        ("fc2.weight", 0, 0, "output"),
        ("fc2.bias", 0, 0, "output"),
        ("head.weight", 1, 0, "input"),
    },
    "attn.qk": {
        ("attn.in_proj_weight", 0, 0, "output"),
        ("attn.in_proj_weight", 0, 8, "output"),
        ("attn.in_proj_bias", 0, 0, "output"),
        ("attn.in_proj_bias", 0, 8, "output"),
    },
    "attn.vo": {
        ("attn.in_proj_weight", 0, 16, "output"),
        ("attn.in_proj_bias", 0, 16, "output"),
        ("attn.out_proj.weight", 1, 0, "input"),
    },
    "fc1": {("fc1.weight", 0, 0, "output"), ("fc1.bias", 0, 0, "output"), ("fc2.weight", 1, 0, "input")},
}


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_hand_made_block_has_exactly_the_expected_axes(batch_first):
    model = shaken(Block(batch_first))
    x = torch.randn(3, 1, 8, 8)
    groups = by_name(channel_groups(model, x))
    assert set(groups) == set(BLOCK_AXES)
    for name, expected in BLOCK_AXES.items():
        assert {(a.param, a.axis, a.offset, a.role) for a in groups[name].axes} == expected, name
        assert all(a.repeat == 1 for a in groups[name].axes)
    assert (groups["attn.qk"].heads, groups["attn.qk"].tied) == (2, "attn")
    assert (groups["attn.vo"].heads, groups["attn.vo"].tied) == (2, "attn")
    assert (groups["embed"].heads, groups["embed"].tied, groups["fc1"].heads) == (1, "", 1)
    assert groups["attn.qk"].producers == groups["attn.vo"].producers == ()
    assert check_equivalence(model, x, groups=list(groups.values()), rtol=1e-5) <= 1e-5


class Packed(nn.Module):
    """timm-style attention: one qkv linear, reshape / permute / unbind, fused or manual attention."""

    def __init__(self, fused: bool, heads: int = 2, dim: int = 8) -> None:
        super().__init__()
        self.fused, self.heads, self.dim = fused, heads, dim
        self.fc = nn.Linear(5, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        t = self.fc(x)
        b, n, c = t.shape
        qkv = self.qkv(t).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = self.q_norm(q)
        if self.fused:
            o = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * 0.5) @ k.transpose(-2, -1)
            o = attn.softmax(dim=-1) @ v
        o = o.transpose(1, 2).reshape(b, n, c)
        return self.head((t + self.proj(o)).mean(1))


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "manual"])
def test_a_packed_qkv_projection_is_cut_into_query_key_and_value(fused):
    model = shaken(Packed(fused))
    x = torch.randn(3, 4, 5)
    groups = by_name(channel_groups(model, x))
    # Named after the attention's module path: here the packed projection itself, at the top level.
    assert set(groups) == {"fc", "qkv.qk", "qkv.vo"}
    qk, vo = groups["qkv.qk"], groups["qkv.vo"]
    assert {(a.param, a.offset) for a in qk.axes} == {
        ("qkv.weight", 0),
        ("qkv.weight", 8),
        ("qkv.bias", 0),
        ("qkv.bias", 8),
    }
    assert Axis("proj.weight", 1, role="input") in vo.axes
    assert {(a.param, a.offset) for a in vo.axes if a.param.startswith("qkv")} == {("qkv.weight", 16), ("qkv.bias", 16)}
    assert (qk.heads, vo.heads, qk.tied, vo.tied) == (2, 2, "qkv", "qkv")
    assert Axis("qkv.weight", 1, role="input") in groups["fc"].axes
    assert check_equivalence(model, x, groups=list(groups.values()), rtol=1e-5) <= 1e-5


def test_an_unknown_op_on_attention_heads_names_the_node():
    class Rolled(Packed):
        def forward(self, x):
            t = self.fc(x)
            b, n, c = t.shape
            q, k, v = self.qkv(t).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            o = nn.functional.scaled_dot_product_attention(torch.roll(q, 1, 1), k, v)
            return self.head((t + self.proj(o.transpose(1, 2).reshape(b, n, c))).mean(1))

    with pytest.raises(UnsupportedLayerError, match=r"node 'roll' \(call_function torch\.roll\).*attention heads"):
        channel_groups(Rolled(True), torch.randn(3, 4, 5))


# --------------------------------------------------------- permutations of heads


def test_head_permutation_and_its_structure():
    perm = head_permutation([1, 0], [[1, 0, 2], [2, 1, 0]])
    # position h*3+i takes channel head_perm[h]*3 + within[h][i]
    assert perm.tolist() == [4, 3, 5, 2, 1, 0]
    order, within = head_structure(perm, 2)
    assert order.tolist() == [1, 0] and within.tolist() == [[1, 0, 2], [2, 1, 0]]
    with pytest.raises(ValueError, match="mixes channels of different heads"):
        head_structure([0, 3, 2, 1, 4, 5], 2)


def test_random_permutations_move_whole_heads_and_share_the_head_order():
    groups = channel_groups(shaken(Block()), torch.randn(2, 1, 8, 8))
    for seed in range(5):
        perms = random_permutations(groups, seed)
        qk_order, _ = head_structure(perms["attn.qk"], 2)
        vo_order, _ = head_structure(perms["attn.vo"], 2)
        assert np.array_equal(qk_order, vo_order)
    assert all(np.array_equal(random_permutations(groups, 3)[k], v) for k, v in random_permutations(groups, 3).items())
    # every head order and within-head order is drawn
    drawn = {tuple(random_permutations(groups, s)["attn.qk"]) for s in range(40)}
    assert len(drawn) == len({tuple(p) for p in drawn}) and len(drawn) > 10


def test_permute_refuses_permutations_that_break_heads_or_their_shared_order():
    model = shaken(Block())
    groups = channel_groups(model, torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="'attn.qk'.*mixes channels of different heads"):
        permute(model, {"attn.qk": np.array([0, 4, 2, 3, 1, 5, 6, 7])}, groups)
    swapped = head_permutation([1, 0], [range(4), range(4)])
    with pytest.raises(ValueError, match="share the head order of 'attn'"):
        permute(model, {"attn.qk": swapped, "attn.vo": np.arange(8)}, groups)
    # both swapped: the same function
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        moved = permute(model, {"attn.qk": swapped, "attn.vo": swapped}, groups).eval()
        assert torch.allclose(moved(x), model(x), atol=1e-6)


def test_general_linear_maps_are_refused_on_attention_heads():
    model = shaken(Block())
    groups = channel_groups(model, torch.randn(2, 1, 8, 8))
    t = np.eye(8) + 0.1
    with pytest.raises(ValueError, match="'attn.qk' holds attention heads"):
        apply_linear(model, {"attn.qk": (t, None)}, groups, per_channel="mix")


def test_every_valid_head_permutation_of_a_block_keeps_its_function():
    # Exhaustive over head orders (2) and a few within-head orders, against a plain forward pass.
    model = shaken(Block())
    x = torch.randn(2, 1, 8, 8)
    groups = channel_groups(model, x)
    with torch.no_grad():
        y = model(x)
        for order, shift in itertools.product(([0, 1], [1, 0]), range(3)):
            within = [np.roll(np.arange(4), shift + h) for h in range(2)]
            perms = {"attn.qk": head_permutation(order, within), "attn.vo": head_permutation(order, within[::-1])}
            assert torch.allclose(permute(model, perms, groups).eval()(x), y, atol=1e-5)


# ----------------------------------------------------------- real architectures


def small_vit(channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=28, patch_size=4, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128)
    if channels != 3:
        model.conv_proj = nn.Conv2d(channels, 64, 4, 4)
    return shaken(model)


def test_small_torchvision_vit_groups_cover_the_stream_heads_and_mlps():
    model = small_vit()
    x = torch.randn(2, 3, 28, 28)
    groups = by_name(channel_groups(model, x))
    stream = groups["conv_proj"]
    params = {(a.param, a.axis) for a in stream.axes}
    assert {
        ("conv_proj.weight", 0),
        ("class_token", 2),
        ("encoder.pos_embedding", 2),
        ("heads.head.weight", 1),
    } <= params
    for i in range(4):
        layer = f"encoder.layers.encoder_layer_{i}"
        assert {(f"{layer}.ln_1.weight", 0), (f"{layer}.ln_2.bias", 0), (f"{layer}.mlp.0.weight", 1)} <= params
        assert {(f"{layer}.self_attention.in_proj_weight", 1), (f"{layer}.self_attention.out_proj.weight", 0)} <= params
        qk, vo = groups[f"{layer}.self_attention.qk"], groups[f"{layer}.self_attention.vo"]
        assert (qk.size, qk.heads, vo.heads) == (64, 4, 4) and qk.tied == vo.tied == f"{layer}.self_attention"
        assert groups[f"{layer}.mlp.0"].size == 128
    assert {("encoder.ln.weight", 0), ("encoder.ln.bias", 0)} <= params
    assert len(groups) == 1 + 4 * 3
    assert check_equivalence(model, x, groups=list(groups.values()), rtol=1e-5) <= 1e-5


def test_one_channel_small_vit_is_equivalent_after_permutation():
    model = small_vit(channels=1)
    assert check_equivalence(model, torch.randn(2, 1, 28, 28), rtol=1e-5) <= 1e-5


def test_torchvision_vit_b_16_is_equivalent_after_permutation():
    model = shaken(torchvision.models.vit_b_16(image_size=32))
    x = torch.randn(2, 3, 32, 32)
    groups = channel_groups(model, x)
    assert len(groups) == 1 + 12 * 3
    assert sum(g.heads == 12 for g in groups) == 24
    assert check_equivalence(model, x, groups=groups, rtol=1e-5) <= 1e-5


def test_timm_vit_tiny_is_equivalent_after_permutation():
    timm = pytest.importorskip("timm")
    model = shaken(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32))
    x = torch.randn(2, 3, 32, 32)
    groups = by_name(channel_groups(model, x))
    assert len(groups) == 1 + 12 * 3
    stream = {(a.param, a.axis) for a in groups["patch_embed.proj"].axes}
    assert {("cls_token", 2), ("pos_embed", 2), ("blocks.0.norm1.weight", 0), ("head.weight", 1)} <= stream
    assert (groups["blocks.0.attn.qk"].heads, groups["blocks.0.attn.vo"].tied) == (3, "blocks.0.attn")
    assert check_equivalence(model, x, groups=list(groups.values()), rtol=1e-5) <= 1e-5


def test_open_clip_vit_b_32_is_equivalent_after_permutation():
    open_clip = pytest.importorskip("open_clip")
    model = shaken(open_clip.create_model("ViT-B-32", pretrained=None).visual)
    x = torch.randn(2, 3, 224, 224)
    groups = by_name(channel_groups(model, x))
    assert len(groups) == 1 + 12 * 3
    stream = {(a.param, a.axis) for a in groups["conv1"].axes}
    assert {("class_embedding", 0), ("positional_embedding", 1), ("ln_pre.weight", 0), ("proj", 0)} <= stream
    assert groups["transformer.resblocks.0.attn.qk"].heads == 12
    assert check_equivalence(model, x, groups=list(groups.values()), rtol=1e-5) <= 1e-5
