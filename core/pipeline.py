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

import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from .claims import CLAIMS_GROUP, Claim, check_steps, claims_to_tables, parse_claims
from .devices import check_device_spec, check_precision
from .errors import ConfigError, DuplicateComponentError, article, closest
from .kinds import KINDS, STEP_KINDS, StepKind, step_kind
from .loading import LoaderOptions
from .options import canonical_path, resolve_paths, structure_options, unstructure_options
from .plugins import Registry, get_registry
from .training import Training
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
    "Pipeline",
    "load_pipeline",
    "component_from_table",
    "STEP_KINDS",
]

_TOP_KEYS = ("seed", "device", "precision", "data", "activations", "loader", "models", "steps", "tasks", "claims")
_MODEL_KEYS = ("name", "use", "checkpoint", "checkpoint_key", "strip_prefix", "train", "train_data")
# The keys of [[models]] that say how a checkpoint is read (ModelSpec fields of the same names).
_CHECKPOINT_OPTIONS = ("checkpoint_key", "strip_prefix")
_STEP_KEYS = ("use", "name", "models", "layers", "alignment", "allow_unaligned", "data", "device")
# Model and step names become netCDF group names and are joined with "@" and "/".
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
#: Separates a model from the aligner step that maps it onto its reference: ``"b@wm"``.
ALIGNED = "@"
_TASK_KEYS = ("name", "use", "expert", "restrict", "models")


def _name_of(component: Any) -> str:
    return type(component).name


@attrs.define
class ActivationSpec:
    """How activations are recorded for the steps that need them.

    Parameters
    ----------
    layers
        Default layers for steps that do not name their own.
    reduce
        ``"mean"`` or ``"max"`` over the spatial positions of conv maps, ``"none"`` for full maps.
    batch_size
        Images per forward pass (collection and evaluation).
    chunk_size
        Samples written (and checkpointed) at a time while recording.
    topk
        Top-k samples kept per unit while recording.

    An ``[activations]`` table may also hold ``workers``, the older spelling of
    ``[loader] workers`` (see :class:`~mergescope.loading.LoaderOptions`).
    """

    layers: list[str] = attrs.field(factory=list)
    reduce: str = attrs.field(default="mean", validator=attrs.validators.in_(("mean", "max", "none")))
    batch_size: int = attrs.field(default=256, validator=attrs.validators.gt(0))
    chunk_size: int = attrs.field(default=4096, validator=attrs.validators.gt(0))
    topk: int = attrs.field(default=10, validator=attrs.validators.ge(0))


@attrs.define
class ModelSpec:
    """One input model: an architecture plus a checkpoint, or training options.

    Parameters
    ----------
    name
        How steps refer to the model.
    architecture
        An architecture component instance (e.g. ``MLP()``).
    checkpoint
        A state-dict file; when ``None`` the model is trained here (cached) with ``train``.
    train
        Training options; defaults apply when neither ``checkpoint`` nor ``train`` is given.
    train_data
        Dataset component to train on; default: the pipeline's data with ``split = "train"``.
    module
        Any ``nn.Module`` given directly from Python (then ``architecture`` may be ``None``
        and nothing is trained or loaded). Such a pipeline cannot be written as TOML.
    checkpoint_key
        The entry of a saved dict that holds the weights, dotted for nesting (``"model"``,
        ``"model_ema"``); default: found in the common layouts (see
        :func:`mergescope.checkpoints.load_state_dict`). Only with ``checkpoint``.
    strip_prefix
        A prefix removed from the checkpoint's keys (``"module."``, ``"model."``); keys
        without it are left out. Only with ``checkpoint``.
    """

    name: str
    architecture: Any = None
    checkpoint: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    train: Training | None = None
    train_data: Any | None = None
    module: Any = attrs.field(default=None, eq=False, repr=False)
    checkpoint_key: str | None = attrs.field(default=None, kw_only=True)
    strip_prefix: str | None = attrs.field(default=None, kw_only=True)


