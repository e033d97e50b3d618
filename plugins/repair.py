"""REPAIR: renormalise the interpolated network's pre-activations (Jordan et al. 2023).

Interpolating two aligned networks shrinks the variance of their hidden units
("variance collapse"). REPAIR gives every channel of the merged network the mean and
standard deviation that interpolating the endpoints' statistics predicts:

    mu_t = (1 - alpha) mu_A + alpha mu_B,      sigma_t = (1 - alpha) sigma_A + alpha sigma_B

measured at each channel group's last per-channel affine layer before the
nonlinearity (its BatchNorm, else its conv/linear output), over every spatial position.
As in the paper's implementation, the merged network's statistics are measured in one
pass in which every corrected layer already normalises its output with batch
statistics, so each layer sees the corrected layers before it; the corrections are then
folded into the layers' weights (BatchNorm scale and shift, or conv/linear weight and
bias). Since each batch is corrected with its own statistics, the pass draws the items
in a fixed random order (:func:`mergescope.batchnorm.statistics_batches`): a dataset
stored class by class would otherwise give batches of one or two classes. The
``reset-bn`` variant only recomputes BatchNorm running statistics.

Transformers have LayerNorms instead of BatchNorms (``at = "layernorm"``, chosen
automatically for a model with LayerNorms and no BatchNorm). Interpolating them
collapses the variance of the residual stream in the same way, but the stream is the
sum of every block's writes and the skip connections, so a per-channel correction of
the stream itself cannot be folded into one layer. Every read of the stream goes through
a LayerNorm, though (each block's ``ln_1`` and ``ln_2``, the final norm before the
head), and a LayerNorm's output ``y = gamma * x_hat + beta`` is per-channel affine. So
the LayerNorm counterpart corrects each LayerNorm's output, channel by channel, over
every sample and token, to the interpolated endpoint statistics:

    y' = s * y + t,   s = sigma_t / sigma_merged,   t = mu_t - s * mu_merged
    =>  gamma' = s * gamma,   beta' = s * beta + t

which gives the inputs of every attention, MLP and the head the statistics REPAIR
prescribes while the model keeps its structure. (Per-token normalisation by the
LayerNorm already restores each token's overall scale; what the correction restores is
the distribution of each channel over tokens and samples, which the collapse distorts.)
The endpoints' statistics come from the same recording as the BatchNorm path's (a token
layer's over every sample and token), and the folding is the same, with the channel on
the last axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import attrs
import numpy as np
import torch
import xarray as xr
from torch import nn

from mergescope.batchnorm import reset_batchnorm, statistics_batches
from mergescope.components import Alignment, Context, MergeResult
from mergescope.errors import ConfigError
from mergescope.groups import ChannelGroup, align_to_reference, channel_groups, example_input
from mergescope.hookspecs import hookimpl
from mergescope.loading import to_device
from mergescope.states import average_states, build_model, check_compatible
from mergescope.sweeps import default_alphas, loss_barrier
from mergescope.validators import as_float, float_list, list_of, one_of, optional, probability

__all__ = [
    "repair_layers",
    "layernorm_layers",
    "repair_points",
    "channel_axis",
    "renormalise",
    "Repair",
    "register_mergers",
]

VARIANTS = ("repair", "reset-bn")
#: Where the ``repair`` variant corrects: chosen from the model, at the channel groups'
#: BatchNorm or conv/linear outputs, or at every LayerNorm's output.
POINTS = ("auto", "channel-groups", "layernorm")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_AFFINE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def repair_layers(model: nn.Module, groups: Sequence[ChannelGroup]) -> list[str]:
    """The layers whose outputs REPAIR corrects: each group's BatchNorms, else its conv/linear producers."""
    modules = dict(model.named_modules())
    layers: list[str] = []
    for g in groups:
        producers = [p for p in g.producers if p in modules]
        norms = [p for p in producers if isinstance(modules[p], _BN)]
        chosen = norms or [p for p in producers if isinstance(modules[p], _AFFINE)]
        layers.extend(p for p in chosen if p not in layers)
    return layers


def layernorm_layers(model: nn.Module) -> list[str]:
    """Every LayerNorm of ``model``, in module order: the points the LayerNorm path corrects."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)]


def repair_points(model: nn.Module, points: str = "auto") -> str:
    """Where REPAIR corrects ``model``: ``points``, with ``"auto"`` resolved from the model's norms.

    ``"auto"`` is ``"layernorm"`` for a model with LayerNorms and no BatchNorm (a
    transformer), else ``"channel-groups"``.
    """
    if points != "auto":
        return points
    kinds = [type(m) for m in model.modules()]
    has_ln = any(issubclass(k, nn.LayerNorm) for k in kinds)
    has_bn = any(issubclass(k, _BN) for k in kinds)
    return "layernorm" if has_ln and not has_bn else "channel-groups"


def channel_axis(module: nn.Module) -> int:
    """The axis of ``module``'s output that indexes its channels: last for LayerNorm and Linear, else 1."""
    return -1 if isinstance(module, (nn.LayerNorm, nn.Linear)) else 1


