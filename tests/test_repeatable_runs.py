"""Runs that can be repeated from any directory, into an output directory that is checked and locked.

One small project is written in tmp_path: an image folder (scikit-learn's 8x8 digits,
2 classes x 4 images), two MLP checkpoints, and a pipeline file in a sub-folder that
names both with relative paths (``../images``, ``../models/a.pt``). Every run takes a
second or two.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mergescope import get_registry, run
from mergescope.cli import main
from mergescope.errors import ConfigError
from mergescope.keys import path_identity
from mergescope.pipeline import Pipeline, load_pipeline
from mergescope.storage import LOCK_FILE, locked_dir

SIZE, CLASSES, PER_CLASS, HIDDEN = 8, 2, 4, [16, 16]

PIPELINE = f"""
seed = 0

[data]
use = "imagefolder"
root = "../images"
image_size = {SIZE}
resize = {SIZE}

[activations]
layers = ["relu1"]
batch_size = 8

[[models]]
name = "a"
use = "mlp"
hidden = {HIDDEN}
checkpoint = "../models/a.pt"

[[models]]
name = "b"
use = "mlp"
hidden = {HIDDEN}
checkpoint = "../models/b.pt"

[[steps]]
use = "interpolation"
models = ["a", "b"]
alphas = [0.0, 1.0]

[[steps]]
use = "kendall-tau"
models = ["a", "b"]
allow_unaligned = true
"""


def _project(root: Path, hidden: list[int] = HIDDEN) -> Path:
    """Write the project under ``root``; return the pipeline file, ``root/p/pipeline.toml``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).astype(np.uint8)
    for digit in range(CLASSES):
        folder = root / "images" / f"digit-{digit}"
        folder.mkdir(parents=True)
        for row in np.flatnonzero(digits.target == digit)[:PER_CLASS]:
            Image.fromarray(images[row]).convert("RGB").save(folder / f"{row:04d}.png")
    (root / "models").mkdir()
    mlp = get_registry().get("architecture", "mlp")(hidden=hidden)
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed)
        torch.save(mlp.build((3, SIZE, SIZE), CLASSES).state_dict(), root / "models" / f"{name}.pt")
    (root / "p").mkdir()
    path = root / "p" / "pipeline.toml"
    path.write_text(PIPELINE)
    return path


def _cached(out: Path) -> dict[str, bool]:
    """Which steps the last run into ``out`` took from the cache (run.json)."""
    steps = json.loads((out / "run.json").read_text())["steps"]
    return {name: info["cached"] for name, info in steps.items()}


def _folders(out: Path) -> dict[str, list[str]]:
    """The cached results of a run directory: its step folders and its recordings."""
    return {part: sorted(p.name for p in (out / part).iterdir() if p.is_dir()) for part in ("steps", "activations")}


def _log(out: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in (out / "run.log").read_text().splitlines()]


@pytest.fixture
def project(tmp_path):
    return _project(tmp_path / "project")


def test_the_same_pipeline_from_its_folder_its_parent_and_by_absolute_path_reuses_every_step(
    project, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "runs" / "out"
    monkeypatch.chdir(project.parent)
    assert main(["--quiet", "run", "pipeline.toml", "--out", str(out)]) == 0
    assert _cached(out) == {"interpolation": False, "kendall-tau": False}
    first = _folders(out)

    monkeypatch.chdir(project.parent.parent)
    assert main(["--quiet", "run", "p/pipeline.toml", "--out", str(out)]) == 0
    assert _cached(out) == {"interpolation": True, "kendall-tau": True}

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["--quiet", "run", str(project), "--out", str(out)]) == 0
    assert _cached(out) == {"interpolation": True, "kendall-tau": True}

    # One set of step folders and one recording, whatever the working directory was.
    assert _folders(out) == first
    assert [p.split("-")[0] for p in first["steps"]].count("interpolation") == 1
    assert len(first["activations"]) == 1
    done_before = [r["message"] for r in _log(out) if "done before" in r["message"]]
    assert len(done_before) == 4  # two steps, two repeated runs


