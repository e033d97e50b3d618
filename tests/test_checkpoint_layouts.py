"""Checkpoints as researchers save them load as they come.

Each layout is built here from a small model: the PyTorch tutorial's dict, a Lightning
checkpoint (``state_dict`` with a ``model.`` prefix), DataParallel's ``module.`` prefix,
torchvision's reference-training checkpoint (an ``argparse.Namespace`` under ``args``, the
optimizer and lr-scheduler state, the EMA weights), ``.safetensors``, and a pickle that
would run code. Each loads automatically or with the documented option
(``checkpoint_key``, ``strip_prefix``), and the refusals say what to do.
"""

from __future__ import annotations

import argparse
import logging
import re

import pytest
import torch
import torchvision
from torch import nn

from mergescope import CheckpointError, ConfigError, ModelSpec, Pipeline, get_registry, run
from mergescope import runner as runner_module
from mergescope.checkpoints import SAFE_GLOBALS, load_into, load_state_dict
from mergescope.keys import file_digest
from mergescope.pipeline import load_pipeline

CLASSES = 10  # the digits dataset
INPUT = (1, 8, 8)
HIDDEN = [16]


class Payload:
    """A custom object: unpickling it would need arbitrary code."""

    def __init__(self) -> None:
        self.value = 1


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return get_registry().get("architecture", "mlp")(hidden=HIDDEN).build(INPUT, CLASSES)


def optimizer_and_scheduler(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD with momentum after one step, and torchvision's warm-up then cosine schedule."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[2])
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler.step()
    return optimizer, scheduler


def assert_same_state(a, b) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def entry_logged(caplog, path, entry: str) -> bool:
    return any(
        r.name == "mergescope" and str(path) in r.getMessage() and repr(entry) in r.getMessage() for r in caplog.records
    )


# -- layouts -------------------------------------------------------------------


def test_the_tutorial_layout_is_found_and_logged(tmp_path, caplog):
    model = mlp()
    optimizer, _ = optimizer_and_scheduler(model)
    path = tmp_path / "tutorial.pt"
    torch.save(
        {
            "epoch": 3,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "loss": 0.4,
        },
        path,
    )
    with caplog.at_level(logging.INFO, logger="mergescope"):
        state = load_state_dict(path)
    assert_same_state(state, model.state_dict())
    assert entry_logged(caplog, path, "model_state_dict")


def lightning_checkpoint(model: nn.Module, path) -> None:
    """What Lightning's ModelCheckpoint writes for a LightningModule holding the network as ``self.model``."""
    optimizer, scheduler = optimizer_and_scheduler(model)
    torch.save(
        {
            "epoch": 4,
            "global_step": 500,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 5}}}},
            "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.3)}},
            "optimizer_states": [optimizer.state_dict()],
            "lr_schedulers": [scheduler.state_dict()],
            "hparams_name": "kwargs",
            "hyper_parameters": {"lr": 0.1, "hidden": HIDDEN},
        },
        path,
    )


def test_lightning_needs_strip_prefix_and_the_error_says_so(tmp_path, caplog):
    model = mlp()
    path = tmp_path / "epoch=4-step=500.ckpt"
    lightning_checkpoint(model, path)
    with caplog.at_level(logging.INFO, logger="mergescope"):
        state = load_state_dict(path)
    assert entry_logged(caplog, path, "state_dict")
    with pytest.raises(CheckpointError) as info:
        load_into(mlp(1), state, source=str(path), architecture="mlp")
    message = str(info.value)
    assert "missing keys" in message and "unexpected keys" in message
    assert 'strip_prefix = "model."' in message
    target = mlp(1)
    load_into(target, load_state_dict(path, strip_prefix="model."), source=str(path), architecture="mlp")
    assert_same_state(target.state_dict(), model.state_dict())


def test_data_parallel_prefix(tmp_path):
    model = mlp()
    path = tmp_path / "dp.pth"
    torch.save(nn.DataParallel(model).state_dict(), path)
    with pytest.raises(CheckpointError, match=re.escape('give strip_prefix = "module."')):
        load_into(mlp(1), load_state_dict(path), source=str(path), architecture="mlp")
    for prefix in ("module.", "module"):  # the final dot is added when left out
        target = mlp(1)
        load_into(target, load_state_dict(path, strip_prefix=prefix), source=str(path), architecture="mlp")
        assert_same_state(target.state_dict(), model.state_dict())


def test_a_model_whose_keys_carry_the_prefix_is_explained(tmp_path):
    wrapped = nn.Sequential()
    wrapped.add_module("net", mlp())
    with pytest.raises(CheckpointError) as info:
        load_into(wrapped, mlp().state_dict(), source="plain.pt", architecture="wrapped")
    message = str(info.value)
    assert "without their common prefix 'net.'" in message and "strip_prefix" not in message


