"""The crosscoder-sweep visualizer: its table, its chosen value, its errors and a small sweep in a pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from mergescope.components import Visualizer
from mergescope.errors import ConfigError
from mergescope.testing import check_component
from mergescope_plugins import crosscoder_sweep as sweep_module
from mergescope_plugins.crosscoder import possible_classes
from mergescope_plugins.crosscoder_sweep import CrosscoderSweep


def result(
    value: float,
    seed: int,
    fvu: tuple[float, ...],
    classes: list[str],
    l0: float = 2.0,
    parameter: str = "l1",
    models: tuple[str, ...] = ("a", "b"),
) -> xr.Dataset:
    """A crosscoder result reduced to what the sweep reads, with hand-set numbers."""
    n = len(classes)
    relative = np.full((n, len(models)), 1 / len(models))
    sparsity = "l1" if parameter == "l1" else "batchtopk"
    return xr.Dataset(
        {
            "relative_norm": (("latent", "model"), relative),
            "latent_class": ("latent", np.array(classes)),
            "dead": ("latent", np.array([c == "dead" for c in classes])),
            "fvu": ("model", np.array(fvu, dtype=float)),
            "l0": ((), l0),
        },
        coords={"model": list(models), "sparsity": sparsity, "seed": seed, parameter: value},
    )


def tree(runs: dict[str, xr.Dataset], layer: str = "block4", **others: xr.Dataset) -> xr.DataTree:
    nodes = {f"{step}/{layer}": ds for step, ds in runs.items()}
    return xr.DataTree.from_dict({**nodes, **others})


SHARED = ["shared", "shared", "shared", "dead"]
MIXED = ["shared", "exclusive:a", "exclusive:b", "dead"]


def test_table_holds_every_run_of_the_sweep():
    runs = {
        "cc-1": result(0.1, 0, (0.1, 0.2), SHARED, l0=5.0),
        "cc-2": result(0.1, 1, (0.1, 0.1), SHARED, l0=6.0),
        "cc-3": result(1.0, 0, (0.3, 0.4), MIXED, l0=2.0),
        "cc-4": result(1.0, 1, (0.2, 0.2), ["exclusive:a", "exclusive:a", "shared", "shared"], l0=3.0),
    }
    ds = CrosscoderSweep().sweep(tree(runs, tau=xr.Dataset({"x": 1})))
    assert list(ds["value"].values) == [0.1, 1.0] and list(ds["seed"].values) == [0, 1]
    assert list(ds["class"].values) == ["shared", "exclusive:a", "exclusive:b", "dead"]
    np.testing.assert_allclose(ds["mean_fvu"], [[0.15, 0.1], [0.35, 0.2]])
    np.testing.assert_allclose(ds["value_fvu"], [0.125, 0.275])
    np.testing.assert_allclose(ds["fvu"].sel(value=1.0, seed=0), [0.3, 0.4])
    np.testing.assert_allclose(ds["l0"], [[5, 6], [2, 3]])
    np.testing.assert_allclose(ds["dead_fraction"], [[0.25, 0.25], [0.25, 0.0]])
    np.testing.assert_array_equal(ds["class_count"].sel(value=1.0, seed=0), [1, 1, 1, 1])
    np.testing.assert_array_equal(ds["class_count"].sel(value=1.0, seed=1), [2, 2, 0, 0])
    np.testing.assert_array_equal(ds["class_count"].sel(value=0.1, seed=1), [3, 0, 0, 1])
    assert ds["step"].sel(value=1.0, seed=1).item() == "cc-4"
    assert str(ds["parameter"].values) == "l1" and str(ds["layer"].values) == "block4"
    assert float(ds["chosen"]) == 0.1  # 1.0 has mean FVU 0.275 > 0.25


def test_a_missing_run_is_nan_and_left_out_of_the_means():
    runs = {
        "cc-1": result(0.5, 0, (0.1, 0.1), SHARED),
        "cc-2": result(0.5, 1, (0.3, 0.3), SHARED),
        "cc-3": result(2.0, 0, (0.2, 0.2), MIXED),
    }
    ds = CrosscoderSweep().sweep(tree(runs))
    assert np.isnan(ds["mean_fvu"].sel(value=2.0, seed=1)) and ds["step"].sel(value=2.0, seed=1).item() == ""
    assert np.isnan(ds["class_count"].sel(value=2.0, seed=1)).all()
    np.testing.assert_allclose(ds["value_fvu"], [0.2, 0.2])
    assert float(ds["chosen"]) == 2.0


# Mean FVU over models and seeds of every l1: 0.05, 0.15, 0.24, 0.26, 0.4.
CURVE = {0.01: (0.05, 0.05), 0.03: (0.1, 0.2), 0.1: (0.2, 0.28), 0.3: (0.2, 0.32), 1.0: (0.4, 0.4)}


def curve(parameter: str = "l1", points: dict = CURVE) -> xr.DataTree:
    runs = {}
    for i, (value, (first, second)) in enumerate(points.items()):
        for seed, fvu in enumerate((first, second)):
            runs[f"cc-{i}-{seed}"] = result(value, seed, (fvu, fvu), MIXED, parameter=parameter)
    return tree(runs)


def test_rule_chooses_the_sparsest_value_within_the_fvu_bound():
    assert float(CrosscoderSweep().sweep(curve())["chosen"]) == 0.1
    assert float(CrosscoderSweep(max_fvu=0.3).sweep(curve())["chosen"]) == 0.3
    assert float(CrosscoderSweep(max_fvu=0.1).sweep(curve())["chosen"]) == 0.01
    assert np.isnan(float(CrosscoderSweep(max_fvu=0.01).sweep(curve())["chosen"]))
    # BatchTopK: fewer active latents are sparser, and the FVU falls as k grows.
    ks = {4: (0.5, 0.5), 8: (0.3, 0.24), 16: (0.1, 0.2), 32: (0.05, 0.05)}
    ds = CrosscoderSweep(parameter="k").sweep(curve("k", ks))
    assert list(ds["value"].values) == [4, 8, 16, 32] and ds["value"].dtype.kind == "i"
    assert float(ds["chosen"]) == 16


def test_render_writes_the_table_and_the_figure_and_describes_the_choice(tmp_path):
    files = CrosscoderSweep(dpi=30).render(curve(), tmp_path / "figures")
    assert [f.name for f in files] == ["sweep.nc", "sweep.png"]
    assert files[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with xr.open_dataset(files[0]) as back:
        ds = back.load()
    assert float(ds["chosen"]) == 0.1 and ds["class_count"].dims == ("value", "seed", "class")
    text = CrosscoderSweep().describe(ds)
    assert text == (
        "l1 over 5 values x 2 seeds at layer 'block4': chosen l1 = 0.1 (sparsest with mean FVU <= 0.25): "
        "FVU 0.240, L0 2.0, dead 25%; 1 shared, 1 exclusive:a, 1 exclusive:b"
    )
    none = CrosscoderSweep(max_fvu=0.01).sweep(curve())
    assert "no value has mean FVU <= 0.01 (lowest 0.050 at l1 = 0.01)" in CrosscoderSweep().describe(none)
    # With a run without penalty the axis is linear near 0.
    zero = tree({"cc-0": result(0.0, 0, (0.1, 0.1), SHARED), "cc-1": result(1.0, 0, (0.2, 0.2), MIXED)})
    assert len(CrosscoderSweep(dpi=30).render(zero, tmp_path / "zero")) == 2


def test_nothing_to_sweep_draws_nothing(tmp_path):
    empty = xr.DataTree.from_dict({"tau/block4": xr.Dataset({"x": 1})})
    assert CrosscoderSweep().render(empty, tmp_path / "f") == []
    assert CrosscoderSweep().describe(xr.Dataset({"files": ("file", [])})) == "no crosscoder results to sweep"


def test_named_steps_are_the_only_ones_read():
    runs = {"a1": result(0.1, 0, (0.1, 0.1), SHARED), "a2": result(1.0, 0, (0.2, 0.2), MIXED)}
    other = {"b1": result(0.1, 0, (0.9, 0.9), SHARED, models=("x", "y"))}
    ds = CrosscoderSweep(steps=["a1", "a2"]).sweep(tree({**runs, **other}))
    assert list(ds["step"].values.ravel()) == ["a1", "a2"]


@pytest.mark.parametrize(
    ("sweep", "runs", "extra", "message"),
    [
        (dict(steps=["cc-1", "cc-22"]), {}, {}, "no earlier step 'cc-22' in the results. Did you mean 'cc-2'?"),
        (dict(steps=["tau"]), {}, {"tau/block4": xr.Dataset({"x": 1})}, "step 'tau' holds no crosscoder result"),
        (dict(parameter="k"), {}, {}, "step 'cc-1' was trained with sparsity = 'l1', which has no 'k'"),
        (dict(), {"cc-3": result(0.1, 0, (0.1, 0.1), SHARED)}, {}, "steps 'cc-1' and 'cc-3' both trained l1 = 0.1"),
        (dict(), {"cc-3": result(2.0, 0, (0.1, 0.1), SHARED, models=("a", "c"))}, {}, "step 'cc-3' read the models"),
    ],
)
def test_errors_name_the_step(sweep, runs, extra, message):
    base = {"cc-1": result(0.1, 0, (0.1, 0.1), SHARED), "cc-2": result(1.0, 0, (0.2, 0.2), MIXED)}
    with pytest.raises(ConfigError, match="key '") as caught:
        CrosscoderSweep(**sweep).sweep(tree({**base, **runs}, **extra))
    assert message in str(caught.value)


def test_a_result_without_its_training_options_is_an_error():
    old = result(0.1, 0, (0.1, 0.1), SHARED).drop_vars(["l1", "seed", "sparsity"])
    with pytest.raises(ConfigError, match="step 'cc-1' does not record the options.*--force"):
        CrosscoderSweep().sweep(tree({"cc-1": old}))


def test_the_layer_must_be_one_the_steps_share():
    both = xr.DataTree.from_dict(
        {
            f"{step}/{layer}": result(value, 0, (0.1, 0.1), SHARED)
            for step, value in (("cc-1", 0.1), ("cc-2", 1.0))
            for layer in ("l3", "l4")
        }
    )
    with pytest.raises(ConfigError, match="share the layers 'l3', 'l4'; name the one"):
        CrosscoderSweep().sweep(both)
    assert str(CrosscoderSweep(layer="l4").sweep(both)["layer"].values) == "l4"
    with pytest.raises(ConfigError, match="step 'cc-1' has no crosscoder result at layer 'l5'"):
        CrosscoderSweep(layer="l5").sweep(both)
    apart = xr.DataTree.from_dict(
        {"cc-1/l3": result(0.1, 0, (0.1, 0.1), SHARED), "cc-2/l4": result(1.0, 0, (0.1, 0.1), SHARED)}
    )
    with pytest.raises(ConfigError, match="share no layer"):
        CrosscoderSweep().sweep(apart)


def test_options_are_validated():
    with pytest.raises(ValueError):
        CrosscoderSweep(parameter="alpha")
    with pytest.raises(ValueError):
        CrosscoderSweep(rule="best")
    with pytest.raises(ValueError):
        CrosscoderSweep(max_fvu=0)
    with pytest.raises(ValueError):
        CrosscoderSweep(steps=["a", "a"])


def test_conformance_and_registration():
    check_component(CrosscoderSweep)
    assert isinstance(CrosscoderSweep(), Visualizer)
    registered: list[type] = []
    sweep_module.register_visualizers(registered.append)
    assert registered == [CrosscoderSweep] and CrosscoderSweep.name == "crosscoder-sweep"


def test_sweeps_a_small_pipeline(tmp_path, fresh_registry):
    from mergescope import ModelSpec, Pipeline, Step, get_registry, run
    from mergescope.pipeline import ActivationSpec
    from mergescope_plugins.crosscoder import Crosscoder

    assert "crosscoder-sweep" in get_registry().names("visualizer")  # installed through its entry point
    reg = fresh_registry.get_registry()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def net(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))

    fast = dict(dictionary_size=8, epochs=2, batch_size=32, chunk_size=64)
    crosscoders = [
        Step(Crosscoder(**fast, l1=l1, seed=seed), models=["x", "y"]) for l1 in (0.5, 2.0) for seed in (0, 1)
    ]
    pipeline = Pipeline(
        data=reg.get("dataset", "digits")(split="test", per_class=5),
        activations=ActivationSpec(layers=["2"]),
        models=[ModelSpec("x", module=net(0)), ModelSpec("y", module=net(1))],
        steps=[*crosscoders, Step(CrosscoderSweep(max_fvu=100.0, dpi=30))],
    )
    try:
        out = run(pipeline, tmp_path / "run", quiet=True)
    finally:
        torch.set_num_threads(threads)
    ds = out.results["crosscoder-sweep"].ds
    assert list(ds["value"].values) == [0.5, 2.0] and list(ds["seed"].values) == [0, 1]
    assert sorted(ds["step"].values.ravel()) == ["crosscoder-1", "crosscoder-2", "crosscoder-3", "crosscoder-4"]
    assert np.isfinite(ds["mean_fvu"]).all() and float(ds["chosen"]) == 2.0
    assert "chosen l1 = 2" in out.summary
    files = [str(f) for f in ds["files"].values]
    assert any(f.endswith("sweep.png") for f in files)


def test_every_class_the_models_allow_is_counted_even_when_no_run_has_it():
    models = ("a", "b", "c")
    assert possible_classes(models) == [
        "shared", "shared:a+b", "shared:a+c", "shared:b+c", "exclusive:a", "exclusive:b", "exclusive:c", "dead",
    ]  # fmt: skip
    runs = {"cc": result(1.0, 0, (0.1, 0.1, 0.1), ["shared", "shared", "exclusive:b"], models=models)}
    ds = CrosscoderSweep().sweep(tree(runs))
    assert list(ds["class"].values) == possible_classes(models)
    counts = ds["class_count"].sel(value=1.0, seed=0)
    assert int(counts.sel({"class": "shared"})) == 2 and int(counts.sel({"class": "exclusive:b"})) == 1
    assert int(counts.sel({"class": "shared:a+c"})) == 0 and int(counts.sum()) == 3
