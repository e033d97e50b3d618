"""Recompute BatchNorm running statistics after weights change.

Merging (averaging, task arithmetic, TIES, PCB, interpolation) changes the features a
BatchNorm layer sees, so the running mean and variance stored in the merged state no
longer describe them: a merged network can lose most of its accuracy for this reason
alone (Jordan et al. 2023, REPAIR; Qu & Horvath 2025, vanishing features). The usual
remedy is to forget the stored statistics and measure them again with one pass over
some data, which is what :func:`reset_batchnorm` does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .loading import make_loader, to_device
from .progress import Progress, silent

__all__ = ["batchnorm_layers", "running_stat_keys", "reset_batchnorm", "statistics_batches", "STATISTICS_ORDER_SEED"]

#: Seed of the fixed order in which :func:`statistics_batches` draws items.
STATISTICS_ORDER_SEED = 0


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics, by module name.

    ``BatchNorm1d``/``2d``/``3d``, ``SyncBatchNorm`` and their lazy variants count;
    layers built with ``track_running_stats=False`` (which always normalise with the
    batch's own statistics) do not, and neither do instance or layer normalisation.
    """
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.track_running_stats
        and module.running_mean is not None
    }


def running_stat_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the BatchNorm running means and variances of ``model``.

    These are statistics of the data, not learned weights; mergers treat them apart
    from the parameters (see :mod:`mergescope.task_vectors`). ``num_batches_tracked``
    is an integer counter and is not listed.
    """
    keys = []
    for name, _ in batchnorm_layers(model).items():
        prefix = f"{name}." if name else ""
        keys += [f"{prefix}running_mean", f"{prefix}running_var"]
    return keys


def _images(batch: Any) -> torch.Tensor:
    # ImageDataset items are (image, label); a plain dataset of tensors also works.
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def statistics_batches(
    data: Any, batch_size: int, device: torch.device | str | None = None
) -> torch.utils.data.DataLoader:
    """Batches of ``data`` in a fixed pseudo-random order, for passes that normalise per batch.

    A BatchNorm layer in training mode (and REPAIR's measuring pass) normalises every
    batch with that batch's own statistics, so what the later layers see, and what is
    measured there, depends on which items share a batch. Datasets are often stored
    class by class (MNIST-5000, an image folder): in stored order a batch may hold one or
    two classes, whose statistics are far from the dataset's. Drawing the items in a
    seeded random order (:data:`STATISTICS_ORDER_SEED`) gives every batch a sample of
    the whole set, and the same batches on every run.

    Parameters
    ----------
    data
        A map-style dataset (random access by position).
    batch_size
        Items per batch; the last batch may be smaller.
    device
        Where the batches go (decides whether they are pinned, see
        :class:`~mergescope.loading.LoaderOptions`).

    Returns
    -------
    torch.utils.data.DataLoader
        A loader over every item once.
    """
    order = torch.Generator().manual_seed(STATISTICS_ORDER_SEED)
    return make_loader(data, batch_size, device=device, shuffle=True, generator=order)


def reset_batchnorm(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 256,
    max_batches: int | None = None,
    progress: Progress | None = None,
) -> nn.Module:
    """Recompute the running mean and variance of every BatchNorm layer on ``data``.

    The stored statistics are discarded and measured again in one pass: every BatchNorm
    layer runs in training mode with ``momentum=None`` (a cumulative average over the
    batches), everything else in evaluation mode (dropout off), without gradients. The
    momentum of each layer is restored afterwards. Weights and biases are not touched.

    Parameters
    ----------
    model
        The network, changed in place.
    data
        A dataset whose items are ``(image, label)`` pairs (any
        :class:`~mergescope.components.ImageDataset`) or image tensors.
    batch_size
        Batch size of the pass. The items are drawn in a fixed random order
        (:func:`statistics_batches`), so every batch samples the whole set even when it
        is stored class by class. PyTorch averages per-batch statistics with equal weight
        per batch, so the result is the exact mean and (unbiased) variance over ``data``
        only when it fits in one batch; with several batches the mean is exact for equal
        batch sizes and the variance is the mean of the per-batch variances (it leaves
        out the spread of the batch means, small for random batches of a few hundred
        images).
    max_batches
        Stop after this many batches (``None``: the whole dataset).
    progress
        Shows how far the pass has come (see :mod:`mergescope.progress`); silent when ``None``.

    Returns
    -------
    torch.nn.Module
        ``model`` itself, in evaluation mode. A model without BatchNorm layers (that
        track running statistics) is returned untouched, without a pass over the data.

    Raises
    ------
    ValueError
        ``batch_size`` or ``max_batches`` is not a positive integer, or ``data`` is empty.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    layers = list(batchnorm_layers(model).values())
    if not layers:
        return model
    if len(data) == 0:
        raise ValueError(f"cannot recompute BatchNorm statistics on the empty dataset {getattr(data, 'name', data)!r}")

    running_mean = layers[0].running_mean
    assert running_mean is not None  # batchnorm_layers keeps only layers with running statistics
    device = next((p.device for p in model.parameters()), running_mean.device)
    momenta = [layer.momentum for layer in layers]
    loader = statistics_batches(data, batch_size, device)
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    batches = (progress or silent)(loader, desc="BatchNorm statistics", total=total)
    try:
        model.eval()
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average instead of an exponential one
            layer.train()
        with torch.no_grad():
            for i, batch in enumerate(batches, start=1):
                model(to_device(_images(batch), device))
                if i >= total:
                    break
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.eval()
    return model
