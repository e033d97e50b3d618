from __future__ import annotations

import json
import logging
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
import xarray as xr

import mergescope.runner as runner_module
from mergescope import ConfigError, Pipeline, run

from pipelines import SMALL

MERGED = SMALL + """
[[steps]]
use = "kendall-tau"
name = "tau-merged"
models = ["a", "interpolation"]
layers = ["relu2"]
"""


@pytest.fixture
def count_collections(monkeypatch):
    calls = []
    real = runner_module.collect_store

    def counting(models, data, spec, directory, **kw):
        calls.append({m: tuple(spec.layers[m]) for m in models})
        return real(models, data, spec, directory, **kw)

    monkeypatch.setattr(runner_module, "collect_store", counting)
    return calls


def test_run_writes_labelled_results(tmp_path, count_collections):
    out = tmp_path / "run"
    result = run(Pipeline.from_toml(MERGED), out, quiet=True)
    tree = xr.open_datatree(out / "results.nc")
    assert set(tree.children) == {"interpolation", "kendall-tau", "tau-merged"}
    interp = tree["interpolation"].ds
    assert list(interp["alpha"].values) == [0.0, 0.5, 1.0]
    assert interp["accuracy"].dims == ("alpha",) and float(interp["accuracy"][0]) > 0.5
    tau = tree["kendall-tau/relu1"].ds["kendall_tau"]
    assert tau.dims == ("model", "unit") and list(tau["model"].values) == ["b"]
    assert str(tau["reference"].values) == "a" and tau.sizes["unit"] == 32
    assert np.nanmax(np.abs(tau.values)) <= 1
    # the merged model of a merger step is usable by name in later steps
    merged = tree["tau-merged/relu2"].ds["kendall_tau"]
    assert list(merged["model"].values) == ["interpolation"]
    # one forward pass per model, every layer it needs at once
    # one lockstep pass: every model that exists when activations are first needed, each with all its layers
    assert count_collections == [{"a": ("relu1", "relu2"), "b": ("relu1", "relu2"), "interpolation": ("relu2",)}]
    assert "kendall-tau" in result.summary and (out / "summary.txt").read_text() == result.summary
    info = json.loads((out / "run.json").read_text())
    assert set(info["seconds"]) >= {"models", "interpolation", "kendall-tau", "tau-merged"}
    assert Pipeline.from_toml((out / "pipeline.toml").read_text()) == Pipeline.from_toml(MERGED)


def test_rerun_skips_finished_steps_and_force_redoes_them(tmp_path, caplog, count_collections):
    out = tmp_path / "run"
    first = run(Pipeline.from_toml(SMALL), out, quiet=True)
    count_collections.clear()
    with caplog.at_level(logging.INFO, logger="mergescope"):
        second = run(Pipeline.from_toml(SMALL), out, quiet=True)
    assert count_collections == []  # nothing recorded again
    assert sum("done before" in r.getMessage() for r in caplog.records) == 2
    assert first.results.identical(second.results)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mergescope"):
        run(Pipeline.from_toml(SMALL), out, quiet=True, force=True)
    assert not any("done before" in r.getMessage() for r in caplog.records)
    assert len(count_collections) == 1


def test_changing_a_step_option_reruns_only_that_step(tmp_path, caplog):
    out = tmp_path / "run"
    run(Pipeline.from_toml(SMALL), out, quiet=True)
    changed = SMALL.replace("alphas = [0.0, 0.5, 1.0]", "alphas = [0.0, 0.25, 1.0]")
    with caplog.at_level(logging.INFO, logger="mergescope"):
        result = run(Pipeline.from_toml(changed), out, quiet=True)
    messages = [r.getMessage() for r in caplog.records]
    assert any("step interpolation (interpolation): running" in m for m in messages)
    assert any("step kendall-tau (kendall-tau): done before" in m for m in messages)
    assert 0.25 in result.results["interpolation"].ds["alpha"].values


def test_editing_a_plugin_module_or_the_core_reruns_steps(tmp_path, caplog, monkeypatch):
    from mergescope_plugins import interpolation

    out = tmp_path / "run"
    run(Pipeline.from_toml(SMALL), out, quiet=True)
    real = runner_module.source_digest
    assert real(interpolation.Interpolation) == runner_module.file_digest(Path(interpolation.__file__))
    edited = lambda cls: "edited" if cls is interpolation.Interpolation else real(cls)  # noqa: E731
    monkeypatch.setattr(runner_module, "source_digest", edited)
    with caplog.at_level(logging.INFO, logger="mergescope"):
        run(Pipeline.from_toml(SMALL), out, quiet=True)
    messages = [r.getMessage() for r in caplog.records]
    assert any("step interpolation (interpolation): running" in m for m in messages)
    assert any("step kendall-tau (kendall-tau): done before" in m for m in messages)

    # a change to mergescope itself reruns every step
    caplog.clear()
    monkeypatch.setattr(runner_module, "core_digest", lambda: "updated")
    with caplog.at_level(logging.INFO, logger="mergescope"):
        run(Pipeline.from_toml(SMALL), out, quiet=True)
    assert not any("done before" in r.getMessage() for r in caplog.records)


