"""Benchmark of the ``feature-vis`` visualizer (:mod:`mergescope_plugins.feature_vis`) against torch-lucent.

On the demo's three MNIST CNNs (``cnn``, widths 16-32-64-64 with BatchNorm, trained as
``mergescope demo`` trains them; loaded from the model cache, or trained once, about a
minute each), the same units of layer ``relu3`` are visualised by

- ours: ``FeatureVis`` with its defaults (all units in one batch, one pass per step;
  Adam at 0.1);
- the peer: torch-lucent's ``render_vis``, one call per unit as its documentation does
  it, with ``param.image(28, channels=1)`` (Fourier, sigmoid), Adam at its 0.05
  (``--peer-lr`` changes it), its
  transforms at the same amounts as ours (pad 3 with its grey, jitter 2, its scales and
  angles, jitter 2: its jitter needs at least 2 pixels), the data's normalisation
  appended and no resizing (``fixed_image_size=0``; it would otherwise upsample the
  28-pixel image to 224).

Both run the same number of steps on 28x28 images. Two figures, measured side by side:

F1  time per unit, ours over the peer (target <= 1). Repetitions are interleaved and
    their order alternated; the median of the per-repetition ratios is reported.
F2  the share of units whose image reaches at least the peer's activation (target >=
    90 %): each final image, stored as 8 bits, is measured the same way (the channel's
    mean at ``relu3``, no transforms). Beside it, the share of units whose image beats
    the unit's top image among MNIST-5000's test split, for each side.

torch-lucent is not a dependency of mergescope; install it into the same environment
for this benchmark only::

    pip install torch-lucent --no-deps && pip install kornia decorator

(torch-lucent 0.1.8 pins kornia <= 0.4.1, which no longer installs beside current torch;
with a newer kornia, the two functions it reads from kornia's top level are linked
here from ``kornia.geometry.transform``.) Run ``--help`` for options.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np
import torch

from mergescope.components import Context
from mergescope.training import Training, trained_model
from mergescope_plugins.datasets import MNIST5000
from mergescope_plugins.feature_vis import FeatureVis
from mergescope_plugins.zoo import SmallCNN

COMMAND = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
LAYER = "relu3"
MEAN, STD = 0.1307, 0.3081  # mnist5000's normalisation
F1_TARGET, F2_TARGET = 1.0, 0.9
INSTALL = "pip install torch-lucent --no-deps && pip install kornia decorator"


def lucent_modules():
    """torch-lucent's modules, or exit saying how to install it."""
    try:
        import kornia
        from lucent.optvis import objectives, param, render, transform
    except ImportError as exc:
        sys.exit(
            f"this benchmark compares with torch-lucent, which is missing ({exc}); install it with:\n    {INSTALL}"
        )
    for name in ("get_rotation_matrix2d", "warp_affine"):  # read from kornia's top level by torch-lucent 0.1.8
        if not hasattr(kornia, name):
            setattr(kornia, name, getattr(kornia.geometry.transform, name))
    return objectives, param, render, transform


def demo_models(count: int) -> dict[str, torch.nn.Module]:
    architecture = SmallCNN(widths=[16, 32, 64, 64], batchnorm=True)
    return {
        f"cnn{seed}": trained_model(architecture, MNIST5000(split="train"), Training(seed=seed, epochs=3)).eval()
        for seed in range(count)
    }


def measure(model: torch.nn.Module, pixels: np.ndarray, units: list[int]) -> np.ndarray:
    """Each image's channel mean at relu3 for its unit; ``pixels`` ``(units, 1, 28, 28)`` uint8."""
    acts = {}
    handle = model.relu3.register_forward_hook(lambda _m, _i, out: acts.__setitem__("a", out))
    try:
        with torch.no_grad():
            model((torch.as_tensor(pixels, dtype=torch.float32) / 255 - MEAN) / STD)
    finally:
        handle.remove()
    return acts["a"].mean(dim=(2, 3))[torch.arange(len(units)), torch.tensor(units)].double().numpy()


def ours(model: torch.nn.Module, units: list[int], steps: int, data) -> tuple[np.ndarray, np.ndarray]:
    """Our images ``(units, 1, 28, 28)`` uint8 and each unit's top dataset activation."""
    context = Context(data=data, quiet=True, layers=[LAYER], batch_size=500)
    ds = FeatureVis(units=units, steps=steps).visualize({"m": model}, context)
    return ds["pixels"].values[0, 0, :, 0], ds["top_dataset_activation"].values[0, 0]


