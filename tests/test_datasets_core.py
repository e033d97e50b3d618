from __future__ import annotations

import numpy as np
import pytest

from mergescope.datasets import class_imbalanced_split, per_class_subset, stratified_split
from mergescope.errors import ConfigError

# 4 classes of different sizes, interleaved, with gaps in the label values.
LABELS = np.array([3, 7, 3, 9, 7, 3, 9, 3, 7, 3, 12, 9, 3, 7, 12, 12, 3, 9, 12, 3])


def counts(labels: np.ndarray, positions: np.ndarray) -> dict[int, int]:
    values, n = np.unique(labels[positions], return_counts=True)
    return dict(zip(values.tolist(), n.tolist()))


# ------------------------------------------------------------------ per_class_subset


def test_per_class_takes_the_first_items_of_every_class_in_position_order():
    subset = per_class_subset(LABELS, 2)
    assert subset.tolist() == [0, 1, 2, 3, 4, 6, 10, 14]
    assert counts(LABELS, subset) == {3: 2, 7: 2, 9: 2, 12: 2}


def test_per_class_subsets_are_nested_without_a_seed():
    small, large = per_class_subset(LABELS, 2), per_class_subset(LABELS, 3)
    assert set(small) <= set(large)


def test_seeded_per_class_is_reproducible_balanced_and_sorted():
    labels = np.repeat(np.arange(5), 40)
    a = per_class_subset(labels, 6, seed=1)
    assert np.array_equal(a, per_class_subset(labels, 6, seed=1))
    assert not np.array_equal(a, per_class_subset(labels, 6, seed=2))
    assert not np.array_equal(a, per_class_subset(labels, 6))
    assert np.all(np.diff(a) > 0)
    assert counts(labels, a) == {c: 6 for c in range(5)}


def test_per_class_with_every_item_of_the_smallest_class():
    assert counts(LABELS, per_class_subset(LABELS, 4)) == {3: 4, 7: 4, 9: 4, 12: 4}
    assert len(per_class_subset(LABELS, 4, seed=0)) == 16


def test_per_class_larger_than_a_class_names_the_class():
    with pytest.raises(ConfigError, match=r"'per_class' = 5 is more than the 4 items of class 7$"):
        per_class_subset(LABELS, 5)


def test_per_class_names_the_class_by_name_when_given():
    labels = np.array([0, 0, 1])
    with pytest.raises(ConfigError, match=r"the 1 items of class 1 \('dog'\)"):
        per_class_subset(labels, 2, names=["cat", "dog"])


def test_a_required_class_with_no_items_is_an_error():
    with pytest.raises(ConfigError, match=r"the 0 items of class 2 \(the class has no items here\)"):
        per_class_subset(np.array([0, 1, 0, 1]), 1, classes=[0, 1, 2])
    assert per_class_subset(np.array([0, 1, 0, 1]), 1, classes=[0, 1]).tolist() == [0, 1]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_per_class_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="'per_class' must be a positive integer"):
        per_class_subset(LABELS, bad)


def test_labels_must_be_one_dimensional():
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        per_class_subset(np.zeros((2, 2), dtype=int), 1)


# ------------------------------------------------------------ class_imbalanced_split


@pytest.fixture
def ten_classes() -> np.ndarray:
    # 100 items per class, shuffled so positions and classes are unrelated.
    return np.random.default_rng(5).permutation(np.repeat(np.arange(10), 100))


def test_parts_are_disjoint_and_cover_everything(ten_classes):
    a = class_imbalanced_split(ten_classes, "a")
    b = class_imbalanced_split(ten_classes, "b")
    assert not set(a) & set(b)
    assert sorted([*a, *b]) == list(range(len(ten_classes)))
    assert np.all(np.diff(a) > 0) and np.all(np.diff(b) > 0)


def test_parts_have_opposite_imbalance(ten_classes):
    a = counts(ten_classes, class_imbalanced_split(ten_classes, "a"))
    b = counts(ten_classes, class_imbalanced_split(ten_classes, "b"))
    assert a == {**{c: 80 for c in range(5)}, **{c: 20 for c in range(5, 10)}}
    assert b == {**{c: 20 for c in range(5)}, **{c: 80 for c in range(5, 10)}}


def test_major_fraction_sets_the_imbalance(ten_classes):
    a = counts(ten_classes, class_imbalanced_split(ten_classes, "a", major_fraction=0.6))
    assert a[0] == 60 and a[9] == 40
    # 1 gives two parts with disjoint classes.
    disjoint = class_imbalanced_split(ten_classes, "b", major_fraction=1.0)
    assert set(ten_classes[disjoint]) == {5, 6, 7, 8, 9}


def test_split_is_deterministic_and_follows_the_seed(ten_classes):
    a = class_imbalanced_split(ten_classes, "a", seed=0)
    assert np.array_equal(a, class_imbalanced_split(ten_classes, "a"))
    other = class_imbalanced_split(ten_classes, "a", seed=1)
    assert not np.array_equal(a, other)
    assert counts(ten_classes, a) == counts(ten_classes, other)


def test_classes_are_halved_in_sorted_label_order():
    # Labels 3 and 7 are the first half of {3, 7, 9, 12}; with an odd count the first half is larger.
    a = counts(LABELS, class_imbalanced_split(LABELS, "a", major_fraction=1.0))
    assert set(a) == {3, 7}
    odd = np.repeat([4, 1, 8], 10)
    assert set(odd[class_imbalanced_split(odd, "a", major_fraction=1.0)]) == {1, 4}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"part": "c"}, "'part' must be one of 'a', 'b', got 'c'"),
        ({"part": "a", "major_fraction": 0.4}, "'major_fraction' must be a number between 0.5 and 1, got 0.4"),
        ({"part": "a", "major_fraction": 1.5}, "'major_fraction' must be a number between 0.5 and 1"),
    ],
)
def test_bad_split_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        class_imbalanced_split(LABELS, **options)


# ------------------------------------------------------------------ stratified_split


def test_stratified_split_is_pinned():
    # Moved from the datasets plugin: its output decides stored sample ids, so it never changes.
    labels = np.repeat(np.arange(3), 6)
    train, test = stratified_split(labels, 0.5)
    assert test.tolist() == [2, 3, 5, 7, 10, 11, 12, 14, 15]
    assert sorted([*train, *test]) == list(range(18))


def test_stratified_split_follows_the_seed():
    labels = np.repeat(np.arange(3), 20)
    _, test0 = stratified_split(labels, 0.25)
    _, test1 = stratified_split(labels, 0.25, seed=1)
    assert not np.array_equal(test0, test1)
    assert counts(labels, test0) == counts(labels, test1) == {0: 5, 1: 5, 2: 5}


def test_the_datasets_plugin_uses_the_shared_helper():
    from mergescope_plugins import datasets

    assert datasets.stratified_split is stratified_split
