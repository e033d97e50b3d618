"""The examples' claims: the cheap examples run here and must show what they record.

An example that finishes within a minute on two CPU cores is run by the test suite; every
claim it carries must evaluate to the state recorded in the example (``holds``, or ``does
not hold`` where its page says why), so a change that moves a result either way fails
here and gets looked at. Its measured values must also be those of the recorded run that
the docs pages show (``docs/claims/<example>.json``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from mergescope import load_pipeline, run
from mergescope.claims import claims_of_file, format_number, run_verdicts

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


def _generator():
    spec = importlib.util.spec_from_file_location("generate_claims", ROOT / "docs" / "generate_claims.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("generate_claims", module)
    spec.loader.exec_module(module)
    return module


generate = _generator()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_states_its_claims(path):
    claims = claims_of_file(path)
    assert claims, f"{path.name} has no [[claims]]: say what its paper claims and whether the run shows it"


def test_the_pages_show_the_recorded_runs():
    # Every claims block of a page, and docs/claims.md, is what the records generate.
    assert generate.render_pages() == {}, "run: python docs/generate_claims.py"


@pytest.mark.parametrize("stem", generate.CI_EXAMPLES)
def test_an_example_run_here_was_recorded_within_a_minute_from_an_empty_cache(stem):
    # Its record comes from a run that trained its models too: steps and models together
    # took at most a minute on two cores, so the suite can afford it.
    saved = generate.load_record(stem)
    assert saved is not None, f"no record of {stem}: python docs/generate_claims.py --record runs"
    assert not saved["cached_steps"] and saved["seconds"] + saved["model_seconds"] <= 60


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory):
    """Each example the suite runs, run once into a directory of its own."""
    out = tmp_path_factory.mktemp("examples")
    for stem in generate.CI_EXAMPLES:
        run(load_pipeline(ROOT / "examples" / f"{stem}.toml"), out / stem, quiet=True)
    return out


@pytest.mark.parametrize("stem", generate.CI_EXAMPLES)
def test_a_cheap_example_shows_what_it_records(stem, example_runs):
    claims = {c.name: c for c in claims_of_file(ROOT / "examples" / f"{stem}.toml")}
    rows = run_verdicts(example_runs / stem)
    assert [r["name"] for r in rows] == list(claims)
    for row in rows:
        assert not row["problem"], f"{stem}: {row['name']}: {row['problem']}"
        assert row["state"] == claims[row["name"]].state, (
            f"{stem}: claim {row['name']!r} now {row['state']} (measured {row['measured']:.4g}, "
            f"expected {row['expect']}); it is recorded as {claims[row['name']].state!r}"
        )
    # What the pages show is what this run measures.
    recorded = {r["name"]: r for r in generate.load_record(stem)["claims"]}
    for row in rows:
        assert format_number(row["measured"]) == format_number(recorded[row["name"]]["measured"]), (
            f"{stem}: {row['name']} measured {row['measured']!r}, the docs show {recorded[row['name']]['measured']!r}; "
            "re-record: python docs/generate_claims.py --record runs"
        )


def test_a_broken_weight_matching_breaks_a_claim(tmp_path, monkeypatch):
    # Weight matching that keeps every unit where it is (the identity) must not pass the
    # Git Re-Basin claims: the check can fail, and fails for this kind of defect.
    from mergescope_plugins import weight_matching

    def identity(score, maximize=True):
        n = np.asarray(score).shape[0]
        return np.arange(n), np.arange(n)

    monkeypatch.setattr(weight_matching, "linear_sum_assignment", identity)
    run(load_pipeline(ROOT / "examples" / "rebasin-mlp-mnist.toml"), tmp_path / "broken", quiet=True)
    states = {r["name"]: r["state"] for r in run_verdicts(tmp_path / "broken")}
    assert states["weight-matching-barrier"] == "does not hold"
    assert states["weight-matching-midpoint"] == "does not hold"
    assert states["activation-matching-barrier"] == "holds"


def test_summary_blocks_show_the_run_summary_without_its_claims(tmp_path):
    (tmp_path / "summary.txt").write_text(
        "merge (interpolation): accuracy 0.900\n"
        "claims: 1 of 2 hold; 2 as recorded\n"
        "  a: holds: measured 0.9\n"
        "  b: does not hold: measured 0.1\n"
        "tasks (accuracy %):\n"
        "  model  low\n",
        encoding="utf-8",
    )
    assert generate.summary_lines(tmp_path) == [
        "merge (interpolation): accuracy 0.900",
        "tasks (accuracy %):",
        "  model  low",
    ]
    assert "No run of `examples/none.toml` has been recorded" in generate.summary_block("examples/none.toml")
