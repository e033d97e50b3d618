"""Pieces the benches share: workloads, memory probes (Linux) and interleaved timing."""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mergescope.components import TensorImageDataset


def resnet18(seed: int, num_classes: int = 10) -> torch.nn.Module:
    """torchvision's resnet18 with random weights drawn under ``seed``."""
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes).eval()


def synthetic_images(n: int, size: int = 64, seed: int = 0) -> TensorImageDataset:
    """``n`` Gaussian RGB images of ``size`` x ``size`` with random labels 0-9."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator).numpy()
    return TensorImageDataset(f"synthetic{size}", images, labels, np.arange(n), [str(c) for c in range(10)])


def peak_rss_kib() -> int:
    """The process's peak resident memory in KiB (Linux units)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def current_rss_kib() -> int:
    """The process's resident memory now, in KiB; 0 where /proc is missing."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def interleaved(
    ours: Callable[[], object], base: Callable[[], object], reps: int, after: Callable[[], None] = lambda: None
) -> dict:
    """Time ``ours`` and ``base`` alternately ``reps`` times; per-repetition ratios and their median.

    Wall-clock time is the figure; the process CPU time (all threads) is kept beside
    it because other jobs on the machine disturb it less.
    """
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "base": []}
    for rep in range(reps):
        # Alternate who goes first, so a trend in machine load favours neither side.
        order = [("ours", ours), ("base", base)] if rep % 2 else [("base", base), ("ours", ours)]
        for name, fn in order:
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            after()
    ratios = [o[0] / b[0] for o, b in zip(times["ours"], times["base"])]
    cpu_ratios = [o[1] / b[1] for o, b in zip(times["ours"], times["base"])]
    return {
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "cpu_ratio": statistics.median(cpu_ratios),
        "ours": [t[0] for t in times["ours"]],
        "base": [t[0] for t in times["base"]],
    }
