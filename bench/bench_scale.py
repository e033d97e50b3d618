"""The crosscoder study at scale: three ResNet-50s, every spatial position of layer4.

Workload: three torchvision ``resnet50(weights=None)`` (seeds 0, 1, 2) at 224 px on
synthetic images, ``layer4`` recorded with every spatial position
(``StoreSpec(reduce="none")``: 7 x 7 = 49 rows per image, 2048 units per model).

S1  ``collect_store`` against a bare forward pass of the same three models over the
    same ``DataLoader`` (same batch size, eval, ``torch.no_grad()``), on the small
    image count: wall-time and process CPU-time ratios, target <= 1.10.
S2  Peak RSS of a whole collection at the large image count against the small one,
    each in a fresh subprocess, target <= 1.2.
S3  One epoch of the ``crosscoder`` differ (900 latents, ``samples = "positions"``)
    fed ``Store.activation`` of the three models (the large collection), against a
    bare encoder/ReLU/decoder loop with the same loss and Adam over the same rows held
    in memory (same batch size, same number of steps), target <= 1.15.
S4  Peak memory of a 16,384-latent crosscoder over the three 2048-unit models at
    batch 4,096 (a few optimiser steps, in a subprocess), target below 8 GB.
S5  What the adopted CPU-speed change (channels-last models on the CPU, see
    ``bench_cpu_speed.py``) gains on a collection: before/after, one interleaved run.

Sizes: 500 and 2,000 images (98,000 rows); ``--quick``: 16 and 64 images and S4 at
batch 1,024, about 5 minutes on 2 cores (its header line says so). ``--device cuda``
runs models and crosscoders on the GPU; the lines then also give device memory.

Repetitions of ours and the baseline are interleaved (and their order alternated);
the median of the per-repetition ratios is reported. Run ``--help`` for options.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import attrs
import numpy as np
import torch
import xarray as xr

from mergescope.components import Context
from mergescope.store import Store, StoreSpec, collect_store
from mergescope_plugins.crosscoder import Crosscoder

from _common import current_rss_kib, interleaved, peak_rss_kib, reset_peak_rss

S1_TARGET = 1.10
S2_TARGET = 1.2
S3_TARGET = 1.15
S4_TARGET_GB = 8.0

LAYER = "layer4"
MODELS = ("resnet50-0", "resnet50-1", "resnet50-2")
UNITS = 2048
POSITIONS = 49  # layer4 of a ResNet-50 at 224 px: 7 x 7
SIZE = 224
CLASSES = 1000

COMMAND = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])


@attrs.frozen
class Sizes:
    """How big each part runs: images, batches and chunks, repetitions, latents."""

    label: str
    small: int  # images of S1 and of S2's small run
    large: int  # images of S2's large run, and the store S3 trains on
    batch: int  # images per forward pass (both sides of S1)
    chunk: int  # samples per store chunk (StoreSpec.chunk_size)
    reps: int  # interleaved repetitions of S1 and S3
    s3_latents: int
    s4_latents: int
    s4_batch: int
    s4_steps: int


FULL = Sizes("full", small=500, large=2000, batch=64, chunk=256, reps=3, s3_latents=900,
             s4_latents=16384, s4_batch=4096, s4_steps=3)  # fmt: skip
# S4 at batch 4,096 takes 10 TFLOP per two steps, minutes on 2 cores: the quick run takes 1,024.
QUICK = Sizes("quick", small=16, large=64, batch=16, chunk=16, reps=2, s3_latents=900,
              s4_latents=16384, s4_batch=1024, s4_steps=2)  # fmt: skip
# A check that the script runs end to end; its figures mean nothing.
SMOKE = Sizes("smoke", small=4, large=8, batch=4, chunk=4, reps=1, s3_latents=64,
              s4_latents=512, s4_batch=256, s4_steps=2)  # fmt: skip


# ---------------------------------------------------------------------- memory probes


def gib(kib: float) -> float:
    return kib / 1024**2


# -------------------------------------------------------------------------- workload


class SyntheticImages(torch.utils.data.Dataset):
    """``n`` Gaussian RGB images of ``size`` x ``size``, each made when it is read.

    Image i is drawn from a generator seeded with ``(seed, i)``, so it is the same at
    every read and nothing is held: memory does not grow with ``n`` except for the
    ``sample_ids`` and ``labels`` arrays (16 bytes per image). Labels are 0..999, so the
    store also evaluates the 1000-way heads as it would on ImageNet.
    """

    def __init__(self, n: int, size: int = SIZE, seed: int = 0) -> None:
        self.n, self.size, self.seed = n, size, seed
        self.name = f"synthetic{size}x{n}"
        self.classes = tuple(str(c) for c in range(CLASSES))
        self.sample_ids = np.arange(n, dtype=np.int64)
        self.labels = np.random.default_rng(seed).integers(0, CLASSES, size=n).astype(np.int64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        return torch.randn(3, self.size, self.size, generator=generator), int(self.labels[index])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.size, self.size)


def resnet50s(device: str) -> dict[str, torch.nn.Module]:
    """The three models, random weights drawn under seeds 0, 1 and 2, in eval mode on ``device``."""
    import torchvision

    models = {}
    for seed, name in enumerate(MODELS):
        torch.manual_seed(seed)
        models[name] = torchvision.models.resnet50(weights=None).eval().to(device)
    return models


def study_spec(sizes: Sizes) -> StoreSpec:
    """layer4 of every model with every spatial position kept; default statistics (moments, top-10)."""
    return StoreSpec(
        layers={m: [LAYER] for m in MODELS}, reduce="none", batch_size=sizes.batch, chunk_size=sizes.chunk, workers=0
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_forward(models: dict[str, torch.nn.Module], data, batch_size: int, device: str) -> None:
    """The baseline of S1: the same loader, every model on every batch, nothing else."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(len(data))), batch_size=batch_size)
    with torch.no_grad():
        for images, _labels in loader:
            images = images.to(device)
            for model in models.values():
                model(images)
    sync(device)


