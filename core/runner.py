"""Running a pipeline: models in, one cached step after another, ``results.nc`` out.

The run directory holds::

    results.nc        every step's labelled results, one group per step
    pipeline.toml     the pipeline as run
    summary.txt       one paragraph per step, then the claims checked
    run.json          versions, seed, and the time of each step
    report.html       the self-contained report (see mergescope.report)
    activations/<key>/    activation stores (see mergescope.store), one per recording pass
    steps/<name>-<key>/   a step's cached result (and merged model)

A step's key hashes its component, options, inputs and data, so a re-run skips the
steps that are done and redoes the ones whose inputs changed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import xarray as xr
from torch import nn

from ._version import __version__
from .activations import check_single_calls, resolve_layers
from .checkpoints import check_class_count, load_into, load_state_dict, save_state_dict
from .claims import attach_verdicts
from .context import Context
from .devices import autocast, explain_device_mix, place
from .errors import CheckpointError, ConfigError, ContractError, MergescopeError
from .groups import align_to_reference, channel_groups, example_input
from .keys import cache_key, core_digest, file_digest, path_identity, source_digest, state_digest
from .kinds import KINDS, StepCall, StepKind, step_kind
from .loading import loader_options
from .options import path_options, unstructure_options
from .pipeline import ALIGNED, ModelSpec, Pipeline, Step
from .plugins import Registry, get_registry
from .report import write_report
from .report_parts import parameter_count, plain_json, step_evaluation, task_table
from .results import RunResult
from .storage import atomic_path, load_tree, locked_dir, save_tree
from .store import Store, StoreSpec, collect_store, recording_key
from .tasks import ValidationTask, evaluate_tasks
from .training import Training, trained_model, trained_model_key
from .values import Alignment, DatasetSource, Evaluation, ImageDataset, evaluate, model_device

__all__ = ["RunResult", "run", "collect_activations"]

log = logging.getLogger("mergescope")


@attrs.define
class _Model:
    module: nn.Module
    fingerprint: str


class _Run:
    def __init__(
        self,
        pipeline: Pipeline,
        out_dir: Path,
        *,
        force: bool,
        quiet: bool,
        registry: Registry,
        device: torch.device | None = None,
        step_devices: Mapping[str, torch.device] | None = None,
        wanted: Sequence[str] | None = None,
    ):
        self.pipeline = pipeline
        # The steps to run: all of them, or those a notebook asked for with what they need.
        self.wanted = set(wanted if wanted is not None else pipeline.step_names())
        self.device = device if device is not None else torch.device("cpu")
        self.precision = pipeline.precision
        # The steps that run elsewhere than the run's device (a step's own `device`), by step name.
        self.step_devices = dict(step_devices) if step_devices is not None else pipeline.resolve_devices()[1]
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
            device=self.device,
            precision=self.precision,
            tasks=self._validation_tasks(),
        )
        self.models: dict[str, _Model] = {}
        self.alignments: dict[str, Alignment] = {}
        self.step_keys: dict[str, str] = {}
        self.identities: dict[str, Any] = {}  # path_identity of every path option, by path
        self.stores: dict[str, Store] = {}
        self.step_datasets: dict[str, ImageDataset] = {}
        self.needed_layers = self._needed_layers()

    # -- models ----------------------------------------------------------------

    def _model_where(self, index: int, spec: ModelSpec) -> str:
        return f"{self.pipeline.source}, [[models]] #{index + 1} (name = {spec.name!r})"

    def load_models(self) -> None:
        for i, spec in enumerate(self.pipeline.models):
            where = self._model_where(i, spec)
            if spec.module is not None:  # moved to the run's device in place, as nn.Module.to does
                self.models[spec.name] = _Model(place(spec.module, self.device).eval(), state_digest(spec.module))
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
        # How the file is read changes what is loaded: part of the fingerprint when given
        # (and only then, so that the fingerprints of plain checkpoints stay as they were).
        options = {k: getattr(spec, k) for k in ("checkpoint_key", "strip_prefix") if getattr(spec, k) is not None}
        try:
            state = load_state_dict(path, **options)
            check_class_count(model, state, self.data, str(path), self.pipeline.data)
            load_into(model, state, source=str(path), architecture=use)
        except CheckpointError as exc:
            raise CheckpointError(f"{where}, key 'checkpoint': {exc}") from exc
        place(model, self.device).eval()
        return _Model(model, cache_key(file_digest(path), options) if options else file_digest(path))

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
        inputs = self._input_identities({"architecture": spec.architecture, "data": source})
        log.info("model %s: training or loading from cache", spec.name)
        try:
            model = trained_model(
                spec.architecture, source, training, progress=self.context.progress, device=self.device, inputs=inputs
            )
        except torch.OutOfMemoryError as exc:
            raise MergescopeError(
                f"{where}: training model {spec.name!r} ran out of memory on {self.device} "
                f"([models.train] batch_size = {training.batch_size}): lower [models.train] batch_size. "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return _Model(place(model, self.device), trained_model_key(spec.architecture, source, training, inputs))

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
                example = example_input(self.data)
                groups = channel_groups(reference, example)
                # Alignments are applied on the host (their maps are host tensors), then moved to the run's device.
                on_cpu = model_device(source.module) == torch.device("cpu")
                module = source.module if on_cpu else copy.deepcopy(source.module).cpu()
                aligned = place(align_to_reference({model: module}, alignment, groups, example)[model], self.device)
                self.models[name] = _Model(aligned.eval(), cache_key(source.fingerprint, self.step_keys[aligner]))
        return self.models[name]

    def _declared_base(self, name: str) -> str | None:
        """The declared model whose modules ``name`` has: itself, ``b`` for ``"b@wm"``, a merger's first input."""
        seen: set[str] = set()
        model = name.partition(ALIGNED)[0]
        while model not in self.models and model in self.names and model not in seen:
            seen.add(model)
            step = self.pipeline.steps[self.names.index(model)]
            if not self.rules[model].makes_model:
                return None
            model = self._step_models(step)[0].partition(ALIGNED)[0]
        return model if model in self.models else None

    def check_layers(self) -> None:
        """Before any step: every layer a step names exists, and each is one module call per forward pass.

        An unknown layer is reported in the table it came from (the step's ``layers`` or
        ``[activations] layers``); a module the network calls twice is refused with its
        call sites (:func:`mergescope.activations.check_single_calls`).
        """
        if self.data is None:
            return
        example = example_input(self.data)
        checked: set[tuple[str, tuple[str, ...]]] = set()
        for index, (name, step) in enumerate(zip(self.names, self.pipeline.steps)):
            rules, selectors = self.rules[name], self._step_selectors(step)
            if not selectors or not rules.resolves_layers(step):
                continue
            if step.layers is not None:
                where = f"{self.pipeline.source}, [[steps]] #{index + 1} (use = {step.use!r}), key 'layers'"
            else:
                where = f"{self.pipeline.source}, [activations], key 'layers'"
            names = self._step_models(step) if rules.reads_recordings(step) else self._step_models(step)[:1]
            for model in names:
                base = self._declared_base(model)
                if base is None or (base, tuple(selectors)) in checked:
                    continue
                checked.add((base, tuple(selectors)))
                module = self.models[base].module
                try:
                    layers = resolve_layers(module, selectors, base, example_input=example)
                    check_single_calls(module, list(layers), base, example)
                except ConfigError as exc:
                    raise ConfigError(exc.message, where=where) from None
                except RuntimeError as exc:  # before any step: the layer check runs the model once
                    at = f"{self.pipeline.source}, [[steps]] #{index + 1} (use = {step.use!r}): step {name!r}"
                    self._raise_device_fault(at, exc)
                    raise

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

    def step_context(self, step: Step, rules: StepKind, device: torch.device | None = None) -> Context:
        """The run's context narrowed to one step: its models, its layers, the stores, its device."""
        models = self._step_models(step)
        layers = self._step_layers(step) if rules.resolves_layers(step) and self._step_selectors(step) else []
        device = device if device is not None else self.device
        context = attrs.evolve(self.context, models=models, layers=layers, stores=self.store_of, device=device)
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
        key = recording_key([self.model(m).fingerprint for m in pending], self.data, store_spec, self.precision)
        directory = self.out / "activations" / key[:16]
        if self.force:
            shutil.rmtree(directory, ignore_errors=True)
        modules = {m: self.model(m).module for m in pending}
        # Models are recorded where they are: on the run's device, or on a step's own while that step runs.
        devices = {self.device, *(model_device(module) for module in modules.values())}
        try:
            with contextlib.ExitStack() as stack:
                for device in sorted(devices, key=str):
                    stack.enter_context(autocast(device, self.precision))
                store = collect_store(
                    modules,
                    self.data,
                    store_spec,
                    directory,
                    key=key,
                    progress=self.context.progress,
                )
        except torch.OutOfMemoryError as exc:
            raise self._out_of_memory(f"recording activations of {', '.join(pending)}", exc) from exc
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
            # The token choice joins the key only when it is not the default, so earlier caches stay valid.
            recording=[activations.reduce, activations.topk, *([activations.tokens] * (activations.tokens != "mean"))],
            earlier=[self.step_keys[n] for n in self.names[: self.names.index(name)]]
            if rules.reads_earlier_results
            else [],
            alignment=self.step_keys[step.alignment] if step.alignment else None,
            batch_size=activations.batch_size,
        )
        component = step.component if isinstance(step.component, type) else type(step.component)
        step_data = step.data if step.data is not None else self.pipeline.data
        return cache_key(
            {
                "use": step.use,
                "kind": self.kinds[name],
                "options": unstructure_options(step.component),
                "source": source_digest(component),
                "core": core_digest(),
                "paths": self._input_identities({"data": step_data, "step": step.component}),
            },
            step_data,
            self.pipeline.seed,
            inputs,
            *self._precision_key(),
            *(self._validation_key() if rules.makes_model else ()),
        )

    def _validation_key(self) -> tuple[list[Any], ...]:
        """What the tasks' validation data add to step keys (searches choose on them): nothing without any."""
        tasks = [t for t in self.pipeline.tasks if t.validation is not None]
        if not tasks:
            return ()
        return ([[t.name, t.validation, t.head.to_table() if t.head else None, t.restrict, t.expert] for t in tasks],)

    def _precision_key(self) -> tuple[dict[str, str], ...]:
        """What the precision adds to cache keys: nothing at fp32, so that full-precision keys stay as they were."""
        return () if self.precision == "fp32" else ({"precision": self.precision},)

    def _out_of_memory(
        self, what: str, exc: BaseException, step: Step | None = None, device: torch.device | None = None
    ) -> MergescopeError:
        """The error of ``what`` running out of device memory: the device, the batch sizes in force, what to lower."""
        sizes = [f"[activations] batch_size = {self.pipeline.activations.batch_size}"]
        own = getattr(step.component, "batch_size", None) if step is not None else None
        if isinstance(own, int):
            sizes.append(f"the step's batch_size = {own}")
        advice = "lower [activations] batch_size, or the step's batch_size"
        advice += ", or use precision = 'bf16'" if self.precision == "fp32" else ""
        return MergescopeError(
            f"{what} ran out of memory on {device or self.device} ({', '.join(sizes)}): {advice}. "
            f"{type(exc).__name__}: {exc}"
        )

    def _raise_device_fault(self, where: str, exc: BaseException, device: torch.device | None = None) -> None:
        """Raise the error of a model whose own forward pass mixed devices (see ``explain_device_mix``), if it did."""
        explained = explain_device_mix(exc, {n: m.module for n, m in self.models.items()}, device or self.device)
        if explained:
            raise MergescopeError(f"{where}: {explained}") from exc

    def _evaluate(
        self, what: str, module: nn.Module, data: ImageDataset, classes: list[int] | None = None
    ) -> Evaluation:
        """Evaluate at the run's precision; running out of memory or a model mixing devices is reported as ``what``."""
        try:
            with autocast(self.device, self.precision):
                return evaluate(module, data, self.pipeline.activations.batch_size, classes)
        except torch.OutOfMemoryError as exc:
            raise self._out_of_memory(what, exc) from exc
        except RuntimeError as exc:
            self._raise_device_fault(what, exc)
            raise

    def _input_identities(self, components: Mapping[str, Any]) -> dict[str, Any]:
        """What the files and folders named by the components' path options hold (``path_identity``), by role.option."""
        found: dict[str, Any] = {}
        for role, component in components.items():
            for key, path in path_options(component, self.registry.get).items():
                if path not in self.identities:  # one walk of a folder per run
                    self.identities[path] = path_identity(path)
                found[f"{role}.{key}"] = self.identities[path]
        return found

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
                self.models[name] = _Model(place(self._rebuild_merged(step, model_path), self.device), key)
            if output.alignment is not None:
                self.alignments[name] = output.alignment
            return output.nodes
        log.info("step %s (%s): running", name, step.use)
        where = f"{self.pipeline.source}, [[steps]] #{index + 1} (use = {step.use!r})"
        device = self.step_devices.get(name, self.device)
        try:
            with self._models_on(device, self._step_modules(step, rules)):
                output = rules.execute(self._call(name, step, rules, results, device))
        except MergescopeError as exc:
            raise type(exc)(f"{where}: {exc}") from exc
        except torch.OutOfMemoryError as exc:  # not a bug: too much at once for the device
            what = f"{where}: step {name!r} ({kind} {step.use!r})"
            raise self._out_of_memory(what, exc, step, device) from exc
        except Exception as exc:  # a bug in a component: say which one, keep the traceback as __cause__
            self._raise_device_fault(f"{where}: step {name!r}", exc, device)  # not the component's bug, if so
            cls = type(step.component)
            plugins = [e.plugin for e in self.registry.entries(kind) if e.cls is cls] or ["?"]
            raise MergescopeError(
                f"{where}: step {name!r} failed in {kind} {step.use!r} "
                f"(plugin {plugins[0]!r}, module {cls.__module__}): {type(exc).__name__}: {exc}"
            ) from exc
        if output.alignment is not None:
            self.alignments[name] = output.alignment
        if output.model is not None:
            self.models[name] = _Model(place(output.model, self.device), key)
            save_state_dict(output.model, model_path)
        save_tree(xr.DataTree.from_dict(output.nodes), result_path)
        return output.nodes

    def _rebuild_merged(self, step: Step, model_path: Path) -> nn.Module:
        state = load_state_dict(model_path)
        rebuild = getattr(step.component, "rebuild", None)
        if callable(rebuild):  # a merge of another structure than its inputs (an ensemble, a multi-head model)
            model = rebuild({m: self.model(m).module for m in self._step_models(step)}, state)
        else:
            model = copy.deepcopy(self.model(self._step_models(step)[0]).module)
        load_into(model, state, source=str(model_path), architecture=step.use)
        return model.eval()

    def _step_modules(self, step: Step, rules: StepKind) -> list[nn.Module]:
        """The modules a step receives (built now: aligned views, merged models of earlier steps)."""
        return [self.model(m).module for m in self._step_models(step)] if rules.reads_models(step) else []

    @contextlib.contextmanager
    def _models_on(self, device: torch.device, modules: list[nn.Module]) -> Iterator[None]:
        """``modules`` moved to ``device`` (in place) for a step that runs there, and back afterwards."""
        if device == self.device:
            yield
            return
        unique = list({id(m): m for m in modules}.values())
        for module in unique:
            module.to(device)
        try:
            yield
        finally:
            for module in unique:
                module.to(self.device)

    def _call(
        self,
        name: str,
        step: Step,
        rules: StepKind,
        results: dict[str, xr.Dataset],
        device: torch.device | None = None,
    ) -> StepCall:
        model_names = self._step_models(step)
        return StepCall(
            name=name,
            use=step.use,
            component=step.component,
            model_names=model_names,
            models={m: self.model(m).module for m in model_names} if rules.reads_models(step) else {},
            context=self.step_context(step, rules, device),
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
        self.check_layers()
        timings["models"] = time.perf_counter() - start
        results: dict[str, xr.Dataset] = {}
        lines = []
        # Which step results exist before the run, to tell cached steps apart in run.json and the report.
        done_before = set() if self.force else {p.parent.name for p in (self.out / "steps").glob("*/result.nc")}
        for i, name in enumerate(self.names):
            if name not in self.wanted and not self._restorable(i):
                continue
            t0 = time.perf_counter()
            nodes = self.run_step(i, results)
            timings[name] = time.perf_counter() - t0
            for path, ds in nodes.items():
                results[f"{name}/{path}".rstrip("/").replace("//", "/")] = ds
            lines.append(self._summary_line(name, nodes))
        whole = len(self.wanted) == len(self.names)  # tasks and claims read every step's models and results
        if self.pipeline.tasks and whole:
            t0 = time.perf_counter()
            results["tasks"] = self.evaluate_tasks()
            timings["tasks"] = time.perf_counter() - t0
            lines.append(task_table(results["tasks"]))
        claims = self.pipeline.claims if whole else []
        tree, claim_lines = attach_verdicts(xr.DataTree.from_dict(results), claims)
        lines.extend(claim_lines)
        pipeline_text = _as_toml(self.pipeline)
        tree.attrs.update({"mergescope_version": __version__, "pipeline": pipeline_text})
        save_tree(tree, self.out / "results.nc")
        summary = "\n".join(lines) + "\n"
        _write_text(self.out / "summary.txt", summary)
        _write_text(self.out / "pipeline.toml", pipeline_text)
        run_info = {
            **{"mergescope": __version__, "torch": torch.__version__, "xarray": xr.__version__},
            "python": platform.python_version(),
            "seed": self.pipeline.seed,
            "device": str(self.device),
            "precision": self.precision,
            "seconds": {k: round(v, 3) for k, v in timings.items()},
            "steps": {
                n: {
                    "use": s.use,
                    "kind": self.kinds[n],
                    "key": self.step_keys[n],
                    "cached": f"{n}-{self.step_keys[n][:16]}" in done_before,
                    "models": self._used_models(n, s),
                    "alignment": s.alignment,
                    **({"device": str(self.step_devices[n])} if n in self.step_devices else {}),
                }
                for n, s in zip(self.names, self.pipeline.steps)
                if n in self.step_keys
            },
            "models": self.models_info(results),
            "data": self.data_info(),
        }
        _write_text(self.out / "run.json", json.dumps(run_info, indent=2) + "\n")
        components = {n: s.component for n, s in zip(self.names, self.pipeline.steps)}
        write_report(self.out, tree, info=run_info, pipeline_text=pipeline_text, summary=summary, components=components)
        return RunResult(self.out, tree, summary, {n: m.module for n, m in self.models.items()}, components)

    def _restorable(self, index: int) -> bool:
        """Whether a step left out of a partial run has a cached result whose inputs are at hand: shown, not run."""
        name, step = self.names[index], self.pipeline.steps[index]
        if self.force or any(d not in self.step_keys for d in self.pipeline.step_dependencies(name, self.registry)):
            return False
        key = self._step_key(name, step)
        return (self.out / "steps" / f"{name}-{key[:16]}" / "result.nc").exists()

    # -- what the report says of the models and the data --------------------------------

    def _used_models(self, name: str, step: Step) -> list[str]:
        """The models a step used: its ``models``, else every declared model when its kind reads models."""
        rules = self.rules[name]
        if step.models or rules.reads_models(step) or rules.reads_recordings(step):
            return self._step_models(step)
        return []

    def data_info(self) -> dict[str, object] | None:
        """The run's data for run.json: its name, component, number of images and class list."""
        if self.data is None:
            return None
        source = self.pipeline.data
        return {
            "name": self.data.name,
            "use": type(source).name if source is not None else None,
            "options": plain_json(unstructure_options(source)) if source is not None else {},
            "images": len(self.data),
            "classes": [str(c) for c in self.data.classes],
        }

    def models_info(self, results: Mapping[str, xr.Dataset]) -> dict[str, dict[str, object]]:
        """Every declared and merged model for run.json: source, architecture, parameters, loss and accuracy.

        Declared models are evaluated on the run's data (cached in ``steps/models-<key>/``);
        merged models keep the numbers their step measured (on the step's data).
        """
        info: dict[str, dict[str, object]] = {}
        for spec in self.pipeline.models:
            model = self.models[spec.name]
            arch = spec.architecture
            evaluation = self._own_evaluation(model, spec.name)
            info[spec.name] = {
                "source": self._model_source(spec),
                "architecture": {"use": type(arch).name, "options": plain_json(unstructure_options(arch))}
                if arch is not None
                else {"use": None, "class": type(model.module).__name__},
                "parameters": parameter_count(model.module),
                "loss": evaluation[0],
                "accuracy": evaluation[1],
                "evaluated_on": self.data.name if self.data is not None and evaluation[1] is not None else None,
            }
        for name, step in zip(self.names, self.pipeline.steps):
            if not self.rules[name].makes_model or name not in self.models:
                continue
            inputs = self._step_models(step)
            base = info.get(inputs[0].partition(ALIGNED)[0], {})
            loss, accuracy = step_evaluation(results.get(name))
            data = self._step_data(step.data) if step.data is not None else self.data
            info[name] = {
                "source": {
                    "kind": "merged",
                    "step": name,
                    "use": step.use,
                    "models": inputs,
                    "alignment": step.alignment,
                },
                "architecture": base.get("architecture"),
                "parameters": parameter_count(self.models[name].module),
                "loss": loss,
                "accuracy": accuracy,
                "evaluated_on": data.name if data is not None and accuracy is not None else None,
            }
        return info

    def _model_source(self, spec: ModelSpec) -> dict[str, object]:
        if spec.module is not None:
            return {"kind": "module", "class": type(spec.module).__name__}
        if spec.checkpoint is not None:
            return {"kind": "checkpoint", "path": str(spec.checkpoint)}
        source = spec.train_data
        data = self.pipeline.data
        if source is None and data is not None and "split" in {f.name for f in attrs.fields(type(data))}:
            source = attrs.evolve(data, split="train")
        train_data = {"use": type(source).name, "options": plain_json(unstructure_options(source))} if source else None
        training = plain_json(unstructure_options(spec.train or Training()))
        return {"kind": "trained", "training": training, "train_data": train_data}

    def _own_evaluation(self, model: _Model, name: str) -> tuple[float | None, float | None]:
        """Loss and accuracy of a declared model on the run's data, cached by its fingerprint."""
        if self.data is None:
            return None, None
        batch_size = self.pipeline.activations.batch_size
        key = cache_key("model-evaluation", model.fingerprint, self.pipeline.data, batch_size, *self._precision_key())
        path = self.out / "steps" / f"models-{key[:16]}" / "evaluation.json"
        if path.exists() and not self.force:
            cached = json.loads(path.read_text(encoding="utf-8"))
            return cached["loss"], cached["accuracy"]
        try:
            result = self._evaluate(f"evaluating {name!r} on [data]", model.module, self.data)
        except ContractError as exc:  # [data] of other classes (photos to record, say): no accuracy to report
            log.info("model %r has no accuracy on [data]: %s", name, exc)
            return None, None
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_text(path, json.dumps({"loss": result.loss, "accuracy": result.accuracy}) + "\n")
        return result.loss, result.accuracy

    def evaluate_tasks(self) -> xr.Dataset:
        """Loss and accuracy of every model on every task, each with its head; normalised by each task's expert."""
        made = [self.pipeline.composition(m) for m in self.models]
        how = {"method": ("model", [m for m, _ in made]), "alignment": ("model", [a for _, a in made])}
        models = {name: (model.module, model.fingerprint) for name, model in self.models.items()}
        table = evaluate_tasks(
            self.pipeline.tasks,
            models,
            self._evaluate,
            self.out / "steps",
            force=self.force,
            key_parts=self._precision_key(),
        )
        return table.assign_coords(how)

    def _validation_tasks(self) -> list[ValidationTask]:
        """The tasks with validation data, for the searches of merge coefficients (experts found when asked)."""

        def expert(name: str | None) -> Callable[[], nn.Module | None]:
            return lambda: self.models[name].module if name is not None and name in self.models else None

        return [
            ValidationTask(t.name, t.validation, t.head, t.restrict, t.expert, expert(t.expert))
            for t in self.pipeline.tasks
            if t.validation is not None
        ]

    def _summary_line(self, name: str, nodes: Mapping[str, xr.Dataset]) -> str:
        step = self.pipeline.steps[self.names.index(name)]
        return self.rules[name].summary(name, step.use, step.component, nodes)


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
    device: str | None = None,
    precision: str | None = None,
    workers: int | None = None,
    steps: Sequence[str] | None = None,
) -> RunResult:
    """Run ``pipeline`` and write its results to ``out_dir``.

    Parameters
    ----------
    pipeline
        A :class:`~mergescope.pipeline.Pipeline`, from TOML or built in Python. Relative
        paths in it (checkpoints, path options) are taken from the working directory.
    out_dir
        The run directory; created when missing. Finished steps found there are reused.
        It is locked while the run writes it (``run.lock``): a second run into it is
        refused at once with a :class:`~mergescope.errors.ConfigError`.
    force
        Redo every step (and recording) even when a cached result exists.
    quiet
        Hide progress bars.
    registry
        The component registry; defaults to the entry-point plugins.
    device, precision
        Override the pipeline's ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``,
        ``"cuda:N"``, ``"mps"``) and ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``);
        see :mod:`mergescope.devices`.
    workers
        Override the pipeline's ``[loader] workers`` (data-loading processes; see
        :mod:`mergescope.loading`).
    steps
        Run only these steps and the earlier ones they need (their models, alignments,
        and for a visualizer every earlier step), as a notebook does cell by cell. Other
        steps with a cached result are shown too; tasks and claims wait for a whole run.
        Activations are recorded for the models this run builds, so a later whole run
        may record again.

    Returns
    -------
    RunResult

    Raises
    ------
    ConfigError
        Besides the pipeline's own errors: the device is not available here, or fp16 was
        asked for on the CPU.
    """
    registry = registry or get_registry()
    pipeline = pipeline.with_absolute_paths(registry=registry)  # relative paths: from the working directory
    pipeline.check(registry)
    pipeline = pipeline.with_overrides(device, precision, workers)
    resolved, step_devices = pipeline.resolve_devices(overridden=device is not None)
    if not pipeline.steps and not pipeline.tasks:
        raise ConfigError(
            "this pipeline has nothing to do: it has no [[steps]] and no [[tasks]]; add a step (for example "
            '[[steps]] use = "interpolation") — or, to record activations only, use `mergescope collect`',
            where=f"{pipeline.source}, key 'steps'",
        )
    wanted = pipeline.steps_needed_for(steps, registry) if steps is not None else None  # unknown names: now
    with locked_dir(out_dir) as out:  # one run at a time writes a run directory
        job = _Run(
            pipeline,
            out,
            force=force,
            quiet=quiet,
            registry=registry,
            device=resolved,
            step_devices=step_devices,
            wanted=wanted,
        )
        with loader_options(pipeline.loader):
            return job.execute()


