"""Activation matching: the recording pass against the matching that follows it.

``ActivationMatching.align`` does two things: one recording pass over the data
(``Context.record``: every group's producer layers of both models, the cross-covariance
of each model against the reference over every spatial position), then, per group, the
correlation matrix and the Hungarian assignment (``linear_sum_assignment``). The
matching must not dominate: its time over the recording's should stay well below 1.

A1  the zoo ``cnn`` (two random inits, seeds 0 and 1) on MNIST-5000 (``mnist5000``,
    all 5000 images).
A2  torchvision ``resnet18`` (10 classes, seeds 0 and 1) on random 64x64 images
    (1000; 256 with ``--quick``).

Each repetition runs ``ActivationMatching().align`` with a fresh working directory
(nothing cached) and a ``Context`` whose ``record`` is timed, so both parts come from
the same call: *recording* is the ``Context.record`` call inside ``align``; *the rest
of align* is everything else (``channel_groups`` tracing, the correlations, the
Hungarian assignments, the alignment's matrices). Beside it, measured on the same
store with the public APIs: *matching proper* (``Store.cross(...).correlation`` and
``match_correlations`` over every group) and the ``channel_groups`` tracing alone; and
``align`` run again on the same working directory, where the recording is reused from
the cache; and, for scale, a bare forward pass of both models over the same batches.
The median of the per-repetition ratios is printed with the load average.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
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

from mergescope.components import Context, TensorImageDataset
from mergescope.groups import channel_groups, example_input
from mergescope_plugins.activation_matching import ActivationMatching, match_correlations

from _common import resnet18, synthetic_images

COMMAND = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
TARGET = 1.0  # the matching must not dominate: (align - recording) / recording below this


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# ---------------------------------------------------------------------- workloads


def mnist() -> TensorImageDataset:
    from mergescope_plugins.datasets import MNIST5000

    return MNIST5000(split="all").load()


def small_cnn(seed: int, input_shape: tuple[int, ...]) -> torch.nn.Module:
    from mergescope_plugins.zoo import SmallCNN

    torch.manual_seed(seed)
    return SmallCNN().build(input_shape, 10).eval()


class TimedContext(Context):
    """A :class:`Context` that times its :meth:`record` calls and keeps the store returned."""

    def record(self, *args, **kwargs):  # type: ignore[override]
        start = time.perf_counter()
        store = super().record(*args, **kwargs)
        self.__dict__.setdefault("recorded", []).append((time.perf_counter() - start, store))
        return store


# ---------------------------------------------------------------------- measuring


def matching_proper(store, models: dict, reference: str, groups: list) -> float:
    """Correlation -> Hungarian over every group and model, as ``align`` does it; seconds."""
    start = time.perf_counter()
    for m in models:
        if m == reference:
            continue
        for g in groups:
            corr = sum(store.cross(m, reference, p).correlation for p in g.producers)
            match_correlations(corr / len(g.producers))
    return time.perf_counter() - start


def bare_forward(models: dict[str, torch.nn.Module], data, batch_size: int = 256) -> float:
    """Both models over the same batches under ``torch.no_grad()``, nothing recorded; seconds."""
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
    start = time.perf_counter()
    with torch.no_grad():
        for images, _labels in loader:
            for model in models.values():
                model(images)
    return time.perf_counter() - start


def run(label: str, models: dict[str, torch.nn.Module], data, reps: int, root: Path) -> dict:
    reference = "a"
    aligner = ActivationMatching()
    groups = channel_groups(models[reference], example_input(data))
    layers = sorted({p for g in groups for p in g.producers})
    print(
        f"A {label}: {len(data)} images, {len(groups)} groups ({sum(g.size for g in groups)} units), "
        f"{len(layers)} producer layers recorded per model; load {load()}",
        flush=True,
    )
    # Warm-up outside the timing (first calls load netCDF/HDF5 and torch kernels).
    warm = tempfile.mkdtemp(prefix="am-warmup-", dir=root)
    few = data.subset(range(min(len(data), 64)))
    aligner.align(models, reference, Context(data=few, quiet=True, workdir=Path(warm)))
    shutil.rmtree(warm, ignore_errors=True)

    rows: dict[str, list[float]] = {k: [] for k in ("align", "record", "rest", "match", "trace", "cached", "forward")}
    for rep in range(reps):
        workdir = Path(tempfile.mkdtemp(prefix="am-", dir=root))
        try:
            context = TimedContext(data=data, quiet=True, workdir=workdir)
            start = time.perf_counter()
            alignment = aligner.align(models, reference, context)
            total = time.perf_counter() - start
            ((recording, store),) = context.__dict__["recorded"]
            # Beside it, in an alternating order: the matching proper on the same store,
            # the tracing alone, and align again with the recording cached. (The steps run
            # within this repetition, so they may read its `store` and `cached`: noqa B023.)
            cached = Context(data=data, quiet=True, workdir=workdir)
            steps: list[tuple[str, Callable[[], float]]] = [
                ("match", lambda: matching_proper(store, models, reference, groups)),  # noqa: B023
                ("trace", lambda: _seconds(lambda: channel_groups(models[reference], example_input(data)))),
                ("cached", lambda: _seconds(lambda: aligner.align(models, reference, cached))),  # noqa: B023
                ("forward", lambda: bare_forward(models, data)),
            ]
            for name, fn in steps if rep % 2 == 0 else reversed(steps):
                rows[name].append(fn())
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        rows["align"].append(total)
        rows["record"].append(recording)
        rows["rest"].append(total - recording)
        print(
            f"    rep {rep + 1}/{reps}: align {total:.2f} s = recording {recording:.2f} s "
            f"+ rest {total - recording:.2f} s; "
            f"matching proper {rows['match'][-1]:.3f} s, tracing {rows['trace'][-1]:.3f} s, "
            f"align with the recording cached {rows['cached'][-1]:.2f} s, bare forward of both models "
            f"{rows['forward'][-1]:.2f} s; load {load()}",
            flush=True,
        )
    ratios = [r / c for r, c in zip(rows["rest"], rows["record"])]
    proper = [m / c for m, c in zip(rows["match"], rows["record"])]
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = statistics.median(ratios)
    matched = float(np.nanmean(alignment.diagnostics["matched_correlation"].values))
    print(
        f"A {label}, (align - recording) / recording: ratio {ratio:.3f} (target < {TARGET:g}: "
        f"{'met' if ratio < TARGET else 'MISSED'})",
        flush=True,
    )
    print(
        f"    ratios {' '.join(f'{r:.3f}' for r in ratios)}; median align {med['align']:.2f} s, recording "
        f"{med['record']:.2f} s, rest of align {med['rest']:.2f} s (tracing {med['trace']:.2f} s, matching proper "
        f"{med['match']:.3f} s: ratio {statistics.median(proper):.1e} of the recording); align with the recording "
        f"cached {med['cached']:.2f} s; bare forward of both models {med['forward']:.2f} s (recording / forward "
        f"{statistics.median(r / f for r, f in zip(rows['record'], rows['forward'])):.1f}); "
        f"mean matched correlation {matched:.3f}",
        flush=True,
    )
    return {"ratio": ratio, "proper": statistics.median(proper), **med}


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repetition, 256 resnet18 images")
    parser.add_argument("--only", default="A1,A2", help="comma-separated subset of A1,A2")
    parser.add_argument("--reps", type=int, help="repetitions (default 1 quick, 3 full)")
    parser.add_argument("--images", type=int, help="random 64x64 images for A2 (default 256 quick, 1000 full)")
    parser.add_argument("--workdir", type=Path, help="directory for temporary stores (default: system temp)")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    root = Path(args.workdir or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    reps = args.reps or (1 if args.quick else 3)
    images = args.images or (256 if args.quick else 1000)
    wanted = {s.strip().lower() for s in args.only.split(",")}
    print(f"command: {COMMAND}")
    print(
        f"machine: {os.cpu_count()} cpus (shared), torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"numpy {np.__version__}, python {platform.python_version()}, {datetime.date.today().isoformat()}; "
        f"load average (1, 5, 15 min) {load()}",
        flush=True,
    )
    if "a1" in wanted:
        data = mnist()
        models = {m: small_cnn(seed, data.input_shape) for seed, m in enumerate("ab")}
        run("A1 cnn on MNIST-5000", models, data, reps, root)
    if "a2" in wanted:
        data = synthetic_images(images)
        models = {m: resnet18(seed) for seed, m in enumerate("ab")}
        run(f"A2 resnet18 on {images} random 64x64 images", models, data, reps, root)
    print(f"load average at the end: {load()}", flush=True)


if __name__ == "__main__":
    main()
