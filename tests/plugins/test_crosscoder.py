"""Tests of the crosscoder differ: recovery of a known dictionary, training mechanics, analysis, plots."""

from __future__ import annotations

import itertools
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import attrs
import dask.array
import numpy as np
import pytest
import torch
import xarray as xr

from mergescope.components import Context, Differ, Visualizer
from mergescope.errors import ConfigError
from mergescope.options import structure_options
from mergescope.testing import check_component
from mergescope_plugins import crosscoder as cc
from mergescope_plugins.crosscoder import Crosscoder, CrosscoderPlots, classify

T = TypeVar("T")


# One torch thread (tests/plugins/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------- ground truth


def atom_kinds(models: int, shared: int, exclusive: int, pairs: int) -> list[tuple[int, ...]]:
    """Which models hold each true atom: all, one, or a pair."""
    kinds = [tuple(range(models))] * shared
    kinds += [(m,) for m in range(models) for _ in range(exclusive)]
    kinds += [pair for pair in itertools.combinations(range(models), 2) for _ in range(pairs)]
    return kinds


def synthesise(
    units: tuple[int, ...],
    kinds: list[tuple[int, ...]],
    samples: int,
    p: float,
    positive: bool,
    seed: int,
    noise: float = 0.05,
) -> tuple[dict[str, xr.DataArray], list[list[np.ndarray]]]:
    """Activations of len(units) models from a known dictionary and sparse non-negative codes.

    ``positive``: atoms are non-negative with sparse support and the activations are
    rectified, like post-ReLU channel summaries; otherwise atoms are Gaussian directions.
    """
    rng = np.random.default_rng(seed)
    names = "abcdefgh"[: len(units)]
    atoms = [[np.zeros(u) for u in units] for _ in kinds]
    for i, models in enumerate(kinds):
        for m in models:
            v = rng.normal(size=units[m])
            if positive:
                v = np.abs(v) * (rng.random(units[m]) < 0.3)
                v[rng.integers(units[m])] += 1.0  # never empty
            atoms[i][m] = v / np.linalg.norm(v)
    codes = (rng.random((samples, len(kinds))) < p) * rng.uniform(0.5, 1.5, size=(samples, len(kinds)))
    activations = {}
    for m, u in enumerate(units):
        x = codes @ np.stack([a[m] for a in atoms]) + noise * rng.normal(size=(samples, u))
        if positive:
            x = np.maximum(x, 0.0)
        activations[names[m]] = activation(x, names[m])
    return activations, atoms


def activation(values: np.ndarray, model: str, layer: str = "block4") -> xr.DataArray:
    n = values.shape[0]
    dims = ("sample", "unit", "y", "x")[: values.ndim]
    coords: dict[str, Any] = {
        "sample": np.arange(1000, 1000 + n),
        "unit": np.arange(values.shape[1]),
        "label": ("sample", np.arange(n) % 3),
        "model": model,
        "layer": layer,
    }
    return xr.DataArray(values.astype(np.float32), dims=dims, coords=coords, name="activation")


def true_class(models: tuple[int, ...], names: list[str]) -> str:
    if len(models) == len(names):
        return "shared"
    if len(models) == 1:
        return f"exclusive:{names[models[0]]}"
    return "shared:" + "+".join(names[m] for m in models)


def class_recovery(
    result: xr.Dataset, kinds: list[tuple[int, ...]], atoms: list[list[np.ndarray]]
) -> tuple[float, float]:
    """Precision and recall of the latent classes against the true atoms.

    Learned latents are matched to true atoms by the cosine of their decoder (over all
    models' units, in the crosscoder's normalised space) with the atom's; a match needs
    cosine >= 0.9. Precision: of the live latents that match an atom, the fraction
    labelled with that atom's class. Recall: of the true atoms, the fraction whose
    best-matching live latent matches and carries its class.
    """
    names = [str(m) for m in result["model"].values]
    scale = result["scale"].values
    truth = np.array([true_class(k, names) for k in kinds])
    target = np.stack([np.concatenate([a[m] * scale[m] for m in range(len(names))]) for a in atoms])
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    decoder = result["decoder"].values.astype(float)
    cosine = (decoder / np.linalg.norm(decoder, axis=1, keepdims=True)) @ target.T  # (latent, atom)
    alive = ~result["dead"].values
    predicted = result["latent_class"].values.astype(str)
    matched = alive & (cosine.max(axis=1) >= 0.9)
    precision = float(np.mean(predicted[matched] == truth[cosine.argmax(axis=1)[matched]]))
    live = np.where(alive[:, None], cosine, -np.inf)
    best = live.argmax(axis=0)
    recall = float(np.mean((live.max(axis=0) >= 0.9) & (predicted[best] == truth)))
    return precision, recall


