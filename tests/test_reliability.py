"""Faults and bad inputs: killed runs resume to identical results, a failing plugin is
named, random pipeline text only ever raises ConfigError, untrusted pickles are refused.

The kills are deterministic: a child process runs ``mergescope run`` with one internal
function wrapped to SIGKILL the process at a chosen point (after the n-th checkpointed
chunk, after a step result lands, or between writing a file and renaming it into place).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import attrs
import pytest
import tomli_w
import torch
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergescope import MergescopeError, ModelSpec, Pipeline, Step, get_registry, hookimpl, run
from mergescope.checkpoints import load_state_dict
from mergescope.errors import CheckpointError
from mergescope.pipeline import ActivationSpec, load_pipeline

from pipelines import SMALL

# 200 images in chunks of 20: ten checkpointed chunks per collection; short training.
KILLABLE = SMALL.replace("batch_size = 100", "batch_size = 20\nchunk_size = 20").replace("epochs = 6", "epochs = 2")

CHILD = r"""
import os, signal, sys
import xarray as xr
import mergescope.runner as runner
import mergescope.store as store
from mergescope.cli import main

mode, arg, pipeline, out = sys.argv[1:5]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "chunk":  # after the arg-th chunk and its checkpoint are written
    real_flush, flushes = store._flush, []
    def flush(*a, **k):
        done = real_flush(*a, **k)
        flushes.append(done)
        if len(flushes) == int(arg):
            die()
        return done
    store._flush = flush
elif mode == "result":  # right after the arg-th step result.nc is renamed into place
    real_save, saved = runner.save_tree, []
    def save(tree, path):
        written = real_save(tree, path)
        if path.name == "result.nc":
            saved.append(path)
            if len(saved) == int(arg):
                die()
        return written
    runner.save_tree = save
elif mode == "crosscoder":  # after the arg-th crosscoder checkpoint is written
    import mergescope_plugins.crosscoder as crosscoder
    real_checkpoint, checkpoints = crosscoder._save_checkpoint, []
    def checkpoint(*a, **k):
        real_checkpoint(*a, **k)
        checkpoints.append(1)
        if len(checkpoints) == int(arg):
            die()
    crosscoder._save_checkpoint = checkpoint
elif mode == "partial":  # a file fully written under its temporary name, not yet renamed
    real_to_netcdf = xr.DataTree.to_netcdf
    def to_netcdf(self, path, *a, **k):
        real_to_netcdf(self, path, *a, **k)
        if os.path.basename(str(path)).startswith("." + arg + "."):
            die()
    xr.DataTree.to_netcdf = to_netcdf
