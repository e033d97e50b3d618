"""The HTML report of a run: ``<run dir>/report.html``.

One page that needs nothing but the run directory: the CSS and the script are inline,
charts are inline SVG drawn here, and figures are linked relative to the page
(``figures/<step>/...``), so the directory can be copied, zipped or served as is. Its
sections: Pipeline (the pipeline as run, versions, every step with its kind, time and cache
state), Metrics (per-unit scores summarised per layer and model), Tasks (accuracies),
Results (scalars, curves as charts, arrays summarised) and Figures (one panel per
visualizer step); see ``docs/report.md``.

Python builds the values (tables, SVG charts, panels: HTML strings marked safe) and the
Jinja2 templates in ``mergescope/templates`` (``report.html.j2`` and its partials) lay them
out, inlining ``report.css`` and ``report.js``.

Panels. The report knows no plugin's files: a visualizer step's panel comes from its
component's ``report_panel(node, files, run_dir)`` when it has one, else from
:func:`default_panel` (a gallery of its images, links to its other files). Two optional,
backward compatible extensions of ``report_panel``:

- A method that also takes ``results`` and / or ``metric_steps`` by keyword (or
  ``**kwargs``) gets the run's results tree and the names of its metric steps.
- It may return a :class:`Panel`: its HTML plus the CSS and script it needs, which the
  report inlines once per page (however many steps share them) after its own style and
  script. ``report.js`` is the generic hook such scripts use:
  ``mergescope.panel(selector, init)`` calls ``init(element)`` once for every element
  matching ``selector`` once the page is parsed. So a plugin ships its CSS and JS as its
  own package data and the page stays one file.

The building blocks below that have no underscore are public, for plugins' panels.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import inspect
import logging
import math
import re
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
import numpy as np
import xarray as xr
from markupsafe import Markup

from .claims import CLAIMS_GROUP, HOLDS, format_number, verdicts_from_dataset
from .kinds import KINDS
from .report_parts import CLASSES_SHOWN, alignment_table, composition_columns, endpoints_table, models_table
from .report_parts import percent as _percent
from .storage import atomic_path

__all__ = [
    "REPORT_FILE", "Panel", "write_report", "render_report", "default_panel", "image_gallery", "file_list",
    "html_table", "line_chart", "node_files", "unit_scores", "guess_metric_steps", "IMAGE_SUFFIXES",
]  # fmt: skip

log = logging.getLogger("mergescope")

#: The report's file name inside the run directory.
REPORT_FILE = "report.html"
#: The sections of the report page, in order (``render_report``'s ``sections``).
SECTIONS = ("claims", "pipeline", "models", "metrics", "tasks", "results", "figures")

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
#: The run's own files, linked from the Pipeline section.
_RUN_FILES = ("results.nc", "summary.txt", "pipeline.toml", "run.json")


@dataclasses.dataclass(frozen=True)
class Panel:
    """A visualizer's panel: its HTML, and the CSS and script it needs on the page (texts, not links).

    ``report_panel`` may return one instead of a string. Each distinct ``css`` / ``js`` text
    is inlined once per page, after the report's own style and script (``report.js``, whose
    ``mergescope.panel(selector, init)`` a script calls to start its elements).
    """

    html: str
    css: str = ""
    js: str = ""

    def __str__(self) -> str:
        return self.html

    def __html__(self) -> str:  # markupsafe: the HTML is safe as it is
        return self.html


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mergescope", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "j2"), default_for_string=True),
        undefined=jinja2.StrictUndefined,
    )
    env.filters["px"] = lambda value: f"{float(value):.1f}"  # a position in pixels, as the SVG writes it
    env.filters["cell"] = _cell
    env.filters["urlquote"] = quote
    env.filters["slug"] = _slug
    env.tests["number_cell"] = _is_number_cell
    macros = env.get_template("macros.html.j2").module  # table and gallery, for every template and below
    env.globals.update(table=macros.table, gallery=macros.gallery)  # type: ignore[attr-defined]
    return env


def _render(template: str, **values: Any) -> str:
    return _environment().get_template(template).render(**values)


def _macro(name: str) -> Any:
    """A macro of ``macros.html.j2``: ``table`` or ``gallery``."""
    return _environment().globals[name]


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
    sections: Collection[str] = SECTIONS,
    only: Collection[str] | None = None,
    title: str | None = None,
) -> str:
    """The report page as a string; see :func:`write_report` for the other parameters.

    Parameters
    ----------
    sections
        The sections the page shows, of :data:`SECTIONS` (a notebook shows a run without
        its figures, and a step with its own sections only).
    only
        The steps whose tables and panels the page shows; default: every step.
    title
        The page's title; default: the run directory's name.
    """
    run_dir = Path(run_dir)
    info = dict(info or {})
    components = components or {}
    steps = _steps(results, info)
    present = [s for s in steps if s["present"] and (only is None or s["name"] in only)]
    metric_steps = [s["name"] for s in steps if _is_metric(s)]

    def shown(section: str, value: Any) -> Any:
        return value if section in sections else None

    tasks = None  # the Tasks section, when the run evaluated tasks
    if "tasks" in results.children and "tasks" not in {s["name"] for s in steps}:
        tasks = Markup(_tasks_section(results.children["tasks"].to_dataset(inherit=False)))
    extras = {"results": results, "metric_steps": metric_steps}
    panels = [
        (s, _visualizer_panel(s, results.children[s["name"]], components.get(s["name"]), run_dir, extras))
        for s in present
        if _is_visualizer(s) and "figures" in sections
    ]
    claims = results.children.get(CLAIMS_GROUP)
    return _render(
        "report.html.j2",
        title=title or f"mergescope report: {run_dir.resolve().name}",
        claims=shown(
            "claims", Markup(_claims_section(claims.to_dataset(inherit=False))) if claims is not None else None
        ),
        pipeline=shown("pipeline", Markup(_pipeline_section(steps, info, pipeline_text, summary))),
        models=shown("models", Markup(_models_section(info)) if info.get("models") or info.get("data") else None),
        metrics=[(s, Markup(_metric_step(results.children[s["name"]]))) for s in present if _is_metric(s)]
        if "metrics" in sections
        else [],
        tasks=shown("tasks", tasks),
        results=[
            (
                s,
                Markup(
                    _results_step(results.children[s["name"]], s, info.get("models") or {}, components.get(s["name"]))
                ),
            )
            for s in present
            if _is_other_result(s) and "results" in sections
        ],
        figures=panels,
        styles=[Markup(css) for css in dict.fromkeys(p.css for _, p in panels if p.css)],
        scripts=[Markup(js) for js in dict.fromkeys(p.js for _, p in panels if p.js)],
    )


# ----------------------------------------------------------------------------- steps and their sections
# Which section shows a step is its kind's ``report_section`` (mergescope.kinds); a step
# whose kind is unknown (results written elsewhere) is placed by what its node holds.

METRICS, RESULTS, PANELS = "metrics", "results", "panels"


def _is_metric(step: Mapping[str, Any]) -> bool:
    return bool(step["section"] == METRICS)


def _is_visualizer(step: Mapping[str, Any]) -> bool:
    return bool(step["section"] == PANELS)


def _is_other_result(step: Mapping[str, Any]) -> bool:
    """A step shown under Results: neither metric tables nor a panel."""
    return bool(step["section"] == RESULTS)


def guess_metric_steps(results: xr.DataTree) -> list[str]:
    """The top-level nodes of ``results`` whose contents read as a metric step's (per-unit scores per layer)."""
    return [str(n) for n, c in results.children.items() if _guess_section(c) == METRICS]


