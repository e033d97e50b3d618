"""The crosscoder study's page shows exactly what its recorded run measured."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from mergescope.claims import claims_of_file

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "generate_crosscoder_study", ROOT / "docs" / "generate_crosscoder_study.py"
)
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def record() -> dict:
    return json.loads(study.RECORD.read_text(encoding="utf-8"))


def test_the_page_is_what_the_record_gives():
    assert study.main(["--check"]) == 0, "run python docs/generate_crosscoder_study.py"


def test_the_record_holds_every_claim_of_its_example_and_the_page_shows_their_states():
    saved = record()
    claims = [c.name for c in claims_of_file(ROOT / saved["example"])]
    assert [row["name"] for row in saved["run"]["claims"]] == claims
    page = study.PAGE.read_text(encoding="utf-8")
    for row in saved["run"]["claims"]:
        if row["name"].startswith(("a-", "b-", "c-", "d-", "e-")):
            assert f"| {row['state']} |" in page or f"| {row['state']} (" in page


def test_every_number_of_the_accuracy_table_is_the_records():
    saved = record()
    page = study.PAGE.read_text(encoding="utf-8")
    t = saved["tasks"]
    for model, row, mean in zip(t["models"], t["accuracy"], t["average"]):
        line = f"| {model} | " + " | ".join(f"{100 * v:.1f}" for v in row) + f" | {100 * mean:.1f} |"
        assert line in page, line


def test_a_changed_number_is_caught():
    saved = record()
    saved["tasks"]["accuracy"][0][0] = (saved["tasks"]["accuracy"][0][0] or 0) + 0.1
    assert study.render(saved) != study.render(record())
