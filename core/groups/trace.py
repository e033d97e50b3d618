"""The entry points that trace a model: channel_groups, group_layers, example_input.

Tracing happens here: :func:`torch.fx.symbolic_trace`-style tracing in eval mode, then
one shape-propagating run on the example input (:func:`_analyse`); the traced graph is
then handed to the analyzer (:mod:`.analyzer`). :func:`group_layers` traces with
:class:`_CallTracer`, which also notes every module call, to name the layers where a
group's units can be recorded. :func:`_eval_mode` is shared with the equivalence check
and with :mod:`mergescope.activations`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .analyzer import _Analyzer
from .model import ChannelGroup, UnsupportedLayerError
from .values import _Tensor


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
        that is not understood is combined with them: nothing is wrong, but those
        channels will not be aligned.

    Notes
    -----
    Operations after the last layer that only transform the output (``return
    torch.roll(logits, ...)``) never raise: the channels they read are the output's,
    which are never permuted. Grouped convolutions with ``1 < groups < in_channels``
    (ResNeXt, RegNet) and channel shuffles (ShuffleNet) are not supported.

    Transformers: the residual stream is one group (patch embedding, class token,
    position embedding, every LayerNorm's affine parameters, the head's input); each
    attention layer gives a query/key group and a value/output group, split into
    ``heads`` blocks and ``tied`` to one head order (``nn.MultiheadAttention`` as a
    module; a packed ``qkv`` linear reshaped into heads, then
    ``F.scaled_dot_product_attention`` or ``softmax(q @ k^T) @ v``, as timm traces);
    each MLP's hidden units are a group. A LayerNorm over the dims within a head
    (``qk_norm``) and per-head attention weights returned by
    ``nn.MultiheadAttention(average_attn_weights=False)`` are refused.
    """
    return _analyse(model, example_input, fx.Tracer()).run()


def _analyse(model: nn.Module, example_input: Any, tracer: fx.Tracer) -> _Analyzer:
    """Trace ``model`` with ``tracer`` and propagate shapes; the analyzer is ready to :meth:`~_Analyzer.run`."""
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    device = next((p.device for p in model.parameters()), None)
    if device is not None:  # example images come from the dataset, on the CPU: run them where the model is
        inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
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
        """Start with no module call noted."""
        super().__init__()
        self.calls: dict[str, list[tuple[fx.Node | None, fx.Node | None]]] = defaultdict(list)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Trace the call as usual; note its first input's node and its output's node under its path."""
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


def example_input(data: Any, count: int = 2) -> torch.Tensor:
    """A small batch of real images from a dataset, for tracing with :func:`channel_groups`."""
    if data is None or len(data) == 0:
        raise ValueError("finding channel groups needs example images, but there is no data")
    return torch.stack([data[i][0] for i in range(min(count, len(data)))])