def store_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


# ------------------------------------------------------------------------ measuring


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


class PhaseContext(Context):
    """A quiet :class:`Context` that adds up the time of every ``progress`` loop, by its description.

    The crosscoder shows its survey pass, its training epochs and its analysis pass
    through ``context.progress``, so the three come apart from one ``fit`` call.
    """

    def progress(self, iterable: Iterable, desc: str, total: int | None = None) -> Iterator:  # type: ignore[override]
        phases = self.__dict__.setdefault("phases", {})

        def timed() -> Iterator:
            start = time.perf_counter()
            try:
                yield from iterable
            finally:
                phases[desc] = phases.get(desc, 0.0) + time.perf_counter() - start

        return timed()

    def phase(self, word: str) -> float:
        """Seconds of the loops whose description holds ``word``."""
        return sum(s for d, s in self.__dict__.get("phases", {}).items() if word in d)


# ---------------------------------------------------------------------------- S1


def run_s1(sizes: Sizes, device: str, root: Path) -> dict:
    data = SyntheticImages(sizes.small)
    models = resnet50s(device)
    spec = study_spec(sizes)
    made: list[Path] = []

    def collect(images: SyntheticImages) -> Store:
        directory = Path(tempfile.mkdtemp(prefix="s1-", dir=root))
        made.append(directory)
        store = collect_store(models, images, spec, directory)
        sync(device)
        return store

    def clean() -> None:
        for directory in made:
            shutil.rmtree(directory, ignore_errors=True)
        made.clear()

    # Warm-up outside the timing: the first calls load netCDF/HDF5 and torch's kernels.
    warm = SyntheticImages(min(len(data), sizes.batch), seed=1)
    collect(warm)
    bare_forward(models, warm, sizes.batch, device)
    clean()

    result = interleaved(
        lambda: collect(data), lambda: bare_forward(models, data, sizes.batch, device), sizes.reps, clean
    )
    ours, base = statistics.median(result["ours"]), statistics.median(result["base"])
    label = (
        f"S1 collect_store vs bare forward, 3 resnet50 {SIZE}px, {LAYER} every position, "
        f"{sizes.small} images, batch {sizes.batch}"
    )
    print(f"{label}: ratio {result['ratio']:.2f} (target <= {S1_TARGET:g}), CPU-time ratio {result['cpu_ratio']:.2f}")
    print(
        f"    {verdict(result['ratio'] <= S1_TARGET)}; ratios {' '.join(f'{r:.2f}' for r in result['ratios'])}; "
        f"median ours {ours:.2f} s, baseline {base:.2f} s ({1000 * base / sizes.small:.0f} ms per image for the "
        f"three models); fastest ours / fastest baseline {min(result['ours']) / min(result['base']):.2f}; "
        f"load {load_average()}",
        flush=True,
    )
    return result


# ---------------------------------------------------------------------------- S2


