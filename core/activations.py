"""Recording activations as labelled xarray tensors (the activation contract).

One DataArray per (model, layer), named ``activation``:

- dims ``("sample", "unit")`` for channel summaries (conv maps reduced by mean or max
  over space, token layers by their class token or mean token),
  ``("sample", "unit", "y", "x")`` for full maps, ``("sample", "unit", "token")`` for
  every token of a token layer (:mod:`mergescope.tokens`);
- coords ``sample`` (the dataset's stable sample id), ``unit`` (channel index),
  ``label`` (class of each sample, on ``sample``), ``token`` (token position, on a
  token map), and scalar coords ``model`` and ``layer``.

A collection is an :class:`xarray.DataTree` ``/<model>/<layer>`` whose nodes hold a
Dataset with the ``activation`` variable. Components never read ``.attrs``.

Layer selectors (:func:`resolve_layers`) name a module's output; the suffix ``"@in"``
records its input instead, and ``"@patches"`` (a ``Conv2d`` only) records its input
unfolded into the patches each output position reads (:func:`input_patches`): units
``C_in * kh * kw`` in the order of ``weight.reshape(C_out, -1)``, one map position per
output position, so the statistics over positions of ``conv@patches`` are those of the
linear regression the convolution computes.
"""

from __future__ import annotations

import fnmatch
import traceback
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import xarray as xr
from torch import nn

from . import groups as _groups
from .errors import ConfigError, ContractError, closest, did_you_mean
from .loading import make_loader, to_device
from .progress import Progress, silent
from .storage import load_tree, save_tree
from .tokens import (
    DEFAULT_TOKENS,
    TOKEN_DIMS,
    TOKENS,
    batch_first,
    check_tokens,
    require_token_layers,
    token_grid,
    token_summary,
)
from .values import ImageDataset, model_device

__all__ = [
    "units_label",
    "score_coords",
    "describe_scores",
    "VARIABLE",
    "REDUCTIONS",
    "TOKENS",
    "token_grid",
    "collect",
    "layer_names",
    "resolve_layers",
    "attach_recorders",
    "check_single_calls",
    "summarise",
    "owned_array",
    "INPUT_SUFFIX",
    "PATCHES_SUFFIX",
    "input_patches",
    "GROUP_PREFIX",
    "uses_groups",
    "make_activation",
    "validate_activation",
    "validate_collection",
    "check_metric_inputs",
    "paired_chunks",
    "read_rows",
    "READ_BYTES",
    "spatial_summary",
    "to_tree",
    "save_collection",
    "load_collection",
]

VARIABLE = "activation"
REDUCTIONS = ("mean", "max")
#: Most bytes of one input read by one computation from a dask-backed recording (a stored
#: chunk may be a whole shard of a joined store): the readers' bound on memory.
READ_BYTES = 64 * 2**20
_SUMMARY_DIMS = ("sample", "unit")
_MAP_DIMS = ("sample", "unit", "y", "x")


#: Suffix of a layer name that records the module's input (e.g. a ReLU's pre-activation).
INPUT_SUFFIX = "@in"

#: Suffix of a ``Conv2d``'s name that records its input unfolded into patches (:func:`input_patches`).
PATCHES_SUFFIX = "@patches"

#: Prefix of a selector that picks the layers carrying channel groups (``group:*``).
GROUP_PREFIX = "group:"

# Side lengths tried, in order, when a group selector has no example input to trace with.
_GUESSED_SIDES = (32, 64, 28, 224, 299)

# Model -> {(input shape, module structure): group -> layers}; tracing a model takes ~0.1-0.5 s.
_GROUP_LAYERS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, dict[str, list[str]]]] = weakref.WeakKeyDictionary()


