"""Weight matching (Git Re-Basin): permute units so the weights themselves line up.

Ainsworth et al. (2023), Algorithm 1: for the permutation ``P_g`` of every channel group
``g`` in turn (random order), with the others held fixed, maximise
``sum over axes of g  <W_ref, P_g W_other (other permutations applied)>``, a linear
assignment problem (:func:`scipy.optimize.linear_sum_assignment`); repeat until no
group improves. Every parameter axis of a group counts: producers' output axes,
BatchNorm scale and shift, consumers' input axes (found by tracing,
:mod:`mergescope.groups`); BatchNorm running means and variances count only with
``batchnorm_statistics = true`` (they are permuted with their channels either way).

Attention heads (groups with ``heads > 1``; see :class:`mergescope.groups.ChannelGroup`)
may only move as wholes, and the query/key and value/output groups of one attention
layer share the head order (their ``tied`` key). Such groups are visited together and
solved with a hierarchical assignment (:func:`match_heads`): for each pair of a
reference head ``a`` and a model head ``b``, the best order within the head is a linear
assignment over the block ``S[a*d:(a+1)*d, b*d:(b+1)*d]`` of each group's score ``S``;
the sum of those optima over the tied groups is the cost of the pair, and a linear
assignment over the heads picks the head order. The residual stream of a transformer is
one group whose score sums over every parameter that reads or writes it.

With ``strategy = "merge-many"`` (Ainsworth et al. 2023, MergeMany) N models are
aligned to each other rather than to one of them: each model in turn (random order) is
matched to the average of all the others as currently permuted, until a round changes
no permutation. The common unit order is then relabelled so the reference keeps its own
(relabelling every model alike changes no merge), so the result is an ordinary
:class:`~mergescope.Alignment` onto the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import attrs
import numpy as np
import threadpoolctl
import xarray as xr
from scipy.optimize import linear_sum_assignment
from torch import nn

from mergescope.batchnorm import running_stat_keys
from mergescope.components import Alignment, Context
from mergescope.groups import Axis, ChannelGroup, channel_groups, example_input, head_permutation, permutation_matrix
from mergescope.hookspecs import hookimpl
from mergescope.states import check_compatible
from mergescope.validators import boolean, integer, one_of, positive_int

__all__ = [
    "match_weights",
    "match_heads",
    "solved_together",
    "merge_many",
    "permute_arrays",
    "moved_units",
    "without_parameters",
    "WeightMatching",
    "register_aligners",
]

STRATEGIES = ("reference", "merge-many")


def _block(perm: np.ndarray, ax: Axis, size: int, length: int) -> np.ndarray:
    """Index along an axis of ``length`` entries applying ``perm`` to the group's block."""
    index = np.arange(length)
    start, stop = ax.span(size)
    index[start:stop] = ax.entries(perm)
    return index


def _rows(tensor: np.ndarray, ax: Axis, size: int) -> np.ndarray:
    """The group's block of ``tensor`` as a ``(size, -1)`` matrix, one row per unit."""
    start, stop = ax.span(size)
    block = np.take(tensor, np.arange(start, stop), axis=ax.axis)
    block = np.moveaxis(block, ax.axis, 0)
    return block.reshape(size, -1)


