"""Every stage keeps its tensors on the run's device: one pipeline with a step of every kind.

On a machine with CUDA the pipeline runs there. Without one it runs under
:class:`simulated_device.SimulatedAccelerator`, where the run's device is a distinct CPU
device object and an operation that mixes a tensor moved there with a host tensor fails
as it would on a GPU; the test body is the same either way.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import attrs
import pytest
import torch
from simulated_device import SimulatedAccelerator
from torch import nn

import mergescope.pipeline as pipeline_module
from mergescope import MergescopeError, ModelSpec, Pipeline, RunResult, Step, get_registry, run
from mergescope.checkpoints import save_state_dict
from mergescope.devices import device_mix, explain_device_mix, stray_tensors
from mergescope.kinds import STEP_KINDS

CUDA = torch.cuda.is_available()
BUNDLED = "mergescope_plugins."

# Small CNNs with BatchNorm on the 8x8 digits: training, recordings and BatchNorm resets all run.
CNN = """use = "cnn"
widths = [4, 8]
batchnorm = true
"""

MODELS = f"""
seed = 0

[data]
use = "digits"
split = "test"
per_class = 6

[activations]
layers = ["relu1", "relu2"]
batch_size = 32
topk = 4

[[models]]
name = "a"
{CNN}
[models.train]
epochs = 1
batch_size = 64
reset_batchnorm = true

[models.train_data]
use = "digits"
split = "train"
per_class = 20

[[models]]
name = "b"
{CNN}
[models.train]
epochs = 1
batch_size = 64
seed = 1

[models.train_data]
use = "digits"
split = "train"
per_class = 20
"""

# Fine-tunes of one base (checkpoints written by the fixture) for the task-vector mergers.
FINETUNES = """
[[models]]
name = "{name}"
checkpoint = "{path}"
{cnn}"""

STEPS = """
[[steps]]
use = "weight-matching"
name = "wm"
models = ["a", "b"]
max_iter = 5

[[steps]]
use = "activation-matching"
name = "am"
models = ["a", "b"]

[[steps]]
use = "cca"
name = "cca"
models = ["a", "b"]

[[steps]]
use = "lasso"
name = "lasso"
models = ["a", "b"]
layers = ["relu2"]
method = "ols"
per_class = 2
sparsity = [1.0, 0.5]
top_m = [2]
topk = 2

[[steps]]
use = "interpolation"
name = "interpolation"
models = ["a", "b@wm"]
alphas = [0.0, 0.5, 1.0]

[[steps]]
use = "repair"
name = "repair"
models = ["a", "b@am"]
alphas = [0.0, 0.5, 1.0]

[[steps]]
use = "average"
name = "average"
models = ["a", "b@wm"]

[[steps]]
use = "cca-merge"
name = "cca-merge"
models = ["a", "b"]
alignment = "cca"

[[steps]]
use = "kendall-tau"
name = "kendall-tau"
models = ["a", "b@wm", "interpolation"]

[[steps]]
use = "correlation"
name = "correlation"
models = ["a", "b@wm"]

[[steps]]
use = "clip-delta"
name = "clip-delta"
models = ["a", "b@wm"]
layers = ["relu2"]
k = 2
embedder_options = { image_size = 32, batch_size = 16 }

[[steps]]
use = "partial-merge"
name = "partial-merge"
models = ["a", "b@wm"]
fractions = [0.5]
orders = ["top", "random"]
seeds = [0]

[[steps]]
use = "task-arithmetic"
name = "task-arithmetic"
models = ["base", "ft1", "ft2"]
scalings = [0.5, 1.0]

[[steps]]
use = "ties"
name = "ties"
models = ["base", "ft1", "ft2"]
density = 0.5

[[steps]]
use = "pcb"
name = "pcb"
models = ["base", "ft1", "ft2"]
ratio = 0.5

[[steps]]
use = "dare"
name = "dare"
models = ["base", "ft1", "ft2"]
drop_rate = 0.5
then = "ties"

[[steps]]
use = "breadcrumbs"
name = "breadcrumbs"
models = ["base", "ft1", "ft2"]
drop_small = 0.5

[[steps]]
use = "model-stock"
name = "model-stock"
models = ["base", "ft1", "ft2"]

