"""Weight matching on vision transformers: whole heads, one head order per attention layer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from mergescope.components import Context
from mergescope.groups import align_to_reference, channel_groups, head_permutation, head_structure, permute
from mergescope.values import TensorImageDataset
from mergescope_plugins.weight_matching import WeightMatching, _as_arrays, match_heads, match_weights, solved_together

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def brute_force(scores, heads):
    """Every head order and every order within each head, scored directly."""
    size = scores[0].shape[0]
    d = size // heads
    best, best_perms = -np.inf, None
    for order in itertools.permutations(range(heads)):
        for withins in itertools.product(itertools.permutations(range(d)), repeat=heads * len(scores)):
            perms = [head_permutation(order, withins[k * heads : (k + 1) * heads]) for k in range(len(scores))]
            total = sum(s[np.arange(size), p].sum() for s, p in zip(scores, perms))
            if total > best + 1e-12:
                best, best_perms = total, perms
    return best_perms, best


def test_match_heads_is_the_best_head_structured_assignment():
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores = [rng.normal(size=(4, 4)), rng.normal(size=(4, 4))]
        perms, total = match_heads(scores, heads=2)
        expected, best = brute_force(scores, 2)
        assert total == pytest.approx(best)
        assert all(np.array_equal(p, e) for p, e in zip(perms, expected))
        orders = [head_structure(p, 2)[0] for p in perms]
        assert np.array_equal(orders[0], orders[1])


def test_match_heads_by_hand():
    # Head pair (reference 0, model 1) scores 3 + 3 in the first group and 2 in the second; the swap wins.
    a = np.array([[0, 0, 3, 0], [0, 0, 0, 3], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=float)
    b = np.array([[0, 0, 0, 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=float)
    (pa, pb), total = match_heads([a, b], heads=2)
    assert pa.tolist() == [2, 3, 0, 1] and pb.tolist() == [3, 2, 0, 1]
    assert total == 3 + 3 + 1 + 1 + 1 + 1 + 1 + 1
    with pytest.raises(ValueError, match="divisible by 3 heads"):
        match_heads([a], heads=3)


def small_vit(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=28, patch_size=4, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64)
    model.conv_proj = nn.Conv2d(1, 32, 4, 4)
    nn.init.normal_(model.heads.head.weight, 0, 0.1)
    return model.eval()


def test_tied_attention_groups_are_solved_together():
    groups = channel_groups(small_vit(0), torch.randn(2, 1, 28, 28))
    units = solved_together(groups)
    assert [[g.name for g in u] for u in units][:2] == [
        ["conv_proj"],
        ["encoder.layers.encoder_layer_0.self_attention.qk", "encoder.layers.encoder_layer_0.self_attention.vo"],
    ]
    assert sum(len(u) for u in units) == len(groups)


def head_permuted_copy():
    """The small ViT, its groups, a permutation of its heads (whole heads and within each) and the permuted copy."""
    model = small_vit(0)
    groups = channel_groups(model, torch.randn(2, 1, 28, 28))
    order = [2, 0, 3, 1]
    perms = {}
    for i in range(2):
        base = f"encoder.layers.encoder_layer_{i}.self_attention"
        rng = np.random.default_rng(i)
        perms[f"{base}.qk"] = head_permutation(order, [rng.permutation(8) for _ in range(4)])
        perms[f"{base}.vo"] = head_permutation(order, [rng.permutation(8) for _ in range(4)])
    return model, groups, perms, permute(model, perms, groups)


def test_a_head_permuted_copy_is_recovered_exactly():
    model, groups, perms, copy = head_permuted_copy()
    found, _ = match_weights(_as_arrays(model), _as_arrays(copy), groups)
    for g in groups:
        expected = np.argsort(perms[g.name]) if g.name in perms else np.arange(g.size)
        assert np.array_equal(found[g.name], expected), g.name


def test_a_warm_start_a_few_units_off_converges_to_the_permutation():
    """Starting next to the answer (as the straight-through estimator's projections do), the products of a
    packed q/k/v projection are updated column by column; the other parts of its axis must not enter them."""
    model, groups, perms, copy = head_permuted_copy()
    expected = {g.name: np.argsort(perms[g.name]) if g.name in perms else np.arange(g.size) for g in groups}
    start = {name: p.copy() for name, p in expected.items()}
    for name in start:
        if name.endswith(".vo"):  # two units of one head swapped: a valid start a few units off
            start[name][[0, 1]] = start[name][[1, 0]]
    found, _ = match_weights(_as_arrays(model), _as_arrays(copy), groups, initial=start)
    for g in groups:
        assert np.array_equal(found[g.name], expected[g.name]), g.name


def test_aligning_two_small_vits_gives_an_equivalent_model():
    a, b = small_vit(0), small_vit(1)
    x = torch.randn(12, 1, 28, 28)
    data = TensorImageDataset("toy", x, torch.randint(0, 10, (12,)), np.arange(12), [str(i) for i in range(10)])
    alignment = WeightMatching().align({"a": a, "b": b}, "a", Context(data=data, batch_size=6, quiet=True))
    groups = channel_groups(a, x[:2])
    aligned = align_to_reference({"a": a, "b": b}, alignment, groups)["b"].eval()
    with torch.no_grad():
        assert torch.allclose(aligned(x), b(x), atol=1e-5)
    assert int(alignment.diagnostics["moved_units"].sum()) > 0
    for g in groups:
        if g.heads > 1:
            head_structure(np.argmax(alignment.transforms["b"][g.name].values, axis=0), g.heads)  # whole heads
