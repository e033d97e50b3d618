"""CLIP-δ: do two models' units respond to images that look alike?

For every unit ``j`` the metric takes the ``k`` dataset images on which unit ``j`` of
the reference model ``a`` is most active (its top-k set ``S1_j``) and the ``k`` images
of unit ``j`` of the other model ``b`` (``S2_j``), embeds them with an image embedder
(CLIP in the study; by default the offline EfficientNet-Lite0 features) and compares
mean cosine similarities:

.. code-block:: text

    delta_j = (C(S1_j, S1_j) - C(S1_j, S2_j)) / ((1 / (N - 1)) sum_{p != j} C(S1_j, S1_p))

The exact reading, and the ``self_pairs`` option that changes what ``C(S1_j, S1_j)``
averages over, are documented on :class:`ClipDelta`. The kernel :func:`clip_delta`
works on embeddings alone; :class:`ClipDelta` finds the top-k sets (streaming over the
samples, so dask-backed activations are never loaded whole), fetches and embeds each
needed image once and labels the result.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import attrs
import numpy as np
import xarray as xr

import mergescope
from mergescope.activations import check_metric_inputs, describe_scores, paired_chunks, score_coords, units_label
from mergescope.components import Context
from mergescope.errors import ContractError
from mergescope.hookspecs import hookimpl
from mergescope.options import component_options, structure_options, unstructure_options
from mergescope.statistics import TopK
from mergescope.validators import Check, boolean, int_range, non_empty_str, table_of

__all__ = ["clip_delta", "set_similarities", "ClipDelta", "register_metrics"]

# Elements of one (sample, unit) chunk read at a time from in-memory activations.
_CHUNK_ELEMENTS = 1 << 22
# Images fetched and embedded per call of the embedder (bounds image memory).
_IMAGES_PER_CALL = 256


# ---------------------------------------------------------------------------- kernel


def set_similarities(
    sets_1: np.ndarray, sets_2: np.ndarray, embeddings: np.ndarray, *, self_pairs: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three mean cosine similarities CLIP-δ is made of, for every unit.

    Parameters
    ----------
    sets_1, sets_2
        ``(units, k)`` integer rows into ``embeddings``: the top-k images of every unit
        of model 1 (the reference) and of model 2.
    embeddings
        ``(images, d)`` embeddings; each row is L2-normalised here.
    self_pairs
        Whether the within-set mean counts each image paired with itself.

    Returns
    -------
    within
        ``C(S1_j, S1_j)``: mean cosine over the ``k (k - 1)`` ordered pairs of *distinct*
        positions of ``S1_j`` (an image is not compared with itself); with
        ``self_pairs``, over all ``k * k`` ordered pairs, the ``k`` self-pairs included.
    between
        ``C(S1_j, S2_j)``: mean cosine over all ``k * k`` pairs, one image from each set;
        an image in both sets contributes a pair of cosine 1.
    others
        ``(1 / (N - 1)) sum_{p != j} C(S1_j, S1_p)``: the mean over the other units of
        the mean cosine over all ``k * k`` pairs between ``S1_j`` and ``S1_p``.

    Raises
    ------
    ValueError
        Fewer than 2 images per set or fewer than 2 units, sets of different shapes,
        or an embedding row that is zero or not finite.

    Notes
    -----
    With unit-length rows the mean cosine over all pairs of two sets is the dot product
    of their mean embeddings ``m``, so everything is ``O(units * k * d)``:
    ``between_j = m1_j . m2_j``, ``others_j = m1_j . (sum_p m1_p - m1_j) / (N - 1)`` and,
    removing the ``k`` self-pairs of cosine 1 from ``k^2 |m1_j|^2``,
    ``within_j = (k |m1_j|^2 - 1) / (k - 1)``; with ``self_pairs``, ``within_j = |m1_j|^2``.
    Each set's mean is taken over its images in sorted order, so two sets holding the
    same images have the same mean to the last bit, whatever their order: with
    ``self_pairs`` identical sets then give ``within_j == between_j`` exactly.
    """
    sets_1 = np.asarray(sets_1)
    sets_2 = np.asarray(sets_2)
    if sets_1.ndim != 2 or sets_1.shape != sets_2.shape:
        raise ValueError(f"sets_1 and sets_2 must both be (units, k), got {sets_1.shape} and {sets_2.shape}")
    units, k = sets_1.shape
    if k < 2:
        raise ValueError(f"the within-set similarity needs k >= 2 images per set, got k = {k}")
    if units < 2:
        raise ValueError(f"the baseline over the other units needs at least 2 units, got {units}")
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be (images, d), got shape {e.shape}")
    norms = np.linalg.norm(e, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} embedding(s) are zero or not finite (first: row {int(np.argmax(bad))})")
    e = e / norms[:, None]
    m1, m2 = _set_means(sets_1, e), _set_means(sets_2, e)  # (units, d)
    squared = np.einsum("jd,jd->j", m1, m1)
    within = squared if self_pairs else (k * squared - 1.0) / (k - 1)
    between = np.einsum("jd,jd->j", m1, m2)
    others = np.einsum("jd,jd->j", m1, m1.sum(axis=0) - m1) / (units - 1)
    return within, between, others


