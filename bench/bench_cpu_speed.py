"""CPU speed of the toolkit's forward passes: what cheap options gain over today's default.

Every forward pass of the toolkit (``evaluate`` in ``mergescope.values``,
``collect_store`` in ``mergescope.store``) runs the model in eval mode under
``torch.no_grad()``, in float32, on contiguous (NCHW) tensors, without autocast unless a
pipeline sets ``precision``. Against that baseline, on the CPU:

baseline        eval mode, ``torch.no_grad()``, fp32, NCHW (today's default)
inference_mode  ``torch.inference_mode()`` instead of ``torch.no_grad()``
channels_last   model and every input batch ``.to(memory_format=torch.channels_last)``
im+cl           both of the above
bf16            ``torch.autocast("cpu", dtype=torch.bfloat16)``: the toolkit's
                ``precision = "bf16"``; never exact, judged as an opt-in precision
bf16+cl         bf16 on channels_last tensors
compile         ``torch.compile(model)`` (inductor), recorders attached before compiling;
                the first pass (compilation) is reported apart from the steady state

Workloads. Every timed pass records activations the way the store does: forward hooks
from ``attach_recorders`` whose sink reduces each map to per-channel means with
``summarise``; the logits of every batch are kept as ``evaluate`` would score them.

cnn       the demo's ``cnn`` (widths 16 32 64 64, batchnorm), trained one epoch on
          MNIST-5000's train split (so that argmax agreement means something), over the
          1000 test images (500 with --quick) in batches of 500 (the demo's batch size);
          records relu1..relu4
resnet18  torchvision resnet18 (untrained) at 64x64, one batch of 256 random images (the
          default batch size; every batch of a collection runs alike); records every
          BasicBlock
resnet50  torchvision resnet50 (untrained) at 224x224, one batch of 8 random images (a
          batch of 256 would take a minute a pass here); records every Bottleneck
e2e       ``collect_store`` itself (P1b's spec of ``bench_store.py``: BasicBlock outputs,
          top-k 10, covariance, default batch size) on the resnet18 workload, with what
          can be applied from outside the toolkit: ``inference_mode`` around the call, the
          model converted to channels_last (the toolkit still hands it NCHW batches), the
          same plus a wrapper module converting each batch (what converting inputs
          inside the toolkit would do), the toolkit's own bf16 autocast
          (``mergescope.devices.autocast``), and that on channels_last with the input
          converted (--quick: the two channels_last variants only)

Per variant and workload the bench prints the median over interleaved repetitions (the
order of the variants shuffled in each) of the wall-clock ratio to the baseline and of
the process CPU-time ratio, then exactness against the baseline on the same inputs: the
largest absolute difference of the logits and of the per-channel means at one recorded
layer (the deepest), each also relative to the largest magnitude of the baseline's
tensor ("rel"), and the share of samples whose argmax agrees.

Verdicts: an fp32 variant is *faster* on a workload when both its wall and its CPU ratio
are <= 0.95, *slower* when both are >= 1.05; it is *exact* when both relative differences
are <= 1e-5 and every argmax agrees. Exact and faster somewhere, slower nowhere: adopt as
default. Exact, faster somewhere and slower elsewhere: offer as an option. Otherwise: not
worth it. bf16 is judged as an opt-in precision by its speed, its error printed beside it.

``interleaved_before_after(quick)`` runs the adopted change(s) before/after on the e2e
workload and returns printable lines, for other benches to call.

Run ``--help`` for options; ``--quick`` takes about two minutes, a full run about eight
on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mergescope.activations import attach_recorders, resolve_layers, summarise
from mergescope.devices import autocast as toolkit_autocast
from mergescope.devices import place
from mergescope.store import StoreSpec, collect_store

from _common import resnet18, synthetic_images

COMMAND = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])

SPEED_GAIN = 0.95  # faster: ratio <= this (at least 5 % faster)
SLOWER = 1.05
EXACT_REL = 1e-5  # fp32 variants: relative difference to the baseline at most this

#: The change adopted as the default from this bench's measurements (fp32, exact, faster on
#: every workload): channels-last models on the CPU, as ``mergescope.devices.place`` stores
#: them (inputs stay NCHW: the first convolution converts them). What
#: ``interleaved_before_after`` runs as "after"; a name of ``E2E_VARIANTS``.
ADOPTED = "channels_last model"


# ---------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    name: str
    inference_mode: bool = False
    channels_last: bool = False
    bf16: bool = False
    compile: bool = False

    def context(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode() if self.inference_mode else torch.no_grad())
        if self.bf16:
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        return stack


VARIANTS = [
    Variant("baseline"),
    Variant("inference_mode", inference_mode=True),
    Variant("channels_last", channels_last=True),
    Variant("im+cl", inference_mode=True, channels_last=True),
    Variant("bf16", bf16=True),
    Variant("bf16+cl", bf16=True, channels_last=True),
    Variant("compile", compile=True),
]


# ---------------------------------------------------------------------- workloads


@dataclass
class Workload:
    name: str
    what: str
    model: nn.Module
    batches: list[torch.Tensor]
    layers: list[str]  # selectors, as the toolkit records them
    exact_layer: str  # the recorded layer whose channel means are compared


def cnn_workload(quick: bool) -> Workload:
    from mergescope.training import Training, train_classifier
    from mergescope_plugins.datasets import MNIST5000
    from mergescope_plugins.zoo import SmallCNN

    train = MNIST5000(split="train").load()
    test = MNIST5000(split="test").load()
    torch.manual_seed(0)
    model = SmallCNN(widths=[16, 32, 64, 64], batchnorm=True).build(train.input_shape, 10)
    train_classifier(model, train, Training(seed=0, epochs=1))
    images = test.images if not quick else test.images[:500]
    return Workload(
        "cnn",
        f"demo cnn (16 32 64 64, batchnorm, 1 epoch) on {len(images)} MNIST-5000 test images, batch 500",
        model.eval(),
        list(images.split(500)),
        ["relu*"],
        "relu4",
    )


def resnet18_workload(quick: bool) -> Workload:
    # One batch of the default size: every batch of a collection runs alike.
    images = synthetic_images(256, 64).images
    return Workload(
        "resnet18",
        "resnet18 (untrained) on 256 random 64x64 images, batch 256",
        resnet18(0),
        list(images.split(256)),
        ["type:BasicBlock"],
        "layer4.1",
    )


def resnet50_workload(quick: bool) -> Workload:
    import torchvision

    # A batch of 8 takes seconds here already; 256 (the default) would take a minute a pass.
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval()
    images = synthetic_images(8, 224, seed=1).images
    return Workload(
        "resnet50",
        "resnet50 (untrained) on 8 random 224x224 images, batch 8",
        model,
        [images],
        ["type:Bottleneck"],
        "layer4.2",
    )


# ---------------------------------------------------------------------- timing


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f} (1 min), {five:.2f} (5 min)"


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleave(
    fns: dict[str, Callable[[], object]], reps: int, after: Callable[[], None] = lambda: None, seed: int = 0
) -> dict[str, list[tuple[float, float]]]:
    """Run every function once per repetition, in a new shuffled order each time; (wall, CPU) per run."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(seed)
    for _ in range(reps):
        shuffle.shuffle(order)
        for name in order:
            gc.collect()
            times[name].append(timed(fns[name]))
            after()
    return times


