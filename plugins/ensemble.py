"""Ensemble: combine the models' predictions instead of their weights.

Not a weight merge: the N models are kept whole, each image goes through all of them,
and their outputs ``z_i(x)`` (logits) are combined:

    combine = "probabilities":    p(y | x) = 1/N sum_i softmax(z_i(x))_y
    combine = "logits":           z(x) = 1/N sum_i z_i(x)
    combine = "max-probability":  p(y | x) proportional to max_i softmax(z_i(x))_y

The first is the usual deep ensemble; the last is how ZipIt! scores a multi-head model
(each class takes its highest probability over the heads, Stoica et al. 2024). The
ensemble costs N forward passes per image and is the upper reference that merges of
models trained on different tasks are measured against ("Ensemble" in ZipIt!'s
Table 1). The combined model outputs log-probabilities for the two probability rules
(logits whose softmax is the combined distribution), so it is evaluated like any
classifier: its loss is the cross-entropy of the combined prediction.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import attrs
import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from mergescope.components import Alignment, Context, MergeResult
from mergescope.errors import ConfigError
from mergescope.hookspecs import hookimpl
from mergescope.states import check_compatible
from mergescope.validators import one_of

__all__ = ["COMBINE", "combine_outputs", "EnsembleModel", "Ensemble", "register_mergers"]

COMBINE = ("probabilities", "logits", "max-probability")


def combine_outputs(outputs: Sequence[Tensor], combine: str = "probabilities") -> Tensor:
    """Combine the logits of several classifiers for the same images.

    Parameters
    ----------
    outputs
        One ``(batch, classes)`` tensor of logits per model.
    combine
        ``"probabilities"``: the log of the mean softmax; ``"logits"``: the mean logits;
        ``"max-probability"``: the log of the largest softmax probability of each class
        over the models (not normalised; its softmax renormalises it).

    Returns
    -------
    torch.Tensor
        ``(batch, classes)`` logits of the combined prediction, in float32 or wider.
    """
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {', '.join(map(repr, COMBINE))}, got {combine!r}")
    if not outputs:
        raise ValueError("combine_outputs needs the outputs of at least one model")
    shapes = {tuple(o.shape) for o in outputs}
    if len(shapes) != 1:
        raise ValueError(f"the models' outputs differ in shape: {sorted(shapes)}")
    # Softmax and logsumexp of half-precision logits (autocast) lose too much: work in float32 at least.
    stacked = torch.stack([o if o.dtype == torch.float64 else o.float() for o in outputs])
    if combine == "logits":
        return stacked.mean(dim=0)
    log_probs = torch.log_softmax(stacked, dim=-1)
    if combine == "max-probability":
        return log_probs.amax(dim=0)
    return torch.logsumexp(log_probs, dim=0) - math.log(len(outputs))


class EnsembleModel(nn.Module):
    """Classifiers run side by side on the same input, their outputs combined by :func:`combine_outputs`.

    Parameters
    ----------
    members
        The classifiers (kept as submodules ``members.0``, ``members.1``, ...).
    combine
        One of :data:`COMBINE`.
    """

    def __init__(self, members: Sequence[nn.Module], combine: str = "probabilities") -> None:
        super().__init__()
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {', '.join(map(repr, COMBINE))}, got {combine!r}")
        self.members = nn.ModuleList(members)
        self.combine = combine

    def forward(self, x: Tensor) -> Tensor:
        """The combined logits of every member for ``x``."""
        return combine_outputs([member(x) for member in self.members], self.combine)

    def extra_repr(self) -> str:
        return f"combine={self.combine!r}"


@attrs.define
class Ensemble:
    """Run the models side by side and combine their predictions (an ensemble, the reference merges aim at).

    Parameters
    ----------
    combine
        ``"probabilities"`` (mean softmax, the default), ``"logits"`` (mean logits) or
        ``"max-probability"`` (each class's highest probability over the models, as
        ZipIt! scores multi-head models).
    """

    name: ClassVar[str] = "ensemble"
    paper: ClassVar[str] = (
        "Stoica et al. 2024, ZipIt! Merging Models from Different Tasks without Training (the ensemble reference)"
    )

    combine: str = attrs.field(default="probabilities", validator=one_of(*COMBINE))

    def merge(
        self, models: Mapping[str, nn.Module], context: Context, alignment: Alignment | None = None
    ) -> MergeResult:
        """Build the ensemble of ``models`` and evaluate it and each member on the step's data.

        Returns
        -------
        MergeResult
            ``model``: an :class:`EnsembleModel` holding copies of the models. ``results``:
            scalars ``loss`` and ``accuracy`` of the ensemble, ``member_loss`` and
            ``member_accuracy`` (dim ``model``).

        Raises
        ------
        ConfigError
            Fewer than two models, an alignment (an ensemble combines predictions, which
            no alignment changes), no data, or models whose parameters do not match.
        """
        names = list(models)
        if len(names) < 2:
            raise ConfigError(f"an ensemble needs at least two models, got {names}", where="key 'models'")
        if alignment is not None:
            raise ConfigError(
                "an ensemble combines the models' predictions, which aligning their units does not change; "
                "remove the 'alignment' key",
                where="key 'alignment'",
            )
        if context.data is None:
            raise ConfigError("the ensemble is evaluated on the step's data, but there is no [data]")
        try:
            # Ensembles of models of one architecture: the reference for merges of those models.
            check_compatible({n: models[n].state_dict() for n in names})
        except ValueError as exc:
            raise ConfigError(f"cannot ensemble models {names}: {exc}", where="key 'models'") from exc
        members = [copy.deepcopy(models[n]).eval() for n in names]
        ensemble = EnsembleModel(members, self.combine).eval()
        own = [context.evaluate(m) for m in context.progress(members, desc="ensemble members", total=len(members))]
        evaluation = context.evaluate(ensemble)
        results = xr.Dataset(
            {
                "loss": evaluation.loss,
                "accuracy": evaluation.accuracy,
                "member_loss": ("model", np.asarray([e.loss for e in own])),
                "member_accuracy": ("model", np.asarray([e.accuracy for e in own])),
            },
            coords={"model": names},
        )
        return MergeResult(ensemble, results)

    def rebuild(self, models: Mapping[str, nn.Module], state: Mapping[str, Tensor]) -> nn.Module:
        """An ensemble of copies of ``models``, into which a saved ensemble's ``state`` loads.

        Parameters
        ----------
        models
            The step's models, in the step's order.
        state
            The saved state dict (the members' weights under ``members.<i>.``).
        """
        return EnsembleModel([copy.deepcopy(m) for m in models.values()], self.combine).eval()

    def describe(self, result: xr.Dataset) -> str:
        """Accuracy of the ensemble beside its members'."""
        members = ", ".join(
            f"{m} {float(a):.3f}" for m, a in zip(result["model"].values, result["member_accuracy"].values)
        )
        return f"ensemble of {result.sizes['model']} models ({self.combine}): accuracy {float(result['accuracy']):.3f} (members: {members})"


@hookimpl
def register_mergers(register):
    """Register :class:`Ensemble`."""
    register(Ensemble)
