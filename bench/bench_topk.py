"""Benchmark of the ``top-k`` visualizer (:mod:`mergescope_plugins.topk`).

T1  ``TopKGrids.render`` drawing one grid per unit for 1000 units x 5 models (k = 10,
    rows of 10 tiles of 48 px, row labels) from synthetic top-k sample ids over a
    synthetic dataset of 5000 images, against the naive way: one matplotlib figure per
    unit (``plt.subplots(5, 10)``, ``imshow`` per image, ``savefig``), each image loaded
    when its axes is drawn. The baseline draws a subset of units (default 20); both
    sides are reported per 100 grids and their ratio is printed.

Two datasets: 28x28 greyscale (MNIST-like) and 64x64 RGB. Both sides show the same
images normalised the same way, and both write one PNG per unit. Repetitions of ours
and the baseline are interleaved (and their order alternated); the median of the
per-repetition ratios is reported. Run ``--help`` for options.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import os
import platform
import pstats
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from mergescope.components import Context, TensorImageDataset
from mergescope_plugins.topk import TopKGrids

T1_TARGET = 10.0  # ours at least this many times faster than one matplotlib figure per unit

COMMAND = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
MODELS = ["model1", "model2", "permuted", "permuted-merge", "direct-merge"]


# ---------------------------------------------------------------------- workloads


def synthetic_dataset(n: int, shape: tuple[int, ...], seed: int = 0) -> TensorImageDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn((n, *shape), generator=generator)
    labels = np.arange(n) % 10
    return TensorImageDataset(f"synthetic{shape}", images, labels, np.arange(n), [str(c) for c in range(10)])


class SyntheticTopK:
    """What ``Context.topk`` returns, with random ids: ``sample_ids`` / ``values`` ``(k, units)``."""

    def __init__(self, samples: int, units: int, k: int, rng: np.random.Generator) -> None:
        # k distinct samples per unit, as a real top-k has.
        self.sample_ids = np.argsort(rng.random((samples, units)), axis=0)[:k].astype(np.int64)
        self.values = -np.sort(-rng.random((k, units)), axis=0)
        self.k, self.count = k, samples


class SyntheticStore:
    def __init__(self, samples: int, units: int, k: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.tops = {m: SyntheticTopK(samples, units, k, rng) for m in MODELS}

    def topk(self, model: str, layer: str) -> SyntheticTopK:
        return self.tops[model]


def make_context(data: TensorImageDataset, units: int, k: int) -> Context:
    store = SyntheticStore(len(data), units, k)
    return Context(data=data, quiet=True, models=list(MODELS), layers=["layer"], stores=lambda m: store)


# ------------------------------------------------------------------------- sides


def ours(context: Context, out: Path, units: int, k: int) -> None:
    TopKGrids(k=k, units=list(range(units))).render(xr.DataTree(), out, context=context)


def naive_matplotlib(context: Context, out: Path, units: int, k: int) -> None:
    """One figure per unit: a rows x k subplot grid, one imshow per image, savefig."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    tops = {m: context.topk(m, "layer") for m in context.models}
    for unit in range(units):
        # 0.6 in at 80 dpi: 48 px per image, as the tiles of ours.
        fig, axes = plt.subplots(len(tops), k, figsize=(0.6 * (k + 2), 0.6 * len(tops)), dpi=80, squeeze=False)
        for r, (model, top) in enumerate(tops.items()):
            for rank in range(k):
                image = context.images([int(top.sample_ids[rank, unit])])[0].numpy()
                low, high = image.min(), image.max()
                image = (image - low) / (high - low) if high > low else np.zeros_like(image)
                ax = axes[r, rank]
                if image.shape[0] == 1:
                    ax.imshow(image[0], cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(image.transpose(1, 2, 0))
                ax.set_xticks([])
                ax.set_yticks([])
            axes[r, 0].set_ylabel(model, rotation=0, ha="right", va="center")
        fig.suptitle(f"layer, unit {unit}")
        fig.savefig(out / f"unit-{unit:04d}.png")
        plt.close(fig)


# ---------------------------------------------------------------------- measuring


def interleaved(ours_fn: Callable[[], None], base_fn: Callable[[], None], reps: int, clean: Callable[[], None]) -> dict:
    """Time both sides alternately ``reps`` times: wall and process CPU seconds of each."""
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "base": []}
    for rep in range(reps):
        # Alternate who goes first, so a trend in machine load favours neither side.
        order = [("ours", ours_fn), ("base", base_fn)] if rep % 2 == 0 else [("base", base_fn), ("ours", ours_fn)]
        for name, fn in order:
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            clean()
    return times


