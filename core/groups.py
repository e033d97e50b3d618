"""Channel groups: which weight axes must be permuted together, found by tracing.

Permuting the hidden units of a network leaves its function unchanged only when every
tensor axis that indexes those units moves with them: the producing layer's output
axis and bias, the per-channel parameters and statistics of a BatchNorm that follows,
the input axis of every consumer, and, through a residual connection, every other
layer writing to the same stream. Re-basin code usually lists these axes by hand for
each architecture (a "permutation spec"). :func:`channel_groups` finds them by tracing
the model with :mod:`torch.fx` and following every channel dimension through the graph.

How a tensor's channels are followed
------------------------------------
Every convolution, linear or embedding output opens a new *channel space*. Operations
that act on each channel separately (BatchNorm, activations, pooling, dropout, padding,
interpolation, depthwise convolutions) pass a space through; an elementwise ``add`` /
``sub`` / ``mul`` of two tensors unifies their spaces (residual connections,
squeeze-excitation gates); ``cat`` along the channel dim lays spaces side by side, each
part keeping its own group; ``flatten`` / ``view`` / ``reshape`` after a convolution
turns every channel into a block of ``repeat`` consecutive features. The union of the
spaces tied together is a :class:`ChannelGroup`. Spaces that reach the model's output
(the logits) or are tied to something that cannot be permuted (the input image, a
constant tensor) are left out. An operation whose effect on channels is unknown, applied
to a group that would otherwise be permuted, is an error (:class:`UnsupportedLayerError`)
rather than a silent mistake.

Conventions
-----------
A permutation ``perm`` of a group of ``size`` channels puts the old channel ``perm[i]``
at position ``i``. As a matrix (:func:`permutation_matrix`) it has dims
``("unit", "unit_ref")`` with ``P[perm[j], j] = 1``: unit ``perm[j]`` of the model goes
to unit ``j`` of the reference, the orientation of the transforms in
:class:`mergescope.Alignment`. :func:`apply_linear` takes maps ``T`` acting on
activation vectors (``new = T @ old``), so for an alignment transform ``M`` it is
``T = M.T`` (see :func:`maps_from_transforms`).

Example
-------
>>> groups = channel_groups(model, torch.randn(2, 3, 32, 32))  # doctest: +SKIP
>>> check_equivalence(model, torch.randn(2, 3, 32, 32), groups=groups)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import attrs
import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import MergescopeError

__all__ = [
    "Axis",
    "ChannelGroup",
    "UnsupportedLayerError",
    "EquivalenceError",
    "channel_groups",
    "group_layers",
    "permute",
    "random_permutations",
    "check_equivalence",
    "permutation_matrix",
    "perm_from_matrix",
    "apply_linear",
    "maps_from_transforms",
    "example_input",
    "align_to_reference",
]

ROLES = ("output", "input", "channel")


# ------------------------------------------------------------------------ errors


class UnsupportedLayerError(MergescopeError):
    """The model cannot be traced, or uses an operation whose effect on channels is unknown.

    Parameters
    ----------
    message
        What failed and where.
    node
        Name of the ``torch.fx`` node at fault, when there is one.
    op
        What that node does, e.g. ``"call_function torch.roll"``.
    """

    def __init__(self, message: str, node: str | None = None, op: str | None = None) -> None:
        self.node = node
        self.op = op
        super().__init__(message)


class EquivalenceError(MergescopeError):
    """A permuted model does not compute the same function as the original.

    Parameters
    ----------
    message
        What differed and by how much.
    groups
        Names of the groups whose permutation changes the output.
    """

    def __init__(self, message: str, groups: Sequence[str] = ()) -> None:
        self.groups = tuple(groups)
        super().__init__(message)


# ------------------------------------------------------------------ public values


def _check_role(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value not in ROLES:
        raise ValueError(f"Axis.role must be one of {ROLES}, got {value!r}")


@attrs.frozen
class Axis:
    """One axis of a parameter or buffer that indexes the channels of a group.

    Parameters
    ----------
    param
        State-dict key of the parameter or buffer (``"layer1.0.bn1.running_mean"``).
    axis
        The tensor axis that indexes the channels.
    repeat
        Entries per channel along the axis: after a flatten of ``(N, C, H, W)`` maps, a
        linear layer's input axis holds ``C * H * W`` features, channel ``c`` owning the
        block ``c * repeat : (c + 1) * repeat`` with ``repeat = H * W``.
    offset
        Index along the axis where the group's entries start (after a ``cat``, each part
        of the concatenated channels starts at its own offset).
    role
        How the axis uses the channels: ``"output"`` (a producer's output axis or bias:
        the channels are computed here), ``"input"`` (a consumer's input axis: the
        channels are read here) or ``"channel"`` (a per-channel quantity: BatchNorm
        scale, shift and running statistics, depthwise filters, a layer scale).
        Permutations treat all three alike; :func:`apply_linear` does not.
    """

    param: str
    axis: int
    repeat: int = 1
    offset: int = 0
    role: str = attrs.field(default="channel", validator=_check_role)

    def span(self, size: int) -> tuple[int, int]:
        """Start and stop along :attr:`axis` of the entries of a group of ``size`` channels."""
        return self.offset, self.offset + size * self.repeat

    def entries(self, channels: np.ndarray) -> np.ndarray:
        """Indices along :attr:`axis` of the entries of ``channels``, in their order.

        With ``channels`` a permutation this is the gather index of the permuted block:
        its entry ``offset + i * repeat + k`` reads ``offset + channels[i] * repeat + k``.
        """
        channels = np.asarray(channels, dtype=np.int64)
        return self.offset + (channels[:, None] * self.repeat + np.arange(self.repeat)[None, :]).reshape(-1)


@attrs.frozen
class ChannelGroup:
    """Parameter and buffer axes that must be permuted together.

    Parameters
    ----------
    name
        A readable name: the module that produces the channels (``"layer1.0.conv1"``),
        or for a stream written by several modules (a residual stream) the module path
        they share (``"layer2"``), else the first of them (``"conv1"``).
    size
        Number of channels.
    axes
        Every parameter / buffer axis indexing these channels.
    producers
        Modules whose outputs carry these channels, in graph order: the convolutions /
        linear layers that compute them and the per-channel layers after them
        (BatchNorm, depthwise convolutions). Record activations of a group at these.
    """

    name: str
    size: int
    axes: tuple[Axis, ...]
    producers: tuple[str, ...]

    @property
    def params(self) -> tuple[str, ...]:
        """Distinct parameter / buffer names among :attr:`axes`, in order."""
        return tuple(dict.fromkeys(a.param for a in self.axes))


# ---------------------------------------------------------- internal graph values


@dataclass(frozen=True)
class _Part:
    """A run of channels of one space inside a tensor dim, each channel ``repeat`` entries wide."""

    space: int
    repeat: int = 1


@dataclass(frozen=True)
class _Layout:
    """Where a tensor carries permutable channels: the dim and the spaces laid along it."""

    dim: int
    parts: tuple[_Part, ...]
    # Where the channels were last moved to another dim, for error messages.
    via: str = field(default="", compare=False)


@dataclass(frozen=True)
class _Tensor:
    """A tensor flowing through the graph, as far as channels are concerned.

    ``layout is None``: the tensor carries no channels we may permute (the input, a
    constant, a reduction over channels). ``param`` names a parameter or buffer read
    with ``get_attr`` (possibly broadcast by ``expand``), ``param_shape`` its stored shape.
    """

    shape: tuple[int, ...]
    layout: _Layout | None = None
    param: str | None = None
    param_shape: tuple[int, ...] = ()


class _Other:
    """A non-tensor value (a size, a dtype, ``None``)."""

    def __repr__(self) -> str:
        return "<other>"


_OTHER = _Other()


@dataclass
class _Problem:
    node: str
    op: str
    reason: str


class _Spaces:
    """Union-find over channel spaces, with what each space touches."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        # A second partition, joined only by sums (residual streams), used to name groups.
        self.stream: list[int] = []
        self.size: list[int] = []
        self.fixed: list[bool] = []
        # Spaces that reach the model's output: never permutable, whatever else happens to them.
        self.returned: list[bool] = []
        self.axes: list[list[Axis]] = []
        self.creators: list[list[tuple[int, str]]] = []
        self.producers: list[list[tuple[int, str]]] = []
        self.problems: list[list[_Problem]] = []

    def new(self, size: int, *, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.stream.append(len(self.stream))
        self.size.append(int(size))
        self.fixed.append(fixed)
        self.returned.append(False)
        self.axes.append([])
        self.creators.append([])
        self.producers.append([])
        self.problems.append([])
        return len(self.parent) - 1

    def find(self, i: int, parent: list[int] | None = None) -> int:
        parent = self.parent if parent is None else parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    def union(self, a: int, b: int, stream: bool = False) -> None:
        if stream:
            sa, sb = self.find(a, self.stream), self.find(b, self.stream)
            self.stream[max(sa, sb)] = min(sa, sb)
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:  # callers check sizes first; this is a bug guard
            raise AssertionError(f"tying channel spaces of sizes {self.size[ra]} and {self.size[rb]}")
        ra, rb = min(ra, rb), max(ra, rb)
        self.parent[rb] = ra
        self.fixed[ra] = self.fixed[ra] or self.fixed[rb]
        self.returned[ra] = self.returned[ra] or self.returned[rb]

    def fix(self, i: int) -> None:
        self.fixed[self.find(i)] = True

    def is_fixed(self, i: int) -> bool:
        return self.fixed[self.find(i)]


# ------------------------------------------------------------------ op tables


def _fns(module: Any, names: Iterable[str]) -> set[Any]:
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
    getattr(nn, n)
    for n in dir(nn)
    if "Pool" in n and n[-2:] in ("1d", "2d", "3d") and isinstance(getattr(nn, n), type)
)
_PAD_MODULES: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, n)
    for n in dir(nn)
    if n.endswith(("Pad1d", "Pad2d", "Pad3d")) and isinstance(getattr(nn, n), type)
)
_UPSAMPLE_MODULES: tuple[type[nn.Module], ...] = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)

