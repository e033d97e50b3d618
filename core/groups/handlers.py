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

from collections.abc import Sequence
from typing import Any, cast

import torch

from .ops import _SUM_FUNCTIONS
from .state import _AnalyzerState
from .values import _OTHER, _fetch_state, _flatten, _Layout, _norm_dim, _Part, _Problem, _reshaped, _Tensor


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
            if a < 0 or (v.param_shape if v.param is not None else v.shape)[a] == 1:
                continue  # broadcast along the channels: the same value for every channel
            if v.param is not None:
                self.record(ref, v.param, a, "channel")  # e.g. a layer scale, a position embedding
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
            return _Tensor(out.shape, None, x.param, x.param_shape)
        if not isinstance(x, _Tensor) or x.layout is None:
            return out
        if not isinstance(out, _Tensor):
            return self.problem([x], "does not return one tensor")
        d = x.layout.dim + len(out.shape) - len(x.shape)
        if out.shape[d] != x.shape[x.layout.dim]:
            return self.problem([x], "repeats the channels")
        return _Tensor(out.shape, _Layout(d, x.layout.parts, x.layout.via))

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
        out = self.meta()
        if not isinstance(x, _Tensor) or x.layout is None:
            return out
        if not isinstance(out, _Tensor):
            return self.problem([x], "does not return one tensor")
        n = len(x.shape)
        a, b, d = _norm_dim(int(a), n), _norm_dim(int(b), n), x.layout.dim
        return self.moved(x, out, b if d == a else a if d == b else d)

    def permute_dims(self, x: Any, dims: Any) -> Any:
        """``permute``: the channels follow their dim to its new position; nothing is tied."""
        out = self.meta()
        if not isinstance(x, _Tensor) or x.layout is None:
            return out
        if not isinstance(out, _Tensor):
            return self.problem([x], "does not return one tensor")
        n = len(x.shape)
        dims = [_norm_dim(int(d), n) for d in dims]
        return self.moved(x, out, dims.index(x.layout.dim))

    def movedim(self, x: Any, source: Any, destination: Any) -> Any:
        """``movedim``: the channels follow their dim to where ``source`` / ``destination`` put it."""
        out = self.meta()
        if not isinstance(x, _Tensor) or x.layout is None:
            return out
        if not isinstance(out, _Tensor):
            return self.problem([x], "does not return one tensor")
        n = len(x.shape)
        src = [source] if isinstance(source, int) else list(source)
        dst = [destination] if isinstance(destination, int) else list(destination)
        order: list[int | None] = [None] * n
        for s, t in zip(src, dst):
            order[_norm_dim(t, n)] = _norm_dim(s, n)
        rest = iter(i for i in range(n) if i not in {_norm_dim(s, n) for s in src})
        order = [o if o is not None else next(rest) for o in order]
        return self.moved(x, out, order.index(x.layout.dim))

    def reshape(self, x: Any) -> Any:
        """``view`` / ``reshape`` / ``flatten`` / ``squeeze`` ..., followed through the shapes: trailing
        dims may fold into per-channel blocks (``repeat``); splitting or mixing channels is a problem.
        """
        out = self.meta()
        if not isinstance(x, _Tensor) or x.layout is None:
            return out
        if not isinstance(out, _Tensor):
            return self.problem([x], "does not return one tensor")
        layout = _reshaped(x.shape, out.shape, x.layout, self.spaces.size)
        if layout is None:
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
            if isinstance(idx, int):
                return src[idx]
            if isinstance(idx, slice):
                return src[idx]
            return self.unknown()
        if isinstance(src, dict):
            return src.get(idx, _OTHER)
        out = self.meta()
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
            if t.param is not None and axis < len(t.shape) and t.param_shape[axis] in (1, out.shape[ref.dim]):
                if t.param_shape[axis] > 1:
                    self.record(ref, t.param, axis, "channel")  # e.g. a class token
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
        if not isinstance(x, _Tensor) or x.layout is None or not isinstance(out, tuple):
            return out
        n, d = len(x.shape), x.layout.dim
        dim = self.arg(2, "dim", 0) if name in ("split", "chunk", "tensor_split") else self.arg(1, "dim", 0)
        dim = _norm_dim(int(dim), n)
        if name == "unbind":
            if dim == d:
                return self.problem([x], "unbinds the channels")
            nd = d - (1 if dim < d else 0)
            return tuple(self.moved(x, o, nd) for o in out)
        if dim != d:
            return tuple(_Tensor(o.shape, x.layout) for o in out)
        # Along the channels: allowed when every piece is a whole number of parts (undoing a cat).
        sizes = self.spaces.size
        pieces, current, acc, target = [], [], 0, iter(o.shape[d] for o in out)
        want = next(target)
        for p in x.layout.parts:
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
