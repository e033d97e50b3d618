"""The public values of channel grouping: axes, groups and the two errors.

:class:`Axis` and :class:`ChannelGroup` are what :func:`~mergescope.groups.channel_groups`
returns and what every consumer reads (:func:`~mergescope.groups.permute`,
:func:`~mergescope.groups.apply_linear`, the alignment plugins);
:class:`UnsupportedLayerError` and :class:`EquivalenceError` are what the analysis and
the equivalence check raise. They sit at the bottom of the package, free of any
tracing machinery, so that every other module (and a caller that only handles groups)
can use them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import numpy as np

from ..errors import MergescopeError

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
    """attrs validator of :attr:`Axis.role`."""
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
        the channels are computed here; also a parameter added to the channels or
        concatenated among them, such as a position embedding or a class token), ``"input"`` (a consumer's input axis: the
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
        Empty for the channels of attention heads, which no module returns alone.
    heads
        Number of attention heads the channels are split into: ``heads`` contiguous
        blocks of ``size // heads`` channels, head ``h`` owning channels
        ``h * d : (h + 1) * d``. A permutation may only move a block as a whole (heads
        are permuted as wholes) and reorder the channels inside each block freely:
        ``perm[h * d + i] = head_perm[h] * d + within[h][i]``
        (:func:`~mergescope.groups.head_permutation`). ``1`` for every other group, whose
        permutations are unconstrained.
    tied
        Groups with the same non-empty key share their head permutation ``head_perm``
        (their ``within`` parts stay independent): the query/key group and the
        value/output group of one attention layer, keyed by the attention's module path.
        ``""`` (the default): the group is permuted on its own.

    Notes
    -----
    In a multi-head attention layer ``softmax(q_h k_h^T / sqrt(d)) v_h W_o,h`` summed over
    heads ``h``, the function is unchanged when (1) the heads are reordered as wholes, the
    same way for ``q``, ``k``, ``v`` and the output projection's input, (2) within a head
    the query and key dimensions are permuted together (``q_h k_h^T`` is a sum over them),
    and (3) within a head the value dimensions and the output projection's input are
    permuted together. The query/key dimensions form one group and the value/output
    dimensions another, both with ``heads`` set and one ``tied`` key.
    """

    name: str
    size: int
    axes: tuple[Axis, ...]
    producers: tuple[str, ...]
    heads: int = 1
    tied: str = ""

    @property
    def head_size(self) -> int:
        """Channels per head (``size // heads``; the whole group when ``heads == 1``)."""
        return self.size // self.heads

    @property
    def params(self) -> tuple[str, ...]:
        """Distinct parameter / buffer names among :attr:`axes`, in order."""
        return tuple(dict.fromkeys(a.param for a in self.axes))


def _group_lookup(groups: Iterable[ChannelGroup], names: Iterable[str]) -> dict[str, ChannelGroup]:
    """The groups by name, after checking that each of ``names`` is one of them."""
    by_name = {g.name: g for g in groups}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown channel groups {unknown}; the groups are {sorted(by_name)}")
    return by_name