def input_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The patches of ``x`` that ``conv`` reads, ``(batch, C_in * kh * kw, out_h, out_w)``.

    Entry ``[n, (c, i, j), y, x]`` is the input value that ``conv.weight[:, c, i, j]``
    multiplies at output position ``(y, x)`` (stride, padding, its mode and dilation
    included), so ``conv(x)`` equals ``weight.reshape(C_out, -1) @ patches`` plus the bias
    at every position (for ``groups == 1``).
    """
    padding: Any = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        # Pad as the convolution does ("same", reflect, replicate, circular), then unfold unpadded.
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = torch.nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    cols = torch.nn.functional.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    pad_h = padding if isinstance(padding, int) else padding[0]
    out_h = (x.shape[-2] + 2 * pad_h - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
    return cols.reshape(x.shape[0], cols.shape[1], out_h, -1)


def layer_names(model: nn.Module) -> list[str]:
    """Names of every submodule that can be recorded, in definition order."""
    return [name for name, _ in model.named_modules() if name]


def uses_groups(layers: Sequence[str]) -> bool:
    """Whether any selector is a ``group:`` selector (which needs an example input to trace)."""
    return any(selector.startswith(GROUP_PREFIX) for selector in layers)


def _type_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _guessed_inputs(model: nn.Module) -> list[torch.Tensor]:
    """Random batches shaped for the model's first convolution or linear layer, most likely first."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))), None)
    if isinstance(first, nn.Linear):
        return [torch.randn(2, first.in_features)]
    if isinstance(first, nn.modules.conv._ConvNd):
        dims = len(first.kernel_size)
        return [torch.randn(2, first.in_channels, *(side,) * dims) for side in _GUESSED_SIDES]
    return []


def _runs_on(model: nn.Module, x: torch.Tensor) -> bool:
    with _groups._eval_mode(model), torch.no_grad():
        try:
            model(x.to(model_device(model)))
        except Exception:  # any failure means: not this input shape
            return False
    return True


def _group_layers(
    model: nn.Module, example_input: torch.Tensor | None, model_name: str, selector: str
) -> dict[str, list[str]]:
    """:func:`mergescope.groups.group_layers` of ``model``, cached per model and input shape."""
    structure = tuple((name, type(m)) for name, m in model.named_modules())
    shape = tuple(example_input.shape) if example_input is not None else None
    cache = _GROUP_LAYERS.setdefault(model, {})
    if (shape, structure) in cache:
        return cache[(shape, structure)]
    where = f"layer selector {selector!r} of model {model_name!r}"
    x: torch.Tensor | None
    if example_input is not None:
        x = example_input
    else:
        # Group membership follows the graph, not the image size: any input the model
        # accepts traces to the same groups.
        x = next((c for c in _guessed_inputs(model) if _runs_on(model, c)), None)
        if x is None:
            raise ConfigError(
                f"{where}: finding the channel groups needs an example input, and none of the shapes tried "
                "for the model's first layer runs; record with data (collect, collect_store) or pass "
                "example_input to resolve_layers",
                where="key 'layers'",
            )
    try:
        found = _groups.group_layers(model, x)
    except _groups.UnsupportedLayerError as exc:
        raise ConfigError(f"{where}: the model's channel groups cannot be found: {exc}", where="key 'layers'") from exc
    cache[(shape, structure)] = found
    return found


def _match_groups(model: nn.Module, selector: str, example_input: torch.Tensor | None, model_name: str) -> list[str]:
    """The layer names of a ``group:<name or glob>`` selector, in group order."""
    pattern = selector[len(GROUP_PREFIX) :]
    by_group = _group_layers(model, example_input, model_name, selector)
    names = list(by_group)
    glob = any(c in pattern for c in "*?[")
    if glob:
        matched = [g for g in names if fnmatch.fnmatchcase(g, pattern)]
    else:
        matched = [pattern] if pattern in by_group else []
    listing = f"Its channel groups: {', '.join(names)}." if names else "It has no channel groups."
    if not matched:
        guess = closest(pattern, names)
        hint = f" Did you mean 'group:{guess}'?" if guess else ""
        raise ConfigError(
            f"layer selector {selector!r}: model {model_name!r} has no channel group "
            f"{'matching ' if glob else ''}{pattern!r}.{hint} {listing}",
            where="key 'layers'",
        )
    layers = [layer for g in matched for layer in by_group[g]]
    if not layers:
        raise ConfigError(
            f"layer selector {selector!r}: the channel group(s) {', '.join(matched)} of model {model_name!r} "
            "are read only by functional calls, so no module output or input carries them; select layers by name",
            where="key 'layers'",
        )
    return layers


