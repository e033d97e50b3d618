"""The kinds of component, each declared once, with what its pipeline steps do.

A kind is a hook (``register_<kind>s``), a protocol and the one method that does the
work. Five kinds can be pipeline steps; for those, a :class:`StepKind` says everything
the rest of mergescope needs to know about such a step, so that no other module
decides anything by comparing kind names:

- what the step reads: models, the run's recordings of them, earlier results;
- what the pipeline check demands of it: layers, two or more models, data, aligned
  models, whether it may use its own ``data``;
- what its cache key holds besides its component and options;
- how it runs (:meth:`StepKind.execute`) and how a cached result is restored;
- how it is summarised in ``summary.txt`` and which section of the report shows it.

The runner, the pipeline check, the report and the conformance kit ask :data:`KINDS`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import attrs
import xarray as xr
from torch import nn

from .activations import check_metric_inputs
from .components import Aligner, Differ, Merger, Metric, Visualizer
from .context import Context
from .errors import ContractError
from .values import Alignment, Architecture, DatasetSource, Embedder, MergeResult

__all__ = [
    "Kind",
    "KINDS",
    "STEP_KINDS",
    "StepKind",
    "StepCall",
    "StepOutput",
    "step_kind",
    "flatten_tree",
    "describe_result",
    "takes_context",
]


# ------------------------------------------------------------------- step values


@attrs.define
class StepCall:
    """Everything a step needs to run, gathered by the runner.

    Parameters
    ----------
    name, use, component
        The step's name, its component's registered name and the component instance.
    model_names
        The models the step names (the first is the reference), or every declared
        model when it names none.
    models
        Those models, by name (empty for a visualizer that names none).
    context
        The step's context (its data, layers, the run's recordings).
    alignment
        The alignment the step's ``alignment`` key names, if any.
    results
        Results of the earlier steps, by path (``"<step>/<node>"``).
    run_dir
        The run directory; a visualizer writes under ``figures/<name>/`` in it.
    activation
        ``activation(model, layer)``: a model's recorded activations at a layer.
    """

    name: str
    use: str
    component: Any
    model_names: list[str]
    models: dict[str, nn.Module]
    context: Context
    alignment: Alignment | None
    results: Mapping[str, xr.Dataset]
    run_dir: Path
    activation: Callable[[str, str], xr.DataArray]


@attrs.define
class StepOutput:
    """What a step produced: result nodes by path ("/" is the step's own), and a model or an alignment."""

    nodes: dict[str, xr.Dataset]
    model: nn.Module | None = None
    alignment: Alignment | None = None


def flatten_tree(tree: xr.DataTree) -> dict[str, xr.Dataset]:
    """Node path relative to ``tree`` ("/" for the root) -> the node's own Dataset."""
    out = {"/": tree.to_dataset(inherit=False)}
    for node in tree.subtree:
        if node is not tree and node.has_data:
            out[node.relative_to(tree)] = node.to_dataset(inherit=False)
    return out


def describe_result(component: Any, result: Any) -> str:
    """A component's one-line summary of its result: its ``describe`` method, else the variables' names."""
    describe = getattr(component, "describe", None)
    if callable(describe):
        return str(describe(result))
    if isinstance(result, xr.Dataset):
        return "variables: " + ", ".join(map(str, result.data_vars)) if result.data_vars else "no results"
    return type(result).__name__


# -------------------------------------------------------------------- step kinds


@attrs.frozen
class StepKind:
    """How steps of one kind read, check, key, run, summarise and report.

    The class attributes are the rules; subclasses override them and :meth:`execute`.
    """

    #: Its layers must be given (here or in ``[activations]``): it reads activations.
    needs_layers: ClassVar[bool] = False
    #: The fewest models it works on.
    min_models: ClassVar[int] = 1
    #: It may take its own ``data`` instead of the pipeline's ``[data]``.
    takes_own_data: ClassVar[bool] = False
    #: The pipeline must have ``[data]`` for it.
    needs_data: ClassVar[bool] = False
    #: Its declared models must be aligned to each other (unless ``allow_unaligned``).
    compares_units: ClassVar[bool] = False
    #: It applies an earlier aligner's alignment (its ``alignment`` key).
    takes_alignment: ClassVar[bool] = False
    #: Its result is a model later steps can name.
    makes_model: ClassVar[bool] = False
    #: Its result is an alignment later steps can name (``alignment``, ``"b@step"``).
    makes_alignment: ClassVar[bool] = False
    #: It gathers statistics in batches, so the batch size is part of its key.
    batch_size_in_key: ClassVar[bool] = False
    #: It draws on every earlier step's results, so their keys are part of its key.
    reads_earlier_results: ClassVar[bool] = False
    #: Its ``layers`` pick what it reads from the recordings (always expanded into
    #: ``context.layers``); for other kinds ``layers`` is an option the component may read.
    layers_pick_recordings: ClassVar[bool] = False
    #: The report section that shows it: ``"metrics"``, ``"results"`` or ``"panels"``.
    report_section: ClassVar[str] = "results"

    def reads_models(self, step: Any) -> bool:
        """Whether the step takes models (their fingerprints key it)."""
        return True

    def reads_recordings(self, step: Any) -> bool:
        """Whether the step reads the run's recordings of its models (recorded in one pass before it)."""
        return False

    def resolves_layers(self, step: Any) -> bool:
        """Whether the runner expands the step's layer selectors into ``context.layers``."""
        return self.layers_pick_recordings or bool(step.layers)

    def key_inputs(
        self,
        step: Any,
        *,
        fingerprints: list[str],
        selectors: list[str],
        recording: list[Any],
        earlier: list[str],
        alignment: str | None,
        batch_size: int,
    ) -> list[Any]:
        """What the step's cache key holds besides its component, options, data and seed.

        Parameters
        ----------
        fingerprints
            The fingerprints of the step's models.
        selectors
            The step's layer selectors.
        recording
            What decides the run's recordings (reduction, top-k).
        earlier
            The keys of every earlier step.
        alignment
            The key of the aligner step its ``alignment`` names, if any.
        batch_size
            The pipeline's batch size.
        """
        inputs: list[Any] = list(fingerprints) if self.reads_models(step) else []
        if self.reads_recordings(step):
            inputs += [selectors, *recording]
        if self.reads_earlier_results:
            inputs += earlier
        if alignment is not None:
            inputs.append(alignment)
        if step.layers is not None and not self.layers_pick_recordings:
            inputs.append({"layers": list(step.layers)})  # aligners and mergers may read them too
        if self.batch_size_in_key:
            inputs.append({"batch_size": batch_size})
        return inputs

    def execute(self, call: StepCall) -> StepOutput:
        """Run the step's component."""
        raise NotImplementedError

    def restore(self, tree: xr.DataTree) -> StepOutput:
        """The output of a step whose result was saved before (its model, if any, is reloaded by the runner)."""
        return StepOutput(flatten_tree(tree))

    def summary(self, name: str, use: str, component: Any, nodes: Mapping[str, xr.Dataset]) -> str:
        """The step's paragraph in ``summary.txt``."""
        return f"{name} ({use}): {describe_result(component, nodes.get('/', xr.Dataset()))}"


@attrs.frozen
class AlignerStep(StepKind):
    """Aligners map every model's channels onto the reference's; the result names aligned models."""

    min_models: ClassVar[int] = 2
    takes_own_data: ClassVar[bool] = True
    makes_alignment: ClassVar[bool] = True
    batch_size_in_key: ClassVar[bool] = True

    def execute(self, call: StepCall) -> StepOutput:
        alignment = call.component.align(call.models, call.model_names[0], call.context)
        if not isinstance(alignment, Alignment):
            raise ContractError(
                f"aligner {call.use!r} must return a mergescope.Alignment, got {type(alignment).__name__}"
            )
        return StepOutput(flatten_tree(alignment.to_tree()), alignment=alignment)

    def restore(self, tree: xr.DataTree) -> StepOutput:
        return StepOutput(flatten_tree(tree), alignment=Alignment.from_tree(tree))


@attrs.frozen
class MergerStep(StepKind):
    """Mergers combine models into one, which later steps can name by the step's name."""

    takes_own_data: ClassVar[bool] = True
    needs_data: ClassVar[bool] = True
    takes_alignment: ClassVar[bool] = True
    makes_model: ClassVar[bool] = True
    batch_size_in_key: ClassVar[bool] = True

    def execute(self, call: StepCall) -> StepOutput:
        merged = call.component.merge(call.models, call.context, alignment=call.alignment)
        if not isinstance(merged, MergeResult):
            raise ContractError(
                f"merger {call.use!r} must return a mergescope.MergeResult, got {type(merged).__name__}"
            )
        model = merged.model.eval() if merged.model is not None else None
        return StepOutput({"/": merged.results}, model=model)


@attrs.frozen
class MetricStep(StepKind):
    """Metrics score each unit of every model against the first, per layer, from the recordings."""

    layers_pick_recordings: ClassVar[bool] = True
    needs_layers: ClassVar[bool] = True
    min_models: ClassVar[int] = 2
    needs_data: ClassVar[bool] = True
    compares_units: ClassVar[bool] = True
    report_section: ClassVar[str] = "metrics"

    def reads_recordings(self, step: Any) -> bool:
        return True

    def execute(self, call: StepCall) -> StepOutput:
        return StepOutput({layer: self._score(call, layer) for layer in call.context.layers})

    @staticmethod
    def _score(call: StepCall, layer: str) -> xr.Dataset:
        metric, reference = call.component, call.model_names[0]
        scores = []
        a = call.activation(reference, layer)
        for other in call.model_names[1:]:
            b = call.activation(other, layer)
            # Checked here once, so a metric need not: same samples, same units, labelled.
            check_metric_inputs(a, b, f"metric {call.use!r} at layer {layer!r}", spatial=True, min_samples=1)
            score = metric.score(a, b, context=call.context)
            if not isinstance(score, xr.DataArray) or score.dims != ("unit",):
                raise ContractError(
                    f"metric {metric.name!r} must return a DataArray with dims ('unit',), "
                    f"got {getattr(score, 'dims', type(score).__name__)}"
                )
            scores.append(score.assign_coords(model=other, reference=reference, layer=layer))
        variable = (scores[0].name or metric.name).replace("-", "_")
        ds = xr.concat(scores, dim="model", coords="different", compat="equals").to_dataset(name=variable)
        if ds.sizes["model"] > 1:  # N models against one reference: the spread per unit
            ds[f"{variable}_mean"] = ds[variable].mean("model")
            ds[f"{variable}_std"] = ds[variable].std("model")
        return ds

    def summary(self, name: str, use: str, component: Any, nodes: Mapping[str, xr.Dataset]) -> str:
        parts = []
        for layer, ds in nodes.items():
            if layer == "/":
                continue
            for var in ds.data_vars:
                if "model" not in ds[var].dims:  # the mean and spread over models
                    continue
                for model in ds[var].coords["model"].values:
                    parts.append(f"  {layer} {model}: {describe_result(component, ds[var].sel(model=model))}")
        return f"{name} ({use}):\n" + "\n".join(parts)


@attrs.frozen
class DifferStep(StepKind):
    """Differs fit one dictionary over the recordings of all their models, per layer.

    A differ whose ``joint_layers`` is true fits one dictionary over every layer of the
    step at once: ``fit`` receives, per model, a mapping layer -> activations, and the
    step's one node is named by the layers joined with ``+``.
    """

    layers_pick_recordings: ClassVar[bool] = True
    needs_layers: ClassVar[bool] = True
    needs_data: ClassVar[bool] = True

    def reads_recordings(self, step: Any) -> bool:
        return True

    def execute(self, call: StepCall) -> StepOutput:
        layers = list(call.context.layers)
        if getattr(call.component, "joint_layers", False):
            activations = {m: {layer: call.activation(m, layer) for layer in layers} for m in call.model_names}
            name = "+".join(layers)
            return StepOutput({name: self._intervene(call, name, call.component.fit(activations, call.context))})
        return StepOutput({layer: self._intervene(call, layer, self._fit(call, layer)) for layer in layers})

    @staticmethod
    def _fit(call: StepCall, layer: str) -> xr.Dataset:
        return call.component.fit({m: call.activation(m, layer) for m in call.model_names}, call.context)

    @staticmethod
    def _intervene(call: StepCall, layer: str, result: xr.Dataset) -> xr.Dataset:
        """The fitted result with what the differ's optional causal test adds (``intervene``)."""
        intervene = getattr(call.component, "intervene", None)
        if intervene is None:
            return result
        models = {m: call.models[m] for m in call.model_names}
        added = intervene(result, models, layer, call.context)
        if added is None:
            return result
        if not isinstance(added, xr.Dataset):
            raise ContractError(
                f"differ {call.use!r}: intervene must return an xarray.Dataset or None, got {type(added).__name__}"
            )
        return result.merge(added, compat="override", join="outer")

    def summary(self, name: str, use: str, component: Any, nodes: Mapping[str, xr.Dataset]) -> str:
        parts = [f"  {layer}: {describe_result(component, ds)}" for layer, ds in nodes.items() if layer != "/"]
        return f"{name} ({use}):\n" + "\n".join(parts)


@attrs.frozen
class VisualizerStep(StepKind):
    """Visualizers draw the results before them into files; with models, they also read their recordings."""

    layers_pick_recordings: ClassVar[bool] = True
    reads_earlier_results: ClassVar[bool] = True
    report_section: ClassVar[str] = "panels"

    def reads_models(self, step: Any) -> bool:
        return bool(step.models)

    def reads_recordings(self, step: Any) -> bool:
        return bool(step.models)  # top-k grids of the models it names

    def execute(self, call: StepCall) -> StepOutput:
        figures = call.run_dir / "figures" / call.name
        tree = xr.DataTree.from_dict(dict(call.results))
        context = attrs.evolve(call.context, modules=dict(call.models))
        paths = [Path(p) for p in call.component.render(tree, figures, context=context)]
        run_dir = call.run_dir.resolve()
        node = xr.Dataset({"files": ("file", [os.path.relpath(p.resolve(), run_dir) for p in paths])})
        # Labelled data a visualizer draws from (its .nc outputs) joins the run's results.
        for path in paths:
            if path.suffix == ".nc":
                with xr.open_dataset(path) as drawn:
                    node = node.merge(drawn.load())
        return StepOutput({"/": node})


# ------------------------------------------------------------------------ kinds


@attrs.frozen
class Kind:
    """One kind of component: its hook, its protocol, the method that does the work, and its step rules.

    ``step`` is ``None`` for kinds that are not pipeline steps (datasets, architectures,
    embedders). Every method of a step kind receives the step's context as ``context``.
    """

    name: str
    hook: str
    protocol: type
    method: str
    step: StepKind | None = None

    @property
    def is_step(self) -> bool:
        """Whether components of this kind can be pipeline steps."""
        return self.step is not None


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("aligner", "register_aligners", Aligner, "align", AlignerStep()),
        Kind("merger", "register_mergers", Merger, "merge", MergerStep()),
        Kind("visualizer", "register_visualizers", Visualizer, "render", VisualizerStep()),
        Kind("metric", "register_metrics", Metric, "score", MetricStep()),
        Kind("differ", "register_differs", Differ, "fit", DifferStep()),
        Kind("dataset", "register_datasets", DatasetSource, "load"),
        Kind("architecture", "register_architectures", Architecture, "build"),
        Kind("embedder", "register_embedders", Embedder, "embed"),
    )
}

#: Names of the kinds whose components can be pipeline steps.
STEP_KINDS: tuple[str, ...] = tuple(name for name, kind in KINDS.items() if kind.is_step)


def takes_context(method: Any) -> bool:
    """Whether a step component's method accepts the step's context (as ``context``, or ``**kwargs``)."""
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):  # no signature to read: let the call decide
        return True
    return "context" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def step_kind(kind: str) -> StepKind:
    """The step rules of ``kind``.

    Raises
    ------
    ValueError
        ``kind`` is not a kind whose components can be steps.
    """
    found = KINDS.get(kind)
    if found is None or found.step is None:
        raise ValueError(f"{kind!r} is not a step kind; step kinds are {', '.join(STEP_KINDS)}")
    return found.step
