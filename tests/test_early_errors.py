"""Mistakes visible in the pipeline are refused before any model is recorded or any step runs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mergescope import ConfigError, ModelSpec, Pipeline, Step, run
from mergescope.cli import main

from pipelines import DIGITS_PAIR, SMALL

DIGITS = DIGITS_PAIR


def test_a_crosscoder_on_positions_over_channel_summaries_is_refused_at_check_time():
    text = DIGITS + '\n[[steps]]\nuse = "crosscoder"\nmodels = ["a", "b"]\nsamples = "positions"\n'
    with pytest.raises(ConfigError) as info:
        Pipeline.from_toml(text).check()
    message = str(info.value)
    assert "[[steps]] #1 (use = 'crosscoder'), key 'samples'" in message
    assert "reduce = 'mean'" in message and "reduce = 'none'" in message


def test_a_crosscoder_on_positions_over_full_maps_passes_the_check():
    text = DIGITS.replace('layers = ["relu1"]', 'layers = ["relu1"]\nreduce = "none"')
    Pipeline.from_toml(text + '\n[[steps]]\nuse = "crosscoder"\nmodels = ["a", "b"]\nsamples = "positions"\n').check()


def test_an_unknown_layer_is_named_in_its_own_table_before_any_step(tmp_path):
    text = SMALL.replace('layers = ["relu1", "relu2"]', 'layers = ["relu1", "relu9"]')
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        run(Pipeline.from_toml(text), out, quiet=True)
    message = str(info.value)
    assert "[activations], key 'layers'" in message and "relu9" in message
    assert "[[steps]]" not in message
    assert not (out / "steps").exists() and not (out / "activations").exists()


def test_an_unknown_layer_of_a_step_names_the_step(tmp_path):
    text = SMALL + '\n[[steps]]\nuse = "correlation"\nmodels = ["a", "b"]\nallow_unaligned = true\nlayers = ["relu7"]\n'
    with pytest.raises(ConfigError, match=r"\[\[steps\]\] #3 \(use = 'correlation'\), key 'layers'.*relu7"):
        run(Pipeline.from_toml(text), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "steps").exists()


class _ReusedReLU(nn.Module):
    """One ReLU module called twice in each forward pass, as in torchvision's BasicBlock."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 12)
        self.fc2 = nn.Linear(12, 12)
        self.relu = nn.ReLU()
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.flatten(x)))
        x = self.relu(self.fc2(x))
        return self.head(x)


def test_a_module_called_twice_is_refused_with_its_call_sites(tmp_path, fresh_registry):
    registry = fresh_registry.get_registry()
    data = registry.get("dataset", "digits")(split="test")
    pipeline = Pipeline(
        data=data,
        models=[ModelSpec("a", module=_ReusedReLU(0)), ModelSpec("b", module=_ReusedReLU(1))],
        steps=[],
    )
    pipeline.activations.layers = ["relu"]
    pipeline.steps.append(Step(registry.get("metric", "correlation")(), models=["a", "b"], allow_unaligned=True))
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        run(pipeline, out, quiet=True, registry=registry)
    message = str(info.value)
    assert "layer 'relu' of model 'a' is one module called 2 times" in message
    assert message.count("test_early_errors.py:") == 2  # both call sites, file and line
    assert "x = self.relu(self.fc1(self.flatten(x)))" in message and "x = self.relu(self.fc2(x))" in message
    assert not (out / "activations").exists()


def test_keys_that_do_not_apply_to_the_step_kind_are_refused():
    merger = SMALL.replace("alphas = [0.0, 0.5, 1.0]", "alphas = [0.0, 0.5, 1.0]\nallow_unaligned = true")
    with pytest.raises(ConfigError, match=r"#1 \(use = 'interpolation'\), key 'allow_unaligned'.*only applies"):
        Pipeline.from_toml(merger).check()
    metric = SMALL + '\n[[steps]]\nuse = "weight-matching"\nname = "wm"\nmodels = ["a", "b"]\n'
    metric += '\n[[steps]]\nuse = "correlation"\nmodels = ["a", "b@wm"]\nalignment = "wm"\n'
    with pytest.raises(ConfigError, match=r"#4 \(use = 'correlation'\), key 'alignment'.*'<model>@<aligner step>'"):
        Pipeline.from_toml(metric).check()


def test_a_pipeline_with_nothing_to_do_is_refused(tmp_path, capsys):
    text = DIGITS  # models and data, no steps
    with pytest.raises(ConfigError, match="nothing to do: it has no \\[\\[steps\\]\\] and no \\[\\[tasks\\]\\]"):
        run(Pipeline.from_toml(text), tmp_path / "run", quiet=True)
    path = tmp_path / "p.toml"
    path.write_text(text, encoding="utf-8")
    assert main(["-q", "run", str(path), "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert "nothing to do" in err and "Traceback" not in err


def test_data_of_other_classes_leaves_the_models_own_accuracy_out(tmp_path, fresh_registry):
    # [data] may hold images the models were not trained to classify (photos to record,
    # say): the run finishes and the report's models table has no accuracy for them.
    registry = fresh_registry.get_registry()
    data = registry.get("dataset", "digits")(split="test")  # labels 0..9

    def five_classes(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5))

    pipeline = Pipeline(
        data=data, models=[ModelSpec("a", module=five_classes(0)), ModelSpec("b", module=five_classes(1))]
    )
    pipeline.activations.layers = ["2"]
    pipeline.steps.append(Step(registry.get("metric", "correlation")(), models=["a", "b"], allow_unaligned=True))
    run(pipeline, tmp_path / "run", quiet=True, registry=registry)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["models"]["a"]["accuracy"] is None and info["models"]["b"]["loss"] is None
