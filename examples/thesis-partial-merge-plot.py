"""Accuracy against the share of merged channels, one panel per partial-merge step.

Reads a run of ``thesis-partial-merge.toml`` and draws the thesis's Figure 3.2 layout:
for every ``partial-merge`` step, accuracy of the top, bottom and random orders (random:
mean over seeds, band = standard deviation) against the share of channels merged per
layer. Grey lines: model 1 and the permuted model 2 as trained (dotted) and with
BatchNorm statistics recomputed on the data (dashed, from the ``reset-bn`` step).

    python examples/thesis-partial-merge-plot.py runs/thesis-partial-merge \
        docs/experiments/thesis-partial-merge.png
"""

import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import xarray as xr

run, out = sys.argv[1], sys.argv[2]
tree = xr.open_datatree(f"{run}/results.nc")
steps = [name for name in tree.children if "merged_share" in tree[name].ds]
reset = tree["reset-bn"].ds if "reset-bn" in tree.children else None
cols = min(len(steps), 2)
rows = math.ceil(len(steps) / cols)
fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.6 * rows), sharey=True, squeeze=False)
for ax, name in zip(axes.flat, steps):
    ds = tree[name].ds
    pct = 100 * ds["fraction"].values
    for order, style in [("top", "o-"), ("bottom", "s-"), ("random", "^--")]:
        acc = 100 * ds["accuracy"].sel(order=order).values
        (line,) = ax.plot(pct, acc, style, ms=4, label=order)
        if order == "random":
            std = 100 * ds["accuracy_std"].sel(order=order).values
            ax.fill_between(pct, acc - std, acc + std, alpha=0.2, color=line.get_color())
    ends = [float(v) for v in 100 * ds["endpoint_accuracy"].values]
    ax.axhline(ends[0], color="grey", ls=":", lw=1, label="model 1 / 2 as trained")
    ax.axhline(ends[1], color="grey", ls=":", lw=1)
    if reset is not None:
        for alpha in (0.0, 1.0):
            ax.axhline(100 * float(reset["accuracy"].sel(alpha=alpha)), color="grey", ls="--", lw=1,
                       label="model 1 / 2, BN recomputed" if alpha == 0.0 else None)
    unranked = "" if ds["unranked"].item() == "merge" else ", classifier kept"
    ax.set_title(f"{name}: ranked by {ds['metric'].item()}{unranked}", fontsize=9)
    ax.set_xlabel("channels merged per layer (%)")
    ax.grid(alpha=0.3)
for ax in axes[:, 0]:
    ax.set_ylabel("test accuracy (%)")
for ax in list(axes.flat)[len(steps):]:
    ax.axis("off")
axes.flat[0].legend(fontsize=7, loc="lower left")
fig.tight_layout()
fig.savefig(out, dpi=100)