sys.exit(main(["-q", "run", pipeline, "--out", out]))
"""


def _killed_run(
    tmp_path: Path, mode: str, arg: object, out: Path, text: str = KILLABLE
) -> subprocess.CompletedProcess:
    toml = tmp_path / "pipeline.toml"
    toml.write_text(text, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(arg), str(toml), str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc


def _every_nc_opens(out: Path) -> list[Path]:
    """Every file under a final ``*.nc`` name is complete (temporary files end in .partial)."""
    files = sorted(out.rglob("*.nc"))
    for path in files:
        with xr.open_datatree(path, engine="netcdf4") as tree:
            tree.load()
    return files


@pytest.fixture(scope="module")
def clean_results(tmp_path_factory) -> xr.DataTree:
    """The same pipeline run once without interruption."""
    tmp = tmp_path_factory.mktemp("clean")
    toml = tmp / "pipeline.toml"
    toml.write_text(KILLABLE, encoding="utf-8")
    run(load_pipeline(toml), tmp / "run", quiet=True)
    with xr.open_datatree(tmp / "run" / "results.nc") as tree:
        return tree.load()


def _resume_and_compare(tmp_path: Path, out: Path, clean: xr.DataTree) -> None:
    toml = tmp_path / "pipeline.toml"
    run(load_pipeline(toml), out, quiet=True)
    _every_nc_opens(out)
    with xr.open_datatree(out / "results.nc") as tree:
        resumed = tree.load()
    # results.nc holds no timings (those are in run.json), so the trees must match exactly.
    assert resumed.identical(clean)
    assert not list(out.rglob(".work"))  # every collection finished and cleaned up


def test_a_run_killed_during_collection_resumes_to_identical_results(tmp_path, clean_results):
    chunk = random.Random(20240601).randint(1, 9)  # one of the ten chunks, never the last
    out = tmp_path / "run"
    _killed_run(tmp_path, "chunk", chunk, out)
    works = list((out / "activations").glob("*/.work"))
    assert len(works) == 1 and (works[0] / "checkpoint.nc").is_file()
    assert not list((out / "activations").glob("*/COMPLETE"))
    assert not (out / "results.nc").exists()
    _every_nc_opens(out)
    _resume_and_compare(tmp_path, out, clean_results)


# A crosscoder over the two models, checkpointed after each of its 8 epochs.
CROSSCODER = SMALL.replace("epochs = 6", "epochs = 2") + """
[[steps]]
use = "crosscoder"
models = ["a", "b"]
layers = ["relu2"]
dictionary_size = 16
epochs = 8
batch_size = 50
"""


def test_a_run_killed_during_crosscoder_training_resumes_to_identical_results(tmp_path):
    clean = tmp_path / "clean"
    (tmp_path / "clean.toml").write_text(CROSSCODER, encoding="utf-8")
    run(load_pipeline(tmp_path / "clean.toml"), clean, quiet=True)
    epoch = random.Random(20240602).randint(1, 7)  # one of the eight epochs, never the last
    out = tmp_path / "run"
    _killed_run(tmp_path, "crosscoder", epoch, out, CROSSCODER)
    assert list(out.rglob("checkpoint.pt")) and not (out / "results.nc").exists()
    _every_nc_opens(out)
    run(load_pipeline(tmp_path / "pipeline.toml"), out, quiet=True)
    with xr.open_datatree(out / "results.nc") as resumed, xr.open_datatree(clean / "results.nc") as whole:
        assert resumed.load().identical(whole.load())


def test_a_run_killed_while_writing_results_twice_resumes_from_the_cache(tmp_path, clean_results, caplog):
    out = tmp_path / "run"
    # 1. killed right after the first step's result.nc is in place
    _killed_run(tmp_path, "result", 1, out)
    done = list((out / "steps").glob("*/result.nc"))
    assert [p.parent.name.rsplit("-", 1)[0] for p in done] == ["interpolation"]
    assert not (out / "results.nc").exists()
    _every_nc_opens(out)
    stamp = done[0].stat().st_mtime_ns
    # 2. the re-run is killed with results.nc written under its temporary name, not yet renamed
    _killed_run(tmp_path, "partial", "results.nc", out)
    assert not (out / "results.nc").exists()
    assert list(out.glob(".results.nc.*.partial"))  # a complete-looking file that never got its final name
    assert len(list((out / "steps").glob("*/result.nc"))) == 2
    assert done[0].stat().st_mtime_ns == stamp  # the first step was loaded, not redone
    _every_nc_opens(out)
    # 3. the third run only gathers the cached steps
    with caplog.at_level(logging.INFO, logger="mergescope"):
        _resume_and_compare(tmp_path, out, clean_results)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("done before" in m for m in messages) == 2 and not any(": running" in m for m in messages)


# -- a plugin that raises inside a step ---------------------------------------------------


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))


def test_a_plugin_error_names_the_step_component_and_plugin_and_keeps_earlier_steps(tmp_path, fresh_registry, caplog):
    @attrs.define
    class Explodes:
        name: ClassVar[str] = "test-explodes"

        def score(self, a, b, context=None):
            raise RuntimeError("boom in score")

    class Plugin:
        @hookimpl
        def register_metrics(register):
            register(Explodes)

    fresh_registry.register_plugin(Plugin, name="exploding-plugin")
    reg = get_registry()
    models = [ModelSpec("x", module=_net(0)), ModelSpec("y", module=_net(1))]
    good = Step(reg.get("metric", "kendall-tau")(), models=["x", "y"], allow_unaligned=True)

    def pipeline(*steps):
        return Pipeline(
            data=reg.get("dataset", "mnist5000")(split="test", per_class=5),
            activations=ActivationSpec(layers=["2"]),
            models=models,
            steps=list(steps),
        )

    out = tmp_path / "run"
    with pytest.raises(MergescopeError) as info:
        run(pipeline(good, Step(Explodes(), models=["x", "y"], allow_unaligned=True)), out, quiet=True)
    message = str(info.value)
    assert "[[steps]] #2 (use = 'test-explodes')" in message
    assert "step 'test-explodes' failed in metric 'test-explodes'" in message
    assert "plugin 'exploding-plugin'" in message and f"module {__name__}" in message
    assert "RuntimeError: boom in score" in message
    assert isinstance(info.value.__cause__, RuntimeError)

    cached = list((out / "steps").glob("kendall-tau-*/result.nc"))
    assert len(cached) == 1 and not list((out / "steps").glob("test-explodes-*"))
    stamp = cached[0].stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="mergescope"):
        run(pipeline(good), out, quiet=True)
    assert any("step kendall-tau (kendall-tau): done before" in r.getMessage() for r in caplog.records)
    assert cached[0].stat().st_mtime_ns == stamp


# -- the TOML loader on random input ------------------------------------------------------

KNOWN_KEYS = [
    "use", "name", "models", "layers", "seed", "split", "per_class", "hidden", "alphas", "checkpoint",
    "train", "train_data", "epochs", "allow_unaligned", "alignment", "batch_size", "chunk_size", "topk",
    "reduce", "workers", "expert", "restrict", "lr",
]
USES = ["mnist5000", "mlp", "interpolation", "kendall-tau", "weight-matching", "average", "nope"]

keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(min_size=1, max_size=8))
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(USES + ["a", "b", "relu1", "*", "mean", ""]),
    st.text(max_size=10),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=10,
)


def table(required: dict) -> st.SearchStrategy:
    """A table with some plausible keys (``use`` and ``name`` mostly right) and random extras."""
    return st.fixed_dictionaries({}, optional=required).flatmap(
        lambda base: st.dictionaries(keys, values, max_size=3).map(lambda extra: {**extra, **base})
    )


data_tables = table({"use": st.sampled_from(USES), "split": st.sampled_from(["test", "train", 3]), "per_class": values})
model_tables = table({"name": st.sampled_from(["a", "b", "a", 1]), "use": st.sampled_from(USES), "hidden": values})
step_tables = table({"use": st.sampled_from(USES), "models": st.lists(st.sampled_from(["a", "b", "c"]), max_size=3)})
documents = st.fixed_dictionaries(
    {},
    optional={
        "seed": values,
        "data": st.one_of(data_tables, values),
        "activations": st.one_of(table({"layers": values, "batch_size": values}), values),
        "models": st.one_of(st.lists(model_tables, max_size=3), values),
        "steps": st.one_of(st.lists(step_tables, max_size=3), values),
        "tasks": st.lists(table({"name": values, "use": st.sampled_from(USES)}), max_size=2),
        "extra": values,
    },
)


def _load_or_config_error(text: str) -> None:
    try:
        pipeline = Pipeline.from_toml(text, source="fuzz.toml")
    except MergescopeError as exc:  # ConfigError, or DuplicateComponentError / UnknownComponentError
        assert str(exc)
    else:
        assert isinstance(pipeline, Pipeline)


FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.text(max_size=200))
def test_random_text_loads_or_raises_config_error(text):
    _load_or_config_error(text)


@FUZZ
@given(documents)
def test_random_toml_documents_load_or_raise_config_error(document):
    _load_or_config_error(tomli_w.dumps(document))


@FUZZ
@given(st.sampled_from(["seed = 0", "[data]", "[[models]]", "[[steps]]", "[activations]"]), keys, values)
def test_one_random_key_in_a_valid_pipeline_loads_or_raises_config_error(anchor, key, value):
    line = tomli_w.dumps({key: value})
    text = line + SMALL if anchor == "seed = 0" else SMALL.replace(anchor, anchor + "\n" + line, 1)
    _load_or_config_error(text)  # a repeated key is invalid TOML: a ConfigError too


# -- an untrusted checkpoint ---------------------------------------------------------------


class Payload:
    marker: ClassVar[str] = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_a_payload_is_refused_and_never_runs(tmp_path):
    """See also tests/test_checkpoints.py::test_arbitrary_pickle_is_refused (the message)."""
    marker = tmp_path / "pwned"
    Payload.marker = str(marker)
    path = tmp_path / "evil.pt"
    torch.save({"fc1.weight": torch.zeros(2), "run": Payload()}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_state_dict(path)
    assert not marker.exists()
    path.write_bytes(path.read_bytes())  # a bare payload, no state dict around it
    torch.save(Payload(), path)
    with pytest.raises(CheckpointError):
        load_state_dict(path)
    assert not marker.exists()