[[steps]]
use = "slerp"
name = "slerp"
models = ["a", "b"]
alignment = "wm"
alphas = [0.0, 0.5, 1.0]

[[steps]]
use = "regmean"
name = "regmean"
models = ["ft1", "ft2"]

[[steps]]
use = "fisher"
name = "fisher"
models = ["a", "b"]
alignment = "wm"
samples = 16

[[steps]]
use = "adamerging"
name = "adamerging"
models = ["base", "ft1", "ft2"]
iterations = 5
granularity = "layer"

[[steps]]
use = "zipit"
name = "zipit"
models = ["a", "b"]

[[steps]]
use = "zipit"
name = "zipit-partial"
models = ["a", "b"]
stop_at = "relu1"

[[steps]]
use = "ensemble"
name = "ensemble"
models = ["a", "b"]

[[steps]]
use = "feature-vis"
name = "feature-vis"
models = ["a", "b@wm"]
layers = ["relu2"]
max_units = 2
steps = 4

[[steps]]
use = "cycle-consistent"
name = "c2m3"
models = ["a", "b"]
max_iter = 5

[[steps]]
use = "ste"
name = "ste"
models = ["a", "b"]
epochs = 1
batch_size = 16

[[steps]]
use = "orthogonal-matching"
name = "orthogonal"
models = ["a", "b"]
epochs = 1
batch_size = 16

[[steps]]
use = "interpolation-curves"
name = "curves"

[[steps]]
use = "top-k"
name = "top-k"
models = ["a", "b@wm"]
layers = ["relu2"]
k = 2
max_units = 2
tile = 8

[[steps]]
use = "channel-categories"
name = "categories"
metric = "kendall-tau"

[[steps]]
use = "regression-sparsity"
name = "regression-sparsity"

[[tasks]]
name = "digits"
expert = "a"
models = ["a", "b", "interpolation", "task-arithmetic"]
use = "digits"
split = "test"
per_class = 4
"""

CROSSCODER = """
[[steps]]
use = "crosscoder"
name = "crosscoder"
models = ["a", "b@wm"]
layers = ["relu2"]
dictionary_size = 8
epochs = 2
batch_size = 16
ablation = true
ablation_samples = 12
ablation_draws = 1

[[steps]]
use = "crosscoder-plots"
name = "crosscoder-plots"

[[steps]]
use = "crosscoder-sweep"
name = "crosscoder-sweep"
"""


def _finetunes(directory: Path) -> str:
    """A base CNN and two perturbed copies of it, written as checkpoints; their ``[[models]]`` tables."""
    from mergescope_plugins.zoo import SmallCNN

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        base = SmallCNN(widths=[4, 8], batchnorm=True).build((1, 8, 8), 10)
        tables = []
        for i, name in enumerate(["base", "ft1", "ft2"]):
            model = base
            if i:
                model = SmallCNN(widths=[4, 8], batchnorm=True).build((1, 8, 8), 10)
                model.load_state_dict(base.state_dict())
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.05 * p.pow(2).mean().sqrt() * torch.randn(p.shape))
            path = directory / f"{name}.pt"
            save_state_dict(model, path)
            tables.append(FINETUNES.format(name=name, path=path.as_posix(), cnn=CNN))
    return "".join(tables)


@attrs.define
class Device:
    """Where the test runs its pipeline: real CUDA, or the simulated accelerator."""

    spec: str
    simulator: SimulatedAccelerator | None

    def on_device(self, tensor: torch.Tensor) -> bool:
        if self.simulator is not None:
            return self.simulator.on_device(tensor)
        return tensor.device.type == "cuda"


@contextlib.contextmanager
def device_under_test() -> Iterator[Device]:
    """CUDA when this machine has it; otherwise the simulated accelerator, as the run's device."""
    if CUDA:
        yield Device("cuda", None)
        return
    with SimulatedAccelerator() as simulator, pytest.MonkeyPatch.context() as patch:
        # The run resolves its device spec to the simulated device object.
        patch.setattr(pipeline_module, "resolve_device", lambda spec: simulator.device)
        yield Device("cuda", simulator)


