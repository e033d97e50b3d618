"""The op tables: which torch functions, tensor methods and modules the analyzer knows.

Each table names one family of operations that share a rule for channels: activations
and elementwise arithmetic, sums (which also join residual streams), methods that only
change dtype or storage, reshapes, reductions, cat, split, pooling, interpolation,
convolutions and their transposes, and the module classes of the same families. The
analyzer's dispatchers (:mod:`.analyzer`) look a traced node's target up here and hand
the node to the handler of its family (:mod:`.handlers`), so supporting another op
that follows an existing rule is a change to this module alone. :data:`SUPPORTED` is
the summary quoted in every :class:`~mergescope.groups.UnsupportedLayerError`.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _fns(module: Any, names: Iterable[str]) -> set[Any]:
    """The attributes of ``module`` named in ``names`` that exist in this torch version."""
    return {getattr(module, n) for n in names if hasattr(module, n)}


_ACTIVATION_NAMES = (
    "relu relu_ relu6 leaky_relu leaky_relu_ elu elu_ selu selu_ celu celu_ gelu silu mish hardswish "
    "hardsigmoid hardtanh hardtanh_ softplus softsign logsigmoid tanhshrink softshrink hardshrink "
    "threshold threshold_ rrelu rrelu_ sigmoid tanh dropout dropout1d dropout2d dropout3d alpha_dropout "
    "feature_alpha_dropout softmax log_softmax softmin normalize"
).split()
_TORCH_ELEMENTWISE_NAMES = (
    "relu relu_ sigmoid sigmoid_ tanh tanh_ exp log abs neg negative sqrt rsqrt square clamp clamp_ clip "
    "sign erf softmax log_softmax add sub subtract mul multiply div divide true_divide maximum minimum "
    "where pow lerp addcmul addcdiv masked_fill dropout selu celu hardshrink threshold gt ge lt le eq ne "
    "greater greater_equal less less_equal"
).split()
_ELEMENTWISE_FUNCTIONS = (
    _fns(F, _ACTIVATION_NAMES)
    | _fns(torch, _TORCH_ELEMENTWISE_NAMES)
    | {
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.floordiv,
        operator.pow,
        operator.neg,
        operator.pos,
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.abs,
        operator.gt,
        operator.ge,
        operator.lt,
        operator.le,
        operator.eq,
        operator.ne,
    }
)
_ELEMENTWISE_METHODS = set(
    (
        "relu relu_ sigmoid sigmoid_ tanh tanh_ exp exp_ log abs neg sqrt rsqrt square clamp clamp_ clip "
        "sign erf softmax log_softmax pow add add_ sub sub_ mul mul_ div div_ maximum minimum masked_fill "
        "masked_fill_ where lerp addcmul addcdiv hardtanh_ gelu silu gt ge lt le eq ne"
    ).split()
)
# Methods that return their receiver with another dtype / device / storage.
_SAME_METHODS = set(
    "contiguous clone detach float double half bfloat16 to type type_as cpu cuda requires_grad_".split()
)
_SUM_FUNCTIONS = {operator.add, operator.sub, operator.iadd, operator.isub} | _fns(torch, ["add", "sub", "subtract"])
_RESHAPE_FUNCTIONS = _fns(torch, ["flatten", "reshape", "squeeze", "unsqueeze", "unflatten", "ravel"])
_RESHAPE_METHODS = set("view reshape flatten squeeze unsqueeze unflatten view_as reshape_as ravel".split())
_REDUCE_NAMES = set("mean sum amax amin max min std var logsumexp prod norm nansum nanmean".split())
_REDUCE_FUNCTIONS = _fns(torch, _REDUCE_NAMES)
_CAT_FUNCTIONS = _fns(torch, ["cat", "concat", "concatenate"])
_SPLIT_NAMES = {"split", "chunk", "unbind", "tensor_split"}
_SPLIT_FUNCTIONS = _fns(torch, _SPLIT_NAMES)
_POOL_FUNCTIONS: dict[Any, int] = {}
for _name in dir(F):
    if ("pool" in _name) and _name[-2:] in ("1d", "2d", "3d"):
        _POOL_FUNCTIONS[getattr(F, _name)] = int(_name[-2])
for _name in dir(torch):
    if ("pool" in _name) and _name[-2:] in ("1d", "2d", "3d") and callable(getattr(torch, _name)):
        _POOL_FUNCTIONS.setdefault(getattr(torch, _name), int(_name[-2]))
del _name
_INTERPOLATE_FUNCTIONS = _fns(F, ["interpolate", "upsample", "upsample_nearest", "upsample_bilinear"])
_CONV_FUNCTIONS = _fns(torch, ["conv1d", "conv2d", "conv3d"]) | _fns(F, ["conv1d", "conv2d", "conv3d"])
_CONV_TRANSPOSE_FUNCTIONS = _fns(torch, ["conv_transpose1d", "conv_transpose2d", "conv_transpose3d"]) | _fns(
    F, ["conv_transpose1d", "conv_transpose2d", "conv_transpose3d"]
)

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, n)
    for n in (
        "ReLU ReLU6 LeakyReLU ELU SELU CELU GELU SiLU Mish Sigmoid Tanh Hardswish Hardsigmoid Hardtanh "
        "Softplus Softsign Softshrink Hardshrink Tanhshrink Threshold LogSigmoid RReLU Identity Dropout "
        "Dropout1d Dropout2d Dropout3d AlphaDropout FeatureAlphaDropout Softmax LogSoftmax Softmin Softmax2d"
    ).split()
    if hasattr(nn, n)
)
_POOL_MODULES: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, n) for n in dir(nn) if "Pool" in n and n[-2:] in ("1d", "2d", "3d") and isinstance(getattr(nn, n), type)
)
_PAD_MODULES: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, n) for n in dir(nn) if n.endswith(("Pad1d", "Pad2d", "Pad3d")) and isinstance(getattr(nn, n), type)
)
_UPSAMPLE_MODULES: tuple[type[nn.Module], ...] = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)

SUPPORTED = (
    "convolutions with groups=1 or depthwise, linear, embedding, batch/instance norm, layer norm, "
    "group norm with 1 or C groups, PReLU, elementwise activations and arithmetic, pooling, padding, "
    "interpolation, dropout, cat/stack/split, flatten/view/reshape, transpose/permute, reductions, "
    "nn.MultiheadAttention, attention heads (a reshape into heads, scaled_dot_product_attention, q @ k^T, "
    "softmax, scores @ v)"
)