def resolve_layers(
    model: nn.Module,
    layers: Sequence[str],
    model_name: str = "model",
    *,
    example_input: torch.Tensor | None = None,
) -> dict[str, tuple[nn.Module, bool]]:
    """Expand layer selectors into ``{layer name: (module, records_input)}``.

    A selector is a module name from ``named_modules()`` (``"layer1.0.conv1"``), a glob
    over names (``"layer*.relu"``), or ``"type:<Class>"`` for every module of that class
    or a subclass (``"type:Conv2d"``; ``"type:BasicBlock"`` gives every residual block
    output of a torchvision ResNet). A ``"@in"`` suffix records the module's input
    instead of its output, e.g. ``"relu1@in"`` is the pre-activation REPAIR needs; a
    ``"@patches"`` suffix on ``Conv2d`` modules records their input unfolded into the
    patches they read (:func:`input_patches`), e.g. ``"type:Conv2d@patches"``.

    ``"group:<name or glob>"`` selects by the architecture's channel groups
    (:func:`mergescope.groups.channel_groups`): for every group whose name matches
    (``"group:*"`` for all), the layers where the group's units are read, as found by
    :func:`mergescope.groups.group_layers` -- the ``relu`` after each convolution of a
    plain CNN, every residual block output carrying a ResNet's stream (``"group:layer2"``
    gives ``layer2.0`` and ``layer2.1``), and ``<module>@in`` where only a module's
    input carries a group (``layer1.0.conv2@in`` inside a BasicBlock). Group selectors
    take no ``"@in"`` or ``"@patches"`` suffix.

    Parameters
    ----------
    model
        The network.
    layers
        Selectors; the result keeps their order, each name once.
    model_name
        How the model is called in error messages.
    example_input
        A batch the model accepts, traced by group selectors (e.g.
        ``mergescope.groups.example_input(data)``). Without it, random batches shaped
        for the model's first convolution (sides 32, 64, 28, 224, 299) or linear layer
        are tried, and the first one the model runs on is traced.

    Returns
    -------
    dict
        Layer name (with ``"@in"`` or ``"@patches"`` for a recorded input) -> (module,
        records_input).

    Raises
    ------
    ConfigError
        A selector matches nothing; the message names the selector and lists the
        model's layers (module types, or channel groups) with the closest match. Or a
        ``"@patches"`` selector matches a module that is not a ``Conv2d``.
    """
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    found: dict[str, tuple[nn.Module, bool]] = {}
    for selector in layers:
        if selector.startswith(GROUP_PREFIX):
            suffix = next((s for s in (INPUT_SUFFIX, PATCHES_SUFFIX) if selector.endswith(s)), "")
            if suffix:
                raise ConfigError(
                    f"layer selector {selector!r}: a group selector takes no {suffix!r} suffix; it already "
                    "names inputs where a group is only read there",
                    where="key 'layers'",
                )
            for layer in _match_groups(model, selector, example_input, model_name):
                records_input = layer.endswith(INPUT_SUFFIX)
                found[layer] = (modules[layer[: -len(INPUT_SUFFIX)] if records_input else layer], records_input)
            continue
        suffix = next((s for s in (INPUT_SUFFIX, PATCHES_SUFFIX) if selector.endswith(s)), "")
        base, records_input = selector[: len(selector) - len(suffix)], bool(suffix)
        if base.startswith("type:"):
            wanted = base[len("type:") :]
            matched = [n for n in names if wanted in _type_names(modules[n])]
            if not matched:
                types = sorted({type(modules[n]).__name__ for n in names})
                guess = closest(wanted, types)
                hint = f" Did you mean 'type:{guess}'?" if guess else ""
                raise ConfigError(
                    f"model {model_name!r} has no module of type {wanted!r}.{hint} Its module types: {', '.join(types)}.",
                    where="key 'layers'",
                )
        elif any(c in base for c in "*?["):
            matched = fnmatch.filter(names, base)
            if not matched:
                raise ConfigError(
                    f"no layer of model {model_name!r} matches {base!r}. Its layers: {', '.join(names)}.",
                    where="key 'layers'",
                )
        elif base in modules and base:
            matched = [base]
        else:
            hint = did_you_mean(base, names)
            raise ConfigError(
                f"model {model_name!r} has no layer {base!r}.{hint} Its layers: {', '.join(names)}.",
                where="key 'layers'",
            )
        for name in matched:
            if suffix == PATCHES_SUFFIX and not isinstance(modules[name], nn.Conv2d):
                raise ConfigError(
                    f"layer selector {selector!r}: {PATCHES_SUFFIX!r} records the input patches of a Conv2d, but "
                    f"{name!r} of model {model_name!r} is a {type(modules[name]).__name__}; record its input with "
                    f"{INPUT_SUFFIX!r}, or select convolutions only (e.g. 'type:Conv2d{PATCHES_SUFFIX}')",
                    where="key 'layers'",
                )
            found[name + suffix] = (modules[name], records_input)
    return found


