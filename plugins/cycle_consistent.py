"""C2M3: cycle-consistent alignment of many models through a shared universe.

Crisostomi et al. (2024), "C2M3: Cycle-Consistent Multi-Model Merging". Aligning N > 2
models pair by pair gives maps that need not compose: going ``a -> b -> c`` can land
elsewhere than ``a -> c``. C2M3 gives every model ``m`` one permutation ``P_m^g`` per
channel group ``g`` between a shared *universe* ordering of the units and the model's own
(``P_m`` maps universe to model), and defines the map from ``b`` to ``a`` as
``P_a^g (P_b^g)^T``. Maps so factored are cycle-consistent by construction:
``(P_c P_b^T)(P_b P_a^T) = P_c P_a^T``.

The permutations maximise the weight-matching similarity of Git Re-Basin (Ainsworth et al.
2023) summed over every pair of models, each model expressed in the universe::

    f(P) = sum_{a < b} sum_params < T_a(W_a), T_b(W_b) >

where ``T_m`` re-indexes every channel-group axis of a parameter with ``P_m`` of that
group (for a linear layer between groups ``g_in`` and ``g_out``,
``T_m(W) = (P_m^{g_out})^T W P_m^{g_in}``). As in weight matching, every axis of a group
counts: producers' outputs and biases, consumers' inputs, per-channel parameters
(:mod:`mergescope.groups` finds them by tracing); BatchNorm running statistics count
unless ``batchnorm_statistics = false``.

The problem is solved by Frank-Wolfe over its relaxation to doubly-stochastic matrices
``S_m^g``. Every iteration

1. takes the gradient ``G_m^g = df/dS_m^g``: with ``V`` the model's parameter with every
   *other* group axis re-indexed and ``Y = sum_{b != m} T_b(W_b)``, each axis of the group
   adds ``G[i, j] += <V_i, Y_j>`` (slice ``i`` of ``V`` and ``j`` of ``Y`` along that axis);
2. solves one linear assignment per (model, group), ``D_m^g = argmax_P <G_m^g, P>``, the
   Frank-Wolfe vertex;
3. line-searches one step ``t`` in ``[0, 1]`` for all models together,
   ``S <- S + t (D - S)``;

and stops when the objective has improved the best value so far by less than
``tolerance`` for five iterations in a row, as the authors' code does. At the end each
``S_m^g`` is projected to the nearest permutation by one more linear assignment. Every
model starts at the identity (the authors' default); a random doubly-stochastic start
(``"sinkhorn"``) and a start from Git Re-Basin matchings onto the reference
(``"weight-matching"``, the ``LAP`` start of the authors' two-model matcher) can be
chosen. Their ``"random"`` start, a uniform random matrix that is not doubly
stochastic, is left out.

Where this differs from the authors' code (crisostomi/cycle-consistent-model-merging):

- The line search is exact. Each model's parameter is multilinear in its matrices, so
  along the segment ``f`` is a polynomial in ``t`` of degree at most twice the largest
  number of group axes of one parameter, known in closed form once the parameter is
  re-indexed with the vertex on some axes and the current matrices on the others (the
  vertices are permutations: gathers); it is maximised on ``[0, 1]`` through its
  interpolant (their code runs ``fminbound`` with ``xtol = 1e-3``).
- The tolerance is relative to the objective (absolute there), and a step of exactly
  zero ends the search at once: nothing moved, so every later iteration would repeat it.
- With two models the reference is held at the identity and only the other model moves.
  Their code matches two models with a Frank-Wolfe that moves only one of them; moving
  both, the first step sends each towards the other's order, and where the vertex swaps
  units the two meet halfway, a stationary point whose projection undoes the step.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import ClassVar

import attrs
import numpy as np
import threadpoolctl
import xarray as xr
from scipy.optimize import linear_sum_assignment
from torch import nn

from mergescope.batchnorm import running_stat_keys
from mergescope.components import Alignment, Context
from mergescope.errors import ConfigError
from mergescope.groups import Axis, ChannelGroup, channel_groups, example_input, permutation_matrix
from mergescope.hookspecs import hookimpl
from mergescope.progress import Progress, silent
from mergescope.states import check_compatible
from mergescope.validators import as_float, boolean, in_range, integer, one_of, positive_int
from mergescope_plugins.weight_matching import match_weights, without_parameters

__all__ = [
    "INITIALISATIONS",
    "FrankWolfeResult",
    "axes_by_param",
    "apply_matrices",
    "pairwise_objective",
    "universe_gradients",
    "assignment_vertex",
    "line_search",
    "sinkhorn",
    "initial_matrices",
    "frank_wolfe",
    "pairwise_map",
    "universe_maps",
    "cycle_mismatches",
    "CycleConsistent",
    "register_aligners",
]

INITIALISATIONS = ("identity", "sinkhorn", "weight-matching")

# Iterations in a row without enough improvement before stopping (the authors' patience).
PATIENCE = 5

# One (group, axis) of a parameter: the group's name, its size and the axis.
Occurrence = tuple[str, int, Axis]
# {model: {group: matrix}}, S[i, j]: how much of the model's unit i sits at universe position j.
Matrices = dict[str, dict[str, np.ndarray]]


def axes_by_param(groups: Sequence[ChannelGroup]) -> dict[str, list[Occurrence]]:
    """Every group axis of every parameter, by parameter: ``{param: [(group, size, axis), ...]}``."""
    by_param: dict[str, list[Occurrence]] = {}
    for g in groups:
        for ax in g.axes:
            by_param.setdefault(ax.param, []).append((g.name, g.size, ax))
    return by_param


def _apply_one(tensor: np.ndarray, size: int, ax: Axis, matrix: np.ndarray) -> np.ndarray:
    """Re-index the group's block of ``tensor`` along ``ax``: ``new[j] = sum_i matrix[i, j] old[i]``.

    ``matrix`` may also be a permutation as indices, ``new[j] = old[perm[j]]`` (a gather).
    """
    start, stop = ax.span(size)
    moved = np.moveaxis(tensor, ax.axis, 0)
    block = moved[start:stop]
    rows = block.reshape(size, -1)
    mixed = rows[matrix] if matrix.ndim == 1 else np.tensordot(matrix, rows, axes=([0], [0]))
    out = moved.copy()
    out[start:stop] = mixed.reshape(block.shape)
    return np.moveaxis(out, 0, ax.axis)


def _block_rows(tensor: np.ndarray, size: int, ax: Axis) -> np.ndarray:
    """The group's block of ``tensor`` as a ``(size, -1)`` matrix, one row per unit."""
    start, stop = ax.span(size)
    return np.moveaxis(tensor, ax.axis, 0)[start:stop].reshape(size, -1)