def test_recovers_shared_exclusive_and_pair_features_at_default_settings(tmp_path):
    # 3 models of different widths; 6 atoms shared by all, 4 exclusive to each, 3 per pair.
    kinds = atom_kinds(3, shared=6, exclusive=4, pairs=3)
    acts, atoms = synthesise((24, 32, 40), kinds, samples=2000, p=0.08, positive=True, seed=0)
    result = Crosscoder().fit(acts, Context(quiet=True, workdir=tmp_path))
    precision, recall = class_recovery(result, kinds, atoms)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    assert not bool(result["diverged"]) and (result["fvu"] < 0.25).all()


def test_batchtopk_recovers_shared_and_exclusive_features(tmp_path):
    kinds = atom_kinds(2, shared=8, exclusive=6, pairs=0)
    acts, atoms = synthesise((24, 32), kinds, samples=2000, p=0.1, positive=False, seed=1)
    # k = the true mean number of active atoms (20 * 0.1).
    crosscoder = Crosscoder(sparsity="batchtopk", k=2, learning_rate=5e-3)
    result = crosscoder.fit(acts, Context(quiet=True, workdir=tmp_path))
    precision, recall = class_recovery(result, kinds, atoms)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    assert np.isfinite(float(result["threshold"])) and float(result["threshold"]) > 0
    assert abs(float(result["l0"]) - 2) < 0.5  # the threshold keeps about k latents per row


# ------------------------------------------------------------ training mechanics


def small(seed: int = 0, samples: int = 240, units: tuple[int, ...] = (6, 8)) -> dict[str, xr.DataArray]:
    kinds = atom_kinds(len(units), shared=3, exclusive=2, pairs=0)
    return synthesise(units, kinds, samples=samples, p=0.2, positive=True, seed=seed)[0]


FAST = dict(dictionary_size=16, epochs=4, batch_size=32, chunk_size=64)


@attrs.define
class Interrupting(Context):
    """A context whose training bar raises KeyboardInterrupt after ``after`` epochs; counts epochs run."""

    after: int | None = None
    epochs_run: int = 0

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        for item in iterable:
            if desc.endswith("training"):
                if self.after is not None and self.epochs_run >= self.after:
                    raise KeyboardInterrupt
                self.epochs_run += 1
            yield item


def test_deterministic_under_a_seed(tmp_path):
    acts = small()
    first = Crosscoder(**FAST).fit(acts, Context(quiet=True, workdir=tmp_path / "1"))
    second = Crosscoder(**FAST).fit(acts, Context(quiet=True, workdir=tmp_path / "2"))
    xr.testing.assert_identical(first, second)
    other = Crosscoder(**FAST, seed=1).fit(acts, Context(quiet=True, workdir=tmp_path / "3"))
    assert not np.array_equal(first["decoder"].values, other["decoder"].values)


@pytest.mark.parametrize("sparsity", ["l1", "batchtopk"])
def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, sparsity):
    acts = small()
    crosscoder = Crosscoder(**FAST, sparsity=sparsity, k=3)
    whole = crosscoder.fit(acts, Context(quiet=True, workdir=tmp_path / "whole"))
    interrupted = Interrupting(quiet=True, workdir=tmp_path / "resumed", after=2)
    with pytest.raises(KeyboardInterrupt):
        crosscoder.fit(acts, interrupted)
    assert interrupted.epochs_run == 2
    resumed_context = Interrupting(quiet=True, workdir=tmp_path / "resumed")
    resumed = crosscoder.fit(acts, resumed_context)
    assert resumed_context.epochs_run == 2  # epochs 3 and 4 only
    xr.testing.assert_identical(resumed, whole)
    # Options of the analysis alone reuse the trained crosscoder.
    again = Interrupting(quiet=True, workdir=tmp_path / "resumed")
    reanalysed = attrs.evolve(crosscoder, exclusive_threshold=0.2, topk=3).fit(acts, again)
    assert again.epochs_run == 0
    np.testing.assert_array_equal(reanalysed["decoder"].values, whole["decoder"].values)
    assert reanalysed.sizes["rank"] == 3


