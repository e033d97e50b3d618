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

    def new(self, size: int, *, fixed: bool = False) -> int:
        """Add a space of ``size`` channels (``fixed``: never permuted) and return its index."""
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
