"""Deterministic classifier training, with a cache of trained weights.

A pipeline that needs trained models names an architecture, a dataset and the
options of a ``[models.train]`` table. :func:`trained_model` trains once and stores
the weights under a key derived from all three, so re-running a pipeline (or another
pipeline that needs the same models) reuses them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import attrs
import torch
from torch import nn

from . import checkpoints
from .batchnorm import reset_batchnorm
from .keys import OMIT_DEFAULT_FROM_KEY, cache_key
from .loading import make_loader, to_device
from .progress import Progress, silent
from .validators import boolean, non_negative, non_negative_int, one_of, positive, positive_int
from .values import Architecture, DatasetSource, ImageDataset, model_device

__all__ = [
    "Training",
    "train_classifier",
    "cache_dir",
    "cache_key",
    "trained_model",
    "trained_model_key",
    "CACHE_ENV",
    "OMIT_DEFAULT_FROM_KEY",
]

CACHE_ENV = "MERGESCOPE_CACHE"

_OPTIMIZERS = ("adam", "sgd")


@attrs.define
class Training:
    """Options of a ``[models.train]`` table: how to train a classifier.

    Parameters
    ----------
    seed
        Seeds the weight initialisation and the order of the batches.
    epochs
        Passes over the training data. ``0`` trains nothing: the model is the one built
        from ``seed`` (e.g. a pretrained network with a freshly initialised head, the
        common starting point of fine-tunes that share the seed).
    batch_size
        Images per optimisation step.
    lr
        Learning rate.
    optimizer
        ``"adam"`` or ``"sgd"`` (with momentum 0.9).
    weight_decay
        L2 penalty passed to the optimizer.
    reset_batchnorm
        After the last epoch, recompute every BatchNorm layer's running statistics on
        the training data with the final weights (one pass, no gradients; see
        :func:`mergescope.batchnorm.reset_batchnorm`, batches in a fixed random order).
        Running statistics are a moving
        average over training with a small momentum (0.01 in EfficientNet's layers), so
        after a short fine-tune they still describe the starting weights and the
        pre-training data, and the model in evaluation mode is far worse than it trained.
    """

    seed: int = attrs.field(default=0, validator=non_negative_int)
    epochs: int = attrs.field(default=10, validator=non_negative_int)
    batch_size: int = attrs.field(default=128, validator=positive_int)
    lr: float = attrs.field(default=1e-3, validator=positive)
    optimizer: str = attrs.field(default="adam", validator=one_of(*_OPTIMIZERS))
    weight_decay: float = attrs.field(default=0.0, validator=non_negative)
    reset_batchnorm: bool = attrs.field(default=False, validator=boolean, metadata={OMIT_DEFAULT_FROM_KEY: True})


def _make_optimizer(model: nn.Module, training: Training) -> torch.optim.Optimizer:
    if training.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=training.lr, momentum=0.9, weight_decay=training.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)


def train_classifier(
    model: nn.Module, data: ImageDataset, training: Training, progress: Progress | None = None
) -> list[float]:
    """Train ``model`` in place with cross-entropy, reproducibly.

    The global torch RNG is seeded with ``training.seed`` for the duration of training
    (and restored afterwards) and the batch order comes from a generator seeded with the
    same value, so on the CPU two runs from the same initial weights give bit-identical
    weights.

    Parameters
    ----------
    model
        A classifier mapping ``(N, *data.input_shape)`` images to ``(N, classes)`` logits.
    data
        Training images and labels.
    training
        Optimisation options.
    progress
        Shows how far training has come, epoch by epoch (see :mod:`mergescope.progress`);
        silent when ``None``.

    Returns
    -------
    list[float]
        Mean training loss of every epoch.
    """
    if len(data) == 0:
        raise ValueError(f"cannot train on the empty dataset {data.name!r}")
    losses: list[float] = []
    # fork_rng keeps training from changing the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(training.seed)
        shuffle = torch.Generator().manual_seed(training.seed)
        # An ImageDataset is a map-style dataset of (image, label) pairs, as the loader expects.
        dataset = cast("torch.utils.data.Dataset[tuple[torch.Tensor, int]]", data)
        device = model_device(model)
        loader = make_loader(dataset, training.batch_size, device=device, shuffle=True, generator=shuffle)
        optimizer = _make_optimizer(model, training)
        progress = progress or silent
        epochs = progress(range(training.epochs), desc=f"training on {data.name}", total=training.epochs)
        model.train()
        for _ in epochs:
            total, count = 0.0, 0
            for cpu_images, cpu_labels in loader:
                images, labels = to_device(cpu_images, device), to_device(cpu_labels, device)
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(images), labels)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(labels)
                count += len(labels)
            losses.append(total / count)
        if training.reset_batchnorm:
            reset_batchnorm(model, data, batch_size=training.batch_size, progress=progress)
    model.eval()
    return losses


def cache_dir() -> Path:
    """The directory of cached trained models.

    Returns
    -------
    Path
        ``$MERGESCOPE_CACHE`` when set (and not empty), else ``~/.cache/mergescope``.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mergescope"


def trained_model_key(
    architecture: Architecture,
    data_source: DatasetSource,
    training: Training,
    inputs: Mapping[str, Any] | None = None,
) -> str:
    """The cache key of a model of ``architecture`` trained on ``data_source`` with ``training``.

    :func:`cache_key` of the three, plus a mark for ``reset_batchnorm``: its pass once
    took the training items in stored order (a class or two per batch) and now takes
    them in a fixed random order (:func:`mergescope.batchnorm.statistics_batches`), so
    weights cached the old way are not reused. Models trained without it keep their keys.
    ``inputs`` (when not empty) is what the files and folders named by path options of
    the architecture and the data hold (:func:`mergescope.keys.path_identity`, by option):
    the path alone would reuse weights trained on an image folder or from a checkpoint
    whose contents have changed since.
    """
    extra: dict[str, Any] = {}
    if training.reset_batchnorm:
        extra["batchnorm_batches"] = "random-order"
    if inputs:
        extra["inputs"] = dict(inputs)
    return (
        cache_key(architecture, data_source, training, extra)
        if extra
        else cache_key(architecture, data_source, training)
    )


def trained_model(
    architecture: Architecture,
    data_source: DatasetSource,
    training: Training,
    progress: Progress | None = None,
    cache: Path | None = None,
    device: torch.device | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build a model of ``architecture`` trained on ``data_source``, from the cache if possible.

    The weights are stored at ``<cache>/models/<architecture.name>-<key>.pt`` where
    ``key`` is :func:`trained_model_key` of the architecture, the dataset and the
    training options. On a miss the model is initialised from ``training.seed``, trained with
    :func:`train_classifier` and saved atomically. With ``training.epochs == 0`` the
    model initialised from the seed is returned as it is (nothing is trained or cached;
    the dataset only gives the input shape and the number of classes).

    Parameters
    ----------
    architecture
        The architecture component (its options are part of the key).
    data_source
        The training data component (its options are part of the key).
    training
        Training options (part of the key).
    progress
        Passed to :func:`train_classifier` (see :mod:`mergescope.progress`).
    cache
        Cache directory; defaults to :func:`cache_dir`.
    device
        Where the model is trained and returned (default: the CPU). It is initialised on
        the CPU from the seed either way. The cache key does not depend on the device:
        weights trained on a GPU differ from the CPU's by floating-point rounding (which
        training can amplify), and either is reused by the other.
    inputs
        What the path options of the architecture and the data hold, for the key (see
        :func:`trained_model_key`).

    Returns
    -------
    torch.nn.Module
        The trained model, in eval mode, on ``device``.

    Raises
    ------
    CheckpointError
        A cached file exists but cannot be loaded into the model.
    """
    data = data_source.load()
    with torch.random.fork_rng(devices=[]):
        # Seed the initialisation too: the weights depend only on the key's inputs.
        torch.manual_seed(training.seed)
        model = architecture.build(data.input_shape, len(data.classes))
    if device is not None:
        model = model.to(device)
    if training.epochs == 0:
        # The seed alone determines the model: there is nothing to train or cache.
        return model.eval()
    cache = Path(cache) if cache is not None else cache_dir()
    key = trained_model_key(architecture, data_source, training, inputs)
    path = cache / "models" / f"{architecture.name}-{key}.pt"
    if path.is_file():
        state = checkpoints.load_state_dict(path)
        checkpoints.load_into(model, state, source=str(path), architecture=architecture.name)
    else:
        train_classifier(model, data, training, progress)
        checkpoints.save_state_dict(model, path)
    return model.eval()