def test_checkpoint_key_follows_the_data(tmp_path):
    context = Interrupting(quiet=True, workdir=tmp_path)
    Crosscoder(**FAST).fit(small(seed=0), context)
    Crosscoder(**FAST).fit(small(seed=1), context)
    assert context.epochs_run == 8  # other activations: trained again, not resumed
    assert len(list((tmp_path / "crosscoder").iterdir())) == 2


def test_divergence_keeps_the_last_good_epoch(tmp_path, monkeypatch):
    acts = small()
    reference = Crosscoder(**FAST).fit(acts, Context(quiet=True, workdir=tmp_path / "ref"))
    steps_per_epoch = int(np.ceil(240 / FAST["batch_size"]))
    schedule = Crosscoder._schedule

    def blow_up_in_epoch_3(self, optimiser, step, total):
        schedule(self, optimiser, step, total)
        if step >= 2 * steps_per_epoch:
            for group in optimiser.param_groups:
                group["lr"] = 1e20

    monkeypatch.setattr(Crosscoder, "_schedule", blow_up_in_epoch_3)
    with pytest.warns(RuntimeWarning, match=r"at epoch 3 .*parameters after epoch 2 are kept"):
        result = Crosscoder(**FAST).fit(acts, Context(quiet=True, workdir=tmp_path / "bad"))
    assert bool(result["diverged"]) and int(result["epochs_trained"]) == 2
    np.testing.assert_array_equal(result["loss_history"].values, reference["loss_history"].values[:2])
    assert np.isfinite(result["decoder"].values).all() and np.isfinite(result["fvu"].values).all()
    assert "diverged" in Crosscoder().describe(result)


def test_divergence_in_the_first_epoch_returns_the_initial_state(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"at epoch 1 .*after epoch 0"):
        result = Crosscoder(**FAST, learning_rate=1e20).fit(small(), Context(quiet=True, workdir=tmp_path))
    assert bool(result["diverged"]) and int(result["epochs_trained"]) == 0
    assert result.sizes["epoch"] == 0 and np.isfinite(result["encoder"].values).all()


# -------------------------------------------------------------------- bad input


def test_nan_input_names_model_and_layer(tmp_path):
    acts = small()
    values = acts["b"].values.copy()
    values[17, 3] = np.nan
    acts["b"] = acts["b"].copy(data=values)
    with pytest.raises(ValueError, match=r"model 'b' at layer 'block4' contain NaN \(first at sample 1017\)"):
        Crosscoder(**FAST).fit(acts, Context(quiet=True, workdir=tmp_path))


def test_mismatching_samples_are_an_error(tmp_path):
    acts = small()
    ids = acts["b"]["sample"].values.copy()
    ids[5:8] += 10_000
    shifted = dict(acts, b=acts["b"].assign_coords(sample=ids))
    with pytest.raises(ValueError, match="'sample' coords of 'a' and 'b' differ at 3 of 240"):
        Crosscoder(**FAST).fit(shifted, Context(quiet=True, workdir=tmp_path))
    with pytest.raises(ValueError, match="'a' has 240 samples but 'b' has 239"):
        Crosscoder(**FAST).fit(dict(acts, b=acts["b"].isel(sample=slice(1, None))), Context(quiet=True))
    with pytest.raises(ValueError, match="at least 2 models"):
        Crosscoder(**FAST).fit({"a": acts["a"]}, Context(quiet=True))
    with pytest.raises(ValueError, match="dims"):
        Crosscoder(**FAST).fit(dict(acts, b=acts["b"].rename(unit="channel")), Context(quiet=True))


def test_dictionary_larger_than_samples_warns(tmp_path):
    with pytest.warns(UserWarning, match="dictionary_size = 64 latents for only 40 rows"):
        Crosscoder(**{**FAST, "dictionary_size": 64}).fit(small(samples=40), Context(quiet=True, workdir=tmp_path))


def test_threshold_must_leave_a_model_above_it(tmp_path):
    acts = small(units=(4, 5, 6))
    with pytest.raises(ValueError, match="above 1/N"):
        Crosscoder(**FAST, exclusive_threshold=0.4).fit(acts, Context(quiet=True, workdir=tmp_path))


