"""What a pipeline is made of: its models, steps, tasks and recording options, and the
tables that declare them.

Each spec is built the way its pipeline-file table reads, from a component's registered
name and options (``Step("interpolation", models=["a", "b"], alphas=[0.5])``), or from
a component instance. Both ways go through the same table readers as a file, so a
misspelt option gets the same paragraph (with "Did you mean") wherever it was written.
:mod:`mergescope.pipeline` puts the specs together into a :class:`~mergescope.Pipeline`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from .devices import check_device_spec
from .errors import ConfigError, DuplicateComponentError, article, did_you_mean
from .kinds import KINDS, STEP_KINDS, step_kind
from .options import canonical_path, resolve_paths, structure_options, unstructure_options
from .plugins import Registry, get_registry
from .tasks import TaskHead
from .tokens import DEFAULT_TOKENS, check_tokens
from .training import Training

__all__ = [
    "ActivationSpec",
    "ModelSpec",
    "Step",
    "TaskSpec",
    "Model",
    "Task",
    "Data",
    "TaskHead",
    "component_from_table",
    "ALIGNED",
]

MODEL_KEYS = ("name", "use", "checkpoint", "checkpoint_key", "strip_prefix", "train", "train_data")
# The keys of [[models]] that say how a checkpoint is read (ModelSpec fields of the same names).
CHECKPOINT_OPTIONS = ("checkpoint_key", "strip_prefix")
STEP_KEYS = ("use", "name", "models", "layers", "alignment", "allow_unaligned", "data", "device")
TASK_KEYS = ("name", "use", "expert", "restrict", "models", "head", "validation")
HEAD_KEYS = ("templates", "classnames")
#: Separates a model from the aligner step that maps it onto its reference: ``"b@wm"``.
ALIGNED = "@"


def component_name(component: Any) -> str:
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
    tokens
        What token layers (transformer outputs ``(N, T, D)``) record: ``"mean"`` over
        tokens (default), ``"cls"``, the class token at position 0, or ``"all"``, every
        token as a ``(sample, unit, token)`` map (see :mod:`mergescope.tokens`).
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
    tokens: str = attrs.field(default=DEFAULT_TOKENS, validator=lambda _s, _a, value: check_tokens(value, where=None))
    batch_size: int = attrs.field(default=256, validator=attrs.validators.gt(0))
    chunk_size: int = attrs.field(default=4096, validator=attrs.validators.gt(0))
    topk: int = attrs.field(default=10, validator=attrs.validators.ge(0))


@attrs.define(init=False)
class ModelSpec:
    """One input model: an architecture plus a checkpoint, or training options.

    ``Model`` is the same class under the name a pipeline file's ``[[models]]`` reads
    like: ``Model("a", "torchvision", arch="resnet18", checkpoint="a.pt")``.

    Parameters
    ----------
    name
        How steps refer to the model.
    architecture
        An architecture component instance (e.g. ``MLP()``), or its registered name
        (``"torchvision"``) with its options as further keywords, checked as in a file.
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
    **options
        The architecture's options, when ``architecture`` is a name.

    With a name, ``train`` may be a table (``{"seed": 1, "epochs": 2}``) and
    ``train_data`` a dataset component or a table with ``use``, as in a file.

    Raises
    ------
    ConfigError
        An unknown name or option, or a bad value, named as a pipeline file's error
        names them (``Model (name = 'a') (use = 'mlp'), key 'widht': ... Did you mean
        'width'?``).
    """

    name: str
    architecture: Any = None
    checkpoint: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    train: Training | None = None
    train_data: Any | None = None
    module: Any = attrs.field(default=None, eq=False, repr=False)
    checkpoint_key: str | None = attrs.field(default=None, kw_only=True)
    strip_prefix: str | None = attrs.field(default=None, kw_only=True)

    def __init__(
        self,
        name: str,
        architecture: Any = None,
        checkpoint: str | Path | None = None,
        train: Training | Mapping[str, Any] | None = None,
        train_data: Any | None = None,
        module: Any = None,
        *,
        checkpoint_key: str | None = None,
        strip_prefix: str | None = None,
        **options: Any,
    ) -> None:
        if isinstance(architecture, str):
            table = {"name": name, "use": architecture, **options}
            given = {"checkpoint": checkpoint, "checkpoint_key": checkpoint_key, "strip_prefix": strip_prefix}
            table.update({k: str(v) if isinstance(v, Path) else v for k, v in given.items() if v is not None})
            # Tables are read as a file's are; instances (Training(...), Data(...)) are kept as they are.
            table.update(
                {k: dict(v) for k, v in (("train", train), ("train_data", train_data)) if isinstance(v, Mapping)}
            )
            spec = model_from_table(get_registry(), table, "Model", None)
            architecture, checkpoint = spec.architecture, spec.checkpoint
            train = spec.train if isinstance(train, Mapping) else train
            train_data = spec.train_data if isinstance(train_data, Mapping) else train_data
            if checkpoint is not None and train is not None:
                raise ConfigError(
                    "give either 'checkpoint' or 'train', not both", where=f"Model (name = {name!r}), key 'checkpoint'"
                )
        else:
            _refuse_options(options, MODEL_KEYS, "Model", name, architecture)
        # A table beside an instance is read as a file's [train] table.
        training: Training | None = (
            structure_table(Training, dict(train), f"Model (name = {name!r}), [train]")
            if isinstance(train, Mapping)
            else train
        )
        self.__attrs_init__(
            name,
            architecture,
            checkpoint,
            training,
            train_data,
            module,
            checkpoint_key=checkpoint_key,
            strip_prefix=strip_prefix,
        )


@attrs.define(init=False)
class Step:
    """One step: a component plus which models and layers it works on.

    Written as a pipeline file's ``[[steps]]`` table reads:
    ``Step("interpolation", models=["a", "b"], alphas=[0, 0.5, 1])``.

    Parameters
    ----------
    component
        A registered aligner, merger, metric, differ or visualizer: its name, with its
        options as further keywords (checked as in a file), or an instance.
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
    **options
        The component's options, when ``component`` is a name. ``data`` may then also
        be a table with ``use``.

    Raises
    ------
    ConfigError
        An unknown name or option, or a bad value, with the paragraph a pipeline file
        gets (``Step (use = 'interpolation'), key 'alphass': unknown option 'alphass'
        for merger 'interpolation'. Did you mean 'alphas'? ...``); options given
        beside a component instance.
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

    def __init__(
        self,
        component: Any,
        name: str | None = None,
        models: Sequence[str] | None = None,
        layers: Sequence[str] | None = None,
        alignment: str | None = None,
        allow_unaligned: bool = False,
        data: Any | None = None,
        device: str | None = None,
        **options: Any,
    ) -> None:
        if isinstance(component, str):
            keys = {"name": name, "models": models, "layers": layers, "alignment": alignment, "device": device}
            table = {"use": component, **options, **{k: _listed(v) for k, v in keys.items() if v is not None}}
            if allow_unaligned:
                table["allow_unaligned"] = allow_unaligned
            if isinstance(data, Mapping):
                table["data"] = dict(data)
            step = step_from_table(get_registry(), table, "Step")
            if data is not None and not isinstance(data, Mapping):
                check_own_data(get_registry().kind_of(type(step.component)), component, f"Step (use = {component!r})")
                step.data = data
            component, name, models, layers = step.component, step.name, step.models, step.layers
            alignment, allow_unaligned, data, device = step.alignment, step.allow_unaligned, step.data, step.device
        else:
            _refuse_options(options, STEP_KEYS, "Step", component_name(component), component)
        self.__attrs_init__(component, name, _listed(models), _listed(layers), alignment, allow_unaligned, data, device)

    @property
    def use(self) -> str:
        return component_name(self.component)