def match_heads(scores: Sequence[np.ndarray], heads: int) -> tuple[list[np.ndarray], float]:
    """The best permutations of groups of attention heads that share one head order.

    A hierarchical assignment: for every pair of a reference head ``a`` and a model head
    ``b`` and every group, the best order of ``b``'s channels within ``a``'s position is
    a linear assignment over the ``d x d`` block ``score[a*d:(a+1)*d, b*d:(b+1)*d]``;
    the pair's cost is the sum of those optima over the groups, and a linear assignment
    over the ``heads x heads`` costs picks the head order. The result is optimal among
    the permutations that move whole heads, the same way in every group.

    Parameters
    ----------
    scores
        One ``(size, size)`` matrix per group, ``score[i, j]`` the gain of placing the
        model's unit ``j`` at the reference's position ``i``; every group of one size.
    heads
        Number of heads; ``size`` must be a multiple of it.

    Returns
    -------
    perms
        One permutation per group (``perm[i]``: the model's unit placed at position
        ``i``), built by :func:`mergescope.groups.head_permutation`.
    total
        The summed score of the permutations.
    """
    size = scores[0].shape[0]
    if heads < 1 or size % heads or any(s.shape != (size, size) for s in scores):
        raise ValueError(f"match_heads needs square scores of one size divisible by {heads} heads")
    d = size // heads
    cost = np.zeros((heads, heads))
    within = np.zeros((len(scores), heads, heads, d), dtype=np.int64)
    for k, score in enumerate(scores):
        blocks = score.reshape(heads, d, heads, d)
        for a in range(heads):
            for b in range(heads):
                rows, cols = linear_sum_assignment(blocks[a, :, b, :], maximize=True)
                within[k, a, b] = cols[np.argsort(rows)]
                cost[a, b] += blocks[a, rows, b, cols].sum()
    rows, cols = linear_sum_assignment(cost, maximize=True)
    order = cols[np.argsort(rows)]
    perms = [head_permutation(order, within[k, np.arange(heads), order]) for k in range(len(scores))]
    return perms, float(cost[np.arange(heads), order].sum())


def solved_together(groups: Sequence[ChannelGroup]) -> list[list[ChannelGroup]]:
    """The groups as the units a matcher solves at once: the groups tied to one head order together,
    every other group alone; in the order of each unit's first group.
    """
    units: dict[str, list[ChannelGroup]] = {}
    for g in groups:
        units.setdefault(g.tied or f"\0{g.name}", []).append(g)
    return list(units.values())


