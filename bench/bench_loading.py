"""How much of a pass waits for data, with and without loader workers.

    python bench/bench_loading.py                 # 400 JPEGs at 500x375, resnet18 at 224 px
    python bench/bench_loading.py --files 120 --model resnet50 --device cuda

An image folder of photo-sized JPEGs (written here: smooth noise at 500x375, which
compresses like a photo) is read through ``imagefolder`` (resize 256, centre crop 224,
normalise) and fed to a torchvision classifier in evaluation mode, the way the toolkit's
recording and evaluation passes feed it: the loader built by
:func:`mergescope.loading.make_loader` under ``[loader]`` options, batches moved with
:func:`mergescope.loading.to_device`. For each number of workers it prints the wall time,
the images per second, the share of the pass spent waiting for the next batch
(:class:`mergescope.loading.TimedBatches`) and the speed relative to ``workers = 0``.
Repetitions are interleaved (0, 1, 2, 0, 1, 2, ...) and medians reported, so a change of
load on a shared machine hits every setting alike.

On a CPU the workers compete with the forward pass for the same cores, so the gain is
bounded by the cores left over; on a GPU the forward pass leaves the cores to the
decoders and the share waiting for data is what the workers remove.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from mergescope.devices import resolve_device
from mergescope.loading import LoaderOptions, TimedBatches, loader_options, make_loader, to_device
from mergescope_plugins.images import ImageFolderDataset


def write_folder(root: Path, files: int, size: tuple[int, int] = (500, 375)) -> None:
    """``files`` JPEGs split over two class folders."""
    rng = np.random.default_rng(0)
    for i in range(files):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(folder / f"{i}.jpg", quality=90)


def one_pass(model: torch.nn.Module, data, batch_size: int, device: torch.device, workers: int) -> tuple[float, float]:
    """Wall seconds of one pass and the share of it spent waiting for batches."""
    with loader_options(LoaderOptions(workers=workers)):
        loader = make_loader(data, batch_size, device=device)
        timed = TimedBatches(loader)
        start = time.perf_counter()
        with torch.no_grad():
            for images, _labels in timed:
                model(to_device(images, device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, timed.share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=400, help="JPEG files (default 400)")
    parser.add_argument("--model", default="resnet18", help="a torchvision classifier (default resnet18)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--workers", default="0,1,2", help="worker counts to compare (default 0,1,2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    counts = [int(w) for w in args.workers.split(",")]
    print(f"command: python bench/bench_loading.py --files {args.files} --model {args.model} --device {args.device}")
    print(
        f"date {datetime.date.today()}; {os.cpu_count()} CPU cores; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); device {device}; load before {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "folder"
        write_folder(root, args.files)
        data = ImageFolderDataset(root=str(root), verify=False).load()
        model = getattr(torchvision.models, args.model)(weights=None).eval().to(device)
        one_pass(model, torch.utils.data.Subset(data, range(args.batch_size)), args.batch_size, device, 0)  # warm-up
        times: dict[int, list[float]] = {w: [] for w in counts}
        shares: dict[int, list[float]] = {w: [] for w in counts}
        for _ in range(args.repeats):
            for workers in counts:
                seconds, share = one_pass(model, data, args.batch_size, device, workers)
                times[workers].append(seconds)
                shares[workers].append(share)
    base = statistics.median(times[counts[0]])
    print(f"{args.files} JPEGs 500x375 -> 224 px, {args.model}, batch {args.batch_size}, medians of {args.repeats}")
    print("| workers | wall s | images/s | waiting for data | speed vs workers = 0 |")
    print("|---|---|---|---|---|")
    for workers in counts:
        wall = statistics.median(times[workers])
        share = statistics.median(shares[workers])
        print(f"| {workers} | {wall:.2f} | {args.files / wall:.0f} | {100 * share:.0f} % | {base / wall:.2f} |")
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