def _section(kind: str, node: xr.DataTree | None) -> str:
    """The report section of a step of ``kind`` (its node decides when the kind is not a step kind)."""
    known = KINDS.get(kind)
    if known is not None and known.step is not None:
        return known.step.report_section
    return _guess_section(node) if node is not None else RESULTS


def _steps(results: xr.DataTree, info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every step, in order, with its use, kind, time and cache state."""
    declared = info.get("steps") or {}
    seconds = info.get("seconds") or {}
    names = list(declared) or [n for n in results.children if n not in ("tasks", CLAIMS_GROUP)]
    steps = []
    for name in names:
        meta = declared.get(name) or {}
        present = name in results.children
        node = results.children[name] if present else None
        kind = str(meta.get("kind") or "")
        section = _section(kind, node)
        steps.append(
            {
                "name": str(name),
                "use": str(meta.get("use", "")),
                "kind": kind or {METRICS: "metric", PANELS: "visualizer"}.get(section, "result"),
                "section": section,
                "cached": meta.get("cached"),
                "seconds": seconds.get(name),
                "present": present,
                "models": [str(m) for m in meta.get("models") or []],
                "alignment": _alignment_of(meta),
                "makes_alignment": _makes_alignment(kind, node),
            }
        )
    return steps


def _alignment_of(meta: Mapping[str, Any]) -> str:
    """The alignment a step used: its ``alignment``, else the aligner steps its ``"b@step"`` models name."""
    if meta.get("alignment"):
        return str(meta["alignment"])
    named = dict.fromkeys(str(m).partition("@")[2] for m in meta.get("models") or [] if "@" in str(m))
    return ", ".join(named)


def _makes_alignment(kind: str, node: xr.DataTree | None) -> bool:
    """Whether a step's node is an alignment: its kind makes one, or (kind unknown) it reads as one."""
    known = KINDS.get(kind)
    if known is not None and known.step is not None:
        return bool(known.step.makes_alignment)
    return (
        node is not None
        and "reference" in node.ds
        and any("transform" in g.ds for m in node.children.values() for g in m.children.values())
    )


def _guess_section(node: xr.DataTree) -> str:
    """The section of a step's node read from its contents: files make a panel, per-unit scores metric tables."""
    if "files" in node.ds:
        return PANELS
    if node.children and all(unit_scores(c.to_dataset(inherit=False)) for c in node.children.values()):
        return METRICS
    return RESULTS


def unit_scores(ds: xr.Dataset) -> list[str]:
    """Variables of ``ds`` that score units: numeric, on dims ``(model, unit)`` or ``(unit,)``."""
    return [
        str(v)
        for v, da in ds.data_vars.items()
        if da.dims in (("model", "unit"), ("unit",)) and np.issubdtype(da.dtype, np.number)
    ]


def _pipeline_section(steps: list[dict[str, Any]], info: Mapping[str, Any], pipeline_text: str, summary: str) -> str:
    about = [[k, v] for k, v in info.items() if k not in ("seconds", "steps") and not isinstance(v, (dict, list))]
    seconds = info.get("seconds") or {}
    rows = []
    for i, s in enumerate(steps, 1):
        cache = {True: "cached", False: "run"}.get(s["cached"], "")
        rows.append(
            [i, s["name"], s["use"], s["kind"], ", ".join(s["models"]), s["alignment"], _seconds(s["seconds"]), cache]
        )
    for extra in ("models", "tasks"):
        if extra in seconds:
            label = "models (build, train or load)" if extra == "models" else "tasks (evaluation)"
            rows.append(["", label, "", "", "", "", _seconds(seconds[extra]), ""])
    texts = {"summary": summary, "pipeline_text": pipeline_text}
    return _render("pipeline.html.j2", about=about, has_steps=bool(steps), rows=rows, files=_RUN_FILES, **texts)


def _seconds(value: Any) -> str:
    return "" if value is None else f"{float(value):.2f}"


# ----------------------------------------------------------------------------- models, alignments, endpoints
# Their tables are built in mergescope.report_parts; the templates lay them out.


def _models_section(info: Mapping[str, Any]) -> str:
    """Every declared and merged model (run.json ``models``) and the run's data (``data``)."""
    rows, data = models_table(info)
    return _render("models.html.j2", rows=rows, data=data, shown=CLASSES_SHOWN)


def _alignment_step(node: xr.DataTree) -> str:
    """One table of the alignment, a row per model and group (units, the map, the diagnostics), raw arrays folded."""
    return _render("alignment.html.j2", **alignment_table(node))


def _endpoints_note(ds: xr.Dataset, step: Mapping[str, Any], models: Mapping[str, Any], component: Any) -> str:
    """The accuracies at a sweep's endpoints beside the models' own, and why they may differ."""
    table = endpoints_table(ds, step, models, component)
    return _render("endpoints.html.j2", **table) if table else ""


# ----------------------------------------------------------------------------- metrics


def _stats(values: np.ndarray) -> list[Any]:
    """Units, mean, median, std and NaN count of one score over units."""
    values = np.asarray(values, dtype=float).ravel()
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [values.size, math.nan, math.nan, math.nan, int(values.size)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, median, std = float(finite.mean()), float(np.median(finite)), float(finite.std())
    return [values.size, mean, median, std, int(values.size - finite.size)]


def _metric_step(node: xr.DataTree) -> str:
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
    if not rows:
        return '<p class="empty">No scores.</p>'
    return html_table(["layer", "variable", "model", "units", "mean", "median", "std", "NaN"], rows, cls="num")


# ----------------------------------------------------------------------------- tasks


def _tasks_section(ds: xr.Dataset) -> str:
    if "accuracy" not in ds or "model" not in ds.dims or "task" not in ds.dims:
        return _dataset_summary(ds)
    tasks = [str(t) for t in ds["task"].values]
    extra, columns = composition_columns(ds)
    head = ["model", *extra, *tasks, "average"] + (["norm. average"] if "average_normalized_accuracy" in ds else [])
    rows = []
    for i, m in enumerate(ds["model"].values):
        row: list[Any] = [
            str(m),
            *(columns[c][i] for c in extra),
            *(_percent(v) for v in ds["accuracy"].sel(model=m).values),
        ]
        row.append(_percent(ds["average_accuracy"].sel(model=m)) if "average_accuracy" in ds else "")
        if "average_normalized_accuracy" in ds:
            row.append(_percent(ds["average_normalized_accuracy"].sel(model=m)))
        rows.append(row)

    def per_task(var: str, cell: Any) -> list[list[Any]]:
        models: Any = ds["model"].values if var in ds else []
        return [[str(m), *(cell(v) for v in ds[var].sel(model=m).values)] for m in models]

    normalised, loss = per_task("normalized_accuracy", _percent), per_task("loss", float)
    return _render("tasks.html.j2", head=head, rows=rows, tasks=tasks, normalised=normalised, loss=loss)


def _claims_section(ds: xr.Dataset) -> str:
    """What the pipeline's papers say and whether this run shows it, one row per claim."""
    rows = verdicts_from_dataset(ds)
    return _render(
        "claims.html.j2", rows=rows, format_number=format_number, holding=sum(r["state"] == HOLDS for r in rows)
    )


# ----------------------------------------------------------------------------- other results


def _results_step(
    node: xr.DataTree,
    step: Mapping[str, Any] | None = None,
    models: Mapping[str, Any] | None = None,
    component: Any = None,
) -> str:
    """A step of the Results section: an alignment as one table, else every node summarised.

    ``step`` (from :func:`_steps`) and ``models`` (run.json ``models``) add the note on a
    sweep's endpoints, compared with the models' own accuracies; ``component`` (the step's)
    may say why they differ (its ``endpoint_note``).
    """
    endpoints = _endpoints_note(node.to_dataset(inherit=False), step or {}, models or {}, component)
    if step and step.get("makes_alignment"):
        return endpoints + _alignment_step(node)
    nodes = [(sub.relative_to(node), Markup(_dataset_summary(sub.to_dataset(inherit=False)))) for sub in node.subtree]
    return endpoints + _render("results.html.j2", nodes=[(where, summary) for where, summary in nodes if summary])


def _dataset_summary(ds: xr.Dataset) -> str:
    """Scalars and short labelled values as tables, curves as charts, long arrays summarised."""
    scalars, charts, summaries, listed = [], [], [], []
    matrices: list[tuple[str, list[str], list[list[Any]]]] = []  # small 2-D arrays as tables
    curves: dict[str, list[str]] = {}  # dim -> 1-D curves along it
    labelled: dict[str, list[str]] = {}  # dim -> short 1-D values along it
    for var, da in ds.data_vars.items():
        numeric = np.issubdtype(da.dtype, np.number) or np.issubdtype(da.dtype, np.bool_)
        if da.ndim == 0:
            scalars.append([var, da.values.item() if numeric else str(da.values)])
        elif numeric and _curve_dim(da) is not None:
            charts.append(Markup(_chart_of(str(var), da)))
            if da.ndim == 1:
                curves.setdefault(str(da.dims[0]), []).append(str(var))
        elif da.ndim == 1 and da.size <= _LABELLED_MAX:
            labelled.setdefault(str(da.dims[0]), []).append(str(var))
        elif numeric and da.ndim == 1:
            summaries.append([var, str(da.dims[0]), *_stats(da.values)])
        elif numeric and _is_small_matrix(da):
            matrices.append((str(var), *_matrix(da)))
        else:
            shape = " x ".join(f"{d} {n}" for d, n in da.sizes.items())
            listed.append([var, shape, str(da.dtype)])
    if not ds.data_vars:
        return ""
    by_dim = {
        "labelled": [_by_dim(ds, dim, names) for dim, names in labelled.items()],
        "values": [_by_dim(ds, dim, names) for dim, names in curves.items()],  # of the charts
    }
    return _render(
        "dataset.html.j2",
        scalars=scalars,
        charts=charts,
        summaries=summaries,
        matrices=matrices,
        listed=listed,
        **by_dim,
    )


def _is_small_matrix(da: xr.DataArray) -> bool:
    """A 2-D array with few rows and columns, neither per item (per unit, per sample): shown as a table."""
    return (
        da.ndim == 2
        and not set(da.dims) & _PER_ITEM_DIMS
        and da.shape[0] <= _LABELLED_MAX
        and da.shape[1] <= len(_PALETTE)
    )


def _matrix(da: xr.DataArray) -> tuple[list[str], list[list[Any]]]:
    rows_dim, cols_dim = (str(d) for d in da.dims)
    labels = {
        d: [str(v) for v in da[d].values] if d in da.coords else [str(i) for i in range(da.sizes[d])] for d in da.dims
    }
    head = [f"{rows_dim} / {cols_dim}", *labels[cols_dim]]
    return head, [[label, *da.values[i]] for i, label in enumerate(labels[rows_dim])]


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


def _by_dim(ds: xr.Dataset, dim: str, names: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    """Variables along one dim side by side: the head and a row per position, labelled by the dim's coordinate."""
    x = ds[dim].values if dim in ds.coords else np.arange(ds.sizes[dim])
    return [dim, *names], [[x[i], *(ds[v].values[i] for v in names)] for i in range(len(x))]


# ----------------------------------------------------------------------------- visualizers


def _visualizer_panel(step: Mapping[str, Any], node: xr.DataTree, component: Any, run_dir: Path, extras: Any) -> Panel:
    """The step's panel: its component's ``report_panel`` if it has one, else :func:`default_panel`.

    ``extras``: ``results`` and ``metric_steps``, passed to a ``report_panel`` that takes them.
    """
    ds = node.to_dataset(inherit=False)
    files = node_files(ds)
    method = getattr(component, "report_panel", None)
    error = ""
    if callable(method):
        try:
            panel = method(ds, files, run_dir, **_accepted_keywords(method, extras))
            return panel if isinstance(panel, Panel) else Panel(str(panel))
        except Exception as exc:  # a plugin's panel must not cost the whole report
            what = f"{type(exc).__name__}: {exc}"
            log.warning("step %s: report_panel failed (%s); showing its files instead", step["name"], what)
            error = f'<p class="error">The panel of this step failed: {_e(what)}</p>'
    return Panel(error + default_panel(ds, run_dir, files=files, **extras))


def _accepted_keywords(method: Any, extras: Mapping[str, Any]) -> dict[str, Any]:
    """The ``extras`` that ``method`` takes as keywords: by name, or all of them through ``**kwargs``."""
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): the three positional arguments
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return dict(extras)
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in extras.items() if k in named}


def node_files(node: xr.Dataset) -> list[Path]:
    """A visualizer step's files (its ``files`` variable), relative to the run directory."""
    if "files" not in node:
        return []
    return [Path(str(f)) for f in np.atleast_1d(node["files"].values) if str(f)]


def default_panel(
    node: xr.Dataset,
    run_dir: str | Path,
    results: xr.DataTree | None = None,
    *,
    files: Sequence[Path] | None = None,
    metric_steps: Sequence[str] | None = None,
) -> str:
    """The panel of a visualizer step without its own ``report_panel``.

    A gallery of its images (the first :data:`GALLERY_LIMIT`); its other files are listed
    as links.

    Parameters
    ----------
    node
        The step's results node: ``files`` (paths relative to ``run_dir``) and what the
        visualizer's netCDF outputs hold.
    run_dir
        The run directory, where the report is.
    results, metric_steps
        The run's results and its metric steps, as a ``report_panel`` may get them;
        accepted for compatibility, the default panel shows neither.
    files
        The step's files; default: the node's ``files`` variable.
    """
    files = list(files) if files is not None else node_files(node)
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
    images = [(Path(f).as_posix(), Path(f).name, (Path(run_dir) / f).is_file()) for f in files]
    return str(_macro("gallery")(images))


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


def _is_number_cell(value: Any) -> bool:
    """Whether a table cell is a number (right-aligned): a number, or a string of one (preformatted, as percents)."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    return number or (isinstance(value, str) and _NUMBER.fullmatch(value) is not None)


def html_table(head: Sequence[Any], rows: Iterable[Sequence[Any]], *, caption: str = "", cls: str = "") -> str:
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
    return str(_macro("table")(list(head), [list(row) for row in rows], caption, cls))


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

    lines = []
    for i, (label, values) in enumerate(ys.items()):
        points, segments = [], [[]]  # type: ignore[var-annotated]
        for xv, yv in zip(xs, values):
            if np.isfinite(xv) and np.isfinite(yv):
                points.append((sx(xv), sy(yv), f"{label}: {xlabel or 'x'} = {_cell(xv)}, {_cell(yv)}"))
                segments[-1].append(f"{sx(xv):.1f},{sy(yv):.1f}")
            elif segments[-1]:  # a gap breaks the line
                segments.append([])
        row, col = divmod(i, 3)
        lines.append(
            {
                "colour": _PALETTE[i % len(_PALETTE)],
                "label": label[:24],
                "points": points,
                "segments": [" ".join(seg) for seg in segments if len(seg) > 1],
                "legend": (left + col * (pw / 3), height - bottom + 36 + 16 * row) if legend else None,
            }
        )
    ticks = {"yticks": [(sy(t), _cell(t)) for t in _ticks(y0, y1)]}
    ticks["xticks"] = [(sx(t), _cell(t)) for t in _ticks(x0, x1)]
    sizes = {"width": width, "height": height, "left": left, "top": top, "pw": pw, "ph": ph}
    return _render("chart.svg.j2", title=title, xlabel=xlabel, ylabel=ylabel, lines=lines, **ticks, **sizes)
