"""Tests of BatchNorm statistics recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mergescope.batchnorm import batchnorm_layers, reset_batchnorm, running_stat_keys, statistics_batches
from mergescope.components import Context, TensorImageDataset


def convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),  # must stay off during the pass: the expected statistics are computed without it
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6),
        nn.BatchNorm1d(6),
        nn.Linear(6, 3),
    )


@pytest.fixture
def data() -> TensorImageDataset:
    gen = torch.Generator().manual_seed(1)
    images = 2.0 + 3.0 * torch.randn(40, 3, 5, 5, generator=gen)
    return TensorImageDataset("random", images, np.arange(40) % 3, np.arange(40), ["a", "b", "c"])


def scramble(model: nn.Module) -> None:
    for layer in batchnorm_layers(model).values():
        layer.running_mean.uniform_(-5, 5)
        layer.running_var.uniform_(0.1, 9)


def true_statistics(model: nn.Sequential, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and unbiased variance of each BatchNorm's input, computed directly."""
    with torch.no_grad():
        x1 = model[0](images)  # (N, C, H, W) into BatchNorm2d: statistics over N, H, W
        stats = {"1": (x1.mean(dim=(0, 2, 3)), x1.var(dim=(0, 2, 3), unbiased=True))}
        # The second BatchNorm sees the first one normalising with these same batch statistics.
        h = nn.functional.batch_norm(x1, None, None, model[1].weight, model[1].bias, training=True)
        x6 = model[5](model[4](model[2](h)))
        stats["6"] = (x6.mean(dim=0), x6.var(dim=0, unbiased=True))
    return stats


def test_reset_recovers_the_true_statistics_in_one_batch(data: TensorImageDataset) -> None:
    model = convnet().train()
    scramble(model)
    out = reset_batchnorm(model, data, batch_size=len(data))
    assert out is model
    expected = true_statistics(model, data.images)
    for name, (mean, var) in expected.items():
        layer = model.get_submodule(name)
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-5, atol=1e-5)
        assert layer.momentum == 0.1  # restored
        assert int(layer.num_batches_tracked) == 1
    assert not model.training and not any(m.training for m in model.modules())


def test_several_batches_average_the_batch_statistics(data: TensorImageDataset) -> None:
    model = convnet()
    scramble(model)
    reset_batchnorm(model, data, batch_size=10)
    # Equal batches: the running mean of the first layer is the mean over all the data.
    with torch.no_grad():
        x1 = model[0](data.images)
    torch.testing.assert_close(model[1].running_mean, x1.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    # The variance is the mean of the four per-batch variances, batches in the fixed random order.
    order = torch.cat(list(statistics_batches(list(range(40)), 10)))
    assert sorted(order.tolist()) == list(range(40)) and order.tolist() != list(range(40))
    per_batch = torch.stack([x1[order[i : i + 10]].var(dim=(0, 2, 3)) for i in range(0, 40, 10)])
    torch.testing.assert_close(model[1].running_var, per_batch.mean(dim=0), rtol=1e-5, atol=1e-5)
    assert int(model[1].num_batches_tracked) == 4


def test_data_stored_class_by_class_gives_the_statistics_of_the_whole_set() -> None:
    # Two classes far apart, stored one after the other, as MNIST-5000 and image folders are:
    # batches in stored order would each see one class and a tenth of the variance.
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(200, 3, 5, 5, generator=gen) + torch.repeat_interleave(torch.tensor([-3.0, 3.0]), 100).view(-1, 1, 1, 1)
    sorted_data = TensorImageDataset("sorted", images, np.repeat([0, 1], 100), np.arange(200), ["a", "b"])
    model = convnet()
    reset_batchnorm(model, sorted_data, batch_size=100)
    with torch.no_grad():
        x1 = model[0](images)
    torch.testing.assert_close(model[1].running_mean, x1.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model[1].running_var, x1.var(dim=(0, 2, 3)), rtol=0.05, atol=0.0)
    # ... and the same statistics on every run
    again = convnet()
    reset_batchnorm(again, sorted_data, batch_size=100)
    assert torch.equal(again[6].running_var, model[6].running_var)


def test_max_batches_stops_early(data: TensorImageDataset) -> None:
    model = convnet()
    reset_batchnorm(model, data, batch_size=8, max_batches=1)
    assert int(model[1].num_batches_tracked) == 1
    first = next(iter(statistics_batches(list(range(len(data))), 8)))
    with torch.no_grad():
        x1 = model[0](data.images[first])
    torch.testing.assert_close(model[1].running_mean, x1.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_progress_and_momentum_none_kept(data: TensorImageDataset) -> None:
    model = convnet()
    model[1].momentum = None
    calls = []

    def progress(iterable, desc, total=None):
        calls.append((desc, total))
        return iter(iterable)

    reset_batchnorm(model, data, batch_size=16, progress=progress)
    assert model[1].momentum is None and model[6].momentum == 0.1
    assert calls == [("BatchNorm statistics", -(-len(data) // 16))]
    # A context's progress is such a callable.
    reset_batchnorm(model, data, batch_size=16, progress=Context(data=data, quiet=True).progress)


def test_no_batchnorm_is_a_no_op(data: TensorImageDataset) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(75, 3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert reset_batchnorm(model, data) is model
    assert model.training  # untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Layers without running statistics are not BatchNorm layers to reset.
    stateless = nn.Sequential(nn.Flatten(), nn.Linear(75, 4), nn.BatchNorm1d(4, track_running_stats=False))
    assert batchnorm_layers(stateless) == {} and running_stat_keys(stateless) == []
    assert reset_batchnorm(stateless, data) is stateless


def test_running_stat_keys() -> None:
    assert running_stat_keys(convnet()) == ["1.running_mean", "1.running_var", "6.running_mean", "6.running_var"]
    assert running_stat_keys(nn.BatchNorm1d(3)) == ["running_mean", "running_var"]


def test_bad_arguments(data: TensorImageDataset) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        reset_batchnorm(convnet(), data, batch_size=0)
    with pytest.raises(ValueError, match="max_batches"):
        reset_batchnorm(convnet(), data, max_batches=0)
    with pytest.raises(ValueError, match="empty dataset"):
        reset_batchnorm(convnet(), data.subset([]))
