"""bench/device_check.py: its answer without the device, its CPU self-test, and its comparisons."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "device_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("device_check", module)
    spec.loader.exec_module(module)
    return module


check = _load_script()


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # One thread: on a small shared machine, more threads than free cores make every
    # small kernel wait on the others (this is the CPU against itself: results do not change).
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env.pop("MERGESCOPE_CACHE", None)  # the script keeps its own model caches
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _missing_device() -> tuple[str, str] | None:
    if not torch.cuda.is_available():
        return "cuda", "CUDA"
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        return "mps", "MPS"
    return None


def test_without_the_device_it_says_so_and_exits_0():
    missing = _missing_device()
    if missing is None:
        pytest.skip("this machine has both CUDA and MPS")
    spec, name = missing
    done = _run("--device", spec, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith(f"no {name} device here: ")
    assert lines[0].endswith("nothing to check")
    assert f"device '{spec}' is not available here" in lines[0]


def _tables(stdout: str) -> dict[str, dict[str, list[str]]]:
    """Pipeline -> quantity label -> the row's cells, from the script's comparison tables."""
    tables: dict[str, dict[str, list[str]]] = {}
    current = None
    labels = sorted((q.label for q in check.QUANTITIES.values()), key=len, reverse=True)
    for line in stdout.splitlines():
        title = re.match(r"^(\w+): (\d+) variables compared", line)
        if title:
            current = tables.setdefault(title.group(1), {})
            continue
        if current is None or not line.startswith("  "):
            continue
        label = next((lab for lab in labels if line[2:].startswith(lab + " ")), None)
        if label is not None:
            current[label] = line[2 + len(label) :].split()
    return tables


def test_cpu_against_itself_compares_every_quantity():
    done = _run("--device", "cpu", "--quick", timeout=600)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "FAIL" not in out
    assert "--quick: both pipelines shrunk through the Python API" in out
    assert "all comparisons within tolerance" in out
    tables = _tables(out)
    assert set(tables) == {"demo", "kinds"}, out
    clip_delta_left_out = "clip-delta: left out" in out
    expected = {q.label for key, q in check.QUANTITIES.items() if key != "other"}
    if clip_delta_left_out:
        expected.discard(check.QUANTITIES["clip-delta"].label)
    assert set(tables["kinds"]) >= expected, sorted(expected - set(tables["kinds"]))
    for name, rows in tables.items():
        for label, cells in rows.items():
            assert cells[-1] == "ok", (name, label, cells)
            assert int(cells[0]) > 0, (name, label, cells)
    assert "registered step components the 'kinds' pipeline does not run" not in out
    # both sides timed, step by step
    assert re.search(r"^  kinds weight-matching|^  kinds wm ", out, re.M)
    assert re.search(r"^  demo run \(wall\)\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", out, re.M)
    assert "for docs/performance.md:" in out
    assert re.search(r"^\| kinds \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+x \| (\d+) of \1 \|$", out, re.M)


# -- the comparisons themselves (the self-test above only ever sees equal runs) ---------


def _verdict(quantity: str, cpu, dev, precision: str = "fp32", **extra):
    return check.judge(check.Leaf("x", quantity, np.asarray(cpu), np.asarray(dev), **extra), precision)


def test_permutations_allow_a_stated_fraction_of_flips():
    eye = np.eye(100)
    one_swap = eye[[1, 0, *range(2, 100)]]
    assert check.is_permutation(eye) and check.is_permutation(one_swap)
    assert _verdict("permutations", eye, one_swap).ok  # 2 of 100 units, 2 % allowed
    three_swaps = eye[[1, 0, 3, 2, 5, 4, *range(6, 100)]]
    assert not _verdict("permutations", eye, three_swaps).ok
    assert _verdict("permutations", eye, three_swaps, precision="bf16").ok  # 10 % at bf16


def test_topk_sets_ignore_the_order_of_equal_members():
    cpu = np.array([[1, 2], [3, 4], [5, 6]])  # (rank, unit)
    reordered = cpu[[1, 0, 2]]
    assert _verdict("topk-ids", cpu, reordered, rank_axis=0).measure == 0
    other = cpu.copy()
    other[0, 0] = 9
    verdict = _verdict("topk-ids", cpu, other, rank_axis=0)
    assert verdict.measure == pytest.approx(1 / 6) and verdict.ok  # one entry may always differ
    other[0, 1] = 9
    verdict = _verdict("topk-ids", cpu, other, rank_axis=0)
    assert verdict.measure == pytest.approx(2 / 6) and not verdict.ok


def test_accuracies_in_images():
    assert _verdict("accuracy", 0.5, 0.502, images=1000).ok  # 2 images
    assert _verdict("accuracy", 0.5, 0.505, images=1000).ok  # 5 images = 0.5 %
    assert not _verdict("accuracy", 0.5, 0.507, images=1000).ok
    assert _verdict("accuracy", 0.5, 0.52, images=100, precision="bf16").ok  # 2 images always allowed


def test_scaled_and_shared_tolerances():
    cpu = np.linspace(-1, 1, 50)
    assert _verdict("weights", cpu, cpu + 0.019).ok
    assert not _verdict("weights", cpu, cpu + 0.021).ok
    bumped = cpu.copy()
    bumped[:5] += 0.5  # 10 % of units off, as a near-tie can do to CLIP-delta
    assert _verdict("clip-delta", cpu, bumped).ok
    bumped[:6] += 0.5
    assert not _verdict("clip-delta", cpu, bumped).ok


def test_missing_values_shapes_and_labels():
    assert _verdict("loss", [np.nan, 1.0], [np.nan, 1.0]).ok
    assert not _verdict("loss", [np.nan, 1.0], [0.0, 1.0]).ok
    assert not _verdict("activations", np.zeros(3), np.zeros(4)).ok
    assert _verdict("labels", np.array(["a", "b"]), np.array(["a", "b"])).ok
    assert not _verdict("labels", np.array([1, 2]), np.array([1, 3])).ok


def test_every_results_variable_has_a_quantity():
    assert check.classify_result("weight-matching", "aligner", "transform", np.eye(3)) == "permutations"
    assert check.classify_result("cca", "aligner", "transform", np.full((3, 3), 0.5)) == "cca"
    assert check.classify_result("lasso", "aligner", "r2", np.zeros(2)) == "lasso-fit"
    assert check.classify_result("lasso", "aligner", "coefficient", np.zeros(2)) == "lasso-maps"
    assert check.classify_result("crosscoder", "differ", "fvu", np.zeros(2)) == "crosscoder"
    assert check.classify_result("crosscoder", "differ", "decoder_norm", np.zeros(2)) == "crosscoder-latents"
    assert check.classify_result("repair", "merger", "merged_accuracy", np.zeros(1)) == "accuracy"
    assert check.classify_result("kendall-tau", "metric", "kendall_tau_mean", np.zeros(1)) == "similarity"
    assert check.classify_result("top-k", "visualizer", "topk_sample", np.zeros(1, int)) == "topk-ids"
    assert check.classify_result("ties", "merger", "reference", np.array("a")) == "labels"
    assert check.classify_result("new-plugin", "metric", "something_new", np.zeros(1)) == "other"


def test_a_run_that_breaks_fails_the_check_and_the_next_pipeline_still_runs(monkeypatch, capsys):
    seen = []

    def check_pipeline(name, *args):
        seen.append(name)
        if name == "demo":
            raise RuntimeError("a kernel the device lacks")
        return 0, [], [name, "0.0", "0.0", "1.0", "1.0", "1.00x", "3 of 3"]

    monkeypatch.setattr(check, "check_pipeline", check_pipeline)
    assert check.main(["--device", "cpu", "--quick"]) == 1
    out = capsys.readouterr().out
    assert seen == ["demo", "kinds"]
    assert "demo: FAIL, the check stopped: RuntimeError: a kernel the device lacks" in out
    assert "| kinds | 0.0 | 0.0 | 1.0 | 1.0 | 1.00x | 3 of 3 |" in out
    assert out.rstrip().endswith("all comparisons within tolerance; the check of demo stopped with an error")