def s2_child(images: int, directory: Path, sizes: Sizes, device: str) -> None:
    """In a fresh interpreter: one collection of ``images`` into ``directory``; prints one JSON line."""
    data = SyntheticImages(images)
    models = resnet50s(device)
    spec = study_spec(sizes)
    before = current_rss_kib()
    setup = peak_rss_kib()
    reset = reset_peak_rss()  # building three ResNet-50s peaks above their steady size
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    store = collect_store(models, data, spec, directory)
    sync(device)
    seconds = time.perf_counter() - start
    assert store.info["samples"] == images
    out = {
        "images": images,
        "maxrss_kib": peak_rss_kib(),
        "before_kib": before,
        "setup_kib": setup,
        "reset": reset,
        "seconds": seconds,
        "bytes": store_bytes(directory),
    }
    if device.startswith("cuda"):
        out["cuda_max_bytes"] = torch.cuda.max_memory_allocated(device)
    print(json.dumps(out))


def child(args: list[str]) -> dict:
    """Run this script in a fresh interpreter and read the JSON line it prints last."""
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sizes_args(sizes: Sizes) -> list[str]:
    return ["--sizes-json", json.dumps(attrs.asdict(sizes))]


def run_s2(sizes: Sizes, device: str, root: Path, keep: Path | None) -> dict:
    runs = {}
    for images in (sizes.small, sizes.large):
        directory = keep if (keep is not None and images == sizes.large) else root / f"s2-{images}"
        shutil.rmtree(directory, ignore_errors=True)
        runs[images] = child(
            ["--s2-child", str(images), "--store", str(directory), "--device", device, *sizes_args(sizes)]
        )
        if directory != keep:
            shutil.rmtree(directory, ignore_errors=True)
    small, large = runs[sizes.small], runs[sizes.large]
    ratio = large["maxrss_kib"] / small["maxrss_kib"]
    label = f"S2 peak RSS of a collection at {sizes.large} vs {sizes.small} images, fresh subprocesses"
    print(f"{label}: ratio {ratio:.2f} (target <= {S2_TARGET:g})")
    since = "since the models were built" if small["reset"] and large["reset"] else "of the process"
    buffer = len(MODELS) * sizes.chunk * POSITIONS * UNITS * 4
    line = (
        f"    {verdict(ratio <= S2_TARGET)}; peak RSS {since} {gib(small['maxrss_kib']):.2f} GiB vs "
        f"{gib(large['maxrss_kib']):.2f} GiB; over the RSS before collecting "
        f"{gib(small['maxrss_kib'] - small['before_kib']):+.2f} vs {gib(large['maxrss_kib'] - large['before_kib']):+.2f} GiB; "
        f"chunk buffer ({sizes.chunk} images x {POSITIONS} x {UNITS} x 3 models, float32) {buffer / 2**20:.0f} MiB; "
        f"collection {small['seconds']:.0f} s vs {large['seconds']:.0f} s; "
        f"store on disk {small['bytes'] / 2**20:.0f} MiB vs {large['bytes'] / 2**20:.0f} MiB "
        f"({large['bytes'] / (large['images'] * POSITIONS):.0f} bytes per row)"
    )
    if "cuda_max_bytes" in large:
        line += (
            f"; torch.cuda.max_memory_allocated {small['cuda_max_bytes'] / 2**30:.2f} vs "
            f"{large['cuda_max_bytes'] / 2**30:.2f} GiB"
        )
    print(line, flush=True)
    return {"ratio": ratio, "runs": runs}


# ---------------------------------------------------------------------------- S3


def bare_epoch(rows: torch.Tensor, models: int, latents: int, batch: int, device: str, l1: float = 2.0) -> int:
    """The baseline of S3: one epoch of a crosscoder written out, over rows held in memory.

    Shared encoder, ReLU, one decoder block per model, loss = squared error +
    ``l1 * sum_i f_i * sum_m ||d_i^m||``, Adam; the rows shuffled once, indexed per batch.
    Returns the number of optimiser steps.
    """
    g = torch.Generator().manual_seed(0)
    width = rows.shape[1]
    encoder = torch.nn.Parameter((torch.randn(width, latents, generator=g) * 0.01).to(device))
    encoder_bias = torch.nn.Parameter(torch.zeros(latents, device=device))
    decoder = torch.nn.Parameter((torch.randn(latents, width, generator=g) * 0.01).to(device))
    decoder_bias = torch.nn.Parameter(torch.zeros(width, device=device))
    optimiser = torch.optim.Adam([encoder, encoder_bias, decoder, decoder_bias], lr=2e-3)
    order = torch.randperm(len(rows), generator=g)
    total = torch.zeros((), device=device)
    steps = 0
    for start in range(0, len(rows), batch):
        x = rows[order[start : start + batch]].to(device)
        f = torch.relu((x - decoder_bias) @ encoder + encoder_bias)
        norms = decoder.view(latents, models, -1).norm(dim=2).sum(dim=1)
        loss = ((f @ decoder + decoder_bias - x) ** 2).sum(dim=1).mean() + l1 * (f * norms).sum(dim=1).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        total += loss.detach()
        steps += 1
    float(total)  # waits for the device
    return steps


