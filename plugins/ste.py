"""Git Re-Basin's straight-through estimator: learn the permutation from the midpoint's loss.

Ainsworth et al. (2023), Sec. 3.3 and Algorithm 2. Weight matching chooses the
permutation ``pi`` of model B that best lines up its weights with model A's; the
straight-through estimator (STE) chooses it for what it is used for, the loss of the
merged midpoint on data:

    min over pi   L( (theta_A + pi(theta_B)) / 2 )

``pi`` is discrete, so the STE learns a free copy ``W~`` of the weights instead and
reads the permutation off it by projection, weight matching of ``W~`` onto ``theta_B``:

    pi_W = argmax over pi  sum over layers <W~_l, pi(theta_B)_l>

The forward pass uses the projected weights but the backward pass treats the projection
as the identity (the straight-through trick, ``stop_grad`` being :meth:`Tensor.detach`):

    W_ste = pi_W(theta_B) + W~ - stop_grad(W~)          (value pi_W(theta_B), d W_ste / d W~ = I)
    loss  = cross_entropy( f(x; (theta_A + W_ste) / 2), y )

so ``d loss / d W~ = 1/2 * grad L`` at the midpoint, the gradient with respect to the
midpoint's second half. Every iteration projects ``W~`` (weight matching warm-started
from the previous permutation, :func:`mergescope_plugins.weight_matching.match_weights`),
takes a forward and backward pass of the midpoint on a batch and an Adam step on ``W~``.
``W~`` starts at ``theta_A`` (as in the authors' code), so the first projection is plain
weight matching of A and B and zero epochs give weight matching's permutation. ``W~``
holds the parameters only: torch's BatchNorm is not differentiable in its running
statistics, so where those count in the matching cost the reference's stand for them.

Which permutation is returned: the authors' code keeps the permutation with the lowest
loss on a single batch seen during training. A batch's loss compares permutations on
different images, so here the permutation projected at the end of every epoch (epoch 0
being weight matching's) is scored on the whole step's data and the best is kept
(``keep = "best"``, never worse than weight matching on that data); ``keep = "last"``
returns the final projection, the permutation Algorithm 2 ends with.

BatchNorm: the midpoint of two networks has no running statistics of its own (the
average of the two models' describes neither, the reason for REPAIR and BatchNorm
resets), so by default (``midpoint_statistics = "batch"``) the midpoint's BatchNorm
layers normalise each batch with that batch's statistics, in training and in scoring
(in a fixed random order of the data, :func:`mergescope.batchnorm.statistics_batches`;
a last batch of one image joins the one before): the loss of the midpoint as it will be
once its statistics are measured again. ``"running"`` uses the average of the stored
statistics instead.

The optimiser is Adam at ``lr = 1e-3`` by default, a step small beside the weights of a
convolutional network (the authors' code uses SGD with momentum 0.9 at a learning rate of
0.01, batches of 1000 and 250 epochs on MNIST); small MLPs move faster with ``1e-2``.
``W~`` and Adam's state keep the models' dtype; forward passes run at the run's precision.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import ClassVar

import attrs
import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn
from torch.func import functional_call

from mergescope.batchnorm import batchnorm_layers, running_stat_keys, statistics_batches
from mergescope.components import Alignment, Context, ImageDataset
from mergescope.devices import autocast
from mergescope.errors import ConfigError
from mergescope.groups import ChannelGroup, channel_groups, example_input, permutation_matrix
from mergescope.hookspecs import hookimpl
from mergescope.loading import make_loader, to_device
from mergescope.states import check_compatible
from mergescope.validators import as_float, boolean, integer, non_negative_int, one_of, optional, positive, positive_int
from mergescope_plugins.weight_matching import match_weights, without_parameters

__all__ = [
    "straight_through",
    "midpoint",
    "permute_tensors",
    "midpoint_loss",
    "score_midpoint",
    "check_midpoint_inputs",
    "StraightThroughEstimator",
    "register_aligners",
]

STATISTICS = ("batch", "running")
KEEP = ("best", "last")


# ------------------------------------------------------------------------- the math


def straight_through(projected: Mapping[str, Tensor], free: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``projected + free - stop_grad(free)``: the value of ``projected``, the gradient of ``free``.

    Parameters
    ----------
    projected
        The permuted weights ``pi(theta_B)`` by state-dict key.
    free
        The learned weights ``W~`` (a subset of the keys); the other keys pass as they are.

    Returns
    -------
    dict
        Tensors equal to ``projected`` whose gradient flows to ``free`` unchanged.
    """
    return {k: v + (free[k] - free[k].detach()) if k in free else v for k, v in projected.items()}


