"""What the analyzer tracks: channel spaces, tensor layouts and pure helpers on them.

The analysis represents every value of the traced graph as a :class:`_Tensor` (its
shape, and where it carries permutable channels: a :class:`_Layout` made of
:class:`_Part`\\ s, one per channel space laid along the channel dim) or as
:data:`_OTHER`; channel spaces live in a union-find (:class:`_Spaces`) that also
collects the parameter axes and the problems of each space. These values, and the
helpers that need no analyzer state (:func:`_reshaped`, :func:`_flatten`,
:func:`_norm_dim`, the state-dict look-ups), are kept apart so that both the op
handlers (:mod:`.handlers`) and the analyzer (:mod:`.analyzer`) can use them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .model import Axis


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
class _Heads:
    """Where a tensor carries attention channels split over two dims: heads and the dims within a head.

    ``spaces`` holds one channel space per entry of dim ``part`` (the packed query, key
    and value of one projection, before they are taken apart), or a single space when
    ``part is None``. ``head`` is the dim of the heads; ``inner`` the dim within a head,
    or ``None`` for attention scores ``q k^T``, which keep the heads but no channel of them.
    """

    spaces: tuple[int, ...]
    head: int
    inner: int | None
    part: int | None = None

    def moved(self, where: Sequence[int]) -> _Heads:
        """The same channels after a move of dims: old dim ``i`` lands at ``where[i]``."""
        return _Heads(
            self.spaces,
            where[self.head],
            None if self.inner is None else where[self.inner],
            None if self.part is None else where[self.part],
        )


@dataclass(frozen=True)
class _Tensor:
    """A tensor flowing through the graph, as far as channels are concerned.

    ``layout is None``: the tensor carries no channels we may permute (the input, a
    constant, a reduction over channels), unless ``heads`` holds attention channels.
    ``param`` names a parameter or buffer read with ``get_attr`` (possibly broadcast by
    ``expand``, cast, or given size-1 dims by ``view``), ``param_shape`` its stored shape
    and ``param_axes`` the parameter's axis behind each dim of the tensor (``None`` for
    an added size-1 dim; an empty tuple: the same dims as the parameter).
    """

    shape: tuple[int, ...]
    layout: _Layout | None = None
    param: str | None = None
    param_shape: tuple[int, ...] = ()
    heads: _Heads | None = None
    param_axes: tuple[int | None, ...] = ()

    def param_axis(self, dim: int) -> int | None:
        """The axis of :attr:`param` behind the tensor's ``dim`` (``None``: a dim the parameter lacks)."""
        if not self.param_axes:
            return dim if 0 <= dim < len(self.param_shape) else None
        return self.param_axes[dim] if 0 <= dim < len(self.param_axes) else None

    def param_size(self, dim: int) -> int:
        """The parameter's stored size behind the tensor's ``dim`` (1 for a dim it lacks)."""
        axis = self.param_axis(dim)
        return 1 if axis is None else self.param_shape[axis]


class _Other:
    """A non-tensor value (a size, a dtype, ``None``)."""

    def __repr__(self) -> str:
        """``<other>``, in debugging output."""
        return "<other>"


_OTHER = _Other()


@dataclass
class _Problem:
    """Why a channel space cannot be permuted: the node at fault, what it does, and the reason."""

    node: str
    op: str
    reason: str


class _Spaces:
    """Union-find over channel spaces, with what each space touches."""

    def __init__(self) -> None:
        """An empty union-find."""
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
        # Attention heads: the number of head blocks of each root (1: none; 0: two counts clash).
        self.heads: list[int] = []
        # A third partition, of spaces sharing a head permutation (one attention layer), and its keys.
        self.tied: list[int] = []
        self.tie_key: list[str] = []

    def new(self, size: int, *, fixed: bool = False) -> int:
        """Add a space of ``size`` channels (``fixed``: never permuted) and return its index."""
        self.parent.append(len(self.parent))
        self.stream.append(len(self.stream))
        self.tied.append(len(self.tied))
        self.tie_key.append("")
        self.heads.append(1)
        self.size.append(int(size))
        self.fixed.append(fixed)
        self.returned.append(False)
        self.axes.append([])
        self.creators.append([])
        self.producers.append([])
        self.problems.append([])
        return len(self.parent) - 1

    def find(self, i: int, parent: list[int] | None = None) -> int:
        """The root of space ``i`` in ``parent``: the group partition by default, or :attr:`stream`."""
        parent = self.parent if parent is None else parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    def union(self, a: int, b: int, stream: bool = False) -> None:
        """Tie spaces ``a`` and ``b`` (of equal size); ``stream``: they are also summed into one stream."""
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
        self.set_heads(ra, self.heads[rb])
        self.tie(ra, rb)

    def set_heads(self, i: int, heads: int) -> None:
        """Split the group of space ``i`` into ``heads`` head blocks (a different count already set clashes: 0)."""
        root = self.find(i)
        have = self.heads[root]
        self.heads[root] = heads if have == 1 else have if heads in (1, have) else 0

    def tie(self, a: int, b: int, key: str = "") -> None:
        """Make spaces ``a`` and ``b`` share their head permutation; ``key`` names the shared permutation."""
        ta, tb = self.find(a, self.tied), self.find(b, self.tied)
        ta, tb = min(ta, tb), max(ta, tb)
        self.tied[tb] = ta
        self.tie_key[ta] = self.tie_key[ta] or key or self.tie_key[tb]

    def fix(self, i: int) -> None:
        """Keep the group of space ``i`` in place (it joins no channel group)."""
        self.fixed[self.find(i)] = True

    def is_fixed(self, i: int) -> bool:
        """Whether the group of space ``i`` is kept in place."""
        return self.fixed[self.find(i)]


def _norm_dim(d: int, n: int) -> int:
    """``d`` as a non-negative dim of a tensor with ``n`` dims."""
    return d + n if d < 0 else d


def _flatten(values: Any) -> Iterator[Any]:
    """Every leaf of nested lists, tuples and dict values, in order."""
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


def _unit_dims(x: _Tensor, shape: Sequence[int]) -> tuple[int | None, ...] | None:
    """The parameter axes of ``x`` (a parameter's view) behind each dim of ``shape``, when ``shape`` only
    adds or drops size-1 dims; ``None`` otherwise.
    """
    kept = [i for i, n in enumerate(x.shape) if n != 1]
    axes: list[int | None] = []
    for n in shape:
        if n == 1:
            axes.append(None)
            continue
        if not kept or x.shape[kept[0]] != n:
            return None
        axes.append(x.param_axis(kept.pop(0)))
    return tuple(axes) if not kept else None


def _common_prefix(names: Sequence[str]) -> str:
    """The dotted module path shared by all ``names`` (``""`` when they share none)."""
    common: list[str] = []
    for parts in zip(*(n.split(".") for n in names)):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _fetch(root: nn.Module, target: str) -> Any:
    """The attribute at the dotted path ``target`` of ``root`` (what a ``get_attr`` node reads)."""
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
