"""Pipelines: declared in TOML or composed in Python from the same objects.

A pipeline file::

    seed = 0
    device = "auto"             # where models run: auto, cpu, cuda, cuda:N, mps
    precision = "fp32"          # of forward passes: fp32, bf16, fp16

    [data]                      # a dataset component and its options
    use = "mnist5000"
    split = "test"

    [activations]               # defaults for steps that read activations
    layers = ["relu1", "relu2"]
    reduce = "mean"
    batch_size = 500

    [loader]                    # how batches are loaded (every pass of the run)
    workers = 4                 # decoding processes; pin_memory, persistent_workers, prefetch_factor

    [[models]]                  # an architecture component and its options
    name = "a"
    use = "mlp"
    checkpoint = "a.pt"         # or a [models.train] table: train here, cached

    [[steps]]                   # a component and its options
    use = "kendall-tau"
    models = ["a", "b"]

``Pipeline.from_toml(text)`` and ``pipeline.to_toml()`` round-trip.
"""

from __future__ import annotations

import html
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from .claims import CLAIMS_GROUP, Claim, check_steps, claims_to_tables, parse_claims
from .devices import autocast, check_device_spec, check_precision, resolve_device
from .errors import ConfigError, article, did_you_mean
from .kinds import KINDS, STEP_KINDS, StepKind, step_kind
from .loading import LoaderOptions
from .options import canonical_path, resolve_paths, unstructure_options
from .plugins import Registry, get_registry
from .specs import (
    ALIGNED,
    CHECKPOINT_OPTIONS,
    ActivationSpec,
    Data,
    ModelSpec,
    Step,
    TaskSpec,
    as_table,
    build_component,
    check_checkpoint_options,
    check_own_data,
    component_from_table,
    component_name,
    model_from_table,
    reject_unknown,
    step_from_table,
    structure_table,
    task_from_table,
)
from .values import CHANNEL_GROUPS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
import tomli_w

__all__ = [
    "ActivationSpec",
    "ModelSpec",
    "Step",
    "TaskSpec",
    "Data",
    "Pipeline",
    "load_pipeline",
    "component_from_table",
    "STEP_KINDS",
]

