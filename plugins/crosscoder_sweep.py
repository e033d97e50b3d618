"""A crosscoder's sparsity swept: reconstruction, sparsity and latent classes against its strength.

The classes of a crosscoder depend on its sparsity: too weak a penalty leaves every
latent in use by every model (all ``"shared"``), too strong a one ruins the
reconstruction. A sweep trains one crosscoder per strength and seed over the same
recording (several ``crosscoder`` steps that differ in ``l1``, or ``k`` for BatchTopK,
and ``seed``). This visualizer reads their results, tabulates the mean FVU, L0, dead
fraction and class counts of every (value, seed), draws them against the value with
their spread over seeds, and chooses a value by a stated rule.

The value and seed of each result are its scalar coords ``l1`` / ``k`` and ``seed``,
which :meth:`~mergescope_plugins.crosscoder.Crosscoder.fit` records.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import attrs
import numpy as np
import xarray as xr

from mergescope.components import Context
from mergescope.errors import ConfigError, closest
from mergescope.hookspecs import hookimpl
from mergescope.validators import as_float, distinct, list_of, non_empty_str, one_of, positive, positive_int
from mergescope_plugins.crosscoder import class_order, possible_classes

__all__ = ["CrosscoderSweep", "register_visualizers"]

#: Rules that choose one swept value.
RULES = ("sparsest-within-fvu",)

_NAMES = [list_of(non_empty_str), distinct("name")]


def _crosscoder_nodes(results: xr.DataTree) -> dict[str, dict[str, xr.Dataset]]:
    """Every crosscoder result in ``results``: step name -> layer node (path below the step) -> result."""
    found: dict[str, dict[str, xr.Dataset]] = {}
    for node in results.subtree:
        ds = node.to_dataset(inherit=False)
        if "relative_norm" in ds.data_vars and "model" in ds.dims:
            parts = node.path.strip("/").split("/")
            found.setdefault(parts[0], {})["/".join(parts[1:])] = ds
    return found


@attrs.define
class CrosscoderSweep:
    """Compare crosscoders trained at several sparsities and seeds, and choose a sparsity.

    Reads the results of earlier ``crosscoder`` steps over the same models and layer
    that differ in ``parameter`` (``l1``, or ``k`` for BatchTopK) and ``seed``. Writes
    ``sweep.nc`` (see :meth:`sweep`) and ``sweep.png``: against the swept value (log
    scale for ``l1``), the FVU (mean over models), L0, the fraction of dead latents and
    the number of latents of every class (shared, exclusive to each model, shared by
    each subset), each the mean over seeds with a band from the smallest to the largest.

    Parameters
    ----------
    steps
        Names of the crosscoder steps of the sweep; empty (default): every crosscoder
        step of the run.
    parameter
        The swept option: ``"l1"`` (its coefficient) or ``"k"`` (BatchTopK's active
        latents per row). Every step must have been trained with that sparsity.
    rule
        How the value is chosen. ``"sparsest-within-fvu"``: the sparsest value (largest
        ``l1``, smallest ``k``) whose FVU, averaged over models and seeds, is at most
        ``max_fvu``; none when no value reaches it.
    max_fvu
        The FVU bound of the rule.
    layer
        The layer (result node below each step) to read; empty (default): the only
        one the steps share.
    dpi
        Resolution of the figure.
    """

    name: ClassVar[str] = "crosscoder-sweep"
    paper: ClassVar[str] = "Lindsey et al. 2024, Sparse crosscoders for cross-layer features and model diffing"

    steps: list[str] = attrs.field(factory=list, validator=_NAMES)
    parameter: str = attrs.field(default="l1", validator=one_of("l1", "k"))
    rule: str = attrs.field(default="sparsest-within-fvu", validator=one_of(*RULES))
    max_fvu: float = attrs.field(default=0.25, converter=as_float, validator=positive)
    layer: str = ""
    dpi: int = attrs.field(default=120, validator=positive_int)

    # ------------------------------------------------------------------ table

    def sweep(self, results: xr.DataTree) -> xr.Dataset:
        """The sweep's numbers; an empty Dataset when the run has no crosscoder result and no ``steps`` are named.

        Returns
        -------
        xarray.Dataset
            Dims ``value`` (the swept values, ascending), ``seed``, ``model`` and
            ``class`` (every latent class found, ``"dead"`` included). Runs that the
            sweep lacks (a value not trained with some seed) are NaN:

            - ``fvu (value, seed, model)``, ``mean_fvu (value, seed)`` (over models),
            - ``l0 (value, seed)``, ``dead_fraction (value, seed)``,
            - ``class_count (value, seed, class)``: latents per class, for every class
              the models allow (:func:`~mergescope_plugins.crosscoder.possible_classes`, 0 where no latent has it)
              and any other class found,
            - ``step (value, seed)``: the step that trained each run (``""`` if none),
            - ``value_fvu (value)``: ``mean_fvu`` averaged over the seeds,
            - ``chosen``: the value the rule chooses (NaN when none qualifies),
            - ``parameter``, ``rule``, ``max_fvu``, ``layer``: how it was read and chosen.

        Raises
        ------
        mergescope.errors.ConfigError
            A named step that is not in the results or holds no crosscoder result; a
            step without the layer, trained with another sparsity, over other models,
            or repeating another step's (value, seed); no single layer to read.
        """
        found = _crosscoder_nodes(results)
        if self.steps:
            for step in self.steps:
                if step not in found:
                    raise self._missing(step, results, found)
            chosen_steps = list(self.steps)
        else:
            chosen_steps = list(found)
        if not chosen_steps:
            return xr.Dataset()
        layer = self._layer({s: found[s] for s in chosen_steps})
        runs: dict[tuple[float, int], tuple[str, xr.Dataset]] = {}
        models: list[str] | None = None
        first = chosen_steps[0]
        for step in chosen_steps:
            ds = found[step][layer]
            value, seed = self._options(step, ds)
            names = [str(m) for m in ds["model"].values]
            if models is None:
                models = names
            elif names != models:
                raise ConfigError(
                    f"step {step!r} read the models {names}, step {first!r} read {models}; a sweep compares "
                    "crosscoders over the same models" + ("" if self.steps else ": name its steps with 'steps'"),
                    where="key 'steps'",
                )
            if (value, seed) in runs:
                other = runs[(value, seed)][0]
                raise ConfigError(
                    f"steps {other!r} and {step!r} both trained {self.parameter} = {value:g} with seed {seed}; give "
                    "each run of the sweep its own value or seed",
                    where="key 'steps'",
                )
            runs[(value, seed)] = (step, ds)
        assert models is not None
        return self._table(runs, models, layer)

    def _missing(self, step: str, results: xr.DataTree, found: Mapping[str, Any]) -> ConfigError:
        known = ", ".join(found) or "(none)"
        if step in results.children:
            return ConfigError(
                f"step {step!r} holds no crosscoder result (no 'relative_norm' per model); crosscoder steps: {known}",
                where="key 'steps'",
            )
        guess = closest(step, list(found))
        hint = f" Did you mean {guess!r}?" if guess else ""
        return ConfigError(
            f"no earlier step {step!r} in the results.{hint} Crosscoder steps: {known}", where="key 'steps'"
        )

    def _layer(self, nodes: Mapping[str, Mapping[str, xr.Dataset]]) -> str:
        """The layer node every step has: ``layer``, or the only one they share."""
        if self.layer:
            for step, layers in nodes.items():
                if self.layer not in layers:
                    raise ConfigError(
                        f"step {step!r} has no crosscoder result at layer {self.layer!r}; it has "
                        f"{', '.join(map(repr, layers))}",
                        where="key 'layer'",
                    )
            return self.layer
        shared = set.intersection(*(set(layers) for layers in nodes.values()))
        if len(shared) == 1:
            return shared.pop()
        if shared:
            raise ConfigError(
                f"the steps share the layers {', '.join(map(repr, sorted(shared)))}; name the one to sweep with 'layer'",
                where="key 'layer'",
            )
        where = "; ".join(f"{step}: {', '.join(map(repr, layers))}" for step, layers in nodes.items())
        raise ConfigError(
            f"the steps share no layer ({where}); a sweep compares crosscoders over the same layer",
            where="key 'steps'",
        )

    def _options(self, step: str, ds: xr.Dataset) -> tuple[float, int]:
        """The swept value and the seed a result was trained with, from its scalar coords."""
        if self.parameter not in ds.coords or "seed" not in ds.coords:
            if "sparsity" in ds.coords:
                other = "k" if self.parameter == "l1" else "l1"
                raise ConfigError(
                    f"step {step!r} was trained with sparsity = {str(ds['sparsity'].values)!r}, which has no "
                    f"{self.parameter!r}; sweep parameter = {other!r} or leave the step out",
                    where="key 'parameter'",
                )
            raise ConfigError(
                f"the result of step {step!r} does not record the options it was trained with (it was written "
                "before results held them); run the pipeline again with --force",
                where="key 'steps'",
            )
        return float(ds[self.parameter].values), int(ds["seed"].values)

    def _table(
        self, runs: Mapping[tuple[float, int], tuple[str, xr.Dataset]], models: list[str], layer: str
    ) -> xr.Dataset:
        values = sorted({v for v, _ in runs})
        seeds = sorted({s for _, s in runs})
        # Every class the models allow, found or not, so that a class no run has reads as 0.
        found = {str(c) for _, ds in runs.values() for c in np.asarray(ds["latent_class"].values).astype(str)}
        classes = sorted(found | set(possible_classes(models)), key=class_order)
        shape = (len(values), len(seeds))
        fvu = np.full((*shape, len(models)), np.nan)
        l0 = np.full(shape, np.nan)
        dead = np.full(shape, np.nan)
        counts = np.full((*shape, len(classes)), np.nan)
        steps = np.full(shape, "", dtype=object)
        for (value, seed), (step, ds) in runs.items():
            i, j = values.index(value), seeds.index(seed)
            fvu[i, j] = np.asarray(ds["fvu"].values, dtype=float)
            l0[i, j] = float(ds["l0"].values)
            labels = np.asarray(ds["latent_class"].values).astype(str)
            dead[i, j] = float(np.mean(np.asarray(ds["dead"].values, dtype=bool))) if "dead" in ds else np.nan
            counts[i, j] = [np.count_nonzero(labels == c) for c in classes]
            steps[i, j] = step
        mean_fvu = fvu.mean(axis=2)
        value_fvu = _nanmean(mean_fvu, axis=1)
        chosen = self._choose(np.asarray(values, dtype=float), value_fvu)
        coord = np.asarray(values, dtype=np.int64 if self.parameter == "k" else float)
        return xr.Dataset(
            {
                "fvu": (("value", "seed", "model"), fvu),
                "mean_fvu": (("value", "seed"), mean_fvu),
                "l0": (("value", "seed"), l0),
                "dead_fraction": (("value", "seed"), dead),
                "class_count": (("value", "seed", "class"), counts),
                "step": (("value", "seed"), steps.astype(str)),
                "value_fvu": ("value", value_fvu),
                "chosen": ((), chosen),
                "parameter": ((), self.parameter),
                "rule": ((), self.rule),
                "max_fvu": ((), float(self.max_fvu)),
                "layer": ((), layer),
            },
            coords={"value": coord, "seed": np.asarray(seeds, dtype=np.int64), "model": models, "class": classes},
        )

    def _choose(self, values: np.ndarray, fvu: np.ndarray) -> float:
        """The rule's value: the sparsest whose FVU over models and seeds is within ``max_fvu``."""
        within = np.isfinite(fvu) & (fvu <= self.max_fvu)
        if not within.any():
            return float("nan")
        # Sparser means a larger L1 coefficient, or fewer active latents for BatchTopK.
        return float(values[within].max() if self.parameter == "l1" else values[within].min())

    # ----------------------------------------------------------------- output

    def render(self, results: xr.DataTree, out_dir: Path, context: Context | None = None) -> list[Path]:
        """Write ``sweep.nc`` and ``sweep.png`` into ``out_dir``; nothing when there is nothing to sweep.

        ``context`` (the step's) is not needed: everything is in ``results``.

        Raises
        ------
        mergescope.errors.ConfigError
            As :meth:`sweep`.
        """
        ds = self.sweep(results)
        if not ds.data_vars:
            return []
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        data_path = out_dir / "sweep.nc"
        ds.to_netcdf(data_path)
        figure_path = out_dir / "sweep.png"
        self._plot(ds, figure_path)
        return [data_path, figure_path]

    def describe(self, result: xr.Dataset) -> str:
        """One line: the runs read and the value chosen, with its FVU, L0 and class counts."""
        if "chosen" not in result or "value" not in result.dims:
            return "no crosscoder results to sweep"
        parameter = str(result["parameter"].values)
        bound = float(result["max_fvu"])
        text = (
            f"{parameter} over {result.sizes['value']} values x {result.sizes['seed']} seeds "
            f"at layer {str(result['layer'].values)!r}: "
        )
        chosen = float(result["chosen"])
        fvu = result["value_fvu"]
        if not np.isfinite(chosen):
            best = int(np.nanargmin(fvu.values)) if np.isfinite(fvu.values).any() else 0
            return text + (
                f"no value has mean FVU <= {bound:g} (lowest {float(fvu[best]):.3f} at "
                f"{parameter} = {_fmt(result['value'].values[best])})"
            )
        at = result.sel(value=_match(result, chosen))
        counts = _nanmean(np.asarray(at["class_count"].values, dtype=float), axis=0)
        classes = ", ".join(
            f"{c:.0f} {name}" for name, c in zip(map(str, at["class"].values), counts) if name != "dead" and c > 0
        )
        return text + (
            f"chosen {parameter} = {_fmt(chosen)} (sparsest with mean FVU <= {bound:g}): FVU "
            f"{float(at['value_fvu']):.3f}, L0 {float(np.nanmean(at['l0'].values)):.1f}, "
            f"dead {100 * float(np.nanmean(at['dead_fraction'].values)):.0f}%; {classes}"
        )

    def _plot(self, ds: xr.Dataset, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        parameter = str(ds["parameter"].values)
        x = np.asarray(ds["value"].values, dtype=float)
        chosen = float(ds["chosen"])
        fig, axes = plt.subplots(1, 4, figsize=(17, 4))
        panels = (
            (axes[0], {"mean over models": ds["mean_fvu"].values}, "FVU"),
            (axes[1], {"L0": ds["l0"].values}, "active latents per row (L0)"),
            (axes[2], {"dead": ds["dead_fraction"].values}, "fraction of dead latents"),
        )
        for ax, lines, ylabel in panels:
            for label, v in lines.items():
                _band(ax, x, np.asarray(v, dtype=float), label)
            ax.set_ylabel(ylabel)
        for ax, title in zip(axes, ("reconstruction", "sparsity", "dead latents", "latents per class")):
            ax.set_title(title)
        axes[0].axhline(float(ds["max_fvu"]), color="0.5", ls=":", lw=1, label=f"max_fvu {float(ds['max_fvu']):g}")
        counts = np.asarray(ds["class_count"].values, dtype=float)
        for c, name in enumerate(map(str, ds["class"].values)):
            if name == "dead":  # its own panel
                continue
            _band(axes[3], x, counts[:, :, c], name)
        axes[3].set_ylabel("latents")
        axes[3].legend(fontsize="small")
        axes[0].legend(fontsize="small")
        for ax in axes:
            if np.isfinite(chosen):
                ax.axvline(chosen, color="tab:red", ls="--", lw=1)
            if parameter == "l1" and len(x) and (x > 0).all():
                ax.set_xscale("log")
            elif parameter == "l1" and (x > 0).any():  # a run without penalty: linear near 0
                ax.set_xscale("symlog", linthresh=float(x[x > 0].min()))
            ax.set_xlabel(parameter)
        title = f"crosscoder sweep over {parameter} (layer {str(ds['layer'].values)!r}, {ds.sizes['seed']} seeds)"
        if np.isfinite(chosen):
            title += f": chosen {parameter} = {_fmt(chosen)}"
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=self.dpi)
        plt.close(fig)


