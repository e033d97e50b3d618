"""Generate the claims tables of the docs from the runs that measured them.

Every example's ``[[claims]]`` are checked by its run (``mergescope run`` writes a
``claims`` group into ``results.nc``). This script keeps the pages honest:

``--record RUNS``
    For every example with a run at ``RUNS/<example stem>``, writes the run's verdicts,
    its date, its wall time and the command that made it to ``docs/claims/<stem>.json``.
(always)
    Rewrites, from those records, every block of a docs page between
    ``<!-- claims: examples/<name>.toml -->`` and ``<!-- end claims -->`` and the page
    ``docs/claims.md`` that lists every example's claims with their last measured state.
(always, too)
    Rewrites every block between ``<!-- summary: examples/<name>.toml -->`` and
    ``<!-- end summary -->`` with the recorded run's ``summary.txt`` (its claims lines left
    out: the claims block shows them), so the result tables on a page are the run's own.
``--check``
    Writes nothing; exits 1 when a page differs from what the records give (the test
    suite runs this check).

Run from the repository root::

    python docs/generate_claims.py --record runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

from mergescope.claims import DOES_NOT_HOLD, claims_of_file, markdown_table, run_verdicts

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RECORDS = DOCS / "claims"
INDEX = DOCS / "claims.md"
BLOCK = re.compile(r"(<!-- claims: (examples/[\w.-]+\.toml) -->\n)(.*?)(<!-- end claims -->)", re.S)
SUMMARY_BLOCK = re.compile(r"(<!-- summary: (examples/[\w.-]+\.toml) -->\n)(.*?)(<!-- end summary -->)", re.S)

#: Examples that finish within a minute on two CPU cores from an empty model cache (their
#: records come from such runs: ``seconds`` + ``model_seconds``); the test suite runs them
#: and checks every claim against its recorded state (tests/test_example_claims.py).
CI_EXAMPLES = ("rebasin-mlp-mnist", "cca-many-3", "thesis-two-models", "weight-matching-batchnorm")


def examples() -> list[Path]:
    return sorted((ROOT / "examples").glob("*.toml"))


def command(stem: str) -> str:
    return f"mergescope run examples/{stem}.toml --out runs/{stem}"


def record(run_dir: Path, example: Path) -> dict[str, object]:
    """What a run measured of an example's claims, with when, how long and how."""
    rows = run_verdicts(run_dir) or []
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    seconds = info.get("seconds") or {}
    finished = datetime.datetime.fromtimestamp((run_dir / "results.nc").stat().st_mtime, tz=datetime.timezone.utc)
    return {
        "example": f"examples/{example.name}",
        "command": command(example.stem),
        "date": finished.date().isoformat(),
        "seconds": round(sum(v for k, v in seconds.items() if k != "models"), 1),
        "model_seconds": round(seconds.get("models", 0.0), 1),
        "cached_steps": sorted(name for name, step in (info.get("steps") or {}).items() if step.get("cached")),
        "mergescope": info.get("mergescope"),
        "claims": rows,
        "summary": summary_lines(run_dir),
    }


def summary_lines(run_dir: Path) -> list[str]:
    """The run's ``summary.txt`` without its claims lines (the claims block shows those)."""
    lines = (run_dir / "summary.txt").read_text(encoding="utf-8").splitlines()
    kept, in_claims = [], False
    for line in lines:
        if line.startswith("claims:"):
            in_claims = True
        elif in_claims and not line.startswith("  "):
            in_claims = False
        if not in_claims:
            kept.append(line)
    return kept


def load_record(stem: str) -> dict | None:
    path = RECORDS / f"{stem}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def block(example: str) -> str:
    """The generated text of a page's claims block for ``example`` (``examples/<name>.toml``)."""
    stem = Path(example).stem
    saved = load_record(stem)
    if saved is None:
        return f"No run of `{example}` has been recorded yet; `{command(stem)}` measures its claims.\n"
    when = f"Measured on {saved['date']} by `{saved['command']}` ({saved['seconds']:g} s of steps"
    if "model_seconds" in saved:
        when += f", {saved['model_seconds']:g} s loading or training the models"
    when += f"; cached: {', '.join(saved['cached_steps'])})" if saved["cached_steps"] else ")"
    return markdown_table(saved["claims"]) + f"\n{when}; generated from the run's `results.nc`.\n"