@attrs.define(init=False)
class TaskSpec:
    """A task every model is evaluated on after the steps (the table of multi-task merging).

    ``Task`` is the same class: ``Task("digits", "mnist5000", split="test", expert="a")``.

    Parameters
    ----------
    name
        The task's label in the results (coord ``task``).
    data
        A dataset component instance, or its registered name with its options as
        further keywords (checked as in a file): the task's evaluation images.
    expert
        The model trained for this task; accuracies are also reported relative to its
        accuracy (normalised accuracy, as in the task-merging literature).
    restrict
        Let only the classes present in the task's data compete (a task head carved out
        of a shared classifier).
    models
        Models (or merger steps) to evaluate; default: every model and merged model.
    head
        The task's zero-shot head: a :class:`~mergescope.tasks.TaskHead`, or a table
        ``{"templates": [...], "classnames": [...]}`` (class names default to the data's).
        Every model is scored with it swapped in for its own head (see
        :mod:`mergescope.tasks`); ``None``: the models' own outputs.
    validation
        The task's validation images: a dataset component, or a table (with ``use``, a
        dataset of its own; without, the task's dataset with these options changed, e.g.
        ``{"split": "validation"}``). Searches over merge coefficients choose on them.
    **options
        The dataset's options, when ``data`` is a name.
    """

    name: str
    data: Any
    expert: str | None = None
    restrict: bool = True
    models: list[str] | None = None
    head: TaskHead | None = None
    validation: Any | None = None

    def __init__(
        self,
        name: str,
        data: Any,
        expert: str | None = None,
        restrict: bool = True,
        models: Sequence[str] | None = None,
        head: TaskHead | Mapping[str, Any] | None = None,
        validation: Any | None = None,
        **options: Any,
    ) -> None:
        if isinstance(data, str):
            table = {"name": name, "use": data, "restrict": restrict, **options}
            table.update({k: _listed(v) for k, v in (("expert", expert), ("models", models)) if v is not None})
            if isinstance(head, Mapping):
                table["head"] = dict(head)
            if isinstance(validation, Mapping):
                table["validation"] = dict(validation)
            spec = task_from_table(get_registry(), table, "Task")
            data = spec.data
            head = spec.head if isinstance(head, Mapping) else head
            validation = spec.validation if isinstance(validation, Mapping) else validation
        else:
            _refuse_options(options, TASK_KEYS, "Task", name, data)
            where = f"Task (name = {name!r})"
            if isinstance(head, Mapping):
                head = head_from_table(dict(head), where)
            if isinstance(validation, Mapping):
                validation = validation_from_table(get_registry(), dict(validation), data, where, None)
        self.__attrs_init__(name, data, expert, restrict, _listed(models), head, validation)