def ratios(times: dict[str, list[tuple[float, float]]], name: str, base: str = "baseline") -> dict:
    wall = [v[0] / b[0] for v, b in zip(times[name], times[base])]
    cpu = [v[1] / b[1] for v, b in zip(times[name], times[base])]
    return {
        "wall": statistics.median(wall),
        "cpu": statistics.median(cpu),
        "walls": wall,
        "seconds": statistics.median(v[0] for v in times[name]),
    }


# ---------------------------------------------------------------------- exactness


def diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Largest absolute difference, and that relative to the largest magnitude of ``a``."""
    worst = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
    scale = float(np.max(np.abs(a.astype(np.float64)), initial=0.0))
    return worst, worst / scale if scale else worst


@dataclass
class Outputs:
    logits: list[np.ndarray] = field(default_factory=list)
    means: list[np.ndarray] = field(default_factory=list)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.logits), np.concatenate(self.means)


def exactness(base: Outputs, other: Outputs) -> dict:
    base_logits, base_means = base.arrays()
    logits, means = other.arrays()
    logit_abs, logit_rel = diff(base_logits, logits)
    mean_abs, mean_rel = diff(base_means, means)
    agree = float(np.mean(base_logits.argmax(1) == logits.argmax(1)))
    return {
        "logit_abs": logit_abs,
        "logit_rel": logit_rel,
        "mean_abs": mean_abs,
        "mean_rel": mean_rel,
        "agree": agree,
        "exact": max(logit_rel, mean_rel) <= EXACT_REL and agree == 1.0,
    }


# ---------------------------------------------------------------------- micro runs


class Runner:
    """One variant of a workload: its own copy of the model with the toolkit's recorders attached."""

    def __init__(self, workload: Workload, variant: Variant) -> None:
        self.workload, self.variant = workload, variant
        model = copy.deepcopy(workload.model).eval()
        if variant.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.captured: dict[str, np.ndarray] = {}
        names = list(resolve_layers(model, workload.layers, workload.name))
        if workload.exact_layer not in names:
            raise AssertionError(f"{workload.exact_layer} is not among the recorded layers {names}")

        def sink(layer: str, output: torch.Tensor) -> None:
            self.captured[layer] = summarise(output, "mean")

        self.handles = attach_recorders(model, workload.layers, sink, workload.name)
        self.model = model
        self.module: Callable[[torch.Tensor], torch.Tensor] = model
        if variant.compile:
            self.module = torch.compile(model)
        self.outputs = Outputs()

    def run(self, batches: Sequence[torch.Tensor] | None = None) -> None:
        out = Outputs()
        cl = self.variant.channels_last
        with self.variant.context():
            for images in self.workload.batches if batches is None else batches:
                x = images.contiguous(memory_format=torch.channels_last) if cl else images
                logits = self.module(x).float()
                out.logits.append(logits.numpy().copy())
                out.means.append(self.captured[self.workload.exact_layer])
        if batches is None:
            self.outputs = out