def test_batch_size_is_part_of_merger_keys(tmp_path, caplog):
    out = tmp_path / "run"
    run(Pipeline.from_toml(SMALL), out, quiet=True)
    with caplog.at_level(logging.INFO, logger="mergescope"):
        run(Pipeline.from_toml(SMALL.replace("batch_size = 100", "batch_size = 50")), out, quiet=True)
    messages = [r.getMessage() for r in caplog.records]
    # BatchNorm recomputation and statistics run in batches; a Kendall-tau does not depend on them
    assert any("step interpolation (interpolation): running" in m for m in messages)
    assert any("step kendall-tau (kendall-tau): done before" in m for m in messages)


def test_any_module_from_python(tmp_path):
    import torch

    from mergescope import ModelSpec, Step, get_registry
    from mergescope.pipeline import ActivationSpec

    reg = get_registry()

    def net(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))

    pipeline = Pipeline(
        data=reg.get("dataset", "mnist5000")(split="test", per_class=10),
        activations=ActivationSpec(layers=["2"]),
        models=[ModelSpec("x", module=net(0)), ModelSpec("y", module=net(1))],
        steps=[Step(reg.get("metric", "kendall-tau")(), models=["x", "y"], allow_unaligned=True)],
    )
    result = run(pipeline, tmp_path / "run", quiet=True)
    assert result.results["kendall-tau/2"].ds["kendall_tau"].sizes["unit"] == 16
    with pytest.raises(Exception, match="cannot hold"):
        pipeline.to_toml()


TASKS = SMALL + """
[[tasks]]
name = "low"
use = "mnist5000"
split = "test"
per_class = 10
expert = "a"

[[tasks]]
name = "all"
use = "mnist5000"
split = "test"
per_class = 10
restrict = false
"""


def test_tasks_evaluate_every_model_on_every_task(tmp_path):
    from mergescope import Context
    from mergescope.components import evaluate

    pipeline = Pipeline.from_toml(TASKS)
    assert Pipeline.from_toml(pipeline.to_toml()) == pipeline
    result = run(pipeline, tmp_path / "run", quiet=True)
    tasks = result.results["tasks"].ds
    assert list(tasks["model"].values) == ["a", "b", "interpolation"]
    assert list(tasks["task"].values) == ["low", "all"]
    data = pipeline.tasks[1].data.load()
    direct = Context(data=data).evaluate(result.models["b"])
    assert float(tasks["accuracy"].sel(model="b", task="all")) == pytest.approx(direct.accuracy)
    assert float(tasks["normalized_accuracy"].sel(model="a", task="low")) == pytest.approx(1.0)
    assert "tasks (accuracy %)" in result.summary and "norm. avg" in result.summary
    # restricting to classes that are all present changes nothing; to fewer classes it can only help
    restricted = evaluate(result.models["b"], data, restrict_to=range(10))
    assert restricted.accuracy == pytest.approx(direct.accuracy)


def test_task_tables_say_which_alignment_each_merge_used(tmp_path):
    composed = TASKS + """
[[steps]]
use = "weight-matching"
name = "wm"
models = ["a", "b"]

[[steps]]
use = "interpolation"
name = "permuted"
models = ["a", "b@wm"]
alphas = []

[[steps]]
use = "average"
name = "soup"
models = ["permuted", "a"]
"""
    pipeline = Pipeline.from_toml(composed)
    assert pipeline.composition("a") == ("", "")
    assert pipeline.composition("b@wm") == ("", "wm")
    assert pipeline.composition("interpolation") == ("interpolation", "")
    assert pipeline.composition("permuted") == ("interpolation", "wm")
    assert pipeline.composition("soup") == ("average", "wm")  # through the merge it takes
    result = run(pipeline, tmp_path / "run", quiet=True)
    tasks = result.results["tasks"].ds
    made = dict(zip(tasks["model"].values, zip(tasks["method"].values, tasks["alignment"].values)))
    assert made["permuted"] == ("interpolation", "wm") and made["interpolation"] == ("interpolation", "")
    table = result.summary.split("tasks (accuracy %):")[1]
    head, *rows = [line.split() for line in table.strip().splitlines()]
    assert head[:3] == ["model", "method", "alignment"]
    assert next(r for r in rows if r[0] == "permuted")[:3] == ["permuted", "interpolation", "wm"]
    assert next(r for r in rows if r[0] == "a")[:3] == ["a", "-", "-"]