def apply_matrices(
    tensor: np.ndarray, occurrences: Sequence[Occurrence], matrices: Mapping[str, np.ndarray], skip: int | None = None
) -> np.ndarray:
    """Express one parameter in the universe: re-index each of its group axes with its group's matrix.

    Parameters
    ----------
    tensor
        The parameter of one model.
    occurrences
        Its group axes, ``(group name, group size, axis)``.
    matrices
        ``{group: S}`` of the model, ``S[i, j]`` the weight of unit ``i`` at position ``j``
        (a permutation matrix ``S[perm[j], j] = 1`` gives ``new[j] = old[perm[j]]``), or
        ``{group: perm}`` for permutations given as indices.
    skip
        Index into ``occurrences`` of an axis to leave as it is (for a gradient).
    """
    for k, (name, size, ax) in enumerate(occurrences):
        if k != skip:
            tensor = _apply_one(tensor, size, ax, matrices[name])
    return tensor


def pairwise_objective(universe: Mapping[str, Mapping[str, np.ndarray]]) -> float:
    """``sum_{a < b} <U_a, U_b>`` over the parameters of models already expressed in the universe.

    Computed as ``(|sum_m U_m|^2 - sum_m |U_m|^2) / 2`` per parameter.
    """
    models = list(universe)
    total = 0.0
    for param in universe[models[0]]:
        tensors = [universe[m][param] for m in models]
        summed = np.sum(tensors, axis=0)
        total += 0.5 * (float(np.vdot(summed, summed)) - sum(float(np.vdot(t, t)) for t in tensors))
    return total


def _universe(
    states: Mapping[str, Mapping[str, np.ndarray]], occurrences: Mapping[str, Sequence[Occurrence]], matrices: Matrices
) -> dict[str, dict[str, np.ndarray]]:
    return {m: {p: apply_matrices(states[m][p], occ, matrices[m]) for p, occ in occurrences.items()} for m in states}


