"""Run a tiny pipeline on a device and on the CPU, and compare their results.nc.

    python bench/device_check.py                    # cuda (or whatever "auto" finds), fp32
    python bench/device_check.py --device cuda:1 --precision bf16

The pipeline (two small MLPs on 200 MNIST images: interpolation and Kendall's tau) runs
twice into temporary run directories, first on the CPU, then on ``--device``. Both share
one model cache, so the device run loads the weights the CPU run trained: what is compared
is the forward passes (recording, statistics, evaluation, merging, metrics), not training.

Every numeric variable of every node of results.nc is compared with

    |device - cpu| <= atol + rtol * |cpu|

at the tolerances of the precision (TOLERANCES below): fp32 1e-4 / 1e-4 (GPU kernels
sum in another order), bf16 and fp16 5e-2 / 5e-2 (8 and 11 bits of mantissa in the
forward passes; statistics are float64 either way). The times of both runs are printed
side by side. Without a GPU (or MPS) the script says so and exits 0. Exit 1 when a
variable differs beyond its tolerance or is missing on one side.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

PIPELINE = """
seed = 0

[data]
use = "mnist5000"
split = "test"
per_class = 20

[activations]
layers = ["relu1", "relu2"]
batch_size = 100

[[models]]
name = "a"
use = "mlp"
hidden = [32, 32]
[models.train]
seed = 0
epochs = 3

[[models]]
name = "b"
use = "mlp"
hidden = [32, 32]
[models.train]
seed = 1
epochs = 3

[[steps]]
use = "interpolation"
models = ["a", "b"]
alphas = [0.0, 0.5, 1.0]

[[steps]]
use = "kendall-tau"
models = ["a", "b"]
allow_unaligned = true
"""

#: precision -> (rtol, atol)
TOLERANCES = {"fp32": (1e-4, 1e-4), "bf16": (5e-2, 5e-2), "fp16": (5e-2, 5e-2)}


def compare(cpu: xr.DataTree, dev: xr.DataTree, rtol: float, atol: float) -> list[str]:
    """One line per variable, ``ok`` or what differs; a line starting with ``FAIL`` fails the check."""
    lines = []
    cpu_nodes = {node.path: node.to_dataset() for node in cpu.subtree}
    dev_nodes = {node.path: node.to_dataset() for node in dev.subtree}
    for path in sorted(cpu_nodes.keys() | dev_nodes.keys()):
        if path not in cpu_nodes or path not in dev_nodes:
            lines.append(f"FAIL {path}: only on the {'device' if path in dev_nodes else 'cpu'}")
            continue
        a, b = cpu_nodes[path], dev_nodes[path]
        for name in sorted(set(a.data_vars) | set(b.data_vars)):
            where = f"{path.rstrip('/')}/{name}"
            if name not in a.data_vars or name not in b.data_vars:
                lines.append(f"FAIL {where}: only on the {'device' if name in b.data_vars else 'cpu'}")
                continue
            x, y = a[name].values, b[name].values
            if x.shape != y.shape:
                lines.append(f"FAIL {where}: shapes {x.shape} (cpu) and {y.shape} (device)")
            elif not np.issubdtype(x.dtype, np.number) or x.dtype == bool:
                same = bool(np.array_equal(x, y))
                lines.append(f"{'ok  ' if same else 'FAIL'} {where}: {'equal' if same else 'differs'}")
            else:
                x, y = x.astype(np.float64), y.astype(np.float64)
                diff = np.abs(x - y)
                bad = ~(np.isclose(x, y, rtol=rtol, atol=atol, equal_nan=True))
                worst = float(np.nanmax(diff)) if diff.size and not np.isnan(diff).all() else 0.0
                lines.append(f"{'FAIL' if bad.any() else 'ok  '} {where}: max |diff| {worst:.3g}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--precision", default="fp32", choices=sorted(TOLERANCES), help="of the device run")
    parser.add_argument("--keep", type=Path, help="keep both run directories under this folder")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="compare the CPU with itself (a check of this script, e.g. at bf16)"
    )
    args = parser.parse_args(argv)

    from mergescope import Pipeline, run
    from mergescope.devices import available_devices, resolve_device
    from mergescope.errors import ConfigError

    try:
        device = resolve_device(args.device)
    except ConfigError as exc:
        print(f"no such device here: {exc}; nothing to compare")
        return 0
    if device.type == "cpu" and not args.allow_cpu:
        print(f"no GPU here (devices: {', '.join(available_devices())}); nothing to compare")
        return 0

    root = args.keep or Path(tempfile.mkdtemp(prefix="mergescope-device-check-"))
    os.environ["MERGESCOPE_CACHE"] = str(root / "cache")  # one cache: the device run loads the CPU's weights
    pipeline = Pipeline.from_toml(PIPELINE, source="<device_check>")
    seconds = {}
    trees = {}
    other = str(device) if device.type != "cpu" else f"cpu-{args.precision}"
    for label, spec, precision in (("cpu", "cpu", "fp32"), (other, args.device, args.precision)):
        start = time.perf_counter()
        result = run(pipeline, root / label.replace(":", "-"), quiet=True, device=spec, precision=precision)
        seconds[label] = time.perf_counter() - start
        trees[label] = xr.open_datatree(result.out_dir / "results.nc")
    rtol, atol = TOLERANCES[args.precision]
    lines = compare(trees["cpu"], trees[other], rtol, atol)
    print(f"results.nc, cpu fp32 against {device} {args.precision} (rtol {rtol}, atol {atol}):")
    print("\n".join(f"  {line}" for line in lines))
    print(f"seconds (cpu run includes training): cpu {seconds['cpu']:.2f}   {other} {seconds[other]:.2f}")
    failed = sum(line.startswith("FAIL") for line in lines)
    print(f"{failed} of {len(lines)} variables beyond tolerance" if failed else "all variables within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
