"""Task vectors: the shared arithmetic of task-vector mergers (task arithmetic, TIES, PCB).

A *task vector* is what fine-tuning added to a pre-trained model: ``tau_i = theta_i -
theta_base`` (Ilharco et al. 2023, Editing Models with Task Arithmetic). Task-vector
mergers combine the ``tau_i`` of several fine-tunes of **one** base model and add the
result back to the base. Given anything else (raw weights, or independently trained
networks whose "task vectors" are as large as the weights themselves) they compute
meaningless numbers without complaint, so every such merger calls
:func:`check_finetuned` first.

Which entries of a state dict are merged
----------------------------------------
- Floating parameters and floating buffers form the task vectors.
- BatchNorm running means and variances are statistics of the data, not learned
  weights: trimming or sign-electing them has no meaning. They are averaged over the
  fine-tuned models, and recomputed on the pipeline's data when a merger's
  ``reset_batchnorm`` option is on and there is data (see
  :func:`mergescope.batchnorm.reset_batchnorm`).
- Integer buffers (BatchNorm's ``num_batches_tracked``) are copied from the base.

Arithmetic is done in float64 and cast back to each entry's dtype, so ``theta_base +
tau_i`` gives ``theta_i`` back exactly.

The state-dict helpers every merger shares (:func:`~mergescope.states.check_compatible`,
:func:`~mergescope.states.average_states`, :func:`~mergescope.states.build_model`) live in
:mod:`mergescope.states`; the option checks in :mod:`mergescope.validators`.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from .batchnorm import running_stat_keys
from .components import Context, MergeResult
from .devices import float64_device
from .errors import ConfigError
from .groups import align_step_models, channel_groups, example_input

# check_compatible, check_finite, average_states and build_model moved to mergescope.states; they stay
# importable from here for third parties, for now.
from .states import average_states, build_model, check_compatible, check_finite, float_keys  # noqa: F401
from .validators import as_float, boolean, finite, float_list, list_of, non_empty_str, optional, unique

__all__ = [
    "MAX_RELATIVE_DISTANCE",
    "merge_keys",
    "task_vectors",
    "relative_distances",
    "check_finetuned",
    "add_to_base",
    "flatten",
    "unflatten",
    "top_fraction_mask",
    "sign_conflicts",
    "TaskVectors",
    "prepare",
    "ScalingSearch",
    "search_scaling",
    "finish_merge",
    "check_scalings",
    "example_finetunes",
    "aligned_models",
    "TaskVectorMerger",
]

MAX_RELATIVE_DISTANCE = 1.0
"""Largest ``||tau_i|| / ||theta_base||`` accepted as a fine-tune of the base.

