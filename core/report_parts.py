"""The parts of the report that say the essentials: models and data, alignments, a sweep's endpoints.

Values only (rows of tables, texts); :mod:`mergescope.report` lays them out with its
templates (``models.html.j2``, ``alignment.html.j2``, ``endpoints.html.j2``).

- :func:`models_table`: every declared and merged model of run.json ``models`` (source,
  architecture, parameters, its own loss and accuracy) and the run's ``data``.
- :func:`alignment_table`: an aligner step's node (:meth:`mergescope.values.Alignment.to_tree`)
  as one table, a row per model and group: units, whether the map is a permutation and how
  many units it moves, and the diagnostics the root holds per model and group.
- :func:`endpoints_table`: a sweep's accuracies at alpha 0 and 1 beside the models' own,
  with one sentence on why they may differ.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
from torch import nn

__all__ = [
    "CLASSES_SHOWN",
    "models_table",
    "alignment_table",
    "endpoints_table",
    "percent",
    "task_table",
    "parameter_count",
    "plain_json",
    "step_evaluation",
]

#: 1-D diagnostics up to this long along a further dim get a row per position.
_LABELLED_MAX = 32


def percent(value: Any) -> str:
    """A fraction as a percentage with one decimal ("" for NaN)."""
    v = float(value)
    return "" if math.isnan(v) else f"{100 * v:.1f}"


# ----------------------------------------------------------------------------- models and data

#: Classes listed in full on the page; a longer list is folded away.
CLASSES_SHOWN = 40


def models_table(info: Mapping[str, Any]) -> tuple[list[list[Any]], dict[str, Any] | None]:
    """The rows of every declared and merged model (run.json ``models``) and the run's data (``data``)."""
    rows = []
    for name, m in (info.get("models") or {}).items():
        accuracy = m.get("accuracy")
        rows.append(
            [
                name,
                _source_text(m.get("source") or {}, info.get("data")),
                _architecture_text(m.get("architecture")),
                f"{int(m['parameters']):,}" if m.get("parameters") is not None else "",
                float(m["loss"]) if m.get("loss") is not None else "",
                percent(accuracy) if accuracy is not None else "",
                _evaluated_on(m),
            ]
        )
    data = info.get("data") or None
    if data:
        options = _options_text(data.get("options") or {})
        data = {
            "name": str(data.get("name", "")),
            "component": f"{data.get('use') or ''}{f' ({options})' if options else ''}",
            "images": data.get("images"),
            "classes": [str(c) for c in data.get("classes") or []],
        }
    return rows, data