SUPPORTED = (
    "convolutions with groups=1 or depthwise, linear, embedding, batch/instance norm, layer norm, "
    "group norm with 1 or C groups, PReLU, elementwise activations and arithmetic, pooling, padding, "
    "interpolation, dropout, cat/stack/split, flatten/view/reshape, transpose/permute, reductions"
)


def _describe(node: fx.Node, module: nn.Module | None = None) -> str:
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


def _norm_dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


# ------------------------------------------------------------------------ analysis


class _Analyzer:
    """Walk a traced graph once, following channel spaces through every node."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.model = model
        self.gm = gm
        self.spaces = _Spaces()
        self.env: dict[fx.Node, Any] = {}
        self.canonical: dict[int, str] = {}
        # Shared tensors have several state-dict names: use the first, as named_parameters does.
        for name, t in model.named_parameters():
            self.canonical.setdefault(id(t), name)
        for name, t in model.named_buffers():
            self.canonical.setdefault(id(t), name)
        self.pinned: dict[str, _Problem] = {}
        self.tail = _tail_nodes(gm.graph)
        self.node: fx.Node | None = None
        self.order = 0
        self.claimed: set[str] = set()
        self.desc = ""
        # Nodes that pool, pad or interpolate the spatial dims, whatever the sizes traced.
        self.resampling: set[fx.Node] = set()
        # Union-find root of every group's channel spaces -> the group's name (set by finish).
        self.group_of_root: dict[int, str] = {}

    # ----------------------------------------------------------------- helpers

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        node = self.node
        assert node is not None
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)

    def value(self, raw: Any) -> Any:
        if isinstance(raw, fx.Node):
            return self.env[raw]
        if isinstance(raw, (list, tuple)):
            return type(raw)(self.value(r) for r in raw)
        return raw

    def meta(self) -> Any:
        """The current node's output without channel information."""
        return self._from_meta(self.node.meta.get("tensor_meta"))

    def _from_meta(self, meta: Any) -> Any:
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
        out = self.meta()
        return out if isinstance(out, _Tensor) else None

    def canon(self, t: Any) -> str | None:
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
            if isinstance(v, _Tensor) and v.layout is not None:
                for p in v.layout.parts:
                    if self.node in self.tail:
                        self.spaces.fix(p.space)
                        self.spaces.returned[p.space] = True
                    else:
                        self.spaces.problems[p.space].append(problem)
        return self.meta()

    def pin(self, param: str, reason: str) -> None:
        self.pinned.setdefault(param, _Problem(self.node.name, self.desc, reason))

    def fix(self, layout: _Layout) -> None:
        for p in layout.parts:
            self.spaces.fix(p.space)

    def record(self, layout: _Layout, param: str | None, axis: int, role: str, producer: str | None = None) -> None:
        """Add ``param``'s ``axis`` to every space of ``layout``, each at its offset."""
        offset = 0
        for p in layout.parts:
            if param is not None:
                self.spaces.axes[p.space].append(Axis(param, axis, p.repeat, offset, role))
            if producer is not None:
                self.spaces.producers[p.space].append((self.order, producer))
            offset += self.spaces.size[p.space] * p.repeat

    def new_space(self, size: int, creator: str) -> int:
        s = self.spaces.new(size)
        self.spaces.creators[s].append((self.order, creator))
        self.spaces.producers[s].append((self.order, creator))
        return s

    def unify(self, a: _Layout, b: _Layout, stream: bool = False) -> bool:
        sizes = self.spaces.size
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
        return x.layout

    def param_name(self, raw: Any) -> str | None | _Other:
        """The parameter read by ``raw`` (a node), ``None`` for no tensor, ``_OTHER`` for a computed one."""
        v = self.value(raw)
        if v is None:
            return None
        if isinstance(v, _Tensor) and v.param is not None:
            self.claimed.add(v.param)
            return v.param
        return _OTHER

    # --------------------------------------------------------------------- run

    def run(self) -> list[ChannelGroup]:
        for i, node in enumerate(self.gm.graph.nodes):
            self.node, self.order, self.claimed = node, i, set()
            module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
            self.desc = _describe(node, module)
            value = self.dispatch(node, module)
            self.env[node] = value
            if node.op in ("call_function", "call_method", "call_module"):
                # A parameter read by an operation we do not interpret must not move.
                for v in _flatten(self.value(list(node.args) + list(node.kwargs.values()))):
                    if isinstance(v, _Tensor) and v.param is not None and v.param not in self.claimed:
                        self.pin(v.param, "uses this parameter in a way whose effect on channels is unknown")
        return self.finish()

    def dispatch(self, node: fx.Node, module: nn.Module | None) -> Any:
        if node.op == "placeholder":
            return self.meta()
        if node.op == "get_attr":
            attr = _fetch(self.gm, node.target)
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
            return self.call_module(module)
        if node.op == "call_function":
            return self.call_function(node.target)
        if node.op == "call_method":
            return self.call_method(node.target)
        return self.unknown()

    def unknown(self, reason: str = "has an effect on channels that is not known") -> Any:
        values = self.value(list(self.node.args) + list(self.node.kwargs.values()))
        return self.problem(values, reason)

    # ------------------------------------------------------------ dispatchers

    def call_function(self, target: Any) -> Any:
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
        name = str(self.node.target)
        first = self.node.args[0] if self.node.args else next(iter(self.node.kwargs.values()), None)
        x = self.value(first)
        if isinstance(m, nn.modules.conv._ConvNd):
            transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
            return self.conv(x, self.canon(m.weight), self.canon(m.bias), m.groups, transposed, name)
        if isinstance(m, nn.Linear):
            return self.linear(x, self.canon(m.weight), self.canon(m.bias), name)
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
            return self.spatial(x, len(m.padding) // 2)
        return self.unknown()

    # --------------------------------------------------------------- layers

    def conv(self, x: Any, weight: Any, bias: Any, groups: int, transposed: bool, name: str | None = None) -> Any:
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
        """A layer with one parameter entry per channel (BatchNorm, InstanceNorm)."""
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
        out = self.out_tensor()
        if out is None or not isinstance(x, _Tensor):
            return self.unknown()
        if any(n is _OTHER for n in names):
            return self.problem([x], "is a layer norm whose parameters are computed rather than parameters")
        params = [n for n in names if n is not None]
        n = len(x.shape)
        if x.layout is None:
            if k == 1:
                layout = self.consume(x, n - 1, "this layer norm")
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
        if num_parameters == 1 or weight is None:
            return self.same(x)
        if not isinstance(x, _Tensor):
            return self.unknown()
        return self.per_channel(x, 1 if len(x.shape) >= 2 else 0, [weight], "PReLU", name)

    # ------------------------------------------------------------- plumbing

    def same(self, x: Any) -> Any:
        """An operation that leaves shape and channels alone."""
        out = self.meta()
        if not isinstance(x, _Tensor) or x.layout is None:
            return out
        if not isinstance(out, _Tensor):
            return self.problem([x], "does not return one tensor")
        if out.shape != x.shape:
            return self.problem([x], f"changes the shape {x.shape} -> {out.shape}")
        return _Tensor(out.shape, x.layout)

    def elementwise(self) -> Any:
        """Elementwise arithmetic with broadcasting: every channel-carrying operand is tied."""
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
        ref = laid[0][0].layout
        target = self.node.target
        if self.node.op == "call_method":
            stream = target in ("add", "add_", "sub", "sub_")
        else:
            stream = target in _SUM_FUNCTIONS
        for v, _ in laid[1:]:
            if not self.unify(ref, v.layout, stream):
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
        """An operation on the last ``k`` dims (pooling, padding, interpolation)."""
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
        """``roll`` / ``flip``: fine unless they move entries along the channels."""
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
        out = self.meta()
        if isinstance(x, _Tensor) and x.param is not None and isinstance(out, _Tensor):
            if len(out.shape) == len(x.shape) and self.node.target in ("expand", "expand_as", "broadcast_to"):
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
        if d == x.layout.dim:
            return _Tensor(out.shape, x.layout)
        return _Tensor(out.shape, _Layout(d, x.layout.parts, f"moved to dim {d} by node {self.node.name!r}"))

    def transpose(self, x: Any, a: int, b: int) -> Any:
        out = self.meta()
        if not isinstance(x, _Tensor) or x.layout is None:
            return out
        if not isinstance(out, _Tensor):
            return self.problem([x], "does not return one tensor")
        n = len(x.shape)
        a, b, d = _norm_dim(int(a), n), _norm_dim(int(b), n), x.layout.dim
        return self.moved(x, out, b if d == a else a if d == b else d)

    def permute_dims(self, x: Any, dims: Any) -> Any:
        out = self.meta()
        if not isinstance(x, _Tensor) or x.layout is None:
            return out
        if not isinstance(out, _Tensor):
            return self.problem([x], "does not return one tensor")
        n = len(x.shape)
        dims = [_norm_dim(int(d), n) for d in dims]
        return self.moved(x, out, dims.index(x.layout.dim))

    def movedim(self, x: Any, source: Any, destination: Any) -> Any:
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
        """``view`` / ``reshape`` / ``flatten`` / ``squeeze`` ..., followed through the shapes."""
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
        for lay in layouts[1:]:
            if not self.unify(ref, lay):
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

    # --------------------------------------------------------------- finish

    def finish(self) -> list[ChannelGroup]:
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
            for (a0, a1, sa), (b0, b1, sb) in zip(spans, spans[1:]):
                if b0 < a1 and sp.find(sa) != sp.find(sb):
                    if sp.is_fixed(sa) or sp.is_fixed(sb):
                        sp.fix(sa)
                        sp.fix(sb)
                    else:
                        reason = f"reads axis {axis} of {param!r} with two different channel layouts"
                        sp.problems[sa].append(_Problem(param, "a parameter read by several layers", reason))
        # 3. Collect by root.
        members: dict[int, list[int]] = defaultdict(list)
        for s in range(n):
            members[sp.find(s)].append(s)
        groups: list[tuple[int, int, list[str], list[str], list[Axis]]] = []
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
            creators = sorted({(c, s) for s in spaces for c in sp.creators[s]})
            # Name by the producers summed into the first one's stream, not by gates multiplied in.
            first_stream = sp.find(creators[0][1], sp.stream) if creators else -1
            naming = [c for c, s in creators if sp.find(s, sp.stream) == first_stream]
            creators = [c for c, _ in creators]
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
            groups.append(
                (order, sp.size[root], naming_names, list(dict.fromkeys(producers)), list(axes.values()), root)
            )
        groups.sort(key=lambda g: g[0])
        names = _group_names([g[2] for g in groups])
        self.group_of_root = {g[5]: name for name, g in zip(names, groups)}
        return [
            ChannelGroup(name, size, tuple(axes), tuple(producers))
            for name, (_, size, _, producers, axes, _root) in zip(names, groups)
        ]

    def carried(self, node: fx.Node) -> str | None:
        """The group whose channels, and only those, ``node``'s output holds in dim 1 (after :meth:`run`)."""
        value = self.env.get(node)
        if not isinstance(value, _Tensor) or value.layout is None or value.layout.dim != 1:
            return None
        if len(value.layout.parts) != 1 or value.layout.parts[0].repeat != 1:
            return None  # several groups side by side, or channels flattened into blocks
        return self.group_of_root.get(self.spaces.find(value.layout.parts[0].space))


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


def _flatten(values: Any) -> Iterator[Any]:
    if isinstance(values, (list, tuple)):
        for v in values:
            yield from _flatten(v)
    elif isinstance(values, dict):
        for v in values.values():
            yield from _flatten(v)
    else:
        yield values


def _reshaped(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], layout: _Layout, sizes: Sequence[int]
) -> _Layout | None:
    """Where the channels of ``layout`` land after a reshape, or ``None`` if they are split or mixed.

    The dims before the channel dim must keep their total size; the channel dim may then
    absorb the dims after it (each channel becomes a block of ``repeat`` entries) or be
    split back into channels and trailing dims when every part's blocks stay whole.
    """
    d, c = layout.dim, in_shape[layout.dim]
    before = math.prod(in_shape[:d])
    for k in range(len(out_shape)):
        if math.prod(out_shape[:k]) != before:
            continue
        o = out_shape[k]
        if o == 1 and c != 1:
            continue
        # The channel dim absorbs the following input dims.
        m, j = 1, d + 1
        while c * m <= o:
            if c * m == o:
                return _Layout(k, tuple(_Part(p.space, p.repeat * m) for p in layout.parts), layout.via)
            if j >= len(in_shape):
                break
            if in_shape[j] == 1:
                j += 1
                continue
            m *= in_shape[j]
            j += 1
        # The channel dim is split into output dim k and the dims after it.
        t, j = 1, k + 1
        while o * t < c and j < len(out_shape):
            t *= out_shape[j]
            j += 1
        if o * t == c and all(p.repeat % t == 0 for p in layout.parts):
            return _Layout(k, tuple(_Part(p.space, p.repeat // t) for p in layout.parts), layout.via)
    return None


def _group_names(creators: Sequence[Sequence[str]]) -> list[str]:
    """Name each group by the module path its producers share, else by its first producer."""
    firsts = [c[0] if c else "group" for c in creators]
    candidates = []
    for cs in creators:
        prefix = _common_path(cs) if len(cs) > 1 else ""
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


def _common_path(names: Sequence[str]) -> str:
    split = [n.split(".") for n in names]
    common: list[str] = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _unsupported(
    creators: Sequence[tuple[int, str]], size: int, problems: Sequence[_Problem], param: str | None = None
) -> UnsupportedLayerError:
    produced = ", ".join(dict.fromkeys(c for _, c in creators)) or "an unnamed layer"
    first = problems[0]
    others = list(dict.fromkeys(f"{p.node!r} ({p.op})" for p in problems[1:]))
    what = f"parameter {param!r}: node" if param else "node"
    message = (
        f"cannot permute the {size} channels produced by {produced}: {what} {first.node!r} ({first.op}) "
        f"{first.reason}."
    )
    if others:
        message += f" Also at: {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}."
    message += f" Supported: {SUPPORTED}."
    return UnsupportedLayerError(message, node=first.node, op=first.op)


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fetch_state(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer ``name`` of ``model`` (the tensor itself, not a copy)."""
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    tensor = getattr(module, attr)
    if not isinstance(tensor, torch.Tensor):
        raise KeyError(f"{name!r} is not a parameter or buffer of {type(model).__name__}")
    return tensor


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode and restore every module's own training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# ------------------------------------------------------------------- public API


def channel_groups(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]) -> list[ChannelGroup]:
    """Find the groups of parameter axes that must be permuted together.

    The model is traced with :func:`torch.fx.symbolic_trace` (in eval mode, so dropout
    and stochastic depth are identities and no BatchNorm statistics change) and run once
    on ``example_input`` to learn every tensor's shape.

    Parameters
    ----------
    model
        The network. It is not modified.
    example_input
        A batch the model accepts (e.g. ``torch.randn(2, 3, 64, 64)``), or a tuple of
        positional inputs. Use a batch size different from every channel count, so the
        batch dim is never mistaken for a channel dim in a reshape.

    Returns
    -------
    list[ChannelGroup]
        One group per independent set of permutable channels, in graph order. The
        input's channels and the output's (the logits) are never part of a group.

    Raises
    ------
    UnsupportedLayerError
        When the model cannot be traced (the message says what ``torch.fx`` reported),
        or when a group would be permuted but an operation it passes through has an
        effect on channels that is not known (the message names the node and the op).

    Warns
    -----
    UserWarning
        When channels are left out of every group because the result of an operation
        that is not understood is combined with them (e.g. the residual stream of a
        transformer, into which ``nn.MultiheadAttention`` writes): nothing is wrong, but
        those channels will not be aligned.

    Notes
    -----
    Operations after the last layer that only transform the output (``return
    torch.roll(logits, ...)``) never raise: the channels they read are the output's,
    which are never permuted. Grouped convolutions with ``1 < groups < in_channels``
    (ResNeXt, RegNet) and channel shuffles (ShuffleNet) are not supported; attention
    modules are not looked into.
    """
    return _analyse(model, example_input, fx.Tracer()).run()


def _analyse(model: nn.Module, example_input: Any, tracer: fx.Tracer) -> _Analyzer:
    """Trace ``model`` with ``tracer`` and propagate shapes; the analyzer is ready to :meth:`~_Analyzer.run`."""
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    with _eval_mode(model):
        try:
            graph = tracer.trace(model)
            gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        except Exception as exc:  # fx raises TraceError, but also NotImplementedError, TypeError, ...
            raise UnsupportedLayerError(
                f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
                "Channel groups need a model without data-dependent control flow "
                "(see the torch.fx documentation on symbolic tracing limitations)."
            ) from exc
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*inputs)
        except Exception as exc:
            raise UnsupportedLayerError(
                f"running the traced {type(model).__name__} on the example input failed: {type(exc).__name__}: {exc}"
            ) from exc
    return _Analyzer(model, gm)


class _CallTracer(fx.Tracer):
    """A tracer that also notes every module call: its first input's node and its output's node."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, list[tuple[fx.Node | None, fx.Node | None]]] = defaultdict(list)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        first = args[0] if args else next(iter(kwargs.values()), None)
        self.calls[self.path_of_module(m)].append(
            (first.node if isinstance(first, fx.Proxy) else None, out.node if isinstance(out, fx.Proxy) else None)
        )
        return out


def group_layers(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, list[str]]:
    """Where the units of every channel group can be recorded: layer names per group.

    A group's units are recorded where its channels are *read*: at every tensor that
    holds exactly the group's channels (in dim 1, one unit per channel) and is read by
    something that does not pass those channels on, such as a convolution or linear
    layer mixing them into another group, a ``cat`` with other channels, or a
    ``flatten`` of whole maps. Operations that pass the channels on (BatchNorm,
    activations, a residual sum, a gate) lead to a later tensor, and pooling, padding
    or a flatten of 1x1 maps are looked through, so

    - a plain ``conv -> bn -> relu -> conv`` chain gives the ``relu``,
    - the last maps before global pooling and the classifier give the last ``relu``
      (recording the map, not the pooled vector),
    - a residual stream gives every block output that carries it (``layer2.0``,
      ``layer2.1`` of a torchvision ResNet; the summed branches inside the blocks are
      not read by anything but the sum),
    - the stem of a ResNet gives its ``relu`` (the max pooling after it is looked
      through), which starts the stream of ``layer1``.

    Each tensor is named by the outermost module that returns it and runs once per
    forward pass, plain :class:`torch.nn.Sequential` containers aside (the block
    ``layer2.1``, not the stage ``layer2`` nor the block's shared ``relu``; a block
    ending in a BatchNorm, not the BatchNorm), else as ``<module>@in`` of the innermost
    module that reads it (``layer1.0.conv2@in`` for the activation inside a BasicBlock,
    whose ``relu`` module is called twice). Tensors with neither, e.g. a result of a
    functional call only read by other functional calls, are left out.

    Parameters
    ----------
    model
        The network. It is not modified.
    example_input
        A batch the model accepts, as for :func:`channel_groups`.

    Returns
    -------
    dict
        Group name -> layer names (``"relu1"``, ``"layer1.0"``, ``"layer1.0.conv2@in"``)
        in graph order, for every group of :func:`channel_groups`, in its order; a group
        with no recordable tensor maps to an empty list.

    Raises
    ------
    UnsupportedLayerError
        As :func:`channel_groups`.
    """
    tracer = _CallTracer()
    analyzer = _analyse(model, example_input, tracer)
    groups = analyzer.run()
    graph = analyzer.gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}

    def shape(node: fx.Node) -> tuple[int, ...] | None:
        value = analyzer.env.get(node)
        return value.shape if isinstance(value, _Tensor) else None

    def resamples(node: fx.Node, group: str) -> bool:
        """Same channels as an input, resampled: pooling, padding, interpolation, a flatten of 1x1 maps.

        Pooling counts even where the traced maps are already 1x1 (the same shape out).
        """
        return analyzer.carried(node) == group and any(
            analyzer.carried(i) == group and (shape(i) != shape(node) or node in analyzer.resampling)
            for i in node.all_input_nodes
        )

    def read_elsewhere(node: fx.Node, group: str) -> bool:
        """Whether a user of ``node`` (looking through resampling) does not pass the group's channels on."""
        for user in node.users:
            if user.op == "output" or not isinstance(analyzer.env.get(user), (_Tensor, tuple, list, dict)):
                continue  # the model's result (never a group), or sizes, dims and dtypes
            if resamples(user, group):
                if read_elsewhere(user, group):
                    return True
            elif analyzer.carried(user) != group:
                return True
        return False

    # Modules that run once per forward pass, keyed by the node they return and the node they read.
    returns: dict[fx.Node, list[str]] = defaultdict(list)
    reads: dict[fx.Node, list[str]] = defaultdict(list)
    for name, calls in tracer.calls.items():
        if len(calls) == 1 and name:
            read, returned = calls[0]
            if returned is not None:
                returns[returned].append(name)
            if read is not None:
                reads[read].append(name)

    def depth(name: str) -> int:
        return name.count(".")

    def returned_by(names: list[str]) -> str:
        # Nested modules returning one tensor (a stage, its last block, the block's last
        # BatchNorm): the outermost that is not a plain Sequential, i.e. the block.
        named = [n for n in names if type(model.get_submodule(n)) is not nn.Sequential]
        return min(named, key=depth) if named else max(names, key=depth)

    found: dict[str, list[str]] = {g.name: [] for g in groups}
    for node in sorted(analyzer.env, key=order.__getitem__):
        group = analyzer.carried(node)
        if group is None or resamples(node, group) or not read_elsewhere(node, group):
            continue
        if returns.get(node):
            layer = returned_by(returns[node])
        elif reads.get(node):
            layer = max(reads[node], key=depth) + "@in"  # the layer reading it, not a block around it
        else:
            continue
        if layer not in found[group]:
            found[group].append(layer)
    return found


def _group_lookup(groups: Iterable[ChannelGroup], names: Iterable[str]) -> dict[str, ChannelGroup]:
    by_name = {g.name: g for g in groups}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown channel groups {unknown}; the groups are {sorted(by_name)}")
    return by_name


def _as_perm(perm: np.ndarray | torch.Tensor, size: int, name: str) -> np.ndarray:
    p = perm.detach().cpu().numpy() if isinstance(perm, torch.Tensor) else np.asarray(perm)
    if p.shape != (size,) or not np.array_equal(np.sort(p), np.arange(size)):
        raise ValueError(
            f"the permutation of group {name!r} must hold each of 0..{size - 1} once, got shape {p.shape}"
        )
    return p.astype(np.int64)


def permute(
    model: nn.Module, perms: Mapping[str, np.ndarray | torch.Tensor], groups: Sequence[ChannelGroup]
) -> nn.Module:
    """Return a copy of ``model`` with the channels of some groups permuted.

    Parameters
    ----------
    model
        The network; it is not modified.
    perms
        For a group name, a permutation ``perm`` of its channels: the new channel ``i``
        is the old channel ``perm[i]``. Groups not listed keep their order.
    groups
        The model's groups, from :func:`channel_groups`.

    Returns
    -------
    torch.nn.Module
        A deep copy with every axis of every permuted group (weights, biases,
        BatchNorm running statistics, ...) re-indexed. It computes the same function.

    Raises
    ------
    ValueError
        For an unknown group name or an array that is not a permutation of its size.
    """
    by_name = _group_lookup(groups, perms)
    new = copy.deepcopy(model)
    # One index per (parameter, axis): the groups touching it own disjoint blocks.
    index: dict[tuple[str, int], np.ndarray] = {}
    for name, perm in perms.items():
        group = by_name[name]
        p = _as_perm(perm, group.size, name)
        for ax in group.axes:
            key = (ax.param, ax.axis)
            if key not in index:
                index[key] = np.arange(_fetch_state(new, ax.param).shape[ax.axis])
            start, stop = ax.span(group.size)
            index[key][start:stop] = ax.entries(p)
    with torch.no_grad():
        for (param, axis), idx in index.items():
            tensor = _fetch_state(new, param)
            tensor.copy_(tensor.index_select(axis, torch.from_numpy(idx).to(tensor.device)))
    return new


def random_permutations(groups: Iterable[ChannelGroup], seed: int = 0) -> dict[str, np.ndarray]:
    """Draw one random permutation per group.

    Parameters
    ----------
    groups
        Channel groups.
    seed
        Seed of the NumPy generator; the same seed gives the same permutations.

    Returns
    -------
    dict[str, numpy.ndarray]
        ``{group name: permutation of range(size)}``.
    """
    rng = np.random.default_rng(seed)
    return {g.name: rng.permutation(g.size) for g in groups}


def _output_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _output_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _output_tensors(v)]
    return []


def _relative_difference(a: Any, b: Any) -> float:
    ta, tb = _output_tensors(a), _output_tensors(b)
    scale = max((float(t.abs().max()) for t in ta if t.numel()), default=0.0)
    diff = max((float((x - y).abs().max()) for x, y in zip(ta, tb) if x.numel()), default=0.0)
    return diff / scale if scale > 0 else diff


def check_equivalence(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    *,
    groups: Sequence[ChannelGroup] | None = None,
    seed: int = 0,
    rtol: float = 1e-4,
) -> float:
    """Check that permuting every group leaves the model's function unchanged.

    Every group is permuted at random and both models are run on ``example_input`` in
    eval mode (the model's own training flags are restored afterwards).

    Parameters
    ----------
    model
        The network; it is not modified.
    example_input
        A batch the model accepts, or a tuple of positional inputs.
    groups
        The groups to permute; by default :func:`channel_groups` of the model.
    seed
        Seed of the random permutations.
    rtol
        Largest accepted difference, relative to the largest absolute output.

    Returns
    -------
    float
        ``max |permuted - original| / max |original|`` over the outputs.

    Raises
    ------
    EquivalenceError
        When the difference exceeds ``rtol``; the message names the groups whose
        permutation alone changes the output.
    """
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    groups = channel_groups(model, example_input) if groups is None else list(groups)
    perms = random_permutations(groups, seed)
    with _eval_mode(model), torch.no_grad():
        reference = model(*inputs)
        permuted = permute(model, perms, groups).eval()
        err = _relative_difference(reference, permuted(*inputs))
        if err <= rtol:
            return err
        culprits = []
        for g in groups:  # find the groups that break the model on their own
            alone = permute(model, {g.name: perms[g.name]}, groups).eval()
            if _relative_difference(reference, alone(*inputs)) > rtol:
                culprits.append(g.name)
    names = culprits or [g.name for g in groups]
    which = "groups whose permutation alone changes it" if culprits else "no single group does it alone; groups"
    raise EquivalenceError(
        f"the permuted {type(model).__name__} differs from the original by {err:.3g} (relative, rtol {rtol:g}); "
        f"{which}: {', '.join(repr(n) for n in names)}",
        groups=names,
    )


def permutation_matrix(perm: np.ndarray | torch.Tensor | Sequence[int], unit_coords: Any = None) -> xr.DataArray:
    """A permutation as a labelled 0/1 matrix, as stored in an :class:`~mergescope.Alignment`.

    Parameters
    ----------
    perm
        ``perm[j]`` is the model's unit that goes to position ``j`` (the reference's unit
        ``j``), as in :func:`permute`.
    unit_coords
        Coordinate values of the units (both dims); ``range(len(perm))`` by default.

    Returns
    -------
    xarray.DataArray
        Dims ``("unit", "unit_ref")`` with ``P[perm[j], j] = 1`` and zeros elsewhere.
    """
    p = np.asarray(perm.detach().cpu().numpy() if isinstance(perm, torch.Tensor) else perm, dtype=np.int64)
    n = len(p)
    _as_perm(p, n, "perm")
    matrix = np.zeros((n, n))
    matrix[p, np.arange(n)] = 1.0
    coords = np.arange(n) if unit_coords is None else np.asarray(unit_coords)
    return xr.DataArray(matrix, dims=("unit", "unit_ref"), coords={"unit": coords, "unit_ref": coords})


def perm_from_matrix(matrix: xr.DataArray | np.ndarray, atol: float = 1e-6) -> np.ndarray:
    """The permutation held by a permutation matrix (inverse of :func:`permutation_matrix`).

    Parameters
    ----------
    matrix
        A DataArray with dims ``("unit", "unit_ref")`` (in any order) or a plain array
        indexed ``[unit, unit_ref]``.
    atol
        Tolerance on the 0 and 1 entries.

    Returns
    -------
    numpy.ndarray
        ``perm`` with ``perm[j]`` the unit (position, not coordinate) going to position ``j``.

    Raises
    ------
    ValueError
        When the matrix is not a permutation matrix.
    """
    if isinstance(matrix, xr.DataArray):
        values = matrix.transpose("unit", "unit_ref").values
    else:
        values = np.asarray(matrix)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"a permutation matrix must be square, got shape {values.shape}")
    perm = values.argmax(axis=0)
    expected = np.zeros_like(values, dtype=float)
    expected[perm, np.arange(len(perm))] = 1.0
    if not np.allclose(values, expected, atol=atol) or len(set(perm.tolist())) != len(perm):
        raise ValueError("the matrix is not a permutation matrix (one 1 per row and column, zeros elsewhere)")
    return perm.astype(np.int64)


def maps_from_transforms(transforms: Mapping[str, xr.DataArray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Turn an alignment's transforms into the maps :func:`apply_linear` takes.

    Parameters
    ----------
    transforms
        ``{group: M}`` with ``M`` of dims ``("unit", "unit_ref")``, as in
        ``Alignment.transforms[model]``: aligned activations are ``a @ M``.

    Returns
    -------
    dict[str, tuple[numpy.ndarray, numpy.ndarray]]
        ``{group: (T, T_inv)}`` with ``T = M.T`` (so ``new = T @ old``) and ``T_inv`` its
        inverse (the pseudo-inverse when ``T`` is singular).
    """
    maps = {}
    for name, m in transforms.items():
        t = np.asarray(m.transpose("unit", "unit_ref").values, dtype=np.float64).T
        try:
            t_inv = np.linalg.inv(t)
        except np.linalg.LinAlgError:
            t_inv = np.linalg.pinv(t)
        maps[name] = (t, t_inv)
    return maps


def _is_permutation_matrix(t: np.ndarray) -> bool:
    return bool(
        np.all((t == 0) | (t == 1)) and np.all(t.sum(axis=0) == 1) and np.all(t.sum(axis=1) == 1)
    )


def apply_linear(
    model: nn.Module,
    maps: Mapping[str, tuple[np.ndarray, np.ndarray]],
    groups: Sequence[ChannelGroup],
    *,
    per_channel: Literal["error", "mix"] = "error",
) -> nn.Module:
    """Return a copy of ``model`` with the channels of some groups transformed by linear maps.

    For group ``g`` with maps ``(T, T_inv)`` (both ``size x size``, ``T`` acting on the
    group's activation vectors: ``new = T @ old``):

    - axes with role ``"output"`` (producers' weights and biases) are multiplied by ``T``,
      so the producers compute ``T @ h``;
    - axes with role ``"input"`` (consumers' weights) are multiplied by ``T_inv`` on the
      right, so ``W @ h = (W T_inv) @ (T h)``; ``repeat`` blocks (a flatten before a
      linear layer) are transformed block by block;
    - axes with role ``"channel"`` (BatchNorm scale, shift and running statistics,
      depthwise filters, layer scales) hold one value per channel, which a general
      linear map cannot transform exactly. With ``per_channel="error"`` (the default) a
      group that has such axes accepts only permutation matrices. With
      ``per_channel="mix"`` every new channel ``i`` takes the average of the old
      channels' values weighted by ``|T[i, j]|`` (rows of ``|T|`` normalised to sum 1;
      an all-zero row keeps channel ``i``'s value), which is exact for permutations and
      an approximation otherwise — re-estimate BatchNorm statistics afterwards.

    The result computes the same function when every ``T`` is a permutation matrix (it
    then equals :func:`permute`). For other maps it is exact only when nothing between
    producers and consumers acts per channel: an elementwise nonlinearity such as ReLU
    does not commute with ``T``, which is the approximation CCA merging accepts.

    Parameters
    ----------
    model
        The network; it is not modified.
    maps
        ``{group name: (T, T_inv)}``; groups not listed are unchanged. ``T_inv`` may be
        ``None`` for ``inv(T)``. :func:`maps_from_transforms` builds these from an
        alignment's transforms.
    groups
        The model's groups, from :func:`channel_groups`.
    per_channel
        ``"error"`` or ``"mix"``, see above.

    Returns
    -------
    torch.nn.Module
        The transformed deep copy.

    Raises
    ------
    ValueError
        For an unknown group, maps of the wrong shape, or (with ``per_channel="error"``)
        a map that is not a permutation on a group with per-channel axes.
    """
    if per_channel not in ("error", "mix"):
        raise ValueError(f"per_channel must be 'error' or 'mix', got {per_channel!r}")
    by_name = _group_lookup(groups, maps)
    new = copy.deepcopy(model)
    with torch.no_grad():
        for name, (t, t_inv) in maps.items():
            group = by_name[name]
            t = np.asarray(t, dtype=np.float64)
            t_inv = np.linalg.inv(t) if t_inv is None else np.asarray(t_inv, dtype=np.float64)
            if t.shape != (group.size, group.size) or t_inv.shape != (group.size, group.size):
                raise ValueError(
                    f"the maps of group {name!r} must be {group.size} x {group.size}, got {t.shape} and {t_inv.shape}"
                )
            channel_axes = [ax for ax in group.axes if ax.role == "channel"]
            if channel_axes and per_channel == "error" and not _is_permutation_matrix(t):
                listed = ", ".join(sorted({ax.param for ax in channel_axes})[:4])
                raise ValueError(
                    f"group {name!r} has per-channel parameters ({listed}, ...) that a general linear map cannot "
                    "transform exactly; pass a permutation matrix, or per_channel='mix' to average them"
                )
            weights = np.abs(t)
            rows = weights.sum(axis=1, keepdims=True)
            mix = np.where(rows > 0, weights / np.where(rows > 0, rows, 1.0), np.eye(group.size))
            matrices = {"output": t, "input": t_inv.T, "channel": mix}
            for ax in group.axes:
                _transform_axis(_fetch_state(new, ax.param), ax, group.size, matrices[ax.role])
    return new


def _transform_axis(tensor: torch.Tensor, ax: Axis, size: int, matrix: np.ndarray) -> None:
    """In place: entries of ``ax``'s block become ``matrix @ block`` over the channel index."""
    start, stop = ax.span(size)
    moved = tensor.movedim(ax.axis, 0)
    block = moved[start:stop]
    rest = block.shape[1:]
    values = block.reshape(size, ax.repeat, -1).double()
    m = torch.from_numpy(matrix).to(device=tensor.device)
    result = torch.einsum("ij,jrk->irk", m, values).reshape(size * ax.repeat, *rest)
    block.copy_(result.to(tensor.dtype))


def example_input(data: Any, count: int = 2) -> torch.Tensor:
    """A small batch of real images from a dataset, for tracing with :func:`channel_groups`."""
    if data is None or len(data) == 0:
        raise ValueError("finding channel groups needs example images, but there is no data")
    return torch.stack([data[i][0] for i in range(min(count, len(data)))])


def align_to_reference(
    models: Mapping[str, nn.Module], alignment: Any, groups: Sequence[ChannelGroup]
) -> dict[str, nn.Module]:
    """Map every model into the reference's unit order (or space) with an alignment.

    Parameters
    ----------
    models
        Name -> model; the alignment's reference and models it has no transforms for
        are returned unchanged (copies are made only for transformed models).
    alignment
        A :class:`mergescope.Alignment` whose groups are those of ``groups``.
    groups
        The architecture's groups (:func:`channel_groups` of the reference).

    Returns
    -------
    dict
        Name -> aligned model: permuted when every transform is a permutation matrix
        (the function is unchanged), else transformed with :func:`apply_linear`
        (per-channel quantities mixed; re-estimate BatchNorm statistics afterwards).
    """
    known = {g.name for g in groups}
    out: dict[str, nn.Module] = {}
    for name, model in models.items():
        transforms = alignment.transforms.get(name)
        if not transforms or name == alignment.reference:
            out[name] = model
            continue
        unknown = sorted(set(transforms) - known)
        if unknown:
            raise ValueError(
                f"the alignment of {name!r} has groups {unknown} that this architecture does not have "
                f"(its groups: {', '.join(sorted(known))})"
            )
        matrices = {g: np.asarray(t.transpose("unit", "unit_ref").values) for g, t in transforms.items()}
        if all(_is_permutation_matrix(m) for m in matrices.values()):
            out[name] = permute(model, {g: perm_from_matrix(t) for g, t in transforms.items()}, groups)
        else:
            out[name] = apply_linear(model, maps_from_transforms(transforms), groups, per_channel="mix")
    return out