def summary_block(example: str) -> str:
    """The generated text of a page's summary block: the recorded run's ``summary.txt``, as printed."""
    stem = Path(example).stem
    saved = load_record(stem)
    if saved is None or "summary" not in saved:
        return f"No run of `{example}` has been recorded with its summary yet; `{command(stem)}` prints it.\n"
    fence = "```"
    lines = [f"`summary.txt` of `{saved['command']}` ({saved['date']}), as printed, without its claims lines:", ""]
    return "\n".join([*lines, f"{fence}text", *saved["summary"], fence]) + "\n"


def index() -> str:
    """``docs/claims.md``: every example's claims, their recorded and last measured state."""
    lines = [
        "# Claims",
        "",
        "What the papers behind each example say, and whether the example's run shows it.",
        "Each example carries `[[claims]]` (see [User guide, Claims](user-guide.md#claims));",
        "`mergescope run` checks them into `summary.txt`, the `claims` group of `results.nc`",
        "and the top of `report.html`, and `mergescope claims` lists them.",
        "This page is generated by `python docs/generate_claims.py` from the recorded runs",
        "(`docs/claims/<example>.json`); do not edit it by hand.",
        "",
        f"The examples run by the test suite (each recorded from an empty model cache, training "
        "and steps within a minute on two CPU cores): "
        f"{', '.join(f'`examples/{s}.toml`' for s in CI_EXAMPLES)}. Their claims must evaluate to the state "
        "recorded in the example, so a change that moves a result either way fails the tests.",
        "The other examples are checked by running the command given under each.",
        "",
    ]
    for path in examples():
        claims = claims_of_file(path)
        lines += [f"## `examples/{path.name}`", ""]
        if not claims:
            lines += ["No claims.", ""]
            continue
        saved = load_record(path.stem)
        if saved is None:
            lines += ["| claim | source | the paper | expected | recorded state |", "|---|---|---|---|---|"]
            for c in claims:
                state = c.state if c.state != DOES_NOT_HOLD else f"{c.state}: {c.why}"
                lines.append(f"| {c.name} | {c.source} | {c.says} | {c.expect} | {state} |")
            lines += ["", f"Not measured by a recorded run yet: `{command(path.stem)}`.", ""]
            continue
        lines += [block(f"examples/{path.name}").rstrip("\n"), ""]
        measured = {row["name"]: row for row in saved["claims"]}
        stale = [c.name for c in claims if c.name not in measured]
        if stale:
            lines += [f"Claims added since that run, not yet measured: {', '.join(stale)}.", ""]
        if path.stem in CI_EXAMPLES:
            lines += ["Checked by the test suite on every change.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def render_pages() -> dict[Path, str]:
    """Every docs page whose text changes when its claims blocks are regenerated, with the new text."""
    changed = {}
    for page in sorted(DOCS.rglob("*.md")):
        if page == INDEX:
            continue
        text = page.read_text(encoding="utf-8")
        new = BLOCK.sub(lambda m: m.group(1) + block(m.group(2)) + m.group(4), text)
        new = SUMMARY_BLOCK.sub(lambda m: m.group(1) + summary_block(m.group(2)) + m.group(4), new)
        if new != text:
            changed[page] = new
    new_index = index()
    if not INDEX.is_file() or INDEX.read_text(encoding="utf-8") != new_index:
        changed[INDEX] = new_index
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", type=Path, metavar="RUNS", help="record the runs found under RUNS/<stem>")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a page is out of date")
    args = parser.parse_args(argv)
    if args.record and not args.check:
        RECORDS.mkdir(exist_ok=True)
        for path in examples():
            run_dir = args.record / path.stem
            if not (run_dir / "results.nc").is_file() or not claims_of_file(path):
                continue
            if not (run_dir / "report.html").is_file():  # written last: the run did not finish
                print(f"skipped {run_dir}: the run did not finish")
                continue
            if not run_verdicts(run_dir):
                print(f"skipped {run_dir}: run before the example had claims; run it again to measure them")
                continue
            saved = record(run_dir, path)
            (RECORDS / f"{path.stem}.json").write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
            print(f"recorded {run_dir} -> docs/claims/{path.stem}.json")
    changed = render_pages()
    for page, text in changed.items():
        if args.check:
            print(f"{page.relative_to(ROOT)} is out of date: run python docs/generate_claims.py", file=sys.stderr)
        else:
            page.write_text(text, encoding="utf-8")
            print(f"wrote {page.relative_to(ROOT)}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