Fine-tuning moves a network by a small fraction of its norm (typically 0.01 to 0.3).
Two independently initialised or trained networks of one architecture, with weights of
similar norm and no correlation, are ``sqrt(2) ~ 1.4`` apart relative to either one.
Above 1.0 a model is no closer to the base than an unrelated network would be.
"""


# ---------------------------------------------------------------------- checking


def merge_keys(model: nn.Module) -> tuple[list[str], list[str]]:
    """Split ``model``'s state-dict keys into task-vector entries and BatchNorm statistics.

    Returns
    -------
    vector_keys, statistic_keys
        ``vector_keys``: every floating entry (parameters and float buffers) except
        BatchNorm running statistics, in state-dict order. ``statistic_keys``: the
        BatchNorm running means and variances. Integer entries are in neither.
    """
    state = model.state_dict()
    stats = set(running_stat_keys(model))
    vector_keys = [k for k, t in state.items() if t.is_floating_point() and k not in stats]
    statistic_keys = [k for k, t in state.items() if t.is_floating_point() and k in stats]
    return vector_keys, statistic_keys


# ------------------------------------------------------------------ task vectors


def task_vectors(
    base_state: Mapping[str, Tensor],
    finetuned_states: Sequence[Mapping[str, Tensor]],
    *,
    keys: Collection[str] | None = None,
    names: Sequence[str] | None = None,
) -> list[dict[str, Tensor]]:
    """``tau_i = theta_i - theta_base`` for every fine-tuned state dict.

    Parameters
    ----------
    base_state
        State dict of the pre-trained base model.
    finetuned_states
        State dicts of its fine-tunes.
    keys
        The entries to take the difference of (default: every floating entry; integer
        buffers such as ``num_batches_tracked`` have no task vector and are skipped).
    names
        Names of the fine-tuned models, for error messages (default ``#1``, ``#2``, ...).

    Returns
    -------
    list of dict
        One float64 task vector per fine-tune, keyed like the state dicts.

    Raises
    ------
    ValueError
        A fine-tune lacks an entry of the base or has another shape; the message names
        the first such entry, both shapes and the model.
    """
    labels = list(names) if names is not None else [f"#{i + 1}" for i in range(len(finetuned_states))]
    if len(labels) != len(finetuned_states):
        raise ValueError(f"got {len(finetuned_states)} fine-tuned state dicts but {len(labels)} names")
    selected = float_keys(base_state, keys)
    out = []
    for label, state in zip(labels, finetuned_states):
        tau = {}
        for key in selected:
            if key not in state:
                raise ValueError(f"parameter {key!r} of the base model is missing from model {label!r}")
            base, tuned = base_state[key], state[key]
            if tuple(base.shape) != tuple(tuned.shape):
                raise ValueError(
                    f"parameter {key!r} has shape {tuple(base.shape)} in the base model "
                    f"but {tuple(tuned.shape)} in model {label!r}"
                )
            wide = float64_device(base.device)
            tau[key] = tuned.detach().to(device=wide, dtype=torch.float64) - base.detach().to(wide, torch.float64)
        out.append(tau)
    return out


def relative_distances(
    base_state: Mapping[str, Tensor],
    states: Sequence[Mapping[str, Tensor]],
    *,
    keys: Collection[str] | None = None,
) -> list[float]:
    """``||theta_i - theta_base|| / ||theta_base||`` over ``keys`` for every state dict.

    Norms are Euclidean over all selected entries flattened together (default: every
    floating entry). ``inf`` when the base is all zeros and a model is not.
    """
    selected = float_keys(base_state, keys)
    base_sq = math.fsum(float(base_state[k].detach().double().pow(2).sum()) for k in selected)
    out = []
    for state in states:
        diff_sq = math.fsum(
            float((state[k].detach().double() - base_state[k].detach().double()).pow(2).sum()) for k in selected
        )
        if base_sq == 0.0:
            out.append(0.0 if diff_sq == 0.0 else math.inf)
        else:
            out.append(math.sqrt(diff_sq / base_sq))
    return out


def check_finetuned(
    base_state: Mapping[str, Tensor],
    states: Sequence[Mapping[str, Tensor]],
    names: Sequence[str],
    *,
    base_name: str = "base",
    method: str = "task-vector mergers",
    keys: Collection[str] | None = None,
    threshold: float = MAX_RELATIVE_DISTANCE,
) -> list[float]:
    """Check that ``states`` look like fine-tunes of ``base_state``, not raw weights.

    A merger of task vectors given the wrong models does not fail, it silently computes
    nonsense (e.g. PCB fed raw weights instead of ``theta_i - theta_base``). Two cases are
    caught:

    - no fine-tune at all: the step lists the base alone (fewer than two models);
    - a model whose relative distance ``||theta_i - theta_base|| / ||theta_base||``
      exceeds ``threshold`` (default :data:`MAX_RELATIVE_DISTANCE` = 1.0): it is no
      closer to the base than an unrelated network (independently trained networks
      give about 1.4), so it is not a fine-tune of it.

    It cannot tell a base from a fine-tune: two sibling fine-tunes given without their
    base pass, the first playing the base. Name the base with the mergers' ``base``
    option.

    Parameters
    ----------
    base_state
        State dict of the base model.
    states
        State dicts of the models to merge into it.
    names
        Their names, for the message.
    base_name
        The base model's name, for the message.
    method
        The merger's name, for the message.
    keys
        Entries the distance is measured over (default every floating entry). Mergers
        pass the model's weight matrices and convolution kernels (parameters of two or
        more dimensions): buffers such as BatchNorm statistics move a lot when the data
        changes, and norm-layer scales and biases start from shared constants (1 and 0)
        in every network, which would make unrelated networks look closer than they are.
    threshold
        Largest accepted relative distance.

    Returns
    -------
    list of float
        The relative distance of every model.

    Raises
    ------
    ConfigError
        No fine-tune, or a model too far from the base; the message names the model,
        its relative distance and what to do instead.
    """
    if len(states) != len(names):
        raise ValueError(f"got {len(states)} state dicts but {len(names)} names")
    if not states:
        raise ConfigError(
            f"{method} adds the task vectors (fine-tune minus base) of fine-tuned models to their pre-trained "
            f"base, so it needs the base and at least one fine-tune of it; the step has only {base_name!r}. "
            "List the pre-trained base model and its fine-tunes under 'models'",
            where="key 'models'",
        )
    distances = relative_distances(base_state, states, keys=keys)
    for name, distance in zip(names, distances):
        if distance > threshold:
            raise ConfigError(
                f"model {name!r} does not look like a fine-tune of the base model {base_name!r}: its relative "
                f"distance ||theta_{name} - theta_{base_name}|| / ||theta_{base_name}|| = {distance:.3g}, "
                f"above {threshold:g} "
                "(fine-tunes are typically below 0.3; independently trained networks give about 1.4). "
                f"{method} merges task vectors, so it needs fine-tunes of one pre-trained base: list that base "
                "among the step's models and name it with the 'base' option. To merge independently trained "
                "models, use 'interpolation' (after an alignment step when the models are not aligned)",
                where="key 'models'",
            )
    return distances


# ------------------------------------------------------------------ state arithmetic


def add_to_base(
    base_state: Mapping[str, Tensor],
    delta: Mapping[str, Tensor],
    scaling: float = 1.0,
    *,
    overrides: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """``theta_base + scaling * delta`` as a complete state dict.

    Parameters
    ----------
    base_state
        State dict of the base model.
    delta
        A (merged) task vector over some of the floating entries.
    scaling
        The coefficient ``lambda`` of the task vector.
    overrides
        Entries to take as given instead (e.g. averaged BatchNorm statistics).

    Returns
    -------
    dict
        Every entry of ``base_state``: ``base + scaling * delta`` computed in float64 and
        cast to the base's dtype where ``delta`` has the key, the override where given,
        a copy of the base entry elsewhere.
    """
    overrides = overrides or {}
    out = {}
    for key, tensor in base_state.items():
        if key in overrides:
            out[key] = overrides[key].detach().to(device=tensor.device, dtype=tensor.dtype).clone()
        elif key in delta:
            wide = float64_device(tensor.device)
            total = tensor.detach().to(wide, torch.float64) + float(scaling) * delta[key].to(wide, torch.float64)
            out[key] = total.to(device=tensor.device, dtype=tensor.dtype)
        else:
            out[key] = tensor.detach().clone()
    return out


def flatten(vectors: Sequence[Mapping[str, Tensor]], keys: Sequence[str]) -> Tensor:
    """Stack task vectors into one float64 matrix ``(n_models, n_entries)``.

    Entries are concatenated in the order of ``keys``, each flattened row-major. Methods
    that rank entries across the whole network (TIES trimming, PCB's normalisation)
    work on these rows.
    """
    if not vectors:
        raise ValueError("no task vectors to flatten")
    if not keys:
        return torch.zeros((len(vectors), 0), dtype=torch.float64)
    return torch.stack([torch.cat([v[k].reshape(-1).to(torch.float64) for k in keys]) for v in vectors])


def unflatten(flat: Tensor, like: Mapping[str, Tensor], keys: Sequence[str]) -> dict[str, Tensor]:
    """Split a flat vector (one row of :func:`flatten`) back into entries shaped like ``like``."""
    covered = sum(like[key].numel() for key in keys)
    if flat.ndim != 1 or flat.numel() != covered:
        raise ValueError(f"the flat vector has {flat.numel()} entries but the keys cover {covered}")
    out, start = {}, 0
    for key in keys:
        n = like[key].numel()
        out[key] = flat[start : start + n].reshape(like[key].shape)
        start += n
    return out


def top_fraction_mask(scores: Tensor, fraction: float) -> Tensor:
    """Per row, mark the entries whose score is among the top ``fraction`` of the row.

    ``k = max(1, round(fraction * n_entries))`` entries are kept per row: every entry
    whose score is at least the row's k-th largest (ties at the threshold are all kept,
    as in the TIES reference code). Used for TIES trimming (on ``|tau|``) and PCB's drop
    (on the balancing matrix).

    Parameters
    ----------
    scores
        ``(n_rows, n_entries)``.
    fraction
        In ``(0, 1]``.

    Returns
    -------
    Tensor
        Boolean mask of the shape of ``scores``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (rows, entries), got shape {tuple(scores.shape)}")
    n = scores.shape[1]
    if n == 0:
        return torch.zeros(scores.shape, dtype=torch.bool)
    k = min(n, max(1, math.floor(fraction * n + 0.5)))
    # kthvalue counts from the smallest: the k-th largest is the (n - k + 1)-th smallest.
    threshold = scores.kthvalue(n - k + 1, dim=1, keepdim=True).values
    return scores >= threshold