def crosscoder_options(device: str, **options) -> dict:
    """``options``, plus ``device`` when the crosscoder takes one as an option."""
    if "device" in {f.name for f in attrs.fields(Crosscoder)}:
        options["device"] = device
    return options


def fit_quietly(crosscoder: Crosscoder, acts: dict, context: Context) -> xr.Dataset:
    with warnings.catch_warnings():
        # More latents than rows (the smallest sizes, S4's few steps): fine for timing and memory.
        warnings.simplefilter("ignore", UserWarning)
        return crosscoder.fit(acts, context)


def trained_on(device: str, fn: Callable[[], object]) -> str:
    """Run ``fn`` (a crosscoder fit); ``device`` when it allocated memory there (a CUDA device), else "cpu"."""
    if not device.startswith("cuda"):
        fn()
        return "cpu"
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    return device if torch.cuda.max_memory_allocated(device) > before else "cpu"


def run_s3(sizes: Sizes, device: str, directory: Path, root: Path) -> dict:
    store = Store.open(directory)
    images = store.info["samples"]
    rows_total = images * POSITIONS
    # The default chunk (16,384 rows) with the full sizes (98,000 rows: 6 chunks); the
    # smaller runs take a quarter of their rows, so the epoch streams there too.
    chunk = Crosscoder().chunk_size if sizes.label == "full" else max(POSITIONS, rows_total // 4)
    options = crosscoder_options(
        device, dictionary_size=sizes.s3_latents, samples="positions", epochs=1, chunk_size=chunk
    )
    crosscoder = Crosscoder(**options)
    batch = crosscoder.batch_size

    # Warm-up on two images, outside the timing; it also tells where the crosscoder trains,
    # and the baseline then trains there too.
    few = {m: store.activation(m, LAYER).isel(sample=slice(0, 2)) for m in MODELS}
    warm = Path(tempfile.mkdtemp(prefix="s3-warm-", dir=root))
    context = PhaseContext(quiet=True, workdir=warm, device=torch.device(device))
    where = trained_on(device, lambda: fit_quietly(crosscoder, few, context))
    shutil.rmtree(warm, ignore_errors=True)
    bare_epoch(torch.zeros(2 * batch, len(MODELS) * UNITS), len(MODELS), sizes.s3_latents, batch, where)

    # The baseline's rows, read once outside the timing: (rows, 3 x 2048) float32.
    blocks = [store.activation(m, LAYER).transpose("sample", "y", "x", "unit").values for m in MODELS]
    rows = torch.from_numpy(np.concatenate([b.reshape(-1, UNITS) for b in blocks], axis=1))
    del blocks
    contexts: list[PhaseContext] = []
    loads: list[float] = []
    base_steps: list[int] = []

    def ours() -> None:
        work = Path(tempfile.mkdtemp(prefix="s3-", dir=root))  # fresh: no checkpoint to resume
        context = PhaseContext(quiet=True, workdir=work, device=torch.device(device))
        start = time.perf_counter()
        acts = {m: store.activation(m, LAYER) for m in MODELS}
        loads.append(time.perf_counter() - start)
        fit_quietly(crosscoder, acts, context)
        sync(where)
        contexts.append(context)
        shutil.rmtree(work, ignore_errors=True)

    def base() -> None:
        base_steps.append(bare_epoch(rows, len(MODELS), sizes.s3_latents, batch, where))

    wall = interleaved(ours, base, sizes.reps)
    # The target figure: the training epoch (streaming the rows, every optimiser step,
    # the checkpoint) against the bare loop's epoch.
    epochs = [c.phase("training") for c in contexts]
    ratios = [e / b for e, b in zip(epochs, wall["base"])]
    ratio = statistics.median(ratios)
    steps = -(-rows_total // batch)
    label = (
        f"S3 crosscoder epoch ({sizes.s3_latents} latents, samples=positions, batch {batch}) streamed from the "
        f"store vs a bare loop over rows in memory, {images} images = {rows_total} rows"
    )
    print(f"{label}: ratio {ratio:.2f} (target <= {S3_TARGET:g})")
    print(
        f"    {verdict(ratio <= S3_TARGET)}; ratios {' '.join(f'{r:.2f}' for r in ratios)}; median epoch "
        f"{statistics.median(epochs):.2f} s vs baseline {statistics.median(wall['base']):.2f} s; steps {steps} vs "
        f"{base_steps[0]}; crosscoder chunk {chunk} rows; whole fit incl. reading the store "
        f"{statistics.median(wall['ours']):.2f} s (ratio {wall['ratio']:.2f}, CPU time {wall['cpu_ratio']:.2f}): "
        f"store.activation {statistics.median(loads):.2f} s, survey pass "
        f"{statistics.median(c.phase('reading') for c in contexts):.2f} s, analysis pass "
        f"{statistics.median(c.phase('analysing') for c in contexts):.2f} s; "
        f"both sides on {where}"
        + (f" (the crosscoder did not train on {device})" if where != device else "")
        + f"; load {load_average()}",
        flush=True,
    )
    return {"ratio": ratio, "ratios": ratios, "wall": wall}


# ---------------------------------------------------------------------------- S4


def s4_child(sizes: Sizes, device: str, root: Path) -> None:
    """In a fresh interpreter: a crosscoder fit of ``s4_steps`` steps at ``s4_batch``; prints one JSON line."""
    rows = sizes.s4_batch * sizes.s4_steps
    rng = np.random.default_rng(0)
    acts = {
        m: xr.DataArray(
            np.maximum(rng.standard_normal((rows, UNITS), dtype=np.float32), 0),
            dims=("sample", "unit"),
            coords={"sample": np.arange(rows), "layer": LAYER},
        )
        for m in MODELS
    }
    options = crosscoder_options(device, dictionary_size=sizes.s4_latents, batch_size=sizes.s4_batch, epochs=1)
    work = Path(tempfile.mkdtemp(prefix="s4-", dir=root))
    context = PhaseContext(quiet=True, workdir=work, device=torch.device(device))
    before = current_rss_kib()
    reset = reset_peak_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fit_quietly(Crosscoder(**options), acts, context)
    seconds = time.perf_counter() - start
    checkpoint = store_bytes(work)
    shutil.rmtree(work, ignore_errors=True)
    out = {
        "maxrss_kib": peak_rss_kib(),
        "before_kib": before,
        "reset": reset,
        "seconds": seconds,
        "training": context.phase("training"),
        "checkpoint_bytes": checkpoint,
    }
    if device.startswith("cuda"):
        out["cuda_max_bytes"] = torch.cuda.max_memory_allocated(device)
    print(json.dumps(out))


def run_s4(sizes: Sizes, device: str, root: Path) -> dict:
    out = child(["--s4-child", "--device", device, "--workdir", str(root), *sizes_args(sizes)])
    width = len(MODELS) * UNITS
    params = 2 * width * sizes.s4_latents + width + sizes.s4_latents
    rss_gb = out["maxrss_kib"] * 1024 / 1e9
    gpu_gb = out.get("cuda_max_bytes", 0) / 1e9
    # On a GPU the figure is the device memory the fit allocated; else the process's RSS.
    what, figure = ("torch.cuda.max_memory_allocated", gpu_gb) if gpu_gb else ("peak RSS", rss_gb)
    label = (
        f"S4 {what} of a {sizes.s4_latents}-latent crosscoder over 3 x {UNITS} units, batch {sizes.s4_batch}, "
        f"{sizes.s4_steps} optimiser steps"
    )
    print(f"{label}: {figure:.2f} GB (target < {S4_TARGET_GB:g} GB)")
    line = (
        f"    {verdict(figure < S4_TARGET_GB)}; peak RSS {rss_gb:.2f} GB "
        f"({'since the activations were made' if out['reset'] else 'of the process'}), RSS before the fit "
        f"{out['before_kib'] * 1024 / 1e9:.2f} GB; parameters {params / 1e6:.1f} M = {4 * params / 1e9:.2f} GB, "
        f"with gradients and Adam's two moments {16 * params / 1e9:.2f} GB; checkpoint "
        f"{out['checkpoint_bytes'] / 1e9:.2f} GB; fit {out['seconds']:.0f} s, of which training {out['training']:.0f} s"
    )
    if sizes.s4_batch != FULL.s4_batch or sizes.s4_latents != FULL.s4_latents:
        line += f"; the target is set for {FULL.s4_latents} latents at batch {FULL.s4_batch} (the full run)"
    if device.startswith("cuda") and not gpu_gb:
        line += f"; nothing was allocated on {device}: the crosscoder trained on the CPU"
    print(line, flush=True)
    return out


# ---------------------------------------------------------------------------- S5


def cpu_speed_lines(quick: bool) -> list[str]:
    """S5's lines: the before/after run of ``bench_cpu_speed.py`` (this folder is on ``sys.path``)."""
    from bench_cpu_speed import interleaved_before_after

    return interleaved_before_after(quick)


# -------------------------------------------------------------------------- main


def machine(device: str) -> str:
    where = "cpu"
    if device.startswith("cuda"):
        where = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return (
        f"machine: {os.cpu_count()} cpus, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"numpy {np.__version__}, python {platform.python_version()}, device {where}, "
        f"{datetime.date.today().isoformat()}, load {load_average()}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="16 and 64 images, S4 at batch 1,024: about 5 minutes on 2 cores"
    )
    parser.add_argument("--only", default="S1,S2,S3,S4,S5", help="comma-separated subset of S1,S2,S3,S4,S5")
    parser.add_argument(
        "--device", default="cpu", help='where models and crosscoders run: "cpu" (default) or "cuda[:N]"'
    )
    parser.add_argument("--images", help="SMALL,LARGE: image counts of S1/S2 and S2/S3 (default 500,2000; quick 16,64)")
    parser.add_argument("--reps", type=int, help="interleaved repetitions of S1 and S3 (default 3; quick 2)")
    parser.add_argument("--workdir", type=Path, help="directory for the stores (default: system temp)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--s4", help=argparse.SUPPRESS)  # LATENTS,BATCH,STEPS
    parser.add_argument("--s2-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--s4-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sizes-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    if args.sizes_json:
        sizes = Sizes(**json.loads(args.sizes_json))
    if args.images:
        small, large = (int(v) for v in args.images.split(","))
        sizes = attrs.evolve(sizes, small=small, large=large)
    if args.s4:
        latents, batch, steps = (int(v) for v in args.s4.split(","))
        sizes = attrs.evolve(sizes, s4_latents=latents, s4_batch=batch, s4_steps=steps)
    if args.reps:
        sizes = attrs.evolve(sizes, reps=args.reps)
    root = Path(args.workdir or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    if args.s2_child:
        s2_child(args.s2_child, args.store, sizes, args.device)
        return
    if args.s4_child:
        s4_child(sizes, args.device, root)
        return

    wanted = {s.strip().upper() for s in args.only.split(",")}
    root = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=root))
    print(f"command: {COMMAND}")
    print(machine(args.device))
    rows = sizes.large * POSITIONS
    print(
        f"sizes ({sizes.label}): {sizes.small} and {sizes.large} images of {SIZE}x{SIZE}; {LAYER} of 3 resnet50 "
        f"keeps {POSITIONS} positions x {UNITS} units per image: {rows} rows at {sizes.large} images, "
        f"{len(MODELS) * UNITS * rows * 4 / 1e9:.2f} GB of float32 activations; batch {sizes.batch}, store chunk "
        f"{sizes.chunk} images; {sizes.reps} interleaved repetitions; S3 {sizes.s3_latents} latents; S4 "
        f"{sizes.s4_latents} latents at batch {sizes.s4_batch}, {sizes.s4_steps} steps"
        + ("; smoke sizes: the figures mean nothing" if sizes.label == "smoke" else ""),
        flush=True,
    )
    try:
        if "S1" in wanted:
            run_s1(sizes, args.device, root)
        large = root / "large-store"
        if "S2" in wanted:
            run_s2(sizes, args.device, root, keep=large if "S3" in wanted else None)
        if "S3" in wanted:
            if not (large / "COMPLETE").is_file():  # S2 did not run: collect the store here
                collect_store(resnet50s(args.device), SyntheticImages(sizes.large), study_spec(sizes), large)
            run_s3(sizes, args.device, large, root)
        if "S4" in wanted:
            run_s4(sizes, args.device, root)
        if "S5" in wanted:
            lines = cpu_speed_lines(args.quick or args.smoke)
            print("S5 " + "\n".join(lines), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
