"""The HTML report of a run: ``<run dir>/report.html``.

One page that needs nothing but the run directory: the CSS and the script are inline,
charts are inline SVG drawn here, and figures are linked relative to the page
(``figures/<step>/...``), so the directory can be copied, zipped or served as is.

Sections:

- **Pipeline**: the pipeline as run, versions and seed, every step with its component,
  kind, time and whether its result came from the cache.
- **Metrics**: per metric step, layer and compared model, the mean, median, standard
  deviation and NaN count of the score over units (and of the mean / spread over models).
- **Tasks**: accuracy of every model on every task, averages and expert-normalised values.
- **Results**: scalars, curves (e.g. an ``alpha`` sweep) and other arrays of the other steps.
- **Figures**: one panel per visualizer step. A visualizer may implement
  ``report_panel(node, files, run_dir) -> str`` to draw its own panel; otherwise its images
  are shown as a gallery, and a step whose results index one image per unit (variables
  ``layer``, ``unit`` and ``grid_file`` on dim ``entry``) gets a unit browser: a layer
  selector, the units with their metric values, sortable, and the image of the chosen unit.

The building blocks (:func:`unit_browser`, :func:`image_gallery`, :func:`file_list`,
:func:`html_table`, :func:`line_chart`) are public so that a plugin's panel can reuse them.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import numpy as np
import xarray as xr

from .storage import atomic_path, load_tree

__all__ = [
    "REPORT_FILE",
    "write_report",
    "render_report",
    "default_panel",
    "unit_browser",
    "has_unit_index",
    "image_gallery",
    "file_list",
    "html_table",
    "line_chart",
]

log = logging.getLogger("mergescope")

#: The report's file name inside the run directory.
REPORT_FILE = "report.html"

IMAGE_SUFFIXES = frozenset({".png", ".svg", ".jpg", ".jpeg", ".gif", ".webp"})
#: Images shown in a default gallery; the rest are listed as links.
GALLERY_LIMIT = 60
#: 1-D results longer than this (or on a per-unit dim) are summarised, not drawn.
_CURVE_MAX = 200
#: 1-D results up to this long that are not curves (values per model, ...) are tabulated.
_LABELLED_MAX = 32
_PER_ITEM_DIMS = frozenset({"unit", "unit_ref", "feature", "sample", "entry"})
_NUMBER = re.compile(r"-?\d+(\.\d+)?(e[-+]?\d+)?")
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


# ----------------------------------------------------------------------------- entry point


def write_report(
    run_dir: str | Path,
    results: xr.DataTree,
    *,
    info: Mapping[str, Any] | None = None,
    pipeline_text: str = "",
    summary: str = "",
    components: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``<run_dir>/report.html`` (atomically) and return its path.

    Parameters
    ----------
    run_dir
        The run directory; figure paths in ``results`` are relative to it.
    results
        The run's results as in ``results.nc``: ``/<step>``, ``/<step>/<layer>``, ``/tasks``.
    info
        The run's ``run.json``: versions, ``seed``, ``seconds`` per step and ``steps``
        (name -> ``use``, ``kind``, ``cached``). Without it, steps are the top-level nodes
        of ``results`` and their kinds are guessed from their contents.
    pipeline_text
        The pipeline as run (TOML).
    summary
        The run's ``summary.txt``.
    components
        Step name -> component instance; a visualizer's ``report_panel`` method, when it
        has one, draws its step's panel.

    Returns
    -------
    Path
        The report file.
    """
    run_dir = Path(run_dir)
    page = render_report(
        run_dir, results, info=info, pipeline_text=pipeline_text, summary=summary, components=components
    )
    path = run_dir / REPORT_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def render_report(
    run_dir: str | Path,
    results: xr.DataTree,
    *,
    info: Mapping[str, Any] | None = None,
    pipeline_text: str = "",
    summary: str = "",
    components: Mapping[str, Any] | None = None,
) -> str:
    """The report page as a string; see :func:`write_report` for the parameters."""
    run_dir = Path(run_dir)
    info = dict(info or {})
    components = components or {}
    steps = _steps(results, info)
    metric_steps = [s["name"] for s in steps if s["kind"] == "metric"]

    pipeline = _pipeline_section(steps, info, pipeline_text, summary)
    sections: list[tuple[str, str, str]] = [("pipeline", "Pipeline", pipeline)]
    metric_html = [_metric_step(s, results[s["name"]]) for s in steps if s["kind"] == "metric" and s["present"]]
    if metric_html:
        sections.append(("metrics", "Metrics", "".join(metric_html)))
    if "tasks" in results.children and "tasks" not in {s["name"] for s in steps}:
        sections.append(("tasks", "Tasks", _tasks_section(results["tasks"].to_dataset(inherit=False))))
    other = [
        _results_step(s, results[s["name"]])
        for s in steps
        if s["kind"] not in ("metric", "visualizer") and s["present"]
    ]
    if other:
        sections.append(("results", "Results", "".join(other)))
    figures = [
        _visualizer_step(s, results[s["name"]], components.get(s["name"]), run_dir, results, metric_steps)
        for s in steps
        if s["kind"] == "visualizer" and s["present"]
    ]
    if figures:
        sections.append(("figures", "Figures", "".join(figures)))

    title = f"mergescope report: {run_dir.resolve().name}"
    nav = "".join(f'<a href="#{key}">{_e(label)}</a>' for key, label, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{_e(label)}</h2>{content}</section>' for key, label, content in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # An empty icon: the browser asks for no favicon, so the page makes no request of its own.
        '<link rel="icon" href="data:,">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><header><h1>{_e(title)}</h1><nav>{nav}</nav></header>\n"
        f"<main>{body}</main>\n<script>{_JS}</script></body></html>\n"
    )