def sign_conflicts(values: Tensor) -> float:
    """Fraction of columns of ``values`` ``(n_models, n_entries)`` holding both signs.

    A column conflicts when one model's entry is positive and another's negative (zeros
    are abstentions), the interference TIES-Merging resolves by electing a sign.
    """
    if values.shape[1] == 0:
        return 0.0
    conflicts = (values > 0).any(dim=0) & (values < 0).any(dim=0)
    return float(conflicts.double().mean())


# ------------------------------------------------------------- merger scaffolding


@attrs.frozen
class TaskVectors:
    """The inputs of a task-vector merge, checked.

    Attributes
    ----------
    base
        Name of the base model.
    names
        Names of the fine-tuned models, in the step's order (the base left out).
    template
        The base module (a merged model is a copy of it).
    base_state
        Its state dict.
    states
        State dicts of the fine-tunes, in the order of ``names``.
    vector_keys, statistic_keys
        See :func:`merge_keys`.
    vectors
        ``tau_i`` over ``vector_keys``, float64, in the order of ``names``.
    distances
        ``||tau_i|| / ||theta_base||`` over the weight matrices and kernels (see
        :func:`check_finetuned`), in the order of ``names``.
    """

    base: str
    names: list[str]
    template: nn.Module
    base_state: dict[str, Tensor]
    states: list[dict[str, Tensor]]
    vector_keys: list[str]
    statistic_keys: list[str]
    vectors: list[dict[str, Tensor]]
    distances: list[float]

    def rows(self, key: str) -> Tensor:
        """The task vectors' entries of one tensor (one layer) as rows: ``(n_fine_tunes, numel)``.

        Mergers that work layer by layer (Breadcrumbs, Model Stock) read them so; a
        merged row goes back with ``row.reshape(self.vectors[0][key].shape)``.
        """
        return torch.stack([v[key].reshape(-1) for v in self.vectors])

    def statistics(self) -> dict[str, Tensor]:
        """BatchNorm running statistics averaged uniformly over the fine-tunes."""
        if not self.statistic_keys:
            return {}
        return average_states(self.states, keys=self.statistic_keys)