def test_options_are_validated():
    for key, value in [("sparsity", "topk"), ("init", "zeros"), ("samples", "all"), ("dictionary_size", 0),
                       ("exclusive_threshold", 0.7), ("learning_rate", 0.0), ("dead_density", 1.5)]:  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            structure_options(Crosscoder, {key: value})


# ------------------------------------------------------------- streaming input


def test_an_epoch_visits_every_row_once_in_batches_that_mix_the_data():
    n = 1000
    index = np.arange(n, dtype=np.float32)[:, None]
    acts = {"a": activation(np.hstack([index, index]), "a"), "b": activation(index * 2, "b")}
    crosscoder = Crosscoder(batch_size=64, chunk_size=256)
    inputs = cc._check_inputs(acts, "pooled")
    batches = list(crosscoder._batches(inputs, epoch=1))
    assert [len(b) for b in batches] == [64] * (n // 64) + [n % 64]
    seen = np.concatenate([b[:, 0] for b in batches])
    np.testing.assert_array_equal(np.sort(seen), index[:, 0])
    np.testing.assert_array_equal(np.concatenate(batches)[:, 2], 2 * seen)  # rows stay whole
    # A chunk gathers blocks from all over the data, not one contiguous stretch.
    assert np.ptp(batches[0][:, 0]) > 256
    assert not np.array_equal(seen, np.concatenate([b[:, 0] for b in crosscoder._batches(inputs, epoch=2)]))


@pytest.mark.parametrize("options", [{"init": "random"}, {"normalise": False}])
def test_other_initialisation_and_no_normalisation(tmp_path, options):
    acts = small()
    result = Crosscoder(**FAST, **options).fit(acts, Context(quiet=True, workdir=tmp_path))
    assert np.isfinite(result["fvu"]).all() and result["loss_history"][-1] < result["loss_history"][0]
    if options.get("normalise") is False:
        np.testing.assert_array_equal(result["scale"], [1.0, 1.0])
    else:
        for m in "ab":  # normalised: mean squared norm == unit count
            x = acts[m].values * float(result["scale"].sel(model=m))
            assert (x**2).sum(1).mean() == pytest.approx(acts[m].sizes["unit"], rel=1e-4)


def test_chunked_dask_input_gives_the_same_as_in_memory(tmp_path):
    acts = small(units=(6, 9))
    crosscoder = Crosscoder(**{**FAST, "chunk_size": 128})
    expected = crosscoder.fit(acts, Context(quiet=True, workdir=tmp_path / "memory"))
    lazy = {}
    for name, a in acts.items():
        path = tmp_path / f"{name}.nc"
        a.to_dataset().to_netcdf(path)
        lazy[name] = xr.open_dataset(path, chunks={"sample": 37})["activation"]
        assert lazy[name].chunks is not None
    result = crosscoder.fit(lazy, Context(quiet=True, workdir=tmp_path / "dask"))
    xr.testing.assert_identical(result, expected)


class _Recording:
    """An array that records the rows every read asks for."""

    def __init__(self, values: np.ndarray, reads: list[int]) -> None:
        self.values, self.reads = values, reads
        self.shape, self.dtype, self.ndim = values.shape, values.dtype, values.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        out = self.values[key]
        self.reads.append(out.shape[0])
        return out


def test_reads_stay_within_a_chunk(tmp_path):
    acts = small(samples=600)
    reads: list[int] = []
    lazy = {
        name: a.copy(data=dask.array.from_array(_Recording(a.values, reads), chunks=(50, -1)))
        for name, a in acts.items()
    }
    Crosscoder(**{**FAST, "epochs": 1}).fit(lazy, Context(quiet=True, workdir=tmp_path))
    assert reads and max(reads) <= FAST["chunk_size"]


def test_positions_mode_takes_every_position_as_a_row(tmp_path):
    rng = np.random.default_rng(3)
    maps = {m: activation(np.maximum(rng.normal(size=(30, u, 3, 2)), 0), m) for m, u in (("a", 5), ("b", 7))}
    result = Crosscoder(**FAST, samples="positions", topk=4).fit(maps, Context(quiet=True, workdir=tmp_path))
    assert result["topk_sample"].dims == ("rank", "latent") and result.sizes["rank"] == 4
    assert set(np.unique(result["topk_sample"].values)) <= set(maps["a"]["sample"].values)
    # Density is over positions: a multiple of 1 / (30 samples * 6 positions).
    counts = result["density"].values * 180
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)
    pooled = Crosscoder(**FAST).fit(maps, Context(quiet=True, workdir=tmp_path))
    # Recorded, so that the latent dashboards read the rows the way they were trained.
    assert (str(result.coords["samples"].values), str(pooled.coords["samples"].values)) == ("positions", "pooled")
    means = {m: a.mean(("y", "x")).astype(np.float32) for m, a in maps.items()}
    xr.testing.assert_identical(pooled, Crosscoder(**FAST).fit(means, Context(quiet=True, workdir=tmp_path)))
    with pytest.raises(ValueError, match="needs spatial maps"):
        Crosscoder(**FAST, samples="positions").fit(means, Context(quiet=True, workdir=tmp_path))


