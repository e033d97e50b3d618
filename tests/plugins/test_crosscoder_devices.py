"""The crosscoder differ on the step's device and at its precision; checkpoints and fallbacks that free memory."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import attrs
import numpy as np
import pytest
import torch
import xarray as xr
from simulated_device import SimulatedAccelerator

from mergescope.components import Context
from mergescope.errors import ConfigError
from mergescope_plugins import crosscoder as cc
from mergescope_plugins.crosscoder import Crosscoder

T = TypeVar("T")
CPU = torch.device("cpu")
CUDA = torch.cuda.is_available()
FAST = dict(dictionary_size=16, epochs=4, batch_size=32, chunk_size=64)


# One torch thread (tests/plugins/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def activations(samples: int = 240, units: tuple[int, ...] = (6, 8), seed: int = 0) -> dict[str, xr.DataArray]:
    """Non-negative activations of models that share some sparse directions."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(6, sum(units)))
    codes = (rng.random((samples, 6)) < 0.3) * rng.uniform(0.5, 1.5, size=(samples, 6))
    x = np.maximum(codes @ atoms + 0.05 * rng.normal(size=(samples, sum(units))), 0).astype(np.float32)
    offsets = np.cumsum([0, *units])
    return {
        m: xr.DataArray(
            x[:, offsets[i] : offsets[i + 1]],
            dims=("sample", "unit"),
            coords={"sample": np.arange(100, 100 + samples), "layer": "block4"},
        )
        for i, m in enumerate("abcdefgh"[: len(units)])
    }


def context(workdir: Path, device: torch.device = CPU, precision: str = "fp32", **kwargs) -> Context:
    return Context(quiet=True, workdir=workdir, device=device, precision=precision, **kwargs)


@attrs.define
class Counting(Context):
    """A context that counts the epochs trained and the chunks read; may stop after ``after`` epochs."""

    after: int | None = None
    epochs_run: int = 0
    reads: int = 0

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        for item in iterable:
            if desc.endswith("training"):
                if self.after is not None and self.epochs_run >= self.after:
                    raise KeyboardInterrupt
                self.epochs_run += 1
            elif desc.endswith("reading activations"):
                self.reads += 1
            yield item


def checkpoint(workdir: Path) -> dict:
    (path,) = (workdir / "crosscoder").glob("*/checkpoint.pt")
    return torch.load(path, map_location="cpu", weights_only=True)


def tensors(value: object) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors(v)


# ----------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("sparsity", ["l1", "batchtopk"])
def test_the_cpu_device_named_explicitly_gives_the_default_result(tmp_path, sparsity):
    crosscoder = Crosscoder(**FAST, sparsity=sparsity, k=3)
    default = crosscoder.fit(activations(), Context(quiet=True, workdir=tmp_path / "default"))
    explicit = crosscoder.fit(activations(), context(tmp_path / "cpu"))
    xr.testing.assert_identical(default, explicit)
    # Checkpoints hold host tensors only, whatever the device: a run resumes anywhere.
    payload = checkpoint(tmp_path / "cpu")
    assert all(t.device.type == "cpu" for t in tensors(payload))
    assert set(payload["model"]) == {"encoder", "encoder_bias", "decoder", "decoder_bias", "membership"}


def test_every_tensor_stays_on_the_device_and_the_result_equals_the_cpu_result(tmp_path):
    # A distinct device object on the CPU: any host tensor meeting a device tensor
    # fails as on a GPU, and numbers stay the CPU's, so the results are identical.
    acts = activations(units=(6, 8, 5))
    for sparsity in ("l1", "batchtopk"):
        crosscoder = Crosscoder(**FAST, sparsity=sparsity, k=3, topk=5)
        expected = crosscoder.fit(acts, context(tmp_path / f"cpu-{sparsity}"))
        with SimulatedAccelerator() as gpu:
            result = crosscoder.fit(acts, context(tmp_path / f"device-{sparsity}", gpu.device))
        xr.testing.assert_identical(result, expected)
        assert all(t.device.type == "cpu" for t in tensors(checkpoint(tmp_path / f"device-{sparsity}")))


def test_a_checkpoint_written_on_one_device_resumes_on_another(tmp_path):
    acts = activations()
    crosscoder = Crosscoder(**FAST)
    whole = crosscoder.fit(acts, context(tmp_path / "whole"))
    with SimulatedAccelerator() as gpu, pytest.raises(KeyboardInterrupt):
        crosscoder.fit(acts, Counting(quiet=True, workdir=tmp_path / "moved", device=gpu.device, after=2))
    resumed = Counting(quiet=True, workdir=tmp_path / "moved", device=CPU)
    xr.testing.assert_identical(crosscoder.fit(acts, resumed), whole)
    assert resumed.epochs_run == 2


