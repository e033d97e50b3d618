"""Safe checkpoint I/O.

Checkpoints are state dicts, as saved or as training scripts wrap them. ``torch.save``
files are always read with ``torch.load(..., weights_only=True)``, allowing beyond tensors
and plain values only the harmless types of :data:`SAFE_GLOBALS`, so that opening a
checkpoint can never run code hidden in a pickle; ``.safetensors`` files hold tensors
only. The weights are found in the common layouts (a plain state dict, or one under
``model_state_dict``, ``state_dict`` or ``model``) or under the entry a caller names, and
can have a prefix (``module.``, ``model.``) removed from their keys. Checkpoints are written
atomically so that an interrupted save never leaves a truncated file where a cache or a
pipeline expects a complete one.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, article
from .keys import state_digest  # re-exported: fingerprints once lived here
from .storage import atomic_path
from .values import ImageDataset

__all__ = [
    "LAYOUT_KEYS",
    "SAFE_GLOBALS",
    "load_state_dict",
    "load_into",
    "check_class_count",
    "save_state_dict",
    "state_digest",
]

log = logging.getLogger("mergescope")

# How many keys of each kind of mismatch an error message lists.
_SHOWN = 5

#: The entries of a saved dict the weights are looked for under, when no ``checkpoint_key``
#: names one: the PyTorch tutorial's ``model_state_dict``, PyTorch Lightning's
#: ``state_dict``, and ``model`` (torchvision's reference scripts, timm, many others).
#: Averaged weights (``ema``, ``model_ema``, ``state_dict_ema``) are used only when named.
LAYOUT_KEYS: tuple[str, ...] = ("model_state_dict", "state_dict", "model")

#: The Python types, beyond tensors and plain values (numbers, strings, lists, tuples,
#: dicts, ``OrderedDict``), that a checkpoint may hold and still be loaded: what research
#: checkpoints carry next to the weights, none of which runs code when unpickled.
#: ``argparse.Namespace`` holds the command-line arguments of torchvision's reference
#: training scripts and timm's ``train.py`` (their optimizer and lr-scheduler state dicts
#: hold only tensors and plain values); the pure paths appear in such arguments. A
#: checkpoint needing any other type or function is refused.
SAFE_GLOBALS: tuple[type, ...] = (
    argparse.Namespace,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
    pathlib.PosixPath,
)

# Terminal escape sequences (torch colours parts of its messages).
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def load_state_dict(
    path: str | Path, *, checkpoint_key: str | None = None, strip_prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """Read a state dict from a checkpoint file without unpickling arbitrary objects.

    Parameters
    ----------
    path
        A ``.safetensors`` file, or a file written by ``torch.save`` (any other suffix:
        ``.pt``, ``.pth``, ``.ckpt``, ``.bin``, ...). The latter may hold a plain state
        dict, or a dict holding one next to optimizer state and metadata; it may hold,
        besides tensors and plain values, only the types of :data:`SAFE_GLOBALS`.
    checkpoint_key
        The entry of a saved dict that holds the weights, dotted for nesting (e.g.
        ``"model"``, ``"model_ema"``, ``"checkpoint.state_dict"``). Default: the file is a
        plain state dict, or holds one under exactly one of :data:`LAYOUT_KEYS` (the entry
        used is logged).
    strip_prefix
        A prefix removed from the keys, e.g. ``"module."`` (``DataParallel``) or
        ``"model."`` (a Lightning module's attribute). Keys without it are left out (and
        logged); at least one must have it. A prefix without its final ``.`` gets one
        when the keys have it.

    Returns
    -------
    dict[str, torch.Tensor]
        Parameter and buffer tensors by name, on the CPU.

    Raises
    ------
    CheckpointError
        The file is missing or unreadable; needs a type outside :data:`SAFE_GLOBALS` (it
        is refused rather than unpickled; the message names the type); holds no state
        dict where one is looked for, or several (the message lists the entries and
        suggests ``checkpoint_key``); or no key has ``strip_prefix``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    if path.suffix == ".safetensors":
        payload: Any = _load_safetensors(path, checkpoint_key)
    else:
        payload = _load_torch(path)
    state, entry = _select(payload, str(path), checkpoint_key)
    if entry is not None and checkpoint_key is None:
        log.info("checkpoint %s: the weights are its entry %r (found automatically)", path, entry)
    if strip_prefix:
        state = _strip(state, strip_prefix, str(path))
    # Keep an OrderedDict as is: its ``_metadata`` carries module versions that
    # ``nn.Module.load_state_dict`` uses to upgrade old layouts.
    return state if isinstance(state, dict) else dict(state)