def speed_line(name: str, r: dict) -> str:
    reps = " ".join(f"{w:.2f}" for w in r["walls"])
    return f"wall {r['wall']:.2f}  CPU {r['cpu']:.2f}  (median {r['seconds']:.2f} s; reps {reps})"


def exact_line(e: dict) -> str:
    return (
        f"logits max abs {e['logit_abs']:.1e} rel {e['logit_rel']:.1e}; channel means max abs "
        f"{e['mean_abs']:.1e} rel {e['mean_rel']:.1e}; argmax agree {100 * e['agree']:.1f} %"
    )


def classify(r: dict) -> str:
    if max(r["wall"], r["cpu"]) <= SPEED_GAIN:
        return "faster"
    if min(r["wall"], r["cpu"]) >= SLOWER:
        return "slower"
    return "same"


def hook_probes() -> list[str]:
    """What the toolkit meets when handed a compiled model: it resolves layers and attaches recorders after compiling.

    On a one-convolution ``cnn`` (8x8 inputs), which compiles in seconds; the behaviour
    does not depend on the model.
    """
    from mergescope_plugins.zoo import SmallCNN

    lines = []
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = SmallCNN(widths=[8], batchnorm=True).build((1, 8, 8), 10).eval()
    workload = Workload("tiny", "", model, [torch.randn(16, 1, 8, 8)], ["relu*"], "relu1")
    compiled = torch.compile(model)
    x = workload.batches[0]
    with torch.no_grad():
        compiled(x)  # compiled without recorders, as a user would before handing it over
    try:
        names = list(resolve_layers(compiled, workload.layers, workload.name))
        lines.append(f"the compiled module's layer selectors {workload.layers} give {names[:2]}...")
    except Exception as exc:  # the wrapper prefixes every name with _orig_mod.
        lines.append(f"the compiled module's layers do not resolve: {str(exc).splitlines()[0][:160]}")
    captured: dict[str, np.ndarray] = {}
    handles = attach_recorders(model, workload.layers, lambda n, o: captured.__setitem__(n, summarise(o, "mean")))
    with torch.no_grad():
        compiled(x)
    for h in handles:
        h.remove()
    if captured:
        lines.append(f"recorders attached after compiling fire ({len(captured)} layers)")
    else:
        lines.append("recorders attached after compiling are silently ignored (nothing recorded)")
    torch._dynamo.reset()
    return lines