def midpoint(first: Mapping[str, Tensor], second: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``(first + second) / 2`` entry by entry (floating entries only; ``first``'s keys)."""
    return {k: 0.5 * (v + second[k]) for k, v in first.items() if v.is_floating_point()}


def permute_tensors(
    state: Mapping[str, Tensor], groups: Sequence[ChannelGroup], perms: Mapping[str, np.ndarray]
) -> dict[str, Tensor]:
    """Apply ``{group: perm}`` to every axis of every group in a state dict of tensors.

    ``perm[j]`` is the unit placed at position ``j``, as in
    :func:`mergescope_plugins.weight_matching.permute_arrays`, which does the same on
    NumPy arrays; this one keeps the tensors on their device (and in the autograd graph).
    """
    out = dict(state)
    for g in groups:
        for ax in g.axes:
            w = out[ax.param]
            index = np.arange(w.shape[ax.axis])
            start, stop = ax.span(g.size)
            index[start:stop] = ax.entries(perms[g.name])
            out[ax.param] = w.index_select(ax.axis, torch.as_tensor(index, device=w.device))
    return out


def midpoint_loss(
    shell: nn.Module, weights: Mapping[str, Tensor], images: Tensor, labels: Tensor, precision: str = "fp32"
) -> Tensor:
    """Mean cross-entropy of ``shell`` run with ``weights`` on a batch (differentiable in ``weights``).

    ``shell`` gives the architecture and the mode of its layers (BatchNorm in training
    mode normalises with the batch's statistics and updates the running statistics held
    in ``weights`` in place); its own parameters are not used for the keys of ``weights``.
    """
    with autocast(images.device, precision):
        logits = functional_call(shell, dict(weights), (images,))
    return nn.functional.cross_entropy(logits.float(), labels)


def score_midpoint(
    shell: nn.Module, weights: Mapping[str, Tensor], data: ImageDataset, batch_size: int, precision: str = "fp32"
) -> tuple[float, float]:
    """Cross-entropy and accuracy of ``shell`` run with ``weights`` over all of ``data`` (no gradient).

    The images come in a fixed random order (:func:`mergescope.batchnorm.statistics_batches`),
    a last batch of one image joined to the one before, so that BatchNorm layers in training
    mode normalise every batch with statistics of its own.
    """
    device = next(iter(weights.values())).device
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for cpu_images, cpu_labels in _joined(statistics_batches(data, batch_size, device)):
            images, labels = to_device(cpu_images, device), to_device(cpu_labels, device)
            # Batch-statistic BatchNorm writes its running statistics into `weights` but never reads them.
            with autocast(device, precision):
                logits = functional_call(shell, dict(weights), (images,)).float()
            total += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=1) == labels).sum())
            count += len(labels)
    return total / count, correct / count


def check_midpoint_inputs(
    aligner: str, learns: str, models: Mapping[str, nn.Module], reference: str, context: Context
) -> tuple[list[str], ImageDataset]:
    """What an aligner learning from the merged midpoint's loss checks before any work.

    Returns the models other than the reference and the step's data.

    Raises
    ------
    ConfigError
        Fewer than two models or a reference not among them, no ``[data]`` (or an empty
        one), or models of different architectures.
    """
    others = [m for m in models if m != reference]
    if reference not in models or not others:
        raise ConfigError(
            f"{aligner} aligns other models to a reference among them; got reference {reference!r} and models "
            f"{list(models)}",
            where="key 'models'",
        )
    data = context.data
    if data is None or len(data) == 0:
        raise ConfigError(
            f"{aligner} learns {learns} from the loss of the merged midpoint on labelled images and needs [data] "
            "(with at least one image); add a [data] table to the pipeline or give the step its own data"
        )
    try:
        check_compatible({m: models[m].state_dict() for m in (reference, *others)})
    except ValueError as exc:
        raise ConfigError(f"cannot align models {[reference, *others]}: {exc}", where="key 'models'") from exc
    return others, data