def _band(ax: Any, x: np.ndarray, v: np.ndarray, label: str) -> None:
    """The mean over seeds (columns) as a line, the smallest to the largest as a band."""
    mean = _nanmean(v, axis=1)
    lo = _nanreduce(np.nanmin, v)
    hi = _nanreduce(np.nanmax, v)
    (line,) = ax.plot(x, mean, marker="o", label=label)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)


def _nanmean(v: np.ndarray, axis: int) -> np.ndarray:
    """Mean over ``axis`` ignoring NaN; NaN (no warning) where every value is NaN."""
    v = np.asarray(v, dtype=float)
    count = np.isfinite(v).sum(axis=axis)
    total = np.where(np.isfinite(v), v, 0.0).sum(axis=axis)
    return np.divide(total, count, out=np.full(np.shape(total), np.nan), where=count > 0)


def _nanreduce(f: Any, v: np.ndarray) -> np.ndarray:
    """``f`` (nanmin or nanmax) over the seeds, NaN where a value has no run."""
    some = np.isfinite(v).any(axis=1)
    out = np.full(len(v), np.nan)
    if some.any():
        out[some] = f(v[some], axis=1)
    return out


def _match(result: xr.Dataset, chosen: float) -> Any:
    """The ``value`` coord entry equal to ``chosen`` (a float, whatever the coord's dtype)."""
    values = list(result["value"].values)
    return values[int(np.argmin([abs(float(v) - chosen) for v in values]))]


def _fmt(value: Any) -> str:
    return f"{float(value):g}"


@hookimpl
def register_visualizers(register):
    """Register :class:`CrosscoderSweep`."""
    register(CrosscoderSweep)
