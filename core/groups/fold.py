"""LayerNorms without their affine parameters: :func:`fold_layernorms`, and what orthogonal maps need of them.

A LayerNorm computes ``y = g * n(x) + b`` with ``n(x) = (x - mean(x)) / std(x)`` over the
channels. When only linear layers read ``y`` (a pre-LN transformer's attention and MLP
input projections, its head), the affine part moves into them exactly:
``W y + c = (W diag(g)) n(x) + (W b + c)``, leaving a LayerNorm with ``g = 1, b = 0``.

Why it matters: an affine-free LayerNorm commutes with every orthogonal map ``Q`` that
keeps the all-ones direction (``Q 1 = 1``): ``Q x`` has the mean of ``x`` and the norm of
its centred part, so ``n(Q x) = Q n(x)``. After folding, the residual stream of a pre-LN
transformer is therefore symmetric under such maps, not only under permutations
(Theus et al. 2025, Generalized Linear Mode Connectivity for Transformers), and
:func:`~mergescope.groups.apply_linear` transforms it exactly.

Readers are found by tracing (as channel groups are): between the LayerNorm and a linear
layer only token selections and token means (``x[:, 0]``, ``x.mean(1)``), dropout and
identities may stand, operations that act on every channel alike. A LayerNorm with any
other reader (its output is the residual stream itself, as open_clip's ``ln_pre``; a
convolution; an elementwise product) keeps its affine parameters.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import fx, nn

from .model import ChannelGroup
from .trace import _analyse

_PASS_MODULES = (nn.Dropout, nn.Identity)


def layernorm_paths(model: nn.Module, group: ChannelGroup) -> list[str]:
    """The LayerNorms whose affine parameters are among the group's axes (module paths, in order)."""
    norms = {name for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    return list(dict.fromkeys(p for p in (ax.param.rpartition(".")[0] for ax in group.axes) if p in norms))


def affine_free(model: nn.Module, paths: Sequence[str]) -> bool:
    """Whether every LayerNorm at ``paths`` has one scale and one shift for all channels (as after folding)."""
    for path in paths:
        norm = cast(nn.LayerNorm, model.get_submodule(path))
        for p in (norm.weight, norm.bias):
            if p is not None and p.numel() and not bool(torch.all(p == p.reshape(-1)[0])):
                return False
    return True


def fold_layernorms(model: nn.Module, example_input: Any) -> tuple[nn.Module, list[str]]:
    """Return a copy of ``model`` whose LayerNorms read only by linear layers have ``g = 1, b = 0``.

    Parameters
    ----------
    model
        The network; it is not modified.
    example_input
        A batch the model accepts, as for :func:`~mergescope.groups.channel_groups`.

    Returns
    -------
    folded
        The copy, computing the same function (to rounding).
    paths
        The LayerNorms folded, in graph order. The others keep their parameters: a reader
        other than a linear layer (or a linear layer also called elsewhere, or without a
        bias where the shift is not zero) stands in the way.
    """
    gm = _analyse(model, example_input, fx.Tracer()).gm
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    new = copy.deepcopy(model)
    folded = []
    sites: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        path = _norm_path(node, new)
        if path is not None:
            sites.setdefault(path, []).append(node)
    for path, nodes in sites.items():
        norm = cast(nn.LayerNorm, new.get_submodule(path))
        scale: torch.Tensor | None = norm.weight
        if scale is None or len(norm.normalized_shape) != 1:
            continue
        reads: list[tuple[nn.Module, list[int]]] = []
        if not all(_linear_readers(n, new, calls, reads) for n in nodes):
            continue
        shift: torch.Tensor | None = norm.bias
        if shift is not None and bool(shift.any()) and any(_bias(m) is None for m, _ in reads):
            continue
        with torch.no_grad():
            for module, parts in reads:
                _fold_into(module, parts, scale.detach().clone(), None if shift is None else shift.detach().clone())
            scale.fill_(1.0)
            if shift is not None:
                shift.zero_()
        folded.append(path)
    return new, folded


def _norm_path(node: fx.Node, model: nn.Module) -> str | None:
    """The LayerNorm module a node applies: a call of it, or ``F.layer_norm`` with its parameters (as timm traces)."""
    if node.op == "call_module":
        target = str(node.target)
        return target if isinstance(model.get_submodule(target), nn.LayerNorm) else None
    if node.op == "call_function" and node.target is nn.functional.layer_norm:
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        if isinstance(weight, fx.Node) and weight.op == "get_attr" and str(weight.target).endswith(".weight"):
            path = str(weight.target).rpartition(".")[0]
            if isinstance(model.get_submodule(path), nn.LayerNorm):
                return path
    return None


def _linear_readers(node: fx.Node, model: nn.Module, calls: Counter, reads: list[tuple[nn.Module, list[int]]]) -> bool:
    """Collect the linear layers that read ``node`` (the LayerNorm's output, or a token selection of it)."""
    if not node.users:
        return False
    for user in node.users:
        if _reads_metadata(user):
            continue  # x.shape, x.size(): no value read
        if user.op == "call_module":
            module = model.get_submodule(str(user.target))
            if isinstance(module, _PASS_MODULES):
                if not _linear_readers(user, model, calls, reads):
                    return False
                continue
            if calls[user.target] != 1:
                return False  # folding would change its other calls
            if isinstance(module, nn.Linear) and user.args[:1] == (node,):
                reads.append((module, [0]))
            elif isinstance(module, nn.MultiheadAttention):
                args = list(user.args[:3]) + [user.kwargs.get(k) for k in ("query", "key", "value")[len(user.args) :]]
                parts = [i for i, a in enumerate(args) if a is node]
                others = list(user.args[3:]) + [v for k, v in user.kwargs.items() if k not in ("query", "key", "value")]
                if any(a is None for a in args) or any(a is node for a in others):
                    return False
                reads.append((module, parts))
            else:
                return False
        elif _keeps_channels(user, node):
            if not _linear_readers(user, model, calls, reads):
                return False
        else:
            return False
    return True


def _reads_metadata(user: fx.Node) -> bool:
    """Whether ``user`` reads only a tensor's shape, dtype or device."""
    if user.op == "call_function" and user.target is getattr:
        return user.args[1] in ("shape", "dtype", "device", "ndim")
    return user.op == "call_method" and user.target in ("size", "dim")


def _keeps_channels(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` selects or averages tokens of ``node`` and leaves every channel (the last dim) as it is."""
    meta_in, meta_out = node.meta.get("tensor_meta"), user.meta.get("tensor_meta")
    if meta_in is None or meta_out is None or not hasattr(meta_out, "shape"):
        return False
    ndim, last = len(meta_in.shape), meta_in.shape[-1]
    if len(meta_out.shape) == 0 or meta_out.shape[-1] != last or user.args[:1] != (node,):
        return False
    if user.op == "call_function" and user.target is operator.getitem:
        index = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
        return Ellipsis not in index and len(index) < ndim
    if user.op == "call_method" and user.target == "contiguous":
        return True
    if (user.op, user.target) in (("call_method", "mean"), ("call_function", torch.mean)):
        given = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        dims = (given,) if isinstance(given, int) else tuple(given) if isinstance(given, (tuple, list)) else ()
        return bool(dims) and all(isinstance(d, int) and d % ndim != ndim - 1 for d in dims)
    return False


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = module.in_proj_bias if isinstance(module, nn.MultiheadAttention) else module.bias
    return cast("torch.Tensor | None", bias)


def _fold_into(module: nn.Module, parts: list[int], scale: torch.Tensor, shift: torch.Tensor | None) -> None:
    """In place: ``W <- W diag(scale)`` and ``c <- c + W shift`` for the given parts of a linear or attention input."""
    blocks: list[tuple[torch.Tensor, torch.Tensor | None]]
    if isinstance(module, nn.Linear):
        blocks = [(module.weight, module.bias)]
    else:
        attention = cast(nn.MultiheadAttention, module)
        size = attention.embed_dim
        packed: torch.Tensor | None = attention.in_proj_bias
        if attention._qkv_same_embed_dim:
            weights = [attention.in_proj_weight[i * size : (i + 1) * size] for i in parts]
        else:
            separate = (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
            weights = [separate[i] for i in parts]
        blocks = [(w, None if packed is None else packed[i * size : (i + 1) * size]) for w, i in zip(weights, parts)]
    for weight, bias in blocks:
        if shift is not None and bias is not None:
            bias.add_(weight @ shift.to(weight.dtype))
        weight *= scale.to(weight.dtype)[None, :]


def is_centred_orthogonal(t: np.ndarray, atol: float = 1e-6) -> bool:
    """Whether ``t`` is orthogonal and maps the all-ones vector to itself (what an affine-free LayerNorm commutes with)."""
    t = np.asarray(t, dtype=np.float64)
    n = t.shape[0]
    return bool(
        t.shape == (n, n)
        and np.allclose(t @ t.T, np.eye(n), atol=atol * max(1, n))
        and np.allclose(t @ np.ones(n), np.ones(n), atol=atol * max(1, n))
    )
