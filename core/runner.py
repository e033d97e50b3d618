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

import functools
import hashlib
import inspect
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import xarray as xr
from torch import nn

from . import __version__
from .activations import resolve_layers
from .checkpoints import load_into, load_state_dict, save_state_dict, state_digest
from .components import Alignment, Context, ImageDataset, MergeResult, context_keyword, evaluate
from .errors import CheckpointError, ConfigError, ContractError, MergescopeError, article
from .options import unstructure_options
from .groups import align_to_reference, channel_groups, example_input
from .pipeline import ALIGNED, ModelSpec, Pipeline, Step
from .plugins import Registry, get_registry
from .report import write_report
from .storage import atomic_path, load_tree, save_tree
from .store import Store, StoreSpec, collect_store
from .training import Training, cache_key, trained_model, trained_model_key

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


@functools.lru_cache(maxsize=None)
def _source_digest(cls: type) -> str | None:
    """SHA-256 of the file that defines ``cls``, so editing a plugin invalidates its steps.

    ``None`` for a class without a readable source file (defined interactively).
    """
    try:
        source = inspect.getsourcefile(cls)
    except TypeError:
        return None
    return _file_digest(Path(source)) if source and Path(source).is_file() else None


@functools.lru_cache(maxsize=None)
def _core_digest() -> str:
    """SHA-256 of mergescope's own modules: every step's result depends on them too."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(_file_digest(path).encode())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _describe(component: Any, result: Any) -> str:
    describe = getattr(component, "describe", None)
    if callable(describe):
        return str(describe(result))
    if isinstance(result, xr.Dataset):
        return "variables: " + ", ".join(map(str, result.data_vars)) if result.data_vars else "no results"
    return type(result).__name__


class _Run:
    def __init__(self, pipeline: Pipeline, out_dir: Path, *, force: bool, quiet: bool, registry: Registry):
        self.pipeline = pipeline
        self.out = out_dir
        self.force = force
        self.quiet = quiet
        self.registry = registry
        self.names = pipeline.step_names()
        self.kinds = {name: registry.kind_of(type(s.component)) for name, s in zip(self.names, pipeline.steps)}
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
        return _Model(model, _file_digest(path))

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
        model = trained_model(spec.architecture, source, training, context=self.context)
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
            # A visualizer reads recordings only of the models it names (top-k grids).
            if self.kinds[name] in ("metric", "differ") or (self.kinds[name] == "visualizer" and step.models):
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
                raise ConfigError(
                    f"{model!r} is not recorded: only models named by a metric, differ or visualizer step "
                    f"are ({', '.join(sorted(self.needed_layers)) or 'none'})"
                )
            if not self._available(model):
                raise ConfigError(f"{model!r} is not available yet: a step can only read models built before it")
            self._record()
        return self.stores[model]

    def step_context(self, step: Step, kind: str) -> Context:
        """The run's context narrowed to one step: its models, its layers, the stores."""
        models = self._step_models(step)
        reads_layers = kind in ("metric", "differ", "visualizer") or bool(step.layers)
        layers = self._step_layers(step) if reads_layers and self._step_selectors(step) else []
        context = attrs.evolve(self.context, models=models, layers=layers, stores=self.store_of)
        if step.data is not None:  # its own images: statistics, BatchNorm and evaluation on them
            context = attrs.evolve(context, data=self._step_data(step))
        return context

    def _step_data(self, step: Step) -> ImageDataset:
        key = cache_key(step.data)
        if key not in self.step_datasets:
            self.step_datasets[key] = step.data.load()
        return self.step_datasets[key]

    def _record(self) -> None:
        """Record, in one lockstep pass, every available model that needs activations and has none yet."""
        assert self.data is not None
        spec = self.pipeline.activations
        pending = sorted(m for m in self.needed_layers if self._available(m) and m not in self.stores)
        store_spec = StoreSpec(
            layers={m: self.needed_layers[m] for m in pending},
            reduce=spec.reduce,
            batch_size=spec.batch_size,
            chunk_size=spec.chunk_size,
            topk=spec.topk,
            workers=spec.workers,
        )
        key = cache_key([self.model(m).fingerprint for m in pending], self.pipeline.data, store_spec.identity())
        directory = self.out / "activations" / key[:16]
        if self.force:
            shutil.rmtree(directory, ignore_errors=True)
        store = collect_store(
            {m: self.model(m).module for m in pending},
            self.data,
            store_spec,
            directory,
            key=key,
            context=self.context,
        )
        for m in pending:
            self.stores[m] = store

    # -- steps -------------------------------------------------------------------------

    def _step_key(self, name: str, step: Step) -> str:
        kind = self.kinds[name]
        reads_models = kind != "visualizer" or bool(step.models)
        inputs: list[Any] = [self.model(m).fingerprint for m in self._step_models(step)] if reads_models else []
        if kind in ("metric", "differ") or (kind == "visualizer" and step.models):
            inputs += [self._step_selectors(step), self.pipeline.activations.reduce, self.pipeline.activations.topk]
        if kind == "visualizer":  # draws everything before it
            inputs += [self.step_keys[n] for n in self.names[: self.names.index(name)]]
        if step.alignment:
            inputs.append(self.step_keys[step.alignment])
        if step.layers is not None and kind not in ("metric", "differ", "visualizer"):
            inputs.append({"layers": list(step.layers)})  # aligners and mergers may read them too
        if kind in ("aligner", "merger"):  # statistics gathered in batches depend on their size
            inputs.append({"batch_size": self.pipeline.activations.batch_size})
        component = step.component if isinstance(step.component, type) else type(step.component)
        return cache_key(
            {
                "use": step.use,
                "kind": kind,
                "options": unstructure_options(step.component),
                "source": _source_digest(component),
                "core": _core_digest(),
            },
            step.data if step.data is not None else self.pipeline.data,
            self.pipeline.seed,
            inputs,
        )

    def run_step(self, index: int, results: dict[str, xr.Dataset]) -> dict[str, xr.Dataset]:
        step, name = self.pipeline.steps[index], self.names[index]
        kind = self.kinds[name]
        key = self.step_keys[name] = self._step_key(name, step)
        step_dir = self.out / "steps" / f"{name}-{key[:16]}"
        result_path, model_path = step_dir / "result.nc", step_dir / "model.pt"
        if result_path.exists() and not self.force:
            log.info("step %s (%s): done before, loaded from %s", name, step.use, step_dir)
            tree = load_tree(result_path)
            if kind == "merger" and model_path.exists():
                self.models[name] = _Model(self._rebuild_merged(step, model_path), key)
            if kind == "aligner":
                self.alignments[name] = Alignment.from_tree(tree)
            return _flatten(tree)
        log.info("step %s (%s): running", name, step.use)
        where = f"{self.pipeline.source}, [[steps]] #{index + 1} (use = {step.use!r})"
        try:
            nodes = self._execute(name, step, kind, results, step_dir)
        except MergescopeError as exc:
            raise type(exc)(f"{where}: {exc}") from exc
        except Exception as exc:  # a bug in a component: say which one, keep the traceback as __cause__
            cls = type(step.component)
            plugins = [e.plugin for e in self.registry.entries(kind) if e.cls is cls] or ["?"]
            raise MergescopeError(
                f"{where}: step {name!r} failed in {kind} {step.use!r} "
                f"(plugin {plugins[0]!r}, module {cls.__module__}): {type(exc).__name__}: {exc}"
            ) from exc
        if kind == "merger" and name in self.models:
            save_state_dict(self.models[name].module, model_path)
        save_tree(xr.DataTree.from_dict(nodes), result_path)
        return nodes

    def _rebuild_merged(self, step: Step, model_path: Path) -> nn.Module:
        template = self.model(self._step_models(step)[0]).module
        model = _clone(template)
        load_into(model, load_state_dict(model_path), source=str(model_path), architecture=step.use)
        return model.eval()

    def _execute(
        self, name: str, step: Step, kind: str, results: Mapping[str, xr.Dataset], step_dir: Path
    ) -> dict[str, xr.Dataset]:
        component = step.component
        model_names = self._step_models(step)
        models = {m: self.model(m).module for m in model_names}
        context = self.step_context(step, kind)
        if kind == "merger":
            alignment = self.alignments.get(step.alignment) if step.alignment else None
            merged: MergeResult = component.merge(models, context, alignment=alignment)
            if merged.model is not None:
                self.models[name] = _Model(merged.model.eval(), self.step_keys[name])
            return {"/": merged.results}
        if kind == "aligner":
            alignment = component.align(models, model_names[0], context)
            self.alignments[name] = alignment
            return _flatten(alignment.to_tree())
        if kind == "metric":
            return {layer: self._score(component, model_names, layer, context) for layer in context.layers}
        if kind == "differ":
            return {
                layer: component.fit({m: self.activation(m, layer) for m in model_names}, context)
                for layer in context.layers
            }
        if kind == "visualizer":
            figures = self.out / "figures" / name
            tree = xr.DataTree.from_dict(dict(results))
            paths = [Path(p) for p in component.render(tree, figures, **context_keyword(component.render, context))]
            node = xr.Dataset({"files": ("file", [os.path.relpath(p.resolve(), self.out.resolve()) for p in paths])})
            # Labelled data a visualizer draws from (its .nc outputs) joins the run's results.
            for path in paths:
                if path.suffix == ".nc":
                    with xr.open_dataset(path) as drawn:
                        node = node.merge(drawn.load())
            return {"/": node}
        raise ConfigError(f"{step.use!r} is {article(kind)}, which cannot be a step")

    def _score(self, metric: Any, model_names: list[str], layer: str, context: Context) -> xr.Dataset:
        reference = model_names[0]
        scores = []
        extra = context_keyword(metric.score, context)
        for other in model_names[1:]:
            score = metric.score(self.activation(reference, layer), self.activation(other, layer), **extra)
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
        layers = {path: ds for path, ds in nodes.items() if path != "/"}
        if self.kinds[name] == "metric":
            parts = []
            for layer, ds in layers.items():
                for var in ds.data_vars:
                    if "model" not in ds[var].dims:  # the mean and spread over models
                        continue
                    for model in ds[var].coords["model"].values:
                        parts.append(f"  {layer} {model}: {_describe(step.component, ds[var].sel(model=model))}")
            return f"{name} ({step.use}):\n" + "\n".join(parts)
        if self.kinds[name] == "differ":
            parts = [f"  {layer}: {_describe(step.component, ds)}" for layer, ds in layers.items()]
            return f"{name} ({step.use}):\n" + "\n".join(parts)
        root = nodes.get("/", xr.Dataset())
        return f"{name} ({step.use}): {_describe(step.component, root)}"


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


def _flatten(tree: xr.DataTree) -> dict[str, xr.Dataset]:
    """Node path relative to ``tree`` ("/" for the root) -> the node's own Dataset."""
    out = {"/": tree.to_dataset(inherit=False)}
    for node in tree.subtree:
        if node is not tree and node.has_data:
            out[node.relative_to(tree)] = node.to_dataset(inherit=False)
    return out


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


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
    spec = pipeline.activations
    layers = {m.name: list(spec.layers) for m in pipeline.models}
    store_spec = StoreSpec(
        layers=layers,
        reduce=spec.reduce,
        batch_size=spec.batch_size,
        chunk_size=spec.chunk_size,
        topk=spec.topk,
        workers=spec.workers,
    )
    key = cache_key([job.models[m].fingerprint for m in layers], pipeline.data, store_spec.identity())
    assert job.data is not None
    return collect_store(
        {m: job.models[m].module for m in layers}, job.data, store_spec, out_dir, key=key, shard=shard, context=job.context
    )
