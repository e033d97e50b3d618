"""What checking an image folder up front costs, and why it decodes every file completely.

    python bench/bench_image_verify.py            # 300 files per set
    python bench/bench_image_verify.py --files 100

For small (64x48) and ImageNet-sized (500x375) JPEG and PNG files written here, it times,
side by side in one run and on one thread, Pillow's header check ``Image.verify()`` and a
full decode (what ``imagefolder``'s ``verify = true`` does, through
``mergescope_plugins.images.verify_images``), and prints the time per file and the ratio.
It then cuts a JPEG and a PNG short and says which of the two checks sees each truncated
file: the reason the folder check decodes completely.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mergescope.errors import DataError
from mergescope_plugins.images import verify_images


def write_files(folder: Path, count: int, size: tuple[int, int], suffix: str) -> list[str]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        # Smooth noise compresses like a photo rather than like white noise.
        small = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.BILINEAR)
        path = folder / f"{i}.{suffix}"
        image.save(path)
        paths.append(str(path))
    return paths


def per_file_ms(check, paths: list[str]) -> float:
    start = time.perf_counter()
    check(paths)
    return 1000 * (time.perf_counter() - start) / len(paths)


def header_check(paths: list[str]) -> None:
    for path in paths:
        with Image.open(path) as image:
            image.verify()


def full_decode(paths: list[str]) -> None:
    verify_images("bench", paths, quiet=True)


def sees(check, path: str) -> bool:
    try:
        check([path])
    except (DataError, OSError, SyntaxError):
        return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300, help="files per set (default 300)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"{'files':<22}{'verify() ms':>12}{'full decode ms':>16}{'ratio':>8}")
        for size, name in (((64, 48), "small 64x48"), ((500, 375), "500x375")):
            for suffix in ("jpg", "png"):
                paths = write_files(root / f"{name}-{suffix}", args.files, size, suffix)
                header_check(paths)  # warm the file cache for both
                header, full = per_file_ms(header_check, paths), per_file_ms(full_decode, paths)
                print(f"{name + ' ' + suffix.upper():<22}{header:>12.3f}{full:>16.3f}{full / header:>8.1f}")
        for suffix in ("jpg", "png"):
            (good,) = write_files(root / f"cut-{suffix}", 1, (500, 375), suffix)
            data = Path(good).read_bytes()
            Path(good).write_bytes(data[: len(data) // 2])
            print(
                f"truncated {suffix.upper()}: verify() sees it: {sees(header_check, good)}; "
                f"full decode sees it: {sees(full_decode, good)}"
            )


if __name__ == "__main__":
    main()