def test_task_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"\[\[tasks\]\] #1 \(name = 'low'\), key 'expert'.*unknown model 'z'"):
        Pipeline.from_toml(TASKS.replace('expert = "a"', 'expert = "z"'))


def test_context_reaches_metrics_and_visualizers_that_ask_for_it(tmp_path, fresh_registry):
    """A step method with a ``context`` keyword gets the step's models, layers, stores and images."""
    from typing import ClassVar

    import attrs
    import torch

    from mergescope import ModelSpec, Step, get_registry, hookimpl
    from mergescope.pipeline import ActivationSpec

    seen = {}

    @attrs.define
    class TopImages:
        name: ClassVar[str] = "test-top-images"

        def render(self, results, out_dir, context=None):
            seen["models"], seen["layers"] = list(context.models), list(context.layers)
            top = context.topk("x", context.layers[0])
            seen["ids"] = np.asarray(top.sample_ids)
            seen["images"] = context.images(np.asarray(top.sample_ids)[:, 0])
            seen["activation"] = context.activation("y", context.layers[0])
            return []

    @attrs.define
    class NeedsImages:
        name: ClassVar[str] = "test-needs-images"

        def score(self, a, b, context=None):
            seen["metric_images"] = context.images(a["sample"].values[:3])
            return (a - b).mean("sample")

    class Plugin:
        @hookimpl
        def register_metrics(register):
            register(NeedsImages)

        @hookimpl
        def register_visualizers(register):
            register(TopImages)

    fresh_registry.register_plugin(Plugin, name="context-test")
    reg = get_registry()

    def net(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))

    data = reg.get("dataset", "mnist5000")(split="test", per_class=10)
    pipeline = Pipeline(
        data=data,
        activations=ActivationSpec(layers=["2"], topk=4),
        models=[ModelSpec("x", module=net(0)), ModelSpec("y", module=net(1))],
        steps=[Step(NeedsImages(), models=["x", "y"], allow_unaligned=True), Step(TopImages(), models=["x", "y"])],
    )
    run(pipeline, tmp_path / "run", quiet=True)
    assert seen["models"] == ["x", "y"] and seen["layers"] == ["2"]
    assert seen["ids"].shape == (4, 16)  # (k, unit)
    loaded = data.load()
    first = int(np.flatnonzero(loaded.sample_ids == seen["ids"][0, 0])[0])
    assert torch.equal(seen["images"][0], loaded[first][0])
    assert seen["activation"].sizes["unit"] == 16
    assert seen["metric_images"].shape == (3, 1, 28, 28)


def test_context_images_names_an_unknown_id():
    from mergescope.testing import example_activations, example_context

    a, _ = example_activations()
    context = example_context(a)
    assert context.images(a["sample"].values[[2, 0]]).shape == (2, 3, 16, 16)
    with pytest.raises(KeyError, match="sample id 1 "):
        context.images([0, 1])
    with pytest.raises(ValueError, match="outside a pipeline"):
        context.topk("a", "layer")


ALIGNED = SMALL.replace("allow_unaligned = true\n", 'allow_unaligned = true\nname = "tau-raw"\n') + """
[[steps]]
use = "activation-matching"
name = "wm"
models = ["a", "b"]

[[steps]]
use = "kendall-tau"
name = "tau-aligned"
models = ["a", "b@wm"]
"""


def test_aligned_models_are_permuted_copies_that_metrics_compare(tmp_path):
    result = run(Pipeline.from_toml(ALIGNED), tmp_path / "run", quiet=True)
    raw = result.results["tau-raw/relu1"].ds["kendall_tau"].sel(model="b")
    aligned = result.results["tau-aligned/relu1"].ds["kendall_tau"].sel(model="b@wm")
    # Matching units by their activations makes unit j of b track unit j of a.
    assert float(aligned.mean()) > float(raw.mean()) + 0.2
    a, b = result.models["b"], result.models["b@wm"]
    x = torch.rand(5, 1, 28, 28)
    assert torch.allclose(a(x), b(x), atol=1e-5)  # a permutation keeps the function