def universe_gradients(
    states: Mapping[str, Mapping[str, np.ndarray]],
    groups: Sequence[ChannelGroup],
    matrices: Matrices,
    universe: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> Matrices:
    """The gradient of :func:`pairwise_objective` with respect to every model's matrix of every group.

    For model ``a`` and a group axis of a parameter: ``V`` is ``a``'s parameter with its
    other group axes re-indexed, ``Y = sum_{b != a} T_b(W_b)`` the others in the universe,
    and the axis adds ``G[i, j] = <V_i, Y_j>`` (unit slices along the axis).

    Parameters
    ----------
    states
        ``{model: state dict of float64 arrays}``.
    groups
        The channel groups (the axes that count).
    matrices
        ``{model: {group: S}}``, the current point.
    universe
        The models already expressed in the universe at ``matrices``, when at hand.

    Returns
    -------
    dict
        ``{model: {group: G}}``, ``G`` of shape ``(size, size)`` indexed ``[unit, position]``.
    """
    occurrences = axes_by_param(groups)
    if universe is None:
        universe = _universe(states, occurrences, matrices)
    grads = {m: {g.name: np.zeros((g.size, g.size)) for g in groups} for m in states}
    for param, occ in occurrences.items():
        summed = np.sum([universe[m][param] for m in states], axis=0)
        for m in states:
            others = summed - universe[m][param]
            for k, (name, size, ax) in enumerate(occ):
                partial = apply_matrices(states[m][param], occ, matrices[m], skip=k)
                grads[m][name] += _block_rows(partial, size, ax) @ _block_rows(others, size, ax).T
    return grads


def assignment_vertex(gradient: np.ndarray) -> np.ndarray:
    """The permutation matrix ``P`` maximising ``<gradient, P>`` (one linear assignment).

    Returns ``perm`` with ``P[perm[j], j] = 1``: the unit placed at position ``j``.
    """
    rows, cols = linear_sum_assignment(gradient, maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[cols] = rows
    return perm


def _perm_matrix(perm: np.ndarray) -> np.ndarray:
    matrix = np.zeros((len(perm), len(perm)))
    matrix[perm, np.arange(len(perm))] = 1.0
    return matrix


def line_search(phi: Callable[[float], float], degree: int, at_zero: float | None = None) -> tuple[float, float]:
    """Maximise a polynomial ``phi`` of known ``degree`` on ``[0, 1]`` exactly.

    ``phi`` is interpolated at ``degree + 1`` Chebyshev-Lobatto points of ``[0, 1]``; the
    candidates are both ends and the real roots of the derivative inside, each evaluated
    with ``phi`` itself.

    Parameters
    ----------
    phi
        The objective along the segment.
    degree
        An upper bound on its degree.
    at_zero
        ``phi(0)`` when already known.

    Returns
    -------
    t, value
        The best step and ``phi(t)``; ``t = 0`` unless some step improves on ``phi(0)``.
    """
    degree = max(int(degree), 1)
    nodes = 0.5 * (1.0 - np.cos(np.pi * np.arange(degree + 1) / degree))
    values = np.array([at_zero if (x == 0.0 and at_zero is not None) else phi(float(x)) for x in nodes])
    poly = np.polynomial.Chebyshev.fit(nodes, values, degree, domain=[0.0, 1.0])
    roots = poly.deriv().roots()
    inside = sorted({float(r.real) for r in roots if abs(r.imag) < 1e-9 and 0.0 < r.real < 1.0})
    best_t, best = 0.0, float(values[0])
    # The ends are exact nodes; interior candidates are evaluated for real, not on the interpolant.
    for t, value in [(1.0, float(values[-1]))] + [(t, phi(t)) for t in inside]:
        if value > best:
            best_t, best = t, value
    return best_t, best


def sinkhorn(matrix: np.ndarray, iterations: int = 1000, tolerance: float = 1e-12) -> np.ndarray:
    """Scale a positive matrix to a doubly-stochastic one (Sinkhorn-Knopp).

    Rows and columns are normalised in turn until every sum is within ``tolerance`` of 1.
    """
    out = np.array(matrix, dtype=np.float64)
    for _ in range(iterations):
        out /= out.sum(axis=1, keepdims=True)
        out /= out.sum(axis=0, keepdims=True)
        if np.abs(out.sum(axis=1) - 1.0).max() < tolerance:
            break
    return out


def initial_matrices(
    states: Mapping[str, Mapping[str, np.ndarray]],
    groups: Sequence[ChannelGroup],
    method: str,
    reference: str,
    seed: int = 0,
    hold_reference: bool = False,
) -> Matrices:
    """The starting point of Frank-Wolfe.

    Parameters
    ----------
    states
        ``{model: state dict of float64 arrays}``.
    groups
        The channel groups.
    method
        ``"identity"``: every model's own order is the universe (the authors' default).
        ``"sinkhorn"``: a random doubly-stochastic matrix per model and group.
        ``"weight-matching"``: the reference's order is the universe and every other model
        starts from its Git Re-Basin matching onto the reference.
    reference
        The reference model (for ``"weight-matching"`` and ``hold_reference``).
    seed
        Seeds ``"sinkhorn"``'s draws and weight matching's group order.
    hold_reference
        Start the reference at the identity whatever ``method`` says (its order is then
        the universe).
    """
    if method == "identity":
        return {m: {g.name: np.eye(g.size) for g in groups} for m in states}
    if method == "sinkhorn":
        rng = np.random.default_rng(seed)
        return {
            m: {
                g.name: np.eye(g.size)
                if hold_reference and m == reference
                else sinkhorn(rng.uniform(size=(g.size, g.size)))
                for g in groups
            }
            for m in states
        }
    if method == "weight-matching":
        out = {reference: {g.name: np.eye(g.size) for g in groups}}
        for m in states:
            if m != reference:
                perms, _ = match_weights(states[reference], states[m], groups, seed=seed)
                out[m] = {name: _perm_matrix(p) for name, p in perms.items()}
        return {m: out[m] for m in states}
    raise ValueError(f"unknown initialisation {method!r}; choose one of {', '.join(INITIALISATIONS)}")


@attrs.frozen
class FrankWolfeResult:
    """What :func:`frank_wolfe` found.

    Attributes
    ----------
    perms
        ``{model: {group: perm}}`` onto the universe, ``perm[j]`` the model's unit at
        universe position ``j``.
    matrices
        The relaxed (doubly-stochastic) solution before projection.
    initial_objective
        The objective at the starting point.
    objective, step_size, gap
        Per iteration: the relaxed objective after the step, the step taken and the
        Frank-Wolfe gap ``sum <G, D - S>`` before it (an upper bound on what the linearised
        objective could still gain).
    converged
        Whether the stopping rule ended the search before ``max_iter``.
    """

    perms: dict[str, dict[str, np.ndarray]]
    matrices: Matrices
    initial_objective: float
    objective: list[float]
    step_size: list[float]
    gap: list[float]
    converged: bool


def frank_wolfe(
    states: Mapping[str, Mapping[str, np.ndarray]],
    groups: Sequence[ChannelGroup],
    initial: Matrices,
    *,
    max_iter: int = 200,
    tolerance: float = 1e-6,
    hold: Collection[str] = (),
    progress: Progress = silent,
) -> FrankWolfeResult:
    """Maximise :func:`pairwise_objective` over doubly-stochastic matrices, then project to permutations.

    Parameters
    ----------
    states
        ``{model: state dict of float64 arrays}``, one architecture.
    groups
        The channel groups whose axes make the objective.
    initial
        ``{model: {group: S}}`` to start from (see :func:`initial_matrices`).
    max_iter
        Frank-Wolfe iterations at most.
    tolerance
        Stop after :data:`PATIENCE` iterations in a row that each improve the best
        objective so far by less than ``tolerance`` times its magnitude.
    hold
        Models whose matrices stay where they start (their own order as the universe,
        with an identity start).
    progress
        ``progress(iterable, desc, total)``.
    """
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        return _frank_wolfe(states, groups, initial, max_iter, tolerance, set(hold), progress)


class _Segment:
    """The models in the universe along ``S + t (D - S)``, in closed form.

    A parameter with ``k`` group axes is multilinear in its matrices, so along the segment

        U_m(t) = sum_A (1 - t)^(k - |A|) t^|A| C_{m, A}

    over the subsets ``A`` of its axes, ``C_{m, A}`` the parameter with the vertex ``D`` on
    the axes in ``A`` and ``S`` on the others (``C_{m, {}}`` is the current universe). The
    vertices are permutations, so re-indexing with them is a gather and a term costs fewer
    products than a point of the segment would. The pairwise objective becomes
    ``sum_params w(t)^T H w(t) / 2`` with ``H[A, B] = sum_{a != b} <C_{a, A}, C_{b, B}>``:
    any ``t`` then costs a few scalar products. Models without a vertex (held ones) stay
    where they are.
    """

    def __init__(
        self,
        states: Mapping[str, Mapping[str, np.ndarray]],
        occurrences: Mapping[str, Sequence[Occurrence]],
        matrices: Matrices,
        vertices: Mapping[str, Mapping[str, np.ndarray]],
        universe: Mapping[str, Mapping[str, np.ndarray]],
    ) -> None:
        self.models = list(states)
        self.subsets: dict[str, list[tuple[int, ...]]] = {}
        self.terms: dict[str, dict[str, list[np.ndarray]]] = {}
        self.gram: dict[str, np.ndarray] = {}
        for param, occ in occurrences.items():
            subsets = list(itertools.product((0, 1), repeat=len(occ)))
            terms: dict[str, list[np.ndarray]] = {}
            for m in self.models:
                if m not in vertices:
                    terms[m] = [universe[m][param]] * len(subsets)
                    continue
                terms[m] = [
                    universe[m][param]
                    if not any(subset)
                    else apply_matrices(
                        states[m][param],
                        occ,
                        {name: (vertices[m] if on else matrices[m])[name] for on, (name, _, _) in zip(subset, occ)},
                    )
                    for subset in subsets
                ]
            flat = {m: np.stack([c.ravel() for c in terms[m]]) for m in self.models}
            summed = np.sum(list(flat.values()), axis=0)
            self.gram[param] = summed @ summed.T - sum(f @ f.T for f in flat.values())
            self.subsets[param], self.terms[param] = subsets, terms

    def _weights(self, param: str, t: float) -> np.ndarray:
        k = len(self.subsets[param][0])
        return np.array([(1.0 - t) ** (k - sum(a)) * t ** sum(a) for a in self.subsets[param]])

    def objective(self, t: float) -> float:
        """The pairwise objective at ``t``."""
        total = 0.0
        for param, h in self.gram.items():
            w = self._weights(param, t)
            total += 0.5 * float(w @ h @ w)
        return total

    def universe(self, t: float) -> dict[str, dict[str, np.ndarray]]:
        """Every model in the universe at ``t``."""
        out: dict[str, dict[str, np.ndarray]] = {m: {} for m in self.models}
        for param, terms in self.terms.items():
            w = self._weights(param, t)
            for m in self.models:
                out[m][param] = sum(wi * c for wi, c in zip(w, terms[m]))
        return out


def _frank_wolfe(
    states: Mapping[str, Mapping[str, np.ndarray]],
    groups: Sequence[ChannelGroup],
    initial: Matrices,
    max_iter: int,
    tolerance: float,
    hold: set[str],
    progress: Progress,
) -> FrankWolfeResult:
    occurrences = axes_by_param(groups)
    # Each model's parameter is multilinear in its matrices, so f is a polynomial in t of this degree.
    degree = 2 * max((len(o) for o in occurrences.values()), default=1)
    matrices = {m: {g: np.array(s, dtype=np.float64) for g, s in initial[m].items()} for m in states}
    universe = _universe(states, occurrences, matrices)
    current = pairwise_objective(universe)
    initial_objective, best, stalled = current, current, 0
    objective: list[float] = []
    steps: list[float] = []
    gaps: list[float] = []
    converged = False
    for _ in progress(range(max_iter), desc="C2M3 Frank-Wolfe", total=max_iter):
        grads = universe_gradients(states, groups, matrices, universe)
        vertices = {m: {g: assignment_vertex(grads[m][g]) for g in grads[m]} for m in states if m not in hold}
        gap = sum(
            float(grads[m][g][perm, np.arange(len(perm))].sum() - np.vdot(grads[m][g], matrices[m][g]))
            for m in vertices
            for g, perm in vertices[m].items()
        )
        segment = _Segment(states, occurrences, matrices, vertices, universe)
        t, _ = line_search(segment.objective, degree, at_zero=current)
        gaps.append(gap)
        steps.append(t)
        if t == 0.0:
            # Nothing moves, so every later iteration would repeat this one.
            objective.append(current)
            converged = True
            break
        matrices = {
            m: {g: s + t * (_perm_matrix(vertices[m][g]) - s) for g, s in by_group.items()}
            if m in vertices
            else by_group
            for m, by_group in matrices.items()
        }
        universe = segment.universe(t)
        current = pairwise_objective(universe)
        objective.append(current)
        if current - best < tolerance * max(abs(best), np.finfo(float).tiny):
            stalled += 1
            if stalled >= PATIENCE:
                converged = True
                break
        else:
            best, stalled = current, 0
    perms = {m: {g: assignment_vertex(s) for g, s in matrices[m].items()} for m in states}
    return FrankWolfeResult(perms, matrices, initial_objective, objective, steps, gaps, converged)


def pairwise_map(perm_a: np.ndarray, perm_b: np.ndarray) -> np.ndarray:
    """The map from model ``a`` onto model ``b`` through the universe, as a permutation.

    ``perm_a``, ``perm_b`` send universe positions to each model's units; the result
    ``perm[y]`` is ``a``'s unit matched to ``b``'s unit ``y`` (``P_b^T P_a`` in matrices).
    """
    inverse_b = np.argsort(perm_b)
    return np.asarray(perm_a)[inverse_b]


def universe_maps(perms: Mapping[str, Mapping[str, np.ndarray]]) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Every pairwise map ``{(a, b): {group: perm}}`` factored through the universe (:func:`pairwise_map`)."""
    return {(a, b): {g: pairwise_map(perms[a][g], perms[b][g]) for g in perms[a]} for a in perms for b in perms}


def cycle_mismatches(maps: Mapping[tuple[str, str], Mapping[str, np.ndarray]]) -> int:
    """Units where going ``a -> b -> c`` lands elsewhere than ``a -> c``, over every triple and group.

    Parameters
    ----------
    maps
        ``{(a, b): {group: perm}}`` for every ordered pair of models (``a == b`` included),
        ``perm[y]`` the unit of ``a`` matched to unit ``y`` of ``b``. Triples may repeat
        models, so two models are checked too (``a -> b -> a`` against ``a -> a``).

    Returns
    -------
    int
        The number of mismatched units: 0 for maps factored through one universe.
    """
    models = sorted({a for a, _ in maps})
    count = 0
    for a, b, c in itertools.product(models, repeat=3):
        for g, direct in maps[a, c].items():
            # c's unit z <- b's unit maps[b, c][z] <- a's unit maps[a, b][maps[b, c][z]].
            via = np.asarray(maps[a, b][g])[np.asarray(maps[b, c][g])]
            count += int(np.sum(via != np.asarray(direct)))
    return count


def _as_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().double().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}


def _cosines(universe: Mapping[str, Mapping[str, np.ndarray]], models: Sequence[str]) -> np.ndarray:
    """Cosine similarity between the models' grouped parameters, flattened together."""
    flat = np.stack([np.concatenate([t.ravel() for t in universe[m].values()] or [np.zeros(1)]) for m in models])
    norms = np.linalg.norm(flat, axis=1)
    return (flat @ flat.T) / np.maximum(np.outer(norms, norms), np.finfo(float).tiny)


@attrs.define
class CycleConsistent:
    """Align N models cycle-consistently through a shared universe (C2M3, Frank-Wolfe).

    Every model gets one permutation per channel group onto a universe ordering, chosen to
    maximise the weight-matching similarity summed over all pairs of models; the map of a
    model onto the reference is its permutation composed with the inverse of the
    reference's, so maps between any two models agree around every cycle.

    Parameters
    ----------
    seed
        Seeds the ``"sinkhorn"`` start and weight matching's group order in the
        ``"weight-matching"`` start (the ``"identity"`` start draws nothing).
    max_iter
        At most this many Frank-Wolfe iterations (the authors use 200).
    tolerance
        Stop once five iterations in a row each improve the best objective so far by less
        than this fraction of it.
    initialisation
        ``"identity"`` (every model starts in its own order, the authors' default),
        ``"sinkhorn"`` (random doubly-stochastic matrices) or ``"weight-matching"`` (every
        model starts from its Git Re-Basin matching onto the reference).
    batchnorm_statistics
        Include BatchNorm ``running_mean`` and ``running_var`` in the objective (they
        move with their channels either way), as for weight matching.
    """

    name: ClassVar[str] = "cycle-consistent"
    paper: ClassVar[str] = "Crisostomi et al. 2024, C2M3: Cycle-Consistent Multi-Model Merging"

    seed: int = attrs.field(default=0, validator=integer)
    max_iter: int = attrs.field(default=200, validator=positive_int)
    tolerance: float = attrs.field(default=1e-6, converter=as_float, validator=in_range(0, 1, lo_open=True))
    initialisation: str = attrs.field(default="identity", validator=one_of(*INITIALISATIONS))
    batchnorm_statistics: bool = attrs.field(default=True, validator=boolean)

    def align(self, models: Mapping[str, nn.Module], reference: str, context: Context) -> Alignment:
        """Find every model's permutations onto the universe and return the maps onto ``reference``."""
        names = list(models)
        if len(names) < 2 or reference not in models:
            raise ConfigError(
                f"cycle-consistent alignment needs two models or more, the reference among them; got {names} "
                f"with reference {reference!r}",
                where="key 'models'",
            )
        check_compatible({m: models[m].state_dict() for m in names})
        groups = channel_groups(models[reference], example_input(context.data))
        if not self.batchnorm_statistics:
            groups = without_parameters(groups, running_stat_keys(models[reference]))
        states = {m: _as_arrays(models[m]) for m in names}
        # Two models: both would step towards each other's order at once and meet halfway,
        # a stationary point; holding the reference makes this the authors' two-model matcher.
        hold = (reference,) if len(names) == 2 else ()
        initial = initial_matrices(
            states, groups, self.initialisation, reference, seed=self.seed, hold_reference=bool(hold)
        )
        found = frank_wolfe(
            states,
            groups,
            initial,
            max_iter=self.max_iter,
            tolerance=self.tolerance,
            hold=hold,
            progress=context.progress,
        )
        others = [m for m in names if m != reference]
        transforms = {
            m: {
                g: permutation_matrix(pairwise_map(found.perms[m][g], found.perms[reference][g]))
                for g in found.perms[m]
            }
            for m in others
        }
        occurrences = axes_by_param(groups)
        unaligned = {m: {p: states[m][p] for p in occurrences} for m in names}
        aligned_matrices = {m: {g: _perm_matrix(p) for g, p in found.perms[m].items()} for m in names}
        aligned = _universe(states, occurrences, aligned_matrices)
        pair_cosine = _cosines(aligned, names)
        ref_index, other_index = names.index(reference), [names.index(m) for m in others]
        diagnostics = xr.Dataset(
            {
                "objective": ("iteration", np.asarray(found.objective, dtype=np.float64)),
                "step_size": ("iteration", np.asarray(found.step_size, dtype=np.float64)),
                "gap": ("iteration", np.asarray(found.gap, dtype=np.float64)),
                "initial_objective": found.initial_objective,
                "final_objective": pairwise_objective(aligned),
                "unaligned_objective": pairwise_objective(unaligned),
                "iterations": len(found.objective),
                "converged": found.converged,
                "cycle_mismatches": cycle_mismatches(universe_maps(found.perms)),
                "cosine": ("model", pair_cosine[ref_index, other_index]),
                "cosine_unaligned": ("model", _cosines(unaligned, names)[ref_index, other_index]),
                "pair_cosine": (("model_a", "model_b"), pair_cosine),
            },
            coords={
                "iteration": np.arange(1, len(found.objective) + 1),
                "model": others,
                "model_a": names,
                "model_b": names,
            },
        )
        return Alignment(reference, transforms, diagnostics)

    def describe(self, result: xr.Dataset) -> str:
        """Iterations, the summed pairwise objective before and after, and the cycle check."""
        if "final_objective" not in result:
            return "aligned"
        stop = "converged" if bool(result["converged"]) else "stopped at max_iter"
        return (
            f"C2M3 {stop} after {int(result['iterations'])} Frank-Wolfe iterations; summed pairwise similarity "
            f"{float(result['unaligned_objective']):.4g} -> {float(result['final_objective']):.4g}; "
            f"{int(result['cycle_mismatches'])} cycle mismatches"
        )


@hookimpl
def register_aligners(register):
    """Register :class:`CycleConsistent`."""
    register(CycleConsistent)
