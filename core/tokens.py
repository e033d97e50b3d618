"""Token layers: what the activation contract records of a transformer's ``(N, T, D)`` outputs.

A recorded tensor with three dims is a *token layer*, read batch-first as ``(N, T, D)``:
``N`` images, ``T`` tokens, ``D`` channels (the units). A vision transformer's tokens are
its class token at position 0 followed by its ``h * w`` patch tokens, row by row. Vision
models have no one-dimensional convolutions worth recording, so every 3-D output is
taken for tokens; conv maps stay 4-D ``(N, C, H, W)``.

``tokens`` chooses what a token layer records (``[activations] tokens``, the ``tokens``
of :func:`mergescope.activations.collect` and :class:`mergescope.store.StoreSpec`):

- ``"mean"`` (default): the mean over all ``T`` tokens, class token included, dims
  ``("sample", "unit")``;
- ``"cls"``: the token at position 0, ``x[:, 0, :]``, dims ``("sample", "unit")``;
- ``"all"``: every token, dims ``("sample", "unit", "token")`` with the coord
  ``token = 0 .. T-1`` (:data:`TOKEN_DIMS`).

The mean is the default because it is defined for every token layer whatever the model
puts at position 0 (MLP-Mixers and average-pooled ViTs have no class token), it is the
token analogue of a conv map's spatial mean (so a pipeline of CNNs and ViTs reads alike),
and a class token is the same learned vector for every image until the first attention
block mixes the patches into it, so its units have no variance there.

Layouts a forward hook sees are put in this form by :func:`batch_first`:
:class:`torch.nn.MultiheadAttention` returns ``(output, weights)``, whose output is
recorded; modules built with ``batch_first=False`` (multi-head attention, the
transformer layers and stacks of :mod:`torch.nn`) return ``(T, N, D)``, which is
transposed. A 3-D tensor whose first dim is not the batch's size but whose second is
(a linear layer inside a ``batch_first=False`` block) is refused, naming the layer;
where ``T`` equals the batch size the two layouts cannot be told apart. A 4-D output (or
input) of a linear layer or a LayerNorm is channels-last, ``(N, H, W, C)`` (Swin and
ConvNeXt blocks apply them to permuted maps), and is read as a conv map ``(N, C, H, W)``;
other modules' 4-D tensors are taken as channels-first. :func:`restore_layout` undoes
:func:`batch_first`, for hooks that write an edited activation back into the network.

:func:`token_grid` lays a token map out on the patch grid, ``(..., token)`` ->
``(..., y, x)``, dropping the class token, for heatmaps of where a unit fires.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import xarray as xr
from torch import nn

from .errors import ConfigError, ContractError

__all__ = [
    "TOKENS",
    "DEFAULT_TOKENS",
    "TOKEN_DIMS",
    "batch_first",
    "restore_layout",
    "token_summary",
    "token_rows",
    "token_grid",
    "check_tokens",
    "require_token_layers",
]

#: What a token layer may record (see the module docstring).
TOKENS = ("cls", "mean", "all")
DEFAULT_TOKENS = "mean"
#: Dims of a token map (``tokens = "all"``).
TOKEN_DIMS = ("sample", "unit", "token")

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def check_tokens(tokens: object, where: str | None = "key 'tokens'") -> str:
    """Return ``tokens`` if it is one of :data:`TOKENS`; else a ``ConfigError`` whose message names ``'tokens'``."""
    if tokens not in TOKENS:
        raise ConfigError(
            f"'tokens' must be one of 'cls' (the class token), 'mean' (the mean over tokens) or 'all' (every "
            f"token), got {tokens!r}",
            where=where,
        )
    return str(tokens)


def require_token_layers(tokens: str, shapes: Mapping[str, Sequence[int]], recorded: str) -> None:
    """Refuse a ``tokens`` choice other than the default when no recorded layer is a token layer.

    ``shapes`` maps each recorded layer to its output's shape (batch-first), as seen in
    the first forward pass; ``recorded`` names what was recorded (``"model 'a'"``).
    The default is accepted everywhere, since a pipeline may mix CNNs and transformers.

    Raises
    ------
    ConfigError
        Naming the key ``tokens``, listing the layers and their shapes.
    """
    if tokens == DEFAULT_TOKENS or any(len(shape) == 3 for shape in shapes.values()):
        return
    listing = ", ".join(f"{layer} {tuple(shape)}" for layer, shape in shapes.items())
    raise ConfigError(
        f"tokens = {tokens!r} says what token layers, outputs (N, T, D), record, but no layer recorded of "
        f"{recorded} is one ({listing}); record a transformer's token layers, or remove 'tokens'",
        where="key 'tokens'",
    )


def _declared_batch_first(module: nn.Module) -> bool | None:
    """Whether ``module`` says its 3-D tensors are batch-first (``None``: it does not say)."""
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and len(module.layers):
        module = module.layers[0]
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        module = module.self_attn
    flag = getattr(module, "batch_first", None)
    return flag if isinstance(flag, bool) else None


def batch_first(
    module: nn.Module, value: Any, batch: int | None, layer: str, model_name: str = "model"
) -> torch.Tensor:
    """The tensor a hook records of ``module``'s output (or input) ``value``, batch-first.

    Parameters
    ----------
    module
        The hooked module.
    value
        What it returned (or its first input): a tensor, or the ``(output, weights)``
        pair of a :class:`torch.nn.MultiheadAttention`.
    batch
        The number of images of the forward pass, when known: a 3-D tensor is checked
        against it.
    layer, model_name
        Named in errors.

    Raises
    ------
    ConfigError
        The module returns a tuple (other than multi-head attention's), or a 3-D tensor
        whose second dim, not its first, is the batch (a ``(T, N, D)`` layout).
    """
    if isinstance(value, (tuple, list)):
        if isinstance(module, nn.MultiheadAttention) and value and isinstance(value[0], torch.Tensor):
            value = value[0]  # (output, attention weights or None)
        else:
            raise ConfigError(
                f"layer {layer!r} of model {model_name!r} ({type(module).__name__}) returns a "
                f"{type(value).__name__}, not a tensor; record a module that returns one tensor (the module "
                "after it, or one inside it)",
                where="key 'layers'",
            )
    if not isinstance(value, torch.Tensor):
        raise ConfigError(
            f"layer {layer!r} of model {model_name!r} gives a {type(value).__name__}, not a tensor; record a "
            "module whose output is one tensor",
            where="key 'layers'",
        )
    if value.ndim == 4 and _channels_last(module):
        return value.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if value.ndim == 3 and _declared_batch_first(module) is False:
        return value.transpose(0, 1)  # (T, N, D) -> (N, T, D)
    if value.ndim == 3 and batch is not None and value.shape[0] != batch and value.shape[1] == batch:
        raise ConfigError(
            f"layer {layer!r} of model {model_name!r} outputs {tuple(value.shape)} for a batch of {batch} images: "
            "tokens first, (T, N, D), as inside a transformer built with batch_first=False. Token layers are "
            "read batch-first (N, T, D): record the enclosing transformer layer (its batch_first flag is "
            "honoured) or build the model with batch_first=True",
            where="key 'layers'",
        )
    return value


def _channels_last(module: nn.Module) -> bool:
    """Whether ``module`` acts on the last dim of what it reads and writes (a linear layer, a LayerNorm)."""
    return isinstance(module, (nn.Linear, nn.LayerNorm))


def restore_layout(module: nn.Module, recorded: torch.Tensor, original: Any) -> Any:
    """``recorded`` (in the layout :func:`batch_first` gives) put back in the layout of ``original``.

    Parameters
    ----------
    module
        The hooked module.
    recorded
        An activation in the recorded layout, e.g. an edited copy of what was recorded.
    original
        What the module returned (or its first input), which ``recorded`` replaces.

    Returns
    -------
    The value to return from the hook: ``(recorded, weights)`` for multi-head attention's
    pair, transposed back to ``(T, N, D)`` or permuted back to ``(N, H, W, C)`` where
    :func:`batch_first` changed the layout.
    """
    if isinstance(original, (tuple, list)) and isinstance(module, nn.MultiheadAttention):
        return (restore_layout(module, recorded, original[0]), *original[1:])
    if recorded.ndim == 4 and _channels_last(module):
        return recorded.permute(0, 2, 3, 1)
    if recorded.ndim == 3 and _declared_batch_first(module) is False:
        return recorded.transpose(0, 1)
    return recorded


def token_summary(output: torch.Tensor, tokens: str) -> torch.Tensor:
    """A token layer's ``(N, T, D)`` output as recorded: ``(N, D)`` for ``"cls"`` and ``"mean"``, ``(N, D, T)``
    for ``"all"``."""
    if tokens == "cls":
        return output[:, 0, :]
    if tokens == "mean":
        return output.mean(dim=1)
    check_tokens(tokens)  # "all", or an error naming the choices
    return output.transpose(1, 2)  # units before tokens, as units before y, x in conv maps


def token_rows(output: torch.Tensor) -> torch.Tensor:
    """Every token of a ``(N, T, D)`` output as a row of statistics: ``(N * T, D)``, each image's tokens together."""
    return output.reshape(-1, output.shape[-1])


def _grid_shape(tokens: int, prefix: int, shape: tuple[int, int] | None) -> tuple[int, int]:
    patches = tokens - prefix
    if shape is not None:
        h, w = (int(s) for s in shape)
        if h * w != patches:
            raise ContractError(
                f"token_grid: {tokens} tokens less {prefix} leading token(s) are {patches} patches, not "
                f"the {h} x {w} = {h * w} of shape={shape}"
            )
        return h, w
    side = math.isqrt(max(patches, 0))
    if patches <= 0 or side * side != patches:
        raise ContractError(
            f"token_grid: {tokens} tokens less {prefix} leading token(s) leave {patches} patch tokens, which is "
            "not a square grid; give shape=(h, w), or the number of leading non-patch tokens as prefix"
        )
    return side, side


def token_grid(
    values: xr.DataArray | ArrayT,
    *,
    prefix: int = 1,
    shape: tuple[int, int] | None = None,
    axis: int = -1,
) -> xr.DataArray | ArrayT:
    """A token map laid out on the patch grid: tokens ``(..., T)`` -> ``(..., y, x)``, leading tokens dropped.

    A vision transformer's tokens are ``prefix`` leading tokens (its class token) followed
    by ``h * w`` patch tokens in row-major order, the order of its patch embedding's
    output positions, so patch token ``prefix + i * w + j`` covers the patch at row ``i``,
    column ``j`` of the image.

    Parameters
    ----------
    values
        A DataArray with a ``token`` dim (e.g. an activation recorded with
        ``tokens = "all"``, dims ``("sample", "unit", "token")``), or a NumPy array or
        torch tensor with the tokens on ``axis``.
    prefix
        Leading tokens that are not patches: 1 for a class token, 0 for models without
        one, more with register or distillation tokens.
    shape
        ``(h, w)`` of the patch grid; default: the square grid of ``T - prefix`` tokens.
    axis
        The token axis of an array (ignored for a DataArray, which names its ``token`` dim).

    Returns
    -------
    xarray.DataArray, numpy.ndarray or torch.Tensor
        Of the type given. A DataArray has dims ``y`` and ``x`` (coords ``0 .. h-1`` and
        ``0 .. w-1``) where ``token`` was, its other coords kept: a token map of the
        activation contract becomes a ``("sample", "unit", "y", "x")`` map.

    Raises
    ------
    ContractError
        The patches do not form the grid (not a square without ``shape``), ``prefix``
        is negative, or a DataArray has no ``token`` dim.
    """
    if prefix < 0:
        raise ContractError(f"token_grid: prefix must be 0 or more leading tokens, got {prefix}")
    if isinstance(values, xr.DataArray):
        return _labelled_grid(values, prefix, shape)
    axis = axis % values.ndim
    h, w = _grid_shape(values.shape[axis], prefix, shape)
    kept = values[(slice(None),) * axis + (slice(prefix, None),)]
    return kept.reshape(*kept.shape[:axis], h, w, *kept.shape[axis + 1 :])


def _labelled_grid(values: xr.DataArray, prefix: int, shape: tuple[int, int] | None) -> xr.DataArray:
    """:func:`token_grid` of a DataArray: ``token`` replaced by ``y``, ``x`` in place, other coords kept."""
    if "token" not in values.dims:
        raise ContractError(f"token_grid: expected a DataArray with a 'token' dim, got dims {values.dims}")
    h, w = _grid_shape(values.sizes["token"], prefix, shape)
    patches = values.isel(token=slice(prefix, None)).drop_vars("token", errors="ignore")
    where = values.dims.index("token")
    dims: list[Hashable] = [*values.dims[:where], "y", "x", *values.dims[where + 1 :]]
    data = patches.data.reshape(*patches.shape[:where], h, w, *patches.shape[where + 1 :])
    coords: dict[Hashable, Any] = {k: v.variable for k, v in patches.coords.items() if "token" not in v.dims}
    coords.update({"y": np.arange(h), "x": np.arange(w)})
    return xr.DataArray(data, dims=dims, coords=coords, name=values.name, attrs=values.attrs)
