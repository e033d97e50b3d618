"""Aligning whole models to a reference with an alignment: :func:`align_to_reference`, and
:func:`align_step_models`, what a merger step does with the alignment it is given.

Kept alone in its own module, on top of :mod:`.permute` and :mod:`.linear`: it decides
per model whether an alignment's transforms are permutations (exact, via
:func:`~.permute.permute`) or general maps (via :func:`~.linear.apply_linear`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import nn

from ..errors import ConfigError
from ..values import CHANNEL_GROUPS, Alignment
from .fold import fold_layernorms, layernorm_paths
from .linear import _is_permutation_matrix, apply_linear, maps_from_transforms
from .model import ChannelGroup
from .permute import perm_from_matrix, permute


def align_to_reference(
    models: Mapping[str, nn.Module],
    alignment: Alignment,
    groups: Sequence[ChannelGroup],
    example_input: Any = None,
) -> dict[str, nn.Module]:
    """Map every model into the reference's unit order (or space) with an alignment.

    Parameters
    ----------
    models
        Name -> model; the alignment's reference and models it has no transforms for
        are returned unchanged (copies are made only for transformed models).
    alignment
        A :class:`mergescope.Alignment` in channel-group space whose groups are those of
        ``groups``.
    groups
        The architecture's groups (:func:`channel_groups` of the reference).
    example_input
        A batch the models accept. Needed only when a map other than a permutation acts
        on a group normalised by LayerNorms: every model, the reference too, then has its
        LayerNorms folded first (:func:`~mergescope.groups.fold_layernorms`), so that the
        map is exact and interpolation pairs like parameters.

    Returns
    -------
    dict
        Name -> aligned model: permuted when every transform is a permutation matrix
        (the function is unchanged), else transformed with :func:`apply_linear`
        (per-channel quantities mixed; re-estimate BatchNorm statistics afterwards).

    Raises
    ------
    ValueError
        The alignment is keyed by layers (its ``space`` is ``"layers"``): such maps act
        on activations and cannot be applied to weights; or it names groups the
        architecture does not have; or LayerNorms must be folded and ``example_input``
        is missing.
    """
    if alignment.space != CHANNEL_GROUPS:
        raise ValueError(
            f"this alignment is in {alignment.space!r} space: its maps act on recorded activations, layer by "
            "layer, and cannot be applied to a model's weights; align with an aligner keyed by channel groups"
        )
    known = {g.name for g in groups}
    if _needs_folding(models, alignment, groups):
        if example_input is None:
            raise ValueError(
                "this alignment maps a LayerNorm-normalised group by more than a permutation, which needs the "
                "LayerNorms folded into their readers first; pass example_input to trace the models"
            )
        models = {name: fold_layernorms(model, example_input)[0] for name, model in models.items()}
    out: dict[str, nn.Module] = {}
    for name, model in models.items():
        transforms = alignment.transforms.get(name)
        if not transforms or name == alignment.reference:
            out[name] = model
            continue
        unknown = sorted(set(transforms) - known)
        if unknown:
            raise ValueError(
                f"the alignment of {name!r} has groups {unknown} that this architecture does not have "
                f"(its groups: {', '.join(sorted(known))})"
            )
        matrices = {g: np.asarray(t.transpose("unit", "unit_ref").values) for g, t in transforms.items()}
        if all(_is_permutation_matrix(m) for m in matrices.values()):
            out[name] = permute(model, {g: perm_from_matrix(t) for g, t in transforms.items()}, groups)
        else:
            out[name] = apply_linear(model, maps_from_transforms(transforms), groups, per_channel="mix")
    return out


def _needs_folding(models: Mapping[str, nn.Module], alignment: Alignment, groups: Sequence[ChannelGroup]) -> bool:
    """Whether some transform other than a permutation acts on a group that LayerNorms normalise."""
    if not models:
        return False
    template = next(iter(models.values()))
    by_name = {g.name: g for g in groups}
    for name, transforms in alignment.transforms.items():
        if name not in models or name == alignment.reference:
            continue
        for group, t in transforms.items():
            normalised = group in by_name and layernorm_paths(template, by_name[group])
            if normalised and not _is_permutation_matrix(np.asarray(t.transpose("unit", "unit_ref").values)):
                return True
    return False


def align_step_models(
    models: Mapping[str, nn.Module],
    alignment: Alignment | None,
    groups: Sequence[ChannelGroup],
    example_input: Any = None,
) -> dict[str, nn.Module]:
    """A merger step's models in its alignment's reference order (as given without an alignment).

    Parameters
    ----------
    models
        The step's models, by name.
    alignment
        The alignment the step was given (its ``alignment`` key), or ``None``.
    groups
        The architecture's channel groups (:func:`~mergescope.groups.channel_groups`).

    Raises
    ------
    ConfigError
        The alignment's reference is not one of the step's models (at key ``'alignment'``).
    """
    if alignment is None:
        return dict(models)
    if alignment.reference not in models:
        raise ConfigError(
            f"the alignment's reference {alignment.reference!r} is not among this step's models {list(models)}",
            where="key 'alignment'",
        )
    return align_to_reference(models, alignment, groups, example_input)
