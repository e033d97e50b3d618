"""Every example pipeline reads cleanly and has a page that shows what it gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergescope import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
PAGES = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").rglob("*.md")))


def test_there_are_examples():
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_an_example_reads_and_a_page_names_it(path):
    # Reading builds and validates every component; inputs made by a script (user
    # checkpoints, image folders) are opened only when the pipeline runs.
    pipeline = load_pipeline(path)
    assert pipeline.steps, f"{path.name} has no [[steps]]"
    assert f"examples/{path.name}" in PAGES, f"no page under docs/ names examples/{path.name}"
