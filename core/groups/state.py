"""The analyzer's state during one walk of a traced graph, and the helpers every op shares.

:class:`_AnalyzerState` holds what the walk has learnt so far (the value of each node,
the channel spaces, the parameters that must not move) and the bookkeeping helpers
that the op handlers (:mod:`.handlers`) and the dispatchers (:mod:`.analyzer`) call:
reading a node's arguments, recording parameter axes on channel spaces, tying or fixing
spaces, and marking what an op does not support. It is the base class of both, so the
handlers can be read, and type-checked, on their own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from torch import fx, nn

from .model import Axis
from .values import _OTHER, _flatten, _Layout, _Other, _Part, _Problem, _Spaces, _Tensor


class _AnalyzerState:
    """The state of one walk over a traced graph, and the bookkeeping helpers of its ops."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        """Prepare one walk of ``gm``, traced from ``model``: no spaces yet, every tensor's state-dict name,
        the post-processing (tail) nodes.
        """
        self.model = model
        self.gm = gm
        self.spaces = _Spaces()
        self.env: dict[fx.Node, Any] = {}
        self.canonical: dict[int, str] = {}
        # Shared tensors have several state-dict names: use the first, as named_parameters does.
        for name, t in model.named_parameters():
            self.canonical.setdefault(id(t), name)
        for name, b in model.named_buffers():
            self.canonical.setdefault(id(b), name)
        self.pinned: dict[str, _Problem] = {}
        self.tail = _tail_nodes(gm.graph)
        # The node being interpreted; run() sets it before any helper or handler reads it.
        self.node: fx.Node = cast(fx.Node, None)
        self.order = 0
        self.claimed: set[str] = set()
        self.desc = ""
        # Nodes that pool, pad or interpolate the spatial dims, whatever the sizes traced.
        self.resampling: set[fx.Node] = set()
        # Union-find root of every group's channel spaces -> the group's name (set by finish).
        self.group_of_root: dict[int, str] = {}
        # Spaces cut into pieces (a packed query/key/value projection) -> the pieces' spaces.
        self.dissolved: dict[int, list[int]] = {}
        # Whether the current node's handler understood the attention heads among its inputs.
        self.heads_handled = False

    # ----------------------------------------------------------------- helpers

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """The current node's argument at position ``index`` or keyword ``name`` (an fx value, not interpreted)."""
        node = self.node
        assert node is not None
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)

    def value(self, raw: Any) -> Any:
        """The analysis value of ``raw``: a node's recorded value, looked up inside lists and tuples."""
        if isinstance(raw, fx.Node):
            return self.env[raw]
        if isinstance(raw, (list, tuple)):
            return type(raw)(self.value(r) for r in raw)
        return raw

    def meta(self) -> Any:
        """The current node's output without channel information."""
        return self._from_meta(self.node.meta.get("tensor_meta"))

    def _from_meta(self, meta: Any) -> Any:
        """ShapeProp's metadata (possibly nested) as channel-less :class:`_Tensor` values, else :data:`_OTHER`."""
        if meta is None:
            return _OTHER
        if hasattr(meta, "shape") and hasattr(meta, "dtype"):
            return _Tensor(tuple(int(s) for s in meta.shape))
        if isinstance(meta, (list, tuple)):
            return tuple(self._from_meta(m) for m in meta)
        if isinstance(meta, dict):
            return {k: self._from_meta(m) for k, m in meta.items()}
        return _OTHER

    def out_tensor(self) -> _Tensor | None:
        """The current node's output as a channel-less :class:`_Tensor`, or ``None`` if it is not one tensor."""
        out = self.meta()
        return out if isinstance(out, _Tensor) else None

    def canon(self, t: Any) -> str | None:
        """The state-dict name of the parameter or buffer ``t`` (the first name of a shared tensor)."""
        if t is None:
            return None
        return self.canonical.get(id(t))

    def problem(self, values: Iterable[Any], reason: str) -> Any:
        """Mark every space carried by ``values`` as not understood here; return an opaque output.

        Post-processing of the output (an op whose result only flows, through other
        parameter-free ops, to the model's output) instead pins its inputs like the logits.
        """
        problem = _Problem(self.node.name, self.desc, reason)
        for v in _flatten(values):
            if not isinstance(v, _Tensor):
                continue
            spaces = [p.space for p in self.undissolved(v.layout).parts] if v.layout is not None else []
            spaces += list(v.heads.spaces) if v.heads is not None else []
            for space in spaces:
                if self.node in self.tail:
                    self.spaces.fix(space)
                    self.spaces.returned[space] = True
                else:
                    self.spaces.problems[space].append(problem)
        return self.meta()

    def undissolved(self, layout: _Layout) -> _Layout:
        """``layout`` with every space taken apart by :meth:`split_space` replaced by its pieces."""
        if not self.dissolved or not any(p.space in self.dissolved for p in layout.parts):
            return layout
        parts: list[_Part] = []
        for p in layout.parts:
            parts.extend(_Part(t, p.repeat) for t in self.dissolved.get(p.space, [p.space]))
        return _Layout(layout.dim, tuple(parts), layout.via)

    def split_space(self, layout: _Layout, pieces: int) -> list[int] | None:
        """Take the one space of ``layout`` apart into ``pieces`` equal spaces; ``None`` when it cannot be.

        A projection computing several things side by side (the packed query, key and
        value of an attention layer) opens one space; when its output is cut into equal
        pieces that go separate ways, each piece becomes a space of its own, with the
        space's axes cut alike (piece ``p`` at offset ``p * size / pieces``). Only a
        space tied to nothing else can be cut; later readers of the whole see the pieces
        side by side (:meth:`undissolved`).
        """
        layout = self.undissolved(layout)
        sp = self.spaces
        if len(layout.parts) != 1 or pieces < 2:
            return None
        s, repeat = layout.parts[0].space, layout.parts[0].repeat
        if repeat != 1 or sp.find(s) != s or sp.fixed[s] or sp.size[s] % pieces or sp.heads[s] != 1:
            return None
        if any(sp.find(t) == s for t in range(len(sp.parent)) if t != s):
            return None
        size = sp.size[s] // pieces
        new = []
        for p in range(pieces):
            t = sp.new(size)
            sp.axes[t] = [Axis(a.param, a.axis, a.repeat, a.offset + p * size * a.repeat, a.role) for a in sp.axes[s]]
            sp.creators[t] = list(sp.creators[s])
            sp.problems[t] = list(sp.problems[s])
            new.append(t)
        # The whole is now only its pieces: it joins no group and warns of nothing.
        sp.axes[s], sp.creators[s], sp.producers[s], sp.problems[s] = [], [], [], []
        sp.fixed[s] = True
        self.dissolved[s] = new
        return new

    def pin(self, param: str, reason: str) -> None:
        """Forbid moving ``param``: a group with an axis of it raises, citing this node and ``reason``."""
        self.pinned.setdefault(param, _Problem(self.node.name, self.desc, reason))

    def fix(self, layout: _Layout) -> None:
        """Keep every channel space of ``layout`` in place: none of them joins a group."""
        for p in self.undissolved(layout).parts:
            self.spaces.fix(p.space)

    def record(self, layout: _Layout, param: str | None, axis: int, role: str, producer: str | None = None) -> None:
        """Add ``param``'s ``axis`` to every space of ``layout``, each at its offset."""
        offset = 0
        for p in self.undissolved(layout).parts:
            if param is not None:
                self.spaces.axes[p.space].append(Axis(param, axis, p.repeat, offset, role))
            if producer is not None:
                self.spaces.producers[p.space].append((self.order, producer))
            offset += self.spaces.size[p.space] * p.repeat

    def new_space(self, size: int, creator: str) -> int:
        """Open a channel space of ``size`` channels, created and produced by the module ``creator``."""
        s = self.spaces.new(size)
        self.spaces.creators[s].append((self.order, creator))
        self.spaces.producers[s].append((self.order, creator))
        return s

    def unify(self, a: _Layout, b: _Layout, stream: bool = False) -> bool:
        """Tie the spaces of two layouts part by part; ``False``, tying nothing, when the parts differ.

        ``stream``: the layouts are summed, so their residual streams are joined too (for naming).
        """
        sizes = self.spaces.size
        a, b = self.undissolved(a), self.undissolved(b)
        if len(a.parts) != len(b.parts) or any(
            p.repeat != q.repeat or sizes[p.space] != sizes[q.space] for p, q in zip(a.parts, b.parts)
        ):
            return False
        for p, q in zip(a.parts, b.parts):
            self.spaces.union(p.space, q.space, stream)
        return True

    def consume(self, x: Any, dim: int, what: str) -> _Layout | None:
        """The layout of ``x`` with its channels in ``dim``, as a layer that reads them sees it.

        An input without permutable channels gets a fixed space, so that a module shared
        with a permutable input is caught when the axes are checked.
        """
        if not isinstance(x, _Tensor) or dim >= len(x.shape):
            return None
        if x.layout is None:
            s = self.spaces.new(x.shape[dim], fixed=True)
            return _Layout(dim, (_Part(s, 1),))
        if x.layout.dim != dim:
            via = f" ({x.layout.via})" if x.layout.via else ""
            reason = f"{what} reads channels from dim {dim}, but this tensor has them in dim {x.layout.dim}{via}"
            self.problem([x], reason)
            return None
        return self.undissolved(x.layout)

    def param_name(self, raw: Any) -> str | None | _Other:
        """The parameter read by ``raw`` (a node), ``None`` for no tensor, ``_OTHER`` for a computed one."""
        v = self.value(raw)
        if v is None:
            return None
        if isinstance(v, _Tensor) and v.param is not None:
            self.claimed.add(v.param)
            return v.param
        return _OTHER

    def unknown(self, reason: str = "has an effect on channels that is not known") -> Any:
        """An op whose effect on channels is not known: each channel space among its inputs gets a problem."""
        values = self.value(list(self.node.args) + list(self.node.kwargs.values()))
        return self.problem(values, reason)


def _tail_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Parameter-free operations whose results only reach the model's output (post-processing)."""
    # Values computed from parameters alone (a weight, a standardised weight): an op reading
    # one is a layer, not post-processing.
    weights: set[fx.Node] = set()
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if node.op == "get_attr" or (node.op != "output" and inputs and all(n in weights for n in inputs)):
            weights.add(node)
    tail: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if node.op not in ("call_function", "call_method") or not node.users:
            continue
        if any(n in weights for n in node.all_input_nodes):
            continue
        if all(u.op == "output" or u in tail for u in node.users):
            tail.add(node)
    return tail
