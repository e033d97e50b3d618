"""Benchmarks of the crosscoder differ (:mod:`mergescope_plugins.crosscoder`).

Every figure is a ratio measured side by side in one run, so a busy machine slows
both sides alike:

C1   Trainer overhead. ``Crosscoder.fit`` streaming the activations of 3 models from
     netCDF files opened lazily with dask (the store's layout: ``<model>.nc``, group
     ``/<layer>``, variable ``activation``), with normalisation, shuffling by chunks,
     per-epoch logging and a checkpoint every epoch, against a bare loop of the same
     forward / backward / Adam steps over one in-memory tensor of the same rows.
     Three lines: the training loop alone (from the first to the last epoch of the
     progress bar), the whole ``fit`` (plus its reading pass that checks and normalises
     the data, and the analysis pass), and the training loop on the same activations
     loaded in memory (the trainer without the reading).
C2   Peak RSS (``ru_maxrss``) of a fresh process fitting one epoch on 10 N samples
     against N samples, streamed from netCDF.

Repetitions of ours and the baseline are interleaved (and their order alternated);
the median of the per-repetition ratios is reported, with the ratio of process CPU
times beside it (other jobs on the machine disturb it less). Run ``--help`` for options.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import attrs
import dask.array
import numpy as np
import torch
import xarray as xr

from mergescope.components import Context
from mergescope_plugins.crosscoder import Crosscoder

from _common import current_rss_kib, peak_rss_kib, reset_peak_rss

C1_TARGET = 1.15
C2_TARGET = 1.2
UNITS = {"a": 256, "b": 256, "c": 512}
LAYER = "block4"

COMMAND = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
T = TypeVar("T")


# ---------------------------------------------------------------------- workload


def write_activations(root: Path, samples: int, seed: int = 0) -> dict[str, Path]:
    """Sparse non-negative activations of 3 models, one netCDF file per model, written chunk by chunk."""
    paths = {}
    for i, (model, units) in enumerate(UNITS.items()):
        rng = dask.array.random.default_rng(seed + i)
        chunks = (min(samples, 8192), units)
        values = dask.array.maximum(rng.standard_normal((samples, units), chunks=chunks, dtype=np.float32) - 1.0, 0)
        da = xr.DataArray(
            values.astype(np.float32),
            dims=("sample", "unit"),
            coords={
                "sample": np.arange(samples),
                "unit": np.arange(units),
                "label": ("sample", np.arange(samples) % 10),
                "model": model,
                "layer": LAYER,
            },
            name="activation",
        )
        paths[model] = root / f"{model}.nc"
        da.to_dataset().to_netcdf(paths[model], group=LAYER, engine="netcdf4")
    return paths


def open_activations(paths: dict[str, Path]) -> dict[str, xr.DataArray]:
    return {
        m: xr.open_dataset(p, group=LAYER, engine="netcdf4", chunks={"sample": 4096})["activation"]
        for m, p in paths.items()
    }


@attrs.define
class EpochClock(Context):
    """A context that records (wall, CPU) times when each training epoch starts and when the loop ends."""

    marks: list[tuple[float, float]] = attrs.field(factory=list)

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        if not desc.endswith("training"):
            yield from iterable
            return
        self.marks.append((time.perf_counter(), time.process_time()))
        for item in iterable:
            yield item
            self.marks.append((time.perf_counter(), time.process_time()))


def bare_loop(x: torch.Tensor, units: list[int], crosscoder: Crosscoder, epochs: int) -> None:
    """The baseline: the same steps over an in-memory tensor of normalised rows, nothing else."""
    g = torch.Generator().manual_seed(0)
    width, latents = x.shape[1], crosscoder.dictionary_size
    w_enc = (torch.randn(width, latents, generator=g) * 0.01).requires_grad_()
    b_enc = torch.zeros(latents, requires_grad=True)
    w_dec = (torch.randn(latents, width, generator=g) * 0.01).requires_grad_()
    b_dec = torch.zeros(width, requires_grad=True)
    member = torch.zeros(width, len(units))
    offsets = np.cumsum([0, *units])
    for m in range(len(units)):
        member[offsets[m] : offsets[m + 1], m] = 1.0
    optimiser = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=crosscoder.learning_rate)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), crosscoder.batch_size):
            batch = x[order[start : start + crosscoder.batch_size]]
            f = torch.relu((batch - b_dec) @ w_enc + b_enc)
            norms = ((w_dec**2) @ member).clamp_min(1e-20).sqrt().sum(dim=1)
            loss = ((f @ w_dec + b_dec - batch) ** 2).sum(dim=1).mean() + crosscoder.l1 * (f * norms).sum(dim=1).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()


def in_memory_rows(paths: dict[str, Path]) -> tuple[torch.Tensor, list[int]]:
    blocks, units = [], []
    for p in paths.values():
        with xr.open_dataset(p, group=LAYER, engine="netcdf4") as ds:
            x = ds["activation"].values.astype(np.float32)
        blocks.append(x * np.sqrt(x.shape[1] / (x**2).sum(axis=1).mean()))
        units.append(x.shape[1])
    return torch.from_numpy(np.concatenate(blocks, axis=1)), units


# --------------------------------------------------------------------------- C1


def run_c1(samples: int, epochs: int, reps: int, root: Path) -> dict:
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        paths = write_activations(Path(tmp), samples)
        x, units = in_memory_rows(paths)
        crosscoder = Crosscoder(epochs=epochs)
        steps = epochs * -(-samples // crosscoder.batch_size)
        # Warm-up outside the timing: first calls load netCDF/HDF5 and torch kernels.
        Crosscoder(epochs=1).fit(open_activations(paths), Context(quiet=True, workdir=Path(tmp, "warm")))
        bare_loop(x[:2048], units, crosscoder, 1)
        in_memory = {m: a.load() for m, a in open_activations(paths).items()}
        # (wall, CPU) seconds of every repetition.
        loop: list[tuple[float, float]] = []
        whole: list[tuple[float, float]] = []
        memory: list[tuple[float, float]] = []
        base: list[tuple[float, float]] = []
        for rep in range(reps):
            def ours() -> None:
                clock = EpochClock(quiet=True, workdir=Path(tempfile.mkdtemp(dir=tmp)))
                wall, cpu = time.perf_counter(), time.process_time()
                crosscoder.fit(open_activations(paths), clock)
                whole.append((time.perf_counter() - wall, time.process_time() - cpu))
                (w0, c0), (w1, c1) = clock.marks[0], clock.marks[-1]
                loop.append((w1 - w0, c1 - c0))
                # The same from in-memory DataArrays: the trainer without the reading.
                clock = EpochClock(quiet=True, workdir=Path(tempfile.mkdtemp(dir=tmp)))
                crosscoder.fit(in_memory, clock)
                (w0, c0), (w1, c1) = clock.marks[0], clock.marks[-1]
                memory.append((w1 - w0, c1 - c0))

            def bare() -> None:
                wall, cpu = time.perf_counter(), time.process_time()
                bare_loop(x, units, crosscoder, epochs)
                base.append((time.perf_counter() - wall, time.process_time() - cpu))

            # Alternate who goes first, so a trend in machine load favours neither side.
            for fn in (ours, bare) if rep % 2 else (bare, ours):
                fn()
    what = (
        f"C1 crosscoder (3 models, {sum(UNITS.values())} units, {crosscoder.dictionary_size} latents) "
        f"on {samples} samples x {epochs} epochs"
    )
    out = {}
    lines = (
        ("training loop streamed from netCDF", loop),
        ("whole fit streamed from netCDF", whole),
        ("training loop from in-memory DataArrays", memory),
    )
    for label, ours_t in lines:
        ratios = [o[0] / b[0] for o, b in zip(ours_t, base)]
        cpu_ratios = [o[1] / b[1] for o, b in zip(ours_t, base)]
        ratio = statistics.median(ratios)
        print(f"{what}, {label} vs bare in-memory loop: ratio {ratio:.2f} (target <= {C1_TARGET:g})")
        wall = statistics.median(o[0] for o in ours_t)
        wall_base = statistics.median(b[0] for b in base)
        print(
            f"    {'met' if ratio <= C1_TARGET else 'MISSED'}; ratios {' '.join(f'{r:.2f}' for r in ratios)}; "
            f"median ours {wall:.2f} s, bare {wall_base:.2f} s; "
            f"{1000 * wall / steps:.1f} vs {1000 * wall_base / steps:.1f} ms per step; "
            f"CPU-time ratio {statistics.median(cpu_ratios):.2f}; "
            f"fastest ours / fastest bare {min(o[0] for o in ours_t) / min(b[0] for b in base):.2f}",
            flush=True,
        )
        out[label] = {"ratios": ratios, "cpu_ratios": cpu_ratios}
    return out


# --------------------------------------------------------------------------- C2


def c2_child(directory: Path) -> None:
    """Run in a fresh interpreter: fit one epoch on the files in ``directory``, print the peak RSS as JSON."""
    paths = {m: directory / f"{m}.nc" for m in UNITS}
    acts = open_activations(paths)
    warm = {m: a.isel(sample=slice(0, 512)) for m, a in acts.items()}
    Crosscoder(epochs=1).fit(warm, Context(quiet=True, workdir=directory / "warm"))
    setup_kib, before_kib = peak_rss_kib(), current_rss_kib()
    reset = reset_peak_rss()
    start = time.perf_counter()
    result = Crosscoder(epochs=1).fit(acts, Context(quiet=True, workdir=directory / "fit"))
    seconds = time.perf_counter() - start
    assert np.isfinite(result["fvu"].values).all()
    samples = acts["a"].sizes["sample"]
    print(json.dumps({"samples": samples, "maxrss_kib": peak_rss_kib(), "before_kib": before_kib,
                      "setup_kib": setup_kib, "reset": reset, "seconds": seconds}))  # fmt: skip


def run_c2(small: int, large: int, root: Path, threads: int) -> dict:
    runs = {}
    for samples in (small, large):
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            write_activations(Path(tmp), samples)
            cmd = [sys.executable, os.path.abspath(__file__), "--c2-child", tmp, "--threads", str(threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[samples] = json.loads(out.strip().splitlines()[-1])
    ratio = runs[large]["maxrss_kib"] / runs[small]["maxrss_kib"]
    data_mib = {n: n * sum(UNITS.values()) * 4 / 2**20 for n in (small, large)}
    print(
        f"C2 peak RSS of a 1-epoch fit streamed from netCDF at {large} vs {small} samples: ratio {ratio:.2f} "
        f"(target <= {C2_TARGET:g})"
    )
    peak = "since the warm-up" if all(r["reset"] for r in runs.values()) else "of the process"
    print(
        f"    {'met' if ratio <= C2_TARGET else 'MISSED'}; "
        f"peak RSS {peak} {runs[small]['maxrss_kib'] / 1024:.0f} MiB vs "
        f"{runs[large]['maxrss_kib'] / 1024:.0f} MiB; over the RSS before fitting "
        f"{(runs[small]['maxrss_kib'] - runs[small]['before_kib']) / 1024:+.0f} MiB vs "
        f"{(runs[large]['maxrss_kib'] - runs[large]['before_kib']) / 1024:+.0f} MiB; "
        f"activations on disk {data_mib[small]:.0f} MiB vs {data_mib[large]:.0f} MiB; "
        f"fit {runs[small]['seconds']:.0f} s vs {runs[large]['seconds']:.0f} s",
        flush=True,
    )
    return {"ratio": ratio, "runs": runs}


# ------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples and repetitions (about a minute)")
    parser.add_argument("--only", default="C1,C2", help="comma-separated subset of C1,C2")
    parser.add_argument("--reps", type=int, help="interleaved repetitions for C1 (default 2 quick, 5 full)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)"
    )
    parser.add_argument("--workdir", type=Path, help="directory for temporary files (default: system temp)")
    parser.add_argument("--c2-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.c2_child:
        c2_child(args.c2_child)
        return
    root = Path(args.workdir or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    reps = args.reps or (2 if args.quick else 5)
    c1_samples, c1_epochs = (8192, 3) if args.quick else (20000, 5)
    # The smaller size still spans whole chunks (16384 rows by default), so both peak on a full chunk.
    c2_sizes = (16384, 163840) if args.quick else (32768, 327680)
    wanted = {s.strip().upper() for s in args.only.split(",")}
    print(f"command: {COMMAND}")
    print(
        f"machine: {os.cpu_count()} cpus, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"numpy {np.__version__}, python {platform.python_version()}, {datetime.date.today().isoformat()}",
        flush=True,
    )
    if "C1" in wanted:
        run_c1(c1_samples, c1_epochs, reps, root)
    if "C2" in wanted:
        run_c2(*c2_sizes, root, args.threads)


if __name__ == "__main__":
    main()