def test_metrics_refuse_unaligned_declared_models():
    text = SMALL.replace("allow_unaligned = true\n", "")
    with pytest.raises(ConfigError, match=r"not aligned.*'b@<aligner step>'.*allow_unaligned"):
        Pipeline.from_toml(text)
    bad = ALIGNED.replace('"b@wm"', '"b@nothing"')
    with pytest.raises(ConfigError, match="'nothing' is not an earlier aligner step"):
        Pipeline.from_toml(bad)


def test_metrics_over_several_models_give_mean_and_std_per_unit(tmp_path):
    text = ALIGNED.replace('models = ["a", "b@wm"]', 'models = ["a", "b@wm", "interpolation"]')
    result = run(Pipeline.from_toml(text), tmp_path / "run", quiet=True)
    ds = result.results["tau-aligned/relu2"].ds
    assert ds["kendall_tau"].sizes["model"] == 2
    assert np.allclose(ds["kendall_tau_mean"], ds["kendall_tau"].mean("model"), equal_nan=True)
    assert np.allclose(ds["kendall_tau_std"], ds["kendall_tau"].std("model"), equal_nan=True)


def test_alignment_results_round_trip_through_the_tree():
    from mergescope import Alignment

    t = xr.DataArray(np.eye(2), dims=("unit", "unit_ref"))
    extra = xr.Dataset({"topk_sample": (("rank", "unit"), np.array([[1, 2]]))})
    beside = xr.Dataset({"r2": ("unit_ref", [0.5, 0.7])})
    alignment = Alignment("a", {"b": {"fc1": t}}, xr.Dataset({"score": 1.0}), {"fc1": extra, "b/fc1": beside})
    again = Alignment.from_tree(alignment.to_tree())
    assert again.reference == "a" and list(again.transforms) == ["b"]
    assert again.transforms["b"]["fc1"].rename(None).identical(t)
    assert again.results["fc1"].identical(extra) and again.results["b/fc1"].identical(beside)
    assert again.diagnostics.identical(alignment.diagnostics)


STEP_DATA = SMALL.replace(
    'alphas = [0.0, 0.5, 1.0]\n',
    'alphas = [0.0, 0.5, 1.0]\n\n[steps.data]\nuse = "mnist5000"\nsplit = "test"\nper_class = 5\n',
)


def test_a_merger_step_evaluates_on_its_own_data(tmp_path):
    pipeline = Pipeline.from_toml(STEP_DATA)
    assert pipeline.steps[0].data is not None and pipeline.steps[0].data.per_class == 5
    assert Pipeline.from_toml(pipeline.to_toml()) == pipeline  # the table round-trips
    own = run(pipeline, tmp_path / "own", quiet=True)
    shared = run(Pipeline.from_toml(SMALL), tmp_path / "shared", quiet=True)
    a_own = own.results["interpolation"].ds["accuracy"].sel(alpha=0.0)
    a_shared = shared.results["interpolation"].ds["accuracy"].sel(alpha=0.0)
    # Model a on 50 images, not on [data]'s 200: a multiple of 1/50 that the 200-image figure is not.
    assert float(a_own) * 50 == pytest.approx(round(float(a_own) * 50))
    assert float(a_own) != float(a_shared)
    # The metric still reads the recordings made on [data].
    assert own.results["kendall-tau/relu1"].ds.sizes["unit"] == 32
    np.testing.assert_array_equal(
        own.results["kendall-tau/relu1"].ds["kendall_tau"], shared.results["kendall-tau/relu1"].ds["kendall_tau"]
    )


def test_only_aligners_and_mergers_take_their_own_data():
    text = SMALL + '\n[steps.data]\nuse = "mnist5000"\nsplit = "test"\n'  # under the kendall-tau step
    with pytest.raises(ConfigError, match=r"key 'data'.*only aligner and merger steps take their own 'data'"):
        Pipeline.from_toml(text)
    # the same refusal for a pipeline built in Python
    pipeline = Pipeline.from_toml(SMALL)
    metric = attrs.evolve(pipeline.steps[1], data=pipeline.data)
    with pytest.raises(ConfigError, match=r"key 'data'.*only aligner and merger steps take their own 'data'"):
        attrs.evolve(pipeline, steps=[pipeline.steps[0], metric]).check()
    bad = STEP_DATA.replace('use = "mnist5000"\nsplit = "test"\nper_class = 5', 'use = "mnist"\nsplit = "test"')
    with pytest.raises(ConfigError, match=r"\[data\].*'mnist'.*mnist5000"):
        Pipeline.from_toml(bad)