_TOP_KEYS = ("seed", "device", "precision", "data", "activations", "loader", "models", "steps", "tasks", "claims")
# Model and step names become netCDF group names and are joined with "@" and "/".
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@attrs.define
class Pipeline:
    """A whole experiment: data, models and steps.

    Build one in Python from component instances, or with :meth:`from_toml` /
    :func:`load_pipeline`; :meth:`to_toml` writes it back.
    """

    models: list[ModelSpec] = attrs.field(factory=list)
    steps: list[Step] = attrs.field(factory=list)
    tasks: list[TaskSpec] = attrs.field(factory=list)
    data: Any | None = None
    activations: ActivationSpec = attrs.field(factory=ActivationSpec)
    seed: int = 0
    source: str = attrs.field(default="<pipeline>", eq=False)
    #: Where models run: ``"auto"`` (CUDA, then MPS, then the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
    device: str = attrs.field(default="auto", kw_only=True, validator=lambda _i, _a, v: check_device_spec(v))
    #: Precision of forward passes (recording, evaluation): ``"fp32"``, ``"bf16"``, ``"fp16"``.
    precision: str = attrs.field(default="fp32", kw_only=True, validator=lambda _i, _a, v: check_precision(v))
    #: How batches are loaded in every pass of the run (``[loader]``); never part of a cache key.
    loader: LoaderOptions = attrs.field(factory=LoaderOptions, kw_only=True)
    #: What papers say the run should show (``[[claims]]``), checked after the steps; never part of a cache key.
    claims: list[Claim] = attrs.field(factory=list, kw_only=True)

    # -- names ---------------------------------------------------------------

    def step_names(self) -> list[str]:
        """The resolved name of every step, in order."""
        uses = [s.use for s in self.steps if s.name is None]
        return [s.name or (s.use if uses.count(s.use) == 1 else f"{s.use}-{i + 1}") for i, s in enumerate(self.steps)]

    def step_dependencies(self, name: str, registry: Registry | None = None) -> list[str]:
        """The earlier steps step ``name`` reads: the merges and alignments it names, or all of them.

        A visualizer draws on every earlier result, so it depends on every earlier step.
        """
        names = self.step_names()
        index = names.index(name)
        step = self.steps[index]
        kind = (registry or get_registry()).kind_of(type(step.component))
        if step_kind(kind).reads_earlier_results:
            return names[:index]
        refs = [part for ref in step.models or [] for part in ref.partition(ALIGNED)[::2]]
        return [n for n in names[:index] if n in refs or n == step.alignment]

    def composition(self, model: str) -> tuple[str, str]:
        """How a model of the run was made: the method (a merger step's component) and the alignments it went through.

        The alignments are the aligner steps named by ``"b@<aligner>"`` among a merger
        step's models and by its ``alignment`` key, and those of the merges it takes as
        inputs, so that "activation matching, then TIES" reads ``("ties", "am")``.
        Declared models give ``("", "")``; ``"b@am"`` gives ``("", "am")``.
        """
        names = self.step_names()
        base, _, aligner = model.partition(ALIGNED)
        if base not in names:
            return "", aligner
        step = self.steps[names.index(base)]
        found = [aligner] if aligner else []
        if step.alignment:
            found.append(step.alignment)
        for ref in step.models or []:
            found.extend(a for a in self.composition(ref)[1].split("+") if a)
        return step.use, "+".join(dict.fromkeys(found))

    def steps_needed_for(self, wanted: Sequence[str], registry: Registry | None = None) -> list[str]:
        """The steps in ``wanted`` and every step they depend on, in pipeline order.

        Raises
        ------
        ConfigError
            A name in ``wanted`` is no step of the pipeline (with the closest one).
        """
        names = self.step_names()
        for name in wanted:
            if name not in names:
                hint = did_you_mean(name, names)
                raise ConfigError(f"no step {name!r} to run.{hint} Steps: {', '.join(names) or '(none)'}.")
        needed: set[str] = set()
        pending = list(wanted)
        while pending:
            name = pending.pop()
            if name not in needed:
                needed.add(name)
                pending.extend(self.step_dependencies(name, registry))
        return [n for n in names if n in needed]

    # -- where it runs ---------------------------------------------------------

    def with_overrides(
        self, device: str | None = None, precision: str | None = None, workers: int | None = None
    ) -> Pipeline:
        """The pipeline with a run's arguments in place of its own ``device``, ``precision`` and ``[loader] workers``."""
        pipeline = self
        if workers is not None:
            pipeline = attrs.evolve(pipeline, loader=attrs.evolve(pipeline.loader, workers=workers))
        if device is not None:
            pipeline = attrs.evolve(pipeline, device=device)
        if precision is not None:
            pipeline = attrs.evolve(pipeline, precision=precision)
        return pipeline

    def resolve_devices(
        self, overridden: bool = False, steps: bool = True
    ) -> tuple[torch.device, dict[str, torch.device]]:
        """The run's device, and the device of every step that names its own, resolved on this machine.

        Parameters
        ----------
        overridden
            The run's device came from an argument, not from the file (errors then name no key).
        steps
            Resolve the steps' own devices too (recording alone runs no step).

        Raises
        ------
        ConfigError
            A device this machine does not have, or fp16 on the CPU (see :mod:`mergescope.devices`).
        """
        try:
            resolved = resolve_device(self.device)
            autocast(resolved, self.precision)  # refuses fp16 on the CPU before anything runs
        except ConfigError as exc:
            raise ConfigError(exc.message, where=None if overridden else f"{self.source}, key 'device'") from None
        own: dict[str, torch.device] = {}
        for index, (name, step) in enumerate(zip(self.step_names(), self.steps)):
            if step.device is None or not steps:
                continue
            try:
                own[name] = resolve_device(step.device)
                autocast(own[name], self.precision)  # refuses fp16 on a CPU step
            except ConfigError as exc:
                where = f"{self.source}, [[steps]] #{index + 1} (use = {step.use!r}), key 'device'"
                raise ConfigError(f"step {name!r}: {exc.message}", where=where) from None
        return resolved, own

    # -- notebook display ------------------------------------------------------

    def _repr_html_(self) -> str:
        """The pipeline as a notebook shows it: its data, models and steps as tables."""

        def options(component: Any) -> str:
            if component is None:
                return ""
            values = unstructure_options(component)
            return ", ".join(f"{k} = {v!r}" for k, v in values.items())

        def table(caption: str, head: Sequence[str], rows: list[list[Any]]) -> str:
            cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
            return f"<table><caption>{html.escape(caption)}</caption><tr>{cells}</tr>{body}</table>"

        kinds = get_registry().kind_of
        data = [[component_name(self.data), options(self.data)]] if self.data is not None else []
        models = [
            [m.name, component_name(m.architecture) if m.architecture is not None else type(m.module).__name__]
            + [str(m.checkpoint) if m.checkpoint else "trained here" if m.module is None else "module"]
            for m in self.models
        ]
        steps = [
            [i, name, s.use, kinds(type(s.component)), ", ".join(s.models or []) or "(all)", s.alignment or ""]
            + [options(s.component)]
            for i, (name, s) in enumerate(zip(self.step_names(), self.steps), 1)
        ]
        return "".join(
            [
                table("Data", ["use", "options"], data) if data else "",
                table("Models", ["name", "use", "weights"], models),
                table("Steps", ["#", "name", "use", "kind", "models", "alignment", "options"], steps),
            ]
        )

    # -- TOML ------------------------------------------------------------------

    @classmethod
    def from_toml(
        cls, text: str, source: str = "<pipeline>", registry: Registry | None = None, base_dir: Path | None = None
    ) -> Pipeline:
        """Parse and validate a pipeline; errors name ``source``, the table and the key.

        Relative checkpoint paths, and component options that are paths (an image
        folder's ``root``, say), are taken relative to ``base_dir`` (default: the
        working directory).
        """
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}", where=source) from exc
        return cls.from_dict(raw, source=source, registry=registry, base_dir=base_dir)

    @classmethod
    def from_dict(
        cls,
        raw: Mapping[str, Any],
        source: str = "<pipeline>",
        registry: Registry | None = None,
        base_dir: Path | None = None,
    ) -> Pipeline:
        """Build a pipeline from parsed TOML."""
        registry = registry or get_registry()
        reject_unknown(raw, _TOP_KEYS, "the top level", source)
        data = None
        if "data" in raw:
            data = build_component(
                registry, "dataset", as_table(raw["data"], "[data]", source), f"{source}, [data]", base_dir=base_dir
            )
        activations_table = as_table(raw.get("activations", {}), "[activations]", source)
        loader = _loader(raw.get("loader", {}), activations_table, source)
        activations = structure_table(
            ActivationSpec, {k: v for k, v in activations_table.items() if k != "workers"}, f"{source}, [activations]"
        )
        models = [
            model_from_table(
                registry, as_table(m, f"[[models]] #{i + 1}", source), f"{source}, [[models]] #{i + 1}", base_dir
            )
            for i, m in enumerate(_list(raw.get("models", []), "models", source))
        ]
        steps = [
            step_from_table(
                registry, as_table(s, f"[[steps]] #{i + 1}", source), f"{source}, [[steps]] #{i + 1}", base_dir
            )
            for i, s in enumerate(_list(raw.get("steps", []), "steps", source))
        ]
        tasks = [
            task_from_table(
                registry, as_table(t, f"[[tasks]] #{i + 1}", source), f"{source}, [[tasks]] #{i + 1}", base_dir
            )
            for i, t in enumerate(_list(raw.get("tasks", []), "tasks", source))
        ]
        seed = raw.get("seed", 0)
        if not isinstance(seed, int):
            raise ConfigError(f"'seed' must be an integer, got {seed!r}", where=f"{source}, key 'seed'")
        device = check_device_spec(raw.get("device", "auto"), where=f"{source}, key 'device'")
        precision = check_precision(raw.get("precision", "fp32"), where=f"{source}, key 'precision'")
        pipeline = cls(
            models=models,
            steps=steps,
            tasks=tasks,
            data=data,
            activations=activations,
            seed=seed,
            source=source,
            device=device,
            precision=precision,
            loader=loader,
        )
        if "claims" in raw:
            pipeline.claims = parse_claims(raw["claims"], source, steps=pipeline.step_names())
        pipeline.check(registry)
        return pipeline

    def to_dict(self) -> dict[str, Any]:
        """The pipeline as TOML-ready nested dicts."""
        out: dict[str, Any] = {"seed": self.seed}
        # Written only when not the defaults, so that the TOML of other pipelines stays as it was.
        if self.device != "auto":
            out["device"] = self.device
        if self.precision != "fp32":
            out["precision"] = self.precision
        if self.data is not None:
            out["data"] = {"use": component_name(self.data), **unstructure_options(self.data)}
        out["activations"] = unstructure_options(self.activations)
        if self.loader.to_table():
            out["loader"] = self.loader.to_table()
        out["models"] = []
        for m in self.models:
            if m.module is not None:
                raise ConfigError(
                    f"model {m.name!r} is a Python module, which a pipeline file cannot hold; save its "
                    "state dict with torch.save(module.state_dict(), path) and give an architecture and 'checkpoint'"
                )
            table: dict[str, Any] = {"name": m.name, "use": component_name(m.architecture)}
            table.update(unstructure_options(m.architecture))
            if m.checkpoint is not None:
                table["checkpoint"] = str(m.checkpoint)
            for key in CHECKPOINT_OPTIONS:
                if getattr(m, key) is not None:
                    table[key] = getattr(m, key)
            if m.train is not None:
                table["train"] = unstructure_options(m.train)
            if m.train_data is not None:
                table["train_data"] = {"use": component_name(m.train_data), **unstructure_options(m.train_data)}
            out["models"].append(table)
        out["steps"] = []
        for s in self.steps:
            table = {"use": s.use}
            for key in ("name", "models", "layers", "alignment"):
                if getattr(s, key) is not None:
                    table[key] = getattr(s, key)
            if s.allow_unaligned:
                table["allow_unaligned"] = True
            if s.device is not None:
                table["device"] = s.device
            table.update(unstructure_options(s.component))
            if s.data is not None:
                table["data"] = {"use": component_name(s.data), **unstructure_options(s.data)}
            out["steps"].append(table)
        if self.tasks:
            out["tasks"] = []
        for t in self.tasks:
            table = {
                "name": t.name,
                "use": component_name(t.data),
                **unstructure_options(t.data),
                "restrict": t.restrict,
            }
            if t.expert is not None:
                table["expert"] = t.expert
            if t.models is not None:
                table["models"] = t.models
            if t.head is not None:
                table["head"] = t.head.to_table()
            if t.validation is not None:
                table["validation"] = {"use": component_name(t.validation), **unstructure_options(t.validation)}
            out["tasks"].append(table)
        if self.claims:
            out["claims"] = claims_to_tables(self.claims)
        return out

    def to_toml(self) -> str:
        """The pipeline as TOML text; ``Pipeline.from_toml(p.to_toml()) == p``."""
        return tomli_w.dumps(self.to_dict())

    def with_absolute_paths(self, base_dir: Path | None = None, registry: Registry | None = None) -> Pipeline:
        """The pipeline with every path absolute and canonical (see :func:`~mergescope.options.canonical_path`).

        Checkpoints and the path options of every component (also inside tables of
        components); a relative path is taken relative to ``base_dir``, by default the
        working directory (:func:`~mergescope.run` does this, so a pipeline composed in
        Python with relative paths means them from where it is run, and its saved
        ``pipeline.toml`` runs from anywhere). A pipeline read from a file already has them.
        """
        base = Path.cwd() if base_dir is None else Path(base_dir)
        lookup = (registry or get_registry()).get

        def fix(component: Any) -> Any:
            return resolve_paths(component, base, lookup)

        models = [
            attrs.evolve(
                m,
                architecture=fix(m.architecture),
                train_data=fix(m.train_data),
                checkpoint=None if m.checkpoint is None else canonical_path(m.checkpoint, base),
            )
            for m in self.models
        ]
        steps = [attrs.evolve(s, component=fix(s.component), data=fix(s.data)) for s in self.steps]
        tasks = [attrs.evolve(t, data=fix(t.data), validation=fix(t.validation)) for t in self.tasks]
        return attrs.evolve(self, models=models, steps=steps, tasks=tasks, data=fix(self.data))

    # -- checks ----------------------------------------------------------------

    def check(self, registry: Registry | None = None) -> None:
        """Check names and references across models and steps.

        Raises
        ------
        ConfigError
            Naming the model or step and the key at fault.
        """
        registry = registry or get_registry()
        model_names = [m.name for m in self.models]
        for i, (name, spec) in enumerate(zip(model_names, self.models)):
            where = f"{self.source}, [[models]] #{i + 1} (name = {name!r})"
            if name in model_names[:i]:
                raise ConfigError(f"two models are named {name!r}", where=f"{where}, key 'name'")
            if not _NAME.fullmatch(name):
                raise ConfigError(
                    f"model name {name!r} must start with a letter or digit and hold only letters, digits and "
                    "'_', '-', '.', '+'",
                    where=f"{where}, key 'name'",
                )
            if spec.module is None and spec.architecture is None:
                raise ConfigError("a model needs an architecture ('use') or a module", where=f"{where}, key 'use'")
            if spec.checkpoint is not None and not spec.checkpoint.is_file():
                raise ConfigError(
                    f"checkpoint file {str(spec.checkpoint)!r} does not exist", where=f"{where}, key 'checkpoint'"
                )
            check_checkpoint_options(spec, where)
        available = list(model_names)  # grows with merger steps, which produce models
        step_names = self.step_names()
        kinds: dict[str, StepKind] = {}
        aligners: dict[str, str] = {}  # aligner step -> the space of its alignment
        for i, (step, name) in enumerate(zip(self.steps, step_names)):
            where = f"{self.source}, [[steps]] #{i + 1} (use = {step.use!r})"
            kind = registry.kind_of(type(step.component))
            if not KINDS[kind].is_step:
                raise ConfigError(
                    f"{step.use!r} is {article(kind)}, which cannot be a step; steps use one of: {', '.join(STEP_KINDS)}",
                    where=f"{where}, key 'use'",
                )
            rules = step_kind(kind)
            if step.data is not None:
                check_own_data(kind, step.use, where)
            _check_applicable_keys(step, kind, rules, where)
            if rules.reads_recordings(step):
                _check_recording_needs(step, self.activations, where)
            if not _NAME.fullmatch(name):
                raise ConfigError(
                    f"step name {name!r} must start with a letter or digit and hold only letters, digits and "
                    "'_', '-', '.', '+' (it names a group in results.nc and, for a merger, a model)",
                    where=f"{where}, key 'name'",
                )
            if name == CLAIMS_GROUP:
                raise ConfigError(
                    f"a step cannot be named {CLAIMS_GROUP!r}: results.nc keeps the pipeline's claims under that name",
                    where=f"{where}, key 'name'",
                )
            if name in available or name in kinds:
                raise ConfigError(
                    f"step name {name!r} is already taken by a model or an earlier step", where=f"{where}, key 'name'"
                )
            for ref in step.models or []:
                model, _, aligner = ref.partition(ALIGNED)
                if model not in available:
                    hint = did_you_mean(model, available)
                    raise ConfigError(
                        f"unknown model {model!r}.{hint} Models available to this step: {', '.join(available) or '(none)'}.",
                        where=f"{where}, key 'models'",
                    )
                if aligner and aligner not in aligners:
                    raise ConfigError(
                        f"{ref!r}: {aligner!r} is not an earlier aligner step (write '<model>@<aligner step>'); "
                        f"aligner steps: {', '.join(aligners) or '(none)'}",
                        where=f"{where}, key 'models'",
                    )
                if aligner and aligners[aligner] != CHANNEL_GROUPS:
                    raise ConfigError(
                        f"{ref!r}: the aligner step {aligner!r} maps activations layer by layer "
                        f"(its alignment is in {aligners[aligner]!r} space), so no aligned model can be built "
                        "from it; use an aligner whose alignment is keyed by channel groups (weight-matching, "
                        "activation-matching, cca) to name aligned models, or read its results directly",
                        where=f"{where}, key 'models'",
                    )
            if rules.compares_units and not step.allow_unaligned:
                refs = step.models or model_names
                declared = [r for r in refs if r in model_names]
                if refs and refs[0] in model_names and len(declared) > 1:
                    raise ConfigError(
                        f"{step.use!r} compares unit j of one model with unit j of another, but the declared "
                        f"models {', '.join(map(repr, declared))} are not aligned to each other; compare aligned "
                        f"models ('{declared[1]}@<aligner step>') or merges, or set allow_unaligned = true when "
                        "their units already correspond (fine-tunes of one base) or to measure the misalignment",
                        where=f"{where}, key 'models'",
                    )
            if step.alignment is not None and step.alignment not in aligners:
                raise ConfigError(
                    f"{step.alignment!r} is not an earlier aligner step; aligner steps: {', '.join(aligners) or '(none)'}",
                    where=f"{where}, key 'alignment'",
                )
            if rules.needs_layers and not (step.layers or self.activations.layers):
                raise ConfigError(
                    "this step reads activations but names no layers; set 'layers' here or in [activations]",
                    where=f"{where}, key 'layers'",
                )
            if len(step.models or model_names) < rules.min_models:
                raise ConfigError(
                    f"this step compares models and needs at least {rules.min_models}", where=f"{where}, key 'models'"
                )
            if rules.makes_model:
                available.append(name)
            if rules.makes_alignment:
                aligners[name] = getattr(type(step.component), "space", CHANNEL_GROUPS)
            kinds[name] = rules
        task_names = [t.name for t in self.tasks]
        for i, task in enumerate(self.tasks):
            where = f"{self.source}, [[tasks]] #{i + 1} (name = {task.name!r})"
            if task.name in task_names[:i]:
                raise ConfigError(f"two tasks are named {task.name!r}", where=f"{where}, key 'name'")
            for key, refs in (("expert", [task.expert] if task.expert else []), ("models", task.models or [])):
                for ref in refs:
                    if ref not in available:
                        hint = did_you_mean(ref, available)
                        raise ConfigError(
                            f"unknown model {ref!r}.{hint} Models and merged models: {', '.join(available)}.",
                            where=f"{where}, key {key!r}",
                        )
        check_steps(self.claims, step_names, self.source)
        if (
            any(m.checkpoint is None and m.module is None for m in self.models)
            or any(kinds[n].needs_data for n in step_names)
        ) and self.data is None:
            raise ConfigError(
                "this pipeline trains, evaluates or records models, so it needs a [data] table",
                where=f"{self.source}, key 'data'",
            )