def _set_means(sets: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Mean embedding of every set, over blocks of units so ``(units, k, d)`` is never formed whole."""
    units, k = sets.shape
    sets = np.sort(sets, axis=1)  # the sum's order: equal sets give bit-equal means
    out = np.empty((units, e.shape[1]))
    block = max(1, _CHUNK_ELEMENTS // max(1, k * e.shape[1]))
    for start in range(0, units, block):
        out[start : start + block] = e[sets[start : start + block]].mean(axis=1)
    return out


def clip_delta(
    sets_1: np.ndarray, sets_2: np.ndarray, embeddings: np.ndarray, *, self_pairs: bool = False
) -> np.ndarray:
    """CLIP-δ of every unit from its two top-k sets and the image embeddings.

    Parameters
    ----------
    sets_1, sets_2, embeddings, self_pairs
        As in :func:`set_similarities`.

    Returns
    -------
    numpy.ndarray
        ``(units,)`` float64 ``(within - between) / others``; NaN where ``others`` is not
        positive (the baseline is then no scale to divide by).
    """
    return _delta(*set_similarities(sets_1, sets_2, embeddings, self_pairs=self_pairs))


def _delta(within: np.ndarray, between: np.ndarray, others: np.ndarray) -> np.ndarray:
    valid = others > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(valid, (within - between) / np.where(valid, others, 1.0), np.nan)


# ------------------------------------------------------------------------ validation


def _check_pair(a: xr.DataArray, b: xr.DataArray, k: int) -> None:
    check_metric_inputs(a, b, "clip-delta", min_samples=1, need_ids=True)
    na = a.sizes["sample"]
    ua = a.sizes["unit"]
    if ua < 2:
        raise ContractError(
            f"clip-delta: needs at least 2 units (its scale is the similarity to the other units), got {ua}"
        )
    if na < k:
        raise ContractError(f"clip-delta: k = {k} top images per unit but only {na} samples")


def _top_sets(a: xr.DataArray, b: xr.DataArray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k sample ids ``(unit, k)`` of a and of b, and a mask of units constant in either."""
    units = a.sizes["unit"]
    top_a, top_b = TopK(units, k), TopK(units, k)
    low = np.full((2, units), np.inf)
    high = np.full((2, units), -np.inf)
    for ids, xa, xb in paired_chunks(a, b):
        for which, (top, values) in enumerate(((top_a, xa), (top_b, xb))):
            try:
                top.update(values, ids)
            except ValueError as exc:
                raise ContractError(f"clip-delta: {'ab'[which]}: {exc}") from None
            if len(values):
                low[which] = np.minimum(low[which], values.min(axis=0))
                high[which] = np.maximum(high[which], values.max(axis=0))
    return top_a.sample_ids.T, top_b.sample_ids.T, (low == high).any(axis=0)


# ------------------------------------------------------------------------- component


_k = Check(
    int_range(2).holds,
    "an integer >= 2 (the within-set similarity compares distinct images)",
    "integers >= 2",
)


@attrs.define
class ClipDelta:
    """CLIP-δ: how much less alike the top-k images of unit j are across two models than within one.

    For unit ``j``, ``S1_j`` holds the ``k`` samples with the largest activations of
    unit ``j`` in ``a`` (the reference model) and ``S2_j`` the ``k`` largest in ``b``;
    equal activations are ordered by sample id, so the sets are deterministic. Every
    image in any set is embedded once by the embedder and L2-normalised; ``cos`` is the
    dot product of two embeddings. With ``N`` units and ``S1_j = {x_1, ..., x_k}``:

    - ``C(S1_j, S1_j)``, the *within* similarity, has two readings (option
      ``self_pairs``):

      - ``self_pairs = false`` (the default): the mean ``cos`` over the ``k (k - 1)``
        ordered pairs of **distinct** members of ``S1_j``,
        ``within_j = (1 / (k (k - 1))) sum_{a != b} cos(x_a, x_b)``. Self-pairs are
        left out: their cosine is 1 whatever the images, so they would make up a fixed
        ``1 / k`` share of the mean and say nothing about how coherent the set is. (Two
        different samples whose images happen to be identical do count.)
      - ``self_pairs = true``: the mean over all ``k * k`` ordered pairs, each image
        with itself included, ``within_j = (1 / k^2) sum_{a, b} cos(x_a, x_b)``, which
        is ``w + (1 - w) / k`` for the default reading's ``w``. This is the same mean as
        the *between* similarity takes, so a set compared with itself scores exactly 0.
    - ``C(S1_j, S2_j)``, the *between* similarity: the mean ``cos`` over all ``k * k``
      pairs of one image from each set. An image in both sets forms a pair with itself
      of ``cos`` 1, and that pair counts: sharing images is what makes two units alike.
    - The *other units* baseline ``(1 / (N - 1)) sum_{p != j} C(S1_j, S1_p)``: for every
      other unit ``p`` of the reference, the mean ``cos`` over all ``k * k`` pairs of
      ``S1_j`` and ``S1_p`` (shared images count as above), averaged over the ``N - 1``
      units.

    ``CLIP-δ_j = (within_j - between_j) / others_j``: lower is more similar. It is about
    0 when ``b``'s images are as alike to ``a``'s set as that set is to itself, and
    grows as they drift apart, in units of how alike the images of two different units
    of ``a`` are. In the default reading shared images count in ``between`` but
    self-pairs do not in ``within``, so identical sets (``S2_j = S1_j``) score slightly
    below 0: ``-(1 - within_j) / (k * others_j)``; with ``self_pairs = true`` they score
    exactly 0, and every unit's CLIP-δ is the default one plus
    ``(1 - w_j) / (k * others_j)``. It is NaN where the baseline is not positive.
    Units are compared position by position (unit ``j`` with unit ``j``): score ``b``
    after it was permuted onto ``a`` to compare matched units.

    Parameters
    ----------
    k
        Top images per unit (10 in the study); at least 2.
    embedder
        Name of a registered embedder (``mergescope plugins`` lists them): the offline
        ``"efficientnet-lite0-features"`` by default, ``"open-clip"`` for CLIP as in the
        study (needs its weights; see that embedder).
    embedder_options
        The embedder's options, a table (e.g. ``{pretrained = "/path/model.bin"}``). An
        embedder with a ``device`` option runs on the step's device (where the models
        are) unless this table names another.
    self_pairs
        Count each image paired with itself in the within-set similarity (mean over
        all ``k * k`` pairs, so identical top-k sets score exactly 0) instead of leaving
        self-pairs out (mean over the ``k (k - 1)`` pairs of distinct members, the
        default, so identical sets score ``-(1 - within_j) / (k * others_j)``, slightly
        below 0). The between-set and baseline similarities count every pair either way.
    """

    name: ClassVar[str] = "clip-delta"
    paper: ClassVar[str] = (
        "Zou 2025, Model Merging and Feature Visualization in Deep Neural Networks (sec. 3.1.4), "
        "after Nanfack et al. 2023"
    )

    k: int = attrs.field(default=10, validator=_k)
    embedder: str = attrs.field(default="efficientnet-lite0-features", validator=non_empty_str)
    embedder_options: dict[str, Any] = attrs.field(
        factory=dict,
        validator=table_of("the embedder's options"),
        metadata=component_options("embedder", use="embedder"),
    )
    self_pairs: bool = attrs.field(default=False, validator=boolean)
    # Embeddings by sample id of the dataset last scored on: a step scores many layers and
    # model pairs over one dataset, and their top-k sets share most images.
    _embedded: dict[str, Any] = attrs.field(factory=dict, init=False, eq=False, repr=False)
    # ((embedder, options, device), instance): built once, rebuilt only if those change.
    _embedder_instance: Any = attrs.field(default=None, init=False, eq=False, repr=False)

    def make_embedder(self, device: Any = None) -> Any:
        """The embedder named by ``embedder`` with ``embedder_options``, created once per metric.

        Parameters
        ----------
        device
            Where the step runs (its context's ``device``): an embedder with a
            ``device`` option runs there unless ``embedder_options`` names one.

        Raises
        ------
        mergescope.errors.UnknownComponentError
            No loaded plugin registers that embedder (the message lists those that do).
        mergescope.errors.ConfigError
            An embedder option is unknown or has a bad value.
        """
        key = (self.embedder, repr(self.embedder_options), None if device is None else str(device))
        if self._embedder_instance is None or self._embedder_instance[0] != key:
            cls = mergescope.get_registry().get("embedder", self.embedder)
            label = f"embedder {self.embedder!r} (option 'embedder_options' of metric {self.name!r})"
            options = dict(self.embedder_options)
            if device is not None and "device" not in options and attrs.has(cls) and "device" in attrs.fields_dict(cls):
                options["device"] = str(device)  # the step's device, where the models are
            self._embedder_instance = (key, structure_options(cls, options, label=label))
        return self._embedder_instance[1]

    def score(self, a: xr.DataArray, b: xr.DataArray, context: Context | None = None) -> xr.DataArray:
        """CLIP-δ of every unit of ``b`` against the same unit of ``a``.

        Parameters
        ----------
        a
            Reference activations, dims ``("sample", "unit")`` with a ``sample`` coord
            of dataset sample ids; may be dask-backed.
        b
            Activations of the other model over the same samples, same number of units.
        context
            Gives the images (``context.images``) of the dataset the activations were
            recorded on; the runner passes it.

        Returns
        -------
        xarray.DataArray
            Named ``"clip_delta"``, float64, dims ``("unit",)`` with ``b``'s ``unit``
            coords; per-unit coords ``similarity_within``, ``similarity_between`` and
            ``similarity_others`` (the three terms, ``within`` as ``self_pairs``
            reads it); scalar coords ``embedder`` (what made the embeddings),
            ``model``, ``reference`` and ``layer`` when the inputs carry them.

        Raises
        ------
        ValueError
            No context or dataset (``ValueError``), or (``ContractError``) wrong dims,
            different samples or unit counts, fewer than 2 units or than ``k`` samples.
        LookupError
            A sample id that is not in the dataset, or an unknown embedder.
        """
        if context is None or getattr(context, "data", None) is None:
            raise ValueError(
                "clip-delta needs the images the activations were recorded on: run it as a pipeline step with a "
                "[data] table, or call score(a, b, context=mergescope.Context(data=dataset))"
            )
        _check_pair(a, b, self.k)
        sets_a, sets_b, constant = _top_sets(a, b, self.k)
        if constant.any():
            warnings.warn(
                f"clip-delta: {units_label(a, b, constant)} are constant over the samples in a or b; "
                "their top-k images are the lowest sample ids, not images they respond to",
                RuntimeWarning,
                stacklevel=2,
            )
        ids, inverse = np.unique(np.concatenate([sets_a.ravel(), sets_b.ravel()]), return_inverse=True)
        embeddings = self._embed(ids, context)
        positions = inverse.reshape(2, *sets_a.shape)
        try:
            within, between, others = set_similarities(
                positions[0], positions[1], embeddings, self_pairs=self.self_pairs
            )
        except ValueError as exc:
            raise ValueError(f"clip-delta with embedder {self.embedder!r}: {exc}") from None
        bad = ~(others > 0)
        if bad.any():
            warnings.warn(
                f"clip-delta: {units_label(a, b, bad)} have a baseline similarity to the other units that is "
                "not positive; their CLIP-δ is NaN",
                RuntimeWarning,
                stacklevel=2,
            )
        return self._label(
            _delta(within, between, others), within, between, others, a, b, getattr(context, "device", None)
        )

    def _embed(self, ids: np.ndarray, context: Context) -> np.ndarray:
        """Embeddings ``(len(ids), d)`` of the images with these sample ids, each embedded once."""
        source = (id(context.data), getattr(context.data, "name", None), self.embedder, repr(self.embedder_options))
        if self._embedded.get("source") != source:
            self._embedded.clear()
            self._embedded.update(source=source, vectors={})
        known: dict[int, np.ndarray] = self._embedded["vectors"]
        missing = np.asarray([i for i in ids.tolist() if i not in known], dtype=np.int64)
        embedder = self.make_embedder(getattr(context, "device", None)) if len(missing) else None
        for start in range(0, len(missing), _IMAGES_PER_CALL):
            chunk = missing[start : start + _IMAGES_PER_CALL]
            out = np.asarray(embedder.embed(context.images(chunk)))
            if out.ndim != 2 or out.shape[0] != len(chunk):
                raise ValueError(
                    f"clip-delta: embedder {self.embedder!r} returned shape {out.shape} for {len(chunk)} images; "
                    "an embedder returns (N, d)"
                )
            known.update(zip(chunk.tolist(), out.astype(np.float64, copy=False)))
        return np.stack([known[i] for i in ids.tolist()])

    def _identity(self, device: Any = None) -> str:
        embedder = self.make_embedder(device)
        identity = getattr(embedder, "identity", None)
        if callable(identity):
            return str(identity())
        options = unstructure_options(embedder)
        if "device" not in self.embedder_options:
            options.pop("device", None)  # where it ran (the step's device) does not change what it is
        return f"{self.embedder} {options}" if options else self.embedder

    def _label(
        self,
        delta: np.ndarray,
        within: np.ndarray,
        between: np.ndarray,
        others: np.ndarray,
        a: xr.DataArray,
        b: xr.DataArray,
        device: Any = None,
    ) -> xr.DataArray:
        coords = score_coords(a, b)
        if "unit" not in coords:
            coords["unit"] = ("unit", np.arange(b.sizes["unit"]))
        coords["similarity_within"] = ("unit", within)
        coords["similarity_between"] = ("unit", between)
        coords["similarity_others"] = ("unit", others)
        coords["embedder"] = ((), self._identity(device))
        return xr.DataArray(np.asarray(delta, dtype=np.float64), dims=("unit",), coords=coords, name="clip_delta")

    def describe(self, result: xr.DataArray) -> str:
        """One line: mean and median CLIP-δ over units, NaN units, and the embedder."""
        embedder = f" [{result['embedder'].item()}]" if "embedder" in result.coords else ""
        return describe_scores(result, "CLIP-δ") + embedder


@hookimpl
def register_metrics(register):
    """Register :class:`ClipDelta`."""
    register(ClipDelta)