# --------------------------------------------------------------------- analysis


def test_result_is_labelled_and_consistent_with_the_fitted_crosscoder(tmp_path):
    acts = small(units=(6, 6, 9))
    result = Crosscoder(**FAST, topk=5).fit(acts, Context(quiet=True, workdir=tmp_path))
    assert isinstance(Crosscoder(), Differ)
    assert list(result["model"].values) == ["a", "b", "c"]
    assert list(result["pair"].values) == ["a~b", "a~c", "b~c"]
    assert result["decoder_norm"].dims == result["relative_norm"].dims == ("latent", "model")
    assert result["cosine"].dims == ("latent", "pair") and result["topk_sample"].dims == ("rank", "latent")
    assert result["layer"].item() == "block4" and result.sizes["input"] == 21
    np.testing.assert_allclose(result["relative_norm"].sum("model"), 1.0, rtol=1e-6)
    # Cosines only between models of one width.
    assert np.isfinite(result["cosine"].sel(pair="a~b")).all()
    assert np.isnan(result["cosine"].sel(pair=["a~c", "b~c"])).all()

    # Recompute everything from the returned parameters.
    x = np.concatenate([acts[m].values * s for m, s in zip("abc", result["scale"].values)], axis=1).astype(np.float64)
    enc, dec = result["encoder"].values, result["decoder"].values
    f = np.maximum((x - result["decoder_bias"].values) @ enc + result["encoder_bias"].values, 0)
    x_hat = f @ dec + result["decoder_bias"].values
    blocks = np.cumsum([0, 6, 6, 9])
    for i, m in enumerate("abc"):
        sl = slice(blocks[i], blocks[i + 1])
        fvu = ((x[:, sl] - x_hat[:, sl]) ** 2).sum() / ((x[:, sl] - x[:, sl].mean(0)) ** 2).sum()
        assert float(result["fvu"].sel(model=m)) == pytest.approx(fvu, rel=1e-4)
        norms = np.linalg.norm(dec[:, sl], axis=1)
        np.testing.assert_allclose(result["decoder_norm"].sel(model=m), norms, rtol=1e-5)
    np.testing.assert_allclose(result["density"], (f > 0).mean(0), atol=1e-9)
    assert float(result["l0"]) == pytest.approx((f > 0).sum(1).mean())
    np.testing.assert_array_equal(result["dead"], (f > 0).sum(0) == 0)
    ids = acts["a"]["sample"].values
    for latent in range(16):
        order = np.argsort(-f[:, latent], kind="stable")[:5]
        np.testing.assert_allclose(result["topk_value"][:, latent], f[order, latent], rtol=1e-5, atol=1e-6)
        top = result["topk_sample"].values[:, latent]
        hit = f[order, latent] > 0
        assert set(top[hit]) == set(ids[order][hit]) or np.allclose(np.diff(f[order, latent]), 0)
    known = {"dead", "shared", "exclusive:a", "exclusive:b", "exclusive:c", "shared:a+b", "shared:a+c", "shared:b+c"}
    assert set(result["latent_class"].values) <= known
    text = Crosscoder().describe(result)
    assert text.startswith("16 latents: ") and "FVU a " in text and "L0 " in text