@attrs.define
class Flow:
    """The run of every step on the device."""

    device: Device
    text: str
    result: RunResult
    out: Path


@pytest.fixture(scope="module")
def flow(tmp_path_factory) -> Iterator[Flow]:
    root = tmp_path_factory.mktemp("device-flow")
    text = MODELS + _finetunes(root) + STEPS
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MERGESCOPE_CACHE", str(root / "cache"))  # the models are trained here, on the device
        with device_under_test() as device:
            result = run(Pipeline.from_toml(text), root / "run", quiet=True, device=device.spec)
            yield Flow(device, text, result, root / "run")


def _uses(text: str) -> set[str]:
    return {step.use for step in Pipeline.from_toml(text).steps}


def test_every_bundled_step_component_is_in_the_flow(flow):
    registry = get_registry()
    bundled = {
        entry.name
        for kind in STEP_KINDS
        for entry in registry.entries(kind)
        if entry.cls.__module__.startswith(BUNDLED)
    }
    missing = bundled - _uses(flow.text + CROSSCODER)
    assert not missing, f"add a step of {sorted(missing)} to the device flow"


def test_every_step_runs_on_the_device(flow):
    device = flow.device
    info = json.loads((flow.out / "run.json").read_text())
    if device.simulator is not None:  # the run's work went through the simulated device
        assert info["device"] == str(device.simulator.device)
        assert device.simulator.device_operations > 1_000
    else:
        assert info["device"].startswith("cuda")
    names = Pipeline.from_toml(flow.text).step_names()
    assert list(info["steps"]) == names and not any(s["cached"] for s in info["steps"].values())
    models = [m for m in names if m in {"interpolation", "repair", "average", "cca-merge", "partial-merge"}]
    assert set(flow.result.models) >= {"a", "b", "b@wm", "b@am", "base", "ft1", "ft2", *models}
    for name, module in flow.result.models.items():  # declared, aligned and merged models end on the device
        for key, tensor in module.state_dict().items():
            assert device.on_device(tensor), f"{name}: {key} is on the host"
    measured = {"wm", "am", "cca", "lasso", "kendall-tau", "correlation", "clip-delta", "tasks"}
    assert measured <= set(flow.result.results.children)


def test_the_crosscoder_trains_on_the_device(flow):
    # The same run directory: the earlier steps are restored from their cache, onto the device.
    result = run(Pipeline.from_toml(flow.text + CROSSCODER), flow.out, quiet=True, device=flow.device.spec)
    info = json.loads((flow.out / "run.json").read_text())
    assert not info["steps"]["crosscoder"]["cached"] and info["steps"]["interpolation"]["cached"]
    assert "crosscoder" in result.results.children
    assert list((flow.out / "figures" / "crosscoder-plots").glob("*.png"))
    # The ablation ran the models on the device with the layer's activations edited.
    node = result.results["crosscoder/relu2"].ds
    assert int(node["ablation_images"].sum()) == 12 and node["ablation_accuracy"].notnull().all()


# -- a user's module that mixes devices itself ------------------------------------------------


