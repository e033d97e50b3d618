"""AdaMerging: learn the task-arithmetic coefficients by entropy minimisation (Yang et al. 2024).

Task arithmetic adds ``lambda * sum_k tau_k`` to a pre-trained base, where ``tau_k =
theta_k - theta_0`` is the task vector of fine-tune ``k``, with one ``lambda`` chosen by
hand or on labelled validation data. AdaMerging ("AdaMerging: Adaptive Model Merging for
Multi-Task Learning", ICLR 2024) learns the coefficients instead, without labels:

- task-wise AdaMerging, one coefficient per task vector::

      theta = theta_0 + sum_k lambda_k tau_k

- layer-wise AdaMerging, one coefficient per task vector and per layer ``l``::

      theta^l = theta_0^l + sum_k lambda_k^l tau_k^l

The coefficients minimise the Shannon entropy of the merged model's predictions on
unlabeled test images, a surrogate for its loss (the paper shows the two correlate)::

      min_lambda  E_x [ H(p(x; theta(lambda))) ],   H(p) = -sum_c p_c log p_c

by Adam (learning rate 1e-3, betas 0.9 and 0.999, 500 iterations) from ``lambda = 0.3``,
each iteration on a fresh shuffled batch. As in the authors' code, a "layer" is one
parameter tensor (weights and biases have coefficients of their own), and the
coefficients are clipped to ``[0, 1]`` where they are used (``clamp``): a raw coefficient
that leaves the interval stops receiving gradient there.

Differences from the paper's setting
------------------------------------
- The paper merges the image encoders of CLIP and keeps one frozen classification head
  per task; the models here are whole classifiers over one set of classes, so every
  floating entry, the head included, is merged, and the entropy is that of the merged
  head's softmax on the step's data (one dataset instead of one per task).
- Each iteration uses the next ``batch_size`` images of a seeded random permutation of
  the data, a new one per pass (default 32: the authors' code draws two shuffled batches
  of 16 per task and sums their mean entropies; Adam does not see the factor 2).
- BatchNorm (absent from the paper's ViTs): with ``reset_batchnorm`` on, the running
  statistics of the merged model are measured again on the data at the end, so during
  the optimisation the BatchNorm layers normalise with the statistics of each batch, the
  differentiable stand-in for the statistics the merged model will have (entropy
  minimisation at test time does the same, Wang et al. 2021, Tent). With it off, the
  merged model keeps the fine-tunes' averaged running statistics, and the optimisation
  runs in evaluation mode with them. Either way it optimises the model it delivers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import attrs
import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn
from torch.func import functional_call

from mergescope.batchnorm import batchnorm_layers
from mergescope.components import Context, MergeResult
from mergescope.devices import autocast, float64_device
from mergescope.errors import ConfigError
from mergescope.hookspecs import hookimpl
from mergescope.loading import make_loader, to_device
from mergescope.states import build_model
from mergescope.task_vectors import (
    TaskVectorMerger,
    TaskVectors,
    add_to_base,
    aligned_models,
    example_finetunes,
    finish_merge,
    prepare,
)
from mergescope.validators import (
    as_float,
    boolean,
    finite,
    integer,
    non_empty_str,
    non_negative_int,
    one_of,
    optional,
    positive,
    positive_int,
)

__all__ = [
    "GRANULARITIES",
    "softmax_entropy",
    "weighted_task_vector",
    "merged_parameters",
    "coefficients_in_use",
    "Trajectory",
    "learn_coefficients",
    "shuffled_batches",
    "AdaMerging",
    "register_mergers",
]

GRANULARITIES = ("task", "layer")


# ------------------------------------------------------------------- pure functions


def softmax_entropy(logits: Tensor) -> Tensor:
    """``H(softmax(z)) = -sum_c p_c log p_c`` for every row of ``logits`` ``(n, classes)``.

    Computed from ``log_softmax``, so it stays finite when some probabilities underflow.
    Its gradient with respect to the logits is ``-p * (log p + H)``.
    """
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def _column(coefficients: Tensor, position: int) -> Tensor:
    # One column serves every tensor (task-wise), or each tensor has its own (layer-wise).
    return coefficients[:, 0 if coefficients.shape[1] == 1 else position]


def _check_coefficients(coefficients: Tensor, models: int, keys: Sequence[str]) -> None:
    if coefficients.ndim != 2 or coefficients.shape[0] != models or coefficients.shape[1] not in (1, len(keys)):
        raise ValueError(
            f"coefficients must be (n_task_vectors, 1) task-wise or (n_task_vectors, n_tensors) layer-wise, "
            f"i.e. ({models}, 1) or ({models}, {len(keys)}); got {tuple(coefficients.shape)}"
        )


def weighted_task_vector(
    vectors: Sequence[Mapping[str, Tensor]], coefficients: Tensor, keys: Sequence[str]
) -> dict[str, Tensor]:
    """``sum_k lambda_k^l tau_k^l`` for every tensor ``l`` named in ``keys``.

    Parameters
    ----------
    vectors
        The task vectors ``tau_k``, keyed by state-dict entry.
    coefficients
        ``(n_task_vectors, 1)``: one ``lambda_k`` for all tensors (task-wise), or
        ``(n_task_vectors, len(keys))``: ``lambda_k^l`` for tensor ``keys[l]`` (layer-wise).
    keys
        The tensors to combine, in the order of the coefficients' columns.

    Returns
    -------
    dict
        One tensor per key; differentiable in ``coefficients``.
    """
    _check_coefficients(coefficients, len(vectors), keys)
    out = {}
    for position, key in enumerate(keys):
        column = _column(coefficients, position)
        total = column[0] * vectors[0][key]
        for k in range(1, len(vectors)):
            total = total + column[k] * vectors[k][key]
        out[key] = total
    return out


def merged_parameters(
    base: Mapping[str, Tensor], vectors: Sequence[Mapping[str, Tensor]], coefficients: Tensor, keys: Sequence[str]
) -> dict[str, Tensor]:
    """``theta^l = theta_0^l + sum_k lambda_k^l tau_k^l`` for every tensor ``l`` named in ``keys``.

    Task-wise AdaMerging is the case of one column of coefficients, layer-wise
    AdaMerging that of one column per tensor; see :func:`weighted_task_vector`. Each
    result has the dtype of its base tensor.
    """
    delta = weighted_task_vector(vectors, coefficients, keys)
    return {key: (base[key] + delta[key]).to(base[key].dtype) for key in keys}


def coefficients_in_use(raw: Tensor, clamp: bool) -> Tensor:
    """The coefficients the merge uses: ``raw`` clipped to ``[0, 1]`` when ``clamp``, else ``raw``.

    Clipping where they are used (not after each step) is what the authors' code does:
    a raw value outside the interval gets no gradient and stays where it is.
    """
    return raw.clamp(0.0, 1.0) if clamp else raw


@attrs.frozen
class Trajectory:
    """The outcome of :func:`learn_coefficients`.

    Attributes
    ----------
    coefficients
        ``(n_task_vectors, n_columns)``: the coefficients in use after the last update.
    entropy
        ``(iterations,)``: the mean entropy of iteration ``t``'s batch, at the
        coefficients in use before its update.
    path
        ``(iterations, n_task_vectors)``: those coefficients, averaged over the columns
        (over the tensors, layer-wise).
    """

    coefficients: Tensor
    entropy: np.ndarray
    path: np.ndarray


def learn_coefficients(
    entropy_of: Callable[[Tensor, Tensor], Tensor],
    initial: Tensor,
    batches: Iterator[Tensor],
    *,
    iterations: int,
    lr: float,
    clamp: bool,
    progress: Callable[..., Any] | None = None,
) -> Trajectory:
    """Minimise ``entropy_of(coefficients, images)`` over the coefficients with Adam.

    Parameters
    ----------
    entropy_of
        ``(coefficients in use, images) -> scalar``: the mean entropy of the merged
        model's predictions on a batch, differentiable in the coefficients.
    initial
        The starting raw coefficients ``(n_task_vectors, n_columns)`` (not modified).
    batches
        Yields one batch of images per iteration.
    iterations
        Adam steps.
    lr
        Adam's learning rate (betas 0.9 and 0.999, no weight decay).
    clamp
        Clip the coefficients to ``[0, 1]`` where they are used
        (:func:`coefficients_in_use`).
    progress
        ``progress(iterable, desc, total)``, e.g. ``context.progress``.

    Raises
    ------
    FloatingPointError
        The entropy is not finite (a learning rate too large, or overflow at low precision).
    """
    raw = initial.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    steps: Any = range(iterations)
    if progress is not None:
        steps = progress(steps, desc="adamerging", total=iterations)
    curve, path = [], []
    for step in steps:
        used = coefficients_in_use(raw, clamp)
        loss = entropy_of(used, next(batches))
        value = float(loss.detach())
        if not np.isfinite(value):
            raise FloatingPointError(
                f"the entropy of the merged model is {value} at iteration {step}: lower 'lr', or run at "
                "precision 'fp32'"
            )
        curve.append(value)
        path.append(used.detach().mean(dim=1).double().cpu().numpy())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    k = initial.shape[0]
    return Trajectory(
        coefficients_in_use(raw.detach(), clamp),
        np.asarray(curve, dtype=float),
        np.asarray(path, dtype=float).reshape(len(path), k),
    )


def shuffled_batches(data: Any, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[Tensor]:
    """Endless batches of ``data``'s images on ``device``, epoch after epoch in a seeded random order.

    Every batch holds ``min(batch_size, len(data))`` images: each epoch is a permutation
    drawn from ``generator`` cut short to a whole number of batches, so no step weighs a
    few images more (and BatchNorm never meets a batch of one). Labels are dropped: the
    objective does not use them.
    """
    size = min(batch_size, len(data))
    if size < 1:
        raise ValueError("cannot draw batches from an empty dataset")
    usable = len(data) - len(data) % size
    while True:
        order = torch.randperm(len(data), generator=generator)[:usable].tolist()
        for batch in make_loader(torch.utils.data.Subset(data, order), size, device=device):
            yield to_device(batch[0] if isinstance(batch, (tuple, list)) else batch, device)


# ---------------------------------------------------------------------- component


def _check_initial(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    finite(instance, attribute, value)
    if instance.clamp and not 0.0 <= value <= 1.0:
        raise ValueError(
            f"'{attribute.name}' must be in [0, 1] while 'clamp' is on (coefficients are clipped to [0, 1] "
            f"and get no gradient outside it), got {value!r}; set 'clamp = false' to start outside"
        )


def _device_of(model: nn.Module, context: Context) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else context.device


def _delta(inputs: TaskVectors, coefficients: Tensor) -> dict[str, Tensor]:
    """``sum_k lambda_k^l tau_k^l`` in float64, where the task vectors are, as every task-vector merge adds it."""
    keys = inputs.vector_keys
    where = inputs.vectors[0][keys[0]].device if keys else torch.device("cpu")
    return weighted_task_vector(inputs.vectors, coefficients.to(where, torch.float64), keys)


def _mean_entropy(model: nn.Module, context: Context) -> float:
    """Mean entropy of ``model``'s predictions over ``context.data``, in evaluation mode."""
    model.eval()
    device = _device_of(model, context)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in make_loader(context.data, context.batch_size, device=device):
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            with autocast(context.device, context.precision):
                logits = model(to_device(images, device))
            total += float(softmax_entropy(logits.float()).double().sum())
            count += len(images)
    return total / max(count, 1)