def torchvision_reference_checkpoint(path) -> nn.Module:
    """What torchvision's references/classification/train.py saves (with --model-ema)."""
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    optimizer, scheduler = optimizer_and_scheduler(model)
    ema = torch.optim.swa_utils.AveragedModel(model)  # torchvision's ExponentialMovingAverage is one
    args = argparse.Namespace(
        data_path="/datasets01/imagenet_full_size/061417/", model="resnet18", device="cuda", batch_size=32,
        epochs=90, workers=16, opt="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, lr_scheduler="cosineannealinglr",
        lr_warmup_epochs=2, lr_warmup_method="linear", output_dir=".", resume="", start_epoch=0, model_ema=True,
        amp=False, world_size=1, dist_url="env://", weights=None, val_resize_size=256, train_crop_size=224,
    )  # fmt: skip
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "epoch": 7,
            "args": args,
            "model_ema": ema.state_dict(),
        },
        path,
    )
    return model


def test_torchvision_reference_checkpoints_load_safely(tmp_path, caplog):
    path = tmp_path / "model_7.pth"
    model = torchvision_reference_checkpoint(path)
    assert argparse.Namespace in SAFE_GLOBALS
    with caplog.at_level(logging.INFO, logger="mergescope"):
        state = load_state_dict(path)
    assert entry_logged(caplog, path, "model")
    target = torchvision.models.resnet18(weights=None, num_classes=3)
    load_into(target, state, source=str(path), architecture="torchvision")
    assert_same_state(target.state_dict(), model.state_dict())
    # The averaged weights only when asked: AveragedModel keeps them under "module." next to "n_averaged".
    ema = load_state_dict(path, checkpoint_key="model_ema", strip_prefix="module.")
    load_into(target, ema, source=str(path), architecture="torchvision")


def test_safetensors(tmp_path):
    from safetensors.torch import save_file

    model = mlp()
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    assert_same_state(load_state_dict(path), model.state_dict())
    prefixed = tmp_path / "prefixed.safetensors"
    save_file({f"module.{k}": v for k, v in model.state_dict().items()}, str(prefixed))
    assert_same_state(load_state_dict(prefixed, strip_prefix="module."), model.state_dict())
    with pytest.raises(CheckpointError, match="holds one flat state dict"):
        load_state_dict(path, checkpoint_key="model")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="could not be read as a safetensors file"):
        load_state_dict(broken)


