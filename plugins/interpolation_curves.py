"""Loss and accuracy along the interpolation path, every method side by side.

Collects every result group of the run that holds an ``alpha`` sweep (``loss`` and
``accuracy`` on dim ``alpha``, as the ``interpolation`` merger writes), stacks them on a
``method`` dim (the step names), writes ``curves.nc`` with dims ``(method, alpha)`` and
``loss_barrier`` / ``accuracy_barrier`` per method, and draws the thesis's Figure 3.1:
accuracy and loss against alpha, one line per method.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import attrs
import numpy as np
import xarray as xr

from mergescope.components import Context
from mergescope.hookspecs import hookimpl

__all__ = ["sweeps", "InterpolationCurves", "register_visualizers"]


def sweeps(results: xr.DataTree) -> xr.Dataset:
    """Every alpha sweep in ``results`` stacked on a ``method`` dim (the group's path)."""
    curves = []
    for node in results.subtree:
        ds = node.to_dataset(inherit=False)
        if "alpha" in ds.dims and {"loss", "accuracy"} <= set(ds.data_vars):
            keep = [v for v in ("loss", "accuracy", "loss_barrier", "accuracy_barrier") if v in ds]
            method = node.path.strip("/") or "root"
            curves.append(ds[keep].expand_dims(method=[method]))
    if not curves:
        return xr.Dataset()
    return xr.concat(curves, dim="method", join="outer")


@attrs.define
class InterpolationCurves:
    """Plot loss and accuracy along alpha for every interpolation sweep of the run, methods side by side.

    Parameters
    ----------
    title
        Figure title.
    """

    name: ClassVar[str] = "interpolation-curves"
    paper: ClassVar[str] = "Frankle et al. 2020; Jordan et al. 2023 (loss/accuracy along the linear path)"

    title: str = "Linear interpolation"

    def render(self, results: xr.DataTree, out_dir: Path, context: Context | None = None) -> list[Path]:
        """Write ``curves.nc`` and ``curves.png`` into ``out_dir``; nothing when the run has no sweep.

        ``context`` (the step's) is not needed: the curves are in ``results``.
        """
        curves = sweeps(results)
        if not curves.data_vars:
            return []
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        data_path = out_dir / "curves.nc"
        curves.to_netcdf(data_path)
        fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
        for method in curves["method"].values:
            c = curves.sel({"method": method}).dropna("alpha", how="all")  # not sel(method=...): a keyword of sel
            label = str(method)
            if "loss_barrier" in c and np.isfinite(float(c["loss_barrier"])):
                label += f" (barrier {float(c['loss_barrier']):.3f})"
            acc_ax.plot(c["alpha"], 100 * c["accuracy"], marker=".", label=label)
            loss_ax.plot(c["alpha"], c["loss"], marker=".", label=label)
        acc_ax.set(xlabel="alpha", ylabel="accuracy (%)", title="accuracy")
        loss_ax.set(xlabel="alpha", ylabel="loss", title="loss")
        loss_ax.legend(fontsize="small")
        fig.suptitle(self.title)
        fig.tight_layout()
        figure_path = out_dir / "curves.png"
        fig.savefig(figure_path, dpi=120)
        plt.close(fig)
        return [data_path, figure_path]


@hookimpl
def register_visualizers(register):
    """Register :class:`InterpolationCurves`."""
    register(InterpolationCurves)
