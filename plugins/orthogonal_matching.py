"""Orthogonal matching: align transformers by the orthogonal symmetries they have, then learn the maps.

Theus et al. (2025, Generalized Linear Mode Connectivity for Transformers) show that
permutations leave a large loss barrier between independently trained Vision Transformers
because a transformer has more symmetries than permutations, and that aligning with them
connects the models. Three of them are used here:

- **The residual stream**, once every LayerNorm's affine parameters are folded into the
  linear layers that read it (:func:`mergescope.groups.fold_layernorms`), is unchanged by
  any orthogonal map ``Q`` that keeps the all-ones vector (``Q 1 = 1``): the LayerNorms
  then normalise ``Q x`` to ``Q n(x)``.
- **Attention heads** are unchanged by a whole-head permutation times an orthogonal map
  ``R_h`` within each head, one for the query/key dimensions (``q_h k_h^T`` keeps its value)
  and one for the value/output dimensions.
- **MLP hidden units**, between elementwise nonlinearities, only by permutations.

Closed form (``epochs = 0``), from one recording pass over the step's data (every token a
sample with ``positions``), each model mapped onto the reference:

- the stream: ``Q = argmax tr(Q^T C)`` over orthogonal ``Q`` with ``Q 1 = 1``, ``C`` the
  second moments ``E[y x^T]`` of the reference's normalised stream ``y`` and the model's
  ``x`` summed over every LayerNorm that reads it. With ``B`` an orthonormal basis of the
  complement of ``1``, this is orthogonal Procrustes there: ``Q = 11^T / n + B U V^T B^T``
  for ``U S V^T`` the SVD of ``B^T C B``;
- heads: the cross-covariance of the projected units, block by head pair (the query's plus
  the key's for the query/key group), scores each pair by its nuclear norm (the best
  agreement an orthogonal map reaches), summed over the layer's two groups, each divided
  by its largest; the Hungarian algorithm pairs the heads, and each pair's block gives its
  Procrustes rotation ``R = U V^T``;
- MLP units: activation matching's permutation
  (:func:`mergescope_plugins.activation_matching.group_correlations`).

Learned (``epochs > 0``, Theus et al.'s learned matching for these maps): every orthogonal
map becomes ``T = T_0 exp(A - A^T)`` (for the stream inside the complement of ``1``),
``A`` starting at 0, and Adam lowers the cross-entropy of the merged midpoint
``(theta_ref + T(theta_model)) / 2`` on batches of the step's data. Orthogonal maps are a
continuous symmetry, so unlike Git Re-Basin's straight-through estimator the gradient is
exact and every step keeps the model's function. The maps of the epoch (0 being the closed
form) whose midpoint has the lowest loss on the whole data are kept (``keep = "best"``).

Mergers apply the maps through :func:`mergescope.groups.align_to_reference`, which folds
every model's LayerNorms first, the reference's too; merged models have affine-free
LayerNorms and readers that hold the affine parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import ClassVar

import attrs
import numpy as np
import torch
import xarray as xr
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from mergescope.components import Alignment, Context, ImageDataset
from mergescope.groups import (
    ChannelGroup,
    affine_free,
    channel_groups,
    example_input,
    fold_layernorms,
    layernorm_paths,
    permutation_matrix,
    permute,
)
from mergescope.hookspecs import hookimpl
from mergescope.loading import make_loader, to_device
from mergescope.statistics import CoMoments
from mergescope.store import Store
from mergescope.validators import as_float, boolean, integer, non_negative_int, one_of, optional, positive, positive_int
from mergescope_plugins.activation_matching import (
    correlation_layers,
    group_correlations,
    match_unit,
    projection_rows,
    site_layer,
    token_reads,
)
from mergescope_plugins.ste import check_midpoint_inputs, midpoint, midpoint_loss, score_midpoint
from mergescope_plugins.weight_matching import solved_together

__all__ = [
    "centred_procrustes",
    "head_procrustes",
    "rotate_tensors",
    "OrthogonalMatching",
    "register_aligners",
]

KEEP = ("best", "last")
STREAM, HEADS, PERMUTATION = "orthogonal", "head-orthogonal", "permutation"


# ------------------------------------------------------------------------- the math


def complement_basis(n: int) -> np.ndarray:
    """An orthonormal basis ``(n, n - 1)`` of the vectors orthogonal to the all-ones vector."""
    u = np.ones((n, 1)) / np.sqrt(n)
    # QR of [u | e_1 ... e_{n-1}] (full rank) orthonormalises u first, then the rest against it.
    q, _ = np.linalg.qr(np.hstack([u, np.eye(n)[:, : n - 1]]))
    return q[:, 1:]


def centred_procrustes(moments: np.ndarray) -> np.ndarray:
    """The orthogonal ``Q`` with ``Q 1 = 1`` maximising ``tr(Q^T C)``.

    Parameters
    ----------
    moments
        ``C = E[y x^T]`` (reference units x model units), summed over the sites.

    Returns
    -------
    numpy.ndarray
        ``Q`` (acting on the model's vectors: ``y ~ Q x``).
    """
    n = moments.shape[0]
    basis = complement_basis(n)
    u, _, vt = np.linalg.svd(basis.T @ moments @ basis)
    return np.full((n, n), 1.0 / n) + basis @ (u @ vt) @ basis.T


def head_procrustes(cross: Sequence[np.ndarray], heads: int) -> list[np.ndarray]:
    """Whole-head permutation times within-head rotations for the attention groups of one layer.

    Parameters
    ----------
    cross
        Per group (query/key, value/output), the cross-covariance of the reference's units
        (rows) with the model's (columns).
    heads
        Heads of the groups.

    Returns
    -------
    list[numpy.ndarray]
        Per group, ``T`` (acting on the model's vectors): block ``(h, g)`` is the rotation
        ``R = U V^T`` of that block's SVD for the model head ``g`` paired with reference head
        ``h``, the other blocks 0; the groups share the head pairing.
    """
    size = cross[0].shape[0]
    d = size // heads
    blocks = [c.reshape(heads, d, heads, d).transpose(0, 2, 1, 3) for c in cross]
    score = np.zeros((heads, heads))
    for b in blocks:
        nuclear = np.linalg.svd(b, compute_uv=False).sum(axis=-1)
        score += nuclear / max(float(nuclear.max()), 1e-12)
    rows, cols = linear_sum_assignment(score, maximize=True)
    maps = []
    for b in blocks:
        t = np.zeros((size, size))
        for h, g in zip(rows, cols):
            u, _, vt = np.linalg.svd(b[h, g])
            t[h * d : (h + 1) * d, g * d : (g + 1) * d] = u @ vt
        maps.append(t)
    return maps


def rotate_tensors(
    state: Mapping[str, Tensor], groups: Sequence[ChannelGroup], maps: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Apply orthogonal maps ``{group: T}`` to a state dict of tensors (differentiable in ``T``).

    For an orthogonal ``T`` producers' rows become ``T W`` and readers' columns ``W T^T``:
    along the channel index both are ``T @ block``. Per-channel axes (an affine-free
    LayerNorm's constant scale and shift) are left as they are.
    """
    out = dict(state)
    for g in groups:
        if g.name not in maps:
            continue
        t = maps[g.name]
        for ax in g.axes:
            if ax.role == "channel":
                continue
            w = out[ax.param]
            start, stop = ax.span(g.size)
            moved = w.movedim(ax.axis, 0)
            block = moved[start:stop]
            rest = block.shape[1:]
            new = torch.einsum("ij,jrk->irk", t.to(w.dtype), block.reshape(g.size, ax.repeat, -1))
            moved = torch.cat([moved[:start], new.reshape(g.size * ax.repeat, *rest), moved[stop:]])
            out[ax.param] = moved.movedim(0, ax.axis)
    return out


def _skew_exp(a: Tensor) -> Tensor:
    return torch.matrix_exp(a - a.transpose(-1, -2))


# ------------------------------------------------------------------------ the aligner


@attrs.define
class _Maps:
    """One model's maps: fixed permutations, and orthogonal maps ``T_0 exp(A - A^T)`` with ``A`` learned."""

    perms: dict[str, np.ndarray]
    start: dict[str, np.ndarray]  # T_0 per orthogonal group
    learned: dict[str, Tensor]  # A per orthogonal group: (n - 1, n - 1) for a stream, (heads, d, d) for heads
    kinds: dict[str, str]
    bases: dict[str, Tensor]  # float64 on the CPU; cast once per device and dtype
    _cast: dict[tuple[str, torch.device, torch.dtype], Tensor] = attrs.field(factory=dict)

    def _basis(self, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (name, device, dtype)
        if key not in self._cast:
            self._cast[key] = self.bases[name].to(device=device, dtype=dtype)
        return self._cast[key]

    def tensors(self, device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Every orthogonal group's ``T``, differentiable in the generators."""
        out = {}
        for name, t0 in self.start.items():
            t0 = torch.as_tensor(t0, dtype=dtype, device=device)
            a = self.learned[name].to(dtype)
            if self.kinds[name] == STREAM:
                basis = self._basis(name, device, dtype)
                rotation = basis @ _skew_exp(a) @ basis.T
                out[name] = t0 @ (rotation + torch.eye(len(t0), dtype=dtype, device=device) - basis @ basis.T)
            else:
                out[name] = torch.block_diag(*_skew_exp(a)) @ t0
        return out

    def matrices(self) -> dict[str, np.ndarray]:
        """Every group's ``T`` (acting on the model's vectors) as float64 arrays, orthogonal to rounding."""
        with torch.no_grad():
            out = {n: t.cpu().numpy() for n, t in self.tensors(torch.device("cpu"), torch.float64).items()}
        out.update({n: permutation_matrix(p).transpose("unit_ref", "unit").values for n, p in self.perms.items()})
        return out


@attrs.define
class OrthogonalMatching:
    """Map each model onto the reference with orthogonal maps of its stream and heads, learned from the midpoint's loss.

    Parameters
    ----------
    epochs
        Passes over the step's data learning the maps (0: the closed form).
    lr
        Adam's learning rate for the maps' generators.
    batch_size
        Images per iteration; unset: the step's batch size.
    seed
        Seeds the order of the images.
    positions
        Statistics over every token (and every position of a conv map); otherwise per-image means.
    keep
        ``"best"``: of the closed form and every epoch's maps, those whose midpoint has the
        lowest loss on the whole data; ``"last"``: the last epoch's.
    """

    name: ClassVar[str] = "orthogonal-matching"
    paper: ClassVar[str] = "Theus et al. 2025, Generalized Linear Mode Connectivity for Transformers"

    epochs: int = attrs.field(default=10, validator=non_negative_int)
    lr: float = attrs.field(default=1e-2, converter=as_float, validator=positive)
    batch_size: int | None = attrs.field(default=None, validator=optional(positive_int))
    seed: int = attrs.field(default=0, validator=integer)
    positions: bool = attrs.field(default=True, validator=boolean)
    keep: str = attrs.field(default="best", validator=one_of(*KEEP))

    def align(self, models: Mapping[str, nn.Module], reference: str, context: Context) -> Alignment:
        """Fold, match in closed form, then learn the maps of every other model onto ``reference``.

        Raises
        ------
        ConfigError
            No ``[data]``, fewer than two models, or models of different architectures.
        """
        others, data = check_midpoint_inputs("orthogonal-matching", "its maps", models, reference, context)
        x = example_input(data)
        folded = {m: fold_layernorms(models[m], x)[0] for m in models}
        groups = channel_groups(folded[reference], x)
        kinds = {g.name: self._kind(folded[reference], g) for g in groups}
        starts = self._closed_form(folded, reference, groups, kinds, context)
        fits = {m: self._learn(folded[reference], folded[m], groups, starts[m], data, context, m) for m in others}
        transforms = {
            m: {
                name: xr.DataArray(
                    t.T, dims=("unit", "unit_ref"), coords={"unit": np.arange(len(t)), "unit_ref": np.arange(len(t))}
                )
                for name, t in fit[0].matrices().items()
            }
            for m, fit in fits.items()
        }
        return Alignment(reference, transforms, self._diagnostics(fits, groups, kinds))

    @staticmethod
    def _kind(model: nn.Module, group: ChannelGroup) -> str:
        norms = layernorm_paths(model, group)
        if group.heads > 1 or group.tied:
            return HEADS
        if norms and affine_free(model, norms):
            return STREAM
        return PERMUTATION

    def _closed_form(
        self,
        folded: Mapping[str, nn.Module],
        reference: str,
        groups: Sequence[ChannelGroup],
        kinds: Mapping[str, str],
        context: Context,
    ) -> dict[str, _Maps]:
        others = [m for m in folded if m != reference]
        plain = [g for g in groups if kinds[g.name] == PERMUTATION]
        ref = folded[reference]
        streams = {g.name: layernorm_paths(ref, g) for g in groups if kinds[g.name] == STREAM}
        heads = {g.name: token_reads(ref, g) for g in groups if kinds[g.name] == HEADS}
        # One pass over the data: the permuted groups' sites, the stream's LayerNorms, the attention inputs.
        layers = sorted(
            set(correlation_layers(ref, plain)[0])
            | {p for paths in streams.values() for p in paths}
            | {site_layer(path, how) for reads in heads.values() for path, how, _ in reads}
        )
        if not layers:
            return {m: _Maps({}, {}, {}, dict(kinds), {}) for m in others}  # nothing to align
        store = context.record(
            folded,
            {m: layers for m in folded},
            pairs=[(m, reference) for m in others],
            covariance=True,
            keep_activations=False,
            positions=self.positions,
        )
        correlations = group_correlations(folded, reference, plain, context, self.positions, store) if plain else {}
        out = {}
        for m in others:
            maps = _Maps({}, {}, {}, dict(kinds), {})
            for unit in solved_together(groups):
                kind = kinds[unit[0].name]
                if kind == PERMUTATION:
                    for g, (perm, _) in zip(unit, match_unit([correlations[m, g.name] for g in unit], unit[0].heads)):
                        maps.perms[g.name] = perm
                elif kind == STREAM:
                    (g,) = unit
                    moments = sum(_second_moments(store.cross(m, reference, p)) for p in streams[g.name])
                    maps.start[g.name] = centred_procrustes(moments)
                    maps.learned[g.name] = torch.zeros(g.size - 1, g.size - 1)
                    maps.bases[g.name] = torch.as_tensor(complement_basis(g.size), dtype=torch.float64)
                else:
                    cross = [_head_cross(folded[m], ref, g, heads[g.name], store, m, reference) for g in unit]
                    for g, t in zip(unit, head_procrustes(cross, unit[0].heads)):
                        maps.start[g.name] = t
                        maps.learned[g.name] = torch.zeros(g.heads, g.head_size, g.head_size)
            out[m] = maps
        return out

    def _learn(
        self,
        reference: nn.Module,
        other: nn.Module,
        groups: Sequence[ChannelGroup],
        maps: _Maps,
        data: ImageDataset,
        context: Context,
        name: str,
    ) -> tuple[_Maps, dict[str, object]]:
        device = next(reference.parameters()).device
        batch_size = self.batch_size or context.batch_size
        permuted = permute(other, maps.perms, groups) if maps.perms else other
        theta_a = {k: v.detach() for k, v in reference.state_dict().items()}
        theta_b = {k: v.detach().to(device) for k, v in permuted.state_dict().items()}
        shell = copy.deepcopy(reference).eval()
        for key in maps.learned:
            maps.learned[key] = maps.learned[key].to(device).requires_grad_(True)
        rotated_groups = [g for g in groups if g.name in maps.start]

        def weights() -> dict[str, Tensor]:
            return midpoint(theta_a, rotate_tensors(theta_b, rotated_groups, maps.tensors(device)))

        def score() -> tuple[float, float]:
            with torch.no_grad():
                return score_midpoint(shell, weights(), data, batch_size, context.precision)

        loss, accuracy = score()
        record: dict[str, object] = {"epoch_loss": [loss], "epoch_accuracy": [accuracy], "kept_epoch": 0}
        best = {k: v.detach().clone() for k, v in maps.learned.items()}
        best_loss = loss
        if maps.learned and self.epochs:
            optimizer = torch.optim.Adam(list(maps.learned.values()), lr=self.lr)
            order = torch.Generator().manual_seed(self.seed)
            loader = make_loader(data, batch_size, device=device, shuffle=True, generator=order)
            for epoch in context.progress(
                range(1, self.epochs + 1), desc=f"orthogonal-matching: {name}", total=self.epochs
            ):
                for cpu_images, cpu_labels in loader:
                    images, labels = to_device(cpu_images, device), to_device(cpu_labels, device)
                    batch_loss = midpoint_loss(shell, weights(), images, labels, context.precision)
                    optimizer.zero_grad(set_to_none=True)
                    batch_loss.backward()
                    optimizer.step()
                loss, accuracy = score()
                record["epoch_loss"].append(loss)  # type: ignore[union-attr]
                record["epoch_accuracy"].append(accuracy)  # type: ignore[union-attr]
                if self.keep == "last" or loss < best_loss:
                    best_loss, record["kept_epoch"] = loss, epoch
                    best = {k: v.detach().clone() for k, v in maps.learned.items()}
        maps.learned = {k: v.detach().cpu() for k, v in best.items()}
        return maps, record

    def _diagnostics(
        self,
        fits: Mapping[str, tuple[_Maps, dict[str, object]]],
        groups: Sequence[ChannelGroup],
        kinds: Mapping[str, str],
    ) -> xr.Dataset:
        names = list(fits)
        records = [r for _, r in fits.values()]
        kept = [int(r["kept_epoch"]) for r in records]  # type: ignore[call-overload]
        epoch_loss = np.asarray([r["epoch_loss"] for r in records], dtype=np.float64)
        epoch_accuracy = np.asarray([r["epoch_accuracy"] for r in records], dtype=np.float64)
        return xr.Dataset(
            {
                "closed_form_loss": ("model", epoch_loss[:, 0]),
                "final_loss": ("model", epoch_loss[np.arange(len(names)), kept]),
                "final_accuracy": ("model", epoch_accuracy[np.arange(len(names)), kept]),
                "kept_epoch": ("model", np.asarray(kept, dtype=np.int64)),
                "epoch_loss": (("model", "epoch"), epoch_loss),
                "epoch_accuracy": (("model", "epoch"), epoch_accuracy),
                "units": ("group", np.array([g.size for g in groups], dtype=np.int64)),
                "map": ("group", np.array([kinds[g.name] for g in groups])),
            },
            coords={"model": names, "group": [g.name for g in groups], "epoch": np.arange(epoch_loss.shape[1])},
        )

    def describe(self, result: xr.Dataset) -> str:
        """The kept midpoint loss against the closed form's, per model."""
        if "final_loss" not in result:
            return "aligned"
        parts = []
        for m in result["model"].values:
            r = result.sel(model=m)
            parts.append(
                f"{m}: midpoint loss {float(r['final_loss']):.4g} (closed form {float(r['closed_form_loss']):.4g}), "
                f"epoch {int(r['kept_epoch'])} kept"
            )
        return "; ".join(parts)


def _second_moments(moments: CoMoments) -> np.ndarray:
    """``E[y x^T]`` (reference units x model units) from the co-moments of the model (x) with the reference (y)."""
    return (moments.covariance + np.outer(moments.mean_x, moments.mean_y)).T


def _head_cross(
    model: nn.Module,
    reference: nn.Module,
    group: ChannelGroup,
    reads: Sequence[tuple[str, str, int]],
    store: Store,
    name: str,
    reference_name: str,
) -> np.ndarray:
    """Cross-covariance of the reference's units (rows) with the model's, summed over the group's projections."""
    total = np.zeros((group.size, group.size))
    for path, how, index in reads:
        cross = store.cross(name, reference_name, site_layer(path, how)).covariance  # model x reference inputs
        if how == "project":
            w_m = projection_rows(model.get_submodule(path), index, group.size)
            w_r = projection_rows(reference.get_submodule(path), index, group.size)
            total += w_r @ cross.T @ w_m.T
        else:
            total += cross[index : index + group.size, index : index + group.size].T
    return total


@hookimpl
def register_aligners(register):
    """Register :class:`OrthogonalMatching`."""
    register(OrthogonalMatching)
