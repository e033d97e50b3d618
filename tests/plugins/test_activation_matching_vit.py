"""Activation matching on vision transformers: token activations, attention heads from the recorded input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from mergescope.components import Context
from mergescope.groups import align_to_reference, channel_groups, head_structure, permute, random_permutations
from mergescope.statistics import CoMoments
from mergescope.values import TensorImageDataset
from mergescope_plugins.activation_matching import (
    ActivationMatching,
    group_correlations,
    match_unit,
    projected_correlation,
    token_reads,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_vit(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=28, patch_size=4, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64)
    model.conv_proj = nn.Conv2d(1, 32, 4, 4)
    nn.init.normal_(model.heads.head.weight, 0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def context():
    torch.manual_seed(0)
    x = torch.randn(12, 1, 28, 28)
    data = TensorImageDataset("toy", x, torch.randint(0, 10, (12,)), np.arange(12), [str(i) for i in range(10)])
    return Context(data=data, batch_size=6, quiet=True)


def test_match_unit_by_hand():
    # Two heads of two units: model head 1 correlates with reference head 0 (within it, swapped).
    qk = np.array([[0, 0, 0.9, 0.1], [0, 0, 0.2, 0.3], [0.8, 0.1, 0, 0], [0.2, 0.7, 0, 0]])
    ((perm, mean),) = match_unit([qk], heads=2)
    # reference unit j takes model unit perm[j]: reference head 0 <- model head 1, head 1 <- head 0
    assert perm.tolist() == [2, 3, 0, 1]
    assert mean == pytest.approx((0.8 + 0.7 + 0.9 + 0.3) / 4)
    ((plain, _),) = match_unit([qk], heads=1)
    assert plain.tolist() == [2, 3, 0, 1]


def test_attention_groups_are_read_from_the_attention_input():
    model = small_vit(0)
    groups = {g.name: g for g in channel_groups(model, torch.randn(2, 1, 28, 28))}
    base = "encoder.layers.encoder_layer_0.self_attention"
    assert token_reads(model, groups[f"{base}.qk"]) == [(base, "project", 0), (base, "project", 32)]
    assert token_reads(model, groups[f"{base}.vo"]) == [(base, "project", 64)]


def test_a_permuted_copy_is_recovered_with_tokens_as_samples(context):
    a = small_vit(0)
    groups = channel_groups(a, context.data.images[:2])
    perms = random_permutations(groups, 4)
    b = permute(a, perms, groups)
    alignment = ActivationMatching().align({"a": a, "b": b}, "a", context)
    aligned = align_to_reference({"a": a, "b": b}, alignment, groups)["b"]
    for k, v in aligned.state_dict().items():
        assert torch.allclose(v, a.state_dict()[k], atol=1e-6), k
    result = alignment.diagnostics
    assert np.allclose(result["matched_correlation"].values, 1.0)
    assert result["heads"].sel(group="encoder.layers.encoder_layer_1.self_attention.vo") == 4


def test_correlations_take_every_token_as_a_sample(context):
    # The residual stream's correlation at one LayerNorm, recomputed by hand over (image, token) rows.
    a, b = small_vit(0), small_vit(1)
    layer = "encoder.layers.encoder_layer_0.ln_1"
    rows = {}
    for name, model in (("a", a), ("b", b)):
        out = []
        handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, o, _out=out: _out.append(o))
        with torch.no_grad():
            model(context.data.images)
        handle.remove()
        rows[name] = out[0].reshape(-1, 32).double().numpy()
    expected = np.corrcoef(rows["b"].T, rows["a"].T)[:32, 32:]
    acc = CoMoments(32, 32)
    acc.update(rows["b"], rows["a"])
    assert np.allclose(acc.correlation, expected)
    groups = channel_groups(a, context.data.images[:2])
    stream = [g for g in groups if g.name == "conv_proj"]
    only_ln = [type(stream[0])(g.name, g.size, g.axes, (layer,)) for g in stream]
    corr = group_correlations({"a": a, "b": b}, "a", only_ln, context)[("b", "conv_proj")]
    assert np.allclose(corr, expected, atol=1e-6)
    mean = group_correlations({"a": a, "b": b}, "a", only_ln, context, positions=False)[("b", "conv_proj")]
    per_image = {k: v.reshape(12, -1, 32).mean(1) for k, v in rows.items()}
    assert np.allclose(mean, np.corrcoef(per_image["b"].T, per_image["a"].T)[:32, 32:], atol=1e-6)


@pytest.mark.parametrize("positions", [True, False])
def test_two_small_vits_align_to_an_equivalent_model(context, positions):
    a, b = small_vit(0), small_vit(1)
    alignment = ActivationMatching(positions=positions).align({"a": a, "b": b}, "a", context)
    groups = channel_groups(a, context.data.images[:2])
    aligned = align_to_reference({"a": a, "b": b}, alignment, groups)["b"].eval()
    x = context.data.images
    with torch.no_grad():
        assert torch.allclose(aligned(x), b(x), atol=1e-5)
    for g in groups:
        perm = np.argmax(alignment.transforms["b"][g.name].values, axis=0)
        if g.heads > 1:
            head_structure(perm, g.heads)
    assert int(alignment.diagnostics["moved_units"].sum()) > 0


def test_attention_correlations_come_from_the_input_moments(context):
    # The query units of one attention layer, computed by hand from its input, against the moments' formula.
    a, b = small_vit(0), small_vit(1)
    layer = "encoder.layers.encoder_layer_0.self_attention"
    inputs = {}
    for name, model in (("a", a), ("b", b)):
        handle = model.get_submodule(layer).register_forward_hook(
            lambda _m, args, _o, _n=name: inputs.__setitem__(_n, args[0].reshape(-1, 32).double().numpy())
        )
        with torch.no_grad():
            model(context.data.images)
        handle.remove()
    w = {n: m.get_submodule(layer).in_proj_weight[:32].detach().double().numpy() for n, m in (("a", a), ("b", b))}
    q = {n: inputs[n] @ w[n].T for n in w}
    expected = np.corrcoef(q["b"].T, q["a"].T)[:32, 32:]
    joint = np.cov(np.hstack([inputs["b"], inputs["a"]]).T, bias=True)
    got = projected_correlation(w["b"], w["a"], joint[:32, :32], joint[32:, 32:], joint[:32, 32:])
    assert np.allclose(got, expected, atol=1e-8)