def run_workload(workload: Workload, reps: int, with_compile: bool, probes: bool) -> dict[str, dict]:
    print(
        f"\n== {workload.name}: {workload.what}; records {' '.join(workload.layers)}, compares {workload.exact_layer}"
    )
    print(f"   {load()} before", flush=True)
    variants = [v for v in VARIANTS if with_compile or not v.compile]
    runners: dict[str, Runner] = {}
    results: dict[str, dict] = {}
    compile_info: dict[str, object] = {}
    for v in variants:
        if v.compile:
            torch._dynamo.reset()
            try:
                runner = Runner(workload, v)
                first = timed(runner.run)
            except Exception as exc:  # no compiler, an unsupported op: say why and go on
                reason = traceback.format_exception_only(exc)[-1].strip().splitlines()[0]
                print(f"   compile: FAILED, left out: {reason[:300]}", flush=True)
                continue
            compile_info["first"] = first
        else:
            runner = Runner(workload, v)
            runner.run(workload.batches[:1])  # warm-up: oneDNN primitives, allocator (all batches alike)
        runners[v.name] = runner
    times = interleave({name: r.run for name, r in runners.items()}, reps)
    base = runners["baseline"].outputs
    for name, runner in runners.items():
        if name == "baseline":
            continue
        r = ratios(times, name)
        e = exactness(base, runner.outputs)
        results[name] = {**r, **e, "class": classify(r), "variant": runner.variant}
        print(f"   {name:<15} {speed_line(name, r)}")
        print(f"   {'':<15} {exact_line(e)}; {classify(r)}, {'exact' if e['exact'] else 'NOT exact'}", flush=True)
    baseline_seconds = statistics.median(t[0] for t in times["baseline"])
    print(f"   baseline pass: median {baseline_seconds:.2f} s wall", flush=True)
    if "compile" in runners:
        first_wall = compile_info["first"][0]  # type: ignore[index]
        # A steady compiled pass and its saving, from the median ratio (absolute times drift with the load).
        steady = baseline_seconds * results["compile"]["wall"]
        saving = baseline_seconds - steady
        cost = first_wall - steady
        breakeven = f"{cost / saving:.0f} passes" if saving > 0 else "never (not faster)"
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
        state = (
            "empty inductor cache" if Path(cache).name.startswith("cpuspeed-inductor-") else "inductor cache as found"
        )
        print(
            f"   compile: first pass {first_wall:.1f} s wall ({state}; compiling about {cost:.1f} s over a steady "
            f"pass of {steady:.2f} s); break-even against the baseline after {breakeven}",
            flush=True,
        )
        results["compile"].update(compile_s=cost, breakeven=breakeven)
        if probes:
            # A last batch smaller than the others (most datasets) is a new shape: dynamo compiles again.
            runner = runners["compile"]
            smaller = workload.batches[0][: max(1, len(workload.batches[0]) // 5)]
            with torch.no_grad():
                wall, _cpu = timed(lambda: runner.module(smaller))
            per_batch = steady / len(workload.batches)  # batches of one size
            print(
                f"   compile: then a smaller batch ({len(smaller)} images, as a last batch): {wall:.1f} s "
                f"(a steady batch of {len(workload.batches[0])}: {per_batch:.2f} s)",
                flush=True,
            )
            probe_lines = hook_probes()
            for line in probe_lines:
                print(f"   compile: {line}", flush=True)
            results["compile"]["hooks_after_compile_ok"] = not any("silently" in line for line in probe_lines)
    for runner in runners.values():
        for h in runner.handles:
            h.remove()
    torch._dynamo.reset()
    print(f"   {load()} after", flush=True)
    return results


# ---------------------------------------------------------------------- end to end


class ConvertInputs(nn.Module):
    """A model that converts each batch to channels_last before the wrapped model sees it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last))


@dataclass(frozen=True)
class E2EVariant:
    name: str
    inference_mode: bool = False
    channels_last: str = ""  # "", "model" (inputs stay NCHW) or "input" (a wrapper converts them)
    bf16: bool = False

    def model(self, base: nn.Module) -> nn.Module:
        if not self.channels_last:
            return base
        # The toolkit's own placement: channels-last for a CPU network with convolutions.
        converted = place(copy.deepcopy(base), "cpu")
        return ConvertInputs(converted) if self.channels_last == "input" else converted

    def context(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        if self.inference_mode:
            stack.enter_context(torch.inference_mode())
        stack.enter_context(toolkit_autocast("cpu", "bf16" if self.bf16 else "fp32"))
        return stack


E2E_VARIANTS = {
    v.name: v
    for v in [
        E2EVariant("baseline"),
        E2EVariant("inference_mode", inference_mode=True),
        E2EVariant("channels_last model", channels_last="model"),
        E2EVariant("channels_last+input", channels_last="input"),
        E2EVariant("bf16 (toolkit)", bf16=True),
        E2EVariant("bf16+cl+input", bf16=True, channels_last="input"),
    ]
}


class Collections:
    """``collect_store`` of one variant into fresh directories; what exactness needs is kept, the rest removed."""

    def __init__(self, variant: E2EVariant, base: nn.Module, data, root: Path) -> None:
        self.variant = variant
        self.model = variant.model(base)
        self.data, self.root = data, root
        self.spec = StoreSpec(layers={"resnet18": ["type:BasicBlock"]}, topk=10, covariance=True)
        self.means: np.ndarray | None = None
        self.evaluation: tuple[float, float] | None = None

    def run(self, shard: tuple[int, int] = (0, 1)) -> None:
        directory = Path(tempfile.mkdtemp(prefix="cpuspeed-", dir=self.root))
        try:
            with self.variant.context():
                store = collect_store({"resnet18": self.model}, self.data, self.spec, directory, shard=shard)
            layer = store.layers("resnet18")[-1]  # the deepest block
            self.means = np.asarray(store.moments("resnet18", layer).mean)
            ev = store.evaluation("resnet18")
            self.evaluation = (ev.loss, ev.accuracy)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def e2e_compare(
    names: Sequence[str], samples: int, reps: int, root: Path
) -> tuple[dict[str, dict], dict[str, Collections]]:
    data = synthetic_images(samples, 64)
    base = resnet18(0)
    runs = {name: Collections(E2E_VARIANTS[name], base, data, root) for name in names}
    for c in runs.values():  # warm-up on a slice: netCDF, oneDNN primitives
        c.run(shard=(0, max(1, samples // 256)))
    times = interleave({name: c.run for name, c in runs.items()}, reps)
    results = {}
    ref = runs["baseline"]
    for name, c in runs.items():
        if name == "baseline":
            continue
        assert ref.means is not None and c.means is not None and ref.evaluation and c.evaluation
        mean_abs, mean_rel = diff(ref.means, c.means)
        results[name] = {
            **ratios(times, name),
            "mean_abs": mean_abs,
            "mean_rel": mean_rel,
            "loss_diff": abs(ref.evaluation[0] - c.evaluation[0]),
            "acc_diff": abs(ref.evaluation[1] - c.evaluation[1]),
        }
    results["baseline"] = {"seconds": statistics.median(t[0] for t in times["baseline"])}
    return results, runs


def e2e_lines(results: dict[str, dict]) -> list[str]:
    lines = []
    for name, r in results.items():
        if name == "baseline":
            continue
        lines.append(f"   {name:<20} {speed_line(name, r)}")
        lines.append(
            f"   {'':<20} channel means (moments) max abs {r['mean_abs']:.1e} rel {r['mean_rel']:.1e}; "
            f"evaluation loss diff {r['loss_diff']:.1e}, accuracy diff {r['acc_diff']:.1e}"
        )
    lines.append(f"   baseline collection: median {results['baseline']['seconds']:.2f} s wall")
    return lines


def run_e2e(names: Sequence[str], samples: int, reps: int, root: Path) -> dict[str, dict]:
    print(
        f"\n== e2e: collect_store on resnet18, {samples} random 64x64 images, batch 256 (BasicBlocks, top-k, covariance)"
    )
    print(f"   {load()} before", flush=True)
    results, _ = e2e_compare(names, samples, reps, root)
    for line in e2e_lines(results):
        print(line, flush=True)
    print(f"   {load()} after", flush=True)
    return results


def interleaved_before_after(quick: bool) -> list[str]:
    """The adopted change(s) against today's default on the resnet18 collection, one interleaved run.

    "Before" is ``collect_store`` as it is; "after" applies :data:`ADOPTED` from outside
    the toolkit (the variant of the same name in ``E2E_VARIANTS``). Returns printable
    lines: the ratio after/before (wall and process CPU time, medians of interleaved
    repetitions) and how far the recorded statistics moved.
    """
    samples, reps = (256, 3) if quick else (512, 5)
    root = Path(tempfile.mkdtemp(prefix="cpuspeed-ba-"))
    try:
        start = load()
        results, _ = e2e_compare(["baseline", ADOPTED], samples, reps, root)
        r = results[ADOPTED]
        verdict = "faster" if max(r["wall"], r["cpu"]) <= SPEED_GAIN else "not 5 % faster"
        return [
            f"before/after: collect_store on resnet18, {samples} random 64x64 images, {reps} interleaved reps; "
            f"after = {ADOPTED}",
            f"    after/before {speed_line(ADOPTED, r)}; {verdict}",
            f"    channel means max abs {r['mean_abs']:.1e} rel {r['mean_rel']:.1e}; "
            f"evaluation loss diff {r['loss_diff']:.1e}, accuracy diff {r['acc_diff']:.1e}",
            f"    before {results['baseline']['seconds']:.2f} s, after {r['seconds']:.2f} s (medians); "
            f"{start} before, {load()} after",
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------- conclusions


def conclude(per_workload: dict[str, dict[str, dict]], e2e: dict[str, dict]) -> list[str]:
    lines = []
    names = [v.name for v in VARIANTS if v.name != "baseline"]
    for name in names:
        rows = {w: res[name] for w, res in per_workload.items() if name in res}
        if not rows:
            continue
        classes = {w: r["class"] for w, r in rows.items()}
        faster = [w for w, c in classes.items() if c == "faster"]
        slower = [w for w, c in classes.items() if c == "slower"]
        speed = ", ".join(f"{w} {r['wall']:.2f}/{r['cpu']:.2f}" for w, r in rows.items())
        variant: Variant = next(iter(rows.values()))["variant"]
        if variant.bf16:
            worst = max(max(r["logit_rel"], r["mean_rel"]) for r in rows.values())
            agree = min(r["agree"] for r in rows.values())
            error = f"rel error up to {worst:.1e}, argmax agreement down to {100 * agree:.1f} %"
            if faster and not slower:
                verdict = "offer as option (an opt-in precision)"
            elif faster:
                verdict = "offer as option only where it is faster (slower on " + ", ".join(slower) + ")"
            else:
                verdict = "not worth it"
            lines.append(f"{name:<15} {verdict}; wall/CPU {speed}; {error}")
            continue
        exact = all(r["exact"] for r in rows.values())
        worst = max(max(r["logit_rel"], r["mean_rel"]) for r in rows.values())
        if not exact:
            verdict = f"not worth it as fp32 (not exact: rel diff up to {worst:.1e})"
        elif faster and not slower:
            verdict = "adopt as default"
        elif faster:
            verdict = "offer as option (slower on " + ", ".join(slower) + ")"
        else:
            verdict = "not worth it (not 5 % faster on any workload)"
        extra = ""
        if variant.compile:
            extra = "; compiling / break-even: " + ", ".join(
                f"{w} {r.get('compile_s', float('nan')):.0f} s / {r.get('breakeven', '?')}" for w, r in rows.items()
            )
            if any(r.get("hooks_after_compile_ok") is False for r in rows.values()):
                extra += "; recorders attached after compiling are silently ignored"
            if verdict.startswith("adopt"):
                verdict = "offer as option (compiles per model and batch shape; recorders must be attached first)"
        lines.append(f"{name:<15} {verdict}; wall/CPU {speed}; max rel diff {worst:.1e}{extra}")
    if "channels_last model" in e2e and "channels_last+input" in e2e:
        model, both = e2e["channels_last model"], e2e["channels_last+input"]
        lines.append(
            f"e2e collect_store, channels_last applied from outside: model only {model['wall']:.2f}/{model['cpu']:.2f}, "
            f"with the input converted {both['wall']:.2f}/{both['cpu']:.2f} (wall/CPU)"
        )
    return lines


# ------------------------------------------------------------------------- main


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    flags = ""
    with contextlib.suppress(OSError):
        have = set(Path("/proc/cpuinfo").read_text().split())
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have)
    return (
        f"{os.cpu_count()} cpus ({model}; {flags}), torch {torch.__version__} ({torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, mkldnn {torch.backends.mkldnn.is_available()}), "
        f"python {platform.python_version()}, {datetime.date.today().isoformat()}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="cnn and resnet18 without compile, a smaller e2e (about 2 min)"
    )
    parser.add_argument("--only", help="subset of cnn,resnet18,resnet50,e2e (default: all; --quick: no resnet50)")
    parser.add_argument("--reps", type=int, help="interleaved repetitions (default 3 quick, 5 full; resnet50 3)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="measure torch.compile on cnn and resnet18 (default: on, off with --quick; a minute or two each)",
    )
    parser.add_argument(
        "--warm-compile-cache",
        action="store_true",
        help="compile with inductor's usual on-disk cache (default: an empty one, so compile times are cold)",
    )
    parser.add_argument("--before-after", action="store_true", help="also run interleaved_before_after")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--workdir", type=Path, help="directory for temporary stores (default: system temp)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    default = "cnn,resnet18,e2e" if args.quick else "cnn,resnet18,resnet50,e2e"
    wanted = {s.strip().lower() for s in (args.only or default).split(",")}
    reps = args.reps or (3 if args.quick else 5)
    with_compile = (not args.quick) if args.compile is None else args.compile
    root = Path(args.workdir or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    cache = None
    if with_compile and not args.warm_compile_cache and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        cache = tempfile.mkdtemp(prefix="cpuspeed-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read at each compile
    try:
        run(args, wanted, reps, with_compile, root)
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)


def run(args: argparse.Namespace, wanted: set[str], reps: int, with_compile: bool, root: Path) -> None:
    start = time.perf_counter()
    print(f"command: {COMMAND}")
    print(f"machine: {machine()}")
    print(f"{load()} at the start", flush=True)
    per_workload: dict[str, dict[str, dict]] = {}
    builders = {"cnn": cnn_workload, "resnet18": resnet18_workload, "resnet50": resnet50_workload}
    for name, build in builders.items():
        if name not in wanted:
            continue
        workload = build(args.quick)
        compile_here = with_compile and name != "resnet50"
        if with_compile and name == "resnet50":
            print("\n(resnet50: compile left out, compiling it takes minutes here; see cnn and resnet18)")
        # cnn passes take a second, resnet50 passes many: more and fewer repetitions.
        w_reps = {"resnet50": args.reps or 3, "cnn": args.reps or reps + 2}.get(name, reps)
        per_workload[name] = run_workload(workload, w_reps, compile_here, probes=name == "cnn")
    e2e: dict[str, dict] = {}
    if "e2e" in wanted:
        names = ["baseline", "channels_last model", "channels_last+input"] if args.quick else list(E2E_VARIANTS)
        e2e = run_e2e(names, 256, args.reps or reps + 2, root)
    if per_workload or e2e:
        print(
            "\n== conclusions (wall/CPU ratio to the baseline; faster: both <= 0.95; exact: rel diff <= 1e-05 "
            "and every argmax the same)"
        )
        for line in conclude(per_workload, e2e):
            print(f"   {line}", flush=True)
    if args.before_after:
        print()
        for line in interleaved_before_after(args.quick):
            print(line, flush=True)
    print(f"\n{load()} at the end; {time.perf_counter() - start:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
