"""Tasks: every model scored on several tasks, each with its own data and, optionally, its own head.

A pipeline's ``[[tasks]]`` make the table of multi-task merging: the accuracy of every
model and merge on every task, averaged over tasks and normalised by each task's
expert. Two things a task may add to its data:

A head of its own (:class:`TaskHead`)
    Class names and prompt templates: the task is scored with a zero-shot head built from
    them and swapped in for the model's own, as the CLIP task-vector protocol does
    (Ilharco et al. 2023, Editing Models with Task Arithmetic: one frozen head per
    dataset, from the text tower). A model scored so defines, on its module, the context
    manager ``task_head(classnames, templates)``, under which its outputs are the scores
    of those classes (``open-clip-image`` does); it may define ``head_key``, a string
    naming where its heads come from, part of the cache key of the table. A task
    without a head scores the model's own outputs, as always.
Validation data (:class:`ValidationTask`)
    Images of the task held out from the table's: a step's context lists the tasks
    that give them (:attr:`mergescope.context.Context.tasks`), and a search over merge
    coefficients (:func:`mergescope.task_vectors.search_scaling`) chooses on them, each
    task with its head, as the papers choose their scaling.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import xarray as xr
from torch import nn

from .errors import ConfigError
from .keys import cache_key
from .storage import load_tree, save_tree
from .values import DatasetSource, Evaluation, ImageDataset, evaluate

__all__ = [
    "TaskHead",
    "ValidationTask",
    "check_templates",
    "task_head",
    "task_classes",
    "evaluate_on_task",
    "task_table",
    "evaluate_tasks",
]

log = logging.getLogger("mergescope")

#: How a task's evaluation is run: ``evaluate(what, module, data, classes)``, where
#: ``classes`` are those that compete (``None``: all).
Evaluator = Callable[[str, nn.Module, ImageDataset, "list[int] | None"], Evaluation]


def check_templates(templates: Any, where: str) -> list[str]:
    """``templates`` as a list of prompt templates, each holding ``{}`` where the class name goes.

    Raises
    ------
    ConfigError
        Not a non-empty list of strings, or a template without ``{}``.
    """
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise ConfigError(
            f"'templates' must be a non-empty list of prompt templates such as 'a photo of a {{}}.', got {templates!r}",
            where=where,
        )
    for template in templates:
        if "{}" not in template:
            raise ConfigError(
                f"the prompt template {template!r} has no '{{}}' for the class name: write it as 'a photo of a {{}}.'",
                where=where,
            )
    return list(templates)


def _check_classnames(value: Any, where: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c.strip() for c in value):
        raise ConfigError(
            f"'classnames' must be a non-empty list of class names (one per class of the task's data), got {value!r}",
            where=where,
        )
    return list(value)


@attrs.frozen
class TaskHead:
    """A task's zero-shot head: its class names and the prompt templates they go into.

    Parameters
    ----------
    templates
        Prompt templates, each with ``{}`` where a class name goes (``"a photo of a {}."``).
    classnames
        One name per class of the task's data, in the order of its labels; default: the
        data's own class names.
    """

    templates: list[str] = attrs.field(converter=lambda v: check_templates(v, "[[tasks]] head, key 'templates'"))
    classnames: list[str] | None = attrs.field(
        default=None, converter=lambda v: _check_classnames(v, "[[tasks]] head, key 'classnames'")
    )

    def names(self, data: ImageDataset, where: str = "head") -> list[str]:
        """The class names of the head for ``data``: one per class of ``data``, in its label order.

        Raises
        ------
        ConfigError
            ``classnames`` has another length than ``data`` has classes.
        """
        if self.classnames is None:
            return [str(c) for c in data.classes]
        if len(self.classnames) != len(data.classes):
            raise ConfigError(
                f"the head names {len(self.classnames)} classes but the task's data {data.name!r} has "
                f"{len(data.classes)} ({', '.join(map(str, list(data.classes)[:5]))}, ...): give one name per "
                "class, in the order of the data's labels",
                where=f"{where}, key 'classnames'",
            )
        return list(self.classnames)

    def to_table(self) -> dict[str, Any]:
        """The head as a pipeline file's ``head`` table."""
        table: dict[str, Any] = {"templates": list(self.templates)}
        if self.classnames is not None:
            table["classnames"] = list(self.classnames)
        return table


@contextlib.contextmanager
def task_head(module: nn.Module, head: TaskHead | None, data: ImageDataset, where: str = "task") -> Iterator[None]:
    """``module`` with the head of a task swapped in for its own (nothing changes without a head).

    Raises
    ------
    ConfigError
        The module cannot build a head from class names and templates (it has no
        ``task_head`` method), or the head's class names do not fit ``data``.
    """
    if head is None:
        yield
        return
    swap = getattr(module, "task_head", None)
    if not callable(swap):
        raise ConfigError(
            f"the task gives a zero-shot head (class names and prompt templates), but a {type(module).__name__} "
            "cannot build one: heads of class names need a model with a text tower, such as an "
            "'open-clip-image' architecture. Leave 'head' out to score the model's own outputs",
            where=f"{where}, key 'head'",
        )
    with swap(head.names(data, where), list(head.templates)):
        yield


def task_classes(data: ImageDataset, restrict: bool) -> list[int] | None:
    """The classes that compete on a task: those present in its data when ``restrict``, else all."""
    return np.unique(np.asarray(data.labels)).tolist() if restrict else None


def evaluate_on_task(
    module: nn.Module,
    data: ImageDataset,
    head: TaskHead | None,
    restrict: bool,
    batch_size: int,
    where: str = "task",
) -> Evaluation:
    """Loss and accuracy of ``module`` on a task's ``data``, with the task's head and classes."""
    with task_head(module, head, data, where):
        return evaluate(module, data, batch_size, task_classes(data, restrict))


