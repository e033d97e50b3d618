"""Generate docs/experiments/seed2-crosscoder-study.md from a run of the crosscoder study.

``--record RUN_DIR``
    Reads the run's ``results.nc`` and writes what the page shows to
    ``docs/experiments/seed2-crosscoder-study.json`` (every number on the page), copies
    its figures to ``docs/experiments/seed2/`` and draws the top images of a few
    latents of every class there.
(always)
    Renders the page from that record.
``--check``
    Writes nothing; exits 1 when the page differs from what the record gives (the test
    suite runs this check).

Run from the repository root::

    python docs/generate_crosscoder_study.py --record runs/seed2-crosscoder-study
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "experiments" / "seed2-crosscoder-study.md"
RECORD = PAGE.with_suffix(".json")
FIGURES = ROOT / "docs" / "experiments" / "seed2"
MERGES = ("interpolation", "average", "pcb")
LAYER = "_blocks.15"
STUDY = "Di Pietro, Mattei & Ziegler 2025"


# ------------------------------------------------------------------ reading a run


def _steps(tree, prefix: str) -> list[str]:
    return sorted(name for name in tree.children if name.startswith(prefix))


def _node(tree, path: str):
    """The Dataset at ``path``, empty when the tree has none there."""
    import xarray as xr

    try:
        return tree[path].to_dataset()
    except KeyError:
        return xr.Dataset()


def _floats(a) -> list:
    """Any array as nested lists of floats rounded to 6 digits, ``None`` for NaN (JSON has no NaN)."""
    a = np.asarray(a, dtype=float)
    if a.ndim == 0:
        return None if not np.isfinite(a) else round(float(a), 6)
    return [_floats(v) for v in a]


def _spread(values) -> dict:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {
        "mean": round(float(v.mean()), 4),
        "min": round(float(v.min()), 4),
        "max": round(float(v.max()), 4),
        "n": int(len(v)),
    }


def extract(tree, run_dir: Path, example: str) -> dict:
    """Every number the page shows, read from the run's results ``tree`` (its ``results.nc``)."""
    sys.path.insert(0, str(ROOT / "docs"))
    from generate_claims import record as claims_record

    out: dict = {"example": example, "run": claims_record(run_dir, ROOT / example)}
    from mergescope import load_pipeline

    data = load_pipeline(ROOT / example).data.load()
    side = int(data.input_shape[-1])
    out["data"] = {"images": len(data), "parts": [str(p) for p in data.part_names], "side": side}
    tasks = tree["tasks"].to_dataset()
    out["tasks"] = {
        "models": [str(m) for m in tasks["model"].values],
        "tasks": [str(t) for t in tasks["task"].values],
        "accuracy": _floats(tasks["accuracy"].values),
        "average": _floats(tasks["average_accuracy"].values),
    }
    pcb = tree["pcb"].to_dataset()
    out["pcb_scaling"] = float(pcb["merged_scaling"]) if "merged_scaling" in pcb else None
    if "search_accuracy" in pcb:
        out["pcb_search"] = {
            "scaling": _floats(pcb["scaling"].values),
            "accuracy": _floats(pcb["search_accuracy"].values),
        }
    sweep = tree["sweep"].to_dataset()
    out["sweep"] = {
        "values": _floats(sweep["value"].values),
        "seeds": [int(s) for s in sweep["seed"].values],
        "classes": [str(c) for c in sweep["class"].values],
        "mean_fvu": _floats(sweep["mean_fvu"].values),
        "l0": _floats(sweep["l0"].values),
        "dead": _floats(sweep["dead_fraction"].values),
        "class_count": _floats(sweep["class_count"].values),
        "chosen": float(sweep["chosen"]),
        "max_fvu": float(sweep["max_fvu"]),
    }
    out["latents"] = int(tree[f"{_steps(tree, 'cc-pcb-l1-')[0]}/{LAYER}"].ds.sizes["latent"])
    out["merges"] = {}
    for name in (*MERGES, "batchtopk"):
        ds = tree[f"classes-{name}"].to_dataset()
        counts = ds["class_count"].isel(value=0)
        out["merges"][name] = {
            "steps": [str(s) for s in ds["step"].isel(value=0).values],
            "classes": {str(c): _spread(counts.sel({"class": c}).values) for c in ds["class"].values},
            "fvu": _spread(ds["mean_fvu"].isel(value=0).values),
            "l0": _spread(ds["l0"].isel(value=0).values),
            "dead": _spread(ds["dead_fraction"].isel(value=0).values),
            "value": float(ds["value"].values[0]),
        }
        cosines: dict[str, list] = {}
        for step in out["merges"][name]["steps"]:
            node = tree[f"{step}/{LAYER}"].to_dataset()
            live = ~np.asarray(node["dead"].values, dtype=bool)
            for pair in node["pair"].values:
                cosines.setdefault(str(pair), []).append(float(np.nanmean(node["cosine"].sel(pair=pair).values[live])))
        out["merges"][name]["cosine"] = {pair: _spread(v) for pair, v in cosines.items()}
    ablated = [s for s in _steps(tree, "cc-") if "ablation_accuracy" in _node(tree, f"{s}/{LAYER}")]
    if ablated:
        node = tree[f"{ablated[0]}/{LAYER}"].to_dataset()
        out["ablation"] = {
            "step": ablated[0],
            "removed": [str(r) for r in node["removed"].values],
            "latents": [int(n) for n in node["ablation_latents"].values],
            "models": [str(m) for m in node["model"].values],
            "tasks": [str(t) for t in node["task"].values],
            "baseline": _floats(node["ablation_baseline"].values),
            "change": _floats(node["ablation_change"].values),
            "random_change": _floats(node["ablation_random_change"].values),
            "random_std": _floats(node["ablation_random_change_std"].values),
            "images": [int(n) for n in node["ablation_images"].values],
        }
    levels = tree["cc-pcb-levels"]
    (layer_name,) = list(levels.children)
    node = levels[layer_name].to_dataset()
    norms = np.asarray(node["source_norm"].values, dtype=float)  # (latent, source)
    live = ~np.asarray(node["dead"].values, dtype=bool)
    layers = [str(s) for s in node["source_layer"].values]
    share = {}
    for level in sorted(set(layers)):
        cols = [i for i, s in enumerate(layers) if s == level]
        share[level] = norms[:, cols]
    total = sum(np.square(v).sum(axis=1) for v in share.values())
    fraction = {level: np.square(v).sum(axis=1) / np.maximum(total, 1e-30) for level, v in share.items()}
    low, high = sorted(fraction)
    out["levels"] = {
        "layers": [low, high],
        "latents": int(node.sizes["latent"]),
        "live": int(live.sum()),
        "mostly": {level: int(np.sum(live & (fraction[level] >= 0.9))) for level in (low, high)},
        "spanning": int(np.sum(live & (fraction[low] > 0.1) & (fraction[high] > 0.1))),
        "fvu": _floats(node["fvu"].values),
        "classes": {
            str(c): int(n)
            for c, n in zip(*np.unique(np.asarray(node["latent_class"].values).astype(str), return_counts=True))
        },
    }
    return out


