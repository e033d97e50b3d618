"""mergescope.devices: device specs, their resolution on this machine, and autocast."""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest
import torch

from mergescope.devices import DEVICE_SPECS, PRECISIONS, autocast, available_devices, resolve_device
from mergescope.errors import ConfigError


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_constants():
    assert PRECISIONS == ("fp32", "bf16", "fp16")
    assert DEVICE_SPECS == ("auto", "cpu", "cuda", "cuda:N", "mps")


def test_cpu_always_resolves():
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_without_gpu_is_cpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert available_devices() == ["cpu"]


def test_auto_prefers_cuda(two_gpus):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert available_devices() == ["cpu", "cuda:0", "cuda:1"]


def test_auto_then_mps(monkeypatch, no_gpu):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


def test_missing_cuda_lists_available(no_gpu):
    with pytest.raises(ConfigError, match=r"device 'cuda' is not available here; available: cpu$"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="device 'mps' is not available here; available: cpu"):
        resolve_device("mps")


def test_missing_cuda_index_lists_available(two_gpus):
    with pytest.raises(ConfigError, match=r"device 'cuda:2' is not available here; available: cpu, cuda:0, cuda:1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("spec", ["gpu", "CUDA", "cuda:", "cuda:x", "tpu", "", 0, None])
def test_bad_specs(spec):
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda, cuda:N, mps"):
        resolve_device(spec)


def test_fp32_changes_nothing():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")
        assert layer(x).dtype == torch.float32


def test_bf16_on_cpu_autocasts():
    layer = torch.nn.Linear(4, 3)
    with autocast("cpu", "bf16"):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    assert layer(torch.randn(2, 4)).dtype == torch.float32  # left as it was


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="precision 'fp16' is not supported on the CPU; use 'bf16'"):
        autocast(torch.device("cpu"), "fp16")


def test_unknown_precision():
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, fp16, got 'fp8'"):
        autocast("cpu", "fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda():
    layer = torch.nn.Linear(4, 3).cuda()
    with autocast(resolve_device("cuda"), "fp16"):
        assert layer(torch.randn(2, 4, device="cuda")).dtype == torch.float16


# -- the pipeline keys, the run arguments and the CLI flags ---------------------------------------

DIGITS_STEP = """
[[steps]]
use = "kendall-tau"
models = ["a", "b"]
allow_unaligned = true
"""


def _pipeline(text: str = ""):
    from mergescope import Pipeline

    from pipelines import DIGITS_PAIR

    return Pipeline.from_toml(text + DIGITS_PAIR + DIGITS_STEP, source="p.toml")


def test_pipeline_defaults_are_not_written():
    pipeline = _pipeline()
    assert (pipeline.device, pipeline.precision) == ("auto", "fp32")
    text = pipeline.to_toml()
    assert "device" not in text and "precision" not in text


def test_pipeline_round_trip():
    from mergescope import Pipeline

    pipeline = _pipeline('device = "cuda:1"\nprecision = "bf16"\n')
    assert (pipeline.device, pipeline.precision) == ("cuda:1", "bf16")
    again = Pipeline.from_toml(pipeline.to_toml())
    assert again == pipeline
    assert (again.device, again.precision) == ("cuda:1", "bf16")


def test_pipeline_keys_are_checked():
    with pytest.raises(ConfigError, match=r"p.toml, key 'device': device must be one of .*got 'gpu'"):
        _pipeline('device = "gpu"\n')
    with pytest.raises(ConfigError, match=r"p.toml, key 'precision': precision must be one of .*got 'fp64'"):
        _pipeline('precision = "fp64"\n')


def test_run_refuses_a_missing_device_before_running(tmp_path, no_gpu):
    from mergescope import run

    with pytest.raises(ConfigError, match="p.toml, key 'device': device 'cuda' is not available here; available: cpu"):
        run(_pipeline('device = "cuda"\n'), tmp_path / "run", quiet=True)
    with pytest.raises(ConfigError, match="^device 'cuda:0' is not available here; available: cpu$"):
        run(_pipeline(), tmp_path / "run", quiet=True, device="cuda:0")
    with pytest.raises(ConfigError, match="precision 'fp16' is not supported on the CPU"):
        run(_pipeline(), tmp_path / "run", quiet=True, precision="fp16")
    assert not (tmp_path / "run" / "results.nc").exists()


def test_collect_refuses_a_missing_device(tmp_path, no_gpu):
    from mergescope.runner import collect_activations

    with pytest.raises(ConfigError, match="device 'mps' is not available here; available: cpu"):
        collect_activations(_pipeline(), tmp_path / "store", quiet=True, device="mps")


def test_cli_flags(tmp_path, no_gpu, capsys):
    from mergescope.cli import main

    path = tmp_path / "p.toml"
    path.write_text(_pipeline().to_toml(), encoding="utf-8")
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--device", "cuda"]) != 0
    assert "device 'cuda' is not available here; available: cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", str(path), "--out", str(tmp_path / "run"), "--precision", "fp64"])
    assert main(["collect", str(path), "--out", str(tmp_path / "store"), "--device", "tpu"]) != 0
    assert "device must be one of auto, cpu, cuda, cuda:N, mps, got 'tpu'" in capsys.readouterr().err