@attrs.define(eq=False)
class ValidationTask:
    """A task's validation data, as a step's context knows it: what a coefficient search chooses on.

    Parameters
    ----------
    name
        The task's name.
    source
        The dataset component of its validation images.
    head
        Its head, or ``None`` for the model's own outputs.
    restrict
        Only the classes present in the data compete.
    expert
        The name of the task's expert, whose validation accuracy normalises the task's.
    expert_module
        Gives the expert's module when it exists (``None`` otherwise); set by the runner.
    """

    name: str
    source: DatasetSource
    head: TaskHead | None = None
    restrict: bool = True
    expert: str | None = None
    expert_module: Callable[[], nn.Module | None] | None = attrs.field(default=None, repr=False)
    _data: ImageDataset | None = attrs.field(default=None, init=False, repr=False)
    _reference: dict[str, float] = attrs.field(factory=dict, init=False, repr=False)

    @property
    def where(self) -> str:
        return f"[[tasks]] (name = {self.name!r}), [validation]"

    def load(self) -> ImageDataset:
        """The validation images (loaded once)."""
        if self._data is None:
            self._data = self.source.load()
        return self._data

    def reference_accuracy(self, evaluate_module: Callable[[nn.Module], Evaluation]) -> float | None:
        """The expert's validation accuracy (measured once), or ``None`` without an expert at hand."""
        module = self.expert_module() if self.expert_module is not None else None
        if module is None:
            return None
        if "accuracy" not in self._reference:
            self._reference["accuracy"] = float(evaluate_module(module).accuracy)
        return self._reference["accuracy"]


def task_table(
    models: Sequence[str],
    tasks: Sequence[str],
    experts: Sequence[str | None],
    accuracy: np.ndarray,
    loss: np.ndarray,
) -> xr.Dataset:
    """The table of a multi-task evaluation: accuracy and loss per model and task, averages, normalised accuracy.

    ``normalized_accuracy`` is each accuracy divided by the task's expert's (NaN for a task
    without an expert); ``average_normalized_accuracy`` its mean over tasks; both only
    when some task names an expert. ``average_accuracy`` is the mean over tasks.
    """
    ds = xr.Dataset(
        {"accuracy": (("model", "task"), accuracy), "loss": (("model", "task"), loss)},
        coords={"model": list(models), "task": list(tasks)},
    )
    index = [list(models).index(e) if e else -1 for e in experts]
    if any(i >= 0 for i in index):
        reference = np.array([accuracy[i, j] if i >= 0 else np.nan for j, i in enumerate(index)])
        ds["normalized_accuracy"] = ds["accuracy"] / xr.DataArray(reference, dims="task")
        ds["average_normalized_accuracy"] = ds["normalized_accuracy"].mean("task")
    ds["average_accuracy"] = ds["accuracy"].mean("task")
    return ds


def _task_key(task: Any) -> list[Any]:
    """What of a task its scores depend on; a task without a head or validation keys as it always did."""
    key = [task.name, task.data, task.expert, task.restrict, task.models]
    if getattr(task, "head", None) is not None:
        key.append({"head": task.head.to_table()})
    return key


def evaluate_tasks(
    tasks: Sequence[Any],
    models: Mapping[str, tuple[nn.Module, str]],
    evaluate_model: Evaluator,
    directory: Path,
    *,
    force: bool = False,
    key_parts: Sequence[Any] = (),
) -> xr.Dataset:
    """Score every model on every task (each with its head and classes), cached in ``directory``.

    Parameters
    ----------
    tasks
        The pipeline's task specs (``name``, ``data``, ``expert``, ``restrict``, ``models``, ``head``).
    models
        ``name -> (module, fingerprint)`` of every declared and merged model.
    evaluate_model
        Runs one evaluation (at the run's device and precision); see :data:`Evaluator`.
    directory
        Where the table is cached, as ``tasks-<key>/result.nc``.
    force
        Evaluate again even when the table is cached.
    key_parts
        More of the key (the precision, say).

    Returns
    -------
    xarray.Dataset
        :func:`task_table` of the scores.
    """
    names = list(models)
    heads = [getattr(models[m][0], "head_key", None) for m in names] if any(_has_head(t) for t in tasks) else []
    parts: list[Any] = [[models[m][1] for m in names], [_task_key(t) for t in tasks]]
    if any(isinstance(h, str) for h in heads):  # where the heads come from (a text tower's weights)
        parts.append({"heads": [h if isinstance(h, str) else None for h in heads]})
    key = cache_key(*parts, *key_parts)
    path = directory / f"tasks-{key[:16]}" / "result.nc"
    if path.exists() and not force:
        log.info("tasks: done before, loaded from %s", path.parent)
        return load_tree(path).to_dataset()
    accuracy = np.full((len(names), len(tasks)), np.nan)
    loss = np.full_like(accuracy, np.nan)
    for j, task in enumerate(tasks):
        data = task.data.load()
        classes = task_classes(data, task.restrict)
        where = f"[[tasks]] #{j + 1} (name = {task.name!r})"
        for i, m in enumerate(names):
            if task.models is not None and m not in task.models:
                continue
            with task_head(models[m][0], getattr(task, "head", None), data, where):
                result = evaluate_model(f"evaluating {m!r} on task {task.name!r}", models[m][0], data, classes)
            accuracy[i, j], loss[i, j] = result.accuracy, result.loss
    ds = task_table(names, [t.name for t in tasks], [t.expert for t in tasks], accuracy, loss)
    save_tree(xr.DataTree(ds), path)
    return ds


def _has_head(task: Any) -> bool:
    return getattr(task, "head", None) is not None
