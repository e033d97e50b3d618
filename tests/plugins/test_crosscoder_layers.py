"""The crosscoder differ over several layers of every model at once, and its early checks of the input."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import xarray as xr

from mergescope.components import Context
from mergescope.errors import ConfigError, ContractError
from mergescope.options import structure_options
from mergescope_plugins.crosscoder import Crosscoder, CrosscoderPlots

CPU = torch.device("cpu")
FAST = dict(dictionary_size=16, epochs=4, batch_size=32, chunk_size=64)


# One torch thread (tests/plugins/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cpu(workdir) -> Context:
    return Context(quiet=True, workdir=workdir, device=CPU)


def array(values: np.ndarray, layer: str | None = "block4", first: int = 1000) -> xr.DataArray:
    dims = ("sample", "unit", "y", "x")[: values.ndim]
    coords = {"sample": np.arange(first, first + len(values)), "unit": np.arange(values.shape[1])}
    if layer is not None:
        coords["layer"] = layer
    return xr.DataArray(values.astype(np.float32), dims=dims, coords=coords, name="activation")


# Sources of the synthetic models: (model, layer, units).
SOURCES = [("a", "l3", 10), ("a", "l4", 12), ("b", "l3", 10), ("b", "l4", 12)]
# Where each kind of true atom lives, as indices into SOURCES.
KINDS = {
    "shared, every layer": [0, 1, 2, 3],
    "a only, at l3": [0],
    "a only, at l4": [1],
    "b only, at l4": [3],
    "shared, at l4 only": [1, 3],
}


def layered(samples: int, per_kind: int, seed: int = 0) -> tuple[dict[str, dict[str, xr.DataArray]], list, list]:
    """Two models of two layers each, from atoms that live in known models and layers."""
    rng = np.random.default_rng(seed)
    atoms, kinds = [], []
    for where in KINDS.values():
        for _ in range(per_kind):
            blocks = [np.zeros(u) for _, _, u in SOURCES]
            for s in where:
                v = np.abs(rng.normal(size=SOURCES[s][2])) * (rng.random(SOURCES[s][2]) < 0.4)
                v[rng.integers(SOURCES[s][2])] += 1.0
                blocks[s] = v / np.linalg.norm(v)
            atoms.append(blocks)
            kinds.append(where)
    codes = (rng.random((samples, len(atoms))) < 0.08) * rng.uniform(0.5, 1.5, size=(samples, len(atoms)))
    acts: dict[str, dict[str, xr.DataArray]] = {}
    for s, (model, layer, units) in enumerate(SOURCES):
        x = codes @ np.stack([a[s] for a in atoms]) + 0.05 * rng.normal(size=(samples, units))
        acts.setdefault(model, {})[layer] = array(np.maximum(x, 0), layer)
    return acts, atoms, kinds


def test_several_layers_recover_which_models_and_which_layers_hold_a_feature(tmp_path):
    acts, atoms, kinds = layered(samples=2000, per_kind=3)
    result = Crosscoder(epochs=30, dictionary_size=64, learning_rate=4e-3).fit(acts, cpu(tmp_path))
    assert list(result["source"].values) == ["a/l3", "a/l4", "b/l3", "b/l4"]
    # Match learned latents to true atoms by the cosine of their whole decoder vectors.
    scale = result["scale"].values
    target = np.stack([np.concatenate([b * c for b, c in zip(a, scale)]) for a in atoms])
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    decoder = result["decoder"].values.astype(float)
    cosine = (decoder / np.linalg.norm(decoder, axis=1, keepdims=True)) @ target.T
    alive = ~result["dead"].values
    live = np.where(alive[:, None], cosine, -np.inf)
    best = live.argmax(axis=0)
    assert live.max(axis=0).min() >= 0.7  # every atom has a latent
    classes = result["latent_class"].values.astype(str)
    source_norm = result["source_norm"].values
    hits = 0
    for atom, latent in enumerate(best):
        where = kinds[atom]
        models = sorted({SOURCES[s][0] for s in where})
        expected = "shared" if len(models) == 2 else f"exclusive:{models[0]}"
        # The layers it lives in hold its norm; the others (nearly) none.
        holds = source_norm[latent] > 0.2 * source_norm[latent].max()
        hits += classes[latent] == expected and set(np.flatnonzero(holds)) == set(where)
    assert hits >= 0.9 * len(atoms), hits


def test_a_mapping_or_a_list_of_layers_give_one_result(tmp_path):
    acts, _, _ = layered(samples=240, per_kind=1)
    crosscoder = Crosscoder(**FAST)
    mapping = crosscoder.fit(acts, cpu(tmp_path / "mapping"))
    listed = crosscoder.fit({m: list(layers.values()) for m, layers in acts.items()}, cpu(tmp_path / "list"))
    xr.testing.assert_identical(mapping, listed)
    # One layer per model, nested or not, is the single-layer crosscoder.
    single = {m: layers["l4"] for m, layers in acts.items()}
    nested = crosscoder.fit({m: {"l4": a} for m, a in single.items()}, cpu(tmp_path / "nested"))
    xr.testing.assert_identical(nested, crosscoder.fit(single, cpu(tmp_path / "flat")))
    assert "source" not in nested.dims and nested["layer"].item() == "l4"
    # Models may give different layers.
    uneven = crosscoder.fit({"a": acts["a"], "b": {"l4": acts["b"]["l4"]}}, cpu(tmp_path / "uneven"))
    assert list(uneven["source"].values) == ["a/l3", "a/l4", "b/l4"]
    assert np.isnan(uneven["cosine"].values).all()  # a and b have different layers


def test_the_result_over_layers_is_consistent_with_the_fitted_crosscoder(tmp_path):
    acts, _, _ = layered(samples=240, per_kind=1)
    result = Crosscoder(**FAST).fit(acts, cpu(tmp_path))
    assert result["source_norm"].dims == ("latent", "source")
    assert result["scale"].dims == result["units"].dims == result["source_fvu"].dims == ("source",)
    assert list(result["source_model"].values) == ["a", "a", "b", "b"]
    assert list(result["source_layer"].values) == ["l3", "l4", "l3", "l4"]
    assert list(result["units"].values) == [10, 12, 10, 12] and result.sizes["input"] == 44
    assert list(np.unique(result["input_layer"].values)) == ["l3", "l4"]
    assert "layer" not in result.coords
    x = np.concatenate(
        [acts[m][layer].values * s for (m, layer, _), s in zip(SOURCES, result["scale"].values)], axis=1
    ).astype(np.float64)
    blocks = np.cumsum([0, 10, 12, 10, 12])
    for s in range(4):  # normalised per layer: mean squared norm == unit count
        assert (x[:, blocks[s] : blocks[s + 1]] ** 2).sum(1).mean() == pytest.approx(SOURCES[s][2], rel=1e-4)
    enc, dec = result["encoder"].values, result["decoder"].values
    f = np.maximum((x - result["decoder_bias"].values) @ enc + result["encoder_bias"].values, 0)
    x_hat = f @ dec + result["decoder_bias"].values
    for s in range(4):
        sl = slice(blocks[s], blocks[s + 1])
        np.testing.assert_allclose(result["source_norm"][:, s], np.linalg.norm(dec[:, sl], axis=1), rtol=1e-5)
        fvu = ((x[:, sl] - x_hat[:, sl]) ** 2).sum() / ((x[:, sl] - x[:, sl].mean(0)) ** 2).sum()
        assert float(result["source_fvu"][s]) == pytest.approx(fvu, rel=1e-4)
    for m, model in enumerate("ab"):
        sl = slice(blocks[2 * m], blocks[2 * m + 2])
        # A model's norm is over all its layers' blocks; its FVU over all its units.
        np.testing.assert_allclose(
            result["decoder_norm"].sel(model=model), np.linalg.norm(dec[:, sl], axis=1), rtol=1e-5
        )
        fvu = ((x[:, sl] - x_hat[:, sl]) ** 2).sum() / ((x[:, sl] - x[:, sl].mean(0)) ** 2).sum()
        assert float(result["fvu"].sel(model=model)) == pytest.approx(fvu, rel=1e-4)
    both = result["decoder_norm"].values
    np.testing.assert_allclose(result["relative_norm"], both / both.sum(1, keepdims=True), rtol=1e-6)
    cos = (dec[:, :22] * dec[:, 22:]).sum(1) / (both[:, 0] * both[:, 1])
    np.testing.assert_allclose(result["cosine"].sel(pair="a~b"), cos, rtol=1e-4, atol=1e-6)
    assert "16 latents" in Crosscoder().describe(result)


def test_positions_need_one_spatial_size_in_every_layer_and_pooled_takes_any(tmp_path):
    rng = np.random.default_rng(0)
    maps = {
        m: {"l3": array(rng.random((20, 4, 4, 4)), "l3"), "l4": array(rng.random((20, 6, 2, 2)), "l4")} for m in "ab"
    }
    message = (
        "samples = 'positions' makes every spatial position a row, so the maps of every model and layer need "
        "one spatial size, got model 'a' at layer 'l3': 4x4, model 'a' at layer 'l4': 2x2, "
        "model 'b' at layer 'l3': 4x4, model 'b' at layer 'l4': 2x2"
    )
    with pytest.raises(ContractError, match=re.escape(message)):
        Crosscoder(**FAST, samples="positions").fit(maps, cpu(tmp_path))
    pooled = Crosscoder(**FAST).fit(maps, cpu(tmp_path))
    means = {m: {layer: a.mean(("y", "x")) for layer, a in layers.items()} for m, layers in maps.items()}
    xr.testing.assert_identical(pooled, Crosscoder(**FAST).fit(means, cpu(tmp_path)))
    same = {m: {"l3": layers["l3"], "l3b": array(rng.random((20, 3, 4, 4)), "l3b")} for m, layers in maps.items()}
    result = Crosscoder(**FAST, samples="positions").fit(same, cpu(tmp_path))
    np.testing.assert_allclose(result["density"] * 320, np.round(result["density"] * 320), atol=1e-9)


def _bad_inputs() -> list[tuple[str, object, str]]:
    a = array(np.ones((8, 3)))
    cases = [
        ("not a mapping", [a, a], "needs the activations of at least 2 models, got list"),
        ("one model", {"a": a}, "at least 2 models, got 1"),
        ("a string", {"a": a, "b": "acts.nc"}, "activations of model 'b' must be an xarray.DataArray, a mapping"),
        ("empty layers", {"a": a, "b": {}}, "model 'b' gives an empty mapping of layers"),
        ("a layer not an array", {"a": a, "b": {"l4": np.ones((8, 3))}}, "model 'b', layer 'l4', must be an xarray"),
        (
            "unnamed layers",
            {"a": a, "b": [a, array(np.ones((8, 3)), layer=None)]},
            "#1 has no scalar 'layer' coord to name it",
        ),
        ("a layer twice", {"a": a, "b": [a, a]}, "model 'b' gives layer 'block4' more than once"),
        ("names alike", {1: a, "1": a}, "model names must be distinct as strings"),
        ("dims", {"a": a, "b": a.rename(unit="channel")}, "activations of model 'b' at layer 'block4' have dims"),
        ("strings", {"a": a, "b": a.astype(str)}, "activations of model 'b' at layer 'block4' have dtype <U"),
        ("complex", {"a": a, "b": a.astype(complex)}, "have dtype complex128; expected real numbers"),
        (
            "no units",
            {"a": a, "b": a.isel(unit=slice(0, 0))},
            "activations of model 'b' at layer 'block4' have no units",
        ),
        (
            "samples of a layer",
            {"a": a, "b": {"l3": a, "l4": array(np.ones((7, 3)), "l4")}},
            "'a/block4' has 8 samples but 'b/l4' has 7",
        ),
        (
            "ids of a layer",
            {"a": a, "b": {"l3": a, "l4": array(np.ones((8, 3)), "l4", first=0)}},
            "'sample' coords of 'a/block4' and 'b/l4' differ at 8 of 8",
        ),
        (
            "positions of flat layers",
            {"a": array(np.ones((8, 3, 2, 2))), "b": {"l3": array(np.ones((8, 3, 2, 2))), "l4": a}},
            "but ['b/l4'] hold channel summaries",
        ),
    ]
    return cases


@pytest.mark.parametrize(("acts", "message"), [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()])
def test_bad_input_is_refused_before_any_work_naming_what_and_where(tmp_path, acts, message):
    samples = "positions" if "positions" in str(message) or "summaries" in message else "pooled"
    with pytest.raises(ContractError, match=re.escape(message)):
        Crosscoder(**FAST, samples=samples).fit(acts, cpu(tmp_path))


def test_nan_in_one_layer_names_the_model_and_the_layer(tmp_path):
    acts, _, _ = layered(samples=40, per_kind=1)
    values = acts["b"]["l3"].values.copy()
    values[7, 2] = np.inf
    acts["b"]["l3"] = acts["b"]["l3"].copy(data=values)
    with pytest.raises(
        ContractError, match=r"model 'b' at layer 'l3' contain infinite values \(first at sample 1007\)"
    ):
        Crosscoder(**FAST).fit(acts, cpu(tmp_path))


def test_batchtopk_k_above_the_dictionary_is_a_config_error():
    with pytest.raises(ConfigError, match=r"key 'k': k = 40 active latents per row is more than the dictionary_size"):
        structure_options(Crosscoder, {"sparsity": "batchtopk", "k": 40, "dictionary_size": 32})
    Crosscoder(sparsity="l1", k=40, dictionary_size=32)  # k is unused with l1


def test_the_plots_show_where_latents_live_for_several_layers(tmp_path):
    acts, _, _ = layered(samples=240, per_kind=1)
    layers = Crosscoder(**FAST).fit(acts, cpu(tmp_path))
    single = Crosscoder(**FAST).fit({m: a["l4"] for m, a in acts.items()}, cpu(tmp_path))
    tree = xr.DataTree.from_dict({"joint/l3+l4": layers, "one/l4": single})
    names = {f.name for f in CrosscoderPlots(dpi=30).render(tree, tmp_path / "figures")}
    assert {"joint-l3+l4-layers.png", "joint-l3+l4-relative-norm.png", "one-l4-relative-norm.png"} <= names
    assert "one-l4-layers.png" not in names


def test_a_pipeline_step_reads_its_layers_at_once_with_joint_layers(tmp_path):
    """`joint_layers = true`: one crosscoder over relu1 and relu2 of both models, one node."""
    from mergescope.pipeline import Pipeline
    from mergescope.runner import run
    from tests.pipelines import DIGITS_PAIR

    step = """
[[steps]]
use = "crosscoder"
models = ["a", "b"]
layers = ["relu1", "relu2"]
dictionary_size = 16
epochs = 2
joint_layers = true
"""
    text = DIGITS_PAIR.replace("hidden = [16]", "hidden = [16, 8]") + step
    result = run(Pipeline.from_toml(text, source="joint.toml"), tmp_path / "run", quiet=True)
    node = result.results["crosscoder/relu1+relu2"].ds
    assert list(node["source_layer"].values) == ["relu1", "relu2", "relu1", "relu2"]
    assert list(node["source_model"].values) == ["a", "a", "b", "b"]
    assert node.sizes["latent"] == 16
    assert "crosscoder/relu1" not in result.results