def t1(label: str, shape: tuple[int, ...], units: int, base_units: int, k: int, reps: int, root: Path) -> dict:
    data = synthetic_dataset(5000, shape)
    context = make_context(data, units, k)
    out = root / "grids"
    clean = lambda: shutil.rmtree(out, ignore_errors=True)  # noqa: E731
    # Warm-up outside the timing: imports, fonts, PNG encoder, matplotlib backend.
    ours(context, out, 2, k)
    naive_matplotlib(context, out, 1, k)
    clean()
    times = interleaved(
        lambda: ours(context, out, units, k), lambda: naive_matplotlib(context, out, base_units, k), reps, clean
    )
    per100 = {
        side: [(w * 100 / n, c * 100 / n) for w, c in times[side]]
        for side, n in (("ours", units), ("base", base_units))
    }
    ratios = [b[0] / o[0] for o, b in zip(per100["ours"], per100["base"])]
    cpu_ratios = [b[1] / o[1] for o, b in zip(per100["ours"], per100["base"])]
    ratio = statistics.median(ratios)
    ours100 = statistics.median(w for w, _ in per100["ours"])
    base100 = statistics.median(w for w, _ in per100["base"])
    print(f"{label}: speed-up {ratio:.1f}x (target >= {T1_TARGET:g}x)", flush=True)
    print(
        f"    {'met' if ratio >= T1_TARGET else 'MISSED'}; per 100 grids: ours {ours100:.2f} s "
        f"({units} units drawn), matplotlib {base100:.2f} s ({base_units} units drawn, scaled); "
        f"speed-ups {' '.join(f'{r:.1f}' for r in ratios)}; CPU-time speed-up {statistics.median(cpu_ratios):.1f}",
        flush=True,
    )
    return {"ratio": ratio, "ours_per_100": ours100, "base_per_100": base100}


def profile(shape: tuple[int, ...], units: int, k: int, root: Path) -> None:
    context = make_context(synthetic_dataset(5000, shape), units, k)
    profiler = cProfile.Profile()
    profiler.enable()
    ours(context, root / "profile", units, k)
    profiler.disable()
    print(f"profile: ours, {units} grids of {shape} images")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 units (baseline 10), one repetition")
    parser.add_argument("--units", type=int, default=None, help="units drawn by ours (default 1000)")
    parser.add_argument("--base-units", type=int, default=None, help="units drawn by the baseline (default 20)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3, quick 1)")
    parser.add_argument("--only", default="grey,rgb", help="datasets: grey (28x28x1), rgb (64x64x3)")
    parser.add_argument("--profile", action="store_true", help="also profile one render of ours (grey)")
    parser.add_argument("--workdir", type=Path, default=None, help="where grids are written (default: temp)")
    args = parser.parse_args(argv)
    units = args.units or (200 if args.quick else 1000)
    base_units = args.base_units or (10 if args.quick else 20)
    reps = args.reps or (1 if args.quick else 3)
    k = 10
    wanted = {s.strip().lower() for s in args.only.split(",")}

    print(f"command: {COMMAND}")
    print(
        f"machine: {os.cpu_count()} cpus, numpy {np.__version__}, python {platform.python_version()}, "
        f"{datetime.date.today().isoformat()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        if "grey" in wanted:
            t1(f"T1 grey 28x28, {len(MODELS)} models, k={k}: top-k grids vs a matplotlib figure per unit",
               (1, 28, 28), units, base_units, k, reps, root)
        if "rgb" in wanted:
            t1(f"T1 rgb 64x64, {len(MODELS)} models, k={k}: top-k grids vs a matplotlib figure per unit",
               (3, 64, 64), units, base_units, k, reps, root)
        if args.profile:
            profile((1, 28, 28), units, k, root)


if __name__ == "__main__":
    main()