def copy_figures(run_dir: Path, record: dict) -> None:
    """The run's figures the page shows, into docs/experiments/seed2/."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    plots = run_dir / "figures" / "plots"
    wanted = {}
    for name in MERGES:
        step = record["merges"][name]["steps"][0]
        for kind in ("pair-relative-norm", "ternary", "cosine", "classes", "density"):
            wanted[f"{name}-{kind}.png"] = plots / f"{step}-{LAYER}-{kind}.png"
    wanted["sweep.png"] = run_dir / "figures" / "sweep" / "sweep.png"
    levels = sorted(plots.glob("cc-pcb-levels-*-layers.png"))
    if levels:
        wanted["levels.png"] = levels[0]
    for target, source in wanted.items():
        if source.is_file():
            shutil.copyfile(source, FIGURES / target)


def draw_latents(tree, record: dict, per_class: int = 2, k: int = 8) -> None:
    """Top images of the ``per_class`` densest latents of each class of the PCB crosscoder (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mergescope import load_pipeline

    node = tree[f"{record['merges']['pcb']['steps'][0]}/{LAYER}"].to_dataset()
    data = load_pipeline(ROOT / record["example"]).data.load()
    position = {int(s): i for i, s in enumerate(np.asarray(data.sample_ids))}
    classes = np.asarray(node["latent_class"].values).astype(str)
    density = np.asarray(node["density"].values, dtype=float)
    dead = np.asarray(node["dead"].values, dtype=bool)
    rows = []
    for label in sorted(set(classes[~dead])):
        chosen = [i for i in np.argsort(-density) if classes[i] == label and not dead[i]][:per_class]
        rows += [(label, int(i)) for i in chosen]
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    fig, axes = plt.subplots(len(rows), k, figsize=(k * 1.1, len(rows) * 1.2))
    for r, (label, latent) in enumerate(rows):
        samples = np.asarray(node["topk_sample"].sel(latent=latent).values)[:k]
        for c in range(k):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(samples) and int(samples[c]) in position:
                image = np.asarray(data[position[int(samples[c])]][0]) * std + mean
                ax.imshow(np.clip(image.transpose(1, 2, 0), 0, 1))
        axes[r, 0].set_title(f"{label} #{latent}", fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(FIGURES / "latents.png", dpi=80)
    plt.close(fig)
    record["latent_rows"] = [[label, latent] for label, latent in rows]


# ----------------------------------------------------------------------- the page


def _pm(s: dict, digits: int = 1) -> str:
    if s["mean"] is None:
        return "n/a"
    if s["n"] < 2:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ({s['min']:.{digits}f} to {s['max']:.{digits}f})"


def _count(merge: dict, label: str) -> dict:
    return merge["classes"].get(label, {"mean": 0.0, "min": 0.0, "max": 0.0, "n": 1})


def _sum_counts(merge: dict, labels: list[str]) -> dict:
    """Mean and range over seeds of the summed counts of several classes (per seed)."""
    per = [merge["classes"].get(label) for label in labels]
    per = [p for p in per if p is not None]
    if not per:
        return {"mean": 0.0, "min": 0.0, "max": 0.0, "n": 1}
    return {
        "mean": sum(p["mean"] for p in per),
        "min": sum(p["min"] for p in per),
        "max": sum(p["max"] for p in per),
        "n": per[0]["n"],
    }


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def render(record: dict) -> str:
    run = record["run"]
    verdicts = {row["name"]: row for row in run["claims"]}
    merges = record["merges"]
    t = record["tasks"]
    seeds = record["sweep"]["seeds"]
    side, images = record["data"]["side"], record["data"]["images"]
    latents = record["latents"]
    scale = "at a reduced scale" if record["example"].endswith("-quick.toml") else "at its scale"
    lines = [
        "# The crosscoder study, in substance",
        "",
        f"A reproduction of {STUDY} (the crosscoder model-diffing study of merged models) {scale},",
        "offline, generated from one run of",
        f"`{record['example']}` by",
        "`python docs/generate_crosscoder_study.py --record <run>`: every number below is",
        "read from that run's `results.nc` (the record is",
        "[`seed2-crosscoder-study.json`](seed2-crosscoder-study.json)); do not edit by hand.",
        "",
        f"Run: `{run['command']}` on {run['date']}: {run['seconds']:g} s of steps and "
        f"{run['model_seconds']:g} s training or loading the models on two CPU cores"
        + (f" (steps taken from the cache: {', '.join(run['cached_steps'])})." if run["cached_steps"] else "."),
        "",
        *scale_note(record),
        "## The setup",
        "",
        "| | the study | here |",
        "|---|---|---|",
        "| tasks | Pokémon photos, tabletop dice photos | `critters` (8 procedural creature body plans), `dice` (6 kinds of rendered polyhedral dice on cluttered tables) |",
        "| natural images | mixed in | `photo-crops`: random resized crops of the 37 photos that ship offline |",
        "| base | ResNet-50, ImageNet weights | EfficientNet-Lite0, ImageNet weights (the one ImageNet CNN available offline), 128 px |",
        "| experts | fine-tuned per task | fine-tuned end to end per task under one head over every class |",
        "| merges | interpolation, averaging, PCB | interpolation (alpha 0.5, BatchNorm statistics interpolated), averaging (statistics measured again), PCB (scaling searched on validation images) |",
        f"| crosscoder | layer 4 at every position, ~100k rows, ~900 latents | last block (`{LAYER}`, 320 units per model) at "
        f"every position of its {side // 32}x{side // 32} map: {images:,} images ({', '.join(record['data']['parts'])}), "
        f"{images * (side // 32) ** 2:,} rows, {latents} latents |",
        "",
        "## Task accuracy of every model and merge",
        "",
        "Accuracy on each task's test images, among that task's classes.",
        "",
        "| model | " + " | ".join(t["tasks"]) + " | mean |",
        "|---|" + "---|" * (len(t["tasks"]) + 1),
    ]
    for m, row, avg in zip(t["models"], t["accuracy"], t["average"]):
        lines.append(f"| {m} | " + " | ".join(_pct(v) for v in row) + f" | {_pct(avg)} |")
    if record.get("pcb_search"):
        s = record["pcb_search"]
        lines += [
            "",
            "PCB's scaling, searched on the validation images (accuracy over both tasks): "
            + ", ".join(f"{a:g}: {_pct(b)} %" for a, b in zip(s["scaling"], s["accuracy"]))
            + f"; chosen {record['pcb_scaling']:g}.",
        ]
    sw = record["sweep"]
    lines += [
        "",
        "## The sparsity sweep (PCB merge)",
        "",
        f"One crosscoder per L1 coefficient and seed ({len(seeds)} seeds); the rule: the sparsest "
        f"coefficient whose FVU (mean over models and seeds) is at most {sw['max_fvu']:g}. "
        f"Chosen: **l1 = {sw['chosen']:g}**. Values are means over seeds (range in brackets).",
        "",
        "| l1 | FVU | L0 | dead % | " + " | ".join(c for c in sw["classes"] if c != "dead") + " |",
        "|---|---|---|---|" + "---|" * (len(sw["classes"]) - ("dead" in sw["classes"])),
    ]
    for i, value in enumerate(sw["values"]):
        cells = [
            _pm(_spread(sw["mean_fvu"][i]), 3),
            _pm(_spread(sw["l0"][i])),
            _pm(_spread([100 * (d or 0) for d in sw["dead"][i]])),
        ]
        for j, c in enumerate(sw["classes"]):
            if c != "dead":
                cells.append(_pm(_spread([row[j] for row in sw["class_count"][i]]), 0))
        lines.append(f"| {value:g} | " + " | ".join(cells) + " |")
    lines += ["", "![FVU, L0, dead latents and class counts against l1](seed2/sweep.png)", ""]
    lines += [
        "## Latent classes per merge, and L1 against BatchTopK",
        "",
        f"At the chosen l1, {len(seeds)} seeds each (mean, range); BatchTopK with AuxK on the PCB merge's data.",
        "",
    ]
    labels = sorted({c for m in merges.values() for c in m["classes"] if c != "dead"})
    generic = lambda c, m: c.replace(f":{m}", ":merge").replace(f"+{m}", "+merge")  # noqa: E731
    names = sorted(
        {
            generic(c, m)
            for m, v in merges.items()
            for c in v["classes"]
            if c != "dead"
            for m in [m if m != "batchtopk" else "pcb"]
        }
    )
    lines.append("| crosscoder | FVU | L0 | dead % | " + " | ".join(names) + " |")
    lines.append("|---|---|---|---|" + "---|" * len(names))
    for m, v in merges.items():
        merged = m if m != "batchtopk" else "pcb"
        by = {generic(c, merged): s for c, s in v["classes"].items()}
        cells = [
            _pm(v["fvu"], 3),
            _pm(v["l0"]),
            _pm({k: (x * 100 if isinstance(x, float) else x) for k, x in v["dead"].items()}),
        ]
        cells += [_pm(by.get(n, {"mean": 0.0, "min": 0.0, "max": 0.0, "n": 1}), 0) for n in names]
        title = f"{m} (l1 = {v['value']:g})" if m != "batchtopk" else f"PCB, BatchTopK k = {v['value']:g}"
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    del labels
    lines += [
        "",
        "Decoder cosine similarity per pair of models (mean over live latents; mean and range over seeds):",
        "",
    ]
    pairs = sorted({generic(p, m) for m in MERGES for p in merges[m]["cosine"]})
    lines.append("| crosscoder | " + " | ".join(pairs) + " |")
    lines.append("|---|" + "---|" * len(pairs))
    for m in MERGES:
        by = {generic(p, m): s for p, s in merges[m]["cosine"].items()}
        lines.append(f"| {m} | " + " | ".join(_pm(by[p], 3) if p in by else "" for p in pairs) + " |")
    lines += ["", "## The study's claims", ""]
    lines += claims_table(record, verdicts)
    lines += ["", "## Figures of the study, from this run", ""]
    for m in MERGES:
        lines += [
            f"**{m}** (seed {seeds[0]}): pairwise relative decoder norms (Figs 1-2), the three norms on a",
            "triangle (Figs 6-7), decoder cosines per pair (Figs 3-4), the class summary (Fig 5), latent density (Figs 9-10).",
            "",
            f"![pairwise relative norms, {m}](seed2/{m}-pair-relative-norm.png)",
            f"![relative norms in 3-D, {m}](seed2/{m}-ternary.png)",
            f"![cosine per pair, {m}](seed2/{m}-cosine.png)",
            f"![classes, {m}](seed2/{m}-classes.png)",
            f"![density, {m}](seed2/{m}-density.png)",
            "",
        ]
    if record.get("latent_rows"):
        lines += [
            "Top images of the two densest latents of every class of the PCB crosscoder (seed "
            f"{seeds[0]}), one row per latent, largest activation first:",
            "",
            "![top images per latent](seed2/latents.png)",
            "",
        ]
    lines += findings(record)
    if record.get("ablation"):
        lines += ablation_section(record["ablation"])
    lines += levels_section(record["levels"])
    lines += [
        "## The claims as checked by the run",
        "",
        "<!-- claims: " + record["example"] + " -->",
        "<!-- end claims -->",
        "",
    ]
    return "\n".join(lines) + "\n"


def scale_note(record: dict) -> list[str]:
    """What stood in for the study's scale, when the page comes from the quick pipeline."""
    if not record["example"].endswith("-quick.toml"):
        return []
    full = record["example"].replace("-quick.toml", ".toml")
    return [
        f"**Scale.** These numbers come from the quick pipeline, whose header says what it reduces "
        f"(rows, latents, epochs, l1 values, seeds). The study's scale is `{full}`: "
        "the same steps over 100,800 rows, 896 latents, 5 values of l1 and 3 seeds. On two CPU cores "
        "its cost is set by the 24 crosscoder trainings over 100,800 rows of 960 units (an hour or "
        "more, estimated from the quick run's speed) and by fine-tuning on 2,000 images per task. "
        "Its recordings and fine-tunes are cached, so the "
        "sweep and the seeds reuse them. On a GPU, run it with `--device cuda`. To regenerate this "
        f"page from it, run `mergescope run {full} --out runs/seed2-crosscoder-study`, then "
        "`python docs/generate_crosscoder_study.py --record runs/seed2-crosscoder-study`.",
        "",
    ]


def claims_table(record: dict, verdicts: dict) -> list[str]:
    m = record["merges"]
    t = record["tasks"]
    avg = dict(zip(t["models"], t["average"]))
    ex = lambda name: _sum_counts(m[name], ["exclusive:ft_dice", "exclusive:ft_critters", f"exclusive:{name}"])  # noqa: E731
    rows = [
        (
            "(a) PCB gives more exclusive latents than interpolation",
            "Figs 1-2",
            f"exclusive: PCB {_pm(ex('pcb'))}, interpolation {_pm(ex('interpolation'))}",
            "a-pcb-more-exclusive-than-interpolation",
        ),
    ]
    for name in MERGES:
        rows.append(
            (
                f"(b) more latents exclusive to the dice model ({name})",
                "Figs 1, 2, 5",
                f"dice {_pm(_count(m[name], 'exclusive:ft_dice'))}, critters {_pm(_count(m[name], 'exclusive:ft_critters'))}",
                f"b-dice-most-exclusive-{name}",
            )
        )
    cos = m["pcb"]["cosine"]
    rows.append(
        (
            "(c) the dice model's decoders are the least similar to the others",
            "Figs 3-4",
            f"cosine (dice, PCB) {_pm(cos.get('ft_dice~pcb', _spread([])), 3)}, (critters, PCB) {_pm(cos.get('ft_critters~pcb', _spread([])), 3)}",
            "c-dice-lowest-cosine",
        )
    )
    rows.append(
        (
            "(d) averaging looks like interpolation",
            "Figs 7-8",
            f"shared: average {_pm(_count(m['average'], 'shared'))}, interpolation {_pm(_count(m['interpolation'], 'shared'))}",
            "d-average-like-interpolation",
        )
    )
    rows.append(
        (
            "(e) the two fine-tunes' pair has the most pair-exclusive latents",
            "Figs 5-6",
            f"PCB: (dice, critters) {_pm(_count(m['pcb'], 'shared:ft_dice+ft_critters'))}, (dice, PCB) {_pm(_count(m['pcb'], 'shared:ft_dice+pcb'))}, (critters, PCB) {_pm(_count(m['pcb'], 'shared:ft_critters+pcb'))}",
            "e-fine-tunes-pair-most-pair-latents",
        )
    )
    rows.append(
        (
            "(f) PCB about 5 % more accurate than the other merges",
            "Section 3",
            f"mean task accuracy: PCB {_pct(avg.get('pcb'))} %, interpolation {_pct(avg.get('interpolation'))} %, average {_pct(avg.get('average'))} %",
            "f-pcb-5-points-above-interpolation",
        )
    )
    out = ["| claim | the study | ours (mean and range over seeds) | holds? |", "|---|---|---|---|"]
    for claim, where, ours, name in rows:
        v = verdicts.get(name)
        state = "not measured" if v is None else v["state"]
        if name.startswith("f-") and "f-pcb-5-points-above-average" in verdicts:
            state += f" (vs interpolation); {verdicts['f-pcb-5-points-above-average']['state']} (vs average)"
        out.append(f"| {claim} | {STUDY}, {where} | {ours} | {state} |")
    return out


def findings(record: dict) -> list[str]:
    """What the data show where they differ from the study, each sentence built from the record."""
    m, sw, t = record["merges"], record["sweep"], record["tasks"]
    acc = {model: dict(zip(t["tasks"], row)) for model, row in zip(t["models"], t["accuracy"])}
    avg = dict(zip(t["models"], t["average"]))
    pair = "shared:ft_dice+ft_critters"
    j = sw["classes"].index(pair) if pair in sw["classes"] else None
    per_value = [
        max((row[j] or 0) for row in sw["class_count"][i]) if j is not None else 0 for i in range(len(sw["values"]))
    ]
    merge_pairs = [k for k, c in enumerate(sw["classes"]) if c.startswith("shared:") and c != pair]
    with_merge = [
        max(sum(row[k] or 0 for k in merge_pairs) for row in sw["class_count"][i]) for i in range(len(sw["values"]))
    ]
    nonshared = [c for c in sw["classes"] if c not in ("shared", "dead")]
    jj = [sw["classes"].index(c) for c in nonshared]
    l1_nonshared = _spread(
        [sum(row[k] or 0 for k in jj) for row in sw["class_count"][sw["values"].index(sw["chosen"])]]
    )
    topk = m["batchtopk"]
    topk_nonshared = _sum_counts(topk, [c for c in topk["classes"] if c not in ("shared", "dead")])
    lines = [
        "## What the data show where they differ from the study",
        "",
        f"- **The two fine-tunes share almost nothing without the merge.** The class (dice, critters) "
        f"without the merge holds at most {', '.join(f'{n:g}' for n in per_value)} latents at l1 = "
        f"{', '.join(f'{v:g}' for v in sw['values'])} (largest over seeds), against "
        f"{', '.join(f'{n:g}' for n in with_merge)} shared by the merge with one fine-tune only: what both "
        "fine-tunes use, their merge uses too, as a merge of the two should. The study found this pair the "
        "largest and called its latents vanishing features; here they are a handful at every sparsity, "
        "so its finding does not carry over to these tasks and merges.",
        f"- **The non-shared latents depend on the sparsity penalty.** With L1 at the chosen l1 the PCB "
        f"crosscoder has {_pm(l1_nonshared)} latents that are not shared by all three models; BatchTopK "
        f"with AuxK (k = {topk['value']:g}) on the same activations has {_pm(topk_nonshared)}, at a lower "
        f"FVU ({_pm(topk['fvu'], 3)} against {_pm(m['pcb']['fvu'], 3)}). L1's shrinkage pushes a latent's "
        "smaller decoder vectors toward zero (Minder et al. 2025 warn of spurious exclusive latents), "
        "so the exclusive and pair counts the study reports, and those above, are partly made by the "
        "penalty.",
        f"- **PCB against the other merges.** Mean task accuracy: PCB {_pct(avg.get('pcb'))} %, averaging "
        f"{_pct(avg.get('average'))} %, interpolation {_pct(avg.get('interpolation'))} %. Interpolation "
        f"interpolates the experts' BatchNorm statistics and reaches {_pct(acc.get('interpolation', {}).get('dice'))} % "
        f"on dice, averaging (statistics measured again on the validation images) "
        f"{_pct(acc.get('average', {}).get('dice'))} %. "
        + (
            "PCB's lead of about 5 % holds against interpolation only: averaging with fresh statistics is "
            "within a point of PCB."
            if abs((avg.get("pcb") or 0) - (avg.get("average") or 0)) < 0.01
            else f"PCB leads averaging by {100 * ((avg.get('pcb') or 0) - (avg.get('average') or 0)):+.1f} points."
        ),
        "",
    ]
    return lines


def ablation_section(a: dict) -> list[str]:
    lines = [
        "## The causal check: removing latent classes",
        "",
        f"Crosscoder `{a['step']}`: each class's decoded contribution is removed from one model's "
        "activations at the crosscoder's layer inside its forward pass, and the pass finishes from there "
        f"({', '.join(f'{n} {task} images' for n, task in zip(a['images'], a['tasks']))}). Change in accuracy (points) against the "
        "unedited model, and the same for as many random live latents (mean ± standard deviation over draws).",
        "",
        "| removed | latents | model | " + " | ".join(f"{task}: class | {task}: random" for task in a["tasks"]) + " |",
        "|---|---|---|" + "---|---|" * len(a["tasks"]),
    ]
    for r, (label, n) in enumerate(zip(a["removed"], a["latents"])):
        for i, model in enumerate(a["models"]):
            cells = []
            for j in range(len(a["tasks"])):
                ch, rc, sd = a["change"][r][i][j], a["random_change"][r][i][j], a["random_std"][r][i][j]
                cells += [f"{100 * ch:+.1f}", f"{100 * rc:+.1f} ± {100 * (sd or 0):.1f}"]
            lines.append(f"| {label} | {n} | {model} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Baseline accuracies: "
        + "; ".join(
            f"{m}: " + ", ".join(f"{t} {_pct(v)} %" for t, v in zip(a["tasks"], row))
            for m, row in zip(a["models"], a["baseline"])
        )
        + ".",
        "",
    ]
    return lines


def levels_section(lv: dict) -> list[str]:
    low, high = lv["layers"]
    return [
        "## Beyond the study: one dictionary over two levels",
        "",
        f"A crosscoder over `{low}` and `{high}` of the two experts and the PCB merge at once "
        f"(spatial means, {lv['latents']} latents, {lv['live']} alive; FVU per model "
        + ", ".join(f"{v:.3f}" for v in lv["fvu"] if v is not None)
        + f"). Of the live latents, {lv['mostly'][low]} put at least 90 % of their squared decoder norm "
        f"in `{low}`, {lv['mostly'][high]} in `{high}`, and {lv['spanning']} keep more than 10 % in each: "
        "features that span the two levels. Classes: "
        + ", ".join(f"{n} {c}" for c, n in sorted(lv["classes"].items()))
        + ".",
        "",
        "![latents by the layer holding most of their decoder norm](seed2/levels.png)",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", type=Path, metavar="RUN_DIR", help="record the run in RUN_DIR")
    parser.add_argument("--example", default="examples/seed2-crosscoder-study.toml")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the page is out of date")
    args = parser.parse_args(argv)
    if args.record and not args.check:
        import xarray as xr

        # One handle on the file: opening it twice in one process can crash the netCDF library.
        with xr.open_datatree(args.record / "results.nc") as tree:
            record = extract(tree, args.record, args.example)
            draw_latents(tree, record)
        copy_figures(args.record, record)
        RECORD.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"recorded {args.record} -> {RECORD.relative_to(ROOT)}")
    if not RECORD.is_file():
        print(f"no record at {RECORD.relative_to(ROOT)}: run with --record first", file=sys.stderr)
        return 1
    text = render(json.loads(RECORD.read_text(encoding="utf-8")))
    current = PAGE.read_text(encoding="utf-8") if PAGE.is_file() else ""
    # The claims block is filled by generate_claims.py; compare and write around it.
    import re

    block = re.compile(r"(<!-- claims: [^\n]*-->\n)(.*?)(<!-- end claims -->)", re.S)
    kept = block.search(current)
    if kept:
        text = block.sub(lambda m: m.group(1) + kept.group(2) + m.group(3), text)
    if args.check:
        if text != current:
            print(
                f"{PAGE.relative_to(ROOT)} is out of date: run python docs/generate_crosscoder_study.py",
                file=sys.stderr,
            )
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