def test_cpu_bf16_run_is_close_to_fp32(tmp_path):
    """A bf16 run (autocast on the CPU) records and evaluates; its results stay near fp32's, under other keys."""
    import json

    from mergescope import run

    pipeline = _pipeline()
    full = run(pipeline, tmp_path / "run", quiet=True, device="cpu")
    half = run(pipeline, tmp_path / "run", quiet=True, device="cpu", precision="bf16")
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["device"], info["precision"]) == ("cpu", "bf16")
    assert not info["steps"]["kendall-tau"]["cached"]  # not the fp32 result
    for layer in ("relu1",):
        a = full.results[f"kendall-tau/{layer}"]["kendall_tau"].values
        b = half.results[f"kendall-tau/{layer}"]["kendall_tau"].values
        assert abs(a - b).max() < 0.05


def test_context_defaults():
    from mergescope.context import Context

    context = Context()
    assert context.device == torch.device("cpu")
    assert context.precision == "fp32"


# -- running out of device memory ----------------------------------------------------------


def _tiny_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))


def test_out_of_memory_in_a_step_is_a_clear_error_and_keeps_earlier_steps(tmp_path, fresh_registry):
    from mergescope import ActivationSpec, MergescopeError, ModelSpec, Pipeline, Step, get_registry, hookimpl, run

    assert issubclass(torch.cuda.OutOfMemoryError, torch.OutOfMemoryError)

    @attrs.define
    class Hungry:
        name: ClassVar[str] = "test-hungry"
        batch_size: int = 64

        def score(self, a, b, context=None):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    class Plugin:
        @hookimpl
        def register_metrics(register):
            register(Hungry)

    fresh_registry.register_plugin(Plugin, name="hungry-plugin")
    reg = get_registry()
    models = [ModelSpec("x", module=_tiny_net(0)), ModelSpec("y", module=_tiny_net(1))]
    good = Step(reg.get("metric", "kendall-tau")(), models=["x", "y"], allow_unaligned=True)
    pipeline = Pipeline(
        data=reg.get("dataset", "mnist5000")(split="test", per_class=5),
        activations=ActivationSpec(layers=["2"], batch_size=32),
        models=models,
        steps=[good, Step(Hungry(), models=["x", "y"], allow_unaligned=True)],
    )
    out = tmp_path / "run"
    with pytest.raises(MergescopeError) as info:
        run(pipeline, out, quiet=True, device="cpu")
    message = str(info.value)
    assert "[[steps]] #2 (use = 'test-hungry')" in message
    assert "step 'test-hungry' (metric 'test-hungry') ran out of memory on cpu" in message
    assert "[activations] batch_size = 32, the step's batch_size = 64" in message
    assert "lower [activations] batch_size, or the step's batch_size, or use precision = 'bf16'" in message
    assert "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB" in message
    assert "failed in metric" not in message  # not reported as a bug of the component
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    cached = list((out / "steps").glob("kendall-tau-*/result.nc"))
    assert len(cached) == 1 and not list((out / "steps").glob("test-hungry-*"))


