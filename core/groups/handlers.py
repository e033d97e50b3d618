"""The op handlers of the analyzer: how each family of operations moves channels.

:class:`_Handlers` sits between the walk's state and helpers
(:class:`~.state._AnalyzerState`, its base) and the dispatchers of
:class:`~.analyzer._Analyzer` (its subclass), which pick a handler for each node; it is
a module of its own so that none grows past a readable size. Each method interprets
one family of operations for the current node: it reads its inputs'
:class:`~.values._Tensor`\\ s, ties channel spaces together or fixes them in place,
records the parameter axes that index them, and returns the value of the node's output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from .model import Axis
from .ops import _SUM_FUNCTIONS
from .state import _AnalyzerState
from .values import (
    _OTHER,
    _common_prefix,
    _fetch_state,
    _flatten,
    _Heads,
    _Layout,
    _norm_dim,
    _Part,
    _Problem,
    _reshaped,
    _Tensor,
    _unit_dims,
)


class _Handlers(_AnalyzerState):
    """The op handlers; each returns the value of the current node's output."""

    # --------------------------------------------------------------- layers

    def conv(self, x: Any, weight: Any, bias: Any, groups: int, transposed: bool, name: str | None = None) -> Any:
        """A convolution, plain or transposed: ``groups=1`` reads the input's channels and opens a space on
        the output axis; a depthwise one passes them through; other groupings are problems.
        """
        out = self.out_tensor()
        if out is None or not isinstance(x, _Tensor):
            return self.unknown()
        if weight is _OTHER or bias is _OTHER or weight is None:
            return self.problem([x], "is a convolution whose weight is computed rather than a parameter")
        name = name or weight.rpartition(".")[0] or weight
        w_shape = tuple(_fetch_state(self.model, weight).shape)
        cdim = len(x.shape) - (len(w_shape) - 2) - 1
        c_in, c_out = x.shape[cdim], out.shape[cdim]
        out_axis, in_axis = (1, 0) if transposed else (0, 1)
        if groups == 1:
            layout = self.consume(x, cdim, "this convolution")
            if layout is not None:
                self.record(layout, weight, in_axis, "input")
            s = self.new_space(c_out, name)
            new = _Layout(cdim, (_Part(s),))
            self.record(new, weight, out_axis, "output")
            self.record(new, bias, 0, "output")
            return _Tensor(out.shape, new)
        if groups == c_in and not transposed and c_out % c_in == 0:
            # Depthwise: output channel j filters input channel j // k only, so the input's
            # channels pass through (each widened to k outputs when k > 1).
            k = c_out // c_in
            layout = self.consume(x, cdim, "this depthwise convolution")
            if layout is None:
                return self.meta()
            new = _Layout(cdim, tuple(_Part(p.space, p.repeat * k) for p in layout.parts), layout.via)
            self.record(new, weight, 0, "channel", producer=name)
            self.record(new, bias, 0, "channel")
            return _Tensor(out.shape, new)
        s = self.new_space(c_out, name)
        reason = (
            f"is a grouped convolution (groups={groups}): channels may only move within their group, "
            "which one permutation per group cannot express"
        )
        self.spaces.problems[s].append(_Problem(self.node.name, self.desc, reason))
        self.problem([x], reason)
        return _Tensor(out.shape, _Layout(cdim, (_Part(s),)))

    def linear(self, x: Any, weight: Any, bias: Any, name: str | None = None) -> Any:
        """``nn.Linear`` / ``F.linear``: the weight's axis 1 reads the last dim's channels; its output axis
        and bias open a new space.
        """
        out = self.out_tensor()
        if out is None or not isinstance(x, _Tensor):
            return self.unknown()
        if weight is _OTHER or bias is _OTHER or weight is None:
            return self.problem([x], "is a linear layer whose weight is computed rather than a parameter")
        name = name or weight.rpartition(".")[0] or weight
        last = len(x.shape) - 1
        layout = self.consume(x, last, "this linear layer")
        if layout is not None:
            self.record(layout, weight, 1, "input")
        s = self.new_space(out.shape[-1], name)
        new = _Layout(len(out.shape) - 1, (_Part(s),))
        self.record(new, weight, 0, "output")
        self.record(new, bias, 0, "output")
        return _Tensor(out.shape, new)

    def embedding(self, x: Any, weight: Any, name: str | None = None) -> Any:
        """``nn.Embedding`` / ``F.embedding``: the weight's axis 1 opens a new space; channels used as
        indices are a problem.
        """
        out = self.out_tensor()
        if weight is _OTHER or weight is None or out is None:
            return self.problem([x], "is an embedding whose weight is computed rather than a parameter")
        if isinstance(x, _Tensor) and x.layout is not None:
            return self.problem([x], "uses channels as embedding indices")
        s = self.new_space(out.shape[-1], name or weight.rpartition(".")[0] or weight)
        new = _Layout(len(out.shape) - 1, (_Part(s),))
        self.record(new, weight, 1, "output")
        return _Tensor(out.shape, new)

    def per_channel(self, x: Any, dim: int, names: Sequence[Any], what: str, name: str | None = None) -> Any:
        """A layer with one parameter entry per channel (BatchNorm, InstanceNorm): each parameter's axis 0
        is recorded on the channels in ``dim``, which pass through.
        """
        out = self.out_tensor()
        if out is None or not isinstance(x, _Tensor):
            return self.unknown()
        if any(n is _OTHER for n in names):
            return self.problem([x], f"is a {what} whose parameters are computed rather than parameters")
        params = [n for n in names if n is not None]
        layout = self.consume(x, dim, f"this {what}")
        if layout is None:
            return self.meta()
        producer = name or (params[0].rpartition(".")[0] if params else None)
        for i, p in enumerate(params):
            self.record(layout, p, 0, "channel", producer=producer if i == 0 else None)
        if not params and producer:
            self.record(layout, None, 0, "channel", producer=producer)
        return _Tensor(out.shape, layout if x.layout is not None else None)

    def layer_norm(self, x: Any, k: int, names: Sequence[Any], name: str | None = None) -> Any:
        """LayerNorm over the last ``k`` dims: with the channels among them, weight and bias are per
        channel; with the channels elsewhere (or none) they are pinned.
        """
        out = self.out_tensor()
        if out is None or not isinstance(x, _Tensor):
            return self.unknown()
        if any(n is _OTHER for n in names):
            return self.problem([x], "is a layer norm whose parameters are computed rather than parameters")
        params = [n for n in names if n is not None]
        n = len(x.shape)
        if x.layout is None:
            if k == 1:
                layout = cast(_Layout, self.consume(x, n - 1, "this layer norm"))  # a fixed space: never None
                for p in params:
                    self.record(layout, p, 0, "channel")
            else:
                for p in params:
                    self.pin(p, "normalises a tensor without permutable channels over several dims")
            return out
        d = x.layout.dim
        if d >= n - k:
            # The statistics are taken over the channels (invariant to their order); the
            # affine parameters have one entry per channel along the matching axis.
            for i, p in enumerate(params):
                self.record(x.layout, p, d - (n - k), "channel", producer=name if i == 0 else None)
        else:
            for p in params:
                self.pin(p, "normalises over dims that hold no channels while the channels are elsewhere")
        return _Tensor(out.shape, x.layout)

    def group_norm(self, x: Any, num_groups: int, names: Sequence[Any], name: str | None = None) -> Any:
        """GroupNorm: with 1 or ``C`` groups it acts per channel (:meth:`per_channel`); other group counts
        tie channels in blocks, a problem.
        """
        out = self.out_tensor()
        if out is None or not isinstance(x, _Tensor):
            return self.unknown()
        c = x.shape[1]
        if x.layout is not None and num_groups not in (1, c):
            return self.problem(
                [x], f"is a GroupNorm with {num_groups} groups of {c // num_groups} channels, which ties them in blocks"
            )
        return self.per_channel(x, 1, names, "group norm", name)

    def prelu(self, x: Any, weight: Any, num_parameters: int, name: str | None = None) -> Any:
        """PReLU: one shared slope is an activation (:meth:`same`); one slope per channel is a per-channel
        parameter of dim 1.
        """
        if num_parameters == 1 or weight is None:
            return self.same(x)
        if not isinstance(x, _Tensor):
            return self.unknown()
        return self.per_channel(x, 1 if len(x.shape) >= 2 else 0, [weight], "PReLU", name)

    # ------------------------------------------------------------- plumbing

    def same(self, x: Any) -> Any:
        """An operation that leaves shape and channels alone (activations, dropout, casts): the output
        carries the input's channels; a change of shape is a problem.
        """
        out = self.meta()
        if isinstance(x, _Tensor) and x.param is not None and isinstance(out, _Tensor) and out.shape == x.shape:
            # A cast of a parameter (open_clip's ``positional_embedding.to(dtype)``) is still that parameter.
            self.claimed.add(x.param)
            return x
        if isinstance(x, _Tensor) and x.heads is not None and isinstance(out, _Tensor) and out.shape == x.shape:
            self.heads_handled = True
            return _Tensor(out.shape, heads=x.heads)
        if not isinstance(x, _Tensor) or x.layout is None:
            return out
        if not isinstance(out, _Tensor):
            return self.problem([x], "does not return one tensor")
        if out.shape != x.shape:
            return self.problem([x], f"changes the shape {x.shape} -> {out.shape}")
        return _Tensor(out.shape, x.layout)

    def elementwise(self) -> Any:
        """Elementwise arithmetic with broadcasting: every channel-carrying operand is tied; a parameter
        along the channels is recorded per channel, any other tensor along them fixes them.
        """
        out = self.meta()
        operands = [v for v in _flatten(self.value(list(self.node.args) + list(self.node.kwargs.values())))]
        tensors = [v for v in operands if isinstance(v, _Tensor)]
        if not isinstance(out, _Tensor):
            if any(v.layout is not None for v in tensors):
                return self.problem(tensors, "does not return one tensor")
            return out
        n = len(out.shape)
        if any(v.heads is not None for v in tensors):
            return self.heads_elementwise(tensors, out)
        laid = [(v, v.layout.dim + n - len(v.shape)) for v in tensors if v.layout is not None]
        if not laid:
            return out
        dims = {d for _, d in laid}
        if len(dims) > 1:
            return self.problem(tensors, f"combines tensors whose channels are in different dims {sorted(dims)}")
        d = dims.pop()
        ref = cast(_Layout, laid[0][0].layout)
        target = self.node.target
        # A sum joins residual streams (what names a group); a product (a gate) does not.
        stream = target in ("add", "add_", "sub", "sub_") if self.node.op == "call_method" else target in _SUM_FUNCTIONS
        for v, _ in laid[1:]:
            if not self.unify(ref, cast(_Layout, v.layout), stream):
                return self.problem(tensors, "combines tensors whose channels are laid out differently")
        for v in tensors:
            if v.layout is not None:
                continue
            a = d - (n - len(v.shape))
            if a < 0 or (v.param_size(a) if v.param is not None else v.shape[a]) == 1:
                continue  # broadcast along the channels: the same value for every channel
            if v.param is not None:
                # Added to the channels (a position embedding) it writes them, as a bias does;
                # multiplied with them (a layer scale) it is a per-channel quantity.
                role = "output" if stream else "channel"
                self.record(ref, v.param, cast(int, v.param_axis(a)), role)
                self.claimed.add(v.param)
            else:
                self.fix(ref)  # a tensor we cannot permute: these channels must stay in place
        return _Tensor(out.shape, _Layout(d, ref.parts, ref.via))

    def spatial(self, x: Any, k: int) -> Any:
        """An operation on the last ``k`` dims (pooling, padding, interpolation): the channels pass
        through, unless they are among those dims (a problem).
        """
        out = self.meta()
        if not isinstance(x, _Tensor) or x.layout is None:
            return out
        if not isinstance(out, _Tensor):
            return self.problem([x], "does not return one tensor")
        d, n = x.layout.dim, len(x.shape)
        if len(out.shape) != n or d >= n - k or out.shape[d] != x.shape[d]:
            return self.problem([x], f"acts on the last {k} dims, which include the channels (dim {d})")
        if self.node is not None:
            self.resampling.add(self.node)
        return _Tensor(out.shape, x.layout)

    def along(self, x: Any, dims: Any) -> Any:
        """``roll`` / ``flip``: the channels pass through unless entries move along them (a problem)."""
        out = self.meta()
        if not isinstance(x, _Tensor) or x.layout is None:
            return out
        if dims is None:
            return self.problem([x], "moves entries across the flattened tensor, channels included")
        dims = [dims] if isinstance(dims, int) else list(dims)
        n = len(x.shape)
        if x.layout.dim in {_norm_dim(int(d), n) for d in dims}:
            return self.problem([x], f"moves entries along the channel dim {x.layout.dim}")
        return _Tensor(out.shape, x.layout)

    def expand(self, x: Any) -> Any:
        """``expand`` / ``repeat`` / ``broadcast_to``: the channels keep their dim (counted from the end);
        an expanded parameter stays that parameter; repeating the channels is a problem.
        """
        out = self.meta()
        if (
            isinstance(x, _Tensor)
            and x.param is not None
            and isinstance(out, _Tensor)
            and len(out.shape) == len(x.shape)
            and cast(str, self.node.target) in ("expand", "expand_as", "broadcast_to")  # a method name
        ):
            # A broadcast view of a parameter (a class token expanded over the batch) is
            # still that parameter, axis for axis.
            self.claimed.add(x.param)
            return _Tensor(out.shape, None, x.param, x.param_shape, param_axes=x.param_axes)
        if not isinstance(x, _Tensor) or x.layout is None:
            return out
        if not isinstance(out, _Tensor):
            return self.problem([x], "does not return one tensor")
        d = x.layout.dim + len(out.shape) - len(x.shape)
        if out.shape[d] != x.shape[x.layout.dim]:
            return self.problem([x], "repeats the channels")
        return _Tensor(out.shape, _Layout(d, x.layout.parts, x.layout.via))

    def moved_dims(self, x: Any, out: Any, where: Sequence[int]) -> Any:
        """The output of a move of dims (old dim ``i`` lands at ``where[i]``): channels or heads follow."""
        if isinstance(x, _Tensor) and x.heads is not None and isinstance(out, _Tensor):
            self.heads_handled = True
            return _Tensor(out.shape, heads=x.heads.moved(where))
        if not isinstance(x, _Tensor) or x.layout is None:
            return out
        if not isinstance(out, _Tensor):
            return self.problem([x], "does not return one tensor")
        return self.moved(x, out, where[x.layout.dim])

    def moved(self, x: _Tensor, out: _Tensor, d: int) -> _Tensor:
        """The output ``out`` of a dim move, carrying the channels of ``x`` in dim ``d`` (the move is noted
        for error messages).
        """
        layout = cast(_Layout, x.layout)  # every caller's x carries channels
        if d == layout.dim:
            return _Tensor(out.shape, layout)
        return _Tensor(out.shape, _Layout(d, layout.parts, f"moved to dim {d} by node {self.node.name!r}"))

    def transpose(self, x: Any, a: int, b: int) -> Any:
        """``transpose`` / ``swapaxes`` / ``t``: the channels follow their dim; nothing is tied."""
        if not isinstance(x, _Tensor):
            return self.meta()
        n = len(x.shape)
        a, b = _norm_dim(int(a), n), _norm_dim(int(b), n)
        return self.moved_dims(x, self.meta(), [b if i == a else a if i == b else i for i in range(n)])

    def permute_dims(self, x: Any, dims: Any) -> Any:
        """``permute``: the channels follow their dim to its new position; nothing is tied."""
        if not isinstance(x, _Tensor):
            return self.meta()
        n = len(x.shape)
        dims = [_norm_dim(int(d), n) for d in dims]
        return self.moved_dims(x, self.meta(), [dims.index(i) for i in range(n)])

    def movedim(self, x: Any, source: Any, destination: Any) -> Any:
        """``movedim``: the channels follow their dim to where ``source`` / ``destination`` put it."""
        if not isinstance(x, _Tensor):
            return self.meta()
        n = len(x.shape)
        src = [source] if isinstance(source, int) else list(source)
        dst = [destination] if isinstance(destination, int) else list(destination)
        order: list[int | None] = [None] * n
        for s, t in zip(src, dst):
            order[_norm_dim(t, n)] = _norm_dim(s, n)
        rest = iter(i for i in range(n) if i not in {_norm_dim(s, n) for s in src})
        order = [o if o is not None else next(rest) for o in order]
        return self.moved_dims(x, self.meta(), [order.index(i) for i in range(n)])

    def reshape(self, x: Any) -> Any:
        """``view`` / ``reshape`` / ``flatten`` / ``squeeze`` ..., followed through the shapes: trailing
        dims may fold into per-channel blocks (``repeat``); splitting or mixing channels is a problem.
        """
        out = self.meta()
        if isinstance(x, _Tensor) and x.param is not None and isinstance(out, _Tensor):
            axes = _unit_dims(x, out.shape)
            if axes is not None:
                # A view adding or dropping size-1 dims of a parameter (open_clip's
                # ``class_embedding.view(1, 1, -1)``) is still that parameter.
                self.claimed.add(x.param)
                return _Tensor(out.shape, None, x.param, x.param_shape, param_axes=axes)
        if isinstance(x, _Tensor) and x.heads is not None and isinstance(out, _Tensor):
            return self.merge_heads(x, out)
        if not isinstance(x, _Tensor) or x.layout is None:
            return out
        if not isinstance(out, _Tensor):
            return self.problem([x], "does not return one tensor")
        layout = _reshaped(x.shape, out.shape, x.layout, self.spaces.size)
        if layout is None:
            heads = self.split_heads(x, out)
            if heads is not None:
                return heads
            return self.problem(
                [x], f"reshapes {x.shape} -> {out.shape}, which splits or mixes the channels (dim {x.layout.dim})"
            )
        return _Tensor(out.shape, layout)

    def reduce(self) -> Any:
        """Reductions (``mean``, ``sum``, ``amax``, ...): over the channels or everything the result carries
        none; over other dims they pass through; ``max(a, b)`` is :meth:`elementwise`.
        """
        out = self.meta()
        x = self.value(self.node.args[0]) if self.node.args else self.value(self.node.kwargs.get("input"))
        other = self.value(self.arg(1, "other"))
        if isinstance(other, _Tensor):  # torch.max(a, b) is elementwise
            return self.elementwise()
        if not isinstance(x, _Tensor) or x.layout is None:
            return out
        n, d = len(x.shape), x.layout.dim
        dim = self.arg(1, "dim")
        if self.node.target in ("norm", torch.norm):
            dim = self.node.kwargs.get("dim", self.node.args[2] if len(self.node.args) > 2 else None)
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            return out  # a reduction over everything does not depend on the channel order
        dims = {_norm_dim(int(k), n) for k in ([dim] if isinstance(dim, int) else dim)}
        if d in dims:
            return out  # a reduction over the channels does not depend on their order
        first = out[0] if isinstance(out, tuple) else out
        if not isinstance(first, _Tensor):
            return out
        nd = d if len(first.shape) == n else d - sum(1 for k in dims if k < d)
        if first.shape[nd] != x.shape[d]:
            return self.problem([x], "reduces in a way whose effect on channels is unclear")
        if isinstance(out, tuple):  # (values, indices)
            return tuple(self.moved(x, o, nd) if isinstance(o, _Tensor) else o for o in out)
        return self.moved(x, out, nd)

    def getitem(self) -> Any:
        """``x[...]`` and indexing of tuples: full slices and new axes keep the channels (in their new dim);
        slicing or selecting channels, or advanced indexing, is a problem.
        """
        src = self.value(self.node.args[0])
        idx = self.node.args[1]
        if isinstance(src, (tuple, list)):
            self.heads_handled = True  # taking an item of a tuple changes no tensor
            if isinstance(idx, int):
                return src[idx]
            if isinstance(idx, slice):
                return src[idx]
            return self.unknown()
        if isinstance(src, dict):
            return src.get(idx, _OTHER)
        out = self.meta()
        if isinstance(src, _Tensor) and src.heads is not None and isinstance(out, _Tensor) and isinstance(idx, int):
            # qkv[0], qkv[1], qkv[2]: one of the packed projections, taken along dim 0.
            pieces = self.split_heads_apart(src, (out,) * src.shape[0], 0, True)
            return pieces[idx] if isinstance(pieces, tuple) else pieces
        if not isinstance(src, _Tensor) or src.layout is None:
            return out
        if not isinstance(out, _Tensor):
            return self.problem([src], "does not return one tensor")
        items = list(idx) if isinstance(idx, tuple) else [idx]
        n, d = len(src.shape), src.layout.dim
        consuming = sum(1 for it in items if it is not None and it is not Ellipsis)
        expanded: list[Any] = []
        for it in items:
            if it is Ellipsis:
                expanded.extend([slice(None)] * (n - consuming))
            else:
                expanded.append(it)
        in_dim = out_dim = 0
        new_d = None
        for it in expanded:
            if it is None:
                out_dim += 1
                continue
            v = self.value(it)
            if isinstance(v, (_Tensor, list, tuple)):
                return self.problem([src], "indexes the tensor with a tensor or a list (advanced indexing)")
            if isinstance(it, slice):
                if in_dim == d:
                    full = (
                        it.start in (None, 0)
                        and it.step in (None, 1)
                        and (it.stop is None or (isinstance(it.stop, int) and it.stop >= src.shape[d]))
                    )
                    if not full:
                        return self.problem([src], f"slices the channels (dim {d})")
                    new_d = out_dim
                in_dim += 1
                out_dim += 1
            else:  # an integer index removes its dim
                if in_dim == d:
                    return self.problem([src], f"selects a single channel (dim {d})")
                in_dim += 1
        if new_d is None:
            new_d = out_dim + (d - in_dim)
        if not (0 <= new_d < len(out.shape)) or out.shape[new_d] != src.shape[d]:
            return self.problem([src], "indexes the tensor in a way whose effect on channels is unclear")
        return self.moved(src, out, new_d)

    def cat(self, tensors: Sequence[Any], dim: int) -> Any:
        """``torch.cat``: along the channels the inputs' spaces lie side by side (a fixed part for an input
        without channels); along another dim their channels are tied (:meth:`tie`).
        """
        out = self.meta()
        if not isinstance(out, _Tensor):
            return out
        tensors = [t for t in tensors if isinstance(t, _Tensor)]
        n = len(out.shape)
        dim = _norm_dim(int(dim), n)
        if not any(t.layout is not None for t in tensors):
            return out
        if any(t.layout is not None and t.layout.dim != dim for t in tensors):
            # Concatenation along another dim (tokens, batch): the channels are tied.
            return self.tie([(t, t.layout, t.layout.dim if t.layout else None) for t in tensors], out)
        parts: list[_Part] = []
        for t in tensors:
            if t.layout is None:
                # Channels that cannot move keep their slot in the concatenation.
                parts.append(_Part(self.spaces.new(t.shape[dim], fixed=True)))
                if t.param is not None:
                    self.pin(t.param, "concatenates this parameter with permutable channels")
                    self.claimed.add(t.param)
            else:
                parts.extend(t.layout.parts)
        return _Tensor(out.shape, _Layout(dim, tuple(parts)))

    def stack(self, tensors: Sequence[Any], dim: int) -> Any:
        """``torch.stack``: the inputs' channels, shifted past the new dim, are tied (:meth:`tie`)."""
        out = self.meta()
        if not isinstance(out, _Tensor):
            return out
        tensors = [t for t in tensors if isinstance(t, _Tensor)]
        if not any(t.layout is not None for t in tensors):
            return out
        dim = _norm_dim(int(dim), len(out.shape))
        joined = []
        for t in tensors:
            layout = None
            if t.layout is not None:
                layout = _Layout(t.layout.dim + (t.layout.dim >= dim), t.layout.parts, t.layout.via)
            joined.append((t, layout, None if layout is None else layout.dim - (layout.dim > dim)))
        return self.tie(joined, out, stacked=dim)

    def tie(
        self, joined: Sequence[tuple[_Tensor, _Layout | None, int | None]], out: _Tensor, stacked: int | None = None
    ) -> Any:
        """Tie the channels of tensors joined along a dim that is not the channel dim.

        ``joined`` holds each input with its layout in the output's dims.
        """
        tensors = [t for t, _, _ in joined]
        layouts = [lay for _, lay, _ in joined if lay is not None]
        dims = {lay.dim for lay in layouts}
        if len(dims) > 1:
            return self.problem(tensors, f"joins tensors whose channels are in different dims {sorted(dims)}")
        ref = layouts[0]
        for other in layouts[1:]:
            if not self.unify(ref, other):
                return self.problem(tensors, "joins tensors whose channels are laid out differently")
        # The channel dim of an input without layout, in its own dims.
        axis = ref.dim if stacked is None else ref.dim - (1 if stacked < ref.dim else 0)
        for t, lay, _ in joined:
            if lay is not None:
                continue
            if t.param is not None and axis < len(t.shape) and t.param_size(axis) in (1, out.shape[ref.dim]):
                if t.param_size(axis) > 1:
                    # e.g. a class token: entries of the channels, written as a producer writes them
                    self.record(ref, t.param, cast(int, t.param_axis(axis)), "output")
                self.claimed.add(t.param)
            else:
                self.fix(ref)  # entries we cannot permute join these channels
        return _Tensor(out.shape, ref)

    def split(self, name: str) -> Any:
        """``split`` / ``chunk`` / ``tensor_split`` / ``unbind``: along another dim every piece keeps the
        channels; along the channels only whole parts (undoing a ``cat``) may be split off.
        """
        out = self.meta()
        x = self.value(self.node.args[0])
        dim = self.arg(2, "dim", 0) if name in ("split", "chunk", "tensor_split") else self.arg(1, "dim", 0)
        if isinstance(x, _Tensor) and x.heads is not None and isinstance(out, tuple):
            return self.split_heads_apart(x, out, _norm_dim(int(dim), len(x.shape)), name == "unbind")
        if not isinstance(x, _Tensor) or x.layout is None or not isinstance(out, tuple):
            return out
        n, d = len(x.shape), x.layout.dim
        dim = _norm_dim(int(dim), n)
        if name == "unbind":
            if dim == d:
                return self.problem([x], "unbinds the channels")
            nd = d - (1 if dim < d else 0)
            return tuple(self.moved(x, o, nd) for o in out)
        if dim != d:
            return tuple(_Tensor(o.shape, x.layout) for o in out)
        # Along the channels: allowed when every piece is a whole number of parts (undoing a cat).
        layout = self.undissolved(x.layout)
        sizes = self.spaces.size
        pieces, current, acc, target = [], [], 0, iter(o.shape[d] for o in out)
        want = next(target)
        for p in layout.parts:
            current.append(p)
            acc += sizes[p.space] * p.repeat
            if acc == want:
                pieces.append(tuple(current))
                current, acc = [], 0
                want = next(target, None)
            elif want is None or acc > want:
                return self.problem([x], "splits the channels of one group")
        if len(pieces) != len(out):
            return self.problem([x], "splits the channels of one group")
        return tuple(_Tensor(o.shape, _Layout(d, ps)) for o, ps in zip(out, pieces))

    # ------------------------------------------------------------- attention

    def split_heads(self, x: _Tensor, out: _Tensor) -> _Tensor | None:
        """A reshape cutting the channel dim into ``(heads, d)``, or ``(parts, heads, d)`` for a packed
        query/key/value projection (whose space is then cut into one space per part); ``None`` for any
        other reshape.
        """
        layout = cast(_Layout, x.layout)
        d, grow = layout.dim, len(out.shape) - len(x.shape)
        if grow not in (1, 2) or out.shape[:d] != x.shape[:d] or out.shape[d + grow + 1 :] != x.shape[d + 1 :]:
            return None
        if math.prod(out.shape[d : d + grow + 1]) != x.shape[d] or min(out.shape[d : d + grow + 1]) < 2:
            return None
        part = None
        if grow == 1:
            parts = self.undissolved(layout).parts
            if len(parts) != 1 or parts[0].repeat != 1:
                return None
            spaces: tuple[int, ...] = (parts[0].space,)
        else:
            pieces = self.split_space(layout, out.shape[d])
            if pieces is None:
                return None
            spaces, part = tuple(pieces), d
        for s in spaces:
            self.spaces.set_heads(s, out.shape[d + grow - 1])
        return _Tensor(out.shape, heads=_Heads(spaces, d + grow - 1, d + grow, part))

    def merge_heads(self, x: _Tensor, out: _Tensor) -> Any:
        """A reshape of heads and the dims within a head (in that order, side by side) back into one
        channel dim; any other reshape of attention channels is a problem.
        """
        self.heads_handled = True
        h = cast(_Heads, x.heads)
        k = h.head
        if (
            h.part is None
            and h.inner == k + 1
            and len(out.shape) == len(x.shape) - 1
            and out.shape[:k] == x.shape[:k]
            and out.shape[k] == x.shape[k] * x.shape[k + 1]
            and out.shape[k + 1 :] == x.shape[k + 2 :]
        ):
            return _Tensor(out.shape, _Layout(k, (_Part(h.spaces[0]),)))
        return self.problem([x], f"reshapes attention heads {x.shape} -> {out.shape} other than back into channels")

    def split_heads_apart(self, x: _Tensor, out: tuple[Any, ...], dim: int, drops: bool) -> Any:
        """``unbind`` / ``chunk`` / ``split`` (``drops``: the dim goes) of a tensor of attention channels:
        along the packed parts each piece is one projection; along the batch or tokens every piece
        keeps the heads; along the heads or their dims a problem.
        """
        self.heads_handled = True
        h = cast(_Heads, x.heads)
        if dim in (h.head, h.inner) or not all(isinstance(o, _Tensor) for o in out):
            return self.problem([x], "splits the attention heads or the dims within a head")
        where = [i - 1 if drops and i > dim else i for i in range(len(x.shape))]
        if dim == h.part:
            if len(out) != len(h.spaces) or any(o.shape[dim] != 1 for o in out if not drops):
                return self.problem([x], "splits the packed query, key and value other than one by one")
            return tuple(
                _Tensor(o.shape, heads=_Heads((s,), where[h.head], None if h.inner is None else where[h.inner]))
                for o, s in zip(out, h.spaces)
            )
        return tuple(_Tensor(o.shape, heads=h.moved(where)) for o in out)

    def heads_elementwise(self, tensors: Sequence[_Tensor], out: _Tensor) -> Any:
        """Elementwise arithmetic on attention channels (a scale, a mask, a softmax): the heads pass
        through when every other operand is the same for all heads and all dims within a head.
        """
        self.heads_handled = True
        n = len(out.shape)
        carried = [v for v in tensors if v.heads is not None]
        h = cast(_Heads, carried[0].heads)
        shift = n - len(carried[0].shape)
        if len(carried) > 1 or h.part is not None:
            return self.problem(tensors, "combines attention heads with other channels")
        dims = [h.head + shift] + ([h.inner + shift] if h.inner is not None else [])
        for v in tensors:
            if v is carried[0]:
                continue
            if v.layout is not None or any(
                d - (n - len(v.shape)) >= 0 and v.shape[d - (n - len(v.shape))] > 1 for d in dims
            ):
                return self.problem(tensors, "combines attention heads with values that differ between them")
        return _Tensor(out.shape, heads=_Heads(h.spaces, h.head + shift, None if h.inner is None else h.inner + shift))

    def name_attention(self, qk: Sequence[int], vo: int, key: str = "") -> None:
        """Tie the query/key spaces ``qk`` and the value space ``vo`` of one attention layer: one head
        permutation, keyed and named by the attention's module path (``<path>.qk``, ``<path>.vo``).
        """
        sp = self.spaces
        if not key:
            made = [c for s in (*qk, vo) for _, c in sp.creators[s]]
            distinct = list(dict.fromkeys(made))
            if len(distinct) == 1:  # one packed projection (timm's ``qkv``): name its parent
                key = distinct[0].rpartition(".")[0] or distinct[0]
            else:
                key = _common_prefix(distinct) or (distinct[0] if distinct else self.node.name)
        order = min([o for s in (*qk, vo) for o, _ in sp.creators[s]], default=self.order)
        for s in qk:
            sp.creators[s] = []
        sp.creators[qk[0]] = [(order, f"{key}.qk")]
        sp.creators[vo] = [(order, f"{key}.vo")]
        for s in qk:
            sp.tie(qk[0], s, key)
        sp.tie(qk[0], vo, key)

    def attention(self, q: Any, k: Any, v: Any, mask: Any) -> Any:
        """``F.scaled_dot_product_attention(q, k, v)`` on heads ``(..., heads, tokens, d)``: the query and
        key dims within a head are one space, the value dims another; both share the head order.
        """
        self.heads_handled = True
        out = self.meta()
        operands = [q, k, v]
        if not all(isinstance(t, _Tensor) for t in operands) or not isinstance(out, _Tensor):
            return self.unknown()
        if not any(t.heads is not None or t.layout is not None for t in operands):
            return out
        n = len(out.shape)
        shapes_ok = all(
            t.heads is not None
            and t.heads.part is None
            and len(t.shape) == n
            and (t.heads.head, t.heads.inner) == (n - 3, n - 1)
            for t in operands
        )
        if not shapes_ok:
            return self.problem(
                operands, "attends over tensors whose channels are not split into heads (..., heads, tokens, d)"
            )
        if isinstance(mask, _Tensor) and (mask.layout is not None or mask.heads is not None):
            return self.problem([*operands, mask], "uses channels as an attention mask")
        (sq,), (sk,), (sv,) = (cast(_Heads, t.heads).spaces for t in operands)
        if not self.unify(_Layout(0, (_Part(sq),)), _Layout(0, (_Part(sk),))):
            return self.problem(operands, "attends with queries and keys of different widths")
        self.name_attention([sq, sk], sv)
        return _Tensor(out.shape, heads=_Heads((sv,), n - 3, n - 1))

    def matmul(self, a: Any, b: Any) -> Any:
        """``a @ b``: channels times a parameter matrix (open_clip's ``x @ proj``) is a linear layer; query
        heads times transposed key heads gives scores; scores times value heads gives the values' heads.
        """
        self.heads_handled = True
        out = self.meta()
        if not isinstance(a, _Tensor) or not isinstance(b, _Tensor) or not isinstance(out, _Tensor):
            return self.unknown()
        n = len(out.shape)
        if b.param is not None and len(b.shape) == 2 and a.heads is None and not b.param_axes:
            # x @ W with W (in, out): W's axis 0 reads the channels, its axis 1 makes new ones.
            self.claimed.add(b.param)
            layout = self.consume(a, len(a.shape) - 1, "this matrix product")
            if layout is not None:
                self.record(layout, b.param, 0, "input")
            s = self.new_space(out.shape[-1], b.param)
            new = _Layout(n - 1, (_Part(s),))
            self.record(new, b.param, 1, "output")
            return _Tensor(out.shape, new)
        ha, hb = a.heads, b.heads
        if ha is None and hb is None and a.layout is None and b.layout is None:
            return out
        if (
            ha is None
            or hb is None
            or ha.part is not None
            or hb.part is not None
            or len(a.shape) != n
            or len(b.shape) != n
            or ha.head != n - 3
            or hb.head != n - 3
        ):
            return self.problem([a, b], "multiplies channels or attention heads in a way that is not known")
        if ha.inner == n - 1 and hb.inner == n - 2:
            # q @ k^T: the dims within a head are summed over, so queries and keys share their order.
            if not self.unify(_Layout(0, (_Part(ha.spaces[0]),)), _Layout(0, (_Part(hb.spaces[0]),))):
                return self.problem([a, b], "multiplies queries and keys of different widths")
            self.spaces.creators[hb.spaces[0]] = []  # the group is named after the queries' projection
            return _Tensor(out.shape, heads=_Heads(ha.spaces, n - 3, None))
        if ha.inner is None and hb.inner == n - 1:
            # softmax(q k^T) @ v: every head's scores weigh that head's values.
            self.name_attention(ha.spaces, hb.spaces[0])
            return _Tensor(out.shape, heads=_Heads(hb.spaces, n - 3, n - 1))
        return self.problem([a, b], "multiplies attention heads in a way that is not known")

    def multihead_attention(self, m: nn.MultiheadAttention, name: str) -> Any:
        """``nn.MultiheadAttention`` (a leaf module): the query, key and value inputs are read by the input
        projections; the query/key dims and the value dims within each head open two spaces that share
        the head order (the value dims are read by ``out_proj``); ``out_proj`` opens the output's space.
        """
        out = self.meta()
        query = self.value(self.arg(0, "query"))
        key = self.value(self.arg(1, "key"))
        value = self.value(self.arg(2, "value"))
        first = out[0] if isinstance(out, tuple) and out else None
        if not isinstance(first, _Tensor) or not all(isinstance(t, _Tensor) for t in (query, key, value)):
            return self.unknown()
        need_weights = self.arg(4, "need_weights", True)
        e = m.embed_dim
        canon = self.canon
        packed = m._qkv_same_embed_dim
        weights = (
            [canon(m.in_proj_weight)] * 3
            if packed
            else [canon(m.q_proj_weight), canon(m.k_proj_weight), canon(m.v_proj_weight)]
        )
        offsets = [0, e, 2 * e] if packed else [0, 0, 0]
        for x, w in zip((query, key, value), weights):
            layout = self.consume(x, len(x.shape) - 1, "this attention's input projection")
            if layout is not None:
                self.record(layout, w, 1, "input")
        qk, vo = self.spaces.new(e), self.spaces.new(e)
        bias = canon(m.in_proj_bias)
        for space, parts in ((qk, (0, 1)), (vo, (2,))):
            self.spaces.set_heads(space, m.num_heads)
            for i in parts:
                self.spaces.axes[space].append(Axis(cast(str, weights[i]), 0, 1, offsets[i], "output"))
                if bias is not None:
                    self.spaces.axes[space].append(Axis(bias, 0, 1, i * e, "output"))
        if m.bias_k is not None:
            self.spaces.axes[qk].append(Axis(cast(str, canon(m.bias_k)), 2, 1, 0, "output"))
        if m.bias_v is not None:
            self.spaces.axes[vo].append(Axis(cast(str, canon(m.bias_v)), 2, 1, 0, "output"))
        self.spaces.axes[vo].append(Axis(cast(str, canon(m.out_proj.weight)), 1, 1, 0, "input"))
        self.spaces.creators[qk] = [(self.order, f"{name}.qk")]
        self.spaces.creators[vo] = [(self.order, f"{name}.vo")]
        self.spaces.tie(qk, vo, name)
        if need_weights and not self.arg(6, "average_attn_weights", True):
            # The per-head weights (batch, heads, L, S) follow the head order, which may change.
            reason = "returns the weights of every head (average_attn_weights=False), which follow the head order"
            self.spaces.problems[qk].append(_Problem(self.node.name, self.desc, reason))
        # Named after out_proj, but recorded at no module: out_proj runs inside the attention's forward.
        s = self.spaces.new(e)
        self.spaces.creators[s].append((self.order, f"{name}.out_proj"))
        layout = _Layout(len(first.shape) - 1, (_Part(s),))
        self.record(layout, canon(m.out_proj.weight), 0, "output")
        self.record(layout, canon(m.out_proj.bias), 0, "output")
        return (_Tensor(first.shape, layout), *out[1:])