def attach_recorders(
    model: nn.Module, layers: Sequence[str], sink: Callable[[str, torch.Tensor], None], model_name: str = "model"
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook ``layers`` of ``model`` so every forward pass calls ``sink(layer, tensor)``; return the handles.

    ``tensor`` is the module's output itself: a sink that keeps it (or a view of it)
    past the call must copy it, since later layers may change it in place
    (:func:`owned_array`). For ``"@in"`` it is the module's input, for ``"@patches"``
    the input's patches (:func:`input_patches`). Token layers come batch-first,
    ``(N, T, D)``, and multi-head attention's output without its weights
    (:func:`mergescope.tokens.batch_first`); a module returning another tuple is a
    ``ConfigError`` at the first forward pass.
    """
    batch: list[int | None] = [None]

    def note_batch(_model: nn.Module, args: tuple[Any, ...]) -> None:
        first = args[0] if args else None
        batch[0] = first.shape[0] if isinstance(first, torch.Tensor) and first.ndim else None

    def record(name: str, module: nn.Module, value: Any) -> None:
        sink(name, batch_first(module, value, batch[0], name, model_name))

    handles = [model.register_forward_pre_hook(note_batch)]  # the batch size, to check token layouts
    for name, (module, records_input) in resolve_layers(model, layers, model_name).items():
        if name.endswith(PATCHES_SUFFIX):
            handles.append(module.register_forward_pre_hook(lambda m, a, _n=name: sink(_n, input_patches(m, a[0]))))
        elif records_input:
            handles.append(module.register_forward_pre_hook(lambda m, args, _n=name: record(_n, m, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, _i, out, _n=name: record(_n, m, out)))
    return handles


def check_single_calls(model: nn.Module, layers: Sequence[str], model_name: str, example_input: torch.Tensor) -> None:
    """Run one forward pass and refuse layers whose module is called more than once in it.

    A forward hook fires at every call of its module, so a module the network calls
    twice (torchvision's ``BasicBlock.relu``, after ``bn1`` and after the residual
    sum) would be recorded at whichever call came last. That is never what a layer
    name means, so it is an error naming every call site (file, line and code).

    Raises
    ------
    ConfigError
        Naming the layer, the model and the call sites, and what to record instead.
    """
    calls: dict[str, list[str]] = {}

    def site() -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if frame.filename == __file__ or frame.filename.replace("\\", "/").endswith("torch/nn/modules/module.py"):
                continue
            return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
        return "?"

    def count(name: str) -> None:
        calls.setdefault(name, []).append(site())

    handles = []
    for name, (module, records_input) in resolve_layers(model, layers, model_name).items():
        if records_input:
            handles.append(module.register_forward_pre_hook(lambda _m, _args, _n=name: count(_n)))
        else:
            handles.append(module.register_forward_hook(lambda _m, _i, _out, _n=name: count(_n)))
    try:
        with _groups._eval_mode(model), torch.no_grad():
            model(example_input.to(model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    repeated = {name: sites for name, sites in calls.items() if len(sites) > 1}
    if repeated:
        name, sites = next(iter(repeated.items()))
        listing = "; ".join(f"call {i}: {s}" for i, s in enumerate(sites, start=1))
        others = f" (also: {', '.join(repr(n) for n in list(repeated)[1:])})" if len(repeated) > 1 else ""
        raise ConfigError(
            f"layer {name!r} of model {model_name!r} is one module called {len(sites)} times in each forward pass "
            f"({listing}){others}; a recording would keep only its last call. Record a layer that runs once: the "
            "module before or after it (e.g. the block's output, or the layer feeding the call you mean)"
        )


def owned_array(values: torch.Tensor, output: torch.Tensor) -> np.ndarray:
    """``values`` (computed from a hooked ``output``) as a NumPy array that shares no memory with it.

    A forward hook sees a module's output before the rest of the network runs, and a
    later in-place operation (``ReLU(inplace=True)``, a residual ``out += identity``, as
    in torchvision's models) rewrites that tensor. Views of it (a float32 tensor's
    ``.numpy()``, a reshape that needs no copy) must be copied before the pass goes on.
    """
    values = values.detach().float().cpu()
    array = values.numpy()
    if values.untyped_storage().data_ptr() == output.untyped_storage().data_ptr():
        array = array.copy()
    return array


def spatial_summary(output: torch.Tensor, reduce: str, tokens: str = DEFAULT_TOKENS) -> torch.Tensor:
    """One row per sample of a layer output, on its device: conv maps reduced over space (``"mean"`` or
    ``"max"``), token layers ``(N, T, D)`` to their class token (``tokens = "cls"``) or mean token
    (``"mean"``, and ``"all"``, whose per-sample row is its mean), ``(N, C)`` outputs as they are."""
    out = output.detach()
    if out.ndim == 3:
        return token_summary(out, "cls" if tokens == "cls" else "mean")
    if out.ndim > 2:
        flat = out.flatten(2)
        out = flat.mean(dim=2) if reduce == "mean" else flat.amax(dim=2)
    return out


def summarise(output: torch.Tensor, reduce: str, tokens: str = DEFAULT_TOKENS) -> np.ndarray:
    """A layer output as float32 NumPy, as recorded: conv maps reduced over space (``"none"`` keeps
    them), token layers ``(N, T, D)`` as ``tokens`` says (``"all"``: ``(N, D, T)`` maps).

    The array never shares memory with ``output`` (see :func:`owned_array`).
    """
    out = output.detach()
    if out.ndim == 3:
        return owned_array(token_summary(out, tokens), output)
    return owned_array(out if reduce == "none" else spatial_summary(out, reduce), output)


def make_activation(
    values: np.ndarray,
    *,
    sample_ids: np.ndarray,
    labels: np.ndarray,
    model: str,
    layer: str,
    units: np.ndarray | None = None,
) -> xr.DataArray:
    """Wrap an array ``(sample, unit[, y, x])`` or ``(sample, unit, token)`` in the labelled contract form."""
    dims = {2: _SUMMARY_DIMS, 3: TOKEN_DIMS, 4: _MAP_DIMS}.get(values.ndim)
    if dims is None:
        raise ContractError(f"activation values must be 2-D, 3-D or 4-D, got shape {values.shape} ({model}/{layer})")
    coords: dict[str, Any] = {
        "sample": np.asarray(sample_ids, dtype=np.int64),
        "unit": np.arange(values.shape[1]) if units is None else np.asarray(units),
        "label": ("sample", np.asarray(labels, dtype=np.int64)),
        "model": model,
        "layer": layer,
    }
    if values.ndim == 3:
        coords["token"] = np.arange(values.shape[2])
    return xr.DataArray(values, dims=dims, coords=coords, name=VARIABLE)


def validate_activation(da: xr.DataArray, where: str = "activation") -> xr.DataArray:
    """Check a DataArray against the activation contract; return it unchanged.

    Raises
    ------
    ContractError
        Naming the first thing that is wrong (dims, a missing coord, duplicate samples).
    """
    if not isinstance(da, xr.DataArray):
        raise ContractError(f"{where}: expected an xarray.DataArray, got {type(da).__name__}")
    if da.dims not in (_SUMMARY_DIMS, _MAP_DIMS, TOKEN_DIMS):
        raise ContractError(f"{where}: dims must be {_SUMMARY_DIMS}, {_MAP_DIMS} or {TOKEN_DIMS}, got {da.dims}")
    for coord in ("sample", "unit", "token") if da.dims == TOKEN_DIMS else ("sample", "unit"):
        if coord not in da.coords or da.coords[coord].dims != (coord,):
            raise ContractError(f"{where}: missing the index coord {coord!r}")
    if "label" not in da.coords or da.coords["label"].dims != ("sample",):
        raise ContractError(f"{where}: missing the coord 'label' on dim 'sample'")
    for coord in ("model", "layer"):
        if coord not in da.coords or da.coords[coord].ndim != 0:
            raise ContractError(f"{where}: missing the scalar coord {coord!r}")
    if not da.indexes["sample"].is_unique:
        raise ContractError(f"{where}: 'sample' ids are not unique")
    return da


def check_metric_inputs(
    a: object, b: object, metric: str, *, spatial: bool = False, min_samples: int = 2, need_ids: bool = False
) -> None:
    """Check two activations a metric compares unit by unit, with errors naming the metric.

    Both must be DataArrays with dims ``sample`` and ``unit`` (plus matching spatial dims
    when ``spatial``), cover the same samples in the same order (``sample`` coords), hold
    as many units, and have at least ``min_samples`` samples.

    Raises
    ------
    mergescope.errors.ContractError
        (a ``ValueError``) naming ``metric``, the input (``a`` or ``b``) and what differs.
    """
    for which, da in (("a", a), ("b", b)):
        if not isinstance(da, xr.DataArray):
            raise ContractError(f"{metric}: {which} must be an xarray.DataArray, got {type(da).__name__}")
        missing = [d for d in _SUMMARY_DIMS if d not in da.dims]
        if missing:
            raise ContractError(
                f"{metric}: {which} is missing the dim(s) {missing}; activations need dims ('sample', 'unit'), "
                f"got {da.dims}"
            )
        extra = [d for d in da.dims if d not in _SUMMARY_DIMS]
        if extra and not spatial:
            record = (
                "token summaries (tokens = 'cls' or 'mean')"
                if "token" in extra
                else "channel summaries (reduce = 'mean' or 'max')"
            )
            raise ContractError(
                f"{metric}: {which} has extra dims {extra} (dims {da.dims}); it needs one value per sample and "
                f"unit, so record {record}"
            )
        if need_ids and "sample" not in da.coords:
            raise ContractError(f"{metric}: {which} has no 'sample' coord; the sample ids say which images to use")
    assert isinstance(a, xr.DataArray) and isinstance(b, xr.DataArray)
    na, nb = a.sizes["sample"], b.sizes["sample"]
    if na != nb:
        raise ContractError(f"{metric}: a has {na} samples but b has {nb}; both must cover the same samples")
    if "sample" in a.coords and "sample" in b.coords:
        ids_a, ids_b = np.asarray(a["sample"].values), np.asarray(b["sample"].values)
        differ = int(np.count_nonzero(ids_a != ids_b))
        if differ:
            same_set = np.array_equal(np.sort(ids_a), np.sort(ids_b))
            detail = "the same ids in a different order" if same_set else "different sample ids"
            raise ContractError(
                f"{metric}: a and b have different 'sample' coords: {differ} of {na} positions differ ({detail}); "
                "score activations recorded on the same samples in the same order"
            )
    if a.sizes["unit"] != b.sizes["unit"]:
        raise ContractError(
            f"{metric}: a has {a.sizes['unit']} units but b has {b.sizes['unit']}; it compares unit j with unit j, "
            "so both layers need the same number of units"
        )
    space_a = {d: a.sizes[d] for d in a.dims if d not in _SUMMARY_DIMS}
    space_b = {d: b.sizes[d] for d in b.dims if d not in _SUMMARY_DIMS}
    if space_a != space_b:
        raise ContractError(
            f"{metric}: a has spatial dims {space_a or '(none)'} but b has {space_b or '(none)'}; "
            "record both with the same reduce"
        )
    if na < min_samples:
        raise ContractError(f"{metric}: needs at least {min_samples} samples, got {na}")


def units_label(a: xr.DataArray, b: xr.DataArray, mask: np.ndarray, limit: int = 10) -> str:
    """Where some units of a compared pair are, for messages: ``"unit(s) 3, 7 of 'b' (against 'a') at 'relu2'"``.

    ``mask`` selects units of ``b`` by position; at most ``limit`` are listed. The
    model and layer come from the scalar coords ``model`` and ``layer`` when present.
    """
    units = np.asarray(b["unit"].values if "unit" in b.coords else np.arange(b.sizes["unit"]))[np.asarray(mask)]
    more = f" and {len(units) - limit} more" if len(units) > limit else ""
    text = "unit(s) " + ", ".join(str(u) for u in units[:limit]) + more

    def scalar(x: xr.DataArray, name: str) -> str | None:
        return str(x.coords[name].values) if name in x.coords and x.coords[name].ndim == 0 else None

    model, reference, layer = scalar(b, "model"), scalar(a, "model"), scalar(a, "layer") or scalar(b, "layer")
    if model is not None:
        text += f" of {model!r}" + (f" (against {reference!r})" if reference is not None else "")
    if layer is not None:
        text += f" at {layer!r}"
    return text


def score_coords(a: xr.DataArray, b: xr.DataArray) -> dict[Hashable, Any]:
    """Coords of a per-unit score of ``b`` against ``a``: ``b``'s unit coords, ``model``,
    ``reference`` (``a``'s model) and ``layer``, those the inputs carry."""
    coords: dict[Hashable, Any] = {k: v.variable for k, v in b.coords.items() if v.dims == ("unit",)}
    if "model" in b.coords:
        coords["model"] = b.coords["model"].variable
    if "model" in a.coords:
        coords["reference"] = ((), a.coords["model"].values)
    if "layer" in b.coords:
        coords["layer"] = b.coords["layer"].variable
    return coords


def describe_scores(result: xr.DataArray, symbol: str, undefined: str = "") -> str:
    """One summary line of per-unit scores: ``"mean tau 0.412 (median 0.450, 2 NaN units)"``.

    ``symbol`` names the score; ``undefined`` says why a unit can be NaN, shown when all are.
    """
    values = np.asarray(result.values, dtype=float).ravel()
    nan = int(np.isnan(values).sum())
    if nan == values.size:
        return f"no defined {symbol} ({nan} NaN units{': ' + undefined if undefined else ''})"
    mean, median = float(np.nanmean(values)), float(np.nanmedian(values))
    return f"mean {symbol} {mean:.3f} (median {median:.3f}, {nan} NaN unit{'s' if nan != 1 else ''})"


def paired_chunks(
    a: xr.DataArray, b: xr.DataArray, elements: int = 1 << 22
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(sample_ids, a_part, b_part)`` over consecutive sample ranges of two activations.

    Parts are NumPy arrays ordered ``(sample, *spatial, unit)``. Dask-backed inputs are
    read along their own sample chunks (a's, else b's), one range at a time and at most
    :data:`READ_BYTES` of either input per range (a chunk may be a whole shard of a
    joined store), so a recording larger than memory is never loaded whole; in-memory
    inputs are cut into ranges of about ``elements`` values.
    """
    space = [d for d in a.dims if d not in _SUMMARY_DIMS]
    order = ("sample", *space, "unit")
    a, b = a.transpose(*order), b.transpose(*order)
    n = a.sizes["sample"]
    lazy = a.chunks is not None or b.chunks is not None
    if lazy:
        per_sample = max(x.dtype.itemsize * x.size // max(1, n) for x in (a, b))
        rows = max(1, READ_BYTES // max(1, per_sample))
        chunk_stops = np.cumsum((a if a.chunks is not None else b).chunksizes["sample"])
        starts = np.concatenate([[0], chunk_stops[:-1]])
        stops: Sequence[int] = [
            s
            for first, last in zip(starts, chunk_stops)
            for s in [*range(int(first) + rows, int(last), rows), int(last)]
        ]
    else:
        per_sample = int(np.prod([a.sizes[d] for d in (*space, "unit")], dtype=np.int64))
        step = max(1, elements // max(1, per_sample))
        stops = np.arange(step, n + step, step).clip(max=n).tolist()
    ids = np.asarray(a["sample"].values) if "sample" in a.coords else np.arange(n)
    start = 0
    for stop in (int(s) for s in stops):
        part = slice(start, stop)
        xa, xb = a.data[part], b.data[part]
        if lazy:
            import dask

            xa, xb = dask.compute(xa, xb)
        yield ids[part], np.asarray(xa), np.asarray(xb)
        start = stop


def read_rows(data: Any, positions: np.ndarray, span: int, columns: slice = slice(None)) -> np.ndarray:
    """Rows ``positions`` (in that order; any order, repeats allowed) of a NumPy or dask array.

    The sorted positions are cut into runs that each span fewer than ``span`` samples;
    each run is one indexing (rows and ``columns`` together) and one computation, so a
    dask-backed recording reads only those ranges: dask hands only the first indexing of
    a stored chunk on to its reader (``x[rows, cols]`` reads the rows, ``x[:, cols][rows]``
    reads them all). At most ``span`` rows are read at a time besides the result.
    """
    positions = np.asarray(positions, dtype=np.int64)
    order = np.argsort(positions, kind="stable")
    ordered = positions[order]
    out = np.empty((len(positions), *data[0:0, columns].shape[1:]), dtype=data.dtype)
    lo = 0
    while lo < len(ordered):
        first = int(ordered[lo])
        hi = int(np.searchsorted(ordered, first + max(1, span), side="left"))
        block = data[first : int(ordered[hi - 1]) + 1, columns]
        block = np.asarray(block.compute() if hasattr(block, "compute") else block)
        out[order[lo:hi]] = block[ordered[lo:hi] - first]
        lo = hi
    return out


def validate_collection(tree: xr.DataTree) -> xr.DataTree:
    """Check a ``/<model>/<layer>`` collection: every leaf holds a valid ``activation``."""
    leaves = [node for node in tree.subtree if not node.children]
    if not leaves or all(VARIABLE not in node.ds for node in leaves):
        raise ContractError("collection holds no 'activation' variables")
    for node in leaves:
        if VARIABLE not in node.ds:
            raise ContractError(f"collection node {node.path!r} has no {VARIABLE!r} variable")
        da = node.ds[VARIABLE]
        validate_activation(da, where=node.path)
        model, layer = node.path.strip("/").split("/", 1) if node.path.count("/") >= 2 else (None, None)
        if model is not None and (str(da.coords["model"].item()) != model or str(da.coords["layer"].item()) != layer):
            raise ContractError(f"collection node {node.path!r} holds model/layer coords that do not match its path")
    return tree


def collect(
    model: nn.Module,
    data: ImageDataset,
    layers: Sequence[str],
    *,
    model_name: str,
    reduce: str = "mean",
    tokens: str = DEFAULT_TOKENS,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> dict[str, xr.DataArray]:
    """Record ``layers`` of ``model`` over ``data`` in one forward pass.

    Parameters
    ----------
    model
        Any ``nn.Module``; layers are picked by their ``named_modules()`` name.
    data
        The images; their ``sample_ids`` and ``labels`` become coords.
    layers
        Layer selectors (see :func:`resolve_layers`).
    model_name
        Value of the scalar ``model`` coord.
    reduce
        ``"mean"`` or ``"max"`` over spatial positions of conv maps, or ``"none"``
        for full ``(sample, unit, y, x)`` maps.
    tokens
        What token layers (outputs ``(N, T, D)``) record: ``"mean"`` over tokens,
        ``"cls"`` (position 0) or ``"all"`` for ``(sample, unit, token)`` maps (see
        :mod:`mergescope.tokens`). Another choice than ``"mean"`` where no layer is a
        token layer is a ``ConfigError``.
    batch_size
        Images per forward pass.
    progress
        Shows how far the pass has come (see :mod:`mergescope.progress`); silent when ``None``.

    Returns
    -------
    dict
        Layer name -> activation DataArray with dims ``("sample", "unit")`` (or a full
        map's, see ``reduce`` and ``tokens``).
    """
    if reduce not in (*REDUCTIONS, "none"):
        raise ConfigError(f"unknown reduction {reduce!r}; accepted: mean, max, none", where="key 'reduce'")
    check_tokens(tokens)
    if len(data) == 0:
        raise ConfigError(f"dataset {data.name!r} is empty; nothing to collect")
    x = _groups.example_input(data) if uses_groups(layers) else None
    names = list(resolve_layers(model, layers, model_name, example_input=x))
    n = len(data)
    buffers: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    offset = 0

    def sink(layer: str, output: torch.Tensor) -> None:
        shapes.setdefault(layer, tuple(output.shape))
        out = summarise(output, reduce, tokens)
        if layer not in buffers:
            buffers[layer] = np.empty((n, *out.shape[1:]), dtype=np.float32)
        buffers[layer][offset : offset + len(out)] = out

    handles = attach_recorders(model, names, sink, model_name)
    # An ImageDataset is a map-style dataset of (image, label) pairs, as the loader expects.
    dataset = cast("torch.utils.data.Dataset[tuple[torch.Tensor, int]]", data)
    progress = progress or silent
    was_training = model.training
    device = model_device(model)
    loader = make_loader(dataset, batch_size, device=device)
    model.eval()
    try:
        with torch.no_grad():
            for images, _labels in progress(loader, desc=f"activations {model_name}", total=len(loader)):
                model(to_device(images, device))
                if not offset:
                    require_token_layers(tokens, shapes, f"model {model_name!r}")
                offset += len(images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [layer for layer in names if layer not in buffers]
    if missing:
        raise ConfigError(
            f"layers {missing} of model {model_name!r} never ran in the forward pass", where="key 'layers'"
        )
    return {
        layer: make_activation(
            buffers[layer], sample_ids=data.sample_ids, labels=data.labels, model=model_name, layer=layer
        )
        for layer in names
    }


def to_tree(activations: Mapping[str, Mapping[str, xr.DataArray]]) -> xr.DataTree:
    """Build a ``/<model>/<layer>`` collection from ``{model: {layer: DataArray}}``."""
    return xr.DataTree.from_dict(
        {f"{model}/{layer}": da.to_dataset() for model, layers in activations.items() for layer, da in layers.items()}
    )


def save_collection(tree: xr.DataTree, path: str | Path) -> Path:
    """Validate a collection and write it to netCDF atomically."""
    return save_tree(validate_collection(tree), path)


def load_collection(path: str | Path) -> xr.DataTree:
    """Read a collection written by :func:`save_collection` and validate it."""
    return load_tree(path, check=validate_collection)
