"""The ``mergescope`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import ConfigError, MergescopeError

__all__ = ["main", "DEMO_PIPELINE"]

#: The embedded default pipeline that ``mergescope demo`` runs.
DEMO_PIPELINE = "demo.toml"


#: mergescope.devices.PRECISIONS, written out so that parsing the command line does not import torch.
_PRECISIONS = ("fp32", "bf16", "fp16")


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default=None,
        help="where models run: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps; "
        "overrides the pipeline's 'device' (default: auto)",
    )
    p.add_argument(
        "--precision",
        default=None,
        choices=_PRECISIONS,
        help="precision of forward passes (recording, evaluation): fp32, bf16 or fp16 (not on the CPU); "
        "overrides the pipeline's 'precision' (default: fp32)",
    )
    p.add_argument(
        "--workers",
        default=None,
        type=_whole_number,
        help="data-loading worker processes (image decoding in parallel with the models); "
        "overrides the pipeline's [loader] workers (default: 0)",
    )


def _whole_number(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _step_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected step names separated by commas, got {text!r}")
    return names


def _add_run_flags(p: argparse.ArgumentParser, default_out: str | None) -> None:
    p.add_argument("--out", required=default_out is None, default=default_out, help="run directory")
    p.add_argument("--force", action="store_true", help="redo every step even when cached")
    p.add_argument(
        "--steps",
        default=None,
        type=_step_names,
        metavar="NAME[,NAME...]",
        help="run only these steps and the earlier ones they need; other steps' cached results are shown too, "
        "tasks and claims wait for a whole run",
    )
    _add_device_flags(p)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergescope", description="Merge neural networks and see what merging does to their features."
    )
    parser.add_argument("--version", action="version", version=f"mergescope {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true", help="no progress bars, errors only")
    noise.add_argument("-v", "--verbose", action="store_true", help="log every step")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="run a pipeline file", description="Run a TOML pipeline and write DIR/results.nc.")
    p.add_argument("pipeline", type=Path, help="pipeline TOML file")
    _add_run_flags(p, None)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("demo", help="run the embedded offline demo", description="Run the embedded default pipeline.")
    _add_run_flags(p, "runs/demo")
    p.add_argument("--show", action="store_true", help="print the demo pipeline and exit")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "collect",
        help="record a pipeline's activations and statistics",
        description="Record [activations] layers of every model of a pipeline into an activation store "
        "(resumes when interrupted). --shard i/n records one of n slices of the dataset.",
    )
    p.add_argument("pipeline", type=Path, help="pipeline TOML file")
    p.add_argument("--out", required=True, type=Path, help="store directory")
    p.add_argument("--shard", default="0/1", help="i/n: record the i-th of n slices (default 0/1)")
    p.add_argument(
        "--pairs",
        default="",
        help="model:reference pairs, comma-separated (e.g. b:a,c:a): also record their cross co-moments at "
        "every layer, what activation matching and CCA read",
    )
    p.add_argument(
        "--positions", action="store_true", help="moments and co-moments over every spatial position of a map"
    )
    p.add_argument(
        "--statistics-only", action="store_true", help="keep the statistics only, not the activations themselves"
    )
    _add_device_flags(p)
    p.set_defaults(func=_cmd_collect)

    p = sub.add_parser(
        "claims",
        help="list pipelines' claims and, where a run exists, their state",
        description=(
            "List the [[claims]] of pipeline files (default: examples/*.toml) with the state each records and, "
            "where RUNS/<file stem>/results.nc exists, the state and value that run measured. Exits 1 when a "
            "run disagrees with a recorded state."
        ),
    )
    p.add_argument("pipelines", nargs="*", type=Path, metavar="PIPELINE", help="pipeline TOML files")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="folder of run directories (default: ./runs)")
    p.set_defaults(func=_cmd_claims)

    p = sub.add_parser("plugins", help="list plugins and their components", description="List loaded plugins.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser(
        "registry", help="check or write registry.toml", description="Compare registry.toml with the loaded plugins."
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--check", action="store_true", help="exit 1 when the file disagrees with the plugins")
    g.add_argument("--write", action="store_true", help="rewrite the file from the plugins")
    p.add_argument("--file", type=Path, default=Path("registry.toml"), help="catalogue path (default: ./registry.toml)")
    p.set_defaults(func=_cmd_registry)
    return parser


def _logging(args: argparse.Namespace, out_dir: Path | None = None) -> None:
    level = logging.WARNING if args.quiet else logging.INFO if args.verbose else logging.WARNING
    logger = logging.getLogger("mergescope")
    logger.setLevel(logging.INFO)
    for old in [h for h in logger.handlers if getattr(h, "_mergescope_cli", False)]:
        logger.removeHandler(old)
        old.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    console._mergescope_cli = True  # type: ignore[attr-defined]
    logger.addHandler(console)
    if out_dir is not None:  # checked by _out_dir: a folder that exists and is writable
        # A structured, append-only record of every run in this directory.
        try:
            handler = logging.FileHandler(out_dir / "run.log", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot write {str(out_dir / 'run.log')!r}: {exc.strerror or exc}", where="--out"
            ) from None
        handler.setFormatter(
            logging.Formatter('{"time": "%(asctime)s", "level": "%(levelname)s", "message": %(msg_json)s}')
        )
        handler.addFilter(_JsonMessage())
        handler._mergescope_cli = True  # type: ignore[attr-defined]
        handler._mergescope_run_log = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def _out_dir(value: str | Path) -> Path:
    """``--out``, checked before anything else: a folder that exists (created here) and is writable."""
    from .storage import writable_dir

    return writable_dir(Path(value), what="--out")


def _to_run_log(message: str) -> None:
    """Log ``message`` as an error to ``run.log`` only (the console has its own paragraph)."""
    logger = logging.getLogger("mergescope")
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, (), None)
    for handler in logger.handlers:
        if getattr(handler, "_mergescope_run_log", False):
            handler.handle(record)


def _close_run_log() -> None:
    logger = logging.getLogger("mergescope")
    for handler in [h for h in logger.handlers if getattr(h, "_mergescope_run_log", False)]:
        logger.removeHandler(handler)
        handler.close()


class _JsonMessage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg_json = json.dumps(record.getMessage())
        return True


def _run(pipeline, args: argparse.Namespace) -> int:
    from .report import REPORT_FILE
    from .runner import run

    result = run(
        pipeline,
        args.out,
        force=args.force,
        quiet=args.quiet,
        device=args.device,
        precision=args.precision,
        workers=args.workers,
        steps=args.steps,
    )
    if not args.quiet:
        print(result.summary, end="")
        print(f"results: {result.out_dir / 'results.nc'}")
        print(f"report: {result.out_dir / REPORT_FILE}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import load_pipeline

    _logging(args, _out_dir(args.out))
    return _run(load_pipeline(args.pipeline), args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .pipeline import Pipeline

    text = resources.files("mergescope").joinpath("pipelines").joinpath(DEMO_PIPELINE).read_text(encoding="utf-8")
    if args.show:
        print(text, end="")
        return 0
    _logging(args, _out_dir(args.out))
    return _run(Pipeline.from_toml(text, source=f"<embedded {DEMO_PIPELINE}>"), args)


def _cmd_collect(args: argparse.Namespace) -> int:
    from .pipeline import load_pipeline
    from .runner import collect_activations

    try:
        i, n = (int(part) for part in args.shard.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like i/n (e.g. 0/4), got {args.shard!r}") from None
    pairs = [tuple(pair.split(":")) for pair in args.pairs.split(",") if pair]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise ConfigError(f"--pairs must look like model:reference[,model:reference...], got {args.pairs!r}")
    _logging(args, _out_dir(args.out))
    store = collect_activations(
        load_pipeline(args.pipeline),
        args.out,
        shard=(i, n),
        quiet=args.quiet,
        device=args.device,
        precision=args.precision,
        workers=args.workers,
        pairs=[(a, b) for a, b in pairs],
        positions=args.positions,
        keep_activations=not args.statistics_only,
    )
    if not args.quiet:
        print(f"{store.info['samples']} samples of {', '.join(store.models)} recorded in {args.out}")
    return 0


def _cmd_claims(args: argparse.Namespace) -> int:
    from .claims import claims_of_file, format_number, run_verdicts

    paths = args.pipelines or sorted(Path("examples").glob("*.toml"))
    if not paths:
        raise ConfigError("no pipeline files given and none under ./examples; name them: mergescope claims FILE ...")
    disagree = 0
    for path in paths:
        claims = claims_of_file(path)
        run_dir = args.runs / path.stem
        measured = {row["name"]: row for row in run_verdicts(run_dir) or []}
        ran = f"run: {run_dir}" if (run_dir / "results.nc").is_file() else f"no run at {run_dir}"
        print(f"{path} ({len(claims)} claims; {ran})")
        for claim in claims:
            row = measured.get(claim.name)
            if row is None:
                now = "not measured"
            else:
                now = f"this run: {row['state']}, measured {format_number(row['measured'])}"
                if row["problem"]:
                    now = f"this run: cannot be evaluated: {row['problem']}"
                if row["state"] != claim.state or row["problem"]:
                    disagree += 1
                    now += "  <-- differs from the recorded state"
            print(f"  {claim.name} [{claim.source}]")
            print(f"      {claim.says}")
            print(f"      {claim.quantity.value} {claim.expect}; recorded: {claim.state}; {now}")
    return 1 if disagree else 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import get_registry

    registry = get_registry()
    plugins: list[dict[str, Any]] = []
    for info in sorted(registry.plugins.values(), key=lambda p: p.name):
        components: dict[str, list[str]] = {}
        for entry in registry.entries():
            if entry.plugin == info.name:
                components.setdefault(entry.kind, []).append(entry.name)
        plugins.append(
            {
                "name": info.name,
                "module": info.module,
                "distribution": info.distribution,
                "version": info.version,
                "error": info.error,
                "components": components,
            }
        )
    conflicts = [
        {"kind": g[0].kind, "name": g[0].name, "plugins": [e.plugin for e in g]} for g in registry.duplicates()
    ]
    if args.json:
        print(json.dumps({"plugins": plugins, "conflicts": conflicts}, indent=2))
        return 0
    for p in plugins:
        origin = f"{p['distribution']} {p['version']}" if p["distribution"] else "in-process"
        print(f"{p['name']}  ({p['module']}, {origin})")
        if p["error"]:
            print(f"    FAILED TO LOAD: {p['error']}")
        for kind, names in p["components"].items():
            print(f"    {kind}: {', '.join(names)}")
    for c in conflicts:
        print(f"CONFLICT: {c['kind']} {c['name']!r} is registered by {', '.join(c['plugins'])}")
    return 0


def _cmd_registry(args: argparse.Namespace) -> int:
    from .catalogue import check, render
    from .plugins import get_registry

    registry = get_registry()
    if args.write:
        args.file.write_text(render(registry), encoding="utf-8")
        print(f"wrote {args.file}")
        return 0
    problems = check(args.file, registry)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(
            f"{args.file} disagrees with the loaded plugins; fix it or run `mergescope registry --write`",
            file=sys.stderr,
        )
        return 1
    print(f"{args.file} matches the loaded plugins")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mergescope`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except MergescopeError as exc:
        _to_run_log(f"error: {exc}")  # every failure of a run is in its run.log too
        if args.debug:
            raise
        print(f"mergescope: error: {exc}", file=sys.stderr)
        print("(run with --debug for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _to_run_log("interrupted; finished steps are cached, re-run to resume")
        print("mergescope: interrupted; finished steps are cached, re-run to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: it keeps its traceback, on the console and in run.log
        _to_run_log(f"unexpected {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise
    finally:
        _close_run_log()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