# ----------------------------------------------------------------------------- steps


def _steps(results: xr.DataTree, info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every step, in order, with its use, kind, time and cache state."""
    declared = info.get("steps") or {}
    seconds = info.get("seconds") or {}
    names = list(declared) or [n for n in results.children if n != "tasks"]
    steps = []
    for name in names:
        meta = declared.get(name) or {}
        present = name in results.children
        kind = meta.get("kind") or (_guess_kind(results[name]) if present else "")
        steps.append(
            {
                "name": str(name),
                "use": str(meta.get("use", "")),
                "kind": str(kind),
                "cached": meta.get("cached"),
                "seconds": seconds.get(name),
                "present": present,
            }
        )
    return steps


def _guess_kind(node: xr.DataTree) -> str:
    if "files" in node.ds:
        return "visualizer"
    if node.children and all(_unit_scores(c.to_dataset(inherit=False)) for c in node.children.values()):
        return "metric"
    return "result"


def _unit_scores(ds: xr.Dataset) -> list[str]:
    """Variables that score units: dims ``(model, unit)`` or ``(unit,)``, numeric."""
    return [
        str(v)
        for v, da in ds.data_vars.items()
        if da.dims in (("model", "unit"), ("unit",)) and np.issubdtype(da.dtype, np.number)
    ]


def _pipeline_section(steps: list[dict[str, Any]], info: Mapping[str, Any], pipeline_text: str, summary: str) -> str:
    parts = []
    about = [(k, v) for k, v in info.items() if k not in ("seconds", "steps") and not isinstance(v, (dict, list))]
    if about:
        parts.append(html_table(["", "value"], [[k, v] for k, v in about], caption="Versions and seed", cls="kv"))
    seconds = info.get("seconds") or {}
    rows = []
    for i, s in enumerate(steps, 1):
        cache = {True: "cached", False: "run"}.get(s["cached"], "")
        rows.append([i, s["name"], s["use"], s["kind"], _seconds(s["seconds"]), cache])
    for extra in ("models", "tasks"):
        if extra in seconds:
            label = "models (build, train or load)" if extra == "models" else "tasks (evaluation)"
            rows.append(["", label, "", "", _seconds(seconds[extra]), ""])
    if not steps:
        parts.append('<p class="empty">This pipeline has no steps.</p>')
    if rows:
        parts.append(
            html_table(["#", "step", "component", "kind", "time (s)", "result"], rows, caption="Steps", cls="steps")
        )
    links = [f for f in ("results.nc", "summary.txt", "pipeline.toml", "run.json")]
    parts.append(
        '<p class="files">Files: ' + ", ".join(f'<a href="{_href(f)}">{_e(f)}</a>' for f in links) + "</p>"
    )
    if summary.strip():
        parts.append(f"<details open><summary>Summary</summary><pre>{_e(summary)}</pre></details>")
    if pipeline_text.strip():
        parts.append(f"<details><summary>pipeline.toml</summary><pre>{_e(pipeline_text)}</pre></details>")
    return "".join(parts)


def _seconds(value: Any) -> str:
    return "" if value is None else f"{float(value):.2f}"


def _step_heading(step: Mapping[str, Any]) -> str:
    use = f' <span class="use">({_e(step["use"])})</span>' if step["use"] and step["use"] != step["name"] else ""
    cached = ' <span class="badge">cached</span>' if step.get("cached") else ""
    return f'<h3 id="step-{_e(_slug(step["name"]))}">{_e(step["name"])}{use}{cached}</h3>'


# ----------------------------------------------------------------------------- metrics


def _stats(values: np.ndarray) -> list[Any]:
    """Units, mean, median, std and NaN count of one score over units."""
    values = np.asarray(values, dtype=float).ravel()
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [values.size, math.nan, math.nan, math.nan, int(values.size)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return [
            values.size,
            float(finite.mean()),
            float(np.median(finite)),
            float(finite.std()),
            int(values.size - finite.size),
        ]


def _metric_step(step: Mapping[str, Any], node: xr.DataTree) -> str:
    rows = []
    for layer, child in node.children.items():
        ds = child.to_dataset(inherit=False)
        for var, da in ds.data_vars.items():
            if not np.issubdtype(da.dtype, np.number):
                continue
            if "unit" not in da.dims:
                if da.ndim == 0:
                    rows.append([layer, var, "", 1, float(da), "", "", int(np.isnan(float(da)))])
                continue
            others = [d for d in da.dims if d != "unit"]
            if not others:
                # The mean or spread over models of a per-unit score.
                rows.append([layer, var, "(over models)", *_stats(da.values)])
                continue
            stacked = da.stack(_row=others).transpose("_row", "unit")
            for i in range(stacked.sizes["_row"]):
                label = stacked["_row"].values[i]
                label = ", ".join(map(str, label)) if isinstance(label, tuple) else str(label)
                rows.append([layer, var, label, *_stats(stacked.values[i])])
    table = (
        html_table(["layer", "variable", "model", "units", "mean", "median", "std", "NaN"], rows, cls="num")
        if rows
        else '<p class="empty">No scores.</p>'
    )
    return f'<div class="step">{_step_heading(step)}{table}</div>'


# ----------------------------------------------------------------------------- tasks


def _tasks_section(ds: xr.Dataset) -> str:
    if "accuracy" not in ds or "model" not in ds.dims or "task" not in ds.dims:
        return _dataset_summary(ds)
    tasks = [str(t) for t in ds["task"].values]
    models = [str(m) for m in ds["model"].values]
    normalised = "normalized_accuracy" in ds
    head = ["model", *tasks, "average"] + (["norm. average"] if "average_normalized_accuracy" in ds else [])
    rows = []
    for m in ds["model"].values:
        row: list[Any] = [str(m), *(_percent(v) for v in ds["accuracy"].sel(model=m).values)]
        row.append(_percent(ds["average_accuracy"].sel(model=m)) if "average_accuracy" in ds else "")
        if "average_normalized_accuracy" in ds:
            row.append(_percent(ds["average_normalized_accuracy"].sel(model=m)))
        rows.append(row)
    parts = [html_table(head, rows, caption="Accuracy (%)", cls="num")]
    if normalised:
        rows = [
            [str(m), *(_percent(v) for v in ds["normalized_accuracy"].sel(model=m).values)] for m in ds["model"].values
        ]
        caption = "Accuracy relative to each task's expert (%)"
        parts.append(html_table(["model", *tasks], rows, caption=caption, cls="num"))
    if "loss" in ds:
        rows = [[str(m), *(float(v) for v in ds["loss"].sel(model=m).values)] for m in ds["model"].values]
        parts.append(
            "<details><summary>Loss</summary>" + html_table(["model", *tasks], rows, cls="num") + "</details>"
        )
    parts.append(f'<p class="note">{len(models)} models, {len(tasks)} tasks.</p>')
    return "".join(parts)


def _percent(value: Any) -> str:
    v = float(value)
    return "" if math.isnan(v) else f"{100 * v:.1f}"


# ----------------------------------------------------------------------------- other results


def _results_step(step: Mapping[str, Any], node: xr.DataTree) -> str:
    parts = []
    for sub in node.subtree:
        ds = sub.to_dataset(inherit=False)
        if not ds.data_vars:
            continue
        where = sub.relative_to(node)
        heading = f"<h4>{_e(where)}</h4>" if where != "." else ""
        parts.append(heading + _dataset_summary(ds))
    body = "".join(parts) or '<p class="empty">No results.</p>'
    return f'<div class="step">{_step_heading(step)}{body}</div>'


def _dataset_summary(ds: xr.Dataset) -> str:
    """Scalars and short labelled values as tables, curves as charts, long arrays summarised."""
    scalars, charts, summaries, listed = [], [], [], []
    curves: dict[str, list[str]] = {}  # dim -> 1-D curves along it
    labelled: dict[str, list[str]] = {}  # dim -> short 1-D values along it
    for var, da in ds.data_vars.items():
        numeric = np.issubdtype(da.dtype, np.number) or np.issubdtype(da.dtype, np.bool_)
        if da.ndim == 0:
            scalars.append([var, da.values.item() if numeric else str(da.values)])
        elif numeric and _curve_dim(da) is not None:
            charts.append(_chart_of(str(var), da))
            if da.ndim == 1:
                curves.setdefault(str(da.dims[0]), []).append(str(var))
        elif da.ndim == 1 and da.size <= _LABELLED_MAX:
            labelled.setdefault(str(da.dims[0]), []).append(str(var))
        elif numeric and da.ndim == 1:
            summaries.append([var, str(da.dims[0]), *_stats(da.values)])
        else:
            shape = " x ".join(f"{d} {n}" for d, n in da.sizes.items())
            listed.append([var, shape, str(da.dtype)])
    parts = []
    if scalars:
        parts.append(html_table(["variable", "value"], scalars, cls="kv"))
    parts += [_by_dim_table(ds, dim, names) for dim, names in labelled.items()]
    if charts:
        parts.append('<div class="charts">' + "".join(charts) + "</div>")
        values = "".join(_by_dim_table(ds, dim, names) for dim, names in curves.items())
        if values:
            parts.append(f"<details><summary>Values</summary>{values}</details>")
    if summaries:
        parts.append(html_table(["variable", "dim", "size", "mean", "median", "std", "NaN"], summaries, cls="num"))
    if listed:
        parts.append(
            "<details><summary>Other arrays</summary>"
            + html_table(["variable", "dims", "dtype"], listed)
            + "</details>"
        )
    return "".join(parts)


def _curve_dim(da: xr.DataArray) -> str | None:
    """The dim a numeric result is drawn along, if it is a curve (not one value per unit, nor labelled)."""

    def along(d: Any) -> bool:
        if d in _PER_ITEM_DIMS or not 2 <= da.sizes[d] <= _CURVE_MAX:
            return False
        if d in da.coords:  # a numeric axis (alpha), not labels (model names)
            return bool(np.issubdtype(da[d].dtype, np.number))
        return da.sizes[d] > _LABELLED_MAX

    candidates = [d for d in da.dims if along(d)]
    if not candidates or da.ndim > 2:
        return None
    if da.ndim == 1:
        return str(candidates[0])
    # Two dims: one along x, the other holds a few series.
    series = next(d for d in da.dims if d != candidates[0])
    return str(candidates[0]) if da.sizes[series] <= len(_PALETTE) else None


def _chart_of(name: str, da: xr.DataArray) -> str:
    along = _curve_dim(da)
    assert along is not None
    x = _axis(da, along)
    if da.ndim == 1:
        series = {name: da.values}
    else:
        other = next(d for d in da.dims if d != along)
        labels = [str(v) for v in da[other].values] if other in da.coords else [str(i) for i in range(da.sizes[other])]
        series = {label: da.isel({other: i}).values for i, label in enumerate(labels)}
    return line_chart(x, series, title=name, xlabel=along)


def _axis(da: xr.DataArray, dim: str) -> np.ndarray:
    if dim in da.coords and np.issubdtype(da[dim].dtype, np.number):
        return np.asarray(da[dim].values, dtype=float)
    return np.arange(da.sizes[dim], dtype=float)


def _by_dim_table(ds: xr.Dataset, dim: str, names: Sequence[str]) -> str:
    """Variables along one dim side by side: a row per position, labelled by the dim's coordinate."""
    x = ds[dim].values if dim in ds.coords else np.arange(ds.sizes[dim])
    rows = [[x[i], *(ds[v].values[i] for v in names)] for i in range(len(x))]
    return html_table([dim, *names], rows, cls="num")


# ----------------------------------------------------------------------------- visualizers


def _visualizer_step(
    step: Mapping[str, Any],
    node: xr.DataTree,
    component: Any,
    run_dir: Path,
    results: xr.DataTree,
    metric_steps: Sequence[str],
) -> str:
    ds = node.to_dataset(inherit=False)
    files = _node_files(ds)
    panel = None
    method = getattr(component, "report_panel", None)
    if callable(method):
        try:
            panel = str(method(ds, files, run_dir))
        except Exception as exc:  # a plugin's panel must not cost the whole report
            log.warning(
                "step %s: report_panel failed (%s: %s); showing its files instead",
                step["name"],
                type(exc).__name__,
                exc,
            )
            panel = (
                f'<p class="error">The panel of this step failed: {_e(type(exc).__name__)}: {_e(exc)}</p>'
                + default_panel(ds, run_dir, results, files=files, metric_steps=metric_steps)
            )
    if panel is None:
        panel = default_panel(ds, run_dir, results, files=files, metric_steps=metric_steps)
    return f'<div class="step">{_step_heading(step)}{panel}</div>'


def _node_files(ds: xr.Dataset) -> list[Path]:
    """A visualizer node's files, relative to the run directory."""
    if "files" not in ds:
        return []
    return [Path(str(f)) for f in np.atleast_1d(ds["files"].values) if str(f)]


def default_panel(
    node: xr.Dataset,
    run_dir: str | Path,
    results: xr.DataTree | None = None,
    *,
    files: Sequence[Path] | None = None,
    metric_steps: Sequence[str] | None = None,
) -> str:
    """The panel of a visualizer step without its own ``report_panel``.

    A unit browser when ``node`` indexes one image per unit (see :func:`has_unit_index`),
    otherwise a gallery of its images; its other files are listed as links.

    Parameters
    ----------
    node
        The step's results node: ``files`` (paths relative to ``run_dir``) and what the
        visualizer's netCDF outputs hold.
    run_dir
        The run directory, where the report is.
    results
        The run's results (for the unit browser's metric values); read from
        ``run_dir/results.nc`` when not given.
    files
        The step's files; default: the node's ``files`` variable.
    metric_steps
        Steps whose per-unit scores the unit browser shows; default: every step whose
        layer nodes hold scores on dims ``(model, unit)`` or ``(unit,)``.
    """
    run_dir = Path(run_dir)
    files = list(files) if files is not None else _node_files(node)
    if has_unit_index(node):
        grids = set(_index_files(node, run_dir, files))
        rest = [f for f in files if f.as_posix() not in grids]
        return unit_browser(node, run_dir, results, files=files, metric_steps=metric_steps) + file_list(rest, run_dir)
    if not files:
        return '<p class="empty">This step wrote no files.</p>'
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    shown = images[:GALLERY_LIMIT]
    rest = [f for f in files if f not in shown]
    return image_gallery(shown, run_dir) + file_list(rest, run_dir)


def image_gallery(files: Iterable[str | Path], run_dir: str | Path) -> str:
    """Images as a gallery of thumbnails linking to the full files.

    Parameters
    ----------
    files
        Image paths relative to ``run_dir`` (the report's folder).
    run_dir
        The run directory; a file missing there is named, not shown as a broken image.
    """
    run_dir = Path(run_dir)
    items = []
    for f in files:
        f = Path(f)
        name = f.as_posix()
        if not (run_dir / f).is_file():
            items.append(f'<figure class="missing"><figcaption>{_e(name)} (missing)</figcaption></figure>')
            continue
        items.append(
            f'<figure><a href="{_href(name)}"><img src="{_href(name)}" alt="{_e(name)}"></a>'
            f"<figcaption>{_e(f.name)}</figcaption></figure>"
        )
    return f'<div class="gallery">{"".join(items)}</div>' if items else ""


def file_list(files: Iterable[str | Path], run_dir: str | Path) -> str:
    """Files as a list of relative links with their sizes (empty string for no files)."""
    run_dir = Path(run_dir)
    items = []
    for f in files:
        name = Path(f).as_posix()
        path = run_dir / f
        size = f" ({_size(path.stat().st_size)})" if path.is_file() else " (missing)"
        items.append(f'<li><a href="{_href(name)}">{_e(name)}</a>{_e(size)}</li>')
    return f'<ul class="files">{"".join(items)}</ul>' if items else ""


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# ----------------------------------------------------------------------------- unit browser


def _index_file_var(node: xr.Dataset) -> str | None:
    for name in ("grid_file", "file"):
        if name in node.variables and node[name].dims == ("entry",):
            return name
    return None


def has_unit_index(node: xr.Dataset) -> bool:
    """Whether ``node`` indexes one image per unit: ``layer``, ``unit`` and ``grid_file`` (or ``file``) on ``entry``."""
    return _index_file_var(node) is not None and all(
        name in node.variables and node[name].dims == ("entry",) for name in ("layer", "unit")
    )


def _index_files(node: xr.Dataset, run_dir: Path, files: Sequence[Path]) -> list[str]:
    """Every entry's image, relative to ``run_dir`` (posix).

    The index stores paths relative to the index file (``topk-index.nc`` in the step's
    figure folder); the folder is found from the step's ``.nc`` files, and paths that
    already resolve from ``run_dir`` are kept.
    """
    var = _index_file_var(node)
    assert var is not None
    names = [str(v) for v in node[var].values]
    if not names:
        return []
    bases = [f.parent for f in files if f.suffix == ".nc"]
    bases += [f.parent for f in files if f.suffix.lower() in IMAGE_SUFFIXES][:1] + [Path(".")]
    base = next((b for b in bases if (run_dir / b / names[0]).is_file()), bases[0])
    return [PurePosixPath(os.path.normpath((base / n).as_posix())).as_posix() for n in names]


def _metric_columns(
    results: xr.DataTree, metric_steps: Sequence[str], layer: str, units: np.ndarray
) -> list[tuple[dict[str, str], list[float | None]]]:
    """(label, values per unit) of every per-unit score of ``layer`` in the metric steps."""
    columns = []
    for step in metric_steps:
        if step not in results.children or layer not in results[step].children:
            continue
        ds = results[step][layer].to_dataset(inherit=False)
        for var in _unit_scores(ds):
            da = ds[var]
            if da.dims == ("unit",):
                columns.append(({"step": step, "var": var, "model": ""}, _per_unit(da, units)))
                continue
            for i in range(da.sizes["model"]):
                model = str(da["model"].values[i]) if "model" in da.coords else str(i)
                columns.append(({"step": step, "var": var, "model": model}, _per_unit(da.isel(model=i), units)))
    return columns


def _per_unit(da: xr.DataArray, units: np.ndarray) -> list[float | None]:
    if "unit" in da.indexes:
        values = da.reindex(unit=units).values.astype(float)
    else:
        raw = np.asarray(da.values, dtype=float)
        values = np.array([raw[u] if 0 <= u < raw.size else np.nan for u in units])
    return [float(v) if np.isfinite(v) else None for v in values]  # JSON has no NaN


def unit_browser(
    node: xr.Dataset,
    run_dir: str | Path,
    results: xr.DataTree | None = None,
    *,
    files: Sequence[Path] | None = None,
    metric_steps: Sequence[str] | None = None,
) -> str:
    """A per-layer, per-unit browser of images with the units' metric values.

    A layer selector, a table of the layer's units with every metric value beside each
    (click a column header to sort), and the image and values of the chosen unit.

    Parameters
    ----------
    node
        An index of images: variables ``layer``, ``unit`` and ``grid_file`` (or ``file``)
        on dim ``entry``, the image paths relative to the index's ``.nc`` file (as the
        ``top-k`` visualizer writes ``topk-index.nc``) or to ``run_dir``.
    run_dir
        The run directory, where the report is.
    results
        The run's results, for the metric values (``/<step>/<layer>`` variables on dims
        ``(model, unit)``, one column per model, or ``(unit,)``); read from
        ``run_dir/results.nc`` when not given and present.
    files
        The step's files, relative to ``run_dir``; default: the node's ``files``.
    metric_steps
        The steps whose scores are shown; default: every step whose layer nodes hold them.

    Returns
    -------
    str
        An HTML fragment; the report's script brings it to life.
    """
    run_dir = Path(run_dir)
    if not has_unit_index(node):
        raise ValueError("unit_browser needs 'layer', 'unit' and 'grid_file' (or 'file') variables on dim 'entry'")
    files = list(files) if files is not None else _node_files(node)
    if results is None and (run_dir / "results.nc").is_file():
        results = load_tree(run_dir / "results.nc")
    if metric_steps is None:
        metric_steps = (
            [n for n, c in results.children.items() if _guess_kind(c) == "metric"] if results is not None else []
        )
    paths = _index_files(node, run_dir, files)
    layer_of = [str(v) for v in node["layer"].values]
    unit_of = np.asarray(node["unit"].values).astype(np.int64)
    layers = []
    for layer in dict.fromkeys(layer_of):
        rows = [i for i, name in enumerate(layer_of) if name == layer]
        units = unit_of[rows]
        columns = _metric_columns(results, metric_steps, layer, units) if results is not None else []
        layers.append(
            {
                "name": layer,
                "units": units.tolist(),
                "files": [quote(paths[i]) for i in rows],
                "columns": [c for c, _ in columns],
                "values": [v for _, v in columns],
            }
        )
    data = json.dumps({"layers": layers}, separators=(",", ":"), allow_nan=False)
    # Inside <script> only "</" could end the element early; escape every "<", ">" and "&".
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    ident = "ub-" + hashlib.sha1(data.encode()).hexdigest()[:10]
    count = sum(len(layer["units"]) for layer in layers)
    return (
        f'<div class="ms-unit-browser" id="{ident}">'
        f'<script type="application/json" class="ms-data">{data}</script>'
        '<div class="ms-controls"><label>Layer <select class="ms-layer"></select></label> '
        '<span class="ms-hint">Click a unit to see its image and values; click a column header to sort.</span></div>'
        '<div class="ms-body"><div class="ms-list">'
        '<table class="ms-units num"><thead></thead><tbody></tbody></table></div>'
        '<div class="ms-detail" aria-live="polite"></div></div>'
        f"<noscript><p>{count} unit images; the browser needs JavaScript.</p></noscript>"
        "</div>"
    )


# ----------------------------------------------------------------------------- HTML helpers


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(path: str) -> str:
    """A relative link to ``path`` (posix), quoted for a URL and escaped for an attribute."""
    return _e(quote(path))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)


