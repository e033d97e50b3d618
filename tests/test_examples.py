"""Every example pipeline reads cleanly and has a page that shows what it gives."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mergescope import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
PAGES = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").rglob("*.md")))


def test_there_are_examples():
    assert len(EXAMPLES) >= 10


def readable_copy(path: Path, root: Path) -> Path:
    """``path`` copied under ``root/examples`` with empty stand-ins for its checkpoint files.

    Reading a pipeline checks that checkpoints exist; the user-model examples name files
    that ``examples/user-models/prepare.py`` writes, relative to the example.
    """
    copy = root / "examples" / path.name
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    for model in tomllib.loads(copy.read_text(encoding="utf-8")).get("models", []):
        if "checkpoint" in model:
            stand_in = copy.parent / model["checkpoint"]
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.touch()
    return copy


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_an_example_reads_and_a_page_names_it(path, tmp_path):
    # Reading builds and validates every component; the inputs themselves (checkpoints,
    # image folders) are opened only when the pipeline runs.
    pipeline = load_pipeline(readable_copy(path, tmp_path))
    assert pipeline.steps, f"{path.name} has no [[steps]]"
    assert f"examples/{path.name}" in PAGES, f"no page under docs/ names examples/{path.name}"
