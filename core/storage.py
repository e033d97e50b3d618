"""Atomic netCDF writes and checked reads of DataTrees; run directories checked and locked.

A file under its final name is always complete: it is written under a temporary name
in the same directory and renamed into place. :func:`writable_dir` checks a directory
before anything is written to it, :func:`locked_dir` keeps a second process out of it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import xarray as xr

from .errors import ConfigError, ContractError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, directories are not locked
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_path", "save_tree", "load_tree", "writable_dir", "locked_dir", "LOCK_FILE"]

#: The lock file of a run directory: held (``flock``) by the process writing the directory.
LOCK_FILE = "run.lock"


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


def writable_dir(path: str | Path, what: str = "the run directory") -> Path:
    """Create ``path`` if missing and check that files can be written in it.

    Raises
    ------
    ConfigError
        ``path`` is an existing file (or another non-folder), cannot be created (the
        reason: a parent that is a file, no permission, a read-only file system), or is
        not writable (``os.access``); the message names the path and what is wrong.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"{what} {str(path)!r} is an existing file, not a folder; give a folder (created when missing)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be created: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {str(path)!r} is not writable: no files can be created in it")
    return path


@contextmanager
def locked_dir(path: str | Path, what: str = "the run directory") -> Iterator[Path]:
    """Hold an exclusive lock on directory ``path`` (its :data:`LOCK_FILE`) for the block.

    The lock is ``fcntl.flock`` on the open lock file, taken without waiting; it is
    released when the block ends, however it ends, and by the operating system when the
    process dies, so a lock file left by a killed run does not block. The file holds the
    pid of the process holding the lock.

    Raises
    ------
    ConfigError
        Another process (or another open of the file in this process) holds the lock;
        the message names the directory and the pid in the lock file.
    """
    path = writable_dir(path, what)
    if fcntl is None:  # pragma: no cover
        yield path
        return
    lock = path / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot create the lock file {str(lock)!r} of {what}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise ConfigError(
                f"{what} {str(path)!r} is in use by another run (pid {holder}, lock file {LOCK_FILE}); wait for it "
                "to finish, or give another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a waiting run)