def prepare(models: Mapping[str, nn.Module], base: str | None, *, method: str) -> TaskVectors:
    """Resolve the base model, check the models and compute their task vectors.

    Parameters
    ----------
    models
        The step's models by name.
    base
        Name of the base model among them (``None``: the first).
    method
        The merger's name, for messages.

    Raises
    ------
    ConfigError
        ``base`` is not one of the models, fewer than two models, models of different
        architectures, or models that are not fine-tunes of the base (see
        :func:`check_finetuned`).
    """
    names = list(models)
    if not names:
        raise ConfigError(f"{method} needs models to merge, got none", where="key 'models'")
    if base is None:
        base = names[0]
    elif base not in names:
        raise ConfigError(
            f"base model {base!r} is not among the step's models ({', '.join(names)}); "
            "'base' names the pre-trained model the others were fine-tuned from",
            where="key 'base'",
        )
    others = [n for n in names if n != base]
    states = {name: models[name].state_dict() for name in [base, *others]}
    try:
        check_compatible(states)
    except ValueError as exc:
        raise ConfigError(f"cannot merge models {names}: {exc}", where="key 'models'") from exc
    template = models[base]
    vector_keys, statistic_keys = merge_keys(template)
    # Weight matrices and kernels start from random initialisations; norm-layer scales and
    # biases start from shared constants (1 and 0) that make unrelated networks look closer.
    parameters = {name for name, p in template.named_parameters() if p.ndim >= 2}
    measured = [k for k in vector_keys if k in parameters] or vector_keys
    base_state = states[base]
    tuned = [states[n] for n in others]
    distances = check_finetuned(base_state, tuned, others, base_name=base, method=method, keys=measured)
    vectors = task_vectors(base_state, tuned, keys=vector_keys, names=others)
    return TaskVectors(base, others, template, base_state, tuned, vector_keys, statistic_keys, vectors, distances)


