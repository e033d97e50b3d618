"""The torch.fx analyzer: one walk over a traced graph that follows every channel space.

:class:`_Analyzer` visits the nodes in graph order. Its dispatchers
(:meth:`~_Analyzer.call_function`, :meth:`~_Analyzer.call_method`,
:meth:`~_Analyzer.call_module`) look each node's target up in the op tables
(:mod:`.ops`) and hand it to an op handler (:mod:`.handlers`, its base class, itself
built on the walk's state and helpers in :mod:`.state`). :meth:`~_Analyzer.finish`
then turns the union-find of channel spaces into
:class:`~mergescope.groups.ChannelGroup`\\ s, or raises an
:class:`~mergescope.groups.UnsupportedLayerError` that names the node at fault. The
functions around the class describe nodes, name groups and word errors.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from .handlers import _Handlers
from .model import Axis, ChannelGroup, UnsupportedLayerError
from .ops import (
    _CAT_FUNCTIONS,
    _CONV_FUNCTIONS,
    _CONV_TRANSPOSE_FUNCTIONS,
    _ELEMENTWISE_FUNCTIONS,
    _ELEMENTWISE_METHODS,
    _ELEMENTWISE_MODULES,
    _INTERPOLATE_FUNCTIONS,
    _PAD_MODULES,
    _POOL_FUNCTIONS,
    _POOL_MODULES,
    _REDUCE_FUNCTIONS,
    _REDUCE_NAMES,
    _RESHAPE_FUNCTIONS,
    _RESHAPE_METHODS,
    _SAME_METHODS,
    _SPLIT_FUNCTIONS,
    _SPLIT_NAMES,
    _UPSAMPLE_MODULES,
    SUPPORTED,
)
from .values import _OTHER, _common_prefix, _fetch, _fetch_state, _flatten, _Problem, _Tensor


def _describe(node: fx.Node, module: nn.Module | None = None) -> str:
    """What ``node`` does, as error messages name it: ``call_function torch.roll``, ``call_module conv1 (Conv2d)``."""
    if node.op == "call_module":
        kind = type(module).__name__ if module is not None else "module"
        return f"call_module {node.target} ({kind})"
    if node.op == "call_method":
        return f"call_method .{node.target}()"
    if node.op == "call_function":
        target = node.target
        name = getattr(target, "__name__", repr(target))
        if getattr(torch, name, None) is target:
            owner = "torch"
        elif getattr(F, name, None) is target:
            owner = "torch.nn.functional"
        elif getattr(operator, name, None) is target:
            owner = "operator"
        else:
            owner = getattr(target, "__module__", None) or ""
        return f"call_function {owner + '.' if owner else ''}{name}"
    return f"{node.op} {node.target}"


class _Analyzer(_Handlers):
    """Walk a traced graph once, following channel spaces through every node."""

    # --------------------------------------------------------------------- run

    def run(self) -> list[ChannelGroup]:
        """Interpret every node in graph order, pin the parameters that uninterpreted ops read, then :meth:`finish`."""
        for i, node in enumerate(self.gm.graph.nodes):
            self.node, self.order, self.claimed = node, i, set()
            module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
            self.desc = _describe(node, module)
            self.heads_handled = False
            value = self.dispatch(node, module)
            inputs = list(_flatten(self.value(list(node.args) + list(node.kwargs.values()))))
            if not self.heads_handled and any(isinstance(v, _Tensor) and v.heads is not None for v in inputs):
                # Only the handlers that know attention heads may pass them on.
                value = self.problem(inputs, "does not know how to treat attention heads")
            self.env[node] = value
            if node.op in ("call_function", "call_method", "call_module"):
                # A parameter read by an operation we do not interpret must not move.
                for v in _flatten(self.value(list(node.args) + list(node.kwargs.values()))):
                    if isinstance(v, _Tensor) and v.param is not None and v.param not in self.claimed:
                        self.pin(v.param, "uses this parameter in a way whose effect on channels is unknown")
        return self.finish()

    def dispatch(self, node: fx.Node, module: nn.Module | None) -> Any:
        """The value of ``node``: inputs and attributes are read here, the output fixes what it returns,
        and calls go to :meth:`call_function`, :meth:`call_method` or :meth:`call_module`.
        """
        if node.op == "placeholder":
            return self.meta()
        if node.op == "get_attr":
            attr = _fetch(self.gm, cast(str, node.target))
            if isinstance(attr, torch.Tensor):
                return _Tensor(tuple(attr.shape), None, self.canon(attr), tuple(attr.shape))
            return _OTHER
        if node.op == "output":
            for v in _flatten(self.value(node.args)):
                if isinstance(v, _Tensor):
                    if v.layout is not None:
                        self.fix(v.layout)  # the logits (and any returned map) stay in place
                        for p in v.layout.parts:
                            self.spaces.returned[p.space] = True
                    if v.param is not None:
                        self.pin(v.param, "returns this parameter")
            return _OTHER
        if node.op == "call_module":
            return self.call_module(cast(nn.Module, module))  # set for every call_module node
        if node.op == "call_function":
            return self.call_function(node.target)
        if node.op == "call_method":
            return self.call_method(cast(str, node.target))
        return self.unknown()

    # ------------------------------------------------------------ dispatchers

    def call_function(self, target: Any) -> Any:
        """Hand a ``call_function`` node (torch, ``torch.nn.functional`` or ``operator``) to its handler."""
        if target is operator.getitem:
            return self.getitem()
        if target is getattr:
            if self.arg(1, "name") in ("shape", "dtype", "device", "ndim", "is_cuda", "layout"):
                return _OTHER
            return self.unknown()
        if target in _CONV_FUNCTIONS or target in _CONV_TRANSPOSE_FUNCTIONS:
            weight = self.param_name(self.arg(1, "weight"))
            bias = self.param_name(self.arg(2, "bias"))
            groups = self.arg(6, "groups", 1)
            return self.conv(
                self.value(self.arg(0, "input")), weight, bias, groups, target in _CONV_TRANSPOSE_FUNCTIONS
            )
        if target is F.linear:
            weight = self.param_name(self.arg(1, "weight"))
            bias = self.param_name(self.arg(2, "bias"))
            return self.linear(self.value(self.arg(0, "input")), weight, bias)
        if target is F.batch_norm or target is F.instance_norm:
            x = self.value(self.arg(0, "input"))
            keys = ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))
            names = [self.param_name(self.arg(i, k)) for i, k in keys]
            dim = 1 if target is F.batch_norm or (isinstance(x, _Tensor) and len(x.shape) > 2) else 0
            return self.per_channel(x, dim, names, "instance/batch norm")
        if target in (F.layer_norm, getattr(torch, "layer_norm", None)):
            shape = self.arg(1, "normalized_shape")
            k = 1 if isinstance(shape, int) else len(shape)
            names = [self.param_name(self.arg(2, "weight")), self.param_name(self.arg(3, "bias"))]
            return self.layer_norm(self.value(self.arg(0, "input")), k, names)
        if target in (F.group_norm, getattr(torch, "group_norm", None)):
            names = [self.param_name(self.arg(2, "weight")), self.param_name(self.arg(3, "bias"))]
            return self.group_norm(self.value(self.arg(0, "input")), self.arg(1, "num_groups"), names)
        if target is F.prelu:
            x = self.value(self.arg(0, "input"))
            w = self.value(self.arg(1, "weight"))
            count = math.prod(w.shape) if isinstance(w, _Tensor) else 1
            return self.prelu(x, self.param_name(self.arg(1, "weight")), count)
        if target is F.embedding:
            return self.embedding(self.value(self.arg(0, "input")), self.param_name(self.arg(1, "weight")))
        if target is F.scaled_dot_product_attention:
            q, k, v = (self.value(self.arg(i, n)) for i, n in enumerate(("query", "key", "value")))
            return self.attention(q, k, v, self.value(self.arg(3, "attn_mask")))
        if target in (torch.matmul, operator.matmul):
            return self.matmul(self.value(self.arg(0, "input")), self.value(self.arg(1, "other")))
        if target in _ELEMENTWISE_FUNCTIONS:
            return self.elementwise()
        if target in _RESHAPE_FUNCTIONS:
            return self.reshape(self.value(self.arg(0, "input")))
        if target in _REDUCE_FUNCTIONS:
            return self.reduce()
        if target in _CAT_FUNCTIONS:
            return self.cat(self.value(self.arg(0, "tensors")), self.arg(1, "dim", 0))
        if target is torch.stack:
            return self.stack(self.value(self.arg(0, "tensors")), self.arg(1, "dim", 0))
        if target in _SPLIT_FUNCTIONS:
            return self.split(getattr(target, "__name__", ""))
        if target in _POOL_FUNCTIONS:
            return self.spatial(self.value(self.arg(0, "input")), _POOL_FUNCTIONS[target])
        if target in _INTERPOLATE_FUNCTIONS:
            x = self.value(self.arg(0, "input"))
            return self.spatial(x, len(x.shape) - 2 if isinstance(x, _Tensor) else 0)
        if target is F.pad:
            pad = self.arg(1, "pad")
            return self.spatial(self.value(self.arg(0, "input")), len(pad) // 2)
        if target in (torch.transpose, getattr(torch, "swapaxes", None), getattr(torch, "swapdims", None)):
            return self.transpose(self.value(self.arg(0, "input")), self.arg(1, "dim0"), self.arg(2, "dim1"))
        if target is torch.permute:
            return self.permute_dims(self.value(self.arg(0, "input")), self.arg(1, "dims"))
        if target is torch.movedim:
            return self.movedim(self.value(self.arg(0, "input")), self.arg(1, "source"), self.arg(2, "destination"))
        if target is torch.t:
            return self.transpose(self.value(self.arg(0, "input")), 0, 1)
        if target in (torch.roll, torch.flip):
            dims = self.arg(2, "dims") if target is torch.roll else self.arg(1, "dims")
            return self.along(self.value(self.arg(0, "input")), dims)
        owner = getattr(target, "__module__", None) or ""
        if getattr(target, "__name__", "") == "stochastic_depth" and owner.startswith("torchvision"):
            # Drops whole samples (or the whole batch): the same factor for every channel.
            return self.same(self.value(self.arg(0, "input")))
        return self.unknown()

    def call_method(self, name: str) -> Any:
        """Hand a tensor method call (``x.view(...)``, ``x.relu()``, ...) to its handler."""
        x = self.value(self.node.args[0]) if self.node.args else None
        if name in ("size", "dim", "numel", "ndimension", "nelement", "stride", "element_size", "get_device"):
            return _OTHER
        if name in _SAME_METHODS:
            return self.same(x)
        if name in _ELEMENTWISE_METHODS:
            return self.elementwise()
        if name in _RESHAPE_METHODS:
            return self.reshape(x)
        if name in _REDUCE_NAMES:
            return self.reduce()
        if name in _SPLIT_NAMES:
            return self.split(name)
        if name in ("transpose", "swapaxes", "swapdims"):
            return self.transpose(x, self.arg(1, "dim0"), self.arg(2, "dim1"))
        if name == "t":
            return self.transpose(x, 0, 1)
        if name == "matmul":
            return self.matmul(x, self.value(self.arg(1, "other")))
        if name == "permute":
            dims = self.node.args[1:] if len(self.node.args) > 2 else self.arg(1, "dims")
            if isinstance(dims, (list, tuple)) and len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = dims[0]
            return self.permute_dims(x, dims)
        if name == "movedim":
            return self.movedim(x, self.arg(1, "source"), self.arg(2, "destination"))
        if name in ("expand", "expand_as", "broadcast_to", "repeat", "tile"):
            return self.expand(x)
        if name in ("roll", "flip"):
            dims = self.arg(2, "dims") if name == "roll" else (self.node.args[1:] or self.node.kwargs.get("dims"))
            if isinstance(dims, (list, tuple)) and len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = dims[0]
            return self.along(x, dims)
        return self.unknown()

    def call_module(self, m: nn.Module) -> Any:
        """Hand a submodule call to its handler, chosen by the module's class."""
        name = str(self.node.target)
        first = self.node.args[0] if self.node.args else next(iter(self.node.kwargs.values()), None)
        x = self.value(first)
        if isinstance(m, nn.modules.conv._ConvNd):
            transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
            return self.conv(x, self.canon(m.weight), self.canon(m.bias), m.groups, transposed, name)
        if isinstance(m, nn.Linear):
            return self.linear(x, self.canon(m.weight), self.canon(m.bias), name)
        if isinstance(m, nn.MultiheadAttention):
            return self.multihead_attention(m, name)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            names = [self.canon(getattr(m, k, None)) for k in ("running_mean", "running_var", "weight", "bias")]
            return self.per_channel(x, 1, names, type(m).__name__, name)
        if isinstance(m, nn.modules.instancenorm._InstanceNorm):
            names = [self.canon(getattr(m, k, None)) for k in ("running_mean", "running_var", "weight", "bias")]
            batched = isinstance(x, _Tensor) and len(x.shape) == m._get_no_batch_dim() + 1
            return self.per_channel(x, 1 if batched else 0, names, type(m).__name__, name)
        if isinstance(m, nn.GroupNorm):
            return self.group_norm(x, m.num_groups, [self.canon(m.weight), self.canon(m.bias)], name)
        if isinstance(m, nn.LayerNorm):
            return self.layer_norm(x, len(m.normalized_shape), [self.canon(m.weight), self.canon(m.bias)], name)
        if isinstance(m, nn.PReLU):
            return self.prelu(x, self.canon(m.weight), m.num_parameters, name)
        if isinstance(m, nn.Embedding):
            return self.embedding(x, self.canon(m.weight), name)
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return self.reshape(x)
        if isinstance(m, _ELEMENTWISE_MODULES):
            return self.same(x)
        if isinstance(m, _POOL_MODULES):
            return self.spatial(x, int(type(m).__name__[-2]))
        if isinstance(m, _UPSAMPLE_MODULES):
            return self.spatial(x, len(x.shape) - 2 if isinstance(x, _Tensor) else 0)
        if isinstance(m, _PAD_MODULES):
            return self.spatial(x, len(cast(Sequence[int], m.padding)) // 2)
        return self.unknown()

    # --------------------------------------------------------------- finish

    def finish(self) -> list[ChannelGroup]:
        """Build the groups: tie spaces reading one parameter range, leave fixed ones out, raise for
        problems and pinned parameters, then name the groups in graph order.
        """
        sp = self.spaces
        n = len(sp.parent)
        # 1. One parameter range belongs to one group: identical ranges reached from several
        #    spaces (a module called twice) tie those spaces.
        by_key: dict[tuple[str, int], dict[tuple[int, int, int], list[int]]] = defaultdict(lambda: defaultdict(list))
        for s in range(n):
            for ax in sp.axes[s]:
                by_key[(ax.param, ax.axis)][(ax.offset, ax.repeat, sp.size[s])].append(s)
        for ranges in by_key.values():
            for spaces in ranges.values():
                for s in spaces[1:]:
                    sp.union(spaces[0], s)
        # 2. Overlapping but different ranges cannot be permuted consistently.
        for (param, axis), ranges in by_key.items():
            spans = sorted((o, o + size * r, spaces[0]) for (o, r, size), spaces in ranges.items())
            for (_, a1, sa), (b0, _, sb) in zip(spans, spans[1:]):
                if b0 < a1 and sp.find(sa) != sp.find(sb):
                    if sp.is_fixed(sa) or sp.is_fixed(sb):
                        sp.fix(sa)
                        sp.fix(sb)
                    else:
                        reason = f"reads axis {axis} of {param!r} with two different channel layouts"
                        sp.problems[sa].append(_Problem(param, "a parameter read by several layers", reason))
        # 3. Attention heads share one head order: when a group of them stays in place, so do the others.
        pinned_ties = {sp.find(s, sp.tied) for s in range(n) if sp.is_fixed(s) and sp.tie_key[sp.find(s, sp.tied)]}
        for s in range(n):
            if sp.find(s, sp.tied) in pinned_ties:
                sp.fix(s)
        # 4. Collect by root.
        members: dict[int, list[int]] = defaultdict(list)
        for s in range(n):
            members[sp.find(s)].append(s)
        groups: list[tuple[int, int, list[str], list[str], list[Axis], int]] = []
        for root, spaces in members.items():
            if sp.fixed[root]:
                returned = any(sp.returned[s] for s in spaces)
                problems = [p for s in spaces for p in sp.problems[s]]
                creators = sorted({c for s in spaces for c in sp.creators[s]})
                if problems and creators and not returned:
                    # Correct (nothing moves), but the user may expect these channels in a group.
                    warnings.warn(
                        f"the {sp.size[root]} channels produced by {creators[0][1]} are left out of the channel "
                        f"groups (kept in place): node {problems[0].node!r} ({problems[0].op}) {problems[0].reason}, "
                        "and its result is combined with them",
                        stacklevel=4,
                    )
                continue
            problems = [p for s in spaces for p in sp.problems[s]]
            tagged = sorted({(c, s) for s in spaces for c in sp.creators[s]})
            # Name by the producers summed into the first one's stream, not by gates multiplied in.
            first_stream = sp.find(tagged[0][1], sp.stream) if tagged else -1
            naming = [c for c, s in tagged if sp.find(s, sp.stream) == first_stream]
            creators = [c for c, _ in tagged]
            if sp.heads[root] == 0 or sp.size[root] % max(1, sp.heads[root]):
                reason = "splits these channels into attention heads of two different sizes"
                problems.append(_Problem(self.node.name, "attention heads", reason))
            if problems:
                raise _unsupported(creators, sp.size[root], problems)
            axes: dict[tuple[str, int, int, int], Axis] = {}
            for s in spaces:
                for ax in sp.axes[s]:
                    axes.setdefault((ax.param, ax.axis, ax.offset, ax.repeat), ax)
            for ax in axes.values():
                if ax.param in self.pinned:
                    raise _unsupported(creators, sp.size[root], [self.pinned[ax.param]], param=ax.param)
                shape = _fetch_state(self.model, ax.param).shape
                if ax.offset + sp.size[root] * ax.repeat > shape[ax.axis]:  # a bug guard
                    raise AssertionError(f"axis {ax} of shape {tuple(shape)} does not fit {sp.size[root]} channels")
            producers = [name for _, name in sorted({p for s in spaces for p in sp.producers[s]})]
            order = creators[0][0] if creators else n
            naming_names = list(dict.fromkeys(c for _, c in naming))
            if sp.heads[root] > 1:
                producers = []  # no module returns the channels of attention heads alone
            groups.append(
                (order, sp.size[root], naming_names, list(dict.fromkeys(producers)), list(axes.values()), root)
            )
        groups.sort(key=lambda g: g[0])
        names = _group_names([g[2] for g in groups])
        self.group_of_root = {g[5]: name for name, g in zip(names, groups)}
        return [
            ChannelGroup(name, size, tuple(axes), tuple(producers), sp.heads[root], sp.tie_key[sp.find(root, sp.tied)])
            for name, (_, size, _, producers, axes, root) in zip(names, groups)
        ]

    def carried(self, node: fx.Node) -> str | None:
        """The group whose channels, and only those, ``node``'s output holds in dim 1 (after :meth:`run`)."""
        value = self.env.get(node)
        if not isinstance(value, _Tensor) or value.layout is None or value.layout.dim != 1:
            return None
        if len(value.layout.parts) != 1 or value.layout.parts[0].repeat != 1:
            return None  # several groups side by side, or channels flattened into blocks
        return self.group_of_root.get(self.spaces.find(value.layout.parts[0].space))


def _group_names(creators: Sequence[Sequence[str]]) -> list[str]:
    """Name each group by the module path its producers share, else by its first producer."""
    firsts = [c[0] if c else "group" for c in creators]
    candidates = []
    for cs in creators:
        prefix = _common_prefix(cs) if len(cs) > 1 else ""
        candidates.append(prefix or (cs[0] if cs else "group"))
    counts: dict[str, int] = defaultdict(int)
    for c in candidates:
        counts[c] += 1
    names = [c if counts[c] == 1 and c not in set(firsts) - {f} else f for c, f in zip(candidates, firsts)]
    seen: dict[str, int] = defaultdict(int)
    unique = []
    for name in names:
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return unique


def _unsupported(
    creators: Sequence[tuple[int, str]], size: int, problems: Sequence[_Problem], param: str | None = None
) -> UnsupportedLayerError:
    """The error for a group of ``size`` channels made by ``creators``, naming its first problem's node."""
    produced = ", ".join(dict.fromkeys(c for _, c in creators)) or "an unnamed layer"
    first = problems[0]
    others = list(dict.fromkeys(f"{p.node!r} ({p.op})" for p in problems[1:]))
    what = f"parameter {param!r}: node" if param else "node"
    message = (
        f"cannot permute the {size} channels produced by {produced}: {what} {first.node!r} ({first.op}) {first.reason}."
    )
    if others:
        message += f" Also at: {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}."
    message += f" Supported: {SUPPORTED}."
    return UnsupportedLayerError(message, node=first.node, op=first.op)
