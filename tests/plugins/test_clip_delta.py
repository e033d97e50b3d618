"""Tests of the clip-delta metric: exact values on hand-made embeddings, the top-k sets, errors, conformance."""

from __future__ import annotations

import itertools
from typing import ClassVar

import attrs
import numpy as np
import pytest
import torch
import xarray as xr

from mergescope import Context, TensorImageDataset, hookimpl, make_activation
from mergescope.errors import ConfigError, ContractError, UnknownComponentError
from mergescope.options import structure_options
from mergescope.testing import check_component
from mergescope_plugins import embedders
from mergescope_plugins.clip_delta import ClipDelta, clip_delta, set_similarities


@attrs.define
class TableEmbedder:
    """Test embedder: image i (its first pixel holds i) gets row i of ``vectors``."""

    name: ClassVar[str] = "test-table"
    seen: ClassVar[list[int]] = []

    vectors: list[list[float]] = attrs.field(factory=list)

    def embed(self, images: torch.Tensor) -> np.ndarray:
        index = images[:, 0, 0, 0].round().long().numpy()
        TableEmbedder.seen.extend(index.tolist())
        return np.asarray(self.vectors, dtype=np.float64)[index]


@attrs.define
class AnonymousEmbedder:
    """Test embedder without an identity(): mean colour per image."""

    name: ClassVar[str] = "test-anonymous"

    offset: float = 1.0

    def embed(self, images: torch.Tensor) -> np.ndarray:
        return images.mean(dim=(2, 3)).double().numpy() + self.offset


class _TestEmbedders:
    @hookimpl
    def register_embedders(self, register):
        register(TableEmbedder)
        register(AnonymousEmbedder)


@pytest.fixture
def registry(fresh_registry):
    """The registry with the bundled embedders and the test embedders."""
    if "open-clip" not in fresh_registry.get_registry().names("embedder"):
        fresh_registry.register_plugin(embedders)
    fresh_registry.register_plugin(_TestEmbedders(), name="test-embedders")
    TableEmbedder.seen.clear()
    return fresh_registry.get_registry()


def table_case(members_a, members_b, n_images, ids_offset=100):
    """Activations whose top-k sets are given, and a context whose image i encodes i.

    ``members_a[j]`` are the image indices where unit j of a fires (value 1, else 0).
    """
    units = len(members_a)
    a = np.zeros((n_images, units), dtype=np.float32)
    b = np.zeros((n_images, units), dtype=np.float32)
    for j, (sa, sb) in enumerate(zip(members_a, members_b)):
        a[list(sa), j] = 1.0 + np.arange(len(sa))  # distinct values: the order inside a set is irrelevant
        b[list(sb), j] = 1.0 + np.arange(len(sb))
    ids = ids_offset + np.arange(n_images)
    labels = np.zeros(n_images, dtype=np.int64)
    da = make_activation(a, sample_ids=ids, labels=labels, model="m1", layer="conv")
    db = make_activation(b, sample_ids=ids, labels=labels, model="m2", layer="conv")
    images = torch.arange(n_images, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
    context = Context(data=TensorImageDataset("table", images, labels, ids, ["0"]), quiet=True)
    return da, db, context


def brute_force(sets_1, sets_2, e, self_pairs=False):
    """CLIP-δ by explicit loops over image pairs (the documented readings)."""
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    n = len(sets_1)

    def mean_cos(s, t, distinct=False):
        pairs = [(i, j) for i, j in itertools.product(range(len(s)), range(len(t))) if not (distinct and i == j)]
        return np.mean([e[s[i]] @ e[t[j]] for i, j in pairs])

    within = np.array([mean_cos(sets_1[j], sets_1[j], distinct=not self_pairs) for j in range(n)])
    between = np.array([mean_cos(sets_1[j], sets_2[j]) for j in range(n)])
    others = np.array([np.mean([mean_cos(sets_1[j], sets_1[p]) for p in range(n) if p != j]) for j in range(n)])
    return within, between, others


# ------------------------------------------------------------------------------ kernel


@pytest.mark.parametrize("self_pairs", [False, True])
def test_kernel_matches_pairwise_definition(self_pairs):
    rng = np.random.default_rng(0)
    e = rng.normal(size=(30, 8))
    for k, units in ((2, 2), (3, 5), (10, 3)):
        sets_1 = rng.integers(0, 30, size=(units, k))
        sets_2 = rng.integers(0, 30, size=(units, k))
        ours = set_similarities(sets_1, sets_2, e, self_pairs=self_pairs)
        ref = brute_force(sets_1, sets_2, e, self_pairs=self_pairs)
        for got, want in zip(ours, ref):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        with np.errstate(divide="ignore", invalid="ignore"):
            expected = (ref[0] - ref[1]) / ref[2]
        np.testing.assert_allclose(
            clip_delta(sets_1, sets_2, e, self_pairs=self_pairs), np.where(ref[2] > 0, expected, np.nan), atol=1e-12
        )


def test_kernel_in_blocks_of_units_agrees(monkeypatch):
    from mergescope_plugins import clip_delta as module

    rng = np.random.default_rng(5)
    e = rng.normal(size=(25, 4))
    sets_1, sets_2 = rng.integers(0, 25, size=(7, 3)), rng.integers(0, 25, size=(7, 3))
    whole = set_similarities(sets_1, sets_2, e)
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 24)  # two units per block
    for got, want in zip(set_similarities(sets_1, sets_2, e), whole):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)


