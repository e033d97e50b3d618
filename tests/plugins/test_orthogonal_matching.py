"""Orthogonal matching (Theus et al. 2025): Procrustes of the stream and heads, learned maps, exact alignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer
from vit_helpers import centred_orthogonal, head_orthogonal

from mergescope.components import Context
from mergescope.errors import ConfigError
from mergescope.groups import (
    align_to_reference,
    apply_linear,
    channel_groups,
    fold_layernorms,
    is_centred_orthogonal,
    is_head_orthogonal,
    layernorm_paths,
)
from mergescope.values import TensorImageDataset
from mergescope_plugins.orthogonal_matching import (
    OrthogonalMatching,
    centred_procrustes,
    head_procrustes,
    rotate_tensors,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_vit(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=48)
    model.conv_proj = nn.Conv2d(1, 32, 4, 4)
    with torch.no_grad():
        nn.init.normal_(model.heads.head.weight, 0, 0.3)
        model.class_token.normal_(0, 0.3)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    model.heads.head = nn.Linear(32, 10)
    return model.eval()


@pytest.fixture(scope="module")
def context():
    torch.manual_seed(0)
    x = torch.randn(40, 1, 16, 16)
    labels = small_vit(0)(x).argmax(dim=1).detach()
    data = TensorImageDataset("toy", x, labels, np.arange(40), [str(i) for i in range(10)])
    return Context(data=data, batch_size=20, quiet=True)


def test_centred_procrustes_recovers_a_rotation_that_keeps_the_ones_vector():
    # Model vectors x = Q^T y: the second moments E[y x^T] = S Q, whose polar factor is Q.
    rng = np.random.default_rng(0)
    q = centred_orthogonal(6, rng)
    y = rng.normal(size=(50, 6))
    moments = y.T @ (y @ q) / 50  # E[y x^T] with x = Q^T y, i.e. rows y Q
    found = centred_procrustes(moments)
    assert is_centred_orthogonal(found)
    np.testing.assert_allclose(found, q, atol=1e-8)


def test_centred_procrustes_by_hand_in_two_dimensions():
    # In 2-d the only maps keeping (1, 1) and orthogonal are the identity and the swap;
    # moments favouring the swap give the swap.
    np.testing.assert_allclose(centred_procrustes(np.array([[0.0, 1.0], [1.0, 0.0]])), [[0, 1], [1, 0]], atol=1e-12)
    np.testing.assert_allclose(centred_procrustes(np.array([[2.0, 0.5], [0.5, 2.0]])), np.eye(2), atol=1e-12)


def test_head_procrustes_recovers_the_head_order_and_the_rotations_shared_by_both_groups():
    rng = np.random.default_rng(1)
    order = np.array([2, 0, 3, 1])
    truth = [head_orthogonal(16, 4, order, rng) for _ in range(2)]
    cross = []
    for t in truth:
        y = rng.normal(size=(200, 16))
        cross.append(y.T @ (y @ t) / 200)  # E[y x^T], x = T^T y
    found = head_procrustes(cross, heads=4)
    for f, t in zip(found, truth):
        assert is_head_orthogonal(f, 4)
        np.testing.assert_allclose(f, t, atol=1e-8)


def test_rotate_tensors_is_apply_linear_for_orthogonal_maps():
    model = small_vit(1)
    x = torch.randn(2, 1, 16, 16)
    folded, _ = fold_layernorms(model, x)
    groups = channel_groups(folded, x)
    rng = np.random.default_rng(2)
    maps = {}
    for g in groups:
        if layernorm_paths(folded, g):
            maps[g.name] = centred_orthogonal(g.size, rng)
        elif g.heads > 1:
            maps[g.name] = head_orthogonal(g.size, g.heads, np.arange(g.heads), rng)
    expected = apply_linear(folded, {n: (t, t.T) for n, t in maps.items()}, groups).state_dict()
    rotated = rotate_tensors(
        folded.state_dict(), groups, {n: torch.as_tensor(t, dtype=torch.float32) for n, t in maps.items()}
    )
    for key, value in expected.items():
        torch.testing.assert_close(rotated[key], value, rtol=1e-5, atol=1e-5)


def _disguised(model: nn.Module, x: torch.Tensor, seed: int) -> nn.Module:
    """The folded model under random stream, head and MLP symmetries: the same function, other weights."""
    folded, _ = fold_layernorms(model, x)
    groups = channel_groups(folded, x)
    rng = np.random.default_rng(seed)
    maps = {}
    for g in groups:
        if layernorm_paths(folded, g):
            t = centred_orthogonal(g.size, rng)
        elif g.heads > 1:
            t = head_orthogonal(g.size, g.heads, np.random.default_rng(len(g.tied) + seed).permutation(g.heads), rng)
        else:
            t = np.eye(g.size)[rng.permutation(g.size)]
        maps[g.name] = (t, t.T)
    return apply_linear(folded, maps, groups)


def test_the_closed_form_undoes_every_symmetry_of_a_disguised_copy(context):
    x = context.data.images[:2]
    model = small_vit(0)
    disguised = _disguised(model, x, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(disguised(x), model(x), rtol=1e-4, atol=1e-4)
    models = {"a": model, "b": disguised}
    alignment = OrthogonalMatching(epochs=0).align(models, "a", context)
    aligned = align_to_reference(models, alignment, channel_groups(model, x), x)
    reference = fold_layernorms(model, x)[0].state_dict()
    for key, value in aligned["b"].state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=1e-3, atol=1e-3, msg=key)
    # The reference comes back folded as well: its LayerNorms without affine, the same function.
    assert torch.all(aligned["a"].encoder.ln.weight == 1)
    assert alignment.diagnostics["closed_form_loss"].item() == pytest.approx(alignment.diagnostics["final_loss"].item())
    kinds = dict(zip(alignment.diagnostics["group"].values, alignment.diagnostics["map"].values))
    assert kinds["conv_proj"] == "orthogonal"
    assert kinds["encoder.layers.encoder_layer_0.self_attention.qk"] == "head-orthogonal"
    assert kinds["encoder.layers.encoder_layer_0.mlp.0"] == "permutation"


def test_learning_lowers_the_midpoint_loss_and_keeps_the_function(context):
    x = context.data.images[:4]
    models = {"a": small_vit(0), "b": small_vit(5)}
    aligner = OrthogonalMatching(epochs=3, lr=0.05, batch_size=10)
    alignment = aligner.align(models, "a", context)
    d = alignment.diagnostics
    assert d["epoch_loss"].shape == (1, 4)
    assert float(d["final_loss"][0]) < float(d["closed_form_loss"][0])
    aligned = align_to_reference(models, alignment, channel_groups(models["a"], x), x)
    with torch.no_grad():
        torch.testing.assert_close(aligned["b"](x), models["b"](x), rtol=1e-4, atol=1e-4)
    assert "closed form" in aligner.describe(d)


def test_orthogonal_matching_needs_data_and_two_models():
    models = {"a": small_vit(0), "b": small_vit(1)}
    with pytest.raises(ConfigError, match="needs \\[data\\]"):
        OrthogonalMatching().align(models, "a", Context(quiet=True))
    with pytest.raises(ConfigError, match="reference"):
        OrthogonalMatching().align({"a": models["a"]}, "a", Context(quiet=True))


def test_on_timm_the_packed_qkv_heads_and_the_stream_are_recovered_too():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1, num_classes=10
    ).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    x = torch.randn(60, 3, 32, 32)
    data = TensorImageDataset("toy", x, model(x).argmax(dim=1), np.arange(60), [str(i) for i in range(10)])
    context = Context(data=data, batch_size=30, quiet=True)
    disguised = _disguised(model, x[:2], seed=4)
    models = {"a": model, "b": disguised}
    alignment = OrthogonalMatching(epochs=0).align(models, "a", context)
    kinds = dict(zip(alignment.diagnostics["group"].values, alignment.diagnostics["map"].values))
    assert kinds == {
        "patch_embed.proj": "orthogonal",
        "blocks.0.attn.qk": "head-orthogonal",
        "blocks.0.attn.vo": "head-orthogonal",
        "blocks.0.mlp.fc1": "permutation",
    }
    aligned = align_to_reference(models, alignment, channel_groups(model, x[:2]), x[:2])
    reference = fold_layernorms(model, x[:2])[0].state_dict()
    for key, value in aligned["b"].state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=1e-3, atol=1e-3, msg=key)
