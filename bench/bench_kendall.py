"""Kendall's tau-b for every unit of a layer: the vectorised kernel against scipy.

``mergescope_plugins.kendall_tau.kendall_tau_b`` scores all units of a layer at once;
the baseline is what one writes without it, a Python loop calling
``scipy.stats.kendalltau`` once per unit. Both run side by side on the same arrays,
repetitions interleaved with their order alternated, and the median of the
per-repetition time ratios (loop / ours: above 1 means ours is faster) is printed with
the largest absolute difference between the two results (target <= 1e-9).

Workloads: post-ReLU-like activations (about half exact zeros, so many ties) and
continuous ones, at a few (samples, units) sizes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np
from scipy.stats import kendalltau

from mergescope_plugins.kendall_tau import kendall_tau_b

TOLERANCE = 1e-9
COMMAND = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def activations(samples: int, units: int, relu: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two correlated ``(samples, units)`` arrays; ``relu`` clips at zero (ties)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, units))
    y = 0.6 * x + 0.8 * rng.normal(size=(samples, units))
    if relu:
        x, y = np.maximum(x, 0), np.maximum(y, 0)
    return x.astype(np.float32), y.astype(np.float32)


def scipy_loop(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.array([kendalltau(x[:, j], y[:, j]).statistic for j in range(x.shape[1])])


def timed(fn, *args) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def compare(samples: int, units: int, relu: bool, reps: int) -> tuple[float, float, float, float]:
    """Median ratio (loop / ours), max abs difference, median seconds of each side."""
    x, y = activations(samples, units, relu, seed=samples + units)
    ratios, ours_t, loop_t, diff = [], [], [], 0.0
    for rep in range(reps):
        order = (kendall_tau_b, scipy_loop) if rep % 2 == 0 else (scipy_loop, kendall_tau_b)
        times = {}
        for fn in order:
            times[fn], out = timed(fn, x, y)
            if fn is kendall_tau_b:
                ours = out
            else:
                ref = out
        both = ~(np.isnan(ours) & np.isnan(ref))
        diff = max(diff, float(np.nanmax(np.abs(ours[both] - ref[both]))) if both.any() else 0.0)
        ratios.append(times[scipy_loop] / times[kendall_tau_b])
        ours_t.append(times[kendall_tau_b])
        loop_t.append(times[scipy_loop])
    return statistics.median(ratios), diff, statistics.median(ours_t), statistics.median(loop_t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions per size")
    args = parser.parse_args(argv)
    reps = args.reps or (2 if args.quick else 3)
    sizes = [(1000, 64), (5000, 256)] if args.quick else [(1000, 64), (5000, 256), (10000, 512), (50000, 64)]
    print(f"# {COMMAND}")
    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}, "
          f"numpy {np.__version__}, {datetime.datetime.now().isoformat(timespec='seconds')}, load {os.getloadavg()[0]:.1f}")
    worst = 0.0
    slowest = float("inf")
    for samples, units in sizes:
        for relu in (True, False):
            ratio, diff, ours, loop = compare(samples, units, relu, reps)
            worst, slowest = max(worst, diff), min(slowest, ratio)
            kind = "relu (ties)" if relu else "continuous "
            print(f"K {samples:>6} samples x {units:>4} units, {kind}: speed-up {ratio:6.1f}x "
                  f"(ours {ours:.3f} s, scipy loop {loop:.3f} s), max |diff| {diff:.1e}")
    verdict = "met" if worst <= TOLERANCE and slowest >= 1.0 else "MISSED"
    print(f"K summary: smallest speed-up {slowest:.1f}x (target >= 1), max |diff| {worst:.1e} "
          f"(target <= {TOLERANCE:g}): {verdict}")
    return 0 if verdict == "met" else 1


if __name__ == "__main__":
    sys.exit(main())
