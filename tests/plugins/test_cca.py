from __future__ import annotations

import numpy as np
import pytest
import torch

from mergescope import Context
from mergescope.groups import channel_groups, example_input, permute
from mergescope.testing import check_component, example_dataset
from mergescope_plugins.cca import CCA, CCAMerge, cca_transform
from mergescope_plugins.zoo import MLP


@pytest.fixture(scope="module")
def data():
    return example_dataset(n=200, shape=(1, 8, 8))


def test_cca_transform_recovers_an_invertible_map():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(5000, 4))
    mix = rng.normal(size=(4, 4))
    x = y @ np.linalg.inv(mix)  # x @ mix == y
    cov = np.cov(np.hstack([x, y]).T, bias=True)
    t, corr = cca_transform(cov[:4, :4], cov[4:, 4:], cov[:4, 4:], regularization=0.0)
    np.testing.assert_allclose(corr, 1.0, atol=1e-6)
    np.testing.assert_allclose(x @ t, y, atol=1e-5)
    with pytest.raises(ValueError, match="one width"):
        cca_transform(np.eye(3), np.eye(4), np.zeros((3, 4)))


def test_cca_merge_of_a_permuted_copy_is_the_model(data):
    torch.manual_seed(0)
    model = MLP(hidden=[16]).build((1, 8, 8), 3).eval()
    groups = channel_groups(model, example_input(data))
    rng = np.random.default_rng(1)
    other = permute(model, {g.name: rng.permutation(g.size) for g in groups}, groups)
    context = Context(data=data, quiet=True)
    alignment = CCA(regularization=0.0).align({"a": model, "b": other}, "a", context)
    t = alignment.transforms["b"]["fc1"].values
    assert np.allclose(np.abs(t).max(axis=1), 1, atol=1e-3)  # a permutation, up to numerical noise
    merged = CCAMerge(regularization=0.0).merge({"a": model, "b": other}, context).model
    with torch.no_grad():
        assert torch.allclose(merged(data.images), model(data.images), atol=1e-3)


def test_conformance():
    check_component(CCA)
    check_component(CCAMerge)


def test_on_a_vit_cca_aligns_the_mlp_units_and_leaves_heads_and_the_stream():
    from mergescope.groups import random_permutations
    from mergescope_plugins.cca import linear_unsafe
    from mergescope_plugins.zoo import ViT

    data = example_dataset(n=64, shape=(1, 8, 8))
    torch.manual_seed(0)
    model = ViT(patch_size=4, layers=1, heads=2, width=16, mlp_width=32).build((1, 8, 8), 3).eval()
    groups = channel_groups(model, example_input(data))
    unsafe = linear_unsafe(model, groups)
    mlp = [g.name for g in groups if g.name not in unsafe]
    assert mlp == ["encoder.layers.encoder_layer_0.mlp.0"]
    assert sorted(set(unsafe.values())) == ["LayerNorm", "attention heads"]
    assert all(unsafe[g.name] == "attention heads" for g in groups if g.heads > 1)

    perms = random_permutations(groups, seed=1)
    other = permute(model, perms, groups)
    alignment = CCA(regularization=0.0).align({"a": model, "b": other}, "a", Context(data=data, quiet=True))
    assert set(alignment.transforms["b"]) == set(mlp)
    assert sorted(alignment.diagnostics["skipped"].values) == sorted(unsafe)
    # Unit j of the copy's MLP is the model's unit perms[j]: CCA maps it there.
    t = alignment.transforms["b"][mlp[0]].transpose("unit", "unit_ref").values
    assert np.allclose(np.abs(t).max(axis=1), 1, atol=1e-3)
    np.testing.assert_array_equal(np.abs(t).argmax(axis=1), perms[mlp[0]])
