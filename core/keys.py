"""Content keys: what identifies a cached result, a model or a file.

Every cache in mergescope (trained models, recordings, step results) is addressed by a
key that hashes everything the cached value depends on. This module makes those keys:
:func:`cache_key` for options and plain values, :func:`file_digest` and
:func:`state_digest` for weights, :func:`path_identity` for files and folders a component
reads, :func:`source_digest` and :func:`core_digest` for the code that computed a result.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
from torch import nn

from .options import converter

__all__ = [
    "OMIT_DEFAULT_FROM_KEY",
    "cache_key",
    "file_digest",
    "path_identity",
    "state_digest",
    "source_digest",
    "core_digest",
]

OMIT_DEFAULT_FROM_KEY = "mergescope.omit_default_from_key"
"""``attrs`` field metadata: leave the option out of cache keys while it has its default.

Give it to an option added to an existing component
(``attrs.field(default=..., metadata={OMIT_DEFAULT_FROM_KEY: True})``): keys of
instances that do not set the new option stay what they were before it existed, so
cached models and step results stay valid. Once set to another value, the option is
part of the key like any other.
"""

# Part of every cache key: bump it when training changes in a way that makes old
# cached weights wrong (loss, data order, initialisation, ...).
_CACHE_FORMAT = "mergescope-trained-model-v1"


def cache_key(*parts: Any) -> str:
    """A stable hash of everything that determines a cached result.

    Parameters
    ----------
    *parts
        Component instances (hashed with their class ``name`` and options), component
        classes (hashed by ``name``), and plain JSON-like values.

    Returns
    -------
    str
        The sha256 hex digest of a canonical JSON of the parts and the cache format
        version; any change of an option changes it.
    """
    payload = {"format": _CACHE_FORMAT, "parts": [_canonical(p) for p in parts]}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(value: Any) -> Any:
    """A JSON-ready form of ``value`` that names a component by its ``name``."""
    if isinstance(value, type):
        return {"class": _class_name(value)}
    if attrs.has(type(value)):
        return {"class": _class_name(type(value)), "options": _canonical(_key_options(value))}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    # Falling back to str() could embed memory addresses and make keys unstable.
    raise TypeError(f"cannot build a cache key from a {type(value).__name__}: {value!r}")


def _key_options(instance: Any) -> dict[str, Any]:
    """The unstructured options of ``instance``, without flagged options at their defaults."""
    options = converter.unstructure(instance)
    for field in attrs.fields(type(instance)):
        if field.metadata.get(OMIT_DEFAULT_FROM_KEY) and field.name in options:
            default = field.default
            if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                default = default.factory(instance) if default.takes_self else default.factory()
            if getattr(instance, field.name) == default:
                del options[field.name]
    return options


def _class_name(cls: type) -> str:
    name = getattr(cls, "name", None)
    return name if isinstance(name, str) else f"{cls.__module__}.{cls.__qualname__}"


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def path_identity(path: str | Path) -> dict[str, Any]:
    """What a file or folder holds, cheaply: the part of a step key for a path option.

    A file is identified by its size and modification time (``st_mtime_ns``); a folder by
    a SHA-256 of the relative path, size and modification time of every file under it
    (symbolic links followed for files, not for folders), and their count. Nothing is
    read, so this costs one ``stat`` per file: editing, adding, removing or renaming a
    file inside changes the identity, as does touching it without a change. Content is
    not hashed, so keys do not survive a rename or move of the same content (a step key
    holds the canonical path too; a copy has new modification times). A missing path is
    ``{"missing": True}``.
    """
    path = Path(path)
    try:
        info = path.stat()
    except OSError:
        return {"missing": True}
    if not path.is_dir():
        return {"file": [info.st_size, info.st_mtime_ns]}
    digest, count = hashlib.sha256(), 0
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = Path(folder, name)
            try:
                stat = full.stat()
            except OSError:  # a dangling link
                continue
            entry = [full.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns]
            digest.update(json.dumps(entry).encode("utf-8"))
            count += 1
    return {"folder": digest.hexdigest(), "files": count}


def state_digest(model: nn.Module) -> str:
    """A sha256 fingerprint of a module's weights: names, shapes and values of its state dict."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@functools.cache
def source_digest(cls: type) -> str | None:
    """SHA-256 of the file that defines ``cls``, so editing a plugin invalidates its steps.

    ``None`` for a class without a readable source file (defined interactively).
    """
    try:
        source = inspect.getsourcefile(cls)
    except TypeError:
        return None
    return file_digest(Path(source)) if source and Path(source).is_file() else None


@functools.cache
def core_digest() -> str:
    """SHA-256 of mergescope's own modules: every step's result depends on them too."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(file_digest(path).encode())
    return digest.hexdigest()
