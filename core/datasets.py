"""Reproducible subsets of labelled datasets, for dataset plugins.

Every helper takes the class label of every item (``labels``, shape ``(N,)``) and
returns *positions* into that array, sorted, so a plugin keeps its own sample ids by
indexing them with the result. All randomness comes from a seeded
``numpy.random.default_rng``: the same labels and options always give the same subset.

- :func:`stratified_split`: a train/test split that keeps the class proportions.
- :func:`per_class_subset`: ``n`` items of every class ("5 images per class").
- :func:`class_imbalanced_split`: two complementary parts with opposite class
  imbalance, for training a pair of models on differently distributed data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import SupportsInt

import numpy as np
from numpy.typing import ArrayLike

from .errors import ConfigError

__all__ = ["stratified_split", "per_class_subset", "class_imbalanced_split", "PARTS"]

PARTS = ("a", "b")
"""The two parts of :func:`class_imbalanced_split`."""


def _as_labels(labels: ArrayLike) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be one label per item, shape (N,), got shape {array.shape}")
    return array


def _class_name(label: SupportsInt, names: Sequence[str] | None) -> str:
    if names is None:
        return f"class {label}"
    return f"class {label} ({names[int(label)]!r})"


def stratified_split(labels: ArrayLike, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split item positions into train and test, class by class, reproducibly.

    Within each class (in increasing label order) a permutation drawn from one
    ``numpy.random.default_rng(seed)`` puts ``round(test_fraction * n_class)`` items in
    the test split and the rest in the train split.

    Parameters
    ----------
    labels
        Class of every item, ``(N,)``.
    test_fraction
        Share of every class that goes to the test split.
    seed
        Seed of the permutations. Changing it moves items between the splits.

    Returns
    -------
    tuple[numpy.ndarray, numpy.ndarray]
        Sorted train positions and sorted test positions; together they cover every
        item once.

    Examples
    --------
    >>> train, test = stratified_split([0, 0, 0, 0, 1, 1], 0.5)
    >>> np.sort(np.concatenate([train, test])).tolist()
    [0, 1, 2, 3, 4, 5]
    >>> len(test)
    3
    """
    labels = _as_labels(labels)
    rng = np.random.default_rng(seed)
    train, test = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.int64)]
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        order = rng.permutation(members)
        n_test = int(round(test_fraction * len(members)))
        test.append(order[:n_test])
        train.append(order[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def per_class_subset(
    labels: ArrayLike,
    per_class: int,
    *,
    seed: int | None = None,
    classes: ArrayLike | None = None,
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """Take ``per_class`` items of every class: a small, balanced, reproducible subset.

    Without ``seed`` the first ``per_class`` items of every class (in position order)
    are taken, so the subset of a larger ``per_class`` contains the smaller one. With
    ``seed`` every class (in increasing label order) draws ``per_class`` of its items
    without replacement from one ``numpy.random.default_rng(seed)``.

    Parameters
    ----------
    labels
        Class of every item, ``(N,)``.
    per_class
        How many items to take from every class; a positive integer.
    seed
        Draw the items at random from this seed instead of taking the first ones.
    classes
        The classes that must contribute; defaults to the labels present in
        ``labels``. Pass every class of the full dataset to catch a class that is
        missing from a split.
    names
        Class names indexed by label, used to name a class in errors.

    Returns
    -------
    numpy.ndarray
        Sorted positions of the chosen items, ``per_class * n_classes`` of them.

    Raises
    ------
    ConfigError
        When a class has fewer than ``per_class`` items (or none); the message names
        the class and how many items it has.

    Examples
    --------
    >>> per_class_subset([1, 0, 1, 0, 1], 2).tolist()
    [0, 1, 2, 3]
    """
    labels = _as_labels(labels)
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class <= 0:
        raise ValueError(f"'per_class' must be a positive integer, got {per_class!r}")
    wanted = np.unique(labels) if classes is None else np.unique(np.asarray(classes))
    rng = None if seed is None else np.random.default_rng(seed)
    picked = [np.empty(0, dtype=np.int64)]
    for label in wanted:
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            absent = " (the class has no items here)" if len(members) == 0 else ""
            raise ConfigError(
                f"'per_class' = {per_class} is more than the {len(members)} items of "
                f"{_class_name(label, names)}{absent}"
            )
        if rng is None:
            picked.append(members[:per_class])
        else:
            picked.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(picked))


def class_imbalanced_split(labels: ArrayLike, part: str, major_fraction: float = 0.8, seed: int = 0) -> np.ndarray:
    """One of two complementary parts of a dataset with opposite class imbalance.

    The classes present in ``labels`` are sorted and cut into a first half (the first
    ``ceil(n_classes / 2)`` classes) and a second half. Part ``"a"`` takes
    ``round(major_fraction * n)`` items of every first-half class and
    ``round((1 - major_fraction) * n)`` items of every second-half class (``n`` being
    the size of the class); part ``"b"`` takes all the other items. So ``"a"`` is
    mostly first-half classes, ``"b"`` mostly second-half ones, and two models trained
    on them see the same classes in different proportions. ``major_fraction = 1``
    gives two parts with disjoint classes; ``0.5`` two halves with equal proportions.

    Which items of a class go to which part is decided by a permutation per class (in
    increasing label order) drawn from one ``numpy.random.default_rng(seed)``; both
    parts use the same permutations, so they are disjoint and together cover every
    item exactly once.

    Parameters
    ----------
    labels
        Class of every item, ``(N,)``.
    part
        ``"a"`` or ``"b"``.
    major_fraction
        Share of each of its majority classes that a part receives, between 0.5 and 1.
    seed
        Seed of the per-class permutations.

    Returns
    -------
    numpy.ndarray
        Sorted positions of the items of ``part``.

    Raises
    ------
    ConfigError
        When ``part`` is not ``"a"`` or ``"b"`` or ``major_fraction`` is outside
        [0.5, 1].

    Examples
    --------
    >>> labels = [0] * 10 + [1] * 10
    >>> a = class_imbalanced_split(labels, "a")
    >>> np.bincount(np.asarray(labels)[a]).tolist()
    [8, 2]
    """
    if part not in PARTS:
        raise ConfigError(f"'part' must be one of {', '.join(repr(p) for p in PARTS)}, got {part!r}")
    if (
        isinstance(major_fraction, bool)
        or not isinstance(major_fraction, (int, float, np.floating))
        or not 0.5 <= major_fraction <= 1
    ):
        raise ConfigError(f"'major_fraction' must be a number between 0.5 and 1, got {major_fraction!r}")
    labels = _as_labels(labels)
    classes = np.unique(labels)
    first_half = set(classes[: (len(classes) + 1) // 2].tolist())
    rng = np.random.default_rng(seed)
    chosen = [np.empty(0, dtype=np.int64)]
    for label in classes:
        members = rng.permutation(np.flatnonzero(labels == label))
        share = major_fraction if label in first_half else 1 - major_fraction
        n_a = int(round(share * len(members)))
        chosen.append(members[:n_a] if part == "a" else members[n_a:])
    return np.sort(np.concatenate(chosen))