@attrs.frozen
class ScalingSearch:
    """The outcome of :func:`search_scaling`: the grid, its scores and the chosen point.

    ``losses`` and ``accuracies`` are on the step's data, or, when the search chose on
    the tasks' validation data, their means over the tasks. Then ``tasks`` names the
    tasks, ``task_losses`` and ``task_accuracies`` are ``(grid point, task)``,
    ``reference_accuracies`` the experts' validation accuracies (empty unless every task
    has its expert at hand) and ``criterion`` says what was maximised.
    """

    scalings: list[float]
    losses: list[float]
    accuracies: list[float]
    best: int
    tasks: list[str] = attrs.field(factory=list)
    task_losses: np.ndarray | None = attrs.field(default=None, eq=False)
    task_accuracies: np.ndarray | None = attrs.field(default=None, eq=False)
    reference_accuracies: list[float] = attrs.field(factory=list)
    criterion: str = "accuracy"

    @property
    def scaling(self) -> float:
        """The chosen scaling."""
        return self.scalings[self.best]

    @property
    def normalized_accuracies(self) -> np.ndarray | None:
        """``(grid point, task)`` validation accuracies divided by the experts', when they are known."""
        if self.task_accuracies is None or not self.reference_accuracies:
            return None
        return self.task_accuracies / np.asarray(self.reference_accuracies, dtype=float)

    def variables(self) -> dict[str, Any]:
        """The per-task search curves as result variables (on dims ``scaling`` and ``task``); empty without tasks."""
        if not self.tasks or self.task_accuracies is None or self.task_losses is None:
            return {}
        found: dict[str, Any] = {
            "search_task_accuracy": (("scaling", "task"), np.asarray(self.task_accuracies, dtype=float)),
            "search_task_loss": (("scaling", "task"), np.asarray(self.task_losses, dtype=float)),
            "search_criterion": self.criterion,
        }
        normalized = self.normalized_accuracies
        if normalized is not None:
            found["search_task_normalized_accuracy"] = (("scaling", "task"), normalized)
            found["search_normalized_accuracy"] = ("scaling", normalized.mean(axis=1))
            found["expert_validation_accuracy"] = ("task", np.asarray(self.reference_accuracies, dtype=float))
        return found


def _choose(criterion: np.ndarray, losses: np.ndarray) -> int:
    """The grid point of the highest ``criterion``; ties go to the lower loss, then to the earlier point."""
    # lexsort sorts by the last key first: criterion (descending), then loss, then position.
    return int(np.lexsort((np.arange(len(criterion)), losses, -criterion))[0])


def search_scaling(
    model_at: Callable[[float], nn.Module], scalings: Sequence[float], context: Context, *, desc: str
) -> ScalingSearch:
    """Evaluate ``model_at(s)`` for every ``s`` in ``scalings`` and choose the best.

    When the pipeline's tasks give validation data (``context.tasks``), every grid point
    is scored on each task's validation images with that task's head and classes, and
    the point with the highest mean over the tasks wins, as in the papers (Ilharco et al.
    2023; Yadav et al. 2023): the mean of the *normalised* accuracies (each divided by
    the task's expert's validation accuracy) when every task names an expert that exists
    by then, else the mean of the accuracies. Otherwise it is a plain grid search on
    ``context.data``: the highest accuracy wins. Ties go to the lower (mean) loss, then
    to the earlier grid point. The data it chooses on must not be the data results are
    reported on: validation splits, not the test split.

    Parameters
    ----------
    model_at
        Builds the merged model for one scaling (BatchNorm already reset if wanted).
    scalings
        The grid, evaluated in the given order.
    context
        Gives the data or the tasks and the evaluation.
    desc
        Progress bar label.

    Raises
    ------
    ConfigError
        There is no data to choose with: no [data] and no task with validation data.
    """
    tasks = list(context.tasks)
    if not tasks and context.data is None:
        raise ConfigError(
            "'scalings' asks for a search that chooses the scaling by accuracy, which needs data: add [data] "
            "pointing at a validation split, or validation data to the [[tasks]], or give one 'scaling' instead",
            where="key 'scalings'",
        )
    grid = [float(s) for s in scalings]
    if not tasks:
        losses, accuracies = [], []
        for s in context.progress(grid, desc=desc, total=len(grid)):
            evaluation = context.evaluate(model_at(s))
            losses.append(float(evaluation.loss))
            accuracies.append(float(evaluation.accuracy))
        return ScalingSearch(grid, losses, accuracies, _choose(np.asarray(accuracies), np.asarray(losses)))
    task_accuracy = np.zeros((len(grid), len(tasks)))
    task_loss = np.zeros_like(task_accuracy)
    for i, s in enumerate(context.progress(grid, desc=f"{desc} (validation of {len(tasks)} tasks)", total=len(grid))):
        model = model_at(s)
        for j, task in enumerate(tasks):
            evaluation = context.evaluate_task(model, task)
            task_accuracy[i, j], task_loss[i, j] = evaluation.accuracy, evaluation.loss
    references = [t.reference_accuracy(functools.partial(context.evaluate_task, task=t)) for t in tasks]
    known = [r for r in references if r is not None]
    normalised = len(known) == len(tasks) and all(r > 0 for r in known)
    if normalised:
        criterion = (task_accuracy / np.asarray(known)).mean(axis=1)
        name = "average normalized validation accuracy"
    else:
        criterion = task_accuracy.mean(axis=1)
        name = "average validation accuracy"
    mean_loss = task_loss.mean(axis=1)
    return ScalingSearch(
        grid,
        mean_loss.tolist(),
        task_accuracy.mean(axis=1).tolist(),
        _choose(criterion, mean_loss),
        tasks=[t.name for t in tasks],
        task_losses=task_loss,
        task_accuracies=task_accuracy,
        reference_accuracies=[float(r) for r in known] if normalised else [],
        criterion=name,
    )


