"""Pieces the benches share: workloads and memory probes (Linux)."""

from __future__ import annotations

import os
import resource
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