#: The name a notebook writes ``[[models]]`` with: ``Model("a", "mlp", width=64)``.
Model = ModelSpec
#: The name a notebook writes ``[[tasks]]`` with: ``Task("digits", "mnist5000", split="test")``.
Task = TaskSpec


def Data(use: str, /, **options: Any) -> Any:  # noqa: N802 -- named as the [data] table it stands for
    """The dataset component ``use`` names, with ``options``: what a ``[data]`` table builds.

    ``Data("imagefolder", root="photos", split="test")`` is the component a
    ``[data]`` table with those keys builds, for :class:`Pipeline`'s ``data``, a
    model's ``train_data``, a step's ``data`` or a :class:`TaskSpec`.

    Raises
    ------
    ConfigError
        An unknown dataset (with the closest name) or option, or a bad value.
    """
    return build_component(get_registry(), "dataset", {"use": use, **options}, "Data")


def _listed(value: Any) -> Any:
    """A tuple (or other sequence) of names as the list a file would hold; anything else as it is."""
    return list(value) if isinstance(value, (tuple, range)) else value


def _refuse_options(options: Mapping[str, Any], accepted: tuple[str, ...], what: str, name: str, value: Any) -> None:
    """Keywords beside a component instance: options of the instance, or a misspelt key."""
    fields = {f.name for f in attrs.fields(type(value))} if attrs.has(type(value)) else set()
    accepted = tuple(k for k in accepted if k != "use")  # the instance stands for 'use'
    for key in options:
        where = f"{what} ({name!r}), key {key!r}"
        if key in fields:
            raise ConfigError(
                f"{key!r} is an option of the {type(value).__name__} instance given: set it on the instance "
                f"({type(value).__name__}({key}=...)), or give the component's name and its options here",
                where=where,
            )
        reject_unknown({key: options[key]}, accepted, what, f"{what} ({name!r})")


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
    return build_component(registry or get_registry(), kind, dict(table), where or f"{kind} table", reserved=keys)


# ----------------------------------------------------------------------- tables


def reject_unknown(table: Mapping[str, Any], accepted: tuple[str, ...], what: str, where: str) -> None:
    for key in table:
        if key not in accepted:
            hint = did_you_mean(key, accepted)
            raise ConfigError(
                f"unknown key {key!r} in {what}.{hint} Accepted keys: {', '.join(accepted)}.",
                where=f"{where}, key {key!r}",
            )


