"""Activation matching: permute each model's units to the reference's most correlated ones.

For every channel group of the architecture (found by tracing, see
:mod:`mergescope.groups`) the correlation between the model's and the reference's units
is accumulated over the data in one recording pass (over every spatial position of conv
maps) and the permutation maximising the summed correlation is found with the Hungarian
algorithm (Li et al. 2016; Ainsworth et al. 2023, activation matching; Jordan et al.
2023 use it before REPAIR, and so does the thesis this toolkit reproduces):
``P = argmax_P sum_j C[P(j), j]``, ``C`` the correlations of the model's units (rows)
with the reference's (columns), summed over the layers where the group is recorded.

Transformers (token activations ``(N, T, D)``) are recorded by the same pass: with
``positions`` every token of every image is a sample of the correlations, as every
position of a conv map is; otherwise each image's mean token. The residual stream is read
where its producers write it (patch embedding, LayerNorms, the blocks' MLP outputs), the
MLP units after their first linear layer. The query, key and value dimensions of attention
never leave ``nn.MultiheadAttention``: the layer's input ``x`` is recorded with its
covariances, and the correlations of the projected units ``W x`` follow from them
(``W_a S_ab W_b^T`` over the standard deviations ``sqrt(diag(W S W^T))``); for a packed
``qkv`` linear layer (timm) its output is recorded and cut into its parts. The query/key
group's correlations are those of the queries plus those of the keys, the value/output
group's those of the values; both groups of one attention layer are solved at once with
the hierarchical assignment of :func:`mergescope_plugins.weight_matching.match_heads`
(whole heads, one head order for both, any order within each head).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import ClassVar

import attrs
import numpy as np
import xarray as xr
from scipy.optimize import linear_sum_assignment
from torch import nn

from mergescope.activations import INPUT_SUFFIX
from mergescope.components import Alignment, Context
from mergescope.groups import ChannelGroup, channel_groups, example_input, permutation_matrix
from mergescope.hookspecs import hookimpl
from mergescope.states import check_finite
from mergescope.store import Store
from mergescope.validators import boolean
from mergescope_plugins.weight_matching import match_heads, solved_together

__all__ = [
    "match_correlations",
    "match_unit",
    "token_reads",
    "group_correlations",
    "correlation_layers",
    "projected_correlation",
    "projection_rows",
    "site_layer",
    "ActivationMatching",
    "register_aligners",
]

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


def match_unit(corrs: Sequence[np.ndarray], heads: int) -> list[tuple[np.ndarray, float]]:
    """Match groups solved together: one group of plain units, or the attention groups of one head order.

    Parameters
    ----------
    corrs
        ``(units, units_ref)`` correlations per group (NaN counts as 0).
    heads
        The groups' number of heads; with 1 and a single group this is
        :func:`match_correlations`, otherwise the hierarchical assignment of
        :func:`~mergescope_plugins.weight_matching.match_heads` over the summed correlations.

    Returns
    -------
    list
        Per group, ``(perm, mean matched correlation)``.
    """
    if len(corrs) == 1 and heads == 1:
        return [match_correlations(corrs[0])]
    clean = [np.nan_to_num(np.asarray(c, dtype=np.float64), nan=0.0) for c in corrs]
    # match_heads scores [reference position, model unit]: the transposed correlations.
    perms, _ = match_heads([c.T for c in clean], heads)
    return [(p, float(c[p, np.arange(len(p))].mean())) for p, c in zip(perms, clean)]


def token_reads(model: nn.Module, group: ChannelGroup) -> list[tuple[str, str, int]]:
    """Where the units of an attention group are computed: ``(module, how, index)`` per projection.

    ``how`` is ``"slice"`` for a linear layer whose output holds the group at ``index``
    along its last dim (timm's packed ``qkv``), or ``"project"`` for an
    ``nn.MultiheadAttention`` whose input ``index`` (0 query, 1 key, 2 value) is
    projected by the rows of its input projection that compute the group. Bias axes
    and the reading side (``out_proj``) are left out.
    """
    reads = []
    for ax in group.axes:
        path, _, attr = ax.param.rpartition(".")
        module = model.get_submodule(path)
        if ax.role != "output" or ax.axis != 0 or getattr(module, attr).ndim != 2:
            continue
        if isinstance(module, nn.MultiheadAttention):
            arg = ax.offset // module.embed_dim if attr == "in_proj_weight" else ("q", "k", "v").index(attr[0])
            reads.append((path, "project", arg * module.embed_dim if attr == "in_proj_weight" else arg))
        elif isinstance(module, nn.Linear) and attr == "weight":
            reads.append((path, "slice", ax.offset))
        else:
            raise ValueError(
                f"group {group.name!r}: cannot record the projection {ax.param!r} of a {type(module).__name__}"
            )
    return reads


def site_layer(path: str, how: str) -> str:
    """The layer recorded for an attention projection: the attention's input, or the packed ``qkv`` output."""
    return path + INPUT_SUFFIX if how == "project" else path


def projection_rows(module: nn.MultiheadAttention, start: int, size: int) -> np.ndarray:
    """The rows of an attention layer's input projection that compute the query, key or value units ``start...``."""
    if module._qkv_same_embed_dim:
        weight = module.in_proj_weight[start : start + size]
    else:
        weight = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)[start]
    return weight.detach().double().cpu().numpy()