def test_bf16_trains_close_to_fp32_with_its_own_checkpoints_and_float64_statistics(tmp_path):
    acts = activations()
    crosscoder = Crosscoder(**{**FAST, "epochs": 8})
    full = crosscoder.fit(acts, context(tmp_path))
    half = crosscoder.fit(acts, context(tmp_path, precision="bf16"))
    assert len(list((tmp_path / "crosscoder").iterdir())) == 2  # other parameters: another key
    assert not np.array_equal(half["decoder"].values, full["decoder"].values)
    # bf16 rounds the products' inputs to 8 bits of mantissa: close, not equal.
    np.testing.assert_allclose(half["fvu"], full["fvu"], atol=0.05)
    np.testing.assert_allclose(half["loss_history"], full["loss_history"], rtol=0.05)
    for name in ("fvu", "density", "decoder_norm", "topk_value", "loss_history"):
        assert half[name].dtype == np.float64, name
    assert half["encoder"].dtype == np.float32  # float32 master weights


def test_an_unsupported_precision_fails_before_any_data_is_read(tmp_path):
    counting = Counting(quiet=True, workdir=tmp_path, device=CPU, precision="fp16")
    with pytest.raises(ConfigError, match=r"crosscoder: .*'fp16'.* CPU"):
        Crosscoder(**FAST).fit(activations(), counting)
    assert counting.reads == 0
    counting = Counting(quiet=True, workdir=tmp_path, device=CPU, precision="fp8")
    with pytest.raises(ConfigError, match="crosscoder: precision .*'fp8'"):
        Crosscoder(**FAST).fit(activations(), counting)


# ---------------------------------------------------------------- divergence fallback


def _blow_up_from(monkeypatch, epoch: int, steps_per_epoch: int) -> None:
    schedule = Crosscoder._schedule

    def exploding(self, optimiser, step, total):
        schedule(self, optimiser, step, total)
        if step >= (epoch - 1) * steps_per_epoch:
            for group in optimiser.param_groups:
                group["lr"] = 1e20

    monkeypatch.setattr(Crosscoder, "_schedule", exploding)


@pytest.mark.parametrize(
    ("every", "diverges_in", "kept_from"), [(1, 3, "checkpoint"), (2, 2, "host"), (2, 3, "checkpoint")]
)
def test_divergence_restores_the_last_good_parameters_from_where_they_were_kept(
    tmp_path, monkeypatch, every, diverges_in, kept_from
):
    acts = activations()
    good = diverges_in - 1
    # The parameters after epoch `good` of an undisturbed run, from its checkpoint.
    with pytest.raises(KeyboardInterrupt):
        Crosscoder(**FAST).fit(acts, Counting(quiet=True, workdir=tmp_path / "ref", device=CPU, after=good))
    expected = checkpoint(tmp_path / "ref")["model"]
    kept: list[str] = []
    restore = Crosscoder._restore

    def watched(self, coder, last, *args):
        kept.append(last.where)
        return restore(self, coder, last, *args)

    monkeypatch.setattr(Crosscoder, "_restore", watched)
    _blow_up_from(monkeypatch, diverges_in, steps_per_epoch=int(np.ceil(240 / FAST["batch_size"])))
    with pytest.warns(RuntimeWarning, match=rf"at epoch {diverges_in} .*parameters after epoch {good} are kept"):
        result = Crosscoder(**FAST, checkpoint_every=every).fit(acts, context(tmp_path / "bad"))
    assert kept == [kept_from]
    assert int(result["epochs_trained"]) == good
    np.testing.assert_array_equal(result["decoder"].values, expected["decoder"].numpy())
    np.testing.assert_array_equal(result["encoder"].values, expected["encoder"].numpy())


def test_the_last_good_parameters_are_copied_only_for_epochs_without_a_checkpoint(tmp_path, monkeypatch):
    made: list[str] = []
    good = cc._Good

    def recorded(*args, **kwargs):
        last = good(*args, **kwargs)
        made.append(last)
        return last

    monkeypatch.setattr(cc, "_Good", recorded)
    Crosscoder(**FAST).fit(activations(), context(tmp_path / "every"))
    assert [g.where for g in made] == ["initial"] + ["checkpoint"] * 4 and all(g.params is None for g in made)
    made.clear()
    Crosscoder(**FAST, checkpoint_every=3).fit(activations(), context(tmp_path / "third"))
    assert [g.where for g in made] == ["initial", "host", "host", "checkpoint", "checkpoint"]
    assert all(t.device.type == "cpu" for g in made if g.params for t in g.params.values())