@attrs.define
class AdaMerging:
    """Learn task-arithmetic coefficients (per task or per layer) that minimise the merged model's entropy.

    The fine-tunes' task vectors ``tau_k = theta_k - theta_0`` are added to the base with
    coefficients ``lambda_k`` (task-wise) or ``lambda_k^l`` (layer-wise, one per parameter
    tensor), learned by Adam on the mean Shannon entropy of the merged model's softmax
    over batches of the step's data. The labels are not used for learning; they give
    the merged model's loss and accuracy. BatchNorm running statistics are the
    fine-tunes' average, recomputed on the step's data when ``reset_batchnorm`` is on
    (and then replaced by batch statistics during the optimisation). The models must be
    fine-tunes of the base; with an alignment, they are mapped onto its reference first.

    Parameters
    ----------
    base
        Name of the pre-trained base among the step's models (default: the first).
    granularity
        ``"task"``: one coefficient per task vector; ``"layer"``: one per task vector and
        parameter tensor.
    iterations
        Adam steps (the paper: 500). 0 gives task arithmetic with ``lambda = initial``.
    lr
        Adam's learning rate (the paper: 1e-3).
    initial
        Starting value of every coefficient (the paper: 0.3).
    batch_size
        Images per step.
    clamp
        Clip the coefficients to ``[0, 1]`` as the authors' code does.
    seed
        Seed of the batch order.
    reset_batchnorm
        Recompute BatchNorm statistics on the step's data after merging; batch
        statistics are used during the optimisation.
    """

    name: ClassVar[str] = "adamerging"
    paper: ClassVar[str] = "Yang et al. 2024, AdaMerging: Adaptive Model Merging for Multi-Task Learning"

    base: str | None = attrs.field(default=None, validator=optional(non_empty_str))
    granularity: str = attrs.field(default="task", validator=one_of(*GRANULARITIES))
    iterations: int = attrs.field(default=500, validator=non_negative_int)
    # The ignores: mypy's attrs plugin rejects attrs.Converter objects (python/mypy#15736).
    lr: float = attrs.field(default=1e-3, converter=as_float, validator=positive)  # type: ignore[misc]
    initial: float = attrs.field(default=0.3, converter=as_float, validator=_check_initial)  # type: ignore[misc]
    batch_size: int = attrs.field(default=32, validator=positive_int)
    clamp: bool = attrs.field(default=True, validator=boolean)
    seed: int = attrs.field(default=0, validator=integer)
    reset_batchnorm: bool = attrs.field(default=True, validator=boolean)

    @classmethod
    def conformance_models(cls) -> dict[str, nn.Module]:
        """A base (``model0``) and two small fine-tunes of it, for conformance checks."""
        return example_finetunes(2)

    def merge(self, models: Mapping[str, nn.Module], context: Context, alignment: Any = None) -> MergeResult:
        """Learn the coefficients on ``context.data``, merge, and evaluate.

        Returns
        -------
        MergeResult
            ``model``: a copy of the base holding ``theta_0 + sum_k lambda_k tau_k``.
            ``results``: coord ``model`` (the fine-tunes); ``coefficient`` (dim ``model``,
            or ``model`` x ``layer`` layer-wise, with coord ``layer`` naming the tensors)
            and, layer-wise, ``mean_coefficient`` (dim ``model``); ``entropy`` (dim
            ``iteration``: each step's batch entropy) and ``coefficient_path`` (dims
            ``iteration`` x ``model``: the coefficients then, averaged over the tensors);
            ``loss``, ``accuracy`` and ``mean_entropy`` of the merged model on the data, and
            ``initial_loss``, ``initial_accuracy``, ``initial_mean_entropy`` of the merge at
            ``lambda = initial`` (task arithmetic); ``relative_distance`` (dim ``model``),
            ``base``, ``granularity``, ``initial``, ``batchnorm_statistics``.

        Raises
        ------
        ConfigError
            No data, an alignment whose reference is not a model of the step, ``base``
            is not a model of the step, no fine-tune, models of different architectures,
            models that are not fine-tunes of the base, or BatchNorm batch statistics with
            batches of one image.
        """
        data = context.data
        if data is None:
            raise ConfigError(
                "adamerging learns its coefficients by minimising the entropy of the merged model's predictions "
                "on unlabeled images, so it needs data: add [data] to the pipeline or a 'data' table to this step",
                where="key 'data'",
            )
        models = aligned_models(models, alignment, context)
        inputs = prepare(models, self.base, method=self.name)
        statistics = inputs.statistics()
        device = _device_of(inputs.template, context)
        columns = 1 if self.granularity == "task" else len(inputs.vector_keys)
        # float64 coefficients (where the device has float64): 0.3 is then 0.3, and zero
        # iterations give task arithmetic's model. As 0-d factors they keep the tensors' dtype.
        initial = torch.full(
            (len(inputs.names), columns), self.initial, dtype=torch.float64, device=float64_device(device)
        )
        trajectory = learn_coefficients(
            self._objective(inputs, statistics, context, device, batch=min(self.batch_size, len(data))),
            initial,
            shuffled_batches(data, self.batch_size, torch.Generator().manual_seed(self.seed), device),
            iterations=self.iterations,
            lr=self.lr,
            clamp=self.clamp,
            progress=context.progress,
        )
        merged, results = finish_merge(
            inputs,
            _delta(inputs, trajectory.coefficients),
            scaling=1.0,
            scalings=None,
            context=context,
            reset=self.reset_batchnorm,
            method=self.name,
        )
        results = results.drop_vars("merged_scaling")  # the coefficients say it all
        learned = trajectory.coefficients.cpu().numpy()
        if self.granularity == "task":
            results["coefficient"] = ("model", learned[:, 0])
        else:
            results = results.assign_coords(layer=("layer", list(inputs.vector_keys)))
            results["coefficient"] = (("model", "layer"), learned)
            results["mean_coefficient"] = ("model", learned.mean(axis=1))
        results = results.assign_coords(iteration=("iteration", np.arange(self.iterations)))
        results["entropy"] = ("iteration", trajectory.entropy)
        results["coefficient_path"] = (("iteration", "model"), trajectory.path)
        results["granularity"] = self.granularity
        results["initial"] = float(self.initial)
        results["mean_entropy"] = _mean_entropy(merged, context)
        if self.iterations == 0:  # the start is the result
            start = {name: float(results[name]) for name in ("loss", "accuracy", "mean_entropy")}
        else:  # task arithmetic with lambda = initial, to compare with
            state = add_to_base(inputs.base_state, _delta(inputs, initial), overrides=statistics)
            model = build_model(inputs.template, state, context, reset=self.reset_batchnorm)
            evaluation = context.evaluate(model)
            start = {
                "loss": evaluation.loss,
                "accuracy": evaluation.accuracy,
                "mean_entropy": _mean_entropy(model, context),
            }
        for name, value in start.items():
            results[f"initial_{name}"] = float(value)
        return MergeResult(merged, results)

    def _objective(
        self,
        inputs: TaskVectors,
        statistics: Mapping[str, Tensor],
        context: Context,
        device: torch.device,
        *,
        batch: int,
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """``(coefficients, images) -> mean entropy`` of the merge at those coefficients, differentiable in them.

        ``batch`` is the number of images per step, checked when BatchNorm uses batch statistics.
        """
        keys = inputs.vector_keys
        work = copy.deepcopy(inputs.template)
        work.load_state_dict(add_to_base(inputs.base_state, {}, overrides=statistics))
        work.eval().requires_grad_(False)
        norms = batchnorm_layers(work)
        if self.reset_batchnorm and norms:
            if batch < 2:
                raise ConfigError(
                    "with 'reset_batchnorm' on, BatchNorm layers normalise each batch with its own statistics "
                    "while the coefficients are learned, which needs at least 2 images per batch; raise "
                    "'batch_size' (or use more data), or turn 'reset_batchnorm' off",
                    where="key 'batch_size'",
                )
            for module in norms.values():
                module.train()  # batch statistics; this copy's running statistics are thrown away
        base = {key: inputs.base_state[key].detach().to(device) for key in keys}
        vectors = [{key: tau[key].to(device=device, dtype=base[key].dtype) for key in keys} for tau in inputs.vectors]

        def entropy_of(coefficients: Tensor, images: Tensor) -> Tensor:
            params = merged_parameters(base, vectors, coefficients, keys)
            with autocast(context.device, context.precision):
                logits = functional_call(work, params, (images,))
            return softmax_entropy(logits.float()).mean()

        return entropy_of

    def describe(self, result: xr.Dataset) -> str:
        """One line: granularity, base, the coefficients before and after, the entropy, and the score."""
        names = [str(m) for m in result["model"].values]
        learned = result["mean_coefficient"] if "layer" in result.dims else result["coefficient"]
        values = ", ".join(f"{n} {float(v):.3g}" for n, v in zip(names, learned.values))
        what = "mean lambda per tensor" if "layer" in result.dims else "lambda"
        line = (
            f"{str(result['granularity'].values)}-wise, base {str(result['base'].values)!r}, {what} "
            f"{float(result['initial']):g} -> {values} in {result.sizes.get('iteration', 0)} steps, entropy "
            f"{float(result['initial_mean_entropy']):.3g} -> {float(result['mean_entropy']):.3g}"
        )
        return TaskVectorMerger.scored(line, result)


@hookimpl
def register_mergers(register):
    """Register :class:`AdaMerging`."""
    register(AdaMerging)
