"""Weight matching (Git Re-Basin) to convergence: ``match_weights`` against a reference-style loop.

W1  torchvision ``resnet18`` (ImageNet head, ``weights=None``), two random inits seeded 0
    and 1: the time of :func:`mergescope_plugins.weight_matching.match_weights` until no
    group improves, the number of sweeps, and the time of the ``channel_groups`` tracing
    that finds the groups (measured on its own).
W2  The same for the zoo ``cnn`` and ``mlp`` on 28x28 grey inputs, for contrast.
W3  On request (``--only alexnet``): torchvision ``alexnet``, whose two 4096-unit
    classifier groups make ``linear_sum_assignment`` the cost rather than the products.

The baseline is a straightforward re-implementation in the style of the original Git
Re-Basin code: for every group (same random order per sweep), for every (parameter,
axis) of the group, the other model's parameter is gathered with *every* other
permutation applied on every axis (a ``get_permuted_param`` over all axes), both sides
are moved to ``(units, -1)`` matrices and ``A += W_a @ W_b.T`` is accumulated, then
``linear_sum_assignment``; the groups come from the same ``channel_groups`` and the
convergence rule is ours (a group's permutation changes only when it improves the
objective by more than ``1e-12`` relative), so both sides must return identical
permutations, which is checked in every repetition.

Repetitions of ours and the baseline are interleaved (their order alternated); the
median of the per-repetition time ratios (ours / baseline) is printed beside the median
times, the process CPU-time ratio and the load average. Run ``--help`` for options.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import os
import platform
import pstats
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import threadpoolctl
import torch
from scipy.optimize import linear_sum_assignment

from mergescope.groups import Axis, ChannelGroup, channel_groups
from mergescope_plugins.weight_matching import match_weights

COMMAND = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
SEED = 0  # seeds the random group order of both sides
GOAL_SECONDS = 5.0  # "a few seconds, not minutes" for resnet18, tracing included


# ---------------------------------------------------------------------- workloads


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def as_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The state dict as float64 arrays, as ``WeightMatching.align`` hands it to ``match_weights``."""
    return {k: v.detach().cpu().double().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}


def resnet18(seed: int) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).eval()


def alexnet(seed: int) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.alexnet(weights=None).eval()


def zoo(name: str, seed: int) -> torch.nn.Module:
    from mergescope_plugins.zoo import MLP, SmallCNN

    torch.manual_seed(seed)
    return {"cnn": SmallCNN, "mlp": MLP}[name]().build((1, 28, 28), 10).eval()


WORKLOADS: dict[str, tuple[Callable[[int], torch.nn.Module], tuple[int, ...]]] = {
    "resnet18": (resnet18, (2, 3, 224, 224)),
    "alexnet": (alexnet, (2, 3, 224, 224)),  # only on request: two 4096-unit groups, minutes per side
    "cnn": (lambda seed: zoo("cnn", seed), (2, 1, 28, 28)),
    "mlp": (lambda seed: zoo("mlp", seed), (2, 1, 28, 28)),
}


# ---------------------------------------------------------------------- baseline


class PermSpec:
    """A Git Re-Basin style permutation spec built from channel groups.

    ``axes_to_perm[param][axis]`` lists the ``(group, Axis)`` owning blocks of that axis
    (one, except after a ``cat``); ``perm_to_axes[group]`` lists the group's axes.
    """

    def __init__(self, groups: Sequence[ChannelGroup]) -> None:
        self.groups = list(groups)
        self.axes_to_perm: dict[str, dict[int, list[tuple[ChannelGroup, Axis]]]] = {}
        for g in self.groups:
            for ax in g.axes:
                self.axes_to_perm.setdefault(ax.param, {}).setdefault(ax.axis, []).append((g, ax))


def block_index(perm: np.ndarray, ax: Axis) -> np.ndarray:
    """The entries of ``ax``'s block along its axis, in the order ``perm`` puts the units."""
    return ax.offset + (perm[:, None] * ax.repeat + np.arange(ax.repeat)[None, :]).reshape(-1)


def get_permuted_param(
    spec: PermSpec,
    perms: Mapping[str, np.ndarray],
    key: str,
    params: Mapping[str, np.ndarray],
    except_axis: int | None = None,
    except_group: str | None = None,
) -> np.ndarray:
    """``params[key]`` with every permutation applied on every axis, but not ``except_group`` on ``except_axis``."""
    w = params[key]
    for axis, owners in spec.axes_to_perm.get(key, {}).items():
        index = np.arange(w.shape[axis])
        applied = False
        for g, ax in owners:
            if axis == except_axis and g.name == except_group:
                continue
            start, stop = ax.span(g.size)
            index[start:stop] = block_index(perms[g.name], ax)
            applied = True
        if applied:
            w = np.take(w, index, axis=axis)
    return w