# ------------------------------------------------------------------------ helpers


def _arrays(state: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().double().numpy() for k, v in state.items() if v.is_floating_point()}


def _changed(old: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray]) -> int:
    """Units placed differently by two permutations, over all groups."""
    return int(sum(np.count_nonzero(np.asarray(old[g]) != np.asarray(new[g])) for g in new))


def _joined(batches: Iterable[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    """The batches, a last one of a single image joined to the one before.

    BatchNorm cannot normalise one image with statistics of its own (a linear layer's
    features would have no variance), and only the last batch can be that small.
    """
    held = None
    for images, labels in batches:
        if held is not None and len(labels) == 1:
            images, labels = torch.cat([held[0], images]), torch.cat([held[1], labels])
        elif held is not None:
            yield held
        held = (images, labels)
    if held is not None:
        yield held


def _shell(model: nn.Module, statistics: str) -> nn.Module:
    """A copy of ``model`` to run with other weights: evaluation mode, BatchNorm in training mode for ``"batch"``."""
    shell = copy.deepcopy(model).eval()
    if statistics == "batch":
        for layer in batchnorm_layers(shell).values():
            layer.train()
    return shell


@attrs.define
class _Fit:
    """What the optimisation of one model's permutation produced."""

    perms: dict[str, np.ndarray]
    iteration_loss: list[float]
    iteration_changes: list[int]
    iteration_epoch: list[int]
    epoch_loss: list[float]
    epoch_accuracy: list[float]
    epoch_changes: list[int]
    from_weight_matching: list[int]
    kept_epoch: int


@attrs.define
class StraightThroughEstimator:
    """Learn each model's permutation onto the reference by the loss of their midpoint (Git Re-Basin STE).

    A free copy ``W~`` of the weights, started at the reference's, is projected onto the
    permutations of the other model by weight matching; the midpoint of the reference
    and the projected model is run on a batch of the step's data, and the gradient of
    its cross-entropy passes straight through the projection to ``W~`` (Adam). With
    several models, each is aligned to the reference in turn.

    Parameters
    ----------
    epochs
        Passes over the step's data (0: weight matching's permutation).
    lr
        Adam's learning rate for ``W~``.
    batch_size
        Images per iteration; unset: the step's batch size.
    seed
        Seeds the order of the images and the group order of every weight matching.
    max_iter
        Sweeps over all groups at most, per projection (each starts from the previous
        permutation, so after the first one a projection takes a sweep or two).
    batchnorm_statistics
        Include BatchNorm running means and variances in the projection's matching cost,
        as the ``weight-matching`` option of that name (they move with their channels either way).
    midpoint_statistics
        What the midpoint's BatchNorm layers normalise with: ``"batch"``, each batch's own
        statistics (the midpoint as it is once its statistics are measured again);
        ``"running"``, the average of the two models' stored statistics.
    keep
        ``"best"``: of the permutations projected at the end of each epoch and weight
        matching's, the one whose midpoint has the lowest loss on the whole data;
        ``"last"``: the final projection.
    """

    name: ClassVar[str] = "ste"
    paper: ClassVar[str] = "Ainsworth et al. 2023, Git Re-Basin: Merging Models modulo Permutation Symmetries"

    epochs: int = attrs.field(default=10, validator=non_negative_int)
    lr: float = attrs.field(default=1e-3, converter=as_float, validator=positive)
    batch_size: int | None = attrs.field(default=None, validator=optional(positive_int))
    seed: int = attrs.field(default=0, validator=integer)
    max_iter: int = attrs.field(default=100, validator=positive_int)
    batchnorm_statistics: bool = attrs.field(default=True, validator=boolean)
    midpoint_statistics: str = attrs.field(default="batch", validator=one_of(*STATISTICS))
    keep: str = attrs.field(default="best", validator=one_of(*KEEP))

    def align(self, models: Mapping[str, nn.Module], reference: str, context: Context) -> Alignment:
        """Learn the permutation of every other model onto ``reference``.

        Raises
        ------
        ConfigError
            No ``[data]`` (or an empty one), fewer than two models, models of different
            architectures, or models whose outputs are not one logit per class of the data.
        """
        others, data = check_midpoint_inputs("ste", "permutations", models, reference, context)
        batch_size = self.batch_size or context.batch_size
        batch_statistics = self.midpoint_statistics == "batch" and batchnorm_layers(models[reference])
        if batch_statistics and min(batch_size, len(data)) < 2:
            raise ConfigError(
                f"with midpoint_statistics = 'batch' the midpoint's BatchNorm layers normalise each batch with its own "
                f"statistics, which needs two images or more; got batches of {batch_size} from {len(data)} images "
                "(raise batch_size, or set midpoint_statistics = 'running')",
                where="key 'batch_size'",
            )
        x = example_input(data)
        self._check_outputs(models[reference], x, data)
        groups = channel_groups(models[reference], x)
        cost_groups = (
            groups if self.batchnorm_statistics else without_parameters(groups, running_stat_keys(models[reference]))
        )

        fits = {m: self._fit(models[reference], models[m], groups, cost_groups, data, context, m) for m in others}
        transforms = {m: {name: permutation_matrix(p) for name, p in fit.perms.items()} for m, fit in fits.items()}
        return Alignment(reference, transforms, self._diagnostics(fits, groups))

    def _check_outputs(self, model: nn.Module, x: Tensor, data: ImageDataset) -> None:
        device = next(model.parameters()).device
        with torch.no_grad():
            logits = _shell(model, "running")(to_device(x, device))
        top = int(np.max(data.labels))
        if logits.ndim != 2 or logits.shape[1] <= top:
            raise ConfigError(
                f"ste minimises the cross-entropy of the merged midpoint, so the models must give one logit per "
                f"class; they give outputs of shape {tuple(logits.shape[1:])} per image, but [data] "
                f"{data.name!r} has labels up to {top}"
            )

    def _fit(
        self,
        reference: nn.Module,
        other: nn.Module,
        groups: Sequence[ChannelGroup],
        cost_groups: Sequence[ChannelGroup],
        data: ImageDataset,
        context: Context,
        name: str,
    ) -> _Fit:
        device = next(reference.parameters()).device
        batch_size = self.batch_size or context.batch_size
        theta_a = {k: v.detach() for k, v in reference.state_dict().items()}
        theta_b = {k: v.detach().to(device) for k, v in other.state_dict().items()}
        a_arrays, b_arrays = _arrays(theta_a), _arrays(theta_b)
        shell = _shell(reference, self.midpoint_statistics)
        # W~ holds the parameters. Running statistics get no gradient (torch's BatchNorm is not
        # differentiable in them), so in the projection they stay the reference's.
        learned = {k for k, _ in reference.named_parameters()}
        free = {k: theta_a[k].clone().requires_grad_(True) for k in theta_a if k in learned}
        optimizer = torch.optim.Adam(list(free.values()), lr=self.lr)
        rng = np.random.default_rng(self.seed)
        order = torch.Generator().manual_seed(self.seed)

        def project(initial: Mapping[str, np.ndarray] | None, seed: int) -> dict[str, np.ndarray]:
            current = {**a_arrays, **_arrays(free)}
            perms, _ = match_weights(current, b_arrays, cost_groups, seed=seed, max_iter=self.max_iter, initial=initial)
            return perms

        def score(perms: Mapping[str, np.ndarray]) -> tuple[float, float]:
            weights = midpoint(theta_a, permute_tensors(theta_b, groups, perms))
            return score_midpoint(shell, weights, data, batch_size, context.precision)

        weight_matching = project(None, self.seed)
        perms = previous = weight_matching
        loss, accuracy = score(perms)
        fit = _Fit(dict(perms), [], [], [], [loss], [accuracy], [0], [0], 0)
        best = loss
        loader = make_loader(data, batch_size, device=device, shuffle=True, generator=order)
        for epoch in context.progress(range(1, self.epochs + 1), desc=f"ste: {name}", total=self.epochs):
            for cpu_images, cpu_labels in _joined(loader):
                images, labels = to_device(cpu_images, device), to_device(cpu_labels, device)
                new = project(perms, int(rng.integers(2**31)))
                fit.iteration_changes.append(_changed(perms, new))
                perms = new
                projected = permute_tensors(theta_b, groups, perms)
                batch_loss = midpoint_loss(
                    shell, midpoint(theta_a, straight_through(projected, free)), images, labels, context.precision
                )
                optimizer.zero_grad(set_to_none=True)
                batch_loss.backward()
                optimizer.step()
                fit.iteration_loss.append(float(batch_loss.detach()))
                fit.iteration_epoch.append(epoch)
            end = project(perms, int(rng.integers(2**31)))
            loss, accuracy = score(end)
            fit.epoch_loss.append(loss)
            fit.epoch_accuracy.append(accuracy)
            fit.epoch_changes.append(_changed(previous, end))
            fit.from_weight_matching.append(_changed(weight_matching, end))
            perms = previous = end
            if self.keep == "last" or loss < best:
                best, fit.perms, fit.kept_epoch = loss, dict(end), epoch
        return fit

    def _diagnostics(self, fits: Mapping[str, _Fit], groups: Sequence[ChannelGroup]) -> xr.Dataset:
        names = list(fits)
        first = fits[names[0]]
        per_model = {
            "kept_epoch": [f.kept_epoch for f in fits.values()],
            "weight_matching_loss": [f.epoch_loss[0] for f in fits.values()],
            "final_loss": [f.epoch_loss[f.kept_epoch] for f in fits.values()],
            "final_accuracy": [f.epoch_accuracy[f.kept_epoch] for f in fits.values()],
        }
        variables = {k: ("model", np.asarray(v)) for k, v in per_model.items()}
        for key in ("iteration_loss", "iteration_changes"):
            values = [getattr(f, key) for f in fits.values()]
            dtype = np.float64 if key.endswith("loss") else np.int64
            variables[key] = (("model", "iteration"), np.asarray(values, dtype=dtype).reshape(len(names), -1))
        for key in ("epoch_loss", "epoch_accuracy", "epoch_changes", "from_weight_matching"):
            variables[key] = (("model", "epoch"), np.asarray([getattr(f, key) for f in fits.values()]))
        iterations = len(first.iteration_loss)
        coords = {
            "model": names,
            "iteration": np.arange(iterations),
            "iteration_epoch": ("iteration", np.asarray(first.iteration_epoch, dtype=np.int64)),
            "epoch": np.arange(len(first.epoch_loss)),
        }
        diagnostics = xr.Dataset(variables, coords=coords)
        diagnostics["units"] = sum(g.size for g in groups)
        return diagnostics

    def describe(self, result: xr.Dataset) -> str:
        """The midpoint loss of the kept permutation against weight matching's, per model."""
        if "final_loss" not in result:
            return "aligned"
        parts = []
        for m in result["model"].values:
            r = result.sel(model=m)
            kept = int(r["kept_epoch"])
            parts.append(
                f"{m}: midpoint loss {float(r['final_loss']):.4g} "
                f"(weight matching {float(r['weight_matching_loss']):.4g}), epoch {kept} kept, "
                f"{int(r['from_weight_matching'].isel(epoch=kept))} of {int(result['units'])} units placed otherwise"
            )
        return "; ".join(parts)


@hookimpl
def register_aligners(register):
    """Register :class:`StraightThroughEstimator`."""
    register(StraightThroughEstimator)