def _cell(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "NaN"
        return f"{v:.4g}"
    return str(value)


def _td(value: Any) -> str:
    """A cell; numbers are right-aligned."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    number = number or (isinstance(value, str) and _NUMBER.fullmatch(value) is not None)  # preformatted (percent)
    return f'<td class="n">{_e(_cell(value))}</td>' if number else f"<td>{_e(_cell(value))}</td>"


def html_table(
    head: Sequence[Any], rows: Iterable[Sequence[Any]], *, caption: str = "", cls: str = ""
) -> str:
    """An HTML table; numbers are formatted to four significant digits and every cell is escaped.

    Parameters
    ----------
    head
        Column headers.
    rows
        Rows of cells (strings or numbers).
    caption
        Optional caption above the table.
    cls
        CSS class of the table.
    """
    klass = f' class="{_e(cls)}"' if cls else ""
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    thead = "<tr>" + "".join(f'<th scope="col">{_e(h)}</th>' for h in head) + "</tr>"
    body = "".join("<tr>" + "".join(_td(c) for c in row) + "</tr>" for row in rows)
    return f'<div class="table"><table{klass}>{cap}<thead>{thead}</thead><tbody>{body}</tbody></table></div>'


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round numbers spanning [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + 1e-9 * step:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return ticks


def line_chart(
    x: Sequence[float] | np.ndarray,
    series: Mapping[str, Sequence[float] | np.ndarray],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    width: int = 340,
    height: int = 220,
) -> str:
    """A small line chart as inline SVG: one line (with markers) per series.

    Non-finite values break a line. Every point has a tooltip with its values.

    Parameters
    ----------
    x
        The shared x values.
    series
        Label -> y values (as many as ``x``).
    title, xlabel, ylabel
        Texts of the chart (escaped).
    width, height
        Size in pixels.
    """
    xs = np.asarray(x, dtype=float)
    ys = {str(k): np.asarray(v, dtype=float).ravel() for k, v in series.items()}
    left, right, top, bottom = 52, 12, 24 if title else 10, 38
    legend = len(ys) > 1
    if legend:
        bottom += 16 * ((len(ys) + 2) // 3)
    pw, ph = width - left - right, height - top - bottom
    finite_x = xs[np.isfinite(xs)]
    every = np.concatenate([v[np.isfinite(v)] for v in ys.values()]) if ys else np.array([])
    if finite_x.size == 0 or every.size == 0:
        return f'<div class="chart empty">{_e(title)}: no finite values</div>'
    x0, x1 = float(finite_x.min()), float(finite_x.max())
    y0, y1 = float(every.min()), float(every.max())
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    pad = (y1 - y0) * 0.05 or (abs(y0) * 0.05 or 0.5)
    y0, y1 = y0 - pad, y1 + pad

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * pw

    def sy(v: float) -> float:
        return top + (1 - (v - y0) / (y1 - y0)) * ph

    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title or ylabel or "chart")}" '
        # Presentation attributes, not the page's CSS: the SVG also stands alone as a file.
        'font-family="system-ui, sans-serif" font-size="10" fill="#1d2330">'
        f'<rect width="{width}" height="{height}" fill="#fff"/>'
    ]
    if title:
        out.append(f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" font-size="12" font-weight="600">{_e(title)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#d9dee7"/>')
    for t in _ticks(y0, y1):
        y = sy(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eef1f5"/>')
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{_e(_cell(t))}</text>')
    for t in _ticks(x0, x1):
        xx = sx(t)
        out.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#5b6475"/>')
        out.append(f'<text x="{xx:.1f}" y="{top + ph + 16}" text-anchor="middle">{_e(_cell(t))}</text>')
    if xlabel:
        out.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph + 30}" text-anchor="middle" fill="#5b6475">{_e(xlabel)}</text>')
    if ylabel:
        out.append(
            f'<text transform="translate(12 {top + ph / 2:.1f}) rotate(-90)" text-anchor="middle" fill="#5b6475">{_e(ylabel)}</text>'
        )
    for i, (label, values) in enumerate(ys.items()):
        colour = _PALETTE[i % len(_PALETTE)]
        run: list[str] = []
        segments: list[list[str]] = [run]
        for xv, yv in zip(xs, values):
            if np.isfinite(xv) and np.isfinite(yv):
                run.append(f"{sx(xv):.1f},{sy(yv):.1f}")
            elif run:
                run = []
                segments.append(run)
        for seg in segments:
            if len(seg) > 1:
                out.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="{colour}" stroke-width="1.8"/>')
        for xv, yv in zip(xs, values):
            if np.isfinite(xv) and np.isfinite(yv):
                tip = f"{label}: {xlabel or 'x'} = {_cell(xv)}, {_cell(yv)}"
                out.append(
                    f'<circle cx="{sx(xv):.1f}" cy="{sy(yv):.1f}" r="2.6" fill="{colour}"><title>{_e(tip)}</title></circle>'
                )
        if legend:
            row, col = divmod(i, 3)
            lx, ly = left + col * (pw / 3), height - bottom + 44 + 16 * row - 8
            out.append(f'<rect x="{lx:.1f}" y="{ly - 8:.1f}" width="10" height="10" fill="{colour}"/>')
            out.append(f'<text x="{lx + 14:.1f}" y="{ly + 1:.1f}">{_e(label[:24])}</text>')
    out.append("</svg>")
    return "".join(out)


# ----------------------------------------------------------------------------- style and script

_CSS = """
:root{--fg:#1d2330;--muted:#5b6475;--line:#d9dee7;--bg:#fff;--soft:#f4f6fa;--accent:#1f5fbf}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{background:var(--soft);border-bottom:1px solid var(--line);padding:.6rem 1.2rem}
header h1{font-size:1.15rem;margin:0 0 .2rem}
nav a{margin-right:1rem;color:var(--accent);text-decoration:none}
main{padding:0 1.2rem 3rem;max-width:1400px}
section{margin-top:1.6rem}
h2{font-size:1.1rem;border-bottom:2px solid var(--line);padding-bottom:.2rem}
h3{font-size:1rem;margin:1.2rem 0 .4rem}
h4{font-size:.92rem;margin:.8rem 0 .3rem;color:var(--muted)}
.use{color:var(--muted);font-weight:normal}
.badge{font-size:.75rem;font-weight:normal;background:#e6eefb;color:var(--accent);border-radius:3px;padding:0 .35rem}
.table{overflow-x:auto}
table{border-collapse:collapse;margin:.3rem 0 .8rem;font-variant-numeric:tabular-nums}
caption{text-align:left;font-weight:600;padding:.2rem 0}
th,td{border-bottom:1px solid var(--line);padding:.2rem .6rem;text-align:left;white-space:nowrap}
th{background:var(--soft);font-weight:600}
td.n{text-align:right}
.ms-units td,.ms-values td:last-child{text-align:right}
pre{background:var(--soft);padding:.6rem;overflow:auto;max-height:30rem}
details{margin:.4rem 0}
summary{cursor:pointer;color:var(--muted)}
.empty,.note{color:var(--muted)}
.error{color:#a4161a}
.charts{display:flex;flex-wrap:wrap;gap:.6rem}
svg.chart{border:1px solid var(--line)}
.gallery{display:flex;flex-wrap:wrap;gap:.8rem}
.gallery figure{margin:0;max-width:100%}
.gallery img{max-width:min(100%,720px);max-height:420px;border:1px solid var(--line);display:block}
.gallery figcaption{font-size:.8rem;color:var(--muted)}
ul.files{font-size:.85rem}
.ms-controls{margin:.4rem 0}
.ms-hint{color:var(--muted);font-size:.85rem;margin-left:.6rem}
.ms-body{display:flex;gap:1rem;align-items:flex-start;flex-wrap:wrap}
.ms-list{max-height:32rem;overflow:auto;border:1px solid var(--line)}
.ms-list table{margin:0}
.ms-list thead th{position:sticky;top:0}
.ms-list th button{all:unset;cursor:pointer;display:block;text-align:inherit}
.ms-list th button:focus-visible{outline:2px solid var(--accent)}
.ms-list th small{display:block;font-weight:normal;color:var(--muted)}
.ms-units tbody tr{cursor:pointer}
.ms-units tbody tr:hover{background:var(--soft)}
.ms-units tbody tr.sel{background:#dfe9fb}
.ms-detail{flex:1;min-width:260px}
.ms-detail img{max-width:100%;border:1px solid var(--line);image-rendering:pixelated}
"""

_JS = r"""
(function () {
  "use strict";
  function fmt(v) {
    if (v === null || v === undefined) return "NaN";
    if (Number.isInteger(v)) return String(v);
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(3);
    var s = v.toPrecision(4);
    return s.indexOf(".") >= 0 ? s.replace(/0+$/, "").replace(/\.$/, "") : s;
  }
  function make(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }
  function label(c) { return c.var + (c.model ? " [" + c.model + "]" : ""); }

  function Browser(root) {
    var data = JSON.parse(root.querySelector("script.ms-data").textContent);
    var select = root.querySelector("select.ms-layer");
    var thead = root.querySelector("table.ms-units thead");
    var tbody = root.querySelector("table.ms-units tbody");
    var detail = root.querySelector(".ms-detail");
    var state = {layer: 0, sort: -1, desc: false, unit: -1};
    data.layers.forEach(function (layer, i) {
      var o = make("option", layer.name + " (" + layer.units.length + " units)");
      o.value = String(i);
      select.appendChild(o);
    });
    function order() {
      var L = data.layers[state.layer];
      var idx = L.units.map(function (_, i) { return i; });
      var col = state.sort < 0 ? L.units : L.values[state.sort];
      idx.sort(function (a, b) {
        var x = col[a], y = col[b];
        if (x === null && y === null) return a - b;
        if (x === null) return 1;
        if (y === null) return -1;
        var d = state.desc ? y - x : x - y;
        return d || a - b;
      });
      return idx;
    }
    function header() {
      var L = data.layers[state.layer];
      var tr = make("tr");
      var cols = [{key: -1, top: "unit", sub: ""}].concat(L.columns.map(function (c, i) {
        return {key: i, top: label(c), sub: c.step};
      }));
      cols.forEach(function (c) {
        var th = make("th");
        th.scope = "col";
        var b = make("button", c.top);
        b.type = "button";
        if (c.sub) b.appendChild(make("small", c.sub));
        if (state.sort === c.key) {
          b.appendChild(document.createTextNode(state.desc ? " \u25BC" : " \u25B2"));
          th.setAttribute("aria-sort", state.desc ? "descending" : "ascending");
        }
        b.addEventListener("click", function () {
          if (state.sort === c.key) state.desc = !state.desc;
          else { state.sort = c.key; state.desc = c.key >= 0; }  // highest score first
          render();
        });
        th.appendChild(b);
        tr.appendChild(th);
      });
      thead.replaceChildren(tr);
    }
    function body() {
      var L = data.layers[state.layer];
      var rows = order().map(function (i) {
        var tr = make("tr");
        tr.dataset.index = String(i);
        tr.tabIndex = 0;
        if (i === state.unit) tr.className = "sel";
        tr.appendChild(make("td", String(L.units[i])));
        L.values.forEach(function (col) { tr.appendChild(make("td", fmt(col[i]))); });
        return tr;
      });
      tbody.replaceChildren.apply(tbody, rows);
    }
    function render() { header(); body(); }
    function show(i) {
      var L = data.layers[state.layer];
      state.unit = i;
      Array.prototype.forEach.call(tbody.children, function (tr) {
        tr.classList.toggle("sel", Number(tr.dataset.index) === i);
      });
      var parts = [make("h4", L.name + ", unit " + L.units[i])];
      if (L.files[i]) {
        var img = make("img");
        img.src = L.files[i];
        img.alt = L.name + ", unit " + L.units[i];
        var a = make("a");
        a.href = L.files[i];
        a.appendChild(img);
        parts.push(a);
      }
      if (L.columns.length) {
        var t = make("table", null, "num ms-values");
        var h = make("tr");
        ["step", "metric", "value"].forEach(function (s) { h.appendChild(make("th", s)); });
        t.appendChild(h);
        L.columns.forEach(function (c, j) {
          var tr = make("tr");
          tr.appendChild(make("td", c.step));
          tr.appendChild(make("td", label(c)));
          tr.appendChild(make("td", fmt(L.values[j][i])));
          t.appendChild(tr);
        });
        parts.push(t);
      } else {
        parts.push(make("p", "No metric step scored this layer.", "note"));
      }
      detail.replaceChildren.apply(detail, parts);
    }
    function pick(ev) {
      var tr = ev.target.closest("tr");
      if (tr && tr.dataset.index !== undefined) show(Number(tr.dataset.index));
    }
    tbody.addEventListener("click", pick);
    tbody.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); pick(ev); }
    });
    select.addEventListener("change", function () {
      state.layer = Number(select.value);
      state.sort = -1;
      state.desc = false;
      render();
      show(order()[0]);
    });
    if (data.layers.length) {
      render();
      show(order()[0]);
    } else {
      detail.replaceChildren(make("p", "No units.", "note"));
    }
  }
  document.querySelectorAll(".ms-unit-browser").forEach(Browser);
})();
"""