def _load_torch(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global it does not know: the file would have to run
        # arbitrary code to be loaded, so it is not loaded at all.
        raise CheckpointError(_refusal(path, exc)) from exc
    except Exception as exc:
        # A truncated or foreign file fails deep inside torch with whatever error the
        # parser hits first (RuntimeError, EOFError, IndexError, ...).
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read as a torch checkpoint: {_first_line(exc)}"
        ) from exc


def _load_safetensors(path: Path, checkpoint_key: str | None) -> dict[str, torch.Tensor]:
    if checkpoint_key is not None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a .safetensors file, which holds one flat state dict and no entries "
            f"for checkpoint_key {checkpoint_key!r} to name; to drop a prefix of its keys, give strip_prefix"
        )
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a .safetensors file, and reading one needs the safetensors package, "
            "which is not installed: pip install safetensors"
        ) from exc
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read as a safetensors file: {_first_line(exc)}"
        ) from exc


def _refusal(path: Path, exc: BaseException) -> str:
    """The complete message of a checkpoint refused for safety: the types it needs, and the way out."""
    text = _plain(str(exc))
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in SAFE_GLOBALS}
    try:
        needed = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:  # an old format the scan does not read: take the names from torch's message
        needed = []
    needed = needed or re.findall(r"GLOBAL (\S+) was not an allowed global", text)
    what = f"the Python type {' and '.join(needed)}" if needed else "a Python type or function"
    reason = re.search(r"WeightsUnpickler error:\s*(.*?[.!?])(?:\s|$)", text)
    detail = f" torch says: {reason.group(1)}" if reason else ""
    return (
        f"checkpoint {str(path)!r} holds non-tensor objects and is refused for safety: loading it would need "
        f"{what}, which is not among the harmless types mergescope allows "
        f"({', '.join(sorted(allowed))}; mergescope.checkpoints.SAFE_GLOBALS), and unpickling anything else "
        f"could run arbitrary code.{detail} Re-save the weights alone, e.g. torch.save(model.state_dict(), "
        "path), and load that file."
    )


def _plain(text: str) -> str:
    """``text`` without terminal escape sequences."""
    return _ANSI.sub("", text)


def _first_line(exc: BaseException) -> str:
    text = _plain(str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, Mapping):
        tensors = sum(isinstance(v, torch.Tensor) for v in value.values())
        return (
            "dict of "
            + _count(len(value), "entry", "entries")
            + (f", {_count(tensors, 'tensor', 'tensors')}" if tensors else "")
        )
    return type(value).__name__


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _entries(payload: Mapping[Any, Any]) -> str:
    items = [f"{k!r} ({_describe(v)})" for k, v in list(payload.items())[:12]]
    more = f" and {len(payload) - 12} more" if len(payload) > 12 else ""
    return ", ".join(items) + more


def _select(payload: Any, where: str, checkpoint_key: str | None) -> tuple[Mapping[str, torch.Tensor], str | None]:
    """The state dict in ``payload`` and the entry it was under (``None``: the payload itself)."""
    if not isinstance(payload, Mapping):
        raise CheckpointError(
            f"checkpoint {where!r} holds a {type(payload).__name__}, not a state dict "
            "(a mapping of parameter names to tensors)"
        )
    if checkpoint_key is not None:
        return _named(payload, where, checkpoint_key), checkpoint_key
    if _is_state_dict(payload):
        return payload, None
    found = [k for k in LAYOUT_KEYS if payload.get(k) and _is_state_dict(payload[k])]
    if len(found) == 1:
        return payload[found[0]], found[0]
    if len(found) > 1:
        raise CheckpointError(
            f"checkpoint {where!r} holds state dicts under several entries ({', '.join(map(repr, found))}), so "
            f"which one holds the model's weights is ambiguous; its entries: {_entries(payload)}. Name one with "
            f'checkpoint_key, e.g. checkpoint_key = "{found[0]}".'
        )
    wrappers = [k for k in LAYOUT_KEYS if isinstance(payload.get(k), Mapping)]
    if len(wrappers) == 1:  # the usual entry, holding something besides tensors: say what
        _check_tensors(payload[wrappers[0]], where, wrappers[0])
    if any(isinstance(v, torch.Tensor) for v in payload.values()):  # a state dict with stray entries
        _check_tensors(payload, where, None)
    nested = [k for k, v in payload.items() if isinstance(k, str) and v and _is_state_dict(v)]
    hint = (
        f"the entries holding only tensors are {', '.join(map(repr, nested))}: name the one with the "
        f'weights with checkpoint_key, e.g. checkpoint_key = "{nested[0]}".'
        if nested
        else "name the entry that holds the weights with checkpoint_key (dotted for nesting, e.g. "
        'checkpoint_key = "model.state_dict").'
    )
    raise CheckpointError(
        f"checkpoint {where!r} is not a state dict, and none was found under the entries looked for "
        f"({', '.join(map(repr, LAYOUT_KEYS))}); its entries: {_entries(payload)}. If it holds the weights, {hint}"
    )


