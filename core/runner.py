"""Running a pipeline: models in, one cached step after another, ``results.nc`` out.

The run directory holds::

    results.nc        every step's labelled results, one group per step
    pipeline.toml     the pipeline as run
    summary.txt       one paragraph per step
    run.json          versions, seed, and the time of each step
    report.html       the self-contained report (see mergescope.report)
    activations/<key>/    activation stores (see mergescope.store), one per recording pass
    steps/<name>-<key>/   a step's cached result (and merged model)

A step's key hashes its component, options, inputs and data, so a re-run skips the
steps that are done and redoes the ones whose inputs changed.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import attrs
import numpy as np
import torch
import xarray as xr
from torch import nn

from ._version import __version__
from .activations import resolve_layers
from .checkpoints import load_into, load_state_dict, save_state_dict
from .context import Context
from .errors import CheckpointError, ConfigError, MergescopeError
from .groups import align_to_reference, channel_groups, example_input
from .keys import cache_key, core_digest, file_digest, source_digest, state_digest
from .kinds import KINDS, StepCall, StepKind, step_kind
from .options import unstructure_options
from .pipeline import ALIGNED, ModelSpec, Pipeline, Step
from .plugins import Registry, get_registry
from .report import write_report
from .storage import atomic_path, load_tree, save_tree
from .store import Store, StoreSpec, collect_store, recording_key
from .training import Training, trained_model, trained_model_key
from .values import Alignment, DatasetSource, ImageDataset, evaluate

__all__ = ["RunResult", "run", "collect_activations"]

log = logging.getLogger("mergescope")


@attrs.define
class RunResult:
    """What :func:`run` returns: the run directory, the results tree and the summary text."""

    out_dir: Path
    results: xr.DataTree
    summary: str
    models: dict[str, nn.Module]


@attrs.define
class _Model:
    module: nn.Module
    fingerprint: str


class _Run:
    def __init__(self, pipeline: Pipeline, out_dir: Path, *, force: bool, quiet: bool, registry: Registry):
        self.pipeline = pipeline
        self.out = out_dir
        self.force = force
        self.quiet = quiet
        self.registry = registry
        self.names = pipeline.step_names()
        self.kinds = {name: registry.kind_of(type(s.component)) for name, s in zip(self.names, pipeline.steps)}
        self.rules: dict[str, StepKind] = {name: step_kind(kind) for name, kind in self.kinds.items()}
        self.data: ImageDataset | None = pipeline.data.load() if pipeline.data is not None else None
        self.context = Context(
            data=self.data,
            seed=pipeline.seed,
            batch_size=pipeline.activations.batch_size,
            quiet=quiet,
            workdir=out_dir / "activations",
        )
        self.models: dict[str, _Model] = {}
        self.alignments: dict[str, Alignment] = {}
        self.step_keys: dict[str, str] = {}
        self.stores: dict[str, Store] = {}
        self.step_datasets: dict[str, ImageDataset] = {}
        self.needed_layers = self._needed_layers()

    # -- models ----------------------------------------------------------------

    def _model_where(self, index: int, spec: ModelSpec) -> str:
        return f"{self.pipeline.source}, [[models]] #{index + 1} (name = {spec.name!r})"

    def load_models(self) -> None:
        for i, spec in enumerate(self.pipeline.models):
            where = self._model_where(i, spec)
            if spec.module is not None:
                self.models[spec.name] = _Model(spec.module.eval(), state_digest(spec.module))
            elif spec.checkpoint is not None:
                self.models[spec.name] = self._from_checkpoint(spec, where)
            else:
                self.models[spec.name] = self._trained(spec, where)

    def _from_checkpoint(self, spec: ModelSpec, where: str) -> _Model:
        path = spec.checkpoint
        assert path is not None
        if not path.is_file():
            raise ConfigError(f"checkpoint file {str(path)!r} does not exist", where=f"{where}, key 'checkpoint'")
        if self.data is None:
            raise ConfigError("a checkpoint model needs [data] to know its input shape and classes", where=where)
        use = type(spec.architecture).name
        model = spec.architecture.build(self.data.input_shape, len(self.data.classes))
        try:
            load_into(model, load_state_dict(path), source=str(path), architecture=use)
        except CheckpointError as exc:
            raise CheckpointError(f"{where}, key 'checkpoint': {exc}") from exc
        model.eval()
        return _Model(model, file_digest(path))

    def _trained(self, spec: ModelSpec, where: str) -> _Model:
        source = spec.train_data
        if source is None:
            data = self.pipeline.data
            if data is None or "split" not in {f.name for f in attrs.fields(type(data))}:
                raise ConfigError(
                    "this model is trained here, but the pipeline's dataset has no 'split' option; "
                    "give a [models.train_data] table or a 'checkpoint'",
                    where=f"{where}, key 'train_data'",
                )
            source = attrs.evolve(data, split="train")
        training = spec.train or Training()
        log.info("model %s: training or loading from cache", spec.name)
        model = trained_model(spec.architecture, source, training, progress=self.context.progress)
        return _Model(model, trained_model_key(spec.architecture, source, training))

    def _available(self, name: str) -> bool:
        model, _, aligner = name.partition(ALIGNED)
        return model in self.models and (not aligner or aligner in self.alignments)

    def model(self, name: str) -> _Model:
        """A model by name; ``"b@wm"`` is ``b`` mapped onto the reference of aligner step ``wm``."""
        if name not in self.models:
            model, _, aligner = name.partition(ALIGNED)
            if not aligner:
                raise KeyError(name)
            alignment = self.alignments[aligner]
            source = self.models[model]
            if model == alignment.reference:
                self.models[name] = source
            elif not alignment.applies_to_weights:
                raise ConfigError(
                    f"{name!r}: the aligner step {aligner!r} gave an alignment in {alignment.space!r} space, "
                    "which maps activations and cannot be applied to a model's weights"
                )
            elif model not in alignment.transforms:
                raise ConfigError(
                    f"{name!r}: the aligner step {aligner!r} aligned {', '.join(sorted(alignment.transforms))} "
                    f"onto {alignment.reference!r}, not {model!r}"
                )
            else:
                reference = self.models[alignment.reference].module
                groups = channel_groups(reference, example_input(self.data))
                aligned = align_to_reference({model: source.module}, alignment, groups)[model]
                self.models[name] = _Model(aligned.eval(), cache_key(source.fingerprint, self.step_keys[aligner]))
        return self.models[name]

    # -- activations ---------------------------------------------------------------

    def _step_models(self, step: Step) -> list[str]:
        return list(step.models) if step.models else [m.name for m in self.pipeline.models]

    def _step_selectors(self, step: Step) -> list[str]:
        return list(step.layers or self.pipeline.activations.layers)

    def _step_layers(self, step: Step) -> list[str]:
        """The step's layer selectors expanded to names on its first model."""
        first = self._step_models(step)[0]
        example = example_input(self.data) if self.data is not None else None  # traces group: selectors
        return list(resolve_layers(self.model(first).module, self._step_selectors(step), first, example_input=example))

    def _needed_layers(self) -> dict[str, list[str]]:
        """Every layer any step reads, per model, so each model is recorded in one pass."""
        needed: dict[str, list[str]] = {}
        for name, step in zip(self.names, self.pipeline.steps):
            if self.rules[name].reads_recordings(step):
                for model in self._step_models(step):
                    layers = needed.setdefault(model, [])
                    layers.extend(layer for layer in self._step_selectors(step) if layer not in layers)
        return needed

    def activation(self, model: str, layer: str) -> xr.DataArray:
        return self.store_of(model).activation(model, layer)

    def store_of(self, model: str) -> Store:
        """The store holding ``model``'s recording, recording every pending model first if needed."""
        if model not in self.stores:
            if model not in self.needed_layers:
                readers = ", ".join(
                    k for k, kind in KINDS.items() if kind.step is not None and kind.step.layers_pick_recordings
                )
                raise ConfigError(
                    f"{model!r} is not recorded: only models named by a step that reads recordings ({readers}) "
                    f"are ({', '.join(sorted(self.needed_layers)) or 'none'})"
                )
            if not self._available(model):
                raise ConfigError(f"{model!r} is not available yet: a step can only read models built before it")
            self._record()
        return self.stores[model]

    def step_context(self, step: Step, rules: StepKind) -> Context:
        """The run's context narrowed to one step: its models, its layers, the stores."""
        models = self._step_models(step)
        layers = self._step_layers(step) if rules.resolves_layers(step) and self._step_selectors(step) else []
        context = attrs.evolve(self.context, models=models, layers=layers, stores=self.store_of)
        if step.data is not None:  # its own images: statistics, BatchNorm and evaluation on them
            context = attrs.evolve(context, data=self._step_data(step.data))
        return context

    def _step_data(self, source: DatasetSource) -> ImageDataset:
        key = cache_key(source)
        if key not in self.step_datasets:
            self.step_datasets[key] = source.load()
        return self.step_datasets[key]

    def _record(self) -> None:
        """Record, in one lockstep pass, every available model that needs activations and has none yet."""
        assert self.data is not None
        pending = sorted(m for m in self.needed_layers if self._available(m) and m not in self.stores)
        store_spec = _store_spec(self.pipeline, {m: self.needed_layers[m] for m in pending})
        key = recording_key([self.model(m).fingerprint for m in pending], self.data, store_spec)
        directory = self.out / "activations" / key[:16]
        if self.force:
            shutil.rmtree(directory, ignore_errors=True)
        store = collect_store(
            {m: self.model(m).module for m in pending},
            self.data,
            store_spec,
            directory,
            key=key,
            progress=self.context.progress,
        )
        for m in pending:
            self.stores[m] = store

    # -- steps -------------------------------------------------------------------------

    def _step_key(self, name: str, step: Step) -> str:
        rules = self.rules[name]
        activations = self.pipeline.activations
        inputs = rules.key_inputs(
            step,
            fingerprints=[self.model(m).fingerprint for m in self._step_models(step)]
            if rules.reads_models(step)
            else [],
            selectors=self._step_selectors(step),
            recording=[activations.reduce, activations.topk],
            earlier=[self.step_keys[n] for n in self.names[: self.names.index(name)]],
            alignment=self.step_keys[step.alignment] if step.alignment else None,
            batch_size=activations.batch_size,
        )
        component = step.component if isinstance(step.component, type) else type(step.component)
        return cache_key(
            {
                "use": step.use,
                "kind": self.kinds[name],
                "options": unstructure_options(step.component),
                "source": source_digest(component),
                "core": core_digest(),
            },
            step.data if step.data is not None else self.pipeline.data,
            self.pipeline.seed,
            inputs,
        )

    def run_step(self, index: int, results: dict[str, xr.Dataset]) -> dict[str, xr.Dataset]:
        step, name = self.pipeline.steps[index], self.names[index]
        kind, rules = self.kinds[name], self.rules[name]
        key = self.step_keys[name] = self._step_key(name, step)
        step_dir = self.out / "steps" / f"{name}-{key[:16]}"
        result_path, model_path = step_dir / "result.nc", step_dir / "model.pt"
        if result_path.exists() and not self.force:
            log.info("step %s (%s): done before, loaded from %s", name, step.use, step_dir)
            output = rules.restore(load_tree(result_path))
            if rules.makes_model and model_path.exists():
                self.models[name] = _Model(self._rebuild_merged(step, model_path), key)
            if output.alignment is not None:
                self.alignments[name] = output.alignment
            return output.nodes
        log.info("step %s (%s): running", name, step.use)
        where = f"{self.pipeline.source}, [[steps]] #{index + 1} (use = {step.use!r})"
        try:
            output = rules.execute(self._call(name, step, rules, results))
        except MergescopeError as exc:
            raise type(exc)(f"{where}: {exc}") from exc
        except Exception as exc:  # a bug in a component: say which one, keep the traceback as __cause__
            cls = type(step.component)
            plugins = [e.plugin for e in self.registry.entries(kind) if e.cls is cls] or ["?"]
            raise MergescopeError(
                f"{where}: step {name!r} failed in {kind} {step.use!r} "
                f"(plugin {plugins[0]!r}, module {cls.__module__}): {type(exc).__name__}: {exc}"
            ) from exc
        if output.alignment is not None:
            self.alignments[name] = output.alignment
        if output.model is not None:
            self.models[name] = _Model(output.model, key)
            save_state_dict(output.model, model_path)
        save_tree(xr.DataTree.from_dict(output.nodes), result_path)
        return output.nodes

    def _rebuild_merged(self, step: Step, model_path: Path) -> nn.Module:
        template = self.model(self._step_models(step)[0]).module
        model = copy.deepcopy(template)
        load_into(model, load_state_dict(model_path), source=str(model_path), architecture=step.use)
        return model.eval()

    def _call(self, name: str, step: Step, rules: StepKind, results: dict[str, xr.Dataset]) -> StepCall:
        model_names = self._step_models(step)
        return StepCall(
            name=name,
            use=step.use,
            component=step.component,
            model_names=model_names,
            models={m: self.model(m).module for m in model_names} if rules.reads_models(step) else {},
            context=self.step_context(step, rules),
            alignment=self.alignments.get(step.alignment) if step.alignment else None,
            results=dict(results),
            run_dir=self.out,
            activation=self.activation,
        )

    # -- the whole run -----------------------------------------------------------------

    def execute(self) -> RunResult:
        self.out.mkdir(parents=True, exist_ok=True)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        self.load_models()
        timings["models"] = time.perf_counter() - start
        results: dict[str, xr.Dataset] = {}
        lines = []
        # Which step results exist before the run, to tell cached steps apart in run.json and the report.
        done_before = set() if self.force else {p.parent.name for p in (self.out / "steps").glob("*/result.nc")}
        for i, name in enumerate(self.names):
            t0 = time.perf_counter()
            nodes = self.run_step(i, results)
            timings[name] = time.perf_counter() - t0
            for path, ds in nodes.items():
                results[f"{name}/{path}".rstrip("/").replace("//", "/")] = ds
            lines.append(self._summary_line(name, nodes))
        if self.pipeline.tasks:
            t0 = time.perf_counter()
            results["tasks"] = self.evaluate_tasks()
            timings["tasks"] = time.perf_counter() - t0
            lines.append(task_table(results["tasks"]))
        tree = xr.DataTree.from_dict(results)
        pipeline_text = _as_toml(self.pipeline)
        tree.attrs.update({"mergescope_version": __version__, "pipeline": pipeline_text})
        save_tree(tree, self.out / "results.nc")
        summary = "\n".join(lines) + "\n"
        _write_text(self.out / "summary.txt", summary)
        _write_text(self.out / "pipeline.toml", pipeline_text)
        run_info = {
            "mergescope": __version__,
            "torch": torch.__version__,
            "xarray": xr.__version__,
            "python": platform.python_version(),
            "seed": self.pipeline.seed,
            "seconds": {k: round(v, 3) for k, v in timings.items()},
            "steps": {
                n: {
                    "use": s.use,
                    "kind": self.kinds[n],
                    "key": self.step_keys[n],
                    "cached": f"{n}-{self.step_keys[n][:16]}" in done_before,
                }
                for n, s in zip(self.names, self.pipeline.steps)
            },
        }
        _write_text(self.out / "run.json", json.dumps(run_info, indent=2) + "\n")
        components = {n: s.component for n, s in zip(self.names, self.pipeline.steps)}
        write_report(self.out, tree, info=run_info, pipeline_text=pipeline_text, summary=summary, components=components)
        return RunResult(self.out, tree, summary, {n: m.module for n, m in self.models.items()})

    def evaluate_tasks(self) -> xr.Dataset:
        """Loss and accuracy of every model on every task; normalised by each task's expert."""
        tasks = self.pipeline.tasks
        models = list(self.models)
        key = cache_key(
            [self.models[m].fingerprint for m in models],
            [[t.name, t.data, t.expert, t.restrict, t.models] for t in tasks],
        )
        path = self.out / "steps" / f"tasks-{key[:16]}" / "result.nc"
        if path.exists() and not self.force:
            log.info("tasks: done before, loaded from %s", path.parent)
            return load_tree(path).to_dataset()
        accuracy = np.full((len(models), len(tasks)), np.nan)
        loss = np.full_like(accuracy, np.nan)
        for j, task in enumerate(tasks):
            data = task.data.load()
            classes = np.unique(data.labels).tolist() if task.restrict else None
            for i, m in enumerate(models):
                if task.models is not None and m not in task.models:
                    continue
                result = evaluate(self.models[m].module, data, self.pipeline.activations.batch_size, classes)
                accuracy[i, j], loss[i, j] = result.accuracy, result.loss
        ds = xr.Dataset(
            {"accuracy": (("model", "task"), accuracy), "loss": (("model", "task"), loss)},
            coords={"model": models, "task": [t.name for t in tasks]},
        )
        experts = [models.index(t.expert) if t.expert else -1 for t in tasks]
        if any(e >= 0 for e in experts):
            reference = np.array([accuracy[e, j] if e >= 0 else np.nan for j, e in enumerate(experts)])
            ds["normalized_accuracy"] = ds["accuracy"] / xr.DataArray(reference, dims="task")
            ds["average_normalized_accuracy"] = ds["normalized_accuracy"].mean("task")
        ds["average_accuracy"] = ds["accuracy"].mean("task")
        save_tree(xr.DataTree(ds), path)
        return ds

    def _summary_line(self, name: str, nodes: Mapping[str, xr.Dataset]) -> str:
        step = self.pipeline.steps[self.names.index(name)]
        return self.rules[name].summary(name, step.use, step.component, nodes)


