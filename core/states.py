"""State dicts as values: checking that they combine, weighted sums, building a model.

Every merger works on state dicts (``model.state_dict()``): it checks that the models
share one architecture, combines their entries and loads the result into a copy of one
of them. Those three steps live here, shared by weight averaging, interpolation, the
aligners that merge, and the task-vector mergers of :mod:`mergescope.task_vectors`.

Which entries are combined
--------------------------
Floating entries (parameters, float buffers, BatchNorm running statistics) are summed
in float64 and cast back to their dtype, so a weight of exactly 1 on one model (and 0
on the others) gives its values back exactly. Integer buffers (BatchNorm's
``num_batches_tracked``) cannot be averaged: they are copied from the first state dict.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .batchnorm import reset_batchnorm
from .devices import float64_device

if TYPE_CHECKING:
    from .context import Context

__all__ = ["check_compatible", "check_finite", "float_keys", "average_states", "build_model"]


def check_compatible(states: Mapping[str, Mapping[str, Tensor]]) -> None:
    """Check that state dicts can be combined entry by entry.

    Parameters
    ----------
    states
        Model name -> state dict.

    Raises
    ------
    ValueError
        No state dicts, a model lacks an entry another has, an entry's shape differs
        between two models (the message names the first such entry, both shapes and both
        models), an entry is floating in one model and not in another, or a floating
        tensor holds NaN or inf (see :func:`check_finite`).
    """
    if not states:
        raise ValueError("no models to merge")
    names = list(states)
    first = names[0]
    reference = states[first]
    for other in names[1:]:
        state = states[other]
        missing = [key for key in reference if key not in state]
        if missing:
            raise ValueError(
                f"parameter {missing[0]!r} of model {first!r} is missing from model {other!r}; "
                "merged models must share one architecture"
            )
        extra = [key for key in state if key not in reference]
        if extra:
            raise ValueError(
                f"parameter {extra[0]!r} of model {other!r} is missing from model {first!r}; "
                "merged models must share one architecture"
            )
        for key, tensor in reference.items():
            theirs = state[key]
            if tuple(tensor.shape) != tuple(theirs.shape):
                raise ValueError(
                    f"parameter {key!r} has shape {tuple(tensor.shape)} in model {first!r} "
                    f"but {tuple(theirs.shape)} in model {other!r}"
                )
            if tensor.is_floating_point() != theirs.is_floating_point():
                raise ValueError(
                    f"parameter {key!r} is {tensor.dtype} in model {first!r} but {theirs.dtype} in model {other!r}"
                )
    check_finite(states)


def check_finite(states: Mapping[str, Mapping[str, Tensor]]) -> None:
    """Check that no floating entry of any state dict holds NaN or inf.

    Parameters
    ----------
    states
        Model name -> state dict.

    Raises
    ------
    ValueError
        Naming the first parameter (and its model) with a NaN or inf value.
    """
    for name, state in states.items():
        for key, tensor in state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"parameter {key!r} of model {name!r} holds NaN or inf values")


def float_keys(state: Mapping[str, Tensor], keys: Collection[str] | None = None) -> list[str]:
    """The floating entries of ``state`` among ``keys``.

    Parameters
    ----------
    state
        A state dict.
    keys
        The entries to consider (default: all of them).

    Returns
    -------
    list of str
        The floating ones, in the order of ``keys`` (of ``state`` when ``keys`` is None).

    Raises
    ------
    ValueError
        A key is not in ``state``.
    """
    if keys is None:
        return [k for k, t in state.items() if t.is_floating_point()]
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"parameter {missing[0]!r} is not in the state dict")
    return [k for k in keys if state[k].is_floating_point()]


def average_states(
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    keys: Collection[str] | None = None,
) -> dict[str, Tensor]:
    """Weighted sum ``sum_i w_i theta_i`` of state dicts, entry by entry.

    The one implementation of weight averaging and interpolation: the ``average`` and
    ``interpolation`` mergers, REPAIR's interpolation and the BatchNorm statistics of the
    task-vector mergers all call it.

    Parameters
    ----------
    states
        State dicts with the same keys and shapes (see :func:`check_compatible`).
    weights
        One weight per state dict, used as given: no normalisation, negative weights
        extrapolate (default: uniform ``1 / n``).
    keys
        The entries to return (default: every entry, a complete state dict).

    Returns
    -------
    dict
        A new state dict. Floating entries are summed in float64 and cast back to the
        first state dict's dtype (a weight of exactly 1 on one model and 0 elsewhere
        returns its values exactly); integer entries (``num_batches_tracked``) are
        copied from the first state dict.

    Raises
    ------
    ValueError
        No state dicts, or not one weight per state dict.
    """
    if not states:
        raise ValueError("no state dicts to average")
    if weights is None:
        weights = [1.0 / len(states)] * len(states)
    if len(weights) != len(states):
        raise ValueError(f"got {len(states)} state dicts but {len(weights)} weights")
    first = states[0]
    selected = list(first) if keys is None else list(keys)
    floating = set(float_keys(first, selected))
    out = {}
    for key in selected:
        tensor = first[key]
        if key not in floating:
            out[key] = tensor.detach().clone()
            continue
        wide = float64_device(tensor.device)
        total = torch.zeros(tensor.shape, dtype=torch.float64, device=wide)
        for state, weight in zip(states, weights):
            total += float(weight) * state[key].detach().to(device=wide, dtype=torch.float64)
        out[key] = total.to(device=tensor.device, dtype=tensor.dtype)
    return out


def build_model(
    template: nn.Module, state: Mapping[str, Tensor], context: Context | None = None, *, reset: bool = False
) -> nn.Module:
    """A copy of ``template`` holding ``state``, in evaluation mode.

    Parameters
    ----------
    template
        The module to copy (it is not modified).
    state
        A complete state dict for it.
    context
        Gives the data (and the progress bar) of a BatchNorm reset.
    reset
        Recompute the BatchNorm running statistics on ``context.data``
        (:func:`mergescope.batchnorm.reset_batchnorm`); nothing happens without data.

    Returns
    -------
    nn.Module
        The new model, in evaluation mode.
    """
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    if reset and context is not None and context.data is not None:
        reset_batchnorm(model, context.data, batch_size=context.batch_size, progress=context.progress)
    return model.eval()
