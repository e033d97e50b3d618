"""ZipIt!: merge models trained on different tasks by zipping redundant features, within and across models.

Stoica et al. 2024, "ZipIt! Merging Models from Different Tasks without Training" (ICLR).

Permutation merging (weight or activation matching) pairs every unit of model A with one
unit of model B. Models trained on different tasks share few features, so many of those
pairs average unrelated features. ZipIt! matches over the *union* of the models' units:
two redundant units of one model may merge together, which leaves room for the features
only one model has.

The zip of one channel group
----------------------------
Let the group have ``n`` units in each of ``N`` models, ``f = [f_1; ...; f_N]`` the
``Nn`` stacked features and ``C`` their correlation over the data (within-model blocks
and cross-model blocks, measured where the next layers read the units: after the
nonlinearity, over every spatial position). Greedily, the most correlated pair of
(clusters of) features is merged until ``n`` merged features remain, the merge ratio
``r = 1 - 1/N`` (0.5 for two models) that keeps the architecture's widths. The clusters
give the merge and unmerge matrices (Sec. 4.1)

    M (n x Nn): row k averages the features of cluster k,
    U (Nn x n): feature j copies the merged feature of its cluster (one 1 per row),

cut into per-model blocks ``M_i`` (n x n) and ``U_i`` (n x n). Each layer is zipped
with the merge of its output group and the unmerge of its input group (Eq. 8)

    W* = sum_i M_out,i W_i U_in,i,      b* = sum_i M_out,i b_i,

where the image and the logits are never merged: the first layer has no ``U_in``, the
last no ``M_out`` (its outputs are averaged, ``W* = 1/N sum_i W_i U_in,i``). Here this is
computed as the plain average of the models transformed by
:func:`mergescope.groups.apply_linear` with ``T = N M_i`` on producers and ``U_i`` on
consumers. Per-channel parameters (BatchNorm scale, shift and statistics) are merged
with ``M`` (``sum_i M_i v_i``), and BatchNorm statistics are then measured again on the
data.

The matching (Sec. 4.3 and the authors' ``match_tensors_zipit``)
-----------------------------------------------------------------
Correlations of a merged cluster with the others are the smallest of its members'
(complete linkage). Two hyperparameters limit the merges:

- ``alpha`` (repeated matching): a merged cluster's correlations are multiplied by
  ``alpha``, so it can be matched again, but later; with ``alpha = 0`` it can never
  again merge with a cluster holding a feature of a model it already holds.
- ``beta`` (same-model budget): each model may take part in at most
  ``floor(beta * floor((N - 1) n / N))`` merges of two clusters of its own features;
  ``beta = 0`` with ``alpha = 0`` is a greedy permutation.

Partial zipping (Sec. 4.3)
--------------------------
With ``stop_at`` (a layer), only the groups computed up to that layer are zipped. The
result is a multi-head model: the zipped network runs up to ``stop_at``, and each
model's own remaining layers (a head) read the zipped features unmerged into its space,
``U_i z``; the heads' predictions are combined as an ensemble's (see
:mod:`mergescope_plugins.ensemble`).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import ClassVar

import attrs
import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from mergescope.batchnorm import reset_batchnorm
from mergescope.components import Alignment, Context, Evaluation, MergeResult
from mergescope.errors import ConfigError, did_you_mean
from mergescope.groups import (
    Axis,
    ChannelGroup,
    align_step_models,
    apply_linear,
    channel_groups,
    example_input,
    group_layers,
)
from mergescope.hookspecs import hookimpl
from mergescope.states import average_states, build_model, check_compatible
from mergescope.validators import as_float, boolean, non_empty_str, one_of, optional, probability
from mergescope_plugins.ensemble import COMBINE, combine_outputs

__all__ = [
    "correlation_from_covariance",
    "ZipMatch",
    "zip_match",
    "zip_states",
    "ZippedHeads",
    "ZipIt",
    "register_mergers",
]


def correlation_from_covariance(covariance: np.ndarray) -> np.ndarray:
    """Pearson correlation from a covariance matrix; NaN for a unit that never varies.

    Parameters
    ----------
    covariance
        ``(units, units)``, symmetric.
    """
    cov = np.asarray(covariance, dtype=np.float64)
    std = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    scale = np.outer(std, std)
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.where(scale > 0, cov / scale, np.nan)
    return np.clip(corr, -1.0, 1.0)


@attrs.frozen(eq=False)
class ZipMatch:
    """The result of :func:`zip_match` for one channel group.

    Attributes
    ----------
    merge
        ``M``, ``(merged, features)``: merged feature ``k`` is the mean of its cluster.
    unmerge
        ``U``, ``(features, merged)``: feature ``j`` copies its cluster's merged feature.
    n_models
        ``N``; the features are the models' units stacked model by model.
    within, cross
        How many greedy merges joined two clusters of one model's features, and how
        many joined anything else.
    forced
        Merges made after every allowed pair was used up (the most correlated remaining
        pair, ignoring ``alpha`` and ``beta``).
    correlations
        The correlation at which each merge was made (the smallest between the two
        clusters' members), in merge order.
    """

    merge: np.ndarray
    unmerge: np.ndarray
    n_models: int
    within: int
    cross: int
    forced: int
    correlations: np.ndarray

    @property
    def units(self) -> int:
        """Units per model (``n``)."""
        return self.merge.shape[1] // self.n_models

    def model_merge(self, i: int) -> np.ndarray:
        """``M_i``, the columns of model ``i``: ``(merged, n)``."""
        return self.merge[:, i * self.units : (i + 1) * self.units]

    def model_unmerge(self, i: int) -> np.ndarray:
        """``U_i``, the rows of model ``i``: ``(n, merged)``."""
        return self.unmerge[i * self.units : (i + 1) * self.units, :]

    def assignment(self) -> np.ndarray:
        """``(N, n)``: the merged feature each unit of each model belongs to."""
        return self.unmerge.argmax(axis=1).reshape(self.n_models, self.units)


def zip_match(
    correlation: np.ndarray, n_models: int, *, alpha: float = 0.3, beta: float = 0.125, merged: int | None = None
) -> ZipMatch:
    """Greedily merge the most correlated features of the stacked models (ZipIt!'s matching).

    Parameters
    ----------
    correlation
        ``(N n, N n)`` correlation of the stacked features, model by model; NaN (a unit
        that never varies) counts as 0.
    n_models
        ``N``.
    alpha
        Repeated matching: a merged cluster's correlations (the smallest of its
        members') are multiplied by ``alpha``; with ``alpha = 0`` it can no longer merge
        with a cluster holding a feature of a model it holds.
    beta
        Same-model budget: each model may take part in
        ``floor(beta * floor((N n - merged) / N))`` merges of two clusters of its own
        features (and none when that is 0).
    merged
        How many features remain (default ``n``, the merge ratio ``1 - 1/N``).

    Returns
    -------
    ZipMatch
        Merged features are ordered by their first member. Ties go to the first pair in
        row-major order of the matrix.

    Raises
    ------
    ValueError
        A matrix that is not square or whose size is not a multiple of ``n_models``.
    """
    corr = np.asarray(correlation, dtype=np.float64)
    if corr.ndim != 2 or corr.shape[0] != corr.shape[1]:
        raise ValueError(f"ZipIt's matching needs a square correlation matrix, got shape {corr.shape}")
    total = corr.shape[0]
    if n_models < 1 or total % n_models or total == 0:
        raise ValueError(f"a {total} x {total} correlation matrix does not stack {n_models} models of equal width")
    if n_models > 62:
        raise ValueError(f"ZipIt's matching supports up to 62 models, got {n_models}")
    units = total // n_models
    target = units if merged is None else int(merged)
    if not 1 <= target <= total:
        raise ValueError(f"cannot merge {total} features into {target}")

    sims = np.nan_to_num((corr + corr.T) / 2, nan=0.0)
    np.fill_diagonal(sims, -np.inf)
    linkage = sims.copy()  # complete linkage without alpha or blocks: the reported correlations, the fallback
    owner = np.repeat(np.arange(n_models), units)
    models = np.left_shift(np.int64(1), owner)  # bit mask of the models each cluster holds
    members: list[list[int]] = [[j] for j in range(total)]
    alive = np.ones(total, dtype=bool)
    budget = np.full(n_models, int(beta * ((total - target) // n_models) + 1e-9))

    def block_own(model: int) -> None:
        """No more merges of two clusters holding only ``model``'s features."""
        own = alive & (models == np.int64(1) << model)
        sims[np.ix_(own, own)] = -np.inf

    for m in range(n_models):
        if budget[m] <= 0:
            block_own(m)

    within = cross = forced = 0
    values: list[float] = []
    for _ in range(total - target):
        flat = int(np.argmax(sims))
        if sims.flat[flat] == -np.inf:
            forced += 1
            flat = int(np.argmax(linkage))
        i, j = sorted(divmod(flat, total))
        values.append(float(linkage[i, j]))
        one_model = models[i] == models[j] and (models[i] & (models[i] - 1)) == 0
        within += int(one_model)
        cross += int(not one_model)
        members[i].extend(members[j])
        models[i] |= models[j]
        row = np.minimum(sims[i], sims[j])
        if alpha > 0:
            row *= alpha
        else:
            row[(models & models[i]) != 0] = -np.inf
        link = np.minimum(linkage[i], linkage[j])
        alive[j] = False
        for matrix, new in ((sims, row), (linkage, link)):
            matrix[i, :] = new
            matrix[:, i] = new
            matrix[j, :] = -np.inf
            matrix[:, j] = -np.inf
            matrix[i, i] = -np.inf
        if one_model:
            m = int(owner[i])
            budget[m] -= 1
            if budget[m] <= 0:
                block_own(m)

    clusters = [members[k] for k in np.flatnonzero(alive)]
    unmerge = np.zeros((total, len(clusters)))
    for k, cluster in enumerate(clusters):
        unmerge[cluster, k] = 1.0
    merge = (unmerge / unmerge.sum(axis=0, keepdims=True)).T
    return ZipMatch(merge, unmerge, n_models, within, cross, forced, np.asarray(values))


def _axis_rows(tensor: Tensor, ax: Axis, size: int) -> Tensor:
    """The group's block of ``tensor`` along ``ax``, ``(size, -1)`` in float64: one row per channel."""
    start, stop = ax.span(size)
    return tensor.detach().movedim(ax.axis, 0)[start:stop].reshape(size, -1).double()


def zip_states(
    models: Sequence[nn.Module], groups: Sequence[ChannelGroup], zips: Mapping[str, ZipMatch]
) -> dict[str, Tensor]:
    """The state dict of the zipped model: ``W* = sum_i M_out,i W_i U_in,i`` layer by layer.

    Parameters
    ----------
    models
        The N models, in the order of the zips' stacked features.
    groups
        Their channel groups (:func:`mergescope.groups.channel_groups`).
    zips
        Group name -> :class:`ZipMatch`; groups not listed are averaged as they are.

    Returns
    -------
    dict
        Producers and consumers of zipped groups transformed (the average of the models
        transformed by ``apply_linear`` with ``T = N M_i`` and ``T^-1 = U_i``, which is
        the sum above), per-channel parameters merged as ``sum_i M_i v_i``, every other
        entry averaged.
    """
    n = len(models)
    transformed = []
    for i, model in enumerate(models):
        # Scaled by N so that the plain average of the transformed models is sum_i M_i W_i U_i.
        maps = {g: (n * z.model_merge(i), z.model_unmerge(i)) for g, z in zips.items()}
        transformed.append(apply_linear(model, maps, groups, per_channel="mix").state_dict())
    state = average_states(transformed)
    originals = [m.state_dict() for m in models]
    by_name = {g.name: g for g in groups}
    for name, z in zips.items():
        group = by_name[name]
        for ax in group.axes:
            if ax.role != "channel":
                continue
            # apply_linear's "mix" averages a model's own channels only; a cluster may hold
            # another model's channels alone, so the merged values are taken from M directly.
            target = state[ax.param]
            rows = sum(
                torch.from_numpy(z.model_merge(i)).to(target.device)
                @ _axis_rows(originals[i][ax.param], ax, group.size)
                for i in range(n)
            )
            start, stop = ax.span(group.size)
            block = target.movedim(ax.axis, 0)[start:stop]
            block.copy_(rows.reshape(block.shape).to(target.dtype))
    return state


class _Stop(Exception):
    """Ends the zipped network's forward pass at the stop layer."""


class ZippedHeads(nn.Module):
    """A partially zipped model: the zipped network up to a layer, then each model's own layers as a head.

    Parameters
    ----------
    trunk
        The zipped network; only its layers up to ``stop_at`` run.
    heads
        The models whose layers after ``stop_at`` make the heads.
    stop_at
        The layer (module name) whose output is the zipped features.
    unmerges
        ``U_i`` per head, ``(n, merged)``: head ``i`` reads ``U_i z`` at ``stop_at``.
    combine
        How the heads' predictions are combined (see
        :func:`mergescope_plugins.ensemble.combine_outputs`).

    Notes
    -----
    Each head is a whole model whose output at ``stop_at`` is replaced by a forward
    hook, so its layers before ``stop_at`` are computed and discarded: simple and
    general, at the cost of running them once per head.
    """

    def __init__(
        self,
        trunk: nn.Module,
        heads: Sequence[nn.Module],
        stop_at: str,
        unmerges: Sequence[Tensor],
        combine: str = "probabilities",
    ) -> None:
        super().__init__()
        if len(heads) != len(unmerges):
            raise ValueError(f"{len(heads)} heads but {len(unmerges)} unmerge matrices")
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {', '.join(map(repr, COMBINE))}, got {combine!r}")
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)
        self.stop_at = stop_at
        self.combine = combine
        for i, u in enumerate(unmerges):
            self.register_buffer(f"unmerge{i}", torch.as_tensor(u, dtype=torch.float32))

    def unmerge(self, i: int) -> Tensor:
        """``U_i`` of head ``i``."""
        return getattr(self, f"unmerge{i}")

    def head(self, i: int) -> ZippedHeads:
        """The zipped network with head ``i`` alone (sharing this model's modules)."""
        return ZippedHeads(self.trunk, [self.heads[i]], self.stop_at, [self.unmerge(i)], self.combine)

    def zipped_features(self, x: Tensor) -> Tensor:
        """The zipped network's output at ``stop_at`` for ``x``."""
        found: list[Tensor] = []

        def stop(module: nn.Module, args: object, output: Tensor) -> None:
            found.append(output)
            raise _Stop

        handle = self.trunk.get_submodule(self.stop_at).register_forward_hook(stop)
        try:
            self.trunk(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not found:
            raise RuntimeError(f"layer {self.stop_at!r} of the zipped network did not run")
        return found[0]

    def head_output(self, i: int, x: Tensor, features: Tensor) -> Tensor:
        """Head ``i``'s logits for ``x``, its layer ``stop_at`` giving ``U_i features``."""
        u = self.unmerge(i)
        if features.shape[1] != u.shape[1]:
            raise ValueError(
                f"the zipped features at {self.stop_at!r} have {features.shape[1]} channels, U has {u.shape[1]}"
            )

        def feed(module: nn.Module, args: object, output: Tensor) -> Tensor:
            return torch.einsum("jk,bk...->bj...", u.to(features.dtype), features)

        handle = self.heads[i].get_submodule(self.stop_at).register_forward_hook(feed)
        try:
            return self.heads[i](x)
        finally:
            handle.remove()

    def forward(self, x: Tensor) -> Tensor:
        """The heads' combined logits."""
        features = self.zipped_features(x)
        return combine_outputs([self.head_output(i, x, features) for i in range(len(self.heads))], self.combine)

    def extra_repr(self) -> str:
        return f"stop_at={self.stop_at!r}, combine={self.combine!r}"


def _module_calls(model: nn.Module, x: Tensor) -> tuple[dict[str, int], Counter[str]]:
    """Every named module's position in the order modules finish in a forward pass, and its call count."""
    probe = copy.deepcopy(model).eval()
    order: dict[str, int] = {}
    calls: Counter[str] = Counter()
    handles = []
    for name, module in probe.named_modules():
        if not name:
            continue

        def note(module: nn.Module, args: object, output: object, name: str = name) -> None:
            order.setdefault(name, len(order))
            calls[name] += 1

        handles.append(module.register_forward_hook(note))
    try:
        with torch.no_grad():
            probe(x.to(next(probe.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return order, calls


@attrs.define
class ZipIt:
    """Zip N models into one by merging correlated features within and across models (ZipIt!), fully or up to a layer.

    Parameters
    ----------
    alpha
        Repeated matching: a merged feature's correlations are scaled by ``alpha`` (0:
        it merges again only with models it does not hold yet).
    beta
        Same-model budget: the share of the merges each model may spend on pairs of its
        own features (0: only merges across models).
    r
        The merge ratio: the share of the ``N n`` stacked features merged away. Only
        ``1 - 1/N`` (0.5 for two models) keeps the architecture's widths, so that is
        the value used and the only one accepted; unset means that.
    stop_at
        Partial zipping: the layer (module name, e.g. ``"relu2"``) up to which the
        models are zipped; each model's layers after it become a head of a multi-head
        model. Unset: every group is zipped into one model of the architecture.
    combine
        With ``stop_at``: how the heads' predictions are combined, ``"probabilities"``
        (mean softmax), ``"logits"`` (mean logits) or ``"max-probability"`` (each
        class's highest probability over the heads, as the paper scores its heads).
    reset_batchnorm
        Measure BatchNorm statistics again on the data after zipping (with ``stop_at``,
        the heads' too: they now read zipped features).
    positions
        Correlate conv features over every spatial position (else over per-image
        channel means).
    """

    name: ClassVar[str] = "zipit"
    paper: ClassVar[str] = "Stoica et al. 2024, ZipIt! Merging Models from Different Tasks without Training"

    # The defaults of the authors' matching function (match_tensors_zipit: a=0.3, b=0.125).
    alpha: float = attrs.field(default=0.3, converter=as_float, validator=probability)
    beta: float = attrs.field(default=0.125, converter=as_float, validator=probability)
    r: float | None = attrs.field(default=None, validator=optional(probability))
    stop_at: str | None = attrs.field(default=None, validator=optional(non_empty_str))
    combine: str = attrs.field(default="probabilities", validator=one_of(*COMBINE))
    reset_batchnorm: bool = attrs.field(default=True, validator=boolean)
    positions: bool = attrs.field(default=True, validator=boolean)

    def merge(
        self, models: Mapping[str, nn.Module], context: Context, alignment: Alignment | None = None
    ) -> MergeResult:
        """Zip the step's models (all of them, two or more), fully or up to ``stop_at``.

        Returns
        -------
        MergeResult
            ``model``: a model of the architecture (full zip) or a
            :class:`ZippedHeads` (with ``stop_at``). ``results``: per group (dim
            ``group``) ``units``, ``zipped``, ``within_merges`` (the share of the merges
            that joined features of one model), ``cross_merges``, ``forced_merges``,
            ``merged_correlation`` (mean correlation of the merges) and ``assignment``
            (dims ``group, model, unit``: the merged feature of each unit, -1 past a
            group's width); scalars ``loss``, ``accuracy`` and ``stop_at``; with
            ``stop_at``, ``head_loss`` and ``head_accuracy`` (dim ``model``: each head
            alone on the zipped features).

        Raises
        ------
        ConfigError
            Fewer than two models, no data, ``r`` other than ``1 - 1/N``, models that
            do not match, or a ``stop_at`` that is not a layer carrying a channel group,
            runs more than once, or is bypassed by a later layer.
        """
        names = list(models)
        n_models = len(names)
        if n_models < 2:
            raise ConfigError(f"ZipIt zips two models or more, got {names}", where="key 'models'")
        if context.data is None:
            raise ConfigError("ZipIt measures the correlations of the models' features and needs [data]")
        if self.r is not None and abs(float(self.r) - (1 - 1 / n_models)) > 1e-9:
            raise ConfigError(
                f"r = {self.r} would make the zipped layers {round((1 - float(self.r)) * n_models, 3)} times as wide "
                f"as the models'; a merge of {n_models} models of one architecture needs r = 1 - 1/{n_models} "
                f"= {1 - 1 / n_models:.4g}: leave 'r' unset",
                where="key 'r'",
            )
        try:
            check_compatible({n: models[n].state_dict() for n in names})
        except ValueError as exc:
            raise ConfigError(f"cannot zip models {names}: {exc}", where="key 'models'") from exc
        x = example_input(context.data)
        groups = channel_groups(models[names[0]], x)
        if not groups:
            raise ValueError("the models have no channel groups (no hidden units to zip)")
        models = align_step_models(models, alignment, groups, x)
        ordered = [models[n] for n in names]
        reading = group_layers(ordered[0], x)
        zipped, stop_group = self._zipped_groups(ordered[0], x, groups, reading)
        zips = self._match(ordered, names, groups, zipped, reading, context)
        state = zip_states(ordered, groups, zips)
        if self.stop_at is None:
            model = build_model(ordered[0], state, context, reset=self.reset_batchnorm)
        else:
            trunk = build_model(ordered[0], state)
            unmerges = [torch.from_numpy(zips[stop_group].model_unmerge(i)) for i in range(n_models)]
            model = ZippedHeads(trunk, [copy.deepcopy(m) for m in ordered], self.stop_at, unmerges, self.combine)
            model = model.to(next(trunk.parameters()).device).eval()
            self._check_cut(model, x)
            if self.reset_batchnorm:
                reset_batchnorm(model, context.data, batch_size=context.batch_size, progress=context.progress)
            model.eval()
        evaluation = context.evaluate(model)
        results = self._results(groups, zips, names, evaluation)
        if isinstance(model, ZippedHeads):
            heads = [context.evaluate(model.head(i)) for i in range(n_models)]
            results["head_loss"] = ("model", np.asarray([e.loss for e in heads]))
            results["head_accuracy"] = ("model", np.asarray([e.accuracy for e in heads]))
        return MergeResult(model, results)

    def _zipped_groups(
        self, model: nn.Module, x: Tensor, groups: Sequence[ChannelGroup], reading: Mapping[str, list[str]]
    ) -> tuple[list[ChannelGroup], str | None]:
        """The groups to zip (those computed by ``stop_at``) and the group ``stop_at`` outputs."""
        if self.stop_at is None:
            return list(groups), None
        # Module outputs only: "<module>@in" reading points are not outputs a hook can replace.
        accepted = sorted({p for g in groups for p in g.producers} | {r for g in groups for r in reading[g.name]})
        accepted = [a for a in accepted if "@" not in a]
        carrying = [g for g in groups if self.stop_at in g.producers or self.stop_at in reading[g.name]]
        if not carrying or self.stop_at not in accepted:
            raise ConfigError(
                f"layer {self.stop_at!r} does not output a channel group's units; partial zipping stops at one "
                f"of {', '.join(accepted)}.{did_you_mean(self.stop_at, accepted)}",
                where="key 'stop_at'",
            )
        order, calls = _module_calls(model, x)
        if calls[self.stop_at] != 1:
            raise ConfigError(
                f"layer {self.stop_at!r} runs {calls[self.stop_at]} times in a forward pass; partial zipping replaces "
                "its output, so it must run once (a block's output rather than a shared activation)",
                where="key 'stop_at'",
            )
        stop = order[self.stop_at]
        zipped = [g for g in groups if min(order.get(p, len(order)) for p in g.producers) <= stop]
        return zipped, carrying[0].name

    def _match(
        self,
        models: Sequence[nn.Module],
        names: Sequence[str],
        groups: Sequence[ChannelGroup],
        zipped: Sequence[ChannelGroup],
        reading: Mapping[str, list[str]],
        context: Context,
    ) -> dict[str, ZipMatch]:
        """Record every group's features in one pass and zip the groups of ``zipped``."""
        sources = {g.name: list(reading[g.name]) or list(g.producers) for g in groups}
        # Every group's layers, zipped or not: full and partial zips of the same models share one recording.
        layers = sorted({layer for g in groups for layer in sources[g.name]})
        store = context.record(
            dict(zip(names, models)),
            {n: layers for n in names},
            pairs=[(a, b) for i, a in enumerate(names) for b in names[i + 1 :]],
            covariance=True,
            keep_activations=False,
            positions=self.positions,
        )
        zips: dict[str, ZipMatch] = {}
        for g in context.progress(zipped, desc="ZipIt matching", total=len(zipped)):
            blocks: list[list[np.ndarray]] = [[np.empty(0)] * len(names) for _ in names]
            for i, a in enumerate(names):
                # A group several layers write (a residual stream): pool their covariances.
                blocks[i][i] = sum(store.covariance(a, layer).covariance for layer in sources[g.name])
                for j in range(i + 1, len(names)):
                    cross = sum(store.cross(a, names[j], layer).covariance for layer in sources[g.name])
                    blocks[i][j], blocks[j][i] = cross, cross.T
            correlation = correlation_from_covariance(np.block(blocks))
            zips[g.name] = zip_match(correlation, len(names), alpha=self.alpha, beta=self.beta)
        return zips

    def _check_cut(self, model: ZippedHeads, x: Tensor) -> None:
        """Refuse a ``stop_at`` that a later layer bypasses (a skip connection across it)."""
        x = x.to(model.unmerge(0).device)
        other = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x)
        with torch.no_grad():
            features = model.zipped_features(x)
            for i in range(len(model.heads)):
                if not torch.allclose(model.head_output(i, x, features), model.head_output(i, other, features)):
                    raise ConfigError(
                        f"the layers after {self.stop_at!r} also read earlier layers (a skip connection across "
                        "it), so the heads would mix zipped and unzipped features; stop at a layer every later "
                        "layer depends on only through it, such as a residual block's output",
                        where="key 'stop_at'",
                    )

    def _results(
        self, groups: Sequence[ChannelGroup], zips: Mapping[str, ZipMatch], names: Sequence[str], evaluation: Evaluation
    ) -> xr.Dataset:
        """The step's results: per-group statistics of the zips, the assignment, loss and accuracy."""
        widest = max(g.size for g in groups)
        assignment = np.full((len(groups), len(names), widest), -1, dtype=np.int64)
        within = np.full(len(groups), np.nan)
        cross = np.full(len(groups), np.nan)
        forced = np.zeros(len(groups), dtype=np.int64)
        correlation = np.full(len(groups), np.nan)
        for k, g in enumerate(groups):
            z = zips.get(g.name)
            if z is None:
                continue
            merges = max(z.within + z.cross, 1)
            within[k], cross[k], forced[k] = z.within / merges, z.cross / merges, z.forced
            correlation[k] = float(z.correlations.mean()) if len(z.correlations) else np.nan
            assignment[k, :, : g.size] = z.assignment()
        return xr.Dataset(
            {
                "units": ("group", np.asarray([g.size for g in groups])),
                "zipped": ("group", np.asarray([g.name in zips for g in groups])),
                "within_merges": ("group", within),
                "cross_merges": ("group", cross),
                "forced_merges": ("group", forced),
                "merged_correlation": ("group", correlation),
                "assignment": (("group", "model", "unit"), assignment),
                "stop_at": self.stop_at or "",
                "loss": evaluation.loss,
                "accuracy": evaluation.accuracy,
            },
            coords={"group": [g.name for g in groups], "model": list(names), "unit": np.arange(widest)},
        )

    def rebuild(self, models: Mapping[str, nn.Module], state: Mapping[str, Tensor]) -> nn.Module:
        """A module of the zipped model's structure, built from the step's models, into which ``state`` loads.

        Parameters
        ----------
        models
            The step's models, in the step's order.
        state
            The saved state dict (a model of the architecture, or with ``stop_at`` the
            trunk's, the heads' and the ``unmerge<i>`` buffers).
        """
        ordered = list(models.values())
        if self.stop_at is None:
            return copy.deepcopy(ordered[0]).eval()
        unmerges = [torch.zeros(tuple(state[f"unmerge{i}"].shape)) for i in range(len(ordered))]
        heads = [copy.deepcopy(m) for m in ordered]
        return ZippedHeads(copy.deepcopy(ordered[0]), heads, self.stop_at, unmerges, self.combine).eval()

    def describe(self, result: xr.Dataset) -> str:
        """Accuracy, how many groups were zipped, and the share of within-model merges."""
        zipped = int(result["zipped"].sum())
        within = float(result["within_merges"].mean())
        where = f"up to {self.stop_at} ({zipped} of {result.sizes['group']} groups)" if self.stop_at else "fully"
        return (
            f"zipped {result.sizes['model']} models {where}: accuracy {float(result['accuracy']):.3f}; "
            f"{100 * within:.0f}% of merges within one model, mean merged correlation "
            f"{float(result['merged_correlation'].mean()):.3f}"
        )


@hookimpl
def register_mergers(register):
    """Register :class:`ZipIt`."""
    register(ZipIt)