def projected_correlation(
    w_a: np.ndarray, w_b: np.ndarray, cov_a: np.ndarray, cov_b: np.ndarray, cross: np.ndarray
) -> np.ndarray:
    """Correlations of ``W_a x_a`` with ``W_b x_b`` from the moments of the inputs (biases do not change them).

    ``corr = W_a S_ab W_b^T / sqrt(diag(W_a S_aa W_a^T) diag(W_b S_bb W_b^T))``, ``S_ab`` the
    cross-covariance of the two models' inputs; a unit without variance gives NaN.
    """
    c = w_a @ cross @ w_b.T
    std_a = np.sqrt(np.einsum("ij,jk,ik->i", w_a, cov_a, w_a))
    std_b = np.sqrt(np.einsum("ij,jk,ik->i", w_b, cov_b, w_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = c / np.outer(std_a, std_b)
    out[~np.isfinite(out)] = np.nan
    return out


def _sites(model: nn.Module, groups: Sequence[ChannelGroup]) -> dict[str, list[tuple[str, str, int]]]:
    """Where each group is read: its attention projections (heads), else its producers' outputs."""
    return {
        g.name: (token_reads(model, g) if g.heads > 1 or g.tied else []) or [(p, "output", 0) for p in g.producers]
        for g in groups
    }


def correlation_layers(model: nn.Module, groups: Sequence[ChannelGroup]) -> tuple[list[str], bool]:
    """The layers :func:`group_correlations` records for ``groups``, and whether it needs their covariances."""
    sites = _sites(model, groups)
    layers = sorted({site_layer(path, how) for reads in sites.values() for path, how, _ in reads})
    return layers, any(how == "project" for reads in sites.values() for _, how, _ in reads)


def group_correlations(
    models: Mapping[str, nn.Module],
    reference: str,
    groups: Sequence[ChannelGroup],
    context: Context,
    positions: bool = True,
    store: Store | None = None,
) -> dict[tuple[str, str], np.ndarray]:
    """Correlations of every model's units with the reference's, per group, from one ``context.record`` pass.

    A group is read at its producers (conv maps, vectors or token activations ``(N, T, D)``;
    with ``positions`` every position of a map and every token is a sample), the
    correlations of every producer averaged. An attention group (heads) never leaves its
    layer: for ``nn.MultiheadAttention`` (self-attention: query, key and value read one
    input) the layer's input is recorded and the correlations of the projected units
    come from its covariances (:func:`projected_correlation`); a packed ``qkv`` linear
    layer's output is recorded and the group's block of it read.

    A caller that records more layers in the same pass gives its ``store`` (recorded with
    at least :func:`correlation_layers`, every model paired with the reference); no pass
    is made then.

    Returns
    -------
    dict
        ``{(model, group): (units, units_ref) correlations}`` for every model but the reference.
    """
    sites = _sites(models[reference], groups)
    others = [m for m in models if m != reference]
    if store is None:
        layers, projects = correlation_layers(models[reference], groups)
        store = context.record(
            models,
            {m: layers for m in models},
            pairs=[(m, reference) for m in others],
            covariance=projects,
            keep_activations=False,
            positions=positions,
        )
    out = {}
    for m in others:
        for g in groups:
            parts = []
            for path, how, index in sites[g.name]:
                layer = site_layer(path, how)
                if how == "project":
                    parts.append(
                        projected_correlation(
                            projection_rows(models[m].get_submodule(path), index, g.size),
                            projection_rows(models[reference].get_submodule(path), index, g.size),
                            store.covariance(m, layer).covariance,
                            store.covariance(reference, layer).covariance,
                            store.cross(m, reference, layer).covariance,
                        )
                    )
                elif how == "slice":
                    parts.append(
                        store.cross(m, reference, layer).correlation[index : index + g.size, index : index + g.size]
                    )
                else:
                    parts.append(store.cross(m, reference, layer).correlation)
            out[m, g.name] = sum(parts) / len(parts)
    return out


@attrs.define
class ActivationMatching:
    """Permute units to maximise their activation correlation with the reference (Hungarian matching).

    Parameters
    ----------
    positions
        Correlate conv channels over every spatial position (as Git Re-Basin and REPAIR
        do) and token units over every token; otherwise over per-image means.
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
        others = [m for m in models if m != reference]
        correlations = group_correlations(models, reference, groups, context, self.positions)
        transforms: dict[str, dict[str, xr.DataArray]] = {}
        matched = np.full((len(others), len(groups)), np.nan)
        dead = np.zeros((len(others), len(groups)), dtype=np.int64)
        moved = np.zeros((len(others), len(groups)), dtype=np.int64)
        column = {g.name: j for j, g in enumerate(groups)}
        for i, m in enumerate(others):
            transforms[m] = {}
            for g in groups:
                corr = correlations[m, g.name]
                if corr.shape != (g.size, g.size):
                    raise ValueError(
                        f"group {g.name!r}: model {m!r} has {corr.shape[0]} units but the reference {reference!r} "
                        f"has {g.size}; activation matching needs one width"
                    )
                # A unit that never varies has no correlation: it is matched arbitrarily.
                dead[i, column[g.name]] = int(np.isnan(corr).all(axis=1).sum())
            for unit in solved_together(groups):
                results = match_unit([correlations[m, g.name] for g in unit], unit[0].heads)
                for g, (perm, mean) in zip(unit, results):
                    j = column[g.name]
                    matched[i, j] = mean
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
                "heads": ("group", np.array([g.heads for g in groups], dtype=np.int64)),
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