def as_table(value: Any, what: str, source: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a table, got {type(value).__name__}", where=source)
    return value


def structure_table(cls: type, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"expected a table, got {type(table).__name__}", where=where)
    try:
        return structure_options(cls, table, label=where.rsplit(", ", 1)[-1])
    except ConfigError as exc:
        raise exc.located(where) from exc


def build_component(
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


def model_from_table(registry: Registry, table: dict[str, Any], where: str, base_dir: Path | None) -> ModelSpec:
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("every model needs a 'name' (a string)", where=f"{where}, key 'name'")
    where = f"{where} (name = {name!r})"
    architecture = build_component(registry, "architecture", table, where, reserved=MODEL_KEYS, base_dir=base_dir)
    train = None
    if "train" in table:
        train = structure_table(Training, table["train"], f"{where}, [train]")
    train_data = None
    if "train_data" in table:
        train_data = build_component(
            registry,
            "dataset",
            as_table(table["train_data"], "train_data", where),
            f"{where}, [train_data]",
            base_dir=base_dir,
        )
    checkpoint = table.get("checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise ConfigError("'checkpoint' must be a file path (a string)", where=f"{where}, key 'checkpoint'")
    if checkpoint is not None and train is not None:
        raise ConfigError("give either 'checkpoint' or a [train] table, not both", where=f"{where}, key 'checkpoint'")
    for key in CHECKPOINT_OPTIONS:
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
    check_checkpoint_options(spec, where)
    return spec


def check_checkpoint_options(spec: ModelSpec, where: str) -> None:
    """``checkpoint_key`` and ``strip_prefix`` say how a checkpoint is read: refuse them without one, or empty."""
    for key in CHECKPOINT_OPTIONS:
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


def task_from_table(registry: Registry, table: dict[str, Any], where: str, base_dir: Path | None = None) -> TaskSpec:
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("every task needs a 'name' (a string)", where=f"{where}, key 'name'")
    where = f"{where} (name = {name!r})"
    data = build_component(registry, "dataset", table, where, reserved=TASK_KEYS, base_dir=base_dir)
    expert, restrict, models = table.get("expert"), table.get("restrict", True), table.get("models")
    if expert is not None and not isinstance(expert, str):
        raise ConfigError(f"'expert' must be a model name, got {expert!r}", where=f"{where}, key 'expert'")
    if not isinstance(restrict, bool):
        raise ConfigError(f"'restrict' must be true or false, got {restrict!r}", where=f"{where}, key 'restrict'")
    if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
        raise ConfigError(f"'models' must be a list of model names, got {models!r}", where=f"{where}, key 'models'")
    head = head_from_table(table["head"], where, base_dir) if "head" in table else None
    validation = None
    if "validation" in table:
        validation = validation_from_table(registry, table["validation"], data, where, base_dir)
    return TaskSpec(name, data, expert, restrict, models, head, validation)


def _names_or_file(value: Any, key: str, where: str, base_dir: Path | None) -> Any:
    """A list as it is; a string is a text file (relative to the pipeline file) holding one entry a line."""
    if not isinstance(value, str):
        return value
    path = canonical_path(value, base_dir if base_dir is not None else Path.cwd())
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(
            f"{key!r} is a list or a text file with one entry a line; cannot read {str(path)!r}: {exc.strerror}",
            where=f"{where}, key {key!r}",
        ) from exc
    return [line.strip() for line in lines if line.strip()]


def head_from_table(table: Any, where: str, base_dir: Path | None = None) -> TaskHead:
    """A task's ``head`` table: ``templates`` and, optionally, ``classnames`` (lists, or text files)."""
    where = f"{where}, [head]"
    if not isinstance(table, Mapping):
        raise ConfigError(
            "'head' must be a table: head = { templates = ['a photo of a {}.'], classnames = [...] }", where=where
        )
    reject_unknown(table, HEAD_KEYS, "a task's head", where)
    if "templates" not in table:
        raise ConfigError(
            "a head needs its prompt templates: templates = ['a photo of a {}.', ...]",
            where=f"{where}, key 'templates'",
        )
    values = {k: _names_or_file(table[k], k, where, base_dir) for k in HEAD_KEYS if k in table}
    try:
        return TaskHead(**values)
    except ConfigError as exc:
        raise ConfigError(exc.message, where=f"{where}, key {(exc.where or '').rsplit('key ', 1)[-1]}") from None


def validation_from_table(registry: Registry, table: Any, data: Any, where: str, base_dir: Path | None) -> Any:
    """A task's ``validation`` table: a dataset of its own (with ``use``), or the task's with options changed."""
    where = f"{where}, [validation]"
    if not isinstance(table, Mapping):
        raise ConfigError(
            "'validation' must be a table: a dataset (validation = { use = ..., split = 'validation' }) or the "
            "task's dataset with some options changed (validation = { split = 'validation' })",
            where=where,
        )
    if "use" not in table:  # the task's own dataset, with these options in place of its own
        table = {"use": type(data).name, **unstructure_options(data), **table}
    return build_component(registry, "dataset", dict(table), where, base_dir=base_dir)


def check_own_data(kind: str, use: str, where: str) -> None:
    if not step_kind(kind).takes_own_data:
        takers = " and ".join(k for k in STEP_KINDS if step_kind(k).takes_own_data)
        raise ConfigError(
            f"only {takers} steps take their own 'data'; {use!r} is {article(kind)} and reads "
            "the recordings made on the pipeline's [data]",
            where=f"{where}, key 'data'",
        )


def step_from_table(registry: Registry, table: dict[str, Any], where: str, base_dir: Path | None = None) -> Step:
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
        hint = did_you_mean(use, known)
        raise ConfigError(
            f"unknown component {use!r}.{hint} Known step components: {', '.join(known)}.",
            where=f"{where}, key 'use'",
        )
    component = build_component(registry, kind, table, where, reserved=STEP_KEYS, base_dir=base_dir)
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
        check_own_data(kind, use, where)  # before the table, whose errors would be beside the point
        fields["data"] = build_component(
            registry, "dataset", as_table(table["data"], "data", where), f"{where}, [data]", base_dir=base_dir
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
