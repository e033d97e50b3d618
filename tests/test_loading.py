"""mergescope.loading: the [loader] options, the loaders built with them, the data-wait measure."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from mergescope.errors import ConfigError
from mergescope.loading import (
    LoaderOptions,
    TimedBatches,
    current_loader_options,
    loader_options,
    make_loader,
    to_device,
)
from mergescope.pipeline import Pipeline
from mergescope.runner import run
from tests.pipelines import SMALL

# -- the options ------------------------------------------------------------------------


def test_defaults_are_the_portable_choice():
    options = LoaderOptions()
    assert (options.workers, options.pin_memory, options.persistent_workers, options.prefetch_factor) == (
        0,
        "auto",
        True,
        2,
    )
    assert options.to_table() == {}


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("workers", -1, "workers must be a whole number >= 0"),
        ("workers", 1.5, "workers must be a whole number >= 0"),
        ("workers", True, "workers must be a whole number >= 0"),
        ("prefetch_factor", 0, "prefetch_factor must be a whole number >= 1"),
        ("pin_memory", "yes", "pin_memory must be 'auto', true or false"),
        ("pin_memory", 1, "pin_memory must be 'auto', true or false"),
        ("persistent_workers", 1, "persistent_workers must be true or false"),
    ],
)
def test_bad_options_are_refused_with_the_key(field, value, says):
    with pytest.raises(ConfigError, match=says) as caught:
        LoaderOptions(**{field: value})
    assert caught.value.where == f"key {field!r}"


def test_pinning_auto_pins_for_cuda_only():
    auto = LoaderOptions()
    assert auto.pins_for("cuda:0") and auto.pins_for(torch.device("cuda", 1))
    assert not auto.pins_for("cpu") and not auto.pins_for("mps") and not auto.pins_for(None)
    assert LoaderOptions(pin_memory=True).pins_for("cpu")
    assert not LoaderOptions(pin_memory=False).pins_for("cuda")


# -- loaders built with the options in force ----------------------------------------------


def test_make_loader_reads_the_options_in_force():
    data = torch.utils.data.TensorDataset(torch.arange(10.0))
    assert current_loader_options() == LoaderOptions()
    plain = make_loader(data, 4)
    assert plain.num_workers == 0 and not plain.pin_memory
    with loader_options(LoaderOptions(workers=2, persistent_workers=False, prefetch_factor=3)):
        loader = make_loader(data, 4, device="cpu")
        assert (loader.num_workers, loader.persistent_workers, loader.prefetch_factor) == (2, False, 3)
        assert make_loader(data, 4, workers=0).num_workers == 0  # a per-loader override
    assert current_loader_options() == LoaderOptions()  # restored on leaving the block


def test_workers_change_neither_the_batches_nor_their_order():
    data = torch.utils.data.TensorDataset(torch.arange(37.0))

    def batches(workers: int) -> list[torch.Tensor]:
        order = torch.Generator().manual_seed(5)
        with loader_options(LoaderOptions(workers=workers)):
            return [b[0] for b in make_loader(data, 8, shuffle=True, generator=order)]

    assert all(torch.equal(a, b) for a, b in zip(batches(0), batches(2), strict=True))


def test_to_device_keeps_values():
    x = torch.arange(6.0)
    assert torch.equal(to_device(x, "cpu"), x)


def test_timed_batches_measures_the_wait_for_data():
    def slow():
        for i in range(3):
            time.sleep(0.05)
            yield i

    timed = TimedBatches(slow())
    seen = []
    for item in timed:
        seen.append(item)
        time.sleep(0.05)  # the consumer's work: not waiting for data
    assert seen == [0, 1, 2]
    assert 0.14 <= timed.waited <= timed.elapsed
    assert 0.35 < timed.share < 0.65
    assert TimedBatches([]).share == 0.0


# -- the pipeline's [loader] table ------------------------------------------------------


def _pipeline(text: str) -> Pipeline:
    return Pipeline.from_toml(text, source="p.toml")


def test_loader_table_round_trips():
    pipeline = _pipeline(SMALL + "\n[loader]\nworkers = 2\npin_memory = false\n")
    assert pipeline.loader == LoaderOptions(workers=2, pin_memory=False)
    again = Pipeline.from_toml(pipeline.to_toml(), source="again.toml")
    assert again.loader == pipeline.loader
    assert "[loader]" not in _pipeline(SMALL).to_toml()  # defaults are not written


def test_activations_workers_is_the_older_spelling():
    text = SMALL.replace("batch_size = 100\n", "batch_size = 100\nworkers = 3\n")
    assert _pipeline(text).loader.workers == 3
    assert _pipeline(text + "\n[loader]\nworkers = 3\n").loader.workers == 3
    with pytest.raises(ConfigError, match="disagree") as caught:
        _pipeline(text + "\n[loader]\nworkers = 1\n")
    assert caught.value.where == "p.toml, [activations], key 'workers'"


@pytest.mark.parametrize(
    ("table", "says", "where"),
    [
        ("bogus = 1\n", r"unknown key 'bogus' in \[loader\]", "p.toml, [loader], key 'bogus'"),
        ("workers = -2\n", "workers must be a whole number >= 0", "p.toml, [loader], key 'workers'"),
        ("prefetch_factor = 0\n", "prefetch_factor must be", "p.toml, [loader], key 'prefetch_factor'"),
    ],
)
def test_bad_loader_tables_name_the_key(table, says, where):
    with pytest.raises(ConfigError, match=says) as caught:
        _pipeline(SMALL + "\n[loader]\n" + table)
    assert caught.value.where == where


def test_a_run_with_workers_gives_the_same_results(tmp_path):
    """Worker processes load the same batches in the same order: the results do not change."""
    text = SMALL.replace("epochs = 6", "epochs = 2")
    plain = run(_pipeline(text), tmp_path / "plain", quiet=True)
    loaded = run(_pipeline(text + "\n[loader]\nworkers = 2\n"), tmp_path / "workers", quiet=True)
    a, b = plain.results, loaded.results
    compared = 0
    for node in a.subtree:
        for name, variable in node.ds.data_vars.items():
            other = b[node.path].ds[name]
            if np.issubdtype(variable.dtype, np.number):
                np.testing.assert_array_equal(variable.values, other.values, err_msg=f"{node.path}/{name}")
                compared += 1
    assert compared > 5
