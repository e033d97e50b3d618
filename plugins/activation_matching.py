"""Activation matching: permute each model's units to the reference's most correlated ones.

For every channel group of the architecture (found by tracing, see
:mod:`mergescope.groups`) the correlation between the model's and the reference's units
is accumulated over the data in one recording pass (over every spatial position of conv
maps) and the permutation maximising the summed correlation is found with the Hungarian
algorithm (Li et al. 2016; Ainsworth et al. 2023, activation matching; Jordan et al.
2023 use it before REPAIR, and so does the thesis this toolkit reproduces):
``P = argmax_P sum_j C[P(j), j]``, ``C`` the correlations of the model's units (rows)
with the reference's (columns), summed over the layers where the group is recorded.

Transformers (token activations ``(N, T, D)``, channels last) are recorded by a pass of
this module's own, since a recording keeps channels in dim 1: with ``tokens =
"samples"`` (the default) every token of every image is a sample of the correlations
(as every position of a conv map is), with ``"mean"`` the tokens of an image are
averaged first. The residual stream is recorded where its producers write it (patch
embedding, LayerNorms, the blocks' output projections), the MLP units after their first
linear layer. The query, key and value dimensions of attention never leave
``nn.MultiheadAttention``: they are computed from the recorded input of the layer that
owns their projection (``<attention>@in`` and its ``in_proj_weight`` rows, or the
output of a packed ``qkv`` linear layer, cut into its parts). The query/key group's
correlations are those of the queries plus those of the keys, the value/output group's
those of the values; both groups of one attention layer are solved at once with the
hierarchical assignment of :func:`mergescope_plugins.weight_matching.match_heads`
(whole heads, one head order for both, any order within each head).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import attrs
import numpy as np
import torch
import xarray as xr
from scipy.optimize import linear_sum_assignment
from torch import nn

from mergescope.components import Alignment, Context
from mergescope.devices import autocast
from mergescope.groups import ChannelGroup, channel_groups, example_input, permutation_matrix
from mergescope.hookspecs import hookimpl
from mergescope.loading import make_loader, to_device
from mergescope.states import check_finite
from mergescope.statistics import CoMoments
from mergescope.validators import boolean, one_of
from mergescope_plugins.weight_matching import match_heads, solved_together

__all__ = ["match_correlations", "match_unit", "token_reads", "ActivationMatching", "register_aligners"]

log = logging.getLogger("mergescope")

TOKENS = ("samples", "mean")


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


def _rows(t: torch.Tensor, size: int, tokens: str) -> torch.Tensor:
    """Activations as rows of ``size`` units: conv maps one row per position, tokens per token or averaged."""
    if t.ndim == 4 and t.shape[1] == size:
        return t.movedim(1, -1).reshape(-1, size)
    if t.ndim == 3 and t.shape[-1] == size:
        return t.mean(dim=1) if tokens == "mean" else t.reshape(-1, size)
    if t.ndim == 3 and t.shape[1] == size:  # (N, C, L) of a 1-D convolution
        return t.movedim(1, -1).reshape(-1, size)
    return t.reshape(-1, size)


def _projected(module: nn.MultiheadAttention, args: tuple[Any, ...], start: int, size: int) -> torch.Tensor:
    """Query, key or value rows of an attention layer, computed from its input as its projection does."""
    e = module.embed_dim
    if module._qkv_same_embed_dim:
        index, weight = start // e, module.in_proj_weight[start : start + size]
    else:
        index, weight = start, (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)[start]
    bias = None if module.in_proj_bias is None else module.in_proj_bias[index * e : index * e + size]
    x = args[index]
    if x.ndim == 3 and not module.batch_first:
        x = x.transpose(0, 1)  # (tokens, batch, E) -> (batch, tokens, E)
    return nn.functional.linear(x, weight, bias)


def _needs_tokens(model: nn.Module, groups: Sequence[ChannelGroup], x: torch.Tensor) -> set[str]:
    """The groups recorded by the token pass: attention heads, and units that some producer lays out last."""
    shapes: dict[str, tuple[int, ...]] = {}

    def note(layer: str) -> Any:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:  # returns None: the output stays as it is
            shapes[layer] = tuple(out.shape) if isinstance(out, torch.Tensor) else ()

        return hook

    layers = {p for g in groups if g.heads == 1 for p in g.producers}
    hooks = [model.get_submodule(p).register_forward_hook(note(p)) for p in layers]
    try:
        with torch.no_grad():
            model(x.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return {
        g.name
        for g in groups
        if g.heads > 1 or g.tied or any(len(shapes.get(p, ())) == 3 and shapes[p][-1] == g.size for p in g.producers)
    }


def token_correlations(
    models: Mapping[str, nn.Module],
    reference: str,
    groups: Sequence[ChannelGroup],
    context: Context,
    tokens: str = "samples",
) -> dict[tuple[str, str], np.ndarray]:
    """Correlations of every model's units with the reference's, for groups of token activations.

    One pass over the context's data: each group is read at its producers (token
    activations ``(N, T, D)``, conv maps or vectors) or, for attention groups, where
    :func:`token_reads` computes them; the correlations of every site are averaged.

    Returns
    -------
    dict
        ``{(model, group): (units, units_ref) correlations}`` for every model but the reference.
    """
    sites: dict[str, list[tuple[str, str, int]]] = {}
    for g in groups:
        reads = token_reads(models[reference], g) if g.heads > 1 or g.tied else []
        sites[g.name] = reads or [(p, "output", 0) for p in g.producers]
    sizes = {g.name: g.size for g in groups}
    captured: dict[str, dict[tuple[str, str, int, int], torch.Tensor]] = {m: {} for m in models}
    handles = []
    for m, model in models.items():
        for g in groups:
            for path, how, index in sites[g.name]:
                module = model.get_submodule(path)
                key, size = (path, how, index, sizes[g.name]), sizes[g.name]

                def hook(_m: nn.Module, args: Any, out: Any, _k=key, _s=size, _h=how, _i=index, _mod=m) -> None:
                    if _h == "project":
                        t = _projected(_m, args, _i, _s)  # type: ignore[arg-type]
                    else:
                        t = out[..., _i : _i + _s] if _h == "slice" else out
                    captured[_mod][_k] = _rows(t.detach().float(), _s, tokens)

                handles.append(module.register_forward_hook(hook))
    others = [m for m in models if m != reference]
    moments: dict[tuple[str, tuple[str, str, int, int]], CoMoments] = {}
    modes = {m: [(mod, mod.training) for mod in model.modules()] for m, model in models.items()}
    device = next(models[reference].parameters()).device
    loader = make_loader(context.data, context.batch_size, device=device)
    try:
        for model in models.values():
            model.eval()
        batches = context.progress(loader, desc="activation-matching: token activations", total=len(loader))
        with torch.no_grad(), autocast(context.device, context.precision):
            for images, _labels in batches:
                for model in models.values():
                    model(to_device(images, next(model.parameters()).device))
                for m in others:
                    for key, rows in captured[m].items():
                        acc = moments.setdefault((m, key), CoMoments(key[3], key[3]))
                        acc.update(rows.double().cpu().numpy(), captured[reference][key].double().cpu().numpy())
    finally:
        for h in handles:
            h.remove()
        for flags in modes.values():
            for mod, flag in flags:
                mod.training = flag
    out = {}
    for m in others:
        for g in groups:
            keys = [(path, how, index, g.size) for path, how, index in sites[g.name]]
            out[m, g.name] = sum(moments[m, k].correlation for k in keys) / len(keys)
    return out


@attrs.define
class ActivationMatching:
    """Permute units to maximise their activation correlation with the reference (Hungarian matching).

    Parameters
    ----------
    positions
        Correlate conv channels over every spatial position (as Git Re-Basin and REPAIR
        do); otherwise over per-image channel means.
    tokens
        For token activations ``(N, T, D)`` (vision transformers): ``"samples"`` makes
        every token of every image a sample of the correlations (as ``positions`` does
        for conv maps); ``"mean"`` correlates the per-image means over tokens.
    """

    name: ClassVar[str] = "activation-matching"
    paper: ClassVar[str] = "Ainsworth et al. 2023, Git Re-Basin (activation matching); Jordan et al. 2023, REPAIR"

    positions: bool = attrs.field(default=True, validator=boolean)
    tokens: str = attrs.field(default="samples", validator=one_of(*TOKENS))

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
        x = example_input(context.data)
        groups = channel_groups(models[reference], x)
        others = [m for m in models if m != reference]
        token_groups = _needs_tokens(models[reference], groups, x)
        correlations: dict[tuple[str, str], np.ndarray] = {}
        if token_groups:
            chosen = [g for g in groups if g.name in token_groups]
            correlations.update(token_correlations(models, reference, chosen, context, self.tokens))
        plain = [g for g in groups if g.name not in token_groups]
        if plain:
            layers = sorted({p for g in plain for p in g.producers})
            store = context.record(
                models,
                {m: layers for m in models},
                pairs=[(m, reference) for m in others],
                keep_activations=False,
                positions=self.positions,
            )
            for m in others:
                for g in plain:
                    corr = sum(store.cross(m, reference, p).correlation for p in g.producers) / len(g.producers)
                    correlations[m, g.name] = corr
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