def finish_merge(
    inputs: TaskVectors,
    delta: Mapping[str, Tensor],
    *,
    scaling: float,
    scalings: Sequence[float] | None,
    context: Context,
    reset: bool,
    method: str,
) -> tuple[nn.Module, xr.Dataset]:
    """Add a merged task vector to the base, choose its scaling, evaluate: the shared tail of a merge.

    Parameters
    ----------
    inputs
        From :func:`prepare`.
    delta
        The merged task vector ``tau`` (before scaling), over ``inputs.vector_keys``.
    scaling
        ``lambda`` in ``theta = theta_base + lambda * tau``, used when ``scalings`` is None.
    scalings
        A grid to choose ``lambda`` from by accuracy on ``context.data`` (see
        :func:`search_scaling`).
    context
        Data for the search, the BatchNorm reset and the evaluation.
    reset
        Recompute BatchNorm statistics on ``context.data`` (when there is data);
        otherwise they are the fine-tunes' average.
    method
        The merger's name, for messages and progress bars.

    Returns
    -------
    model, results
        The merged model and its labelled results: coord ``model`` (the fine-tunes),
        ``coefficient`` (dim ``model``, the ``lambda`` applied to each task vector),
        ``relative_distance`` (dim ``model``, ``||tau_i|| / ||theta_base||``), scalars
        ``base`` (its name), ``merged_scaling`` and ``batchnorm_statistics``
        (``"recomputed"``, ``"averaged"`` or ``"none"``); with data, scalars ``loss`` and
        ``accuracy``; with ``scalings``, coord ``scaling`` (the grid) and
        ``search_loss`` / ``search_accuracy`` on it (means over the tasks when the search
        chose on the tasks' validation data, with coord ``task`` and the variables of
        :meth:`ScalingSearch.variables`).
    """
    statistics = inputs.statistics()

    def model_at(s: float) -> nn.Module:
        state = add_to_base(inputs.base_state, delta, s, overrides=statistics)
        return build_model(inputs.template, state, context, reset=reset)

    search = None
    if scalings is not None:
        search = search_scaling(model_at, scalings, context, desc=method)
        scaling = search.scaling
    merged = model_at(scaling)

    n = len(inputs.names)
    results = xr.Dataset(
        {
            "coefficient": ("model", np.full(n, float(scaling))),
            "relative_distance": ("model", np.asarray(inputs.distances, dtype=float)),
        },
        coords={"model": list(inputs.names)},
    )
    results["base"] = inputs.base
    results["merged_scaling"] = float(scaling)
    if not inputs.statistic_keys:
        results["batchnorm_statistics"] = "none"
    else:
        results["batchnorm_statistics"] = "recomputed" if reset and context.data is not None else "averaged"
    if search is not None:
        results = results.assign_coords(scaling=("scaling", np.asarray(search.scalings, dtype=float)))
        results["search_loss"] = ("scaling", np.asarray(search.losses, dtype=float))
        results["search_accuracy"] = ("scaling", np.asarray(search.accuracies, dtype=float))
        if search.tasks:
            results = results.assign_coords(task=("task", list(search.tasks)))
        for key, value in search.variables().items():
            results[key] = value
    if search is not None and not search.tasks:
        # The chosen model is the one evaluated at the grid point: no second pass.
        results["loss"] = search.losses[search.best]
        results["accuracy"] = search.accuracies[search.best]
    elif context.data is not None:
        evaluation = context.evaluate(merged)
        results["loss"] = float(evaluation.loss)
        results["accuracy"] = float(evaluation.accuracy)
    return merged, results