def test_out_of_memory_while_recording_is_a_clear_error(tmp_path, monkeypatch):
    from mergescope import MergescopeError, run
    from mergescope import runner as runner_module

    def hungry(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(runner_module, "collect_store", hungry)
    with pytest.raises(MergescopeError) as info:
        run(_pipeline(), tmp_path / "run", quiet=True, device="cpu")
    message = str(info.value)
    assert "[[steps]] #1 (use = 'kendall-tau')" in message
    assert "recording activations of a, b ran out of memory on cpu ([activations] batch_size = " in message
    assert "lower [activations] batch_size, or the step's batch_size, or use precision = 'bf16'" in message


# -- a step's own device -------------------------------------------------------------------


def test_step_device_round_trips_and_is_written_only_when_set():
    from mergescope import Pipeline, Step, get_registry

    pipeline = _pipeline()
    assert pipeline.steps[0].device is None and "device" not in pipeline.to_toml()
    own = Pipeline.from_toml(DIGITS_PAIR_WITH_STEP_DEVICE("cuda:1"), source="p.toml")
    assert own.steps[0].device == "cuda:1"
    assert 'device = "cuda:1"' in own.to_toml()
    assert Pipeline.from_toml(own.to_toml()) == own
    with pytest.raises(ConfigError, match=r"\[\[steps\]\] #1 \(use = 'kendall-tau'\), key 'device': .*got 'gpu'"):
        Pipeline.from_toml(DIGITS_PAIR_WITH_STEP_DEVICE("gpu"), source="p.toml")
    with pytest.raises(ConfigError, match="device must be one of"):
        Step(get_registry().get("metric", "kendall-tau")(), device="tpu")


def DIGITS_PAIR_WITH_STEP_DEVICE(device: str) -> str:
    from pipelines import DIGITS_PAIR

    return DIGITS_PAIR + DIGITS_STEP + f'device = "{device}"\n'


def test_step_on_the_cpu_gives_the_same_results(tmp_path):
    import json

    import numpy as np

    from mergescope import Pipeline, run

    plain = run(_pipeline(), tmp_path / "plain", quiet=True)
    pipeline = Pipeline.from_toml(DIGITS_PAIR_WITH_STEP_DEVICE("cpu"), source="p.toml")
    own = run(pipeline, tmp_path / "own", quiet=True)
    for layer in ("relu1",):
        a = plain.results[f"kendall-tau/{layer}"]["kendall_tau"].values
        b = own.results[f"kendall-tau/{layer}"]["kendall_tau"].values
        np.testing.assert_array_equal(a, b)
    info = json.loads((tmp_path / "own" / "run.json").read_text())
    assert info["steps"]["kendall-tau"]["device"] == "cpu"
    plain_info = json.loads((tmp_path / "plain" / "run.json").read_text())
    assert info["steps"]["kendall-tau"]["key"] == plain_info["steps"]["kendall-tau"]["key"]  # not in the key


def test_step_device_reaches_the_context_and_models(tmp_path, fresh_registry, monkeypatch):
    from mergescope import ActivationSpec, ModelSpec, Pipeline, Step, get_registry, hookimpl, run
    from mergescope import pipeline as pipeline_module

    seen = {}

    @attrs.define
    class Looks:
        name: ClassVar[str] = "test-looks"

        def merge(self, models, context=None, alignment=None):
            seen["context"] = context.device
            seen["during"] = [list(moves) for moves in moved.values()]
            raise RuntimeError("seen")

    class Plugin:
        @hookimpl
        def register_mergers(register):
            register(Looks)

    fresh_registry.register_plugin(Plugin, name="looks-plugin")
    reg = get_registry()
    other = torch.device("cpu", 0)  # a device that is not the run's (torch.device("cpu")), without a GPU
    monkeypatch.setattr(pipeline_module, "resolve_device", lambda spec: other if spec == "mps" else torch.device(spec))
    models = [ModelSpec("x", module=_tiny_net(0)), ModelSpec("y", module=_tiny_net(1))]
    moved: dict[str, list[torch.device]] = {}

    def spy(module: torch.nn.Module, moves: list[torch.device]):
        def to(device):
            moves.append(torch.device(device))
            return torch.nn.Module.to(module, device)

        return to

    for spec in models:  # record where each model is moved
        spec.module.to = spy(spec.module, moved.setdefault(spec.name, []))
    pipeline = Pipeline(
        data=reg.get("dataset", "mnist5000")(split="test", per_class=5),
        activations=ActivationSpec(layers=["2"]),
        models=models,
        steps=[Step(Looks(), models=["x", "y"], device="mps")],
    )
    with pytest.raises(Exception, match="seen"):
        run(pipeline, tmp_path / "run", quiet=True, device="cpu")
    cpu = torch.device("cpu")
    assert seen == {"context": other, "during": [[cpu, other], [cpu, other]]}  # loaded on the run's, then the step's
    assert moved == {"x": [cpu, other, cpu], "y": [cpu, other, cpu]}  # and back after the step


def test_a_missing_step_device_is_refused_at_run_start(tmp_path, no_gpu):
    from mergescope import Pipeline, run

    pipeline = Pipeline.from_toml(DIGITS_PAIR_WITH_STEP_DEVICE("cuda"), source="p.toml")
    with pytest.raises(
        ConfigError,
        match=r"p.toml, \[\[steps\]\] #1 \(use = 'kendall-tau'\), key 'device': step 'kendall-tau': "
        r"device 'cuda' is not available here; available: cpu",
    ):
        run(pipeline, tmp_path / "run", quiet=True, device="cpu")
    assert not (tmp_path / "run").exists()


def test_float64_arithmetic_stays_where_the_device_has_it():
    from mergescope.devices import float64_device

    assert float64_device("cpu") == torch.device("cpu")
    assert float64_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert float64_device("mps") == torch.device("cpu")  # MPS has no float64


def test_place_stores_cpu_convolutions_channels_last_with_the_same_outputs(tmp_path):
    from mergescope.checkpoints import save_state_dict
    from mergescope.devices import place
    from mergescope.keys import state_digest

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    x = torch.randn(5, 3, 10, 10)
    expected = net(x)
    digest = state_digest(net)
    assert place(net, "cpu") is net
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last) and not net[0].weight.is_contiguous()
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-6)
    assert state_digest(net) == digest  # values, not layout, identify a model
    saved = torch.load(save_state_dict(net, tmp_path / "net.pt"))
    assert all(t.is_contiguous() for t in saved.values())  # files do not depend on the layout
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 2))
    assert place(mlp, "cpu")[0].weight.is_contiguous()