def test_kernel_leaves_self_pairs_out_of_the_within_similarity():
    e = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    within, _, _ = set_similarities(np.array([[0, 1], [1, 2]]), np.array([[0, 1], [1, 2]]), e)
    # Only the pair (0, 1): cos 0.6, not (1 + 1 + 0.6 + 0.6) / 4.
    np.testing.assert_allclose(within, [0.6, 0.8], atol=1e-15)


# Three unit vectors: cos(e0, e1) = 0.6, cos(e1, e2) = 0.8, cos(e0, e2) = 0.
_THREE = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])


@pytest.mark.parametrize("listed", [[[0, 1], [1, 2]], [[1, 0], [2, 1]]], ids=["same-order", "other-order"])
def test_identical_sets_by_hand_with_and_without_self_pairs(listed):
    sets_1, sets_2 = np.array([[0, 1], [1, 2]]), np.array(listed)
    # Between (all 4 pairs): unit 0 (1 + 0.6 + 0.6 + 1) / 4 = 0.8, unit 1 (1 + 0.8 + 0.8 + 1) / 4 = 0.9.
    # Others: {0, 1} x {1, 2} -> (0.6 + 0 + 1 + 0.8) / 4 = 0.6 for both units.
    # Without self-pairs, within is the one distinct pair: 0.6 and 0.8, so
    # delta = (0.6 - 0.8) / 0.6 = -1/3 and (0.8 - 0.9) / 0.6 = -1/6.
    within, between, others = set_similarities(sets_1, sets_2, _THREE)
    np.testing.assert_allclose(within, [0.6, 0.8], rtol=0, atol=1e-15)
    np.testing.assert_allclose(between, [0.8, 0.9], rtol=0, atol=1e-15)
    np.testing.assert_allclose(others, [0.6, 0.6], rtol=0, atol=1e-15)
    np.testing.assert_allclose(clip_delta(sets_1, sets_2, _THREE), [-1 / 3, -1 / 6], rtol=0, atol=1e-15)
    # With self-pairs within is the mean over all 4 pairs, the same mean as between: exactly 0,
    # whatever order the sets are listed in.
    within, between, _ = set_similarities(sets_1, sets_2, _THREE, self_pairs=True)
    np.testing.assert_allclose(within, [0.8, 0.9], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(within, between)
    np.testing.assert_array_equal(clip_delta(sets_1, sets_2, _THREE, self_pairs=True), [0.0, 0.0])


def test_identical_sets_in_any_order_give_exactly_zero_with_self_pairs():
    rng = np.random.default_rng(6)
    e = np.abs(rng.normal(size=(50, 16)))  # positive: a positive baseline
    for _ in range(20):
        sets_1 = np.stack([rng.choice(50, 10, replace=False) for _ in range(5)])
        sets_2 = np.stack([rng.permutation(row) for row in sets_1])
        np.testing.assert_array_equal(clip_delta(sets_1, sets_2, e, self_pairs=True), np.zeros(5))


def test_different_sets_by_hand_with_and_without_self_pairs():
    sets_1, sets_2 = np.array([[0, 1], [1, 2]]), np.array([[0, 2], [2, 0]])
    # Between: {0, 1} x {0, 2} -> (1 + 0 + 0.6 + 0.8) / 4 = 0.6; {1, 2} x {2, 0} -> (0.8 + 0.6 + 1 + 0) / 4 = 0.6.
    # Others 0.6 as above. Within 0.6, 0.8 without self-pairs; 0.8, 0.9 with them.
    _, between, others = set_similarities(sets_1, sets_2, _THREE)
    np.testing.assert_allclose(between, [0.6, 0.6], rtol=0, atol=1e-15)
    np.testing.assert_allclose(others, [0.6, 0.6], rtol=0, atol=1e-15)
    # (0.6 - 0.6) / 0.6 = 0 and (0.8 - 0.6) / 0.6 = 1/3.
    np.testing.assert_allclose(clip_delta(sets_1, sets_2, _THREE), [0.0, 1 / 3], rtol=0, atol=1e-15)
    # (0.8 - 0.6) / 0.6 = 1/3 and (0.9 - 0.6) / 0.6 = 1/2: each the default plus (1 - w) / (k * others).
    np.testing.assert_allclose(clip_delta(sets_1, sets_2, _THREE, self_pairs=True), [1 / 3, 1 / 2], rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "sets_1, sets_2, e, match",
    [
        ([[0], [1]], [[0], [1]], np.eye(2), "k >= 2"),
        ([[0, 1]], [[0, 1]], np.eye(2), "at least 2 units"),
        ([[0, 1], [1, 0]], [[0, 1]], np.eye(2), r"\(units, k\)"),
        ([[0, 1], [1, 0]], [[0, 1], [1, 0]], np.zeros((2, 2)), "zero or not finite"),
    ],
)
def test_kernel_rejects_bad_input(sets_1, sets_2, e, match):
    with pytest.raises(ValueError, match=match):
        set_similarities(np.array(sets_1), np.array(sets_2), e)


# --------------------------------------------------------------- the metric, exact values


def _group_vectors(d: int, groups: list[int | None]) -> list[list[float]]:
    """Image i gets (e_0 + e_{g+1}) / sqrt(2) for group g: cos 1 within a group, 1/2 across."""
    rows = []
    for g in groups:
        v = np.zeros(d)
        if g is None:  # orthogonal to every group vector
            v[d - 1] = 1.0
        else:
            v[0] = v[g + 1] = 1 / np.sqrt(2)
        rows.append(v.tolist())
    return rows


def test_exact_values_on_hand_made_embeddings(registry):
    # Images 0-1: group 0, 2-3: group 1, 4-5 and 6-7: group 2, 8: orthogonal to all.
    vectors = _group_vectors(5, [0, 0, 1, 1, 2, 2, 2, 2, None, 0, 1, 2])
    members_a = [{0, 1}, {2, 3}, {6, 7}]
    members_b = [
        {0, 1},  # unit 0: the same images
        {4, 5},  # unit 1: other images of another group (cos 1/2 to a's)
        {6, 8},  # unit 2: one shared image, one unrelated
    ]
    a, b, context = table_case(members_a, members_b, n_images=12)
    metric = ClipDelta(k=2, embedder="test-table", embedder_options={"vectors": vectors})
    result = metric.score(a, b, context=context)
    # Within: 1 for every unit (both images of a set share a vector); others: 1/2.
    np.testing.assert_allclose(result["similarity_within"], [1.0, 1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(result["similarity_others"], [0.5, 0.5, 0.5], atol=1e-12)
    # Between: 1; 1/2; pairs (6,6)=1, (6,8)=0, (7,6)=1, (7,8)=0 -> 1/2.
    np.testing.assert_allclose(result["similarity_between"], [1.0, 0.5, 0.5], atol=1e-12)
    np.testing.assert_allclose(result, [0.0, 1.0, 1.0], atol=1e-12)
    assert result.name == "clip_delta" and result.dims == ("unit",) and result.dtype == np.float64
    assert result["embedder"].item() == f"test-table {{'vectors': {vectors}}}"
    assert result["model"].item() == "m2" and result["reference"].item() == "m1" and result["layer"].item() == "conv"


def test_identical_sets_of_distinct_images_score_slightly_below_zero(registry):
    rng = np.random.default_rng(1)
    vectors = np.abs(rng.normal(size=(9, 4))).tolist()  # positive: a positive baseline
    members = [{0, 1, 2}, {3, 4, 5}, {6, 7, 8}]
    a, b, context = table_case(members, members, n_images=9)
    result = ClipDelta(k=3, embedder="test-table", embedder_options={"vectors": vectors}).score(a, b, context=context)
    within, others = result["similarity_within"].values, result["similarity_others"].values
    np.testing.assert_allclose(result, -(1 - within) / (3 * others), rtol=0, atol=1e-12)
    assert np.all(result.values < 0)


def test_identical_sets_score_exactly_zero_with_self_pairs(registry):
    rng = np.random.default_rng(1)
    vectors = np.abs(rng.normal(size=(9, 4))).tolist()
    members = [{0, 1, 2}, {3, 4, 5}, {6, 7, 8}]
    a, b, context = table_case(members, members, n_images=9)
    # The same sets, ranked the other way round in b (activations 1, 2, 3 become 3, 2, 1).
    b = b.copy(data=np.where(b.values > 0, 4 - b.values, 0).astype(b.dtype))
    default = ClipDelta(k=3, embedder="test-table", embedder_options={"vectors": vectors})
    counted = ClipDelta(k=3, embedder="test-table", embedder_options={"vectors": vectors}, self_pairs=True)
    first, second = default.score(a, b, context=context), counted.score(a, b, context=context)
    np.testing.assert_array_equal(second.values, np.zeros(3))
    np.testing.assert_array_equal(second["similarity_within"], second["similarity_between"])
    # The two readings differ by (1 - w) / (k * others), w the default within similarity.
    w, others = first["similarity_within"].values, first["similarity_others"].values
    np.testing.assert_allclose(second - first, (1 - w) / (3 * others), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(second["similarity_between"], first["similarity_between"])
    np.testing.assert_array_equal(second["similarity_others"], first["similarity_others"])


def test_each_needed_image_is_embedded_once(registry):
    vectors = np.abs(np.random.default_rng(2).normal(size=(20, 3))).tolist()
    members_a = [{0, 1, 2}, {2, 3, 4}, {4, 5, 0}]
    members_b = [{0, 1, 7}, {2, 3, 4}, {9, 10, 11}]
    a, b, context = table_case(members_a, members_b, n_images=20)
    metric = ClipDelta(k=3, embedder="test-table", embedder_options={"vectors": vectors})
    first = metric.score(a, b, context=context)
    needed = set().union(*members_a, *members_b)
    assert sorted(TableEmbedder.seen) == sorted(needed)
    # A second pair over the same data (another layer or model, in a step) embeds only new images.
    a2, b2, _ = table_case(members_a, [{0, 1, 12}, {2, 3, 4}, {13, 14, 15}], n_images=20)
    metric.score(a2, b2, context=context)
    assert sorted(TableEmbedder.seen) == sorted(needed | {12, 13, 14, 15})
    np.testing.assert_array_equal(metric.score(a, b, context=context), first)  # from kept embeddings
    assert sorted(TableEmbedder.seen) == sorted(needed | {12, 13, 14, 15})


def test_ties_are_broken_by_sample_id_and_constant_units_are_named(registry):
    vectors = np.abs(np.random.default_rng(3).normal(size=(8, 3))).tolist()
    a, b, context = table_case([{5, 6}, {1, 2}], [{5, 6}, set()], n_images=8)
    b = b.assign_coords(unit=[10, 11])
    metric = ClipDelta(k=2, embedder="test-table", embedder_options={"vectors": vectors})
    with pytest.warns(RuntimeWarning, match=r"unit\(s\) 11 (of '\S+' \(against '\S+'\) )?(at '\S+' )?are constant"):
        result = metric.score(a, b, context=context)
    # b's unit 11 is all zeros: its top-2 are the two lowest sample ids (images 0 and 1).
    sets_1 = np.array([[5, 6], [1, 2]])
    _, between, _ = brute_force(sets_1, np.array([[5, 6], [0, 1]]), np.asarray(vectors))
    np.testing.assert_allclose(result["similarity_between"], between, atol=1e-12)
    assert list(result["unit"].values) == [10, 11]


def test_zero_baseline_gives_nan_with_a_warning(registry):
    vectors = np.eye(4).tolist()  # every image orthogonal to the others
    a, b, context = table_case([{0, 1}, {2, 3}], [{0, 1}, {2, 3}], n_images=4)
    metric = ClipDelta(k=2, embedder="test-table", embedder_options={"vectors": vectors})
    with pytest.warns(RuntimeWarning, match="not positive"):
        result = metric.score(a, b, context=context)
    assert np.isnan(result.values).all()
    assert "NaN" in metric.describe(result)


def test_dask_backed_inputs_give_the_same_result(registry):
    rng = np.random.default_rng(4)
    vectors = np.abs(rng.normal(size=(40, 6))).tolist()
    a, b, context = table_case(
        [set(rng.choice(40, 4, replace=False)) for _ in range(5)],
        [set(rng.choice(40, 4, replace=False)) for _ in range(5)],
        n_images=40,
    )
    a = a + xr.DataArray(rng.random(a.shape) * 0.1, dims=a.dims)  # distinct values everywhere
    metric = ClipDelta(k=4, embedder="test-table", embedder_options={"vectors": vectors})
    eager = metric.score(a, b, context=context)
    lazy = metric.score(a.chunk(sample=7), b.chunk(sample=13), context=context)
    xr.testing.assert_identical(eager, lazy)


def test_embedder_without_identity_is_recorded_by_name_and_options(registry):
    a, b, context = table_case([{0, 1}, {2, 3}], [{0, 1}, {2, 3}], n_images=4)
    result = ClipDelta(k=2, embedder="test-anonymous", embedder_options={"offset": 2.0}).score(a, b, context=context)
    assert result["embedder"].item() == "test-anonymous {'offset': 2.0}"


# --------------------------------------------------------------------------------- errors


def test_missing_context_or_data_names_what_is_needed(registry):
    a, b, context = table_case([{0, 1}, {2, 3}], [{0, 1}, {2, 3}], n_images=4)
    metric = ClipDelta(k=2, embedder="test-table")
    with pytest.raises(ValueError, match=r"needs the images .*\[data\]"):
        metric.score(a, b)
    with pytest.raises(ValueError, match=r"needs the images"):
        metric.score(a, b, context=Context())


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a, b: (a, b.assign_coords(sample=b["sample"].values + 1)), "different sample ids"),
        (lambda a, b: (a, b.isel(sample=slice(None, None, -1))), "different order"),
        (lambda a, b: (a, b.isel(unit=[0])), "but b has 1;"),
        (lambda a, b: (a.isel(unit=[0]), b.isel(unit=[0])), "at least 2 units"),
        (lambda a, b: (a.isel(sample=[0]), b.isel(sample=[0])), "k = 2 top images per unit but only 1 samples"),
        (lambda a, b: (a.expand_dims(y=2, axis=2), b.expand_dims(y=2, axis=2)), "reduce = 'mean' or 'max'"),
        (lambda a, b: (a.drop_vars("sample"), b), "no 'sample' coord"),
        (lambda a, b: (a.values, b), "must be an xarray.DataArray"),
    ],
)
def test_bad_activations_raise_contract_errors(registry, change, match):
    a, b, context = table_case([{0, 1}, {2, 3}], [{0, 1}, {2, 3}], n_images=4)
    bad_a, bad_b = change(a, b)
    with pytest.raises(ContractError, match=match):
        ClipDelta(k=2, embedder="test-table").score(bad_a, bad_b, context=context)


def test_non_finite_activations_are_named(registry):
    a, b, context = table_case([{0, 1}, {2, 3}], [{0, 1}, {2, 3}], n_images=4)
    b = b.copy(data=np.where(np.arange(8).reshape(4, 2) == 5, np.nan, b.values))
    with pytest.raises(ContractError, match="clip-delta: b: .*non-finite"):
        ClipDelta(k=2, embedder="test-table", embedder_options={"vectors": np.eye(4).tolist()}).score(
            a, b, context=context
        )


def test_unknown_embedder_lists_the_known_ones(registry):
    a, b, context = table_case([{0, 1}, {2, 3}], [{0, 1}, {2, 3}], n_images=4)
    with pytest.raises(UnknownComponentError, match="Did you mean 'open-clip'.*efficientnet-lite0-features"):
        ClipDelta(k=2, embedder="open-clp").score(a, b, context=context)


def test_bad_embedder_option_names_key_and_embedder(registry):
    with pytest.raises(ConfigError, match=r"unknown option 'size'.*embedder 'efficientnet-lite0-features'.*image_size"):
        ClipDelta(embedder_options={"size": 32}).make_embedder()


@pytest.mark.parametrize(
    "options, key",
    [
        ({"k": 1}, "k"),
        ({"k": 2.5}, "k"),
        ({"embedder": ""}, "embedder"),
        ({"embedder_options": "fast"}, "embedder_options"),
        ({"self_pairs": "yes"}, "self_pairs"),
        ({"self_pairs": 1}, "self_pairs"),
    ],
)
def test_bad_options_name_the_key(options, key):
    with pytest.raises(ConfigError, match=key):
        structure_options(ClipDelta, options)


# ---------------------------------------------------------------------------- conformance


def test_conformance_with_the_offline_default_embedder(registry):
    # The default embedder at a small input size keeps the two embedding passes quick.
    check_component(ClipDelta(k=3, embedder_options={"image_size": 32}))


def test_default_embedder_is_the_offline_efficientnet(registry):
    metric = ClipDelta()
    assert metric.k == 10 and metric.self_pairs is False
    assert isinstance(metric.make_embedder(), embedders.EfficientNetFeatures)
    assert metric.make_embedder() is metric.make_embedder()  # created once
    metric.embedder_options = {"image_size": 32}
    assert metric.make_embedder().image_size == 32  # rebuilt when the options change
