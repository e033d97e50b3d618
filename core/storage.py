"""Atomic netCDF writes and checked reads of DataTrees.

A file under its final name is always complete: it is written under a temporary name
in the same directory and renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import xarray as xr

from .errors import ContractError

__all__ = ["atomic_path", "save_tree", "load_tree"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # Flush to disk before the rename, so a crash cannot leave a complete-looking empty file.
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# Variables above this size are compressed: dense 0/1 permutation matrices of wide layers
# (128 MiB for 4096 units) shrink about 200-fold at the fastest zlib level.
COMPRESS_ABOVE = 1 << 20


def save_tree(tree: xr.DataTree, path: str | Path) -> Path:
    """Write ``tree`` to netCDF (one group per node) atomically, large numeric variables compressed."""
    encoding = {}
    for node in tree.subtree:
        large = {
            name: {"zlib": True, "complevel": 1, "shuffle": True}
            for name, var in node.to_dataset(inherit=False).data_vars.items()
            if var.nbytes > COMPRESS_ABOVE and var.dtype.kind in "fiub"
        }
        if large:
            encoding[node.path] = large
    with atomic_path(path) as tmp:
        tree.to_netcdf(tmp, engine="netcdf4", encoding=encoding or None)
    return Path(path)


def load_tree(path: str | Path, check: Callable[[xr.DataTree], object] | None = None) -> xr.DataTree:
    """Read a netCDF DataTree fully into memory, optionally validating it with ``check``."""
    path = Path(path)
    if not path.exists():
        raise ContractError(f"no netCDF file at {path}")
    try:
        with xr.open_datatree(path, engine="netcdf4") as tree:
            loaded = tree.load()
    except (OSError, ValueError) as exc:
        raise ContractError(f"{path} is not a readable netCDF file (truncated or corrupt?): {exc}") from exc
    if check is not None:
        check(loaded)
    return loaded