def as_rows(w: np.ndarray, ax: Axis, size: int) -> np.ndarray:
    start, stop = ax.span(size)
    return np.moveaxis(w, ax.axis, 0)[start:stop].reshape(size, -1)


def reference_weight_matching(
    spec: PermSpec,
    params_a: Mapping[str, np.ndarray],
    params_b: Mapping[str, np.ndarray],
    *,
    seed: int = 0,
    max_iter: int = 100,
) -> tuple[dict[str, np.ndarray], int]:
    """Coordinate descent over the groups, every score matrix rebuilt from scratch."""
    perms = {g.name: np.arange(g.size) for g in spec.groups}
    rng = np.random.default_rng(seed)
    for iteration in range(max_iter):
        progress = False
        for p_ix in rng.permutation(len(spec.groups)):
            g = spec.groups[p_ix]
            n = g.size
            A = np.zeros((n, n))
            for ax in g.axes:
                w_a = as_rows(params_a[ax.param], ax, n)
                w_b = get_permuted_param(spec, perms, ax.param, params_b, except_axis=ax.axis, except_group=g.name)
                w_b = as_rows(w_b, ax, n)
                A += w_a @ w_b.T
            ri, ci = linear_sum_assignment(A, maximize=True)
            assert np.array_equal(ri, np.arange(n))
            old_l = np.vdot(A, np.eye(n)[perms[g.name]])
            new_l = np.vdot(A, np.eye(n)[ci, :])
            # The convergence rule of match_weights (relative tolerance, keep the old
            # permutation unless the new one is better), so both find the same fixed point.
            if new_l > old_l + 1e-12 * max(1.0, abs(old_l)):
                perms[g.name] = ci
                progress = True
        if not progress:
            return perms, iteration + 1
    return perms, max_iter


