"""An example third-party mergescope plugin: Spearman's rank correlation per unit.

It is installed the way any plugin is: a distribution (here a bare ``.dist-info``
folder next to the package) declaring an entry point in the ``mergescope.plugins``
group. It uses only the public ``mergescope`` API.
"""

from __future__ import annotations

import attrs
import numpy as np
import xarray as xr
from scipy.stats import rankdata

from mergescope import Context, hookimpl, validate_activation


@attrs.define
class Spearman:
    """Spearman's rank correlation of every unit between two models."""

    name = "example-spearman"
    paper = "Spearman 1904, The proof and measurement of association between two things"

    def score(self, a: xr.DataArray, b: xr.DataArray, context: Context | None = None) -> xr.DataArray:
        # The runner passes the step's context; a rank correlation needs nothing from it.
        validate_activation(a, "a")
        validate_activation(b, "b")
        if a.sizes["unit"] != b.sizes["unit"]:
            raise ValueError(f"a has {a.sizes['unit']} units but b has {b.sizes['unit']}")
        if not np.array_equal(a["sample"].values, b["sample"].values):
            raise ValueError("a and b must hold the same samples in the same order")
        ra = rankdata(a.values, axis=0)
        rb = rankdata(b.values, axis=0)
        ra -= ra.mean(axis=0)
        rb -= rb.mean(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = (ra * rb).sum(axis=0) / np.sqrt((ra**2).sum(axis=0) * (rb**2).sum(axis=0))
        return xr.DataArray(rho, dims=("unit",), coords={"unit": b["unit"].values}, name="spearman")


@hookimpl
def register_metrics(register):
    register(Spearman)