# ------------------------------------------------------------------------------ CUDA


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_gives_the_cpu_results_within_tolerance(tmp_path):
    """CPU and CUDA, fp32, on one set of activations.

    The analysis of one trained crosscoder (its checkpoint resumed on the other device)
    agrees to float32 rounding: relative 1e-5 for sums over rows, decoder norms and
    top-k values; a latent's density may differ by a row or two whose activation is 0
    up to rounding. Training on each device agrees within 1e-3 (relative for the
    losses, absolute for parameters and FVU): the products sum in another order, and
    Adam carries the differences over the steps.
    """
    acts = activations(samples=480, units=(6, 8, 5))
    cuda = torch.device("cuda")
    for sparsity in ("l1", "batchtopk"):
        crosscoder = Crosscoder(**FAST, sparsity=sparsity, k=3, topk=5)
        on_cpu = crosscoder.fit(acts, context(tmp_path / f"cpu-{sparsity}"))
        # The CPU's checkpoint analysed on CUDA: no training, the same parameters.
        again = Counting(quiet=True, workdir=tmp_path / f"cpu-{sparsity}", device=cuda)
        analysed = crosscoder.fit(acts, again)
        assert again.epochs_run == 0
        for name in ("encoder", "decoder", "loss_history", "threshold", "scale"):
            xr.testing.assert_identical(analysed[name], on_cpu[name])
        for name in ("fvu", "decoder_norm", "relative_norm", "l0"):
            np.testing.assert_allclose(analysed[name], on_cpu[name], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(analysed["topk_value"], on_cpu["topk_value"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(analysed["density"], on_cpu["density"], atol=2 / 480)
        np.testing.assert_array_equal(analysed["latent_class"], on_cpu["latent_class"])
    crosscoder = Crosscoder(**FAST, topk=5)
    on_cpu = crosscoder.fit(acts, context(tmp_path / "cpu-l1"))
    trained = crosscoder.fit(acts, context(tmp_path / "cuda", cuda))
    np.testing.assert_allclose(trained["loss_history"], on_cpu["loss_history"], rtol=1e-3)
    for name in ("decoder", "encoder", "fvu"):
        np.testing.assert_allclose(trained[name], on_cpu[name], atol=1e-3, err_msg=name)
    # A run interrupted on CUDA finishes on the CPU.
    with pytest.raises(KeyboardInterrupt):
        crosscoder.fit(acts, Counting(quiet=True, workdir=tmp_path / "moved", device=cuda, after=2))
    finished = crosscoder.fit(acts, Counting(quiet=True, workdir=tmp_path / "moved", device=CPU))
    np.testing.assert_allclose(finished["decoder"], trained["decoder"], atol=1e-3)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_trains_close_to_fp32(tmp_path, precision):
    acts = activations(samples=480)
    crosscoder = Crosscoder(**{**FAST, "epochs": 8})
    full = crosscoder.fit(acts, context(tmp_path, torch.device("cuda")))
    half = crosscoder.fit(acts, context(tmp_path, torch.device("cuda"), precision))
    assert not bool(half["diverged"]) and np.isfinite(half["decoder"].values).all()
    np.testing.assert_allclose(half["fvu"], full["fvu"], atol=0.05)
    if precision == "fp16":  # the gradient scaler's state travels with the checkpoint
        assert {"scale", "growth_factor"} <= set(checkpoint_of(tmp_path, precision)["scaler"])


def checkpoint_of(workdir: Path, precision: str) -> dict:
    for path in (workdir / "crosscoder").glob("*/checkpoint.pt"):
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if ("scaler" in payload) == (precision == "fp16"):
            return payload
    raise AssertionError(f"no checkpoint for {precision}")


def test_the_precision_joins_the_checkpoint_key_except_fp32():
    # Checkpoints written before precisions existed keep their key.
    survey = cc._Survey("digest", np.ones(2), np.zeros(3))
    crosscoder = Crosscoder(**FAST)
    assert crosscoder._key(survey) == crosscoder._key(survey, "fp32")
    assert len({crosscoder._key(survey, p) for p in ("fp32", "bf16", "fp16")}) == 3