# ---------------------------------------------------------------------- measuring


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def same_perms(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def gemm_gflop_per_sweep(groups: Sequence[ChannelGroup], params: Mapping[str, np.ndarray]) -> float:
    """The matrix products of one sweep, in GFLOP: ``2 * size * numel`` per (group, axis)."""
    return sum(2 * g.size * params[ax.param].size for g in groups for ax in g.axes) / 1e9


def gemm_rate() -> float:
    """float64 GEMM rate of NumPy's BLAS right now, in GFLOP/s (a 512 x 4608 by 4608 x 512 product)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(512, 4608)), rng.normal(size=(512, 4608))
    x @ y.T
    start = time.perf_counter()
    for _ in range(3):
        x @ y.T
    return 3 * 2 * 512 * 512 * 4608 / (time.perf_counter() - start) / 1e9


def run(name: str, reps: int, trace_reps: int, do_profile: bool) -> dict:
    build, input_shape = WORKLOADS[name]
    model_a, model_b = build(0), build(1)
    example = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    trace_times = []
    for _ in range(trace_reps):
        seconds, _cpu, groups = timed(lambda: channel_groups(model_a, example))
        trace_times.append(seconds)
    params_a, params_b = as_arrays(model_a), as_arrays(model_b)
    spec = PermSpec(groups)
    sizes = sorted({g.size for g in groups})
    print(
        f"W {name}: {len(groups)} groups (sizes {sizes[0]}..{sizes[-1]}, {sum(len(g.axes) for g in groups)} axes), "
        f"{sum(v.size for v in params_a.values()) / 1e6:.1f} M floats; "
        f"channel_groups tracing {statistics.median(trace_times):.2f} s (median of {trace_reps}); load {load()}",
        flush=True,
    )

    times: dict[str, list[tuple[float, float]]] = {"ours": [], "base": []}
    sweeps: dict[str, set[int]] = {"ours": set(), "base": set()}
    identical = True
    for rep in range(reps):
        order = ["ours", "base"] if rep % 2 else ["base", "ours"]
        results = {}
        for side in order:
            if side == "ours":
                fn = lambda: match_weights(params_a, params_b, groups, seed=SEED)  # noqa: E731
            else:
                fn = lambda: reference_weight_matching(spec, params_a, params_b, seed=SEED)  # noqa: E731
            wall, cpu, (perms, n) = timed(fn)
            times[side].append((wall, cpu))
            sweeps[side].add(n)
            results[side] = (perms, n)
        identical &= same_perms(results["ours"][0], results["base"][0]) and results["ours"][1] == results["base"][1]
        print(
            f"    rep {rep + 1}/{reps} ({' then '.join(order)}): ours {times['ours'][-1][0]:.2f} s, "
            f"baseline {times['base'][-1][0]:.2f} s, {results['ours'][1]} sweeps; load {load()}",
            flush=True,
        )
    ratios = [o[0] / b[0] for o, b in zip(times["ours"], times["base"])]
    cpu_ratios = [o[1] / b[1] for o, b in zip(times["ours"], times["base"])]
    ours = statistics.median(t[0] for t in times["ours"])
    base = statistics.median(t[0] for t in times["base"])
    n_sweeps = max(sweeps["ours"])  # the same in every repetition: the algorithm is deterministic
    trace = statistics.median(trace_times)
    print(
        f"W {name} match_weights vs reference-style loop: ratio {statistics.median(ratios):.2f} "
        f"(ours / baseline; identical permutations and sweeps: {identical})",
        flush=True,
    )
    print(
        f"    ratios {' '.join(f'{r:.2f}' for r in ratios)}; median ours {ours:.2f} s, baseline {base:.2f} s; "
        f"CPU-time ratio {statistics.median(cpu_ratios):.2f}; {n_sweeps} sweeps to convergence, "
        f"{ours / n_sweeps:.3f} s per sweep (ours); tracing + matching {trace + ours:.2f} s",
        flush=True,
    )
    gflop = gemm_gflop_per_sweep(groups, params_a)
    rate = gemm_rate()
    print(
        f"    matrix products: {gflop:.2f} GFLOP per sweep, {gflop * n_sweeps:.1f} GFLOP to convergence; "
        f"float64 GEMM rate now {rate:.1f} GFLOP/s, so at least {gflop * n_sweeps / rate:.2f} s of products",
        flush=True,
    )
    if name == "resnet18":
        verdict = "met" if trace + ours <= GOAL_SECONDS else "MISSED"
        print(f"    goal 'a few seconds' (tracing + matching <= {GOAL_SECONDS:g} s): {verdict}", flush=True)
    if do_profile:
        profile(name, params_a, params_b, groups)
    return {"ratio": statistics.median(ratios), "ours": ours, "base": base, "sweeps": n_sweeps, "trace": trace}


def profile(name: str, params_a: dict, params_b: dict, groups: list) -> None:
    """cProfile one ``match_weights`` run; the matrix products (``@``) count as its own time."""
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(match_weights, params_a, params_b, groups, seed=SEED)
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    rows = []
    entries = stats.stats.items()  # type: ignore[attr-defined]
    for (filename, _line, fn), (_cc, calls, tottime, _ct, _callers) in entries:
        label = fn if filename == "~" else f"{os.path.basename(filename)}:{fn}"
        if fn == "match_weights":
            label += " (own time: the @ products, score sums)"
        rows.append((tottime, calls, label))
    rows.sort(reverse=True)
    print(f"profile {name}: match_weights {total:.2f} s under cProfile; own time per function:", flush=True)
    for tottime, calls, label in rows[:8]:
        print(f"    {label:<68} {calls:6d} calls {tottime:7.2f} s  {100 * tottime / total:5.1f} %")
    rest = total - sum(r[0] for r in rows[:8])
    print(f"    {'other':<68} {'':12} {rest:7.2f} s  {100 * rest / total:5.1f} %", flush=True)


# ------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repetition on resnet18 (about two minutes)")
    parser.add_argument(
        "--only", default="resnet18,cnn,mlp", help="comma-separated subset of resnet18,cnn,mlp; alexnet on request"
    )
    parser.add_argument("--reps", type=int, help="interleaved repetitions on resnet18 (default 1 quick, 3 full)")
    parser.add_argument("--profile", action="store_true", help="also cProfile one match_weights run per model")
    parser.add_argument(
        "--blas-threads", type=int, help="limit NumPy's BLAS to this many threads (both sides alike; default: as is)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    reps = args.reps or (1 if args.quick else 3)
    wanted = [s.strip().lower() for s in args.only.split(",") if s.strip()]
    blas = [
        f"{i['internal_api']} {i['num_threads']} threads"
        for i in threadpoolctl.threadpool_info()
        if i["user_api"] == "blas"
    ]
    print(f"command: {COMMAND}")
    print(
        f"machine: {os.cpu_count()} cpus (shared), torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"numpy {np.__version__} ({', '.join(blas)}), python {platform.python_version()}, "
        f"{datetime.date.today().isoformat()}; load average (1, 5, 15 min) {load()}",
        flush=True,
    )
    unknown = [name for name in wanted if name not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {unknown[0]!r}; choose from {', '.join(WORKLOADS)}")
    if args.blas_threads:
        print(f"NumPy's BLAS limited to {args.blas_threads} thread(s) for everything below", flush=True)
    with threadpoolctl.threadpool_limits(args.blas_threads, user_api="blas"):
        for name in wanted:
            small = name in ("cnn", "mlp")
            trace_reps = 1 if args.quick and not small else 3
            run(name, reps=max(reps, 5) if small else reps, trace_reps=trace_reps, do_profile=args.profile)
    print(f"load average at the end: {load()}", flush=True)


if __name__ == "__main__":
    main()