def _named(payload: Mapping[Any, Any], where: str, checkpoint_key: str) -> Mapping[str, torch.Tensor]:
    """The entry ``checkpoint_key`` (a key of ``payload``, or a dotted path into nested dicts)."""
    if checkpoint_key in payload:
        node = payload[checkpoint_key]
    else:
        node = payload
        walked: list[str] = []
        for part in checkpoint_key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                inside = f" under {'.'.join(walked)!r}" if walked else ""
                entries = (
                    f"the entries{inside}: {_entries(node)}"
                    if isinstance(node, Mapping)
                    else (f"{'.'.join(walked)!r} is a {type(node).__name__}")
                )
                raise CheckpointError(
                    f"checkpoint {where!r} has no entry {checkpoint_key!r} (key 'checkpoint_key'); {entries}"
                )
            node = node[part]
            walked.append(part)
    if not isinstance(node, Mapping):
        raise CheckpointError(
            f"checkpoint {where!r}: entry {checkpoint_key!r} (key 'checkpoint_key') is a {type(node).__name__}, "
            "not a state dict"
        )
    _check_tensors(node, where, checkpoint_key)
    return node


def _check_tensors(state: Mapping[Any, Any], where: str, entry: str | None) -> None:
    inside = f"entry {entry!r} is not a state dict: its " if entry is not None else ""
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"checkpoint {where!r}: {inside}key {key!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"checkpoint {where!r}: {inside}entry {key!r} is {article(type(value).__name__)}, not a tensor; "
                "a state dict holds only tensors (if the weights are nested under an entry, name it with "
                "checkpoint_key)"
            )