def test_an_unsafe_pickle_is_refused_with_a_complete_message(tmp_path):
    model = mlp()
    path = tmp_path / "evil.pt"
    torch.save({"model": model.state_dict(), "extra": Payload()}, path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert "\x1b" not in message
    assert "refused for safety" in message
    assert f"{Payload.__module__}.Payload" in message  # the type it would need
    assert "torch.save(model.state_dict(), path)" in message
    assert message.endswith(".") and message.count("(") == message.count(")")
    # torch's reason is quoted as a whole sentence, without the colours of its terminal output.
    quoted = re.search(r"torch says: (.*?) Re-save", message)
    assert quoted is not None and quoted.group(1).endswith("was not an allowed global by default.")


# -- choosing the entry ----------------------------------------------------------


def test_an_ambiguous_layout_lists_the_entries(tmp_path):
    state = mlp().state_dict()
    path = tmp_path / "two.pt"
    torch.save({"state_dict": state, "model": state, "epoch": 1}, path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert "ambiguous" in message and "'epoch' (int)" in message and "checkpoint_key" in message
    assert_same_state(load_state_dict(path, checkpoint_key="model"), state)


def test_an_unknown_layout_suggests_the_entry_holding_tensors(tmp_path):
    state = mlp().state_dict()
    path = tmp_path / "custom.pt"
    torch.save({"net": state, "step": 10, "config": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert "'net' (dict of 4 entries, 4 tensors)" in message and "'step' (int)" in message
    assert 'checkpoint_key = "net"' in message
    assert_same_state(load_state_dict(path, checkpoint_key="net"), state)


def test_dotted_checkpoint_key_and_a_missing_entry(tmp_path):
    state = mlp().state_dict()
    path = tmp_path / "nested.pt"
    torch.save({"checkpoint": {"weights": state, "iteration": 3}}, path)
    assert_same_state(load_state_dict(path, checkpoint_key="checkpoint.weights"), state)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path, checkpoint_key="checkpoint.weight")
    message = str(info.value)
    assert "no entry 'checkpoint.weight'" in message and "under 'checkpoint'" in message and "'weights'" in message
    with pytest.raises(
        CheckpointError, match="'checkpoint' is not a state dict: its entry 'weights' is an OrderedDict, not a tensor"
    ):
        load_state_dict(path, checkpoint_key="checkpoint")


def test_strip_prefix_that_no_key_has(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(mlp().state_dict(), path)
    with pytest.raises(CheckpointError, match="no key starts with strip_prefix 'module.'"):
        load_state_dict(path, strip_prefix="module.")


# -- in a pipeline ---------------------------------------------------------------

PIPELINE = """
seed = 0

[data]
use = "digits"
split = "test"
per_class = 4

[activations]
layers = ["relu1"]
batch_size = 64

[[models]]
name = "tutorial"
use = "mlp"
hidden = [16]
checkpoint = "tutorial.pt"

[[models]]
name = "parallel"
use = "mlp"
hidden = [16]
checkpoint = "parallel.pt"
strip_prefix = "module."

[[steps]]
use = "kendall-tau"
models = ["tutorial", "parallel"]
allow_unaligned = true
"""


def write_layouts(tmp_path) -> tuple[nn.Module, nn.Module]:
    a, b = mlp(0), mlp(1)
    optimizer, _ = optimizer_and_scheduler(mlp(0))
    torch.save({"model_state_dict": a.state_dict(), "optimizer_state_dict": optimizer.state_dict(), "epoch": 3},
               tmp_path / "tutorial.pt")  # fmt: skip
    torch.save(nn.DataParallel(b).state_dict(), tmp_path / "parallel.pt")
    return a, b


def test_a_pipeline_runs_on_the_tutorial_and_data_parallel_layouts(tmp_path, caplog):
    a, b = write_layouts(tmp_path)
    path = tmp_path / "pipeline.toml"
    path.write_text(PIPELINE, encoding="utf-8")
    pipeline = load_pipeline(path)
    assert pipeline.models[1].strip_prefix == "module." and pipeline.models[0].strip_prefix is None
    with caplog.at_level(logging.INFO, logger="mergescope"):
        result = run(pipeline, tmp_path / "run", quiet=True)
    assert entry_logged(caplog, tmp_path / "tutorial.pt", "model_state_dict")
    assert_same_state(result.models["tutorial"].state_dict(), a.state_dict())
    assert_same_state(result.models["parallel"].state_dict(), b.state_dict())
    assert result.results["kendall-tau/relu1"].ds["kendall_tau"].sizes["unit"] == HIDDEN[0]


def test_without_strip_prefix_the_run_error_suggests_it(tmp_path):
    write_layouts(tmp_path)
    path = tmp_path / "pipeline.toml"
    path.write_text(PIPELINE.replace('strip_prefix = "module."\n', ""), encoding="utf-8")
    with pytest.raises(CheckpointError) as info:
        run(load_pipeline(path), tmp_path / "run", quiet=True)
    message = str(info.value)
    assert "[[models]] #2 (name = 'parallel')" in message and "key 'checkpoint'" in message
    assert 'strip_prefix = "module."' in message


def fingerprints(pipeline: Pipeline, out_dir) -> dict[str, str]:
    job = runner_module._Run(pipeline, out_dir, force=False, quiet=True, registry=get_registry())
    job.load_models()
    return {name: model.fingerprint for name, model in job.models.items()}


def test_reading_options_are_part_of_the_fingerprint_only_when_given(tmp_path):
    write_layouts(tmp_path)
    path = tmp_path / "pipeline.toml"
    path.write_text(PIPELINE, encoding="utf-8")
    pipeline = load_pipeline(path)
    prints = fingerprints(pipeline, tmp_path / "run")
    # Unset: the file digest, as before (caches of plain checkpoints stay valid).
    assert prints["tutorial"] == file_digest(tmp_path / "tutorial.pt")
    assert prints["parallel"] != file_digest(tmp_path / "parallel.pt")
    pipeline.models[0].checkpoint_key = "model_state_dict"  # the same weights, said explicitly
    again = fingerprints(pipeline, tmp_path / "run")
    assert again["tutorial"] != prints["tutorial"] and again["parallel"] == prints["parallel"]


def test_the_new_keys_round_trip_and_are_checked(tmp_path):
    write_layouts(tmp_path)
    path = tmp_path / "pipeline.toml"
    path.write_text(
        PIPELINE.replace(
            'checkpoint = "tutorial.pt"', 'checkpoint = "tutorial.pt"\ncheckpoint_key = "model_state_dict"'
        )
    )
    pipeline = load_pipeline(path)
    assert pipeline.models[0].checkpoint_key == "model_state_dict"
    text = pipeline.to_toml()
    assert 'checkpoint_key = "model_state_dict"' in text and 'strip_prefix = "module."' in text
    assert Pipeline.from_toml(text) == pipeline
    mlp_cls = get_registry().get("architecture", "mlp")
    with pytest.raises(ConfigError, match="key 'strip_prefix'.*has no 'checkpoint'"):
        Pipeline(models=[ModelSpec("a", mlp_cls(), strip_prefix="module.")]).check()
    path.write_text(PIPELINE.replace('strip_prefix = "module."', "strip_prefix = 1"))
    with pytest.raises(ConfigError, match="'strip_prefix' must be a string"):
        load_pipeline(path)