def _options_text(options: Mapping[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, str):
            return repr(v).replace("'", '"')
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + _options_text(v) + "}"
        return str(v)

    return ", ".join(f"{k} = {value(v)}" for k, v in options.items())


def _architecture_text(arch: Mapping[str, Any] | None) -> str:
    if not arch:
        return ""
    if not arch.get("use"):
        return f"{arch.get('class', '')} (a module given in Python)"
    options = _options_text(arch.get("options") or {})
    return f"{arch['use']} ({options})" if options else str(arch["use"])


def _source_text(source: Mapping[str, Any], run_data: Mapping[str, Any] | None = None) -> str:
    """Where a model comes from; a training set's options are those that differ from the run's data."""
    kind = source.get("kind")
    if kind == "checkpoint":
        return f"checkpoint {source.get('path', '')}"
    if kind == "trained":
        training = _options_text(source.get("training") or {})
        on = source.get("train_data") or {}
        data = ""
        if on.get("use"):
            same = run_data and run_data.get("use") == on.get("use")
            base = (run_data or {}).get("options") or {} if same else {}
            options = _options_text({k: v for k, v in (on.get("options") or {}).items() if base.get(k, object()) != v})
            data = f"; on {on['use']}" + (f" ({options})" if options else "")
        return f"trained here ({training}){data}"
    if kind == "merged":
        models = ", ".join(source.get("models") or [])
        text = f"merged by step {source.get('step')} ({source.get('use')}) from {models}"
        return text + (f", alignment {source['alignment']}" if source.get("alignment") else "")
    if kind == "module":
        return f"given in Python ({source.get('class', '')})"
    return str(kind or "")


def _evaluated_on(model: Mapping[str, Any]) -> str:
    on = model.get("evaluated_on")
    if not on:
        return ""
    source = model.get("source") or {}
    return f"{on}, by step {source['step']}" if source.get("kind") == "merged" else str(on)


# ----------------------------------------------------------------------------- alignments
# An aligner's node (mergescope.values.Alignment.to_tree): ``reference``, ``space`` and the
# diagnostics at the root, one ``transform`` (unit, unit_ref) per ``<model>/<group>``.


def alignment_table(node: xr.DataTree) -> dict[str, Any]:
    """An aligner step's table: a row per model and group (units, the map, the diagnostics), its scalars, raw arrays."""
    root = node.to_dataset(inherit=False)
    pairs = [
        (str(m), str(g), gnode.to_dataset(inherit=False))
        for m, mnode in node.children.items()
        for g, gnode in mnode.children.items()
        if "transform" in gnode.ds
    ]
    groups = {g for _, g, _ in pairs}
    group_dims = [str(d) for d in root.dims if d in root.coords and {str(v) for v in root[d].values} & groups]
    keyed = {"model", *group_dims}
    columns, extra_dim, rest = _diagnostic_columns(root, keyed)
    head = ["model", "group", "units", "map", "moved"] + columns
    levels: list[str] = [str(v) for v in root[extra_dim].values] if extra_dim else [""]
    if extra_dim:
        head.insert(2, extra_dim)
    rows = []
    for model, group, ds in pairs:
        units, kind, moved = _transform_summary(ds["transform"])
        for level in levels:
            at = {"model": model, **{d: group for d in group_dims}, **({extra_dim: level} if extra_dim else {})}
            values = [_value_at(root[v], at) for v in columns]
            rows.append([model, group, *([level] if extra_dim else []), units, kind, moved, *values])
    scalars = [[str(v), _scalar(root[v])] for v in root.data_vars if root[v].ndim == 0]
    raw = _raw_arrays(node, root, rest)
    return {"scalars": scalars, "head": head, "rows": rows, "raw": raw, "count": len(pairs)}


def _diagnostic_columns(root: xr.Dataset, keyed: set[str]) -> tuple[list[str], str | None, list[str]]:
    """Root variables that go in the alignment's table, the one further dim they share (a row per level), the rest."""
    candidates = {
        str(v): [str(d) for d in da.dims if d not in keyed]
        for v, da in root.data_vars.items()
        if da.ndim and set(da.dims) & keyed and np.issubdtype(da.dtype, np.number)
    }
    extra = [e[0] for e in candidates.values() if len(e) == 1 and root.sizes[e[0]] <= _LABELLED_MAX]
    extra_dim = max(set(extra), key=extra.count) if extra else None
    columns = [v for v, e in candidates.items() if not e or e == [extra_dim]]
    rest = [str(v) for v, da in root.data_vars.items() if da.ndim and str(v) not in columns]
    return columns, extra_dim, rest


def _value_at(da: xr.DataArray, at: Mapping[str, str]) -> Any:
    where = {str(d): at[str(d)] for d in da.dims if str(d) in at}
    if len(where) != da.ndim:
        return ""
    try:
        index = {d: [str(v) for v in da[d].values].index(label) for d, label in where.items()}
    except (KeyError, ValueError):  # a model or group this variable does not hold
        return ""
    return _scalar(da.isel(index))


def _scalar(da: xr.DataArray) -> Any:
    value = da.values.item() if da.ndim == 0 else da.values
    return value.decode() if isinstance(value, bytes) else value


def _transform_summary(t: xr.DataArray) -> tuple[int, str, Any]:
    """Units of the reference, whether the map is a permutation, and how many units it moves."""
    m = np.asarray(t.values, dtype=float)
    units = int(m.shape[-1]) if m.ndim == 2 else int(m.size)
    square = m.ndim == 2 and m.shape[0] == m.shape[1] and bool(np.isin(m, (0.0, 1.0)).all())
    if square and (m.sum(axis=0) == 1).all() and (m.sum(axis=1) == 1).all():
        moved = int((m.argmax(axis=1) != np.arange(len(m))).sum())
        return units, "identity" if moved == 0 else "permutation", moved
    return units, "linear", ""


def _raw_arrays(node: xr.DataTree, root: xr.Dataset, rest: Sequence[str]) -> list[list[Any]]:
    """Every array of the step not in its table: node, variable, dims and dtype (shown folded)."""
    rows: list[list[Any]] = [[".", v, _shape(root[v]), str(root[v].dtype)] for v in rest]
    for sub in node.subtree:
        if sub is node:
            continue
        ds = sub.to_dataset(inherit=False)
        for v, da in ds.data_vars.items():
            rows.append([sub.relative_to(node), str(v), _shape(da) if da.ndim else _scalar(da), str(da.dtype)])
    return rows


def _shape(da: xr.DataArray) -> str:
    return " x ".join(f"{d} {n}" for d, n in da.sizes.items())


# ----------------------------------------------------------------------------- sweep endpoints
# Why a sweep's endpoints may differ from the models' own accuracies depends on what the
# merger does at every point of its path: the merger says so itself (its optional
# ``endpoint_note(result)``, see mergescope.components.ComponentExtras); the report adds
# what the run's facts give (the alignment, the data).


def _endpoint_reason(
    ds: xr.Dataset, step: Mapping[str, Any], models: Mapping[str, Any], names: list[str], component: Any = None
) -> str:
    """One or two sentences: why the endpoints' accuracies here may differ from the models' own."""
    own = {str((models.get(n) or {}).get("evaluated_on") or "") for n in names} - {""}
    here = str((models.get(str(step.get("name", ""))) or {}).get("evaluated_on") or "")
    data = f"the step's data ({here})" if here else "the step's data"
    alignment = step.get("alignment")
    facts = f"Endpoints measured by this step on {data}"
    if alignment:
        facts += f", with {names[1]} mapped onto {names[0]} by alignment {alignment}"
    if here and own and own != {here}:
        facts += f"; the models' own accuracies were measured on {', '.join(sorted(own))}"
    note = getattr(component, "endpoint_note", None)
    said = str(note(ds)).strip() if callable(note) else ""
    return facts + "." + (f" {said}" if said else " The models' own are in the Models section.")


def endpoints_table(
    ds: xr.Dataset, step: Mapping[str, Any], models: Mapping[str, Any], component: Any = None
) -> dict[str, Any] | None:
    """The accuracies at a sweep's endpoints (alpha 0 and 1) beside the models' own, and why they may differ."""
    if "endpoints" not in ds or "accuracy" not in ds or ds["accuracy"].dims != ("alpha",):
        return None
    names = [str(n) for n in np.atleast_1d(ds["endpoints"].values)]
    alphas = [float(a) for a in ds["alpha"].values] if "alpha" in ds.coords else []
    if len(names) != 2 or not {0.0, 1.0} <= set(alphas):
        return None
    rows = []
    for alpha, name in zip((0.0, 1.0), names):
        own = (models.get(name) or {}).get("accuracy")
        here = float(ds["accuracy"].values[alphas.index(alpha)])
        difference = "" if own is None else f"{100 * (here - float(own)):+.2f}"
        rows.append([name, alpha, percent(here), "" if own is None else percent(own), difference])
    head = ["endpoint", "alpha", "accuracy here (%)", "own accuracy (%)", "difference (points)"]
    return {"head": head, "rows": rows, "note": _endpoint_reason(ds, step, models, names, component)}


# ----------------------------------------------------------------------------- run.json and summary.txt
# What the runner writes of the models, the steps and the tasks, for the report to show.


def composition_columns(ds: xr.Dataset) -> tuple[list[str], dict[str, list[str]]]:
    """The "method" and "alignment" columns of a task table, where they say something.

    ``method`` is shown when some merge's step name differs from its method, ``alignment``
    when some model went through an aligner step (coords of the tasks group, see
    :meth:`mergescope.pipeline.Pipeline.composition`). Empty cells read ``-``.
    """
    models = [str(m) for m in ds["model"].values]
    columns: dict[str, list[str]] = {}
    if "method" in ds.coords and any(v and v != m for v, m in zip(map(str, ds["method"].values), models)):
        columns["method"] = [str(v) or "-" for v in ds["method"].values]
    if "alignment" in ds.coords and any(str(v) for v in ds["alignment"].values):
        columns["alignment"] = [str(v) or "-" for v in ds["alignment"].values]
    return list(columns), columns


def task_table(ds: xr.Dataset) -> str:
    """Models x tasks accuracy table (percent) with the average and normalised average.

    Merges made through an alignment, or named apart from their method, carry the
    ``method`` and ``alignment`` columns (:func:`composition_columns`).
    """
    tasks = [str(t) for t in ds["task"].values]
    extra, columns = composition_columns(ds)
    head = ["model", *extra, *tasks, "avg"] + (["norm. avg"] if "average_normalized_accuracy" in ds else [])
    rows = []
    for i, m in enumerate(ds["model"].values):
        row = [str(m), *(columns[c][i] for c in extra), *(f"{100 * v:.1f}" for v in ds["accuracy"].sel(model=m).values)]
        row.append(f"{100 * float(ds['average_accuracy'].sel(model=m)):.1f}")
        if "average_normalized_accuracy" in ds:
            row.append(f"{100 * float(ds['average_normalized_accuracy'].sel(model=m)):.1f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    left = 1 + len(extra)  # names, methods and alignments read from the left
    fmt = lambda r: "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "tasks (accuracy %):\n" + "\n".join("  " + fmt(r) for r in [head, *rows])


def parameter_count(module: nn.Module) -> int:
    """How many numbers a module's parameters hold."""
    return int(sum(p.numel() for p in module.parameters()))


def plain_json(value: object) -> object:
    """``value`` as plain JSON (paths and other objects as strings)."""
    return json.loads(json.dumps(value, default=str))


def step_evaluation(ds: xr.Dataset | None) -> tuple[float | None, float | None]:
    """Loss and accuracy of a merger step's model, as its results say (the sweep's point at ``merged_alpha``)."""
    if ds is None:
        return None, None
    for loss_var, accuracy_var in (("merged_loss", "merged_accuracy"), ("loss", "accuracy")):
        if accuracy_var not in ds:
            continue
        accuracy, loss = ds[accuracy_var], ds.get(loss_var)
        if accuracy.ndim == 1 and accuracy.dims == ("alpha",) and "merged_alpha" in ds:
            where = {"alpha": float(ds["merged_alpha"])}
            try:
                accuracy, loss = accuracy.sel(where), loss.sel(where) if loss is not None else None
            except KeyError:
                continue
        if accuracy.ndim == 0:
            return (float(loss) if loss is not None and loss.ndim == 0 else None), float(accuracy)
    return None, None
