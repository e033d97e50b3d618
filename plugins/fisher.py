"""Fisher merging: a weighted average of weights, entry by entry, by each model's Fisher information.

Matena & Raffel (2022) read merging as finding the parameters most probable under every
model's posterior. With a Laplace approximation each posterior is a Gaussian centred on
the model's weights ``theta_i`` whose precision is its Fisher information ``F_i``; keeping
only the Fisher's diagonal, the joint mode is, entry by entry,

    theta* = sum_i lambda_i F_i theta_i / sum_i lambda_i F_i

with model weights ``lambda_i >= 0`` (uniform by default; only their ratios matter).
Equal Fishers give the plain weighted average ``sum_i lambda_i theta_i / sum_i lambda_i``;
an entry one model is indifferent to (``F_i = 0``) takes the others' values.

The diagonal Fisher of a classifier ``p_theta(y | x)`` is

    F = E_x E_{y ~ p_theta(y|x)} [ (d log p_theta(y|x) / d theta)^2 ]

estimated on ``N`` examples of the step's data with *per-example* squared gradients
(the square of a batch's summed gradient is another quantity). ``labels`` chooses how
the inner expectation over ``y`` is taken:

- ``"expected"``: exactly, ``sum_y p_theta(y|x) g_y(x)^2`` with ``g_y = d log p_theta(y|x)
  / d theta``: one gradient per class and example, as the authors' code does for its
  few-class tasks;
- ``"sampled"``: one ``y`` drawn from ``p_theta(y|x)`` per example, the unbiased Monte
  Carlo estimate the paper names for many classes (one gradient per example);
- ``"empirical"``: ``y`` the example's true label (the "empirical Fisher"; not the Fisher
  of the model's own predictive distribution, but common in practice).

Per-example gradients come from ``torch.func`` (``vmap`` of ``grad`` of a
``functional_call``), or from a plain loop over examples for models that ``vmap`` cannot
trace. The Fisher is computed in evaluation mode (BatchNorm uses its running
statistics, dropout is off).

Two details follow the authors' reference code (``mmatena/model_merging``):

- a floor: every ``F_i`` is raised to at least ``epsilon`` (1e-6) before weighting, so no
  entry divides by zero and entries no model cares about fall back to the plain
  average. The reference floors only its first ("target") model; here every model is
  floored, so the merge does not depend on the order of the models. Where the floored
  Fishers are all 0 (``epsilon = 0``) the entry is the plain weighted average;
- optionally (``normalize``), each model's ``lambda_i`` is divided by the L2 norm of its
  whole Fisher, so that a model whose gradients are larger overall does not win every
  entry (the reference code's default; the paper's equation has no such factor).

BatchNorm running statistics are not learned and have no Fisher: they are averaged with
the weights ``lambda_i`` (as are any other floating buffers), then recomputed on the data
when ``reset_batchnorm`` is on. Integer buffers are copied from the first model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

import attrs
import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from mergescope.batchnorm import running_stat_keys
from mergescope.components import Alignment, Context, ImageDataset, MergeResult
from mergescope.devices import float64_device
from mergescope.errors import ConfigError
from mergescope.hookspecs import hookimpl
from mergescope.states import average_states, build_model, check_compatible
from mergescope.task_vectors import aligned_models
from mergescope.validators import (
    as_float,
    boolean,
    float_list,
    integer,
    list_of,
    non_negative,
    one_of,
    positive_int,
)

__all__ = [
    "LABELS",
    "log_prob_gradients",
    "diagonal_fisher",
    "merge_shares",
    "fisher_average",
    "Fisher",
    "register_mergers",
]

LABELS = ("expected", "sampled", "empirical")
"""How the expectation over labels ``y`` in the Fisher is taken (see the module docstring)."""

Progress = Callable[[Iterable[Any], str, int | None], Iterator[Any]]


# ------------------------------------------------------------------- pure functions


def log_prob_gradients(
    model: nn.Module, images: Tensor, targets: Tensor, *, vectorize: bool = True
) -> dict[str, Tensor]:
    """Per-example gradients ``d/dtheta sum_c targets[n, c] log p_theta(c | x_n)`` for every parameter.

    With one-hot ``targets`` row ``n`` is ``d log p_theta(y_n | x_n) / d theta``. The model
    runs as it is (call ``model.eval()`` first for the Fisher); its parameters and buffers
    are not changed.

    Parameters
    ----------
    model
        A classifier returning logits ``(batch, classes)``.
    images
        ``(N, ...)``, on the model's device.
    targets
        ``(N, classes)`` weights of the log-probabilities, on the model's device.
    vectorize
        Use ``torch.func.vmap``; ``False`` loops over the examples with ``torch.autograd``
        (for models whose forward pass ``vmap`` cannot trace, e.g. one calling ``.item()``).

    Returns
    -------
    dict
        Parameter name (as in ``named_parameters``) -> ``(N, *parameter.shape)``.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def log_prob(theta: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        logits = functional_call(model, (theta, buffers), (x.unsqueeze(0),))
        return (torch.log_softmax(logits.float(), dim=-1)[0] * t).sum()

    if vectorize:
        return vmap(grad(log_prob), in_dims=(None, 0, 0))(params, images, targets)
    leaves = {name: p.clone().requires_grad_(True) for name, p in params.items()}
    rows: dict[str, list[Tensor]] = {name: [] for name in leaves}
    with torch.enable_grad():
        for x, t in zip(images, targets):
            grads = torch.autograd.grad(log_prob(leaves, x, t), list(leaves.values()), allow_unused=True)
            for (name, leaf), g in zip(leaves.items(), grads):
                rows[name].append(torch.zeros_like(leaf) if g is None else g)
    return {name: torch.stack(r) if r else params[name].new_zeros((0, *params[name].shape)) for name, r in rows.items()}


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def diagonal_fisher(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | None = None,
    *,
    mode: str = "expected",
    generator: torch.Generator | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
    desc: str = "fisher",
) -> dict[str, Tensor]:
    """The diagonal Fisher ``E_x E_y [(d log p_theta(y|x) / d theta)^2]`` of ``model`` on ``images``.

    Parameters
    ----------
    model
        A classifier returning logits, in the mode it should be measured in (evaluation).
    images
        ``(N, ...)`` examples ``x`` (anywhere: each batch is moved to the model's device).
    labels
        ``(N,)`` true classes, used when ``mode`` is ``"empirical"``.
    mode
        ``"expected"`` (exact sum over classes weighted by ``p_theta(y|x)``),
        ``"sampled"`` (one ``y ~ p_theta(y|x)`` per example) or ``"empirical"`` (the
        true labels).
    generator
        CPU generator of the draws of ``"sampled"`` (default: a fresh one seeded 0).
    batch_size
        Examples whose per-example gradients are held at once (memory: about
        ``batch_size`` copies of the parameters).
    progress, desc
        Shows the passes over the batches (``progress(iterable, desc, total)``).

    Returns
    -------
    dict
        Parameter name -> float64 Fisher of the parameter's shape: the mean over the
        examples (on the CPU when the model's device has no float64).

    Raises
    ------
    ValueError
        An unknown ``mode``, no examples, ``"empirical"`` without labels or with a label the
        model has no output for.
    """
    if mode not in LABELS:
        raise ValueError(f"mode must be one of {', '.join(LABELS)}, got {mode!r}")
    n = len(images)
    if n == 0:
        raise ValueError("the Fisher needs at least one example")
    if mode == "empirical" and (labels is None or len(labels) != n):
        raise ValueError("the empirical Fisher needs one true label per example")
    device = next(model.parameters()).device
    wide = float64_device(device)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    sums = {name: torch.zeros(p.shape, dtype=torch.float64, device=wide) for name, p in model.named_parameters()}
    vectorize = True

    def squared_gradients(x: Tensor, targets: Tensor, per_example: Tensor | None) -> None:
        # Adds sum_n w_n g_n^2 to the sums; falls back to a loop for good once vmap fails.
        nonlocal vectorize
        if vectorize:
            try:
                grads = log_prob_gradients(model, x, targets, vectorize=True)
            except (RuntimeError, NotImplementedError):
                vectorize = False
        if not vectorize:
            grads = log_prob_gradients(model, x, targets, vectorize=False)
        for name, g in grads.items():
            # On the model's device whatever the transform hands back (a no-op where it already is).
            squared = g.to(device).float().pow(2)
            if per_example is not None:
                squared = squared * per_example.view(-1, *[1] * (g.ndim - 1))
            sums[name] += squared.sum(dim=0).to(wide, torch.float64)

    batches = _chunks(n, batch_size)
    iterator = progress(batches, desc, len(batches)) if progress is not None else batches
    for part in iterator:
        x = images[part].to(device)
        with torch.no_grad():
            probs = torch.softmax(model(x).float(), dim=-1)
        classes = probs.shape[1]
        if mode == "expected":
            # sum_y p(y|x) g_y^2: one pass per class, each example weighted by its probability.
            for c in range(classes):
                targets = torch.zeros_like(probs)
                targets[:, c] = 1.0
                squared_gradients(x, targets, probs[:, c])
            continue
        if mode == "sampled":
            y = torch.multinomial(probs.detach().cpu().double(), 1, generator=generator).squeeze(1)
        else:
            assert labels is not None
            y = torch.as_tensor(labels[part], dtype=torch.long).cpu()
            if int(y.max()) >= classes or int(y.min()) < 0:
                raise ValueError(
                    f"the data has label {int(y.max())} but the model outputs {classes} classes: the empirical "
                    "Fisher needs a dataset of the model's own classes"
                )
        squared_gradients(x, nn.functional.one_hot(y, classes).to(device=device, dtype=probs.dtype), None)
    return {name: total / n for name, total in sums.items()}


def merge_shares(fishers: Tensor, weights: Tensor, epsilon: float = 1e-6) -> Tensor:
    """Each model's share of every entry: ``lambda_i F_i' / sum_j lambda_j F_j'`` with ``F' = max(F, epsilon)``.

    Parameters
    ----------
    fishers
        ``(n_models, *shape)``: the diagonal Fishers of one parameter.
    weights
        ``(n_models,)``: the ``lambda_i``, non-negative, not all 0.
    epsilon
        The floor of the Fisher.

    Returns
    -------
    Tensor
        ``(n_models, *shape)``, summing to 1 over the models at every entry. Where every
        ``lambda_i F_i'`` is 0 (``epsilon = 0`` and no model with a Fisher there) the share
        is the plain ``lambda_i / sum_j lambda_j``.
    """
    lam = weights.to(fishers).view(-1, *[1] * (fishers.ndim - 1))
    scaled = lam * fishers.clamp_min(epsilon)
    total = scaled.sum(dim=0, keepdim=True)
    plain = (lam / lam.sum()).expand_as(scaled)
    return torch.where(total > 0, scaled / torch.where(total > 0, total, torch.ones_like(total)), plain)


def fisher_average(values: Tensor, fishers: Tensor, weights: Tensor, epsilon: float = 1e-6) -> Tensor:
    """Fisher merging of one parameter: ``sum_i lambda_i F_i' theta_i / sum_i lambda_i F_i'``.

    Parameters
    ----------
    values
        ``(n_models, *shape)``: the parameter in every model.
    fishers, weights, epsilon
        As for :func:`merge_shares`.

    Returns
    -------
    Tensor
        ``shape``, in the dtype of ``fishers`` (use float64).
    """
    return (merge_shares(fishers, weights, epsilon) * values.to(fishers)).sum(dim=0)


# ----------------------------------------------------------------- option checks


def _check_weights(instance: Fisher, attribute: attrs.Attribute, value: list[float] | None) -> None:
    if value is None:
        return
    list_of(non_negative, min_length=2)(instance, attribute, value)
    if math.fsum(value) <= 0:
        raise ValueError(f"'{attribute.name}' must hold a positive weight, got {value!r}")


def _layer_of(key: str) -> str:
    """The module a parameter belongs to (``"features.0"`` for ``"features.0.weight"``)."""
    return key.rsplit(".", 1)[0] if "." in key else key


# ---------------------------------------------------------------------- component


@attrs.define
class Fisher:
    """Average models' weights entry by entry, weighted by each model's diagonal Fisher information (Fisher merging).

    Every parameter entry becomes ``sum_i lambda_i F_i theta_i / sum_i lambda_i F_i``,
    with ``F_i`` the diagonal Fisher of model ``i`` estimated on ``samples`` examples of
    the step's data from per-example squared gradients of the log-likelihood (floored at
    ``epsilon``). BatchNorm running statistics are averaged with the weights
    ``lambda_i`` and recomputed on the data when ``reset_batchnorm`` is on. The models
    must share one architecture; an alignment maps them onto its reference first.

    Parameters
    ----------
    samples
        Examples of the data the Fishers are estimated on, drawn at random (``seed``)
        without replacement; all of them when the data has fewer. Every model uses the
        same examples.
    weights
        ``lambda_i``, one per model in the step's order, non-negative; only their ratios
        matter (default: uniform).
    epsilon
        The floor of every Fisher entry (the authors' 1e-6); 0 keeps the Fisher as estimated.
    labels
        ``"expected"``: the exact expectation over classes (one gradient per class and
        example, so its cost grows with the number of classes); ``"sampled"``: one label
        drawn from the model's prediction per example; ``"empirical"``: the true labels.
    normalize
        Divide each ``lambda_i`` by the L2 norm of model ``i``'s whole Fisher (as the
        authors' code does by default).
    batch_size
        Examples whose per-example gradients are computed at once.
    reset_batchnorm
        Recompute BatchNorm running statistics on the step's data after merging.
    seed
        Seed of the choice of examples and of the sampled labels.
    """

    name: ClassVar[str] = "fisher"
    paper: ClassVar[str] = "Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging"

    samples: int = attrs.field(default=256, validator=positive_int)
    # The ignores: mypy's attrs plugin rejects attrs.Converter objects (python/mypy#15736).
    weights: list[float] | None = attrs.field(
        default=None,
        converter=float_list,  # type: ignore[misc]
        validator=_check_weights,
    )
    epsilon: float = attrs.field(default=1e-6, converter=as_float, validator=non_negative)  # type: ignore[misc]
    labels: str = attrs.field(default="expected", validator=one_of(*LABELS))
    normalize: bool = attrs.field(default=False, validator=boolean)
    batch_size: int = attrs.field(default=32, validator=positive_int)
    reset_batchnorm: bool = attrs.field(default=True, validator=boolean)
    seed: int = attrs.field(default=0, validator=integer)

    def examples(self, data: ImageDataset) -> tuple[Tensor, Tensor]:
        """The images and labels the Fishers are estimated on: ``samples`` items drawn with ``seed``, in data order."""
        n = len(data)
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[: min(self.samples, n)]
        items = [data[int(i)] for i in chosen.sort().values]
        return torch.stack([image for image, _ in items]), torch.as_tensor([label for _, label in items])

    def merge(
        self, models: Mapping[str, nn.Module], context: Context, alignment: Alignment | None = None
    ) -> MergeResult:
        """Estimate every model's diagonal Fisher on ``context.data`` and merge the models with them.

        Returns
        -------
        MergeResult
            ``model``: a copy of the first model holding the merge. ``results``:

            - ``weights`` (dim ``model``): the ``lambda_i``, normalised to sum to 1;
            - ``fisher_mass`` (dim ``model``): the sum of the model's Fisher over every
              parameter entry (the trace of the diagonal Fisher);
            - ``fisher_mean`` (dims ``model``, ``layer``): the mean Fisher entry of each
              module's parameters;
            - ``share`` (dims ``model``, ``layer``): the mean weight of the model in the
              merge of each module's entries (summing to 1 over the models);
            - ``mean_share`` (dim ``model``): the same over every parameter entry;
            - ``below_floor`` (dim ``model``): the fraction of entries whose Fisher is
              under ``epsilon``;
            - scalars ``samples`` (examples used), ``labels``, ``unweighted_entries``
              (entries where no model had a Fisher: the plain average),
              ``distance_from_average`` (``||theta* - theta_avg|| / ||theta_avg||`` over the
              parameters), ``batchnorm_statistics`` (``"recomputed"``, ``"averaged"`` or
              ``"none"``), ``loss`` and ``accuracy`` of the merge, ``average_loss`` and
              ``average_accuracy`` of the plain weighted average treated alike.

        Raises
        ------
        ConfigError
            Fewer than two models, no data, models whose parameters do not match, a
            weight count that does not match the models, an alignment whose reference is
            not a step model, or ``labels = "empirical"`` on data of other classes.
        """
        names = list(models)
        if len(names) < 2:
            raise ConfigError(f"fisher merging needs at least two models, got {names}", where="key 'models'")
        if self.weights is not None and len(self.weights) != len(names):
            raise ConfigError(
                f"'weights' has {len(self.weights)} values but the step has {len(names)} models ({', '.join(names)})",
                where="key 'weights'",
            )
        if context.data is None:
            raise ConfigError(
                "fisher estimates each model's Fisher information on data, but the pipeline has no [data]: "
                "add a [data] table (a split of the models' task)",
                where="key 'data'",
            )
        if len(context.data) == 0:
            raise ConfigError(
                "fisher needs examples to estimate the Fisher on, but the data is empty", where="key 'data'"
            )
        models = aligned_models(models, alignment, context)  # the reference's unit order first
        states = {name: models[name].state_dict() for name in names}
        try:
            check_compatible(states)
        except ValueError as exc:
            raise ConfigError(f"cannot merge models {names}: {exc}", where="key 'models'") from exc

        raw = np.asarray(self.weights if self.weights is not None else [1.0] * len(names), dtype=float)
        weights = raw / raw.sum()
        images, labels = self.examples(context.data)
        if self.labels == "empirical":
            self._check_labels(models[names[0]], images, labels)
        fishers = {name: self._fisher(models[name], images, labels, context, name) for name in names}

        template = models[names[0]]
        merged, average, results = self._combine(names, states, fishers, weights)
        merged_model = build_model(template, merged, context, reset=self.reset_batchnorm)
        average_model = build_model(template, average, context, reset=self.reset_batchnorm)
        results["samples"] = len(images)
        results["labels"] = self.labels
        if not running_stat_keys(template):
            results["batchnorm_statistics"] = "none"
        else:
            results["batchnorm_statistics"] = "recomputed" if self.reset_batchnorm else "averaged"
        evaluation = context.evaluate(merged_model)
        results["loss"] = float(evaluation.loss)
        results["accuracy"] = float(evaluation.accuracy)
        baseline = context.evaluate(average_model)
        results["average_loss"] = float(baseline.loss)
        results["average_accuracy"] = float(baseline.accuracy)
        return MergeResult(merged_model, results)

    def _combine(
        self,
        names: list[str],
        states: Mapping[str, Mapping[str, Tensor]],
        fishers: Mapping[str, Mapping[str, Tensor]],
        weights: np.ndarray,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], xr.Dataset]:
        """The Fisher-merged state, the plain weighted average, and what the merge did (per model and layer)."""
        lam = torch.as_tensor(weights, dtype=torch.float64)
        if self.normalize:
            norms = [math.sqrt(math.fsum(float(f.pow(2).sum()) for f in fishers[n].values())) for n in names]
            # A model with no Fisher at all has nothing to normalise; the floor handles it.
            lam = lam / torch.as_tensor([norm if norm > 0 else 1.0 for norm in norms], dtype=torch.float64)
        # BatchNorm statistics, other float buffers and integer buffers; parameters are replaced below.
        average = average_states([states[name] for name in names], list(weights))
        merged = dict(average)
        keys = [key for key in fishers[names[0]] if key in merged]
        layers = list(dict.fromkeys(_layer_of(key) for key in keys))
        n_models = len(names)
        fisher_sum = np.zeros((n_models, len(layers)))
        share_sum = np.zeros((n_models, len(layers)))
        counts = np.zeros(len(layers))
        below = np.zeros(n_models)
        unweighted = 0
        diff_sq, avg_sq = 0.0, 0.0
        for key in keys:
            f = torch.stack([fishers[name][key] for name in names])
            values = torch.stack([states[name][key].detach().to(f.device, torch.float64) for name in names])
            shares = merge_shares(f, lam, self.epsilon)
            result = (shares * values).sum(dim=0)
            target = merged[key]
            merged[key] = result.to(device=target.device, dtype=target.dtype)

            j = layers.index(_layer_of(key))
            per_model = f.reshape(n_models, -1)
            fisher_sum[:, j] += per_model.sum(dim=1).cpu().numpy()
            share_sum[:, j] += shares.reshape(n_models, -1).sum(dim=1).cpu().numpy()
            counts[j] += per_model.shape[1]
            below += (per_model < self.epsilon).sum(dim=1).cpu().numpy()
            unweighted += int(((lam.to(f).view(-1, 1) * per_model.clamp_min(self.epsilon)).sum(dim=0) == 0).sum())
            plain = average[key].detach().to(f.device, torch.float64)
            diff_sq += float((result - plain).pow(2).sum())
            avg_sq += float(plain.pow(2).sum())

        total = max(float(counts.sum()), 1.0)
        layer_counts = np.maximum(counts, 1.0)
        results = xr.Dataset(
            {
                "weights": ("model", weights),
                "fisher_mass": ("model", fisher_sum.sum(axis=1)),
                "fisher_mean": (("model", "layer"), fisher_sum / layer_counts),
                "share": (("model", "layer"), share_sum / layer_counts),
                "mean_share": ("model", share_sum.sum(axis=1) / total),
                "below_floor": ("model", below / total),
            },
            coords={"model": names, "layer": np.asarray(layers, dtype=str)},
        )
        results["unweighted_entries"] = unweighted
        results["distance_from_average"] = math.sqrt(diff_sq / avg_sq) if avg_sq > 0 else 0.0
        return merged, average, results

    def _fisher(
        self, model: nn.Module, images: Tensor, labels: Tensor, context: Context, name: str
    ) -> dict[str, Tensor]:
        """One model's diagonal Fisher, in evaluation mode (its mode is restored afterwards)."""
        was_training = model.training
        model.eval()
        try:
            return diagonal_fisher(
                model,
                images,
                labels,
                mode=self.labels,
                # The same stream for every model: the sampled labels differ only through the models' predictions.
                generator=torch.Generator().manual_seed(self.seed),
                batch_size=self.batch_size,
                progress=context.progress,
                desc=f"fisher {name}",
            )
        finally:
            model.train(was_training)

    @staticmethod
    def _check_labels(model: nn.Module, images: Tensor, labels: Tensor) -> None:
        """The empirical Fisher needs a class the model outputs for every label: checked on one forward pass."""
        was_training = model.training
        model.eval()  # one example through BatchNorm in training mode would fail
        try:
            with torch.no_grad():
                classes = model(images[:1].to(next(model.parameters()).device)).shape[1]
        finally:
            model.train(was_training)
        if int(labels.max()) >= classes:
            raise ConfigError(
                f"labels = 'empirical' takes the data's labels as the models' classes, but the data has label "
                f"{int(labels.max())} and the models output {classes} classes: use data of the models' own classes, "
                "or labels = 'expected'",
                where="key 'labels'",
            )

    def describe(self, result: xr.Dataset) -> str:
        """One line: how the Fishers were estimated, each model's mean share, the merge's and the average's scores."""
        shares = "/".join(f"{float(v):.2f}" for v in np.atleast_1d(result["mean_share"].values))
        line = f"{str(result['labels'].values)} Fisher on {int(result['samples'])} samples, mean shares {shares}"
        if "accuracy" in result:
            line += (
                f": accuracy {float(result['accuracy']):.3f}, loss {float(result['loss']):.3f} "
                f"(plain average {float(result['average_accuracy']):.3f})"
            )
        return line


@hookimpl
def register_mergers(register):
    """Register :class:`Fisher`."""
    register(Fisher)