def peer(model: torch.nn.Module, units: list[int], steps: int, lucent, lr: float = 0.05) -> np.ndarray:
    """torch-lucent's images ``(units, 1, 28, 28)`` uint8, one ``render_vis`` per unit."""
    objectives, param, render, transform = lucent
    transforms = [
        transform.pad(3, mode="constant", constant_value=0.5),
        transform.jitter(2),
        transform.random_scale([1 + (i - 5) / 50.0 for i in range(11)]),
        transform.random_rotate(list(range(-10, 11)) + 5 * [0]),
        transform.jitter(2),
        lambda image: (image - MEAN) / STD,
    ]
    images = []
    for unit in units:
        # torch-lucent draws from the global generators.
        torch.manual_seed(unit)
        np.random.seed(unit)
        found = render.render_vis(
            model,
            objectives.channel(LAYER, unit),
            lambda: param.image(28, channels=1),
            optimizer=lambda params: torch.optim.Adam(params, lr=lr),
            transforms=transforms,
            thresholds=(steps,),
            preprocess=False,
            progress=False,
            show_image=False,
            fixed_image_size=0,
        )[-1]  # (1, 28, 28, 1) in [0, 1]
        images.append(np.rint(np.clip(found[0].transpose(2, 0, 1), 0, 1) * 255).astype(np.uint8))
    return np.stack(images)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one model, 8 units, one repetition")
    parser.add_argument("--models", type=int, default=None, help="demo CNNs (default 3, quick 1)")
    parser.add_argument("--units", type=int, default=None, help="units of relu3 per model (default 16, quick 8)")
    parser.add_argument("--steps", type=int, default=256, help="optimisation steps (default 256, ours' default)")
    parser.add_argument("--peer-lr", type=float, default=0.05, help="torch-lucent's Adam rate (default its 0.05)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    lucent = lucent_modules()
    count = args.models or (1 if args.quick else 3)
    n_units = args.units or (8 if args.quick else 16)
    steps = args.steps
    reps = args.reps or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)

    print(f"command: {COMMAND}")
    print(
        f"machine: {os.cpu_count()} cpus, torch {torch.__version__} ({args.threads} threads), "
        f"python {platform.python_version()}, {datetime.date.today().isoformat()}",
        flush=True,
    )
    models = demo_models(count)
    data = MNIST5000(split="test").load()
    units = list(np.linspace(0, 63, n_units).round().astype(int))
    # Warm-up outside the timing: imports, the first passes.
    ours(models["cnn0"], units[:1], 2, data)
    peer(models["cnn0"], units[:1], 2, lucent)

    ratios, times = [], {"ours": [], "peer": []}
    reached: dict[str, list[np.ndarray]] = {"ours": [], "peer": []}
    tops = []
    for name, model in models.items():
        for rep in range(reps):
            order = ("peer", "ours") if rep % 2 == 0 else ("ours", "peer")
            took = {}
            for side in order:
                start = time.perf_counter()
                if side == "ours":
                    pixels, top = ours(model, units, steps, data)
                else:
                    pixels = peer(model, units, steps, lucent, args.peer_lr)
                took[side] = (time.perf_counter() - start) / len(units)
                if rep == 0:  # both sides are deterministic: the first repetition's images stand for all
                    reached[side].append(measure(model, pixels, units))
                    if side == "ours":
                        tops.append(top)
            ratios.append(took["ours"] / took["peer"])
            for side in took:
                times[side].append(took[side])
        print(f"  {name}: done", flush=True)

    ratio = statistics.median(ratios)
    print(
        f"F1 time per unit, ours / torch-lucent render_vis ({count} models x {len(units)} units of {LAYER}, "
        f"{steps} steps, 28x28; Adam at {FeatureVis().lr:g} and {args.peer_lr:g}): ratio {ratio:.3f} (target <= {F1_TARGET:g})"
    )
    print(
        f"    {'met' if ratio <= F1_TARGET else 'MISSED'}; per unit: ours {statistics.median(times['ours']):.3f} s, "
        f"torch-lucent {statistics.median(times['peer']):.3f} s; ratios {' '.join(f'{r:.3f}' for r in ratios)}"
    )
    a, b, top = np.concatenate(reached["ours"]), np.concatenate(reached["peer"]), np.concatenate(tops)
    share = float(np.mean(a >= b))
    print(
        f"F2 units whose image reaches at least torch-lucent's activation: {share:.1%} of {len(a)} "
        f"(target >= {F2_TARGET:.0%})"
    )
    print(
        f"    {'met' if share >= F2_TARGET else 'MISSED'}; median activation ours {np.median(a):.3f}, "
        f"torch-lucent {np.median(b):.3f}, top dataset image {np.median(top):.3f}; beating the top dataset image: "
        f"ours {np.mean(a > top):.1%}, torch-lucent {np.mean(b > top):.1%}"
    )


if __name__ == "__main__":
    main()