def test_the_saved_pipeline_holds_canonical_paths_and_reruns_from_another_directory(
    project, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    monkeypatch.chdir(project.parent)
    assert main(["--quiet", "run", "pipeline.toml", "--out", str(out)]) == 0
    saved = (out / "pipeline.toml").read_text()
    root = project.parent.parent.resolve()
    assert f'root = "{root / "images"}"' in saved
    assert f'checkpoint = "{root / "models" / "a.pt"}"' in saved
    assert ".." not in saved

    # The saved file, copied anywhere and run from anywhere: the same keys, so every step is reused ...
    copy = tmp_path / "elsewhere" / "again.toml"
    copy.parent.mkdir()
    copy.write_text(saved)
    monkeypatch.chdir(copy.parent)
    assert main(["--quiet", "run", "again.toml", "--out", str(out)]) == 0
    assert _cached(out) == {"interpolation": True, "kendall-tau": True}
    # ... and into a fresh directory it runs as it is.
    assert main(["--quiet", "run", "again.toml", "--out", "fresh"]) == 0
    assert (copy.parent / "fresh" / "results.nc").is_file()


def test_a_pipeline_composed_in_python_takes_relative_paths_from_the_working_directory(project, tmp_path, monkeypatch):
    # from_toml without base_dir keeps "../images" and "../models/a.pt" relative; run() resolves
    # them against the working directory, so from project/p they mean what the file means.
    monkeypatch.chdir(project.parent)
    pipeline = Pipeline.from_toml(PIPELINE)
    assert str(pipeline.models[0].checkpoint) == "../models/a.pt" and pipeline.data.root == "../images"
    out = tmp_path / "out"
    run(pipeline, out, quiet=True)
    assert ".." not in (out / "pipeline.toml").read_text()
    # The same keys as the file read from elsewhere: nothing runs again.
    monkeypatch.chdir(tmp_path)
    run(load_pipeline(project), out, quiet=True)
    assert _cached(out) == {"interpolation": True, "kendall-tau": True}


def test_editing_a_file_of_an_image_folder_changes_the_keys_of_the_steps_that_read_it(project, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(load_pipeline(project), out, quiet=True)
    image = next((project.parent.parent / "images" / "digit-0").iterdir())
    Image.new("RGB", (SIZE, SIZE), color=(255, 255, 255)).save(image)
    run(load_pipeline(project), out, quiet=True)
    assert _cached(out) == {"interpolation": False, "kendall-tau": False}
    assert len([p for p in _folders(out)["steps"] if p.startswith("interpolation-")]) == 2


def test_path_identity_of_files_and_folders(tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x.bin").write_bytes(b"12345")
    (folder / "y.bin").write_bytes(b"1")
    first = path_identity(folder)
    assert first["files"] == 2 and path_identity(folder) == first
    assert path_identity(str(folder)) == first
    assert path_identity(folder / "y.bin") == {"file": [1, (folder / "y.bin").stat().st_mtime_ns]}
    # Metadata, not content: a rename inside the folder is another identity ...
    (folder / "y.bin").rename(folder / "z.bin")
    renamed = path_identity(folder)
    assert renamed != first
    # ... and so is a new modification time of unchanged bytes.
    stat = (folder / "z.bin").stat()
    os.utime(folder / "z.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
    assert path_identity(folder) != renamed
    assert path_identity(tmp_path / "missing") == {"missing": True}


# -- --out checked before anything else -------------------------------------------------


def _one_paragraph(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("mergescope: error: ") and lines[1].startswith("(run with --debug")
    return lines[0]


def test_out_that_is_a_file_is_one_paragraph_and_exit_2(project, tmp_path, capsys):
    out = tmp_path / "results.txt"
    out.write_text("not a folder")
    assert main(["run", str(project), "--out", str(out)]) == 2
    message = _one_paragraph(capsys.readouterr().err)
    assert str(out) in message and "is an existing file, not a folder" in message
    assert out.read_text() == "not a folder"


def test_out_that_cannot_be_created_is_one_paragraph_and_exit_2(project, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"  # a folder inside a file: refused even for root
    assert main(["run", str(project), "--out", str(out)]) == 2
    message = _one_paragraph(capsys.readouterr().err)
    assert str(out) in message and "cannot be created" in message


def test_out_that_is_not_writable_is_one_paragraph_and_exit_2_simulated(project, tmp_path, monkeypatch, capsys):
    # Simulated: os.access is made to say "not writable" for this folder. This proves the
    # check runs before run.log is opened and how it is reported, not that os.access sees a
    # read-only folder (the next test does that, where it can).
    import mergescope.storage

    out = tmp_path / "read-only"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(mergescope.storage.os, "access", lambda p, mode: False if Path(p) == out else real(p, mode))
    assert main(["run", str(project), "--out", str(out)]) == 2
    message = _one_paragraph(capsys.readouterr().err)
    assert str(out) in message and "is not writable" in message
    assert not (out / "run.log").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes to read-only folders")
def test_out_that_is_read_only_is_one_paragraph_and_exit_2(project, tmp_path, capsys):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(["run", str(project), "--out", str(out)]) == 2
    finally:
        out.chmod(0o755)
    message = _one_paragraph(capsys.readouterr().err)
    assert str(out) in message and "is not writable" in message


# -- errors reach run.log ---------------------------------------------------------------------


def test_an_error_at_model_load_time_is_in_run_log(tmp_path, capsys):
    project = _project(tmp_path / "project", hidden=[8])  # checkpoints of another width than the pipeline's
    out = tmp_path / "out"
    assert main(["run", str(project), "--out", str(out)]) == 2
    message = _one_paragraph(capsys.readouterr().err)
    last = _log(out)[-1]
    assert last["level"] == "ERROR" and last["message"] == "error: " + message.removeprefix("mergescope: error: ")
    assert "[[models]] #1 (name = 'a'), key 'checkpoint'" in last["message"]


def test_an_error_while_parsing_is_in_run_log(project, tmp_path, capsys):
    project.write_text(PIPELINE.replace("alphas", "alpahs"))
    out = tmp_path / "out"
    assert main(["run", str(project), "--out", str(out)]) == 2
    assert "unknown option 'alpahs'" in _log(out)[-1]["message"]


# -- one run at a time ----------------------------------------------------------------------

_HOLDER = textwrap.dedent(
    """
    import sys
    from mergescope.storage import locked_dir

    with locked_dir(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()
    """
)


def test_a_second_run_into_a_locked_directory_is_refused_and_a_killed_holder_does_not_block(project, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert main(["run", str(project), "--out", str(out)]) == 2
        message = _one_paragraph(capsys.readouterr().err)
        assert str(out) in message and f"pid {holder.pid}" in message and "in use by another run" in message
        assert not (out / "results.nc").exists()
        assert "in use by another run" in _log(out)[-1]["message"]
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the OS releases it
        holder.wait()
    assert (out / LOCK_FILE).read_text().strip() == str(holder.pid)  # a stale lock file ...
    assert main(["--quiet", "run", str(project), "--out", str(out)]) == 0  # ... does not block
    assert (out / "results.nc").is_file()


def test_the_lock_is_per_open_file_and_released_on_errors(tmp_path):
    # The second locked_dir opens the file again: refused as another process would be.
    with (
        locked_dir(tmp_path / "out"),
        pytest.raises(ConfigError, match=f"pid {os.getpid()}"),
        locked_dir(tmp_path / "out"),
    ):
        pass  # pragma: no cover
    with pytest.raises(RuntimeError), locked_dir(tmp_path / "out"):
        raise RuntimeError("a failing run")
    with locked_dir(tmp_path / "out"):  # released both times
        pass