def task_table(ds: xr.Dataset) -> str:
    """Models x tasks accuracy table (percent) with the average and normalised average."""
    tasks = [str(t) for t in ds["task"].values]
    head = ["model", *tasks, "avg"] + (["norm. avg"] if "average_normalized_accuracy" in ds else [])
    rows = []
    for m in ds["model"].values:
        row = [str(m), *(f"{100 * v:.1f}" for v in ds["accuracy"].sel(model=m).values)]
        row.append(f"{100 * float(ds['average_accuracy'].sel(model=m)):.1f}")
        if "average_normalized_accuracy" in ds:
            row.append(f"{100 * float(ds['average_normalized_accuracy'].sel(model=m)):.1f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "tasks (accuracy %):\n" + "\n".join("  " + fmt(r) for r in [head, *rows])


def _as_toml(pipeline: Pipeline) -> str:
    """The pipeline as TOML, or a comment saying why it has none (models given as modules)."""
    try:
        return pipeline.to_toml()
    except ConfigError as exc:
        return f"# This pipeline was composed in Python and has no TOML form: {exc}\n"


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def run(
    pipeline: Pipeline,
    out_dir: str | Path,
    *,
    force: bool = False,
    quiet: bool = False,
    registry: Registry | None = None,
) -> RunResult:
    """Run ``pipeline`` and write its results to ``out_dir``.

    Parameters
    ----------
    pipeline
        A :class:`~mergescope.pipeline.Pipeline`, from TOML or built in Python.
    out_dir
        The run directory; created when missing. Finished steps found there are reused.
    force
        Redo every step (and recording) even when a cached result exists.
    quiet
        Hide progress bars.
    registry
        The component registry; defaults to the entry-point plugins.

    Returns
    -------
    RunResult
    """
    registry = registry or get_registry()
    pipeline.check(registry)
    return _Run(pipeline, Path(out_dir), force=force, quiet=quiet, registry=registry).execute()


def collect_activations(
    pipeline: Pipeline,
    out_dir: str | Path,
    *,
    shard: tuple[int, int] = (0, 1),
    quiet: bool = False,
    registry: Registry | None = None,
) -> Store:
    """Record ``[activations] layers`` of every pipeline model into an activation store.

    The models are loaded or trained as in :func:`run`; the steps are not run. Use
    ``shard=(i, n)`` to record one of ``n`` slices of the dataset (e.g. one per
    machine) and :func:`mergescope.store.join_stores` to join the shards.
    """
    registry = registry or get_registry()
    pipeline.check(registry)
    if pipeline.data is None or not pipeline.activations.layers:
        raise ConfigError(
            "collecting needs [data] and [activations] layers", where=f"{pipeline.source}, key 'activations'"
        )
    job = _Run(pipeline, Path(out_dir), force=False, quiet=quiet, registry=registry)
    job.load_models()
    layers = {m.name: list(pipeline.activations.layers) for m in pipeline.models}
    store_spec = _store_spec(pipeline, layers)
    assert job.data is not None
    key = recording_key([job.models[m].fingerprint for m in layers], job.data, store_spec)
    return collect_store(
        {m: job.models[m].module for m in layers},
        job.data,
        store_spec,
        out_dir,
        key=key,
        shard=shard,
        progress=job.context.progress,
    )


def _store_spec(pipeline: Pipeline, layers: Mapping[str, list[str]]) -> StoreSpec:
    """What the run records for its steps: ``layers`` per model, as ``[activations]`` says."""
    spec = pipeline.activations
    return StoreSpec(
        layers=dict(layers),
        reduce=spec.reduce,
        batch_size=spec.batch_size,
        chunk_size=spec.chunk_size,
        topk=spec.topk,
        workers=spec.workers,
    )