def collect_activations(
    pipeline: Pipeline,
    out_dir: str | Path,
    *,
    shard: tuple[int, int] = (0, 1),
    quiet: bool = False,
    registry: Registry | None = None,
    device: str | None = None,
    precision: str | None = None,
    workers: int | None = None,
    pairs: Sequence[tuple[str, str]] = (),
    positions: bool = False,
    keep_activations: bool = True,
) -> Store:
    """Record ``[activations] layers`` of every pipeline model into an activation store.

    The models are loaded or trained as in :func:`run`; the steps are not run. Use
    ``shard=(i, n)`` to record one of ``n`` slices of the dataset (e.g. one per
    machine) and :func:`mergescope.store.join_stores` to join the shards. ``device``,
    ``precision`` and ``workers`` override the pipeline's, as in :func:`run`. ``pairs``
    (model, reference), ``positions`` and ``keep_activations`` are those of
    :class:`~mergescope.store.StoreSpec`: the co-moments activation matching and CCA read.
    """
    registry = registry or get_registry()
    pipeline = pipeline.with_absolute_paths(registry=registry)
    pipeline.check(registry)
    pipeline = pipeline.with_overrides(device, precision, workers)
    resolved = pipeline.resolve_devices(overridden=device is not None, steps=False)[0]
    if pipeline.data is None or not pipeline.activations.layers:
        raise ConfigError(
            "collecting needs [data] and [activations] layers", where=f"{pipeline.source}, key 'activations'"
        )
    job = _Run(pipeline, Path(out_dir), force=False, quiet=quiet, registry=registry, device=resolved)
    job.load_models()
    layers = {m.name: list(pipeline.activations.layers) for m in pipeline.models}
    assert job.data is not None
    example = example_input(job.data)
    for name, selectors in layers.items():  # unknown or twice-called layers, before recording
        try:
            names = resolve_layers(job.models[name].module, selectors, name, example_input=example)
            check_single_calls(job.models[name].module, list(names), name, example)
        except ConfigError as exc:
            raise ConfigError(exc.message, where=f"{pipeline.source}, [activations], key 'layers'") from None
    unknown = sorted({m for pair in pairs for m in pair} - set(layers))
    if unknown:
        raise ConfigError(f"pairs name models the pipeline does not have: {unknown}; it has {sorted(layers)}")
    store_spec = _store_spec(pipeline, layers)
    store_spec = attrs.evolve(store_spec, pairs=list(pairs), positions=positions, keep_activations=keep_activations)
    key = recording_key([job.models[m].fingerprint for m in layers], job.data, store_spec, pipeline.precision)
    with autocast(resolved, pipeline.precision), loader_options(pipeline.loader):
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
        tokens=spec.tokens,
    )
