"""Activation matching: permute each model's units to the reference's most correlated ones.

For every channel group of the architecture (found by tracing, see
:mod:`mergescope.groups`) the correlation between the model's and the reference's units
is accumulated over the data in one recording pass (over every spatial position of conv
maps) and the permutation maximising the summed correlation is found with the Hungarian
algorithm (Li et al. 2016; Ainsworth et al. 2023, activation matching; Jordan et al.
2023 use it before REPAIR, and so does the thesis this toolkit reproduces).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import ClassVar

import attrs
import numpy as np
import xarray as xr
from scipy.optimize import linear_sum_assignment
from torch import nn

from mergescope.components import Alignment, Context
from mergescope.groups import channel_groups, example_input, permutation_matrix
from mergescope.hookspecs import hookimpl
from mergescope.states import check_finite
from mergescope.validators import boolean

__all__ = ["match_correlations", "ActivationMatching", "register_aligners"]

log = logging.getLogger("mergescope")


def match_correlations(corr: np.ndarray) -> tuple[np.ndarray, float]:
    """The permutation of a model's units that best matches the reference's.

    Parameters
    ----------
    corr
        ``(units, units_ref)`` correlations; NaN (a dead unit) counts as 0.

    Returns
    -------
    perm
        ``perm[j]`` is the model unit placed at reference position ``j``.
    mean
        The mean matched correlation.
    """
    c = np.nan_to_num(np.asarray(corr, dtype=np.float64), nan=0.0)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"activation matching needs a square correlation matrix, got shape {c.shape}")
    rows, cols = linear_sum_assignment(c, maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[cols] = rows
    return perm, float(c[perm, np.arange(len(perm))].mean())


@attrs.define
class ActivationMatching:
    """Permute units to maximise their activation correlation with the reference (Hungarian matching).

    Parameters
    ----------
    positions
        Correlate conv channels over every spatial position (as Git Re-Basin and REPAIR
        do); otherwise over per-image channel means.
    """

    name: ClassVar[str] = "activation-matching"
    paper: ClassVar[str] = "Ainsworth et al. 2023, Git Re-Basin (activation matching); Jordan et al. 2023, REPAIR"

    positions: bool = attrs.field(default=True, validator=boolean)

    def align(self, models: Mapping[str, nn.Module], reference: str, context: Context) -> Alignment:
        """Match every model's units to the reference's, group by group.

        Raises
        ------
        ValueError
            Models of another width than the reference in some group, or a NaN or inf
            weight (naming the parameter).
        mergescope.groups.UnsupportedLayerError
            A layer the tracer cannot follow (named in the message).
        """
        check_finite({m: model.state_dict() for m, model in models.items()})
        groups = channel_groups(models[reference], example_input(context.data))
        layers = sorted({p for g in groups for p in g.producers})
        others = [m for m in models if m != reference]
        store = context.record(
            models,
            {m: layers for m in models},
            pairs=[(m, reference) for m in others],
            keep_activations=False,
            positions=self.positions,
        )
        transforms: dict[str, dict[str, xr.DataArray]] = {}
        matched = np.full((len(others), len(groups)), np.nan)
        dead = np.zeros((len(others), len(groups)), dtype=np.int64)
        moved = np.zeros((len(others), len(groups)), dtype=np.int64)
        for i, m in enumerate(others):
            transforms[m] = {}
            for j, g in enumerate(groups):
                corr = sum(store.cross(m, reference, p).correlation for p in g.producers)
                if corr.shape != (g.size, g.size):
                    raise ValueError(
                        f"group {g.name!r}: model {m!r} has {corr.shape[0]} units but the reference {reference!r} "
                        f"has {g.size}; activation matching needs one width"
                    )
                # A unit that never varies has no correlation: it is matched arbitrarily.
                dead[i, j] = int(np.isnan(corr).all(axis=1).sum())
                perm, matched[i, j] = match_correlations(corr / len(g.producers))
                moved[i, j] = int((perm != np.arange(g.size)).sum())
                transforms[m][g.name] = permutation_matrix(perm)
            if dead[i].any():
                log.warning(
                    "activation-matching: model %s has constant (dead) units in groups %s; they are matched arbitrarily",
                    m,
                    {g.name: int(d) for g, d in zip(groups, dead[i]) if d},
                )
        diagnostics = xr.Dataset(
            {
                "matched_correlation": (("model", "group"), matched),
                "dead_units": (("model", "group"), dead),
                "moved_units": (("model", "group"), moved),
                "units": ("group", np.array([g.size for g in groups], dtype=np.int64)),
            },
            coords={"model": others, "group": [g.name for g in groups]},
        )
        return Alignment(reference, transforms, diagnostics)

    def describe(self, result: xr.Dataset) -> str:
        """Mean matched correlation per model, and the share of units the permutations move."""
        if "matched_correlation" not in result:
            return "aligned"
        parts = []
        for m in result["model"].values:
            part = f"{m}: mean matched correlation {float(result['matched_correlation'].sel(model=m).mean()):.3f}"
            if "moved_units" in result and "units" in result:
                share = float(result["moved_units"].sel(model=m).sum()) / max(1, int(result["units"].sum()))
                part += f", {share:.0%} of units moved"
            parts.append(part)
        return "; ".join(parts)


@hookimpl
def register_aligners(register):
    """Register :class:`ActivationMatching`."""
    register(ActivationMatching)
