from __future__ import annotations

import numpy as np
import xarray as xr

from mergescope_plugins.interpolation_curves import InterpolationCurves, sweeps


def curve(barrier: float) -> xr.Dataset:
    alpha = np.linspace(0, 1, 5)
    loss = 0.2 + barrier * np.sin(np.pi * alpha)
    return xr.Dataset(
        {"loss": ("alpha", loss), "accuracy": ("alpha", 1 - loss / 2), "loss_barrier": barrier},
        coords={"alpha": alpha, "model": ["a", "b"]},
    )


def test_sweeps_are_stacked_by_method_and_drawn(tmp_path):
    tree = xr.DataTree.from_dict(
        {"naive": curve(1.0), "matched": curve(0.0), "kendall-tau/relu1": xr.Dataset({"tau": ("unit", [0.1])})}
    )
    stacked = sweeps(tree)
    assert list(stacked["method"].values) == ["naive", "matched"]
    assert stacked["loss"].dims == ("method", "alpha")
    assert stacked["loss_barrier"].sel({"method": "naive"}).item() == 1.0
    files = InterpolationCurves().render(tree, tmp_path / "out")
    assert [f.name for f in files] == ["curves.nc", "curves.png"] and all(f.stat().st_size > 0 for f in files)
    xr.testing.assert_identical(xr.open_dataset(files[0]).load(), stacked)


def test_nothing_to_draw_without_sweeps(tmp_path):
    assert InterpolationCurves().render(xr.DataTree(), tmp_path) == []