class KeepsOffset(nn.Module):
    """A user's classifier that keeps a tensor as a plain attribute: ``.to()`` leaves it on the host."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.fc1 = nn.Linear(64, 8)
            self.relu1 = nn.ReLU()
            self.head = nn.Linear(8, 10)
        self.offset = torch.zeros(8)  # not register_buffer: not moved with the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu1(self.fc1(x.flatten(1)) + self.offset))


def _mlp(seed: int) -> nn.Module:
    from mergescope_plugins.zoo import MLP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(hidden=[8]).build((1, 8, 8), 10)


def _pipeline_with_offsets(steps) -> Pipeline:
    from mergescope import ActivationSpec

    registry = get_registry()
    models = [
        ModelSpec("a", module=_mlp(0)),
        ModelSpec("b", module=_mlp(1)),
        ModelSpec("c", module=KeepsOffset(2)),
        ModelSpec("d", module=KeepsOffset(3)),
    ]
    return Pipeline(
        data=registry.get("dataset", "digits")(split="test", per_class=4),
        activations=ActivationSpec(layers=["relu1"], batch_size=32),
        models=models,
        steps=steps,
    )


def test_a_module_that_mixes_devices_is_reported_and_earlier_steps_stay_cached(flow, tmp_path):
    device = flow.device
    interpolation = get_registry().get("merger", "interpolation")
    pipeline = _pipeline_with_offsets(
        [
            Step(interpolation(alphas=[]), models=["a", "b"], name="ab"),
            Step(interpolation(alphas=[]), models=["c", "d"], name="cd"),
        ]
    )
    out = tmp_path / "run"
    with pytest.raises(MergescopeError) as info:
        run(pipeline, out, quiet=True, device=device.spec)
    message = str(info.value)
    run_device = device.simulator.device if device.simulator else torch.device("cuda", torch.cuda.current_device())
    assert "[[steps]] #2 (use = 'interpolation'): step 'cd': a copy of model 'c' mixes devices" in message
    assert f"keeps a tensor on another device than the one it runs on ({run_device})" in message
    assert f"not registered buffers stay behind when the model moves to {run_device}: 'offset' (on cpu)" in message
    assert "register_buffer" in message
    assert "Expected all tensors to be on the same device" in message
    assert "failed in merger" not in message  # not reported as the component's bug
    assert len(list((out / "steps").glob("ab-*/result.nc"))) == 1  # the finished step stays cached
    assert not list((out / "steps").glob("cd-*/result.nc"))


def test_a_module_that_mixes_devices_is_reported_before_the_steps_that_record_it(flow, tmp_path):
    device = flow.device
    pipeline = _pipeline_with_offsets(
        [Step(get_registry().get("metric", "kendall-tau")(), models=["a", "c"], allow_unaligned=True)]
    )
    with pytest.raises(MergescopeError) as info:
        run(pipeline, tmp_path / "run", quiet=True, device=device.spec)
    message = str(info.value)
    assert "[[steps]] #1 (use = 'kendall-tau'): step 'kendall-tau': model 'c' mixes devices" in message
    assert "not registered buffers stay behind" in message and "'offset' (on cpu)" in message


def test_a_component_that_sends_host_tensors_to_a_model_is_its_own_failure(flow, tmp_path, fresh_registry):
    from mergescope import hookimpl

    @attrs.define
    class HostInputs:
        """A merger that runs the model on host images it forgot to move."""

        name: ClassVar[str] = "test-host-inputs"

        def merge(self, models, context, alignment=None):
            return models["c"](torch.stack([context.data[i][0] for i in range(2)]))

    class Plugin:
        @hookimpl
        def register_mergers(register):
            register(HostInputs)

    fresh_registry.register_plugin(Plugin, name="host-inputs-plugin")
    pipeline = _pipeline_with_offsets([Step(HostInputs(), models=["c", "d"])])
    with pytest.raises(MergescopeError) as info:
        run(pipeline, tmp_path / "run", quiet=True, device=flow.device.spec)
    message = str(info.value)
    assert "step 'test-host-inputs' failed in merger 'test-host-inputs'" in message  # not the model's fault
    assert "mixes devices" not in message and "Expected all tensors to be on the same device" in message


class HardCodesTheHost(nn.Module):
    """A user's module whose forward makes a tensor on the host whatever its input's device."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + torch.zeros(3, device="cpu")


def test_explaining_a_device_mix(flow):
    device = (
        flow.device.simulator.device if flow.device.simulator else torch.device("cuda", torch.cuda.current_device())
    )
    model = HardCodesTheHost().to(device)
    with pytest.raises(RuntimeError) as info:
        model(torch.randn(2, 4).to(device))
    text = explain_device_mix(info.value, {"m": model}, device)
    assert text.startswith("model 'm' mixes devices in its own forward pass: module HardCodesTheHost keeps a tensor")
    assert "a device hard-coded in forward" in text
    wrapped = ValueError("while scoring")
    wrapped.__cause__ = info.value
    assert device_mix(wrapped) is info.value and explain_device_mix(wrapped, {"m": model}, device) == text
    assert explain_device_mix(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), {"m": model}, device) is None
    assert stray_tensors(KeepsOffset(0).to(device), device) == {"offset": torch.device("cpu")}
    assert stray_tensors(model, device) == {}
