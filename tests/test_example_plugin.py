"""A third-party plugin is found through the real entry-point path and usable by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from mergescope import Pipeline, run
from mergescope.store import Store
from mergescope.testing import check_component

from pipelines import SMALL

EXAMPLE = Path(__file__).parent / "example_plugin"


@pytest.fixture
def example_installed(fresh_registry, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    fresh_registry.reset()
    yield fresh_registry.get_registry()
    monkeypatch.delitem(__import__("sys").modules, "mergescope_example", raising=False)


def test_discovered_through_its_entry_point(example_installed):
    info = example_installed.plugins["example"]
    assert info.distribution == "mergescope-example" and info.version == "0.1.0" and info.error is None
    entry = example_installed.entry("metric", "example-spearman")
    assert entry.plugin == "example" and entry.module == "mergescope_example"


def test_passes_the_conformance_kit(example_installed):
    check_component(example_installed.get("metric", "example-spearman"))


def test_usable_by_name_in_a_pipeline(example_installed, tmp_path):
    text = SMALL + '\n[[steps]]\nuse = "example-spearman"\nmodels = ["a", "b"]\nallow_unaligned = true\nlayers = ["relu2"]\n'
    result = run(Pipeline.from_toml(text), tmp_path / "run", quiet=True)
    rho = result.results["example-spearman/relu2"].ds["spearman"].sel(model="b")
    # Compare with scipy on the activations the run recorded.
    store = Store.open(next((tmp_path / "run" / "activations").iterdir()))
    recorded = {m: store.activation(m, "relu2") for m in "ab"}
    unit = int(np.nanargmax(np.abs(rho.values)))
    expected = spearmanr(recorded["a"].values[:, unit], recorded["b"].values[:, unit]).statistic
    assert rho.values[unit] == pytest.approx(expected, abs=1e-9)


def test_not_loaded_when_blocked(fresh_registry, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv(fresh_registry.BLOCK_ENV, "example")
    fresh_registry.reset()
    assert "example-spearman" not in fresh_registry.get_registry().names("metric")
