"""Orthogonal maps on transformers: LayerNorm folding, the residual stream and attention heads."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import vit_helpers as helpers
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer
from vit_helpers import shaken

from mergescope.groups import (
    affine_free,
    apply_linear,
    channel_groups,
    fold_layernorms,
    is_centred_orthogonal,
    is_head_orthogonal,
    layernorm_paths,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=48)
    return shaken(model)


def centred_orthogonal(n: int, seed: int) -> np.ndarray:
    return helpers.centred_orthogonal(n, np.random.default_rng(seed))


def head_orthogonal(size: int, heads: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return helpers.head_orthogonal(size, heads, rng.permutation(heads), rng)


def test_folding_moves_every_pre_norm_affine_into_its_readers_and_keeps_the_function():
    model = small_vit()
    x = torch.randn(3, 3, 16, 16)
    folded, paths = fold_layernorms(model, x)
    assert paths == [
        "encoder.layers.encoder_layer_0.ln_1",
        "encoder.layers.encoder_layer_0.ln_2",
        "encoder.layers.encoder_layer_1.ln_1",
        "encoder.layers.encoder_layer_1.ln_2",
        "encoder.ln",
    ]
    for path in paths:
        norm = folded.get_submodule(path)
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    assert not affine_free(model, paths) and affine_free(folded, paths)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    # The original is untouched.
    assert not torch.all(model.encoder.ln.weight == 1)


def test_folding_by_hand_on_one_linear_reader():
    # y = g * n + b read by W y + c: the folded reader is W diag(g), c + W b.
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(2)
            self.fc = nn.Linear(2, 1)

        def forward(self, x):
            return self.fc(self.norm(x))

    model = Tiny()
    with torch.no_grad():
        model.norm.weight.copy_(torch.tensor([2.0, 3.0]))
        model.norm.bias.copy_(torch.tensor([1.0, -1.0]))
        model.fc.weight.copy_(torch.tensor([[1.0, 1.0]]))
        model.fc.bias.fill_(0.5)
    folded, paths = fold_layernorms(model, torch.randn(4, 2))
    assert paths == ["norm"]
    assert folded.fc.weight.tolist() == [[2.0, 3.0]]
    assert folded.fc.bias.tolist() == [0.5]  # 0.5 + 1 * 1 + 1 * (-1)


def test_a_layernorm_read_by_the_residual_stream_keeps_its_affine():
    class PreNormStream(nn.Module):  # open_clip's ln_pre: its output is the stream itself
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 6)
            self.ln_pre = nn.LayerNorm(6)
            self.ln = nn.LayerNorm(6)
            self.fc = nn.Linear(6, 6)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            t = self.ln_pre(self.embed(x))
            t = t + self.fc(self.ln(t))
            return self.head(t)

    model = shaken(PreNormStream())
    folded, paths = fold_layernorms(model, torch.randn(3, 4))
    assert paths == ["ln"]
    assert not affine_free(folded, ["ln_pre"])
    groups = channel_groups(folded, torch.randn(3, 4))
    stream = next(g for g in groups if "ln_pre" in layernorm_paths(folded, g))
    q = centred_orthogonal(stream.size, 0)
    with pytest.raises(ValueError, match="fold them first"):
        apply_linear(folded, {stream.name: (q, q.T)}, groups)


def test_centred_orthogonal_maps_on_the_folded_stream_and_orthogonal_heads_keep_the_function():
    model = small_vit()
    x = torch.randn(3, 3, 16, 16)
    folded, _ = fold_layernorms(model, x)
    groups = channel_groups(folded, x)
    maps = {}
    for i, g in enumerate(groups):
        if layernorm_paths(folded, g):
            t = centred_orthogonal(g.size, i)
            assert is_centred_orthogonal(t)
        elif g.heads > 1:  # the tied query/key and value/output groups move their heads alike
            t = head_orthogonal(g.size, g.heads, int(g.tied[-len("0.self_attention") :][0]))
            rotated = np.kron(np.eye(g.heads), np.linalg.qr(np.random.default_rng(i).normal(size=(8, 8)))[0])
            t = rotated @ t  # other orthogonal blocks, the same head order
            assert is_head_orthogonal(t, g.heads) and not is_centred_orthogonal(t)
        else:
            t = np.eye(g.size)[np.random.default_rng(i).permutation(g.size)]
        maps[g.name] = (t, t.T)
    transformed = apply_linear(folded, maps, groups)
    with torch.no_grad():
        torch.testing.assert_close(transformed(x), model(x), rtol=1e-4, atol=1e-4)
        stream = next(g for g in groups if layernorm_paths(folded, g))
        assert not torch.allclose(transformed.conv_proj.weight, folded.conv_proj.weight)
        # The class token and position embedding are written into the stream: they are mapped too.
        q = torch.as_tensor(maps[stream.name][0], dtype=torch.float32)
        torch.testing.assert_close(transformed.class_token[0, 0], q @ folded.class_token[0, 0], rtol=1e-5, atol=1e-5)


def test_maps_that_are_not_exact_are_refused():
    model = small_vit()
    x = torch.randn(3, 3, 16, 16)
    folded, _ = fold_layernorms(model, x)
    groups = channel_groups(folded, x)
    stream = next(g for g in groups if layernorm_paths(folded, g))
    qk = next(g for g in groups if g.heads > 1)
    rng = np.random.default_rng(0)
    plain = np.linalg.qr(rng.normal(size=(stream.size, stream.size)))[0]  # orthogonal, moves the ones vector
    assert not is_centred_orthogonal(plain)
    with pytest.raises(ValueError, match="normalised by LayerNorms"):
        apply_linear(folded, {stream.name: (plain, plain.T)}, groups)
    q = centred_orthogonal(stream.size, 1)
    with pytest.raises(ValueError, match="fold them first"):
        apply_linear(model, {stream.name: (q, q.T)}, groups)  # the unfolded model
    mixed = head_orthogonal(qk.size, qk.heads, 0) + 0.01  # every block nonzero: heads mixed
    assert not is_head_orthogonal(mixed, qk.heads)
    with pytest.raises(ValueError, match="holds attention heads"):
        apply_linear(folded, {qk.name: (mixed, None)}, groups)
    scaled = 2 * head_orthogonal(qk.size, qk.heads, 0)
    assert not is_head_orthogonal(scaled, qk.heads)
    with pytest.raises(ValueError, match="must move their heads alike"):
        apply_linear(folded, {qk.name: (head_orthogonal(qk.size, qk.heads, 3), None)}, groups)


def test_timm_vit_tiny_folds_and_keeps_its_function_under_orthogonal_maps():
    timm = pytest.importorskip("timm")
    model = shaken(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2))
    x = torch.randn(2, 3, 32, 32)
    folded, paths = fold_layernorms(model, x)
    assert paths == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm"]
    groups = channel_groups(folded, x)
    maps = {}
    for i, g in enumerate(groups):
        if layernorm_paths(folded, g):
            maps[g.name] = (centred_orthogonal(g.size, i), None)
        elif g.heads > 1:
            rotated = np.kron(np.eye(g.heads), np.linalg.qr(np.random.default_rng(i).normal(size=(64, 64)))[0])
            maps[g.name] = (rotated @ head_orthogonal(g.size, g.heads, len(g.tied)), None)
    with torch.no_grad():
        torch.testing.assert_close(apply_linear(folded, maps, groups)(x), model(x), rtol=1e-4, atol=1e-4)
