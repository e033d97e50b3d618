"""Metric-guided partial merging: merge only the channels a similarity metric ranks first.

The thesis (Zou 2025, sec. 3.2.1, Figure 3.2) asks whether per-channel similarity
metrics can guide merging: in every layer the channels of two aligned models are
ranked by a metric (Kendall-τ, CLIP-δ, correlation), the top or bottom ``p`` percent
(``p`` from 10 to 100) are merged, the other channels stay as in model 1, and the
accuracy is compared with merging randomly chosen channels. The finding was that
metric-guided choices do no better than the random baseline.

What merging a channel means
----------------------------
A channel of a channel group (:func:`mergescope.groups.channel_groups`) is merged by
interpolating the entries that *produce* it: its row of every producing conv / linear
weight and bias (axes with role ``"output"``) and its per-channel parameters and
statistics (role ``"channel"``: BatchNorm scale, shift, running mean and variance,
depthwise filters). The input columns of the next layer (role ``"input"``) belong to
the next layer's own channels and follow their selection. This is the thesis's
"merge the weights of the selected channels" (a channel's weights are its filter), and
it gives every parameter entry exactly one owner, so the selections of different
layers never disagree about an entry. Entries no ranked channel owns (the classifier,
whose outputs are the classes, and the groups left out by ``groups``) are merged or
kept as model 1 as the ``unranked`` option says.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import attrs
import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

import mergescope
from mergescope.batchnorm import reset_batchnorm
from mergescope.components import Alignment, Context, MergeResult
from mergescope.errors import ConfigError, ContractError, closest
from mergescope.groups import ChannelGroup, align_step_models, channel_groups, example_input, group_layers
from mergescope.hookspecs import hookimpl
from mergescope.options import structure_options
from mergescope.states import check_compatible
from mergescope.validators import (
    as_float,
    boolean,
    distinct,
    float_list,
    integer,
    list_of,
    non_empty_str,
    one_of,
    probability,
    table_of,
    unique,
)

__all__ = [
    "ORDERS",
    "channel_masks",
    "merge_channels",
    "rank_channels",
    "selection_size",
    "PartialMerge",
    "register_mergers",
]

ORDERS = ("top", "bottom", "random")
UNRANKED = ("merge", "first")
# Axes that make a channel: where it is computed and its per-channel quantities.
_PRODUCING_ROLES = ("output", "channel")


# ------------------------------------------------------------------- pure functions


def selection_size(fraction: float, size: int) -> int:
    """Channels merged out of ``size`` at ``fraction``: the nearest integer, halves rounded up."""
    # A small slack so that 0.3 * 10 = 3.0000000000000004 does not count as above 3.
    return min(size, int(math.floor(fraction * size + 0.5 + 1e-9)))


def rank_channels(scores: np.ndarray, order: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """The order in which the channels of one group are merged.

    Parameters
    ----------
    scores
        One metric value per channel; NaN where the metric is undefined (a dead unit).
    order
        ``"top"``: highest values first; ``"bottom"``: lowest first; ``"random"``: a
        random permutation drawn from ``rng``.
    rng
        The generator for ``"random"``.

    Returns
    -------
    numpy.ndarray
        A permutation of the channel indices; the first ``k`` are merged at ``k``
        channels. Equal values keep their channel order, and NaN channels come last
        in both ``"top"`` and ``"bottom"`` (an undefined score says nothing about
        similarity, so such channels are merged only once every scored one is).
    """
    values = np.asarray(scores, dtype=np.float64)
    if order == "random":
        if rng is None:
            raise ValueError("a random order needs a random generator")
        return rng.permutation(len(values))
    if order not in ("top", "bottom"):
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    keys = -values if order == "top" else values.copy()
    keys[np.isnan(keys)] = np.inf
    return np.argsort(keys, kind="stable")


def channel_masks(
    state: Mapping[str, Tensor], groups: Sequence[ChannelGroup], selected: Mapping[str, np.ndarray]
) -> dict[str, Tensor]:
    """Which state-dict entries belong to the selected channels (their producing side).

    Parameters
    ----------
    state
        A state dict of the architecture.
    groups
        Its channel groups.
    selected
        Group name -> indices of the selected channels; groups not listed select none.

    Returns
    -------
    dict
        State-dict key -> boolean tensor of the entry's shape, ``True`` on the entries
        of the selected channels along every axis with role ``"output"`` or
        ``"channel"`` (see the module docstring).
    """
    masks = {key: torch.zeros(value.shape, dtype=torch.bool) for key, value in state.items()}
    for group in groups:
        channels = np.asarray(selected.get(group.name, ()), dtype=np.int64)
        if channels.size == 0:
            continue
        for ax in group.axes:
            if ax.role not in _PRODUCING_ROLES:
                continue
            masks[ax.param].index_fill_(ax.axis, torch.from_numpy(ax.entries(channels)), True)
    return masks


def merge_channels(
    first: Mapping[str, Tensor], second: Mapping[str, Tensor], masks: Mapping[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    """``(1 - alpha) first + alpha second`` where ``masks`` is ``True``, ``first`` elsewhere.

    Floating entries are interpolated in float64 and cast back, as in
    :func:`mergescope.states.average_states`, so an all-``True``
    mask gives exactly the full interpolation and an all-``False`` one exactly
    ``first``. Non-floating entries (BatchNorm's ``num_batches_tracked``) come from
    ``first``.
    """
    out: dict[str, Tensor] = {}
    for key, a in first.items():
        if not a.is_floating_point():
            out[key] = a.detach().clone()
            continue
        mixed = ((1.0 - alpha) * a.detach().double() + alpha * second[key].detach().double()).to(a.dtype)
        out[key] = torch.where(masks[key].to(a.device), mixed, a.detach())
    return out


# ------------------------------------------------------------------ option checks


def _check_seeds(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if "random" in instance.orders and isinstance(value, list) and not value:
        raise ValueError(f"'{attribute.name}' needs at least one seed for the random baseline (orders has 'random')")


# ---------------------------------------------------------------------- component


@attrs.define
class PartialMerge:
    """Merge only the top, bottom or random share of every layer's channels, ranked by a metric (thesis Fig. 3.2).

    For every channel group (layer) the metric scores each channel of model 2 against
    the same channel of model 1, on the activations where the group's channels are
    read (:func:`mergescope.groups.group_layers`: the ReLU after a conv, a residual
    block's output; the mean score when a group is read at several places, its last
    producer's output when it is read nowhere). For each order and fraction ``p`` the
    first ``round(p * size)`` channels of every group in that order are merged at
    ``alpha`` and the other channels keep model 1's weights; BatchNorm statistics are
    then recomputed and the model is evaluated. ``"random"`` draws one permutation per
    group and seed; a seed's selections are nested, as the ranked ones are.

    The two models must already correspond unit by unit: an aligned model
    (``models = ["a", "b@wm"]``), fine-tunes of one base, or ``alignment = "wm"`` on
    the step. "Top" means the highest metric values: the most similar channels for
    Kendall-τ or correlation, the least similar for CLIP-δ (lower is more similar).

    Parameters
    ----------
    metric
        Name of a registered metric (``mergescope plugins`` lists them).
    metric_options
        The metric's options, a table (e.g. ``{per_class = 5}``).
    fractions
        Shares of each group's channels to merge, in ``[0, 1]``.
    orders
        Which channels go first: ``"top"``, ``"bottom"`` and the ``"random"`` baseline.
    seeds
        Seeds of the random baseline, one evaluation per seed and fraction.
    alpha
        Interpolation weight of model 2 on merged entries: ``(1 - alpha) theta_1 +
        alpha theta_2``.
    reset_batchnorm
        Recompute BatchNorm running statistics on the pipeline's data after merging
        (mixed channels make the stored statistics stale, as after any merge).
    groups
        Channel groups to rank and merge (names or globs, see
        :func:`mergescope.groups.channel_groups`); empty: every group. Called
        ``groups`` because a step's ``layers`` key selects recorded layers, not groups.
    unranked
        Entries that no ranked channel owns (the classifier; groups not in
        ``groups``): ``"merge"`` interpolates them at every fraction, so 100% is the
        full interpolation and the three orders meet there; ``"first"`` keeps model 1's,
        so 0% is model 1 (up to re-measured BatchNorm statistics with
        ``reset_batchnorm``).
    """

    name: ClassVar[str] = "partial-merge"
    paper: ClassVar[str] = "Zou 2025, Model Merging and Feature Visualization in Deep Neural Networks (Fig. 3.2)"

    metric: str = attrs.field(default="kendall-tau", validator=non_empty_str)
    metric_options: dict[str, Any] = attrs.field(factory=dict, validator=table_of("the metric's options"))
    fractions: list[float] = attrs.field(
        factory=lambda: [round(0.1 * i, 2) for i in range(1, 11)],
        converter=float_list,
        validator=[list_of(probability, min_length=1), unique],
    )
    orders: list[str] = attrs.field(
        factory=lambda: list(ORDERS), validator=[list_of(one_of(*ORDERS), min_length=1), distinct("order")]
    )
    seeds: list[int] = attrs.field(
        factory=lambda: [0, 1, 2], validator=[list_of(integer), distinct("seed"), _check_seeds]
    )
    alpha: float = attrs.field(default=0.5, converter=as_float, validator=probability)
    reset_batchnorm: bool = attrs.field(default=True, validator=boolean)
    groups: list[str] = attrs.field(factory=list, validator=list_of(non_empty_str))
    unranked: str = attrs.field(default="merge", validator=one_of(*UNRANKED))

    # -- pieces ----------------------------------------------------------------------

    def make_metric(self) -> Any:
        """The metric named by ``metric`` built with ``metric_options``.

        Raises
        ------
        mergescope.errors.UnknownComponentError
            No loaded plugin registers that metric (the message lists those that do).
        mergescope.errors.ConfigError
            A metric option is unknown or has a bad value.
        """
        cls = mergescope.get_registry().get("metric", self.metric)
        label = f"metric {self.metric!r} (option 'metric_options' of merger {self.name!r})"
        return structure_options(cls, self.metric_options, label=label)

    def _select_groups(self, groups: Sequence[ChannelGroup]) -> list[ChannelGroup]:
        if not self.groups:
            return list(groups)
        names = [g.name for g in groups]
        chosen: set[str] = set()
        for pattern in self.groups:
            matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                guess = closest(pattern, names)
                hint = f" Did you mean {guess!r}?" if guess else ""
                raise ConfigError(
                    f"no channel group matches {pattern!r}.{hint} The groups are: {', '.join(names)}",
                    where="key 'groups'",
                )
            chosen.update(matched)
        return [g for g in groups if g.name in chosen]

    def channel_scores(
        self,
        models: Mapping[str, nn.Module],
        groups: Sequence[ChannelGroup],
        context: Context,
        metric: Any = None,
    ) -> dict[str, np.ndarray]:
        """The metric of every channel of every group: model 2 against model 1.

        Parameters
        ----------
        models
            The two models, model 1 first, units in correspondence.
        groups
            The groups to score.
        context
            Gives the data (recorded with :meth:`mergescope.Context.record`).
        metric
            A metric instance; default :meth:`make_metric`.

        Returns
        -------
        dict
            Group name -> ``(size,)`` float64 scores (NaN where undefined).
        """
        first, second = list(models)
        metric = metric if metric is not None else self.make_metric()
        read = group_layers(models[first], example_input(context.data))
        # Where a group is read nowhere (e.g. only pooled away), its last producer's output.
        layers = {g.name: read.get(g.name) or [g.producers[-1]] for g in groups}
        wanted = list(dict.fromkeys(layer for g in groups for layer in layers[g.name]))
        store = context.record(models, {m: wanted for m in models})
        scores: dict[str, np.ndarray] = {}
        for g in groups:
            per_layer = []
            for layer in layers[g.name]:
                score = metric.score(store.activation(first, layer), store.activation(second, layer), context=context)
                if not isinstance(score, xr.DataArray) or score.dims != ("unit",) or score.sizes["unit"] != g.size:
                    raise ContractError(
                        f"metric {self.metric!r} returned {getattr(score, 'sizes', type(score).__name__)} at layer "
                        f"{layer!r}; group {g.name!r} needs a DataArray with dims ('unit',) of its {g.size} channels"
                    )
                per_layer.append(np.asarray(score.values, dtype=np.float64))
            stacked = np.stack(per_layer)
            defined = ~np.isnan(stacked)
            total = np.where(defined, stacked, 0.0).sum(0)
            count = defined.sum(0)
            # The mean over the layers that define it; NaN where none does.
            scores[g.name] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        return scores

    # -- the merger ----------------------------------------------------------------------

    def merge(
        self, models: Mapping[str, nn.Module], context: Context, alignment: Alignment | None = None
    ) -> MergeResult:
        """Rank channels, merge every order x fraction (x seed) and evaluate each on ``context.data``.

        Returns
        -------
        MergeResult
            ``model``: the merge at the largest fraction of the first order (first seed
            for ``"random"``). ``results``:

            - ``accuracy``, ``loss`` (dims ``order``, ``fraction``): for ``"random"``
              the mean over seeds; ``accuracy_std``, ``loss_std`` (same dims): the
              spread over seeds (population std), NaN for the ranked orders;
            - ``random_accuracy``, ``random_loss`` (``seed``, ``fraction``): every seed;
            - ``merged_channels`` (``fraction``, ``group``) and ``channels``
              (``group``): channels merged per group and group sizes;
              ``merged_share`` (``fraction``): the share of all ranked channels merged;
            - ``score`` (``group``, ``unit``): the metric per channel, NaN-padded to the
              widest group;
            - ``endpoint_accuracy``, ``endpoint_loss`` (``endpoint``, the two model
              names) and scalars ``alpha``, ``metric``, ``unranked``.

        Raises
        ------
        ConfigError
            Not exactly two models, no data, models whose parameters differ, an
            alignment whose reference is not a step model, or a ``groups`` pattern
            that matches no group.
        mergescope.errors.UnknownComponentError
            An unknown ``metric``.
        """
        names = list(models)
        if len(names) != 2:
            raise ConfigError(f"partial-merge merges two models, got {len(names)}: {names}", where="key 'models'")
        if context.data is None:
            raise ConfigError("partial-merge scores channels on activations and evaluates merges, so it needs [data]")
        try:
            check_compatible({n: models[n].state_dict() for n in names})
        except ValueError as exc:
            raise ConfigError(f"cannot merge models {names}: {exc}", where="key 'models'") from exc
        metric = self.make_metric()  # fail on a bad metric before any work
        x = example_input(context.data)
        all_groups = channel_groups(models[names[0]], x)
        models = align_step_models(models, alignment, all_groups, x)
        groups = self._select_groups(all_groups)
        if not groups:
            raise ConfigError("this architecture has no channel groups to rank (no hidden units)", where="key 'models'")

        scores = self.channel_scores(models, groups, context, metric)
        template = models[names[0]]
        first, second = template.state_dict(), models[names[1]].state_dict()
        # Entries owned by no ranked channel: merged at every fraction, or never.
        owned = channel_masks(first, groups, {g.name: np.arange(g.size) for g in groups})
        base = {k: (~m if self.unranked == "merge" else torch.zeros_like(m)) for k, m in owned.items()}

        fractions = sorted(self.fractions)
        sizes = {g.name: g.size for g in groups}
        counts = {f: {g: selection_size(f, n) for g, n in sizes.items()} for f in fractions}

        def state_for(order: str, fraction: float, seed: int | None) -> dict[str, Tensor]:
            rng = np.random.default_rng(seed) if order == "random" else None
            picked = {}
            for g in groups:  # one draw per group, in group order, from the seed's generator
                ranking = rank_channels(scores[g.name], order, rng)
                picked[g.name] = ranking[: counts[fraction][g.name]]
            masks = channel_masks(first, groups, picked)
            return merge_channels(first, second, {k: masks[k] | base[k] for k in masks}, self.alpha)

        def build(state: Mapping[str, Tensor], work: nn.Module | None = None) -> nn.Module:
            model = work if work is not None else copy.deepcopy(template)
            model.load_state_dict(state)
            if self.reset_batchnorm:
                reset_batchnorm(model, context.data, batch_size=context.batch_size, progress=context.progress)
            return model.eval()

        runs = [(o, f, None) for o in self.orders if o != "random" for f in fractions]
        if "random" in self.orders:
            runs += [("random", f, s) for s in self.seeds for f in fractions]
        work = copy.deepcopy(template)
        evaluated: dict[tuple[str, float, int | None], tuple[float, float]] = {}
        for order, fraction, seed in context.progress(runs, desc="partial merges", total=len(runs)):
            e = context.evaluate(build(state_for(order, fraction, seed), work))
            evaluated[(order, fraction, seed)] = (e.accuracy, e.loss)

        endpoints = [context.evaluate(models[n]) for n in names]
        results = self._results(names, groups, scores, fractions, counts, evaluated, endpoints)
        order = self.orders[0]
        merged = build(state_for(order, fractions[-1], self.seeds[0] if order == "random" else None))
        return MergeResult(merged, results)

    def _results(
        self,
        names: list[str],
        groups: Sequence[ChannelGroup],
        scores: Mapping[str, np.ndarray],
        fractions: list[float],
        counts: Mapping[float, Mapping[str, int]],
        evaluated: Mapping[tuple[str, float, int | None], tuple[float, float]],
        endpoints: Sequence[Any],
    ) -> xr.Dataset:
        shape = (len(self.orders), len(fractions))
        acc, loss = np.full(shape, np.nan), np.full(shape, np.nan)
        acc_std, loss_std = np.full(shape, np.nan), np.full(shape, np.nan)
        per_seed: dict[str, Any] = {}
        for i, order in enumerate(self.orders):
            if order == "random":
                table = np.array([[evaluated[("random", f, s)] for f in fractions] for s in self.seeds])
                acc[i], loss[i] = table[..., 0].mean(0), table[..., 1].mean(0)
                acc_std[i], loss_std[i] = table[..., 0].std(0), table[..., 1].std(0)
                per_seed = {
                    "random_accuracy": (("seed", "fraction"), table[..., 0]),
                    "random_loss": (("seed", "fraction"), table[..., 1]),
                }
            else:
                acc[i] = [evaluated[(order, f, None)][0] for f in fractions]
                loss[i] = [evaluated[(order, f, None)][1] for f in fractions]
        sizes = np.array([g.size for g in groups], dtype=np.int64)
        merged = np.array([[counts[f][g.name] for g in groups] for f in fractions], dtype=np.int64)
        table = np.full((len(groups), int(sizes.max())), np.nan)
        for j, g in enumerate(groups):
            table[j, : g.size] = scores[g.name]
        dims = ("order", "fraction")
        coords: dict[str, Any] = {
            "order": list(self.orders),
            "fraction": np.asarray(fractions, dtype=np.float64),
            "group": [g.name for g in groups],
            "unit": np.arange(table.shape[1]),
            "endpoint": np.asarray(names, dtype=str),
        }
        if per_seed:
            coords["seed"] = np.asarray(self.seeds, dtype=np.int64)
        return xr.Dataset(
            {
                "accuracy": (dims, acc),
                "loss": (dims, loss),
                "accuracy_std": (dims, acc_std),
                "loss_std": (dims, loss_std),
                **per_seed,
                "merged_channels": (("fraction", "group"), merged),
                "channels": ("group", sizes),
                "merged_share": ("fraction", merged.sum(1) / sizes.sum()),
                "score": (("group", "unit"), table),
                "endpoint_accuracy": ("endpoint", np.array([e.accuracy for e in endpoints], dtype=np.float64)),
                "endpoint_loss": ("endpoint", np.array([e.loss for e in endpoints], dtype=np.float64)),
                "alpha": self.alpha,
                "metric": self.metric,
                "unranked": self.unranked,
            },
            coords=coords,
        )

    def describe(self, result: xr.Dataset) -> str:
        """One line: accuracy from the smallest to the largest fraction per order, and the endpoints."""
        if "accuracy" not in result:
            return "not evaluated"
        fractions = np.atleast_1d(result["fraction"].values)
        ends = [0] if len(fractions) == 1 else [0, -1]

        def cell(order: str, k: int) -> str:
            text = f"{float(result['accuracy'].sel(order=order).values[k]):.3f}"
            if order == "random" and "accuracy_std" in result:
                text += f"±{float(result['accuracy_std'].sel(order=order).values[k]):.3f}"
            return text

        span = " -> ".join(f"{100 * fractions[k]:.0f}%" for k in ends)
        metric = result["metric"].item() if "metric" in result else "a metric"
        parts = [f"{order} " + " -> ".join(cell(str(order), k) for k in ends) for order in result["order"].values]
        line = f"accuracy merging {span} of channels by {metric}: " + ", ".join(parts)
        if "endpoint_accuracy" in result:
            line += "; endpoints " + " / ".join(f"{v:.3f}" for v in result["endpoint_accuracy"].values)
        return line


@hookimpl
def register_mergers(register):
    """Register :class:`PartialMerge`."""
    register(PartialMerge)
