"""Channel categories: sort every channel by how its matches across models score.

The thesis (Zou 2025, sec. 3.2.2 and 3.2.3) sorts channels into categories by
inspecting their top images; this visualizer does the same with a per-unit metric
computed by an earlier metric step (Kendall-τ, correlation, CLIP-δ), so the shares
can be measured on every layer instead of read off by eye.

``"n-models"`` (observation 3): N models aligned to one reference. A channel is
"all similar" when every compared model's unit passes the threshold against the
reference's, "most similar" when all but one or two (``exceptions``) do, and "all
dissimilar" otherwise. On AlexNet the thesis reports 5-10 %, 35-50 % and 40-60 %.

``"merge"`` (observation 2): a merged model against its two parents. A channel of the
merge is "model 1 dominates" when it matches parent 1 but not parent 2, "model 2
dominates" the other way round, "both" when it matches both and "neither" when it
matches neither.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import numpy as np
import xarray as xr

from mergescope.components import Context
from mergescope.errors import ConfigError, closest
from mergescope.hookspecs import hookimpl
from mergescope.validators import as_float, distinct, finite, list_of, non_empty_str, non_negative_int, one_of

__all__ = [
    "CATEGORIES",
    "UNDEFINED",
    "passes",
    "classify_models",
    "classify_merge",
    "gather_scores",
    "categorise",
    "ChannelCategories",
    "register_visualizers",
]

UNDEFINED = -1  # code of a unit position a layer does not have
CATEGORIES: dict[str, tuple[str, ...]] = {
    "n-models": ("all similar", "most similar", "all dissimilar", "undefined"),
    "merge": ("model 1 dominates", "model 2 dominates", "both", "neither", "undefined"),
}
MODES = tuple(CATEGORIES)
DIRECTIONS = ("auto", "higher", "lower")
# Metrics whose lower values mean more alike (direction "auto").
_LOWER_IS_SIMILAR = ("clip_delta",)
_SPREAD_SUFFIXES = ("_mean", "_std")


# ------------------------------------------------------------------- pure functions


def passes(scores: np.ndarray, threshold: float, higher: bool = True) -> np.ndarray:
    """Whether each score counts as similar: ``>= threshold`` (or ``<=`` when lower is similar); NaN never does."""
    values = np.asarray(scores, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return (values >= threshold) if higher else (values <= threshold)


def classify_models(scores: np.ndarray, threshold: float, exceptions: int = 2, higher: bool = True) -> np.ndarray:
    """Category codes (into ``CATEGORIES["n-models"]``) of units compared across N models.

    Parameters
    ----------
    scores
        ``(models, units)``: every compared model's score against the reference.
    threshold, higher
        A score is similar when it is ``>= threshold`` (``<=`` with ``higher=False``).
    exceptions
        How many compared models may fail for "most similar".

    Returns
    -------
    numpy.ndarray
        ``(units,)`` int8 codes. With ``N`` compared models of which ``k`` are similar:
        0 "all similar" (``k == N``), 1 "most similar" (``N - exceptions <= k < N`` and
        ``k >= 1``), 2 "all dissimilar" (every other unit), 3 "undefined" (no model has
        a defined score). A NaN score of a model counts as not similar.
    """
    values = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    n = values.shape[0]
    similar = passes(values, threshold, higher).sum(axis=0)
    codes = np.full(values.shape[1], 2, dtype=np.int8)
    codes[(similar >= max(n - exceptions, 1)) & (similar < n)] = 1
    codes[similar == n] = 0
    codes[np.isnan(values).all(axis=0)] = 3
    return codes


def classify_merge(first: np.ndarray, second: np.ndarray, threshold: float, higher: bool = True) -> np.ndarray:
    """Category codes (into ``CATEGORIES["merge"]``) of a merge's units against its two parents.

    ``first`` / ``second``: ``(units,)`` scores of the merge against parent 1 / 2.
    Codes: 0 "model 1 dominates" (similar to parent 1 only), 1 "model 2 dominates",
    2 "both", 3 "neither", 4 "undefined" (both scores NaN; one NaN counts as not similar).
    """
    s1, s2 = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    p1, p2 = passes(s1, threshold, higher), passes(s2, threshold, higher)
    codes = np.full(s1.shape, 3, dtype=np.int8)
    codes[p1 & ~p2] = 0
    codes[p2 & ~p1] = 1
    codes[p1 & p2] = 2
    codes[np.isnan(s1) & np.isnan(s2)] = 4
    return codes


def _score_variables(ds: xr.Dataset) -> list[str]:
    """Per-unit score variables of a metric result: dims ``(model, unit)`` or ``(unit,)``, spreads excluded."""
    return [
        str(name)
        for name, da in ds.data_vars.items()
        if da.dims in (("model", "unit"), ("unit",))
        and np.issubdtype(da.dtype, np.number)
        and not str(name).endswith(_SPREAD_SUFFIXES)
    ]


def _layer_nodes(step: xr.DataTree) -> dict[str, xr.Dataset]:
    return {name: child.to_dataset(inherit=False) for name, child in step.children.items()}


def _scalar_text(da: xr.DataArray | None) -> str:
    return "" if da is None else str(np.asarray(da.values).item())


def gather_scores(
    results: xr.DataTree, steps: Sequence[str], variable: str = ""
) -> tuple[str, dict[str, xr.DataArray]]:
    """The per-unit scores of metric steps, every compared model of every step on one dim.

    Parameters
    ----------
    results
        The run's results tree: ``/<step>/<layer>`` nodes as metric steps write them.
    steps
        Metric step names; their comparisons are joined in this order.
    variable
        The score variable; ``""``: the only per-unit variable of the steps (not a
        ``_mean`` / ``_std`` spread).

    Returns
    -------
    variable
        The variable read.
    scores
        Layer -> DataArray ``(comparison, unit)`` with coords ``model`` and
        ``reference`` on ``comparison`` (``""`` when a result does not say), in the
        first step's layer order. A ``(unit,)`` variable is one comparison, its model
        named by its scalar ``model`` coord or else by the step.

    Raises
    ------
    ConfigError
        A step that is not in the tree or holds no scores, an ambiguous or missing
        variable, or steps whose layers or unit counts differ.
    """
    nodes: dict[str, dict[str, xr.Dataset]] = {}
    for step in steps:
        if step not in results.children:
            known = _metric_steps(results)
            guess = closest(step, list(results.children))
            hint = f" Did you mean {guess!r}?" if guess else ""
            raise ConfigError(
                f"no step {step!r} in the results.{hint} Steps with per-unit scores: {', '.join(known) or '(none)'}",
                where="key 'metric'",
            )
        nodes[step] = _layer_nodes(results[step])
    if not variable:
        found = sorted({v for layers in nodes.values() for ds in layers.values() for v in _score_variables(ds)})
        if len(found) != 1:
            what = f"several: {', '.join(found)}" if found else "none"
            raise ConfigError(
                f"steps {list(steps)} must hold exactly one per-unit score variable to classify, found {what}; "
                "name it with 'variable'",
                where="key 'variable'",
            )
        variable = found[0]
    scores: dict[str, xr.DataArray] = {}
    first = steps[0]
    layers = [layer for layer, ds in nodes[first].items() if variable in ds]
    if not layers:
        raise ConfigError(f"step {first!r} has no layer with the variable {variable!r}", where="key 'variable'")
    for layer in layers:
        parts = []
        for step in steps:
            ds = nodes[step].get(layer)
            if ds is None or variable not in ds:
                raise ConfigError(
                    f"step {step!r} has no {variable!r} at layer {layer!r}, which step {first!r} has; joined steps "
                    "must score the same layers",
                    where="key 'join'",
                )
            parts.append(_comparisons(ds[variable], step, layer))
        sizes = {p.sizes["unit"] for p in parts}
        if len(sizes) != 1:
            raise ConfigError(f"the joined steps score different numbers of units at layer {layer!r}: {sorted(sizes)}")
        scores[layer] = xr.DataArray(
            np.concatenate([p.values for p in parts]),
            dims=("comparison", "unit"),
            coords={
                "unit": parts[0]["unit"].values,
                "model": ("comparison", [m for p in parts for m in p["model"].values.tolist()]),
                "reference": ("comparison", [r for p in parts for r in p["reference"].values.tolist()]),
            },
        )
    return variable, scores


def _comparisons(da: xr.DataArray, step: str, layer: str) -> xr.DataArray:
    """``(comparison, unit)`` scores with ``model`` and ``reference`` labels per comparison."""
    if da.dims == ("unit",):
        model = _scalar_text(da.coords.get("model")) or step
        da = da.expand_dims("model").assign_coords(model=[model])
    if da.dims != ("model", "unit"):
        raise ConfigError(
            f"step {step!r}, layer {layer!r}: {da.name!r} has dims {da.dims}; channel categories read per-unit scores "
            "with dims ('model', 'unit') or ('unit',)",
            where="key 'variable'",
        )
    n = da.sizes["model"]
    models = [str(m) for m in np.asarray(da["model"].values).reshape(-1)] if "model" in da.coords else [step] * n
    reference = da.coords.get("reference")
    if reference is None:
        references = [""] * n
    elif reference.ndim == 0:
        references = [_scalar_text(reference)] * n
    else:
        references = [str(r) for r in reference.values]
    units = da["unit"].values if "unit" in da.coords else np.arange(da.sizes["unit"])
    return xr.DataArray(
        np.asarray(da.transpose("model", "unit").values, dtype=np.float64),
        dims=("comparison", "unit"),
        coords={"unit": units, "model": ("comparison", models), "reference": ("comparison", references)},
    )


def _metric_steps(results: xr.DataTree) -> list[str]:
    """Top-level nodes whose children hold per-unit scores."""
    return [
        str(name)
        for name, step in results.children.items()
        if any(_score_variables(ds) for ds in _layer_nodes(step).values())
    ]


def _merge_parents(scores: xr.DataArray, parents: Sequence[str]) -> tuple[list[int], list[str], str]:
    """Which comparison belongs to each parent, the parents' names and the merged model's name."""
    models = [str(m) for m in scores["model"].values]
    references = [str(r) for r in scores["reference"].values]
    pairs = ", ".join(f"{r or '?'} vs {m}" for r, m in zip(references, models))
    if not parents:
        if len(models) != 2:
            raise ConfigError(
                f"merge mode compares a merge with its two parents, but the scores hold {len(models)} comparisons "
                f"({pairs}); name the two parents with 'parents'",
                where="key 'parents'",
            )
        # The side the two comparisons share is the merge; the other sides are the parents.
        shared_reference = references[0] and references[0] == references[1]
        shared_model = models[0] == models[1]
        parents = references if shared_model and not shared_reference else models
    chosen, others = [], []
    for parent in parents:
        if parent in models:
            i = models.index(parent)
            other = references[i]
        elif parent in references:
            i = references.index(parent)
            other = models[i]
        else:
            raise ConfigError(f"parent {parent!r} is in no comparison of the scores ({pairs})", where="key 'parents'")
        chosen.append(i)
        others.append(other)
    if chosen[0] == chosen[1]:
        raise ConfigError(f"both parents {list(parents)} name the comparison {pairs.split(', ')[chosen[0]]}")
    if others[0] and others[1] and others[0] != others[1]:
        raise ConfigError(
            f"the scores of parent {parents[0]!r} compare it with {others[0]!r} but those of {parents[1]!r} with "
            f"{others[1]!r}; merge mode needs both compared with the same merged model",
            where="key 'parents'",
        )
    return chosen, list(parents), others[0] or others[1]


def categorise(
    scores: Mapping[str, xr.DataArray],
    mode: str,
    threshold: float,
    *,
    higher: bool = True,
    exceptions: int = 2,
    parents: Sequence[str] = (),
) -> xr.Dataset:
    """Classify every unit of every layer and count the categories.

    Parameters
    ----------
    scores
        Layer -> ``(comparison, unit)`` scores, as :func:`gather_scores` returns.
    mode
        ``"n-models"`` or ``"merge"``.
    threshold, higher, exceptions
        As in :func:`classify_models` / :func:`classify_merge`.
    parents
        Merge mode: the two parents, each named as the ``model`` or ``reference`` of a
        comparison; empty when there are exactly two comparisons.

    Returns
    -------
    xarray.Dataset
        ``unit_category`` (``layer``, ``unit``) int8 codes into the ``category`` coord
        (``-1`` where a layer has fewer units), ``category_count`` and
        ``category_fraction`` (``layer``, ``category``), ``total_fraction``
        (``category``, over every unit of every layer), the names on ``compared``
        (the compared models, or the two parents), scalars ``reference`` (the shared
        reference, or the merge; ``""`` when unknown) and ``similar_threshold``.
    """
    if mode not in CATEGORIES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    names = CATEGORIES[mode]
    rows, compared, reference = [], [], ""
    for layer, da in scores.items():
        values = np.asarray(da.values, dtype=np.float64)
        if mode == "merge":
            chosen, compared, reference = _merge_parents(da, parents)
            codes = classify_merge(values[chosen[0]], values[chosen[1]], threshold, higher)
        else:
            compared = [str(m) for m in da["model"].values]
            refs = {str(r) for r in da["reference"].values}
            reference = refs.pop() if len(refs) == 1 else ""
            codes = classify_models(values, threshold, exceptions, higher)
        rows.append(xr.DataArray(codes, dims="unit", coords={"unit": da["unit"].values}).expand_dims(layer=[layer]))
    if rows:
        table = xr.concat(rows, dim="layer", join="outer", fill_value=UNDEFINED).astype(np.int8)
        table = table.assign_coords(layer=np.asarray(list(scores), dtype=str))
    else:
        table = xr.DataArray(np.zeros((0, 0), dtype=np.int8), dims=("layer", "unit"), coords={"layer": [], "unit": []})
    codes = table.values
    counts = (
        np.stack([(codes == c).sum(axis=1) for c in range(len(names))], axis=1)
        if len(codes)
        else np.zeros((0, len(names)), dtype=np.int64)
    )
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        fractions = counts / totals
        overall = counts.sum(axis=0) / counts.sum() if counts.sum() else np.full(len(names), np.nan)
    return xr.Dataset(
        {
            "unit_category": table,
            "category_count": (("layer", "category"), counts.astype(np.int64)),
            "category_fraction": (("layer", "category"), fractions),
            "total_fraction": ("category", overall),
            "similar_threshold": float(threshold),
            "reference": str(reference),
        },
        coords={"category": list(names), "compared": np.asarray(compared, dtype=str)},
    )


# ------------------------------------------------------------------ option checks


_NAMES = [list_of(non_empty_str), distinct("name")]


def _two_or_none(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if len(value) not in (0, 2):
        raise ValueError(f"'{attribute.name}' names the two parents of the merge (or none), got {value}")


# ---------------------------------------------------------------------- component


@attrs.define
class ChannelCategories:
    """Sort every channel into the thesis's categories by its metric scores and plot the shares per layer.

    Reads the per-unit scores of an earlier metric step (``/<metric>/<layer>``, a
    variable with dims ``(model, unit)``: every compared model against the step's
    first model, the reference; a ``(unit,)`` variable is one compared model). A score
    is *similar* when it is ``>= similar`` (``<= similar`` when lower means more
    alike); a NaN score never is.

    - ``mode = "n-models"`` (N models aligned to one reference, thesis observation 3),
      with ``N`` compared models of which ``k`` are similar to the reference:
      "all similar" ``k = N``; "most similar" ``N - exceptions <= k < N`` and
      ``k >= 1`` (with 4 models aligned to a fifth and ``exceptions = 2``: 2 or 3 of
      the 4 match, i.e. all but one or two of the five models agree); "all
      dissimilar" every other unit (fewer than ``N - exceptions`` match); "undefined"
      when no score is defined (dead units). With one compared model this is
      similar / dissimilar.
    - ``mode = "merge"`` (a merged model against its two parents, observation 2):
      with ``s1``, ``s2`` the merge's scores against parent 1 and 2, "model 1
      dominates" (``s1`` similar, ``s2`` not), "model 2 dominates", "both",
      "neither", "undefined" (both NaN). The two scores may come from one step
      (``models = ["merge", "a", "b@wm"]``) or from two joined steps, one per parent
      (``models = ["a", "merge"]`` and ``["b@wm", "merge"]``); a parent is found as
      the compared model or as the reference of a comparison.

    Writes ``categories.nc`` (see :func:`categorise`) and ``categories.png``: one
    stacked bar per layer with the share of each category.

    Defaults. The thesis sorted channels by eye and gives no threshold, so
    ``similar = 0.5`` is a convention to calibrate against the top images: for
    Kendall's tau it means that about 75 % of the (untied) sample pairs are ordered
    alike by the two units ((1 + tau) / 2); for a correlation it is the usual "large"
    effect. For CLIP-δ (about 0 for matching top-k sets, lower is more alike) 0.5 means
    that the two units' images are less alike than one unit's images among themselves
    by at most half the baseline similarity of images of two different units.
    ``exceptions = 2`` is the thesis's "except one or two". The thesis's AlexNet
    shares (5-10 % all similar, 35-50 % most similar, 40-60 % all dissimilar) are a
    reference to check the threshold against.

    Parameters
    ----------
    metric
        The metric step to read; ``""``: the run's only step with per-unit scores.
    join
        Further metric steps whose comparisons are added to ``metric``'s (e.g. one
        step per parent, or one per aligned model); they must score the same layers.
    variable
        The score variable; ``""``: the only per-unit variable of the steps (spreads
        ``*_mean`` / ``*_std`` are not candidates).
    mode
        ``"n-models"`` or ``"merge"``.
    similar
        The threshold a score must reach to count as similar.
    direction
        ``"higher"``: higher is more alike; ``"lower"``: lower is; ``"auto"``: lower
        for ``clip_delta`` variables, higher for every other.
    exceptions
        How many compared models may miss the threshold for "most similar".
    parents
        Merge mode: the two parents, model 1 first (empty: the two comparisons in the
        order of the steps' models).
    title
        Figure title; default: the step, variable and threshold.
    """

    name: ClassVar[str] = "channel-categories"
    paper: ClassVar[str] = (
        "Zou 2025, Model Merging and Feature Visualization in Deep Neural Networks (sec. 3.2.2-3.2.3, "
        "observations 2 and 3)"
    )

    metric: str = ""
    join: list[str] = attrs.field(factory=list, validator=_NAMES)
    variable: str = ""
    mode: str = attrs.field(default="n-models", validator=one_of(*MODES))
    similar: float = attrs.field(default=0.5, converter=as_float, validator=finite)
    direction: str = attrs.field(default="auto", validator=one_of(*DIRECTIONS))
    exceptions: int = attrs.field(default=2, validator=non_negative_int)
    parents: list[str] = attrs.field(factory=list, validator=[*_NAMES, _two_or_none])
    title: str = ""

    def steps(self, results: xr.DataTree) -> list[str]:
        """The metric steps read: ``metric`` (or the only one with scores) and ``join``; empty when there is none."""
        if self.metric:
            return [self.metric, *self.join]
        found = _metric_steps(results)
        if not found:
            if self.join:
                raise ConfigError("'join' needs 'metric' to name the first step", where="key 'join'")
            return []
        if len(found) > 1:
            raise ConfigError(
                f"the run has several steps with per-unit scores ({', '.join(found)}); name one with 'metric'",
                where="key 'metric'",
            )
        return [found[0], *[s for s in self.join if s != found[0]]]

    def higher_is_similar(self, variable: str) -> bool:
        """Whether higher values of ``variable`` mean more alike (see ``direction``)."""
        if self.direction != "auto":
            return self.direction == "higher"
        return not variable.startswith(_LOWER_IS_SIMILAR)

    def categories(self, results: xr.DataTree) -> xr.Dataset:
        """The categories of every channel (:func:`categorise`); an empty Dataset when nothing has scores."""
        steps = self.steps(results)
        if not steps:
            return xr.Dataset()
        variable, scores = gather_scores(results, steps, self.variable)
        ds = categorise(
            scores,
            self.mode,
            self.similar,
            higher=self.higher_is_similar(variable),
            exceptions=self.exceptions,
            parents=self.parents,
        )
        relation = ">=" if self.higher_is_similar(variable) else "<="
        return ds.assign(metric_step=" + ".join(steps), variable=variable, similar_is=relation)

    def render(self, results: xr.DataTree, out_dir: Path, context: Context | None = None) -> list[Path]:
        """Write ``categories.nc`` and ``categories.png`` into ``out_dir``; nothing when no step has scores.

        ``context`` (the step's) is not needed: the scores are in ``results``.

        Raises
        ------
        ConfigError
            An unknown step or variable, several candidates where one is needed, or
            parents that the scores do not hold.
        """
        ds = self.categories(results)
        if not ds.data_vars:
            return []
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        data_path = out_dir / "categories.nc"
        ds.to_netcdf(data_path)
        figure_path = out_dir / "categories.png"
        self._plot(ds, figure_path)
        return [data_path, figure_path]

    def describe(self, result: xr.Dataset) -> str:
        """One line: the share of every category over all channels of all layers."""
        if "total_fraction" not in result or "category" not in result.coords:
            return "no channels to classify"
        count = int(result["category_count"].sum()) if "category_count" in result else 0
        layers = result.sizes.get("layer", 0)
        shares = ", ".join(
            f"{100 * float(v):.0f}% {c}"
            for c, v in zip(result["category"].values, result["total_fraction"].values)
            if not (str(c) == "undefined" and float(v) == 0.0)
        )
        return f"{count} channels in {layers} layer{'s' if layers != 1 else ''}: {shares}"

    def _plot(self, ds: xr.Dataset, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        layers = [str(layer) for layer in ds["layer"].values]
        fractions = np.nan_to_num(ds["category_fraction"].values)
        fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(layers) + 2.5), 4))
        bottom = np.zeros(len(layers))
        colours = plt.get_cmap("tab10").colors
        names = [str(c) for c in ds["category"].values]
        if self.mode == "merge" and ds.sizes.get("compared", 0) == 2:
            first, second = (str(p) for p in ds["compared"].values)
            names = [n.replace("model 1", first).replace("model 2", second) for n in names]
        for j, label in enumerate(names):
            if label == "undefined" and not fractions[:, j].any():
                continue  # no dead units: keep the legend to the categories that occur
            ax.bar(layers, 100 * fractions[:, j], bottom=100 * bottom, label=label, color=colours[j % len(colours)])
            bottom += fractions[:, j]
        ax.set(ylabel="channels (%)", ylim=(0, 100))
        if len(layers) > 6:
            ax.tick_params(axis="x", labelrotation=45)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        default = (
            f"{ds['metric_step'].item()}: {ds['variable'].item()} {ds['similar_is'].item()} "
            f"{float(ds['similar_threshold']):g} counts as similar"
        )
        ax.set_title(self.title or default, fontsize="medium")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


@hookimpl
def register_visualizers(register):
    """Register :class:`ChannelCategories`."""
    register(ChannelCategories)
