"""Safe checkpoint I/O.

Checkpoints are plain ``state_dict`` files. They are always read with
``torch.load(..., weights_only=True)`` so that opening a checkpoint can never run code
hidden in a pickle, and they are written atomically so that an interrupted save never
leaves a truncated file where a cache or a pipeline expects a complete one.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError
from .keys import state_digest  # re-exported: fingerprints once lived here
from .storage import atomic_path

__all__ = ["load_state_dict", "load_into", "save_state_dict", "state_digest"]

# How many keys of each kind of mismatch an error message lists.
_SHOWN = 5

# Keys under which training scripts commonly nest the state dict.
_WRAPPER_KEYS = ("state_dict", "model")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a checkpoint file without unpickling arbitrary objects.

    Parameters
    ----------
    path
        A file written by ``torch.save``. It may hold a plain state dict, or a dict
        wrapping one under ``"state_dict"`` or ``"model"`` (as many training scripts
        save it, next to optimizer state or metadata).

    Returns
    -------
    dict[str, torch.Tensor]
        Parameter and buffer tensors by name, on the CPU.

    Raises
    ------
    CheckpointError
        The file is missing or unreadable, holds objects other than tensors (it is
        refused rather than unpickled), or is not a state dict.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global it does not know: the file would have to run
        # arbitrary code to be loaded, so it is not loaded at all.
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds non-tensor objects and is refused for safety "
            "(loading it would unpickle arbitrary code). Re-save only the weights, e.g. "
            f"torch.save(model.state_dict(), path). Details: {_first_line(exc)}"
        ) from exc
    except Exception as exc:
        # A truncated or foreign file fails deep inside torch with whatever error the
        # parser hits first (RuntimeError, EOFError, IndexError, ...).
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read as a torch checkpoint: {_first_line(exc)}"
        ) from exc
    return _as_state_dict(payload, str(path))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _as_state_dict(payload: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(payload, Mapping):
        raise CheckpointError(
            f"checkpoint {where!r} holds a {type(payload).__name__}, not a state dict "
            "(a mapping of parameter names to tensors)"
        )
    for wrapper in _WRAPPER_KEYS:
        inner = payload.get(wrapper)
        if isinstance(inner, Mapping):
            payload = inner
            break
    for key, value in payload.items():
        if not isinstance(key, str):
            raise CheckpointError(f"checkpoint {where!r}: state dict key {key!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"checkpoint {where!r}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                "a state dict holds only tensors"
            )
    # Keep an OrderedDict as is: its ``_metadata`` carries module versions that
    # ``nn.Module.load_state_dict`` uses to upgrade old layouts.
    return payload if isinstance(payload, dict) else dict(payload)


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
        lists up to five of each.
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
            f"checkpoint {source!r} does not fit architecture {architecture!r}: " + "; ".join(problems)
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        raise CheckpointError(
            f"checkpoint {source!r} does not fit architecture {architecture!r}: {_first_line(exc)}"
        ) from exc


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
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)