def load_pipeline(path: str | Path, registry: Registry | None = None) -> Pipeline:
    """Read a pipeline file; checkpoint paths are taken relative to the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the pipeline file: {exc.strerror}", where=str(path)) from exc
    return Pipeline.from_toml(text, source=str(path), registry=registry, base_dir=path.parent)


# ----------------------------------------------------------------------- helpers


def _list(value: Any, key: str, source: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"'{key}' must be an array of tables ([[{key}]])", where=f"{source}, key {key!r}")
    return value


def _loader(table: Any, activations: Mapping[str, Any], source: str) -> LoaderOptions:
    """The ``[loader]`` table; ``[activations] workers`` is its older spelling of ``workers``."""
    table = dict(as_table(table, "[loader]", source))
    reject_unknown(table, tuple(f.name for f in attrs.fields(LoaderOptions)), "[loader]", f"{source}, [loader]")
    if "workers" in activations:
        if "workers" in table and table["workers"] != activations["workers"]:
            raise ConfigError(
                f"[activations] workers = {activations['workers']!r} and [loader] workers = {table['workers']!r} "
                "disagree; keep only [loader] workers",
                where=f"{source}, [activations], key 'workers'",
            )
        table["workers"] = activations["workers"]
    try:
        return LoaderOptions(**table)
    except ConfigError as exc:
        raise exc.located(f"{source}, [loader]") from exc


def _check_applicable_keys(step: Step, kind: str, rules: StepKind, where: str) -> None:
    """Refuse step keys that mean nothing for the step's kind, rather than ignore them."""
    if step.allow_unaligned and not rules.compares_units:
        takers = ", ".join(k for k in STEP_KINDS if step_kind(k).compares_units)
        raise ConfigError(
            f"'allow_unaligned' only applies to steps that compare unit j of one model with unit j of another "
            f"({takers}); {step.use!r} is {article(kind)}: remove the key",
            where=f"{where}, key 'allow_unaligned'",
        )
    if step.alignment is not None and not rules.takes_alignment:
        takers = ", ".join(k for k in STEP_KINDS if step_kind(k).takes_alignment)
        raise ConfigError(
            f"'alignment' only applies to steps that apply an alignment ({takers} steps); {step.use!r} is "
            f"{article(kind)}: to read aligned models, name them as '<model>@<aligner step>' in 'models'",
            where=f"{where}, key 'alignment'",
        )


def _check_recording_needs(step: Step, activations: ActivationSpec, where: str) -> None:
    """Let a component that reads recordings refuse ``[activations]`` it cannot use, before anything is recorded."""
    check = getattr(step.component, "check_activations", None)
    if not callable(check):
        return
    try:
        check(activations)
    except ConfigError as exc:
        raise exc.located(where) from None