@attrs.define
class Step:
    """One step: a component instance plus which models and layers it works on.

    Parameters
    ----------
    component
        An instance of a registered aligner, merger, metric, differ or visualizer.
    name
        The step's group in ``results.nc`` (and, for mergers, the merged model's name).
        Defaults to the component name, suffixed with the step number when repeated.
    models
        Model (or merger step) names; default: every declared model. The first is the
        reference for metrics and aligners. ``"b@wm"`` is model ``b`` mapped onto the
        reference of the aligner step ``wm`` (its units permuted or transformed into the
        reference's order): how metrics and top-k grids see aligned models.
    layers
        Layers for metrics and differs; default: ``[activations] layers``.
    alignment
        Name of an aligner step whose alignment a merger applies.
    allow_unaligned
        Let a metric compare two declared models unit by unit without an alignment
        (their units already correspond, e.g. fine-tunes of one base).
    data
        A dataset component an aligner or merger step works on instead of the
        pipeline's ``[data]``: the images it records statistics on, recomputes
        BatchNorm with and evaluates on (e.g. the models' own task, while the feature
        views look at other images).
    device
        Where this step runs, instead of the pipeline's ``device`` (``"cpu"``,
        ``"cuda"``, ``"cuda:N"``, ``"mps"``, ``"auto"``): its models are moved there for
        the step and its context's ``device`` is that device. Resolved when the run
        starts (see :func:`mergescope.devices.resolve_device`); not part of the step's key.
    """

    component: Any
    name: str | None = None
    models: list[str] | None = None
    layers: list[str] | None = None
    alignment: str | None = None
    allow_unaligned: bool = False
    data: Any | None = None
    device: str | None = attrs.field(
        default=None, validator=lambda _i, _a, v: v is None or bool(check_device_spec(v, where="key 'device'"))
    )

    @property
    def use(self) -> str:
        return _name_of(self.component)