def _strip(state: Mapping[str, torch.Tensor], prefix: str, where: str) -> dict[str, torch.Tensor]:
    """``state`` with ``prefix`` removed from its keys; keys without it are left out."""
    if not prefix.endswith(".") and any(k.startswith(prefix + ".") for k in state):
        prefix += "."  # "module" means "module."
    kept: OrderedDict[str, torch.Tensor] = OrderedDict(
        (k[len(prefix) :], v) for k, v in state.items() if k.startswith(prefix)
    )
    if not kept:
        raise CheckpointError(
            f"checkpoint {where!r}: no key starts with strip_prefix {prefix!r}; its keys begin "
            + ", ".join(map(repr, list(state)[:_SHOWN]))
        )
    left_out = [k for k in state if not k.startswith(prefix)]
    if left_out:
        log.info(
            "checkpoint %s: strip_prefix %r leaves out the %d keys without it: %s",
            where,
            prefix,
            len(left_out),
            ", ".join(left_out[:_SHOWN]) + (" ..." if len(left_out) > _SHOWN else ""),
        )
    metadata = getattr(state, "_metadata", None)
    if isinstance(metadata, Mapping):  # module versions, by module path: move them with the keys
        module = prefix[:-1] if prefix.endswith(".") else prefix
        moved: OrderedDict[str, Any] = OrderedDict()
        for name, value in metadata.items():
            if name == module:
                moved[""] = value
            elif name.startswith(prefix):
                moved[name[len(prefix) :]] = value
        kept._metadata = moved  # type: ignore[attr-defined]
    return kept


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, architecture: str) -> None:
    """Load ``state`` into ``model`` strictly, explaining any mismatch.

    Parameters
    ----------
    model
        The freshly built model.
    state
        A state dict, e.g. from :func:`load_state_dict`.
    source
        Where ``state`` came from (a path), for the error message.
    architecture
        The architecture name ``model`` was built from, for the error message.

    Raises
    ------
    CheckpointError
        Keys are missing or unexpected, or tensors have the wrong shape. The message
        lists up to five of each, and says when the checkpoint's keys are the model's
        under a prefix (suggesting ``strip_prefix``), or the other way round.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {_shape(state[k])} vs model {_shape(expected[k])}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(_listing("missing keys (in the model, not in the checkpoint)", missing))
    if unexpected:
        problems.append(_listing("unexpected keys (in the checkpoint, not in the model)", unexpected))
    if mismatched:
        problems.append(_listing("shape mismatches", mismatched))
    if problems:
        raise CheckpointError(
            f"checkpoint {source!r} does not fit architecture {architecture!r}: "
            + "; ".join(problems)
            + _prefix_hint(missing, unexpected)
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        raise CheckpointError(
            f"checkpoint {source!r} does not fit architecture {architecture!r}: {_first_line(exc)}"
        ) from exc


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """Says so when the missing keys are the unexpected ones but for one common prefix."""
    prefix = _common_prefix(unexpected, missing)
    if prefix is not None:
        return (
            f". Every missing key is in the checkpoint under the prefix {prefix!r} (as DataParallel, Lightning "
            f'or a wrapping module saves them): give strip_prefix = "{prefix}" to remove it.'
        )
    prefix = _common_prefix(missing, unexpected)
    if prefix is not None:
        return (
            f". The checkpoint's keys are the model's without their common prefix {prefix!r}: the weights were "
            "saved from the inner module, so build an architecture whose modules are not wrapped, or save the "
            "weights with their prefix."
        )
    return ""


def _common_prefix(longer: list[str], shorter: list[str]) -> str | None:
    """The prefix ``p`` with ``p + key`` in ``longer`` for every key of ``shorter``, if there is one."""
    if not longer or not shorter:
        return None
    first, present = shorter[0], set(longer)
    candidates = {k[: -len(first)] for k in longer if len(k) > len(first) and k.endswith(first)}
    for prefix in sorted(candidates, key=len):
        if all(prefix + k in present for k in shorter):
            return prefix
    return None


def _shape(tensor: torch.Tensor) -> str:
    return str(tuple(tensor.shape))


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{len(items)} {title}: {shown}{more}"


def save_state_dict(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write a state dict atomically, creating parent directories.

    The file is written to a temporary file in the target directory and then moved
    into place with :func:`os.replace`, so readers see either the old file or the
    complete new one.

    Parameters
    ----------
    model_or_state
        A module (its ``state_dict()`` is saved) or a state dict.
    path
        Destination file.

    Returns
    -------
    Path
        ``path``.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    # Files hold contiguous CPU tensors: the same bytes whatever device or memory layout
    # (channels-last on the CPU, see mergescope.devices.place) the model ran in.
    if any(isinstance(v, torch.Tensor) and (v.device.type != "cpu" or not v.is_contiguous()) for v in state.values()):
        state = {k: v.cpu().contiguous() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


# Convolutions whose weight has its outputs first (a transposed convolution's has its inputs).
_HEADS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_class_count(
    model: nn.Module, state: Mapping[str, torch.Tensor], data: ImageDataset, source: str, data_source: object
) -> None:
    """Refuse a checkpoint whose classifier head has another number of outputs than ``data`` has classes.

    The head is the built model's last ``Linear`` / ``Conv`` layer, when it has one output
    per class of ``data``. Only a checkpoint that fits the model but for the number of
    that layer's outputs is refused here, with the classes of both; any other mismatch
    is left to :func:`~mergescope.checkpoints.load_into` to explain.
    """
    heads = [name for name, module in model.named_modules() if isinstance(module, _HEADS)]
    if not heads:
        return
    prefix = f"{heads[-1]}." if heads[-1] else ""
    expected = model.state_dict()
    weight, classes = f"{prefix}weight", list(data.classes)
    if weight not in expected or weight not in state or expected[weight].shape[0] != len(classes):
        return
    found = tuple(state[weight].shape)
    if found[0] == len(classes) or found[1:] != tuple(expected[weight].shape[1:]):
        return
    head = {weight, f"{prefix}bias"}
    if set(state) != set(expected) or any(
        k not in head and tuple(state[k].shape) != tuple(expected[k].shape) for k in expected
    ):
        return
    shown = ", ".join(classes[:10]) + (f", ... ({len(classes) - 10} more)" if len(classes) > 10 else "")
    has_classes = any(f.name == "classes" for f in getattr(type(data_source), "__attrs_attrs__", ()))
    fix = (
        "give the classes the model was trained on, in its order, with `classes = [...]` in [data]"
        if has_classes
        else "point [data] at the classes the model was trained on"
    )
    raise CheckpointError(
        f"checkpoint {source!r} has {found[0]} output classes ({weight} {'x'.join(map(str, found))}) "
        f"but the data has {len(classes)} classes ({shown}); {fix}"
    )
