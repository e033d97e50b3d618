"""SLERP: spherical linear interpolation of two models, tensor by tensor (Shoemake 1985).

Linear interpolation of two weight vectors shortens them toward the chord between them;
spherical interpolation follows the arc instead. For every parameter tensor, flattened
to vectors ``v0`` (the first model) and ``v1`` (the second) with the angle ``Omega``
between their directions,

    slerp(v0, v1; alpha) = sin((1 - alpha) Omega) / sin(Omega) * v0 + sin(alpha Omega) / sin(Omega) * v1,

which at ``alpha = 0`` and ``1`` gives the models and in between keeps the norm when
``|v0| = |v1|``. When the directions are nearly parallel (``|cos Omega| > 0.9995``) or a
tensor is zero the formula is ill-conditioned and the tensor is interpolated linearly,
as merging tools (mergekit) do. BatchNorm running statistics are data statistics, not
directions: they are interpolated linearly; integer buffers come from the first model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from mergescope.batchnorm import running_stat_keys
from mergescope.components import Alignment, Context, MergeResult
from mergescope.errors import ConfigError
from mergescope.groups import align_step_models, channel_groups, example_input
from mergescope.hookspecs import hookimpl
from mergescope.states import build_model, check_compatible
from mergescope.sweeps import default_alphas, evaluate_path
from mergescope.validators import as_float, float_list, list_of, optional, probability

__all__ = ["arc_cosine", "slerp", "slerp_states", "Slerp", "register_mergers"]

#: Above this ``|cos Omega|`` a tensor is interpolated linearly.
PARALLEL = 0.9995


def arc_cosine(v0: Tensor, v1: Tensor) -> float | None:
    """``cos Omega`` of two tensors as flat vectors when :func:`slerp` follows the arc; ``None`` when it is linear.

    Linear: a tensor is zero, or the two are nearly parallel (``|cos Omega| > PARALLEL``).
    """
    a, b = v0.reshape(-1).double(), v1.reshape(-1).double()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return None
    cos = float(torch.clamp((a / na) @ (b / nb), -1.0, 1.0))
    return None if abs(cos) > PARALLEL else cos


def slerp(v0: Tensor, v1: Tensor, alpha: float) -> Tensor:
    """Spherical interpolation of two tensors of one shape, as flat vectors; linear when they are nearly parallel."""
    cos = arc_cosine(v0, v1)
    if cos is None:
        return torch.lerp(v0.double(), v1.double(), alpha).to(v0.dtype)
    omega = math.acos(cos)
    s0, s1 = math.sin((1.0 - alpha) * omega) / math.sin(omega), math.sin(alpha * omega) / math.sin(omega)
    return (s0 * v0.double() + s1 * v1.double()).to(v0.dtype)


def slerp_states(first: Mapping[str, Tensor], second: Mapping[str, Tensor], alpha: float, linear: set[str]) -> dict:
    """Two state dicts interpolated at ``alpha``: floating entries by :func:`slerp`, ``linear`` ones linearly."""
    out: dict[str, Tensor] = {}
    for key, value in first.items():
        if not torch.is_floating_point(value):
            out[key] = value.clone()
        elif key in linear:
            out[key] = torch.lerp(value.double(), second[key].double(), alpha).to(value.dtype)
        else:
            out[key] = slerp(value, second[key], alpha)
    return out


@attrs.define
class Slerp:
    """Spherically interpolate the weights of two models, tensor by tensor: a sweep along the arc.

    Evaluates the interpolation at every point of ``alphas`` (plus 0, 1 and ``alpha``)
    like ``interpolation``, so both paths appear side by side in ``interpolation-curves``;
    the model at ``alpha`` is returned. With ``alignment``, the second model is first
    mapped onto the first's units.

    Parameters
    ----------
    alphas
        The sweep. ``None``: ``0, 0.05, ..., 1``; ``[]``: no sweep.
    alpha
        The interpolation coefficient of the returned model.
    """

    name: ClassVar[str] = "slerp"
    paper: ClassVar[str] = "Shoemake 1985, Animating Rotation with Quaternion Curves (spherical linear interpolation)"

    alphas: list[float] | None = attrs.field(
        default=None, converter=float_list, validator=optional(list_of(probability))
    )
    alpha: float = attrs.field(default=0.5, converter=as_float, validator=probability)

    def merge(
        self, models: Mapping[str, nn.Module], context: Context, alignment: Alignment | None = None
    ) -> MergeResult:
        """Interpolate the two ``models`` along the arc; evaluate the sweep when there is data.

        Returns
        -------
        MergeResult
            ``model`` at ``alpha``; ``results``: ``weights`` (dim ``model``),
            ``endpoints``, ``merged_alpha``, ``linear_fraction`` (the share of tensors
            interpolated linearly: nearly parallel, zero, or statistics) and, with data,
            ``loss`` / ``accuracy`` on dim ``alpha`` and the barriers.

        Raises
        ------
        ConfigError
            Not two models, an alignment whose reference is not one of them, or models whose parameters differ.
        """
        names = list(models)
        if len(names) != 2:
            raise ConfigError(f"slerp interpolates two models, got {len(names)}: {names}", where="key 'models'")
        if alignment is not None:
            x = example_input(context.data)
            models = align_step_models(models, alignment, channel_groups(models[names[0]], x), x)
        first, second = (models[n].state_dict() for n in names)
        try:
            check_compatible({n: s for n, s in zip(names, (first, second))})
        except ValueError as exc:
            raise ConfigError(f"cannot interpolate models {names}: {exc}", where="key 'models'") from exc
        linear = set(running_stat_keys(models[names[0]]))

        def state_at(a: float) -> dict[str, Any]:
            return slerp_states(first, second, a, linear)

        merged = build_model(models[names[0]], state_at(self.alpha))
        floating = [k for k, v in first.items() if torch.is_floating_point(v)]
        arcs = sum(k not in linear and arc_cosine(first[k], second[k]) is not None for k in floating)
        results = xr.Dataset(
            {
                "weights": ("model", np.asarray([1.0 - self.alpha, self.alpha])),
                "endpoints": ("endpoint", np.asarray(names, dtype=str)),
                "merged_alpha": self.alpha,
                "linear_fraction": 1.0 - arcs / max(len(floating), 1),
            },
            coords={"model": names},
        )
        if context.data is not None:
            if self.alphas == []:
                evaluation = context.evaluate(merged)
                results["loss"], results["accuracy"] = evaluation.loss, evaluation.accuracy
            else:
                requested = default_alphas() if self.alphas is None else self.alphas
                points = sorted(set(requested) | {0.0, 1.0, self.alpha})
                path = evaluate_path(models[names[0]], state_at, points, context, names, desc="slerp")
                results = xr.merge([results, path])
        return MergeResult(merged, results)

    def describe(self, result: xr.Dataset) -> str:
        """One line: accuracy along the arc and its loss barrier, or the merge's score."""
        share = f"{float(result['linear_fraction']):.0%} of tensors linear"
        if "alpha" in result.dims and "accuracy" in result:
            acc, merged_alpha = result["accuracy"], float(result["merged_alpha"])
            return (
                f"accuracy {float(acc.sel(alpha=0.0)):.3f} -> {float(acc.sel(alpha=merged_alpha)):.3f} "
                f"(alpha {merged_alpha:.2f}) -> {float(acc.sel(alpha=1.0)):.3f}; "
                f"loss barrier {float(result['loss_barrier']):.3f}; {share}"
            )
        if "accuracy" in result:
            return f"alpha {float(result['merged_alpha']):.2f}: accuracy {float(result['accuracy']):.3f}; {share}"
        return f"alpha {float(result['merged_alpha']):.2f} (not evaluated: no data); {share}"


@hookimpl
def register_mergers(register):
    """Register :class:`Slerp`."""
    register(Slerp)