def test_classify_labels_by_relative_norm():
    r = np.array([[0.5, 0.5], [0.97, 0.03], [0.02, 0.98]])
    assert list(classify(r, ["base", "tuned"], 0.05)) == ["shared", "exclusive:base", "exclusive:tuned"]
    r3 = np.array([[0.3, 0.3, 0.4], [0.49, 0.49, 0.02], [0.01, 0.96, 0.03], [0.0, 0.5, 0.5], [np.nan] * 3])
    assert list(classify(r3, ["a", "b", "c"], 0.05)) == ["shared", "shared:a+b", "exclusive:b", "shared:b+c", "none"]
    assert list(classify(r3[:1], ["a", "b", "c"], 0.31)) == ["exclusive:c"]


def test_visualizer_draws_every_crosscoder_result(tmp_path):
    three = Crosscoder(**FAST).fit(small(units=(6, 6, 9)), Context(quiet=True, workdir=tmp_path))
    two = Crosscoder(**FAST).fit(small(units=(6, 6)), Context(quiet=True, workdir=tmp_path))
    tree = xr.DataTree.from_dict({"diff3/block4": three, "diff2/block4": two, "tau": xr.Dataset({"x": 1})})
    files = CrosscoderPlots(dpi=40).render(tree, tmp_path / "figures")
    names = {f.name for f in files}
    assert {"diff3-block4-ternary.png", "diff3-block4-relative-norm.png", "diff2-block4-relative-norm.png"} <= names
    assert {"diff3-block4-classes.png", "diff2-block4-cosine.png"} <= names
    assert "diff2-block4-ternary.png" not in names
    for f in files:
        assert f.suffix == ".png" and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(CrosscoderPlots(), Visualizer)
    assert CrosscoderPlots().render(xr.DataTree.from_dict({"tau": xr.Dataset({"x": 1})}), tmp_path / "none") == []


def test_result_survives_netcdf(tmp_path):
    from mergescope.storage import load_tree, save_tree

    result = Crosscoder(**FAST).fit(small(), Context(quiet=True, workdir=tmp_path))
    back = load_tree(save_tree(xr.DataTree.from_dict({"step/block4": result}), tmp_path / "r.nc"))
    xr.testing.assert_identical(back["step/block4"].to_dataset(), result)


# ------------------------------------------------------------------ conformance


@pytest.mark.parametrize("component", [Crosscoder, CrosscoderPlots])
def test_conformance_kit(component, tmp_path, monkeypatch):
    # Checkpoints of a context without workdir go to the temp directory: keep them here.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 256 latents for the kit's 64 samples
        check_component(component)


def test_registers_the_components():
    differs: list[type] = []
    visualizers: list[type] = []
    cc.register_differs(differs.append)
    cc.register_visualizers(visualizers.append)
    assert differs == [Crosscoder] and visualizers == [CrosscoderPlots]
    assert Crosscoder.name == "crosscoder" and CrosscoderPlots.name == "crosscoder-plots"


def test_runs_in_a_pipeline_with_its_plots(tmp_path, fresh_registry):
    from mergescope import ModelSpec, Pipeline, Step, get_registry, run
    from mergescope.pipeline import ActivationSpec

    if "crosscoder" not in get_registry().names("differ"):  # installed through its entry point
        fresh_registry.register_plugin(cc)
    reg = fresh_registry.get_registry()

    def net(seed: int, width: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10)
        )

    pipeline = Pipeline(
        data=reg.get("dataset", "digits")(split="test", per_class=10),
        activations=ActivationSpec(layers=["2"]),
        models=[ModelSpec("x", module=net(0, 12)), ModelSpec("y", module=net(1, 16))],
        steps=[Step(Crosscoder(**FAST), models=["x", "y"]), Step(CrosscoderPlots(dpi=40))],
    )
    result = run(pipeline, tmp_path / "run", quiet=True)
    ds = result.results["crosscoder/2"].ds
    assert ds["decoder_norm"].dims == ("latent", "model") and list(ds["model"].values) == ["x", "y"]
    assert "crosscoder" in result.summary and "latents:" in result.summary
    files = [str(f) for f in result.results["crosscoder-plots"].ds["files"].values]
    assert any(f.endswith("crosscoder-2-relative-norm.png") for f in files)
    assert list((tmp_path / "run").glob("**/crosscoder/*/checkpoint.pt"))  # checkpoints in the run directory