# ----------------------------------------------------------------- option checks


def check_scalings(instance: Any, attribute: attrs.Attribute, value: list[float] | None) -> None:
    """Validator of a ``scalings`` grid: finite, non-empty, no repeats, and no ``scaling`` beside it."""
    if value is None:
        return
    if isinstance(value, (list, tuple)) and not value:
        raise ValueError(f"'{attribute.name}' must hold at least one value; leave it out to use 'scaling'")
    list_of(finite)(instance, attribute, value)
    unique(instance, attribute, value)
    default = attrs.fields_dict(type(instance))["scaling"].default
    if instance.scaling != default:
        raise ValueError(
            f"'scaling' and '{attribute.name}' exclude each other: give 'scaling' for one merge, "
            f"'{attribute.name}' to choose it on the data"
        )


def example_finetunes(n: int = 2, *, scale: float = 0.05, seed: int = 0) -> dict[str, nn.Module]:
    """A small base MLP and ``n`` perturbed copies standing in for its fine-tunes.

    The base is ``Flatten, Linear(16, 8), ReLU, Linear(8, 3)`` initialised with torch's
    seed 0: the architecture and weights of ``model0`` of
    :func:`mergescope.testing.example_models`. ``model0`` is the base; ``model1`` ...
    ``model{n}`` add Gaussian noise of ``scale`` times each tensor's RMS, so their
    relative distance to the base is about ``scale``. Deterministic for a given ``seed``;
    the global random state is left as it was. Meant for examples and conformance tests
    of task-vector mergers, which reject independently initialised models.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    gen = torch.Generator().manual_seed(seed)
    models: dict[str, nn.Module] = {"model0": base}
    for i in range(1, n + 1):
        tuned = copy.deepcopy(base)
        with torch.no_grad():
            for p in tuned.parameters():
                rms = p.pow(2).mean().sqrt()
                p.add_(scale * rms * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        models[f"model{i}"] = tuned.eval()
    return models


# ------------------------------------------------------------- a base for mergers


def aligned_models(models: Mapping[str, nn.Module], alignment: Any, context: Context) -> dict[str, nn.Module]:
    """The step's models mapped onto its alignment's reference (unchanged without one).

    Composition: an aligner step, then a task-vector merge of the aligned models (say,
    activation matching, then TIES). Fine-tunes of one base share its coordinates, so
    an alignment of them is close to the identity; the merge still checks that every
    aligned model is a fine-tune of the base.
    """
    if alignment is None:
        return dict(models)
    if alignment.reference not in models:  # before tracing, which needs data
        return align_step_models(models, alignment, [])
    x = example_input(context.data)
    return align_step_models(models, alignment, channel_groups(models[alignment.reference], x), x)


@attrs.define
class TaskVectorMerger:
    """The shared shape of mergers that combine task vectors of fine-tunes of one base.

    A subclass sets ``name`` (and ``paper``) and implements :meth:`combine`, which turns
    the task vectors into one merged task vector ``tau`` plus diagnostics, or, when it
    ranks entries across the whole network as TIES and PCB do, :meth:`combine_flat`,
    which does the same on the task vectors flattened into the rows of one matrix.
    ``merge`` does the rest, as for task arithmetic, TIES and PCB: it maps the models
    onto the reference of an alignment when the step has one (:func:`aligned_models`),
    finds the base and the task vectors (:func:`prepare`), then adds ``lambda
    * tau`` to the base, searches ``lambda`` on the data when ``scalings`` is given,
    recomputes BatchNorm statistics and evaluates (:func:`finish_merge`).

    Parameters
    ----------
    base
        Name of the pre-trained base among the step's models (default: the first).
    scaling
        ``lambda``.
    scalings
        Choose ``lambda`` from this grid by accuracy on the step's data (a validation
        split). Excludes ``scaling``.
    reset_batchnorm
        Recompute BatchNorm statistics on the step's data after merging.
    """

    base: str | None = attrs.field(default=None, validator=optional(non_empty_str))
    # Negative scalings subtract task vectors (task negation): any finite number.
    # The ignores: mypy's attrs plugin rejects attrs.Converter objects, which these converters
    # are so that their errors can name the option (python/mypy#15736).
    scaling: float = attrs.field(default=1.0, converter=as_float, validator=finite)  # type: ignore[misc]
    scalings: list[float] | None = attrs.field(default=None, converter=float_list, validator=check_scalings)  # type: ignore[misc]
    reset_batchnorm: bool = attrs.field(default=True, validator=boolean)

    @classmethod
    def conformance_models(cls) -> dict[str, nn.Module]:
        """A base (``model0``) and two small fine-tunes of it, for conformance checks."""
        return example_finetunes(2)

    def combine(self, inputs: TaskVectors) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The merged task vector over ``inputs.vector_keys`` and extra result variables.

        Extra variables are ``{name: value}`` for :class:`xarray.Dataset` (e.g.
        ``("model", array)`` for one value per fine-tune, or a scalar).

        By default the task vectors are flattened into the rows of one float64 matrix
        (:func:`flatten`), merged by :meth:`combine_flat` and split back into entries
        (:func:`unflatten`); the extra variables gain ``merged_density``, the fraction of
        entries the merged task vector changes.
        """
        flat = flatten(inputs.vectors, inputs.vector_keys)
        merged, extra = self.combine_flat(flat)
        delta = unflatten(merged, inputs.vectors[0], inputs.vector_keys)
        density = float((merged != 0).double().mean()) if merged.numel() else 0.0
        return delta, {**extra, "merged_density": density}

    def combine_flat(self, flat: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """The merged task vector ``(n_entries,)`` of the rows of ``flat`` and extra result variables.

        ``flat`` is ``(n_models, n_entries)``, one task vector per row, in the order of the
        fine-tunes (see :meth:`combine`).
        """
        raise NotImplementedError(f"{type(self).__qualname__} must implement combine() or combine_flat()")

    def merge(self, models: Mapping[str, nn.Module], context: Context, alignment: Any = None) -> Any:
        """Merge the fine-tunes into the base; search ``lambda`` and evaluate when there is data.

        Returns
        -------
        MergeResult
            ``model``: a copy of the base holding the merge. ``results``: those of
            :func:`finish_merge` (``coefficient`` and ``relative_distance`` on dim
            ``model``, ``base``, ``merged_scaling``, ``loss`` / ``accuracy`` with data, the
            search curve on dim ``scaling``) plus the variables of :meth:`combine`.

        Raises
        ------
        ConfigError
            An alignment whose reference is not a model of the step, ``base`` is not a
            model of the step, no fine-tune,
            models of different architectures, models that are not fine-tunes of the
            base, or ``scalings`` without data.
        """

        name = getattr(self, "name", type(self).__name__)
        models = aligned_models(models, alignment, context)
        inputs = prepare(models, self.base, method=name)
        delta, extra = self.combine(inputs)
        merged, results = finish_merge(
            inputs,
            delta,
            scaling=self.scaling,
            scalings=self.scalings,
            context=context,
            reset=self.reset_batchnorm,
            method=name,
        )
        for key, value in extra.items():
            results[key] = value
        return MergeResult(merged, results)

    @staticmethod
    def scored(line: str, result: xr.Dataset) -> str:
        """``line`` followed by the merged model's accuracy and loss, or why there are none."""
        if "accuracy" in result:
            return f"{line}: accuracy {float(result['accuracy']):.3f}, loss {float(result['loss']):.3f}"
        return f"{line} (not evaluated: the pipeline has no data)"

    @staticmethod
    def chosen_scaling(result: xr.Dataset) -> str:
        """The ``lambda`` used, with ``(best of N)`` when it was searched."""
        scaling = float(result["merged_scaling"]) if "merged_scaling" in result else float("nan")
        chosen = f" (best of {result.sizes['scaling']})" if "scaling" in result.dims else ""
        return f"{scaling:g}{chosen}"

    def describe(self, result: xr.Dataset) -> str:
        """One line: the base, how much of each task vector was kept and how many signs conflict
        (when :meth:`combine` reports ``kept`` and ``sign_conflicts``), ``lambda`` and the score.
        """
        parts = [f"base {str(result['base'].values)!r}"]
        if "kept" in result:
            parts.append(f"kept {float(np.mean(result['kept'].values)):.0%} of each task vector")
        if "sign_conflicts" in result:
            parts.append(f"{float(result['sign_conflicts']):.1%} sign conflicts")
        parts.append(f"lambda {self.chosen_scaling(result)}")
        return self.scored(", ".join(parts), result)