def match_weights(
    reference: Mapping[str, np.ndarray],
    other: Mapping[str, np.ndarray],
    groups: Sequence[ChannelGroup],
    *,
    seed: int = 0,
    max_iter: int = 100,
    initial: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """Git Re-Basin weight matching of ``other`` onto ``reference``.

    Parameters
    ----------
    reference, other
        State dicts as float64 arrays (same keys and shapes).
    groups
        The architecture's channel groups.
    seed
        Seeds the random order in which groups are visited.
    max_iter
        Sweeps over all groups at most.
    initial
        Permutations to start from (``{group: perm}``); identity by default.

    Returns
    -------
    perms
        ``{group: perm}``, ``perm[j]`` the unit of ``other`` placed at position ``j``.
    sweeps
        The number of sweeps until no group improved.
    """
    # One BLAS thread: on a shared machine a second one mostly waits (2-4x slower).
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        return _match_weights(reference, other, groups, seed, max_iter, initial)


def _match_weights(
    reference: Mapping[str, np.ndarray],
    other: Mapping[str, np.ndarray],
    groups: Sequence[ChannelGroup],
    seed: int,
    max_iter: int,
    initial: Mapping[str, np.ndarray] | None,
) -> tuple[dict[str, np.ndarray], int]:
    perms = {g.name: np.arange(g.size) for g in groups}
    if initial is not None:
        perms.update({name: np.asarray(p, dtype=np.int64) for name, p in initial.items()})
    touching: dict[str, list[tuple[ChannelGroup, Axis]]] = {}
    for g in groups:
        for ax in g.axes:
            touching.setdefault(ax.param, []).append((g, ax))
    # A group's score matrix depends only on the permutations of the groups sharing its
    # parameters. When none of them changed since the group was last visited, the same
    # matrix would give the same (non-)move again: skip it. This is exact, and it saves
    # most of the products in the last sweeps, where few groups still move.
    depends = {
        g.name: sorted(
            {g2.name for ax in g.axes for g2, ax2 in touching[ax.param] if g2.name != g.name or ax2.axis != ax.axis}
        )
        for g in groups
    }
    version = {g.name: 0 for g in groups}
    seen: dict[str, tuple[int, ...]] = {}
    # Likewise per (group, axis): its product changes only when a permutation on the
    # parameter's other axes does. The reference's blocks never change.
    cached: dict[tuple[str, int], tuple[tuple[int, ...], np.ndarray, np.ndarray | None]] = {}
    moved: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    updated = False  # whether a product was updated in place of being rebuilt since the last check

    def _moved(g: ChannelGroup, i: int, ax: Axis) -> tuple[np.ndarray, np.ndarray]:
        # The group's block of both models with its axis first: (units, ...).
        if (g.name, i) not in moved:
            start, stop = ax.span(g.size)
            moved[g.name, i] = (
                np.ascontiguousarray(np.moveaxis(reference[ax.param], ax.axis, 0)[start:stop]),
                np.moveaxis(other[ax.param], ax.axis, 0)[start:stop],
            )
        return moved[g.name, i]

    def _contribution(g: ChannelGroup, i: int, ax: Axis) -> np.ndarray:
        nonlocal updated
        # The group's block is sliced out of its own axis, so what other groups hold on that axis (the other
        # parts of a packed q/k/v projection) never enters the product: only the parameter's other axes do.
        others = [(g2, ax2) for g2, ax2 in touching[ax.param] if ax2.axis != ax.axis]
        key = tuple(version[g2.name] for g2, _ in others)
        hit = cached.get((g.name, i))
        if hit is not None and hit[0] == key:
            return hit[1]
        ref_block, other_block = _moved(g, i, ax)
        if hit is not None and hit[2] is not None:
            # One neighbour moved a few units: add the product of just the columns it moved
            # (exact up to rounding; a full sweep confirms convergence, see below).
            ((g2, ax2),) = others
            old, new = hit[2], perms[g2.name]
            changed = np.flatnonzero(old != new)
            if 2 * len(changed) < g2.size:
                a = ax2.axis + 1 if ax2.axis < ax.axis else ax2.axis  # that axis in the moved block
                diff = np.take(other_block, ax2.entries(new[changed]), axis=a) - np.take(
                    other_block, ax2.entries(old[changed]), axis=a
                )
                moved_ref = np.take(ref_block, ax2.entries(changed), axis=a)
                product = hit[1] + moved_ref.reshape(g.size, -1) @ diff.reshape(g.size, -1).T
                cached[g.name, i] = (key, product, new.copy())
                updated = True
                return product
        w = other[ax.param]
        for g2, ax2 in others:  # hold every other permutation fixed on the parameter's other axes
            w = np.take(w, _block(perms[g2.name], ax2, g2.size, w.shape[ax2.axis]), axis=ax2.axis)
        product = ref_block.reshape(g.size, -1) @ _rows(w, ax, g.size).T
        # Column updates need a single neighbour on the parameter's other axes.
        cached[g.name, i] = (key, product, perms[others[0][0].name].copy() if len(others) == 1 else None)
        return product

    units = solved_together(groups)
    rng = np.random.default_rng(seed)
    sweep = 0
    while sweep < max_iter:
        sweep += 1
        improved = False
        for index in rng.permutation(len(units)):
            unit = units[index]
            state = tuple(version[d] for g in unit for d in depends[g.name])
            key = unit[0].name
            if seen.get(key) == state:
                continue
            seen[key] = state
            scores = []
            for g in unit:
                score = np.zeros((g.size, g.size))
                for i, ax in enumerate(g.axes):
                    score += _contribution(g, i, ax)
                scores.append(score)
            if len(unit) == 1 and unit[0].heads == 1:
                rows, cols = linear_sum_assignment(scores[0], maximize=True)
                found = [cols[np.argsort(rows)]]
            else:  # attention heads: whole heads, one head order for the unit's groups
                found, _ = match_heads(scores, unit[0].heads)
            old_value = sum(sc[np.arange(g.size), perms[g.name]].sum() for g, sc in zip(unit, scores))
            new_value = sum(sc[np.arange(g.size), p].sum() for g, sc, p in zip(unit, scores, found))
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                for g, p in zip(unit, found):
                    if not np.array_equal(p, perms[g.name]):
                        perms[g.name] = p
                        version[g.name] += 1
                improved = True
        if not improved:
            if not updated:
                return perms, sweep
            # Converged on updated products: repeat the sweep with every product rebuilt.
            cached.clear()
            seen.clear()
            updated = False
            sweep -= 1
    return perms, max_iter


def permute_arrays(
    state: Mapping[str, np.ndarray], groups: Sequence[ChannelGroup], perms: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Apply ``{group: perm}`` to every axis of every group in a state dict of arrays.

    ``perm[j]`` is the unit placed at position ``j``, as in :func:`match_weights`.
    """
    out = dict(state)
    for g in groups:
        for ax in g.axes:
            w = out[ax.param]
            out[ax.param] = np.take(w, _block(perms[g.name], ax, g.size, w.shape[ax.axis]), axis=ax.axis)
    return out


def merge_many(
    states: Mapping[str, Mapping[str, np.ndarray]],
    reference: str,
    groups: Sequence[ChannelGroup],
    *,
    seed: int = 0,
    max_iter: int = 100,
    max_rounds: int = 50,
) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    """MergeMany: align N models to the running average of the others.

    Every round visits the models in a random order; each is weight-matched (starting
    from its current permutations) to the mean of all the other models as they are
    permuted at that moment. Rounds stop when one changes no permutation.

    Parameters
    ----------
    states
        ``{model: state dict of float64 arrays}``, one architecture.
    reference
        The model whose unit order the result is expressed in.
    groups
        The architecture's channel groups.
    seed
        Seeds the visiting order and every weight matching.
    max_iter
        Sweeps of each weight matching at most.
    max_rounds
        Rounds over all models at most.

    Returns
    -------
    perms
        ``{model: {group: perm}}`` mapping every model onto the reference's units (the
        reference's own permutations are the identity).
    rounds
        The number of rounds run.
    """
    names = list(states)
    perms = {m: {g.name: np.arange(g.size) for g in groups} for m in names}
    permuted = {m: dict(states[m]) for m in names}
    rng = np.random.default_rng(seed)
    rounds = 0
    # `rounds` is read after the loop: the number of rounds run.
    for rounds in range(1, max_rounds + 1):  # noqa: B007
        changed = False
        for index in rng.permutation(len(names)):
            m = names[index]
            rest = [permuted[o] for o in names if o != m]
            target = {k: np.mean([s[k] for s in rest], axis=0) for k in states[m]}
            new, _ = match_weights(
                target, states[m], groups, seed=int(rng.integers(2**31)), max_iter=max_iter, initial=perms[m]
            )
            if any(not np.array_equal(new[g], perms[m][g]) for g in new):
                changed = True
                perms[m] = new
                permuted[m] = permute_arrays(states[m], groups, new)
        if not changed:
            break
    # Relabel the common order so the reference's units stay where they are:
    # position j of the result holds what sat where the reference's unit j went.
    relabelled = {}
    for m in names:
        relabelled[m] = {}
        for g in groups:
            back = np.argsort(perms[reference][g.name])
            relabelled[m][g.name] = perms[m][g.name][back]
    return relabelled, rounds


def without_parameters(groups: Sequence[ChannelGroup], params: Sequence[str]) -> list[ChannelGroup]:
    """The groups with the axes of ``params`` left out (for the cost only: permutations still move them).

    How matchers leave BatchNorm running statistics out of their objective
    (``batchnorm_statistics = false``).
    """
    skip = set(params)
    return [attrs.evolve(g, axes=tuple(ax for ax in g.axes if ax.param not in skip)) for g in groups]


def _as_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().double().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}


@attrs.define
class WeightMatching:
    """Permute units so each model's weights best match the reference's (Git Re-Basin coordinate descent).

    Parameters
    ----------
    seed
        Seeds the random order of the groups in every sweep (and of the models with
        ``strategy = "merge-many"``).
    max_iter
        At most this many sweeps over all groups per matching.
    strategy
        ``"reference"``: match every other model to the reference. ``"merge-many"``:
        match every model in turn to the average of the others until nothing changes
        (MergeMany), then express the result in the reference's unit order.
    max_rounds
        With ``"merge-many"``: at most this many rounds over all models.
    batchnorm_statistics
        Include BatchNorm ``running_mean`` and ``running_var`` in the matching cost.
        The affine ``weight`` and ``bias`` always count, and the statistics are
        permuted with their channels either way: this only decides whether they help
        choose the permutation. Included by default, because leaving them out was not
        at least as good on two of the demo's BatchNorm CNNs
        (docs/experiments/weight-matching-batchnorm.md): with them the REPAIRed
        midpoint was more accurate for 4 of 5 matching seeds (mean 73.6 % against
        67.7 %) and the first layer's matched units correlated better for 4 of 5,
        while the plain midpoint favoured leaving them out for 3 of 5 and the last two
        layers' correlations for all 5. The Git Re-Basin JAX reference matches LayerNorm
        networks, which keep no running statistics, so it does not settle the choice.
    """

    name: ClassVar[str] = "weight-matching"
    paper: ClassVar[str] = "Ainsworth et al. 2023, Git Re-Basin: Merging Models modulo Permutation Symmetries"

    seed: int = attrs.field(default=0, validator=integer)
    max_iter: int = attrs.field(default=100, validator=positive_int)
    strategy: str = attrs.field(default="reference", validator=one_of(*STRATEGIES))
    max_rounds: int = attrs.field(default=50, validator=positive_int)
    batchnorm_statistics: bool = attrs.field(default=True, validator=boolean)

    def align(self, models: Mapping[str, nn.Module], reference: str, context: Context) -> Alignment:
        """Match every other model's weights to the reference's (or all to each other's average)."""
        others = [m for m in models if m != reference]
        # One architecture, finite weights; the messages name the parameter at fault.
        check_compatible({m: models[m].state_dict() for m in (reference, *others)})
        groups = channel_groups(models[reference], example_input(context.data))
        if not self.batchnorm_statistics:
            # Out of the cost only: applying the alignment traces the model anew and moves every axis.
            groups = without_parameters(groups, running_stat_keys(models[reference]))
        states = {m: _as_arrays(models[m]) for m in (reference, *others)}
        ref = states[reference]
        sweeps = np.zeros(len(others), dtype=np.int64)
        if self.strategy == "merge-many":
            perms_of, rounds = merge_many(
                states, reference, groups, seed=self.seed, max_iter=self.max_iter, max_rounds=self.max_rounds
            )
            transforms = {m: {n: permutation_matrix(p) for n, p in perms_of[m].items()} for m in others}
            diagnostics = xr.Dataset({"rounds": rounds}).merge(moved_units(perms_of, others, groups))
            return Alignment(reference, transforms, diagnostics)
        transforms: dict[str, dict[str, xr.DataArray]] = {}
        found = {}
        for i, m in enumerate(others):
            found[m], sweeps[i] = match_weights(ref, states[m], groups, seed=self.seed, max_iter=self.max_iter)
            transforms[m] = {name: permutation_matrix(p) for name, p in found[m].items()}
        diagnostics = xr.Dataset({"sweeps": ("model", sweeps)}, coords={"model": others})
        return Alignment(reference, transforms, diagnostics.merge(moved_units(found, others, groups)))

    def describe(self, result: xr.Dataset) -> str:
        """Sweeps until convergence per model, or MergeMany's rounds; the share of units moved."""
        moved = ""
        if "moved_units" in result and "units" in result:
            share = float(result["moved_units"].sum()) / max(1, int(result["units"].sum()) * result.sizes["model"])
            moved = f"; {share:.0%} of units moved"
        if "rounds" in result:
            return f"MergeMany converged in {int(result['rounds'])} rounds{moved}"
        if "sweeps" not in result:
            return "aligned"
        return (
            "; ".join(
                f"{m}: converged in {int(s)} sweeps" for m, s in zip(result["model"].values, result["sweeps"].values)
            )
            + moved
        )


def moved_units(
    perms: Mapping[str, Mapping[str, np.ndarray]], models: Sequence[str], groups: Sequence[ChannelGroup]
) -> xr.Dataset:
    """How far an alignment is from the identity: ``moved_units`` (model, group) and ``units`` (group).

    A unit moves when the permutation does not leave it in place. Fine-tunes of one base
    should move few; independently trained networks move nearly all.
    """
    counts = [[int((np.asarray(perms[m][g.name]) != np.arange(g.size)).sum()) for g in groups] for m in models]
    return xr.Dataset(
        {
            "moved_units": (("model", "group"), np.asarray(counts, dtype=np.int64).reshape(len(models), len(groups))),
            "units": ("group", np.asarray([g.size for g in groups], dtype=np.int64)),
        },
        coords={"model": list(models), "group": [g.name for g in groups]},
    )


@hookimpl
def register_aligners(register):
    """Register :class:`WeightMatching`."""
    register(WeightMatching)