def _channel_rows(out: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """Channels last, one row per sample and position (or token)."""
    if out.ndim <= 2:
        return out
    return out.movedim(axis, -1).reshape(-1, out.shape[axis])


def _absorbs(module: nn.Module) -> bool:
    """Whether a per-channel affine correction of the module's output folds into its own parameters."""
    if isinstance(module, _BN):
        return True
    if isinstance(module, nn.LayerNorm):
        return module.weight is not None and module.bias is not None and len(module.normalized_shape) == 1
    return isinstance(module, _AFFINE) and module.bias is not None


def renormalise(
    model: nn.Module,
    layers: Sequence[str],
    target_mean: Mapping[str, np.ndarray],
    target_std: Mapping[str, np.ndarray],
    context: Context,
    eps: float = 1e-5,
    measured: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> nn.Module:
    """Give ``layers`` of ``model`` (in place) the target per-channel mean and std on ``context.data``.

    Each layer's output ``y`` becomes ``s * y + t`` with ``s = target_std / (std + eps)``
    and ``t = target_mean - s * mean``, ``mean`` and ``std`` measured over every sample
    and position (token) with the layers before it already corrected; the correction
    is folded into the layer's own affine parameters (BatchNorm or LayerNorm scale and
    shift, conv/linear weight and bias).

    Parameters
    ----------
    measured
        When given, receives ``{layer: (mean, std)}``, the merged model's statistics
        before the correction (float64).

    Raises
    ------
    ConfigError
        A layer to correct is neither a BatchNorm, a LayerNorm with a scale and a shift,
        nor a conv/linear layer with a bias.
    """
    modules = dict(model.named_modules())
    sums = {layer: None for layer in layers}

    def hook_for(layer: str):
        mean_t = torch.as_tensor(target_mean[layer], dtype=torch.float32)
        std_t = torch.as_tensor(target_std[layer], dtype=torch.float32)
        axis = channel_axis(modules[layer])

        def hook(_module: nn.Module, _inputs: object, out: torch.Tensor) -> torch.Tensor:
            rows = _channel_rows(out, axis).double()
            batch = torch.stack([rows.sum(0), (rows**2).sum(0), torch.full_like(rows[0], len(rows))])
            sums[layer] = batch if sums[layer] is None else sums[layer] + batch
            # Corrected with batch statistics, so later layers see a repaired input.
            shape = [1] * out.ndim
            shape[axis] = -1
            mu = rows.mean(0).float().view(shape)
            sd = rows.std(0, unbiased=False).float().view(shape)
            target_sd, target_mu = std_t.to(out.device).view(shape), mean_t.to(out.device).view(shape)
            return (out - mu) / (sd + eps) * target_sd + target_mu

        return hook

    for layer in layers:
        module = modules[layer]
        if not _absorbs(module):
            raise ConfigError(
                f"REPAIR corrects layer {layer!r} ({type(module).__name__}), which has no per-channel scale and "
                "shift to absorb the correction (a BatchNorm, a LayerNorm with elementwise_affine and a bias, or a "
                "conv/linear layer with a bias)"
            )
    handles = [modules[layer].register_forward_hook(hook_for(layer)) for layer in layers]
    model.eval()
    try:
        # Each batch is normalised with its own statistics: it must sample the whole set.
        device = next(model.parameters()).device  # the run's device: the batches go where the model is
        loader = statistics_batches(context.data, context.batch_size, device)
        with torch.no_grad():
            for images, _ in context.progress(loader, desc="REPAIR statistics", total=len(loader)):
                model(to_device(images, device))
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for layer in layers:
            total, squares, count = sums[layer]
            mean = total / count
            std = (squares / count - mean**2).clamp_min(0).sqrt()
            if measured is not None:
                measured[layer] = (mean.cpu().numpy(), std.cpu().numpy())
            scale = torch.as_tensor(target_std[layer], dtype=torch.float64, device=std.device) / (std + eps)
            shift = torch.as_tensor(target_mean[layer], dtype=torch.float64, device=mean.device) - mean * scale
            module = modules[layer]
            weight_shape = (-1,) + (1,) * (module.weight.ndim - 1)
            # y' = scale * y + shift, folded into the layer's own affine parameters
            module.weight.mul_(scale.to(module.weight.dtype).view(weight_shape))
            module.bias.mul_(scale.to(module.bias.dtype)).add_(shift.to(module.bias.dtype))
    return model


def _interpolate(first: nn.Module, second: nn.Module, alpha: float) -> nn.Module:
    state = average_states([first.state_dict(), second.state_dict()], [1.0 - alpha, alpha])
    return build_model(first, state)


@attrs.define
class Repair:
    """Interpolate two aligned models and renormalise every channel to the interpolated endpoint statistics (REPAIR).

    Parameters
    ----------
    alpha
        The returned merge: ``(1 - alpha) theta_A + alpha theta_B``, repaired.
    alphas
        Also repair and evaluate every point of this sweep (``[]``: none; unset:
        ``0, 0.05, ..., 1``), giving ``loss`` / ``accuracy`` on dim ``alpha`` and the
        barriers.
    variant
        ``"repair"`` (renormalise every correction point) or ``"reset-bn"`` (only recompute
        BatchNorm running statistics, the simpler fix for networks with BatchNorm).
    points
        Where ``"repair"`` corrects: ``"channel-groups"`` (each channel group's BatchNorm,
        else its conv/linear output), ``"layernorm"`` (every LayerNorm's output, for
        transformers), or ``"auto"``: ``"layernorm"`` for a model with LayerNorms and no
        BatchNorm, else ``"channel-groups"``.
    """

    name: ClassVar[str] = "repair"
    paper: ClassVar[str] = "Jordan et al. 2023, REPAIR: REnormalizing Permuted Activations for Interpolation Repair"

    alpha: float = attrs.field(default=0.5, converter=as_float, validator=probability)
    alphas: list[float] | None = attrs.field(
        default=None, converter=float_list, validator=optional(list_of(probability))
    )
    variant: str = attrs.field(default="repair", validator=one_of(*VARIANTS))
    points: str = attrs.field(default="auto", validator=one_of(*POINTS))

    def _repaired(
        self,
        a: nn.Module,
        b: nn.Module,
        alpha: float,
        layers: list[str],
        stats,
        context: Context,
        measured: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ):
        merged = _interpolate(a, b, alpha)
        if self.variant == "reset-bn":
            return reset_batchnorm(merged, context.data, batch_size=context.batch_size, progress=context.progress)
        (mean_a, std_a), (mean_b, std_b) = stats
        target_mean = {layer: (1 - alpha) * mean_a[layer] + alpha * mean_b[layer] for layer in layers}
        target_std = {layer: (1 - alpha) * std_a[layer] + alpha * std_b[layer] for layer in layers}
        return renormalise(merged, layers, target_mean, target_std, context, measured=measured)

    def _layers(self, model: nn.Module, context: Context) -> tuple[str, list[str], list | None]:
        """Where to correct (resolved ``points``), the layers, and the channel groups when traced."""
        if self.variant != "repair":
            return "none", [], None
        points = repair_points(model, self.points)
        if points == "layernorm":
            layers = layernorm_layers(model)
            if not layers:
                raise ConfigError(
                    f"points = 'layernorm', but the model has no LayerNorm ({type(model).__name__}); use "
                    "points = 'channel-groups' (or 'auto')",
                    where="key 'points'",
                )
            return points, layers, None
        groups = channel_groups(model, example_input(context.data))
        return points, repair_layers(model, groups), groups

    def merge(
        self, models: Mapping[str, nn.Module], context: Context, alignment: Alignment | None = None
    ) -> MergeResult:
        """Repair the interpolation of two models (aligned first when ``alignment`` is given).

        Raises
        ------
        ConfigError
            Not exactly two models, no data to measure statistics on, models that do not
            match, or a layer that cannot absorb the correction.
        """
        names = list(models)
        if len(names) != 2:
            raise ConfigError(f"REPAIR merges two models, got {len(names)}: {names}", where="key 'models'")
        if context.data is None:
            raise ConfigError("REPAIR measures activation statistics and needs [data]")
        try:
            check_compatible({n: models[n].state_dict() for n in names})
        except ValueError as exc:
            raise ConfigError(f"cannot merge models {names}: {exc}", where="key 'models'") from exc
        at, layers, groups = self._layers(models[names[0]], context)
        if alignment is not None:
            if groups is None:
                groups = channel_groups(models[names[0]], example_input(context.data))
            models = align_to_reference(models, alignment, groups, example_input(context.data))
        a, b = models[names[0]], models[names[1]]
        stats = None
        if layers:
            # One recording of both endpoints; token layers' statistics are over every sample and token.
            store = context.record({"a": a, "b": b}, {"a": layers, "b": layers}, keep_activations=False, positions=True)
            stats = tuple(
                (
                    {layer: store.moments(m, layer).mean for layer in layers},
                    {layer: store.moments(m, layer).std for layer in layers},
                )
                for m in ("a", "b")
            )
        measured: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        merged = self._repaired(a, b, self.alpha, layers, stats, context, measured)
        evaluation = context.evaluate(merged)
        results = xr.Dataset(
            {
                "endpoints": ("endpoint", np.asarray(names, dtype=str)),
                "merged_alpha": self.alpha,
                "merged_loss": evaluation.loss,
                "merged_accuracy": evaluation.accuracy,
                "points": at,
                "repaired_layers": ("layer", np.asarray(layers, dtype=str)),
            }
        )
        if layers:
            # How far the merge had drifted from its targets before the correction, per layer
            # (the variance collapse REPAIR undoes: a std ratio below 1).
            (mean_a, std_a), (mean_b, std_b) = stats
            ratios, shifts = [], []
            for layer in layers:
                target_std = (1 - self.alpha) * std_a[layer] + self.alpha * std_b[layer]
                target_mean = (1 - self.alpha) * mean_a[layer] + self.alpha * mean_b[layer]
                mean_m, std_m = measured[layer]
                ratios.append(float(np.mean(std_m) / max(float(np.mean(target_std)), 1e-12)))
                shifts.append(float(np.sqrt(np.mean((mean_m - target_mean) ** 2))))
            results["std_ratio"] = ("layer", np.asarray(ratios))
            results["mean_shift"] = ("layer", np.asarray(shifts))
        points = default_alphas() if self.alphas is None else sorted(set(self.alphas))
        if points:
            points = sorted(set(points) | {0.0, 1.0})
            losses, accuracies = [], []
            for alpha in context.progress(points, desc="REPAIR sweep", total=len(points)):
                e = context.evaluate(self._repaired(a, b, alpha, layers, stats, context))
                losses.append(e.loss)
                accuracies.append(e.accuracy)
            results = results.assign_coords(alpha=("alpha", np.asarray(points)))
            results["loss"] = ("alpha", np.asarray(losses))
            results["accuracy"] = ("alpha", np.asarray(accuracies))
            results["loss_barrier"] = loss_barrier(points, losses)
            results["accuracy_barrier"] = loss_barrier(points, [-x for x in accuracies])
        return MergeResult(merged, results)

    def endpoint_note(self, result: xr.Dataset) -> str:
        """Why the endpoints of the path are not exactly the models as trained."""
        layers = (
            [str(v) for v in np.atleast_1d(result["repaired_layers"].values)] if "repaired_layers" in result else []
        )
        if not layers:  # the reset-bn variant
            return (
                "REPAIR's reset-bn variant recomputes every BatchNorm's running statistics on the step's data at "
                "every point of its path, the endpoints included, where the models' own come from their training; "
                "so the endpoints are not exactly the models as trained."
            )
        return (
            f"REPAIR repairs its endpoints too: at alpha 0 and 1 each corrected layer ({_listed(layers)}) is "
            "renormalised to that endpoint's own per-channel mean and std on the step's data, measured with the "
            "corrected layers before it normalising each batch by its own statistics, then folded into the weights; "
            "so the endpoints are not exactly the models as trained."
        )

    def describe(self, result: xr.Dataset) -> str:
        """Accuracy of the repaired merge (and the barrier of the repaired path)."""
        line = f"{self.variant} at alpha {float(result['merged_alpha']):.2f}: accuracy {float(result['merged_accuracy']):.3f}"
        if "std_ratio" in result:
            where = "LayerNorm outputs" if str(result["points"].values) == "layernorm" else "layers"
            count = int(result["std_ratio"].size)
            line += f"; {count} {where} corrected, std before {float(result['std_ratio'].mean()):.2f} of the target"
        if "loss_barrier" in result:
            line += f"; loss barrier {float(result['loss_barrier']):.3f}"
        return line


def _listed(layers: list[str], most: int = 6) -> str:
    """A list of layer names for a sentence, the middle elided when long (a ViT has many LayerNorms)."""
    if len(layers) <= most:
        return ", ".join(layers)
    return f"{', '.join(layers[:3])}, ... {', '.join(layers[-2:])}; {len(layers)} in all"


@hookimpl
def register_mergers(register):
    """Register :class:`Repair`."""
    register(Repair)
