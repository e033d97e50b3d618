"""CCA alignment and CCA Merge (Horoi et al. 2024).

Instead of a permutation, each model's units are mapped into the reference's with the
invertible linear map canonical correlation analysis finds between their activations:
with (regularised) covariances ``S_xx`` (model), ``S_yy`` (reference) and ``S_xy``,
``A = S_xx^{-1/2} U`` and ``B = S_yy^{-1/2} V`` where ``U S V^T`` is the SVD of
``S_xx^{-1/2} S_xy S_yy^{-1/2}``; the canonical variables agree, ``A^T x ~ B^T y``, so
``y ~ B^{-T} A^T x`` and the transform (dims ``unit, unit_ref``; aligned activations are
``a @ M``) is ``M = A B^{-1}``. The covariances come from one recording pass over the
data (every spatial position of conv maps). ``cca-merge`` maps every model into the
reference's space this way and averages the weights there.

A general linear map is a symmetry of a group only when everything that reads or
writes its channels is linear in them, or per-channel and mixed with them (BatchNorm,
whose statistics are then re-estimated). Two groups of transformers are not: attention
heads (a query/key or value/output group: the softmax of each head couples its channels,
so only whole-head permutations are symmetries) and a residual stream normalised by
LayerNorm (which divides by a per-token norm over the channels: no map but a permutation
keeps it). Those groups keep the reference's order (no transform) and are listed in
``skipped``; on a Vision Transformer CCA thus aligns the MLP hidden units.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import ClassVar

import attrs
import numpy as np
import torch
import xarray as xr
from torch import nn

from mergescope.activations import INPUT_SUFFIX
from mergescope.batchnorm import reset_batchnorm
from mergescope.components import Alignment, Context, MergeResult
from mergescope.errors import ConfigError
from mergescope.groups import ChannelGroup, align_to_reference, channel_groups, example_input, layernorm_paths
from mergescope.hookspecs import hookimpl
from mergescope.states import check_compatible
from mergescope.validators import as_float, boolean, non_negative

__all__ = ["cca_transform", "linear_unsafe", "CCA", "CCAMerge", "register_aligners", "register_mergers"]


def _inverse_sqrt(s: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((s + s.T) / 2)
    return (vectors / np.sqrt(np.clip(values, 1e-12, None))) @ vectors.T


def cca_transform(
    sxx: np.ndarray, syy: np.ndarray, sxy: np.ndarray, regularization: float = 1e-4
) -> tuple[np.ndarray, np.ndarray]:
    """The CCA map from a model's units to the reference's.

    Parameters
    ----------
    sxx, syy, sxy
        Covariances of the model's units, the reference's, and between them.
    regularization
        Added to each covariance's diagonal, relative to its mean variance, so that dead
        or redundant units keep the matrices invertible.

    Returns
    -------
    transform
        ``M = A B^{-1}`` (units x units_ref): aligned activations are ``x @ M``.
    correlations
        The canonical correlations, largest first.
    """
    n_x, n_y = sxx.shape[0], syy.shape[0]
    if n_x != n_y:
        raise ValueError(f"CCA alignment maps between layers of one width, got {n_x} and {n_y} units")
    eye = np.eye(n_x)
    sxx = sxx + regularization * max(float(np.trace(sxx)) / n_x, 1e-12) * eye
    syy = syy + regularization * max(float(np.trace(syy)) / n_y, 1e-12) * eye
    wx, wy = _inverse_sqrt(sxx), _inverse_sqrt(syy)
    u, s, vt = np.linalg.svd(wx @ sxy @ wy)
    a, b = wx @ u, wy @ vt.T
    return a @ np.linalg.inv(b), s


def _post_activation(group: ChannelGroup) -> list[str]:
    """Where the group's units are read after their nonlinearity: its consumers' inputs.

    CCA compares the representations the next layers see; a consumer that reads the
    channels as flattened blocks (``repeat > 1``) or among other channels (``offset``)
    does not see them one by one, so the producers' outputs are used instead.
    """
    inputs = [
        ax.param.rsplit(".", 1)[0] + INPUT_SUFFIX
        for ax in group.axes
        if ax.role == "input" and ax.repeat == 1 and ax.offset == 0 and ax.param.endswith(".weight")
    ]
    return sorted(set(inputs))[:1] or list(group.producers)


def linear_unsafe(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, str]:
    """The groups a general linear map cannot align, with the reason: attention heads, LayerNorm-normalised channels.

    Parameters
    ----------
    model
        The reference model (its modules tell which parameters are LayerNorms').
    groups
        Its channel groups.

    Returns
    -------
    dict
        Group name -> ``"attention heads"`` or ``"LayerNorm"``.
    """
    unsafe = {}
    for g in groups:
        if g.heads > 1:
            unsafe[g.name] = "attention heads"
        elif layernorm_paths(model, g):
            unsafe[g.name] = "LayerNorm"
    return unsafe


@attrs.define
class CCA:
    """Map each model's units into the reference's with canonical correlation analysis (an invertible linear map).

    Parameters
    ----------
    regularization
        Relative ridge added to the covariances before whitening.
    """

    name: ClassVar[str] = "cca"
    paper: ClassVar[str] = (
        "Horoi et al. 2024, Harmony in Diversity: Merging Neural Networks with Canonical Correlation Analysis"
    )

    regularization: float = attrs.field(default=1e-4, converter=as_float, validator=non_negative)

    def align(self, models: Mapping[str, nn.Module], reference: str, context: Context) -> Alignment:
        """CCA transforms for every model and channel group."""
        all_groups = channel_groups(models[reference], example_input(context.data))
        skipped = linear_unsafe(models[reference], all_groups)
        groups = [g for g in all_groups if g.name not in skipped]
        if not groups:
            raise ConfigError(
                f"CCA finds no channel group of {reference!r} that a linear map can align: every group is attention "
                f"heads or a LayerNorm-normalised stream ({', '.join(sorted(skipped))}); use weight-matching or "
                "activation-matching, which permute whole heads"
            )
        sources = {g.name: _post_activation(g) for g in groups}
        layers = sorted({p for names in sources.values() for p in names})
        others = [m for m in models if m != reference]
        store = context.record(
            models,
            {m: layers for m in models},
            pairs=[(m, reference) for m in others],
            covariance=True,
            keep_activations=False,
            positions=True,
        )
        transforms: dict[str, dict[str, xr.DataArray]] = {}
        mean_corr = np.full((len(others), len(groups)), np.nan)
        for i, m in enumerate(others):
            transforms[m] = {}
            for j, g in enumerate(groups):
                # A group written by several layers (a residual stream): pool their covariances.
                sxx = sum(store.covariance(m, p).covariance for p in sources[g.name])
                syy = sum(store.covariance(reference, p).covariance for p in sources[g.name])
                sxy = sum(store.cross(m, reference, p).covariance for p in sources[g.name])
                try:
                    t, corr = cca_transform(sxx, syy, sxy, self.regularization)
                except ValueError as exc:
                    raise ValueError(f"group {g.name!r} of {m!r}: {exc}") from exc
                mean_corr[i, j] = float(corr.mean())
                transforms[m][g.name] = xr.DataArray(t, dims=("unit", "unit_ref"))
        diagnostics = xr.Dataset(
            {"mean_canonical_correlation": (("model", "group"), mean_corr)},
            coords={"model": others, "group": [g.name for g in groups]},
        )
        if skipped:
            diagnostics["skipped"] = xr.DataArray(sorted(skipped), dims="skipped_group")
        return Alignment(reference, transforms, diagnostics)

    def describe(self, result: xr.Dataset) -> str:
        """Mean canonical correlation per model."""
        if "mean_canonical_correlation" not in result:
            return "aligned"
        line = "; ".join(
            f"{m}: mean canonical correlation {float(result['mean_canonical_correlation'].sel(model=m).mean()):.3f}"
            for m in result["model"].values
        )
        if "skipped" in result:
            line += f"; {result['skipped'].size} groups left in place (attention heads, LayerNorm streams)"
        return line


@attrs.define
class CCAMerge:
    """Average N models after mapping each into the first model's space with CCA (CCA Merge).

    Parameters
    ----------
    regularization
        Relative ridge of the CCA covariances.
    reset_batchnorm
        Recompute BatchNorm statistics of the merge on the data.
    """

    name: ClassVar[str] = "cca-merge"
    paper: ClassVar[str] = (
        "Horoi et al. 2024, Harmony in Diversity: Merging Neural Networks with Canonical Correlation Analysis"
    )

    regularization: float = attrs.field(default=1e-4, converter=as_float, validator=non_negative)
    reset_batchnorm: bool = attrs.field(default=True, validator=boolean)

    def merge(
        self, models: Mapping[str, nn.Module], context: Context, alignment: Alignment | None = None
    ) -> MergeResult:
        """Align with CCA onto the first model (or use ``alignment``) and average uniformly."""
        names = list(models)
        if len(names) < 2:
            raise ConfigError(f"CCA merge needs at least two models, got {names}", where="key 'models'")
        if context.data is None:
            raise ConfigError("CCA merge measures activation covariances and needs [data]")
        try:
            check_compatible({n: models[n].state_dict() for n in names})
        except ValueError as exc:
            raise ConfigError(f"cannot merge models {names}: {exc}", where="key 'models'") from exc
        if alignment is None:
            alignment = CCA(self.regularization).align(models, names[0], context)
        x = example_input(context.data)
        aligned = align_to_reference(models, alignment, channel_groups(models[alignment.reference], x), x)
        merged = copy.deepcopy(aligned[alignment.reference])
        states = [aligned[n].state_dict() for n in names]
        with torch.no_grad():
            for key, value in merged.state_dict().items():
                if value.is_floating_point():
                    value.copy_(sum(s[key].double() for s in states).div(len(states)).to(value.dtype))
        if self.reset_batchnorm:
            merged = reset_batchnorm(merged, context.data, batch_size=context.batch_size, progress=context.progress)
        evaluation = context.evaluate(merged)
        results = alignment.diagnostics.assign(
            reference=alignment.reference, loss=evaluation.loss, accuracy=evaluation.accuracy
        )
        return MergeResult(merged.eval(), results)

    def describe(self, result: xr.Dataset) -> str:
        """Accuracy of the merge."""
        return f"merge of {result.sizes.get('model', 0) + 1} models: accuracy {float(result['accuracy']):.3f}"


@hookimpl
def register_aligners(register):
    """Register :class:`CCA`."""
    register(CCA)


@hookimpl
def register_mergers(register):
    """Register :class:`CCAMerge`."""
    register(CCAMerge)