@attrs.define
class TaskSpec:
    """A task every model is evaluated on after the steps (the table of multi-task merging).

    Parameters
    ----------
    name
        The task's label in the results (coord ``task``).
    data
        A dataset component instance: the task's evaluation images.
    expert
        The model trained for this task; accuracies are also reported relative to its
        accuracy (normalised accuracy, as in the task-merging literature).
    restrict
        Let only the classes present in the task's data compete (a task head carved out
        of a shared classifier).
    models
        Models (or merger steps) to evaluate; default: every model and merged model.
    """

    name: str
    data: Any
    expert: str | None = None
    restrict: bool = True
    models: list[str] | None = None


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
        _reject_unknown(raw, _TOP_KEYS, "the top level", source)
        data = None
        if "data" in raw:
            data = _component(
                registry, "dataset", _table(raw["data"], "[data]", source), f"{source}, [data]", base_dir=base_dir
            )
        activations_table = _table(raw.get("activations", {}), "[activations]", source)
        loader = _loader(raw.get("loader", {}), activations_table, source)
        activations = _structure(
            ActivationSpec, {k: v for k, v in activations_table.items() if k != "workers"}, f"{source}, [activations]"
        )
        models = [
            _model(registry, _table(m, f"[[models]] #{i + 1}", source), f"{source}, [[models]] #{i + 1}", base_dir)
            for i, m in enumerate(_list(raw.get("models", []), "models", source))
        ]
        steps = [
            _step(registry, _table(s, f"[[steps]] #{i + 1}", source), f"{source}, [[steps]] #{i + 1}", base_dir)
            for i, s in enumerate(_list(raw.get("steps", []), "steps", source))
        ]
        tasks = [
            _task(registry, _table(t, f"[[tasks]] #{i + 1}", source), f"{source}, [[tasks]] #{i + 1}", base_dir)
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
            out["data"] = {"use": _name_of(self.data), **unstructure_options(self.data)}
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
            table: dict[str, Any] = {"name": m.name, "use": _name_of(m.architecture)}
            table.update(unstructure_options(m.architecture))
            if m.checkpoint is not None:
                table["checkpoint"] = str(m.checkpoint)
            for key in _CHECKPOINT_OPTIONS:
                if getattr(m, key) is not None:
                    table[key] = getattr(m, key)
            if m.train is not None:
                table["train"] = unstructure_options(m.train)
            if m.train_data is not None:
                table["train_data"] = {"use": _name_of(m.train_data), **unstructure_options(m.train_data)}
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
                table["data"] = {"use": _name_of(s.data), **unstructure_options(s.data)}
            out["steps"].append(table)
        if self.tasks:
            out["tasks"] = []
        for t in self.tasks:
            table = {"name": t.name, "use": _name_of(t.data), **unstructure_options(t.data), "restrict": t.restrict}
            if t.expert is not None:
                table["expert"] = t.expert
            if t.models is not None:
                table["models"] = t.models
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
        tasks = [attrs.evolve(t, data=fix(t.data)) for t in self.tasks]
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
            _check_checkpoint_options(spec, where)
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
                _check_own_data(kind, step.use, where)
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
                    guess = closest(model, available)
                    hint = f" Did you mean {guess!r}?" if guess else ""
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
                        guess = closest(ref, available)
                        hint = f" Did you mean {guess!r}?" if guess else ""
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


def component_from_table(
    kind: str,
    table: Mapping[str, Any],
    where: str | None = None,
    reserved: Sequence[str] = ("use",),
    registry: Registry | None = None,
) -> Any:
    """Build the component a TOML table names, exactly as a pipeline builds ``[data]`` or a step.

    ``table["use"]`` names a registered component of ``kind``; every other key except
    ``reserved`` is one of its options. Components that hold other components as
    tables (a dataset made of other datasets, say) build them with this.

    Parameters
    ----------
    kind
        A component kind: ``"dataset"``, ``"metric"``, ... (see :data:`mergescope.KINDS`).
    table
        The table, e.g. ``{"use": "foolbox-samples", "source": "cifar10"}``.
    where
        Where the table was found, prefixed to error locations (default: ``"<kind> table"``).
    reserved
        Keys of the table that are not options of the component; ``"use"`` is always one.
    registry
        Where to look the name up; default: :func:`mergescope.get_registry`.

    Returns
    -------
    Any
        An instance of the component class, its options validated.

    Raises
    ------
    ConfigError
        ``use`` is missing or not a string, names no loaded component of ``kind``
        (:class:`~mergescope.UnknownComponentError`: the known names and the closest), or
        an option is unknown or has a bad value; the message names the key.
    DuplicateComponentError
        Two loaded plugins register the name for ``kind``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; kinds: {', '.join(KINDS)}")
    if not isinstance(table, Mapping):
        raise ConfigError(
            f"expected a table naming {article(kind)} with 'use', got {type(table).__name__} {table!r}", where=where
        )
    keys = ("use", *(k for k in reserved if k != "use"))
    return _component(registry or get_registry(), kind, dict(table), where or f"{kind} table", reserved=keys)


# ----------------------------------------------------------------------- helpers


def _reject_unknown(table: Mapping[str, Any], accepted: tuple[str, ...], what: str, where: str) -> None:
    for key in table:
        if key not in accepted:
            guess = closest(key, accepted)
            hint = f" Did you mean {guess!r}?" if guess else ""
            raise ConfigError(
                f"unknown key {key!r} in {what}.{hint} Accepted keys: {', '.join(accepted)}.",
                where=f"{where}, key {key!r}",
            )


def _table(value: Any, what: str, source: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a table, got {type(value).__name__}", where=source)
    return value


def _list(value: Any, key: str, source: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"'{key}' must be an array of tables ([[{key}]])", where=f"{source}, key {key!r}")
    return value


def _loader(table: Any, activations: Mapping[str, Any], source: str) -> LoaderOptions:
    """The ``[loader]`` table; ``[activations] workers`` is its older spelling of ``workers``."""
    table = dict(_table(table, "[loader]", source))
    _reject_unknown(table, tuple(f.name for f in attrs.fields(LoaderOptions)), "[loader]", f"{source}, [loader]")
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


def _structure(cls: type, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"expected a table, got {type(table).__name__}", where=where)
    try:
        return structure_options(cls, table, label=where.rsplit(", ", 1)[-1])
    except ConfigError as exc:
        raise exc.located(where) from exc


def _component(
    registry: Registry,
    kind: str,
    table: dict[str, Any],
    where: str,
    reserved: tuple[str, ...] = ("use",),
    base_dir: Path | None = None,
):
    """Instantiate the component a table names with ``use``, from the table's other keys."""
    use = table.get("use")
    if not isinstance(use, str):
        names = ", ".join(registry.names(kind))
        raise ConfigError(f"missing 'use = \"<{kind} name>\"'; known {kind}s: {names}", where=f"{where}, key 'use'")
    try:
        cls = registry.get(kind, use)
    except ConfigError as exc:
        raise exc.located(f"{where}, key 'use'") from exc
    except DuplicateComponentError as exc:
        raise DuplicateComponentError(f"{where}, key 'use': {exc}") from exc
    options = {k: v for k, v in table.items() if k not in reserved}
    try:
        component: object = structure_options(cls, options, label=f"{kind} {use!r}", reserved=reserved)
    except ConfigError as exc:
        raise exc.located(f"{where} (use = {use!r})") from exc
    # Relative paths in a pipeline file mean relative to that file, wherever it is run from.
    return component if base_dir is None else resolve_paths(component, base_dir, registry.get)


def _model(registry: Registry, table: dict[str, Any], where: str, base_dir: Path | None) -> ModelSpec:
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("every model needs a 'name' (a string)", where=f"{where}, key 'name'")
    where = f"{where} (name = {name!r})"
    architecture = _component(registry, "architecture", table, where, reserved=_MODEL_KEYS, base_dir=base_dir)
    train = None
    if "train" in table:
        train = _structure(Training, table["train"], f"{where}, [train]")
    train_data = None
    if "train_data" in table:
        train_data = _component(
            registry,
            "dataset",
            _table(table["train_data"], "train_data", where),
            f"{where}, [train_data]",
            base_dir=base_dir,
        )
    checkpoint = table.get("checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise ConfigError("'checkpoint' must be a file path (a string)", where=f"{where}, key 'checkpoint'")
    if checkpoint is not None and train is not None:
        raise ConfigError("give either 'checkpoint' or a [train] table, not both", where=f"{where}, key 'checkpoint'")
    for key in _CHECKPOINT_OPTIONS:
        if key in table and not isinstance(table[key], str):
            raise ConfigError(f"{key!r} must be a string, got {table[key]!r}", where=f"{where}, key {key!r}")
    if checkpoint is not None and base_dir is not None:  # one canonical spelling, from any working directory
        checkpoint = str(canonical_path(checkpoint, base_dir))
    spec = ModelSpec(
        name,
        architecture,
        checkpoint,
        train,
        train_data,
        checkpoint_key=table.get("checkpoint_key"),
        strip_prefix=table.get("strip_prefix"),
    )
    _check_checkpoint_options(spec, where)
    return spec


def _check_checkpoint_options(spec: ModelSpec, where: str) -> None:
    """``checkpoint_key`` and ``strip_prefix`` say how a checkpoint is read: refuse them without one, or empty."""
    for key in _CHECKPOINT_OPTIONS:
        value = getattr(spec, key)
        if value is None:
            continue
        if spec.checkpoint is None:
            raise ConfigError(
                f"{key!r} says how a checkpoint is read, and model {spec.name!r} has no 'checkpoint'",
                where=f"{where}, key {key!r}",
            )
        if not isinstance(value, str) or not value.strip("."):
            raise ConfigError(
                f"{key!r} must be a non-empty string such as {'model' if key == 'checkpoint_key' else 'module.'!r}, "
                f"got {value!r}",
                where=f"{where}, key {key!r}",
            )


def _task(registry: Registry, table: dict[str, Any], where: str, base_dir: Path | None = None) -> TaskSpec:
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("every task needs a 'name' (a string)", where=f"{where}, key 'name'")
    where = f"{where} (name = {name!r})"
    data = _component(registry, "dataset", table, where, reserved=_TASK_KEYS, base_dir=base_dir)
    expert, restrict, models = table.get("expert"), table.get("restrict", True), table.get("models")
    if expert is not None and not isinstance(expert, str):
        raise ConfigError(f"'expert' must be a model name, got {expert!r}", where=f"{where}, key 'expert'")
    if not isinstance(restrict, bool):
        raise ConfigError(f"'restrict' must be true or false, got {restrict!r}", where=f"{where}, key 'restrict'")
    if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
        raise ConfigError(f"'models' must be a list of model names, got {models!r}", where=f"{where}, key 'models'")
    return TaskSpec(name, data, expert, restrict, models)


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


def _check_own_data(kind: str, use: str, where: str) -> None:
    if not step_kind(kind).takes_own_data:
        takers = " and ".join(k for k in STEP_KINDS if step_kind(k).takes_own_data)
        raise ConfigError(
            f"only {takers} steps take their own 'data'; {use!r} is {article(kind)} and reads "
            "the recordings made on the pipeline's [data]",
            where=f"{where}, key 'data'",
        )


def _step(registry: Registry, table: dict[str, Any], where: str, base_dir: Path | None = None) -> Step:
    use = table.get("use")
    if not isinstance(use, str):
        raise ConfigError("every step needs 'use = \"<component name>\"'", where=f"{where}, key 'use'")
    kinds = [k for k in STEP_KINDS if use in registry.names(k)]
    if len(kinds) > 1:
        raise ConfigError(
            f"{use!r} names components of several kinds ({', '.join(kinds)}); block one of their plugins",
            where=f"{where}, key 'use'",
        )
    kind = kinds[0] if kinds else None
    if kind is None:
        known = sorted({n for k in STEP_KINDS for n in registry.names(k)})
        guess = closest(use, known)
        hint = f" Did you mean {guess!r}?" if guess else ""
        raise ConfigError(
            f"unknown component {use!r}.{hint} Known step components: {', '.join(known)}.",
            where=f"{where}, key 'use'",
        )
    component = _component(registry, kind, table, where, reserved=_STEP_KEYS, base_dir=base_dir)
    where = f"{where} (use = {use!r})"
    fields: dict[str, Any] = {}
    if "allow_unaligned" in table:
        if not isinstance(table["allow_unaligned"], bool):
            raise ConfigError(
                f"'allow_unaligned' must be true or false, got {table['allow_unaligned']!r}",
                where=f"{where}, key 'allow_unaligned'",
            )
        fields["allow_unaligned"] = table["allow_unaligned"]
    if "device" in table:
        fields["device"] = check_device_spec(table["device"], where=f"{where}, key 'device'")
    if "data" in table:
        _check_own_data(kind, use, where)  # before the table, whose errors would be beside the point
        fields["data"] = _component(
            registry, "dataset", _table(table["data"], "data", where), f"{where}, [data]", base_dir=base_dir
        )
    for key, expected in (("name", str), ("alignment", str), ("models", list), ("layers", list)):
        value = table.get(key)
        if value is None:
            continue
        if not isinstance(value, expected) or (expected is list and not all(isinstance(v, str) for v in value)):
            kind_text = "a string" if expected is str else "a list of strings"
            raise ConfigError(f"'{key}' must be {kind_text}, got {value!r}", where=f"{where}, key {key!r}")
        fields[key] = value
    return Step(component, **fields)
