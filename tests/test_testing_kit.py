"""The conformance kit catches what it promises to catch."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch
import xarray as xr

from mergescope.testing import check_component, checks_for, example_activations


@attrs.define
class GoodMetric:
    """Mean product of centred activations per unit."""

    name = "good"
    scale: float = 1.0

    def score(self, a, b, context=None):
        if not np.array_equal(a["sample"].values, b["sample"].values) or a.sizes["unit"] != b.sizes["unit"]:
            raise ValueError("a and b differ in samples or units")
        v = ((a - a.mean("sample")) * (b.values - b.values.mean(0))).mean("sample") * self.scale
        return v.drop_vars([c for c in v.coords if c != "unit"]).rename("good")


def test_a_good_component_passes():
    check_component(GoodMetric)
    check_component(GoodMetric(scale=2.0))
    assert [c.__name__ for c in checks_for(GoodMetric)][:4] == [
        "check_registrable",
        "check_options_roundtrip",
        "check_unknown_option_rejected",
        "check_bad_option_type",
    ]


@attrs.define
class WrongDims(GoodMetric):
    """Returns the wrong dims."""

    name = "wrong-dims"

    def score(self, a, b, context=None):
        return xr.DataArray(np.zeros(3), dims=("channel",))


@attrs.define
class Random(GoodMetric):
    """Not deterministic under a seed."""

    name = "random"

    def score(self, a, b, context=None):
        return xr.DataArray(np.random.default_rng().random(a.sizes["unit"]), dims=("unit",), coords={"unit": b["unit"].values})


@attrs.define
class Lenient(GoodMetric):
    """Accepts any input."""

    name = "lenient"

    def score(self, a, b, context=None):
        return xr.DataArray(np.zeros(b.sizes["unit"]), dims=("unit",), coords={"unit": b["unit"].values})


@pytest.mark.parametrize(
    "component, message",
    [(WrongDims, "must return dims"), (Random, "not deterministic"), (Lenient, "accepted two activations")],
)
def test_faults_are_caught(component, message):
    with pytest.raises(AssertionError, match=message):
        check_component(component)


def test_example_activations_follow_the_contract():
    from mergescope import validate_activation

    for da in example_activations():
        validate_activation(da)


@attrs.define
class FileEmbedder:
    """Embeds with weights read from a file that does not ship."""

    name = "file-embedder"
    weights: str = "/nowhere/weights.npy"

    @classmethod
    def conformance_instance(cls, directory):
        path = directory / "weights.npy"
        np.save(path, np.arange(12.0).reshape(3, 4) / 10)
        return cls(weights=str(path))

    def embed(self, images):
        matrix = np.load(self.weights)  # fails for the default path: only the kit's instance works
        return images.mean(dim=(2, 3)).numpy() @ matrix


def test_output_checks_run_on_the_conformance_instance():
    check_component(FileEmbedder)  # the default instance would fail to open its weights
    with pytest.raises(FileNotFoundError):
        FileEmbedder().embed(torch.zeros(1, 3, 4, 4))
