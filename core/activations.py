"""Recording activations as labelled xarray tensors (the activation contract).

One DataArray per (model, layer), named ``activation``:

- dims ``("sample", "unit")`` for channel summaries (conv maps reduced by mean or max
  over space), ``("sample", "unit", "y", "x")`` for full maps;
- coords ``sample`` (the dataset's stable sample id), ``unit`` (channel index),
  ``label`` (class of each sample, on ``sample``), and scalar coords ``model`` and
  ``layer``.

A collection is an :class:`xarray.DataTree` ``/<model>/<layer>`` whose nodes hold a
Dataset with the ``activation`` variable. Components never read ``.attrs``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import nn

from .components import Context, ImageDataset
from .errors import ConfigError, ContractError, closest
from .storage import load_tree, save_tree

__all__ = [
    "VARIABLE",
    "REDUCTIONS",
    "collect",
    "layer_names",
    "resolve_layers",
    "attach_recorders",
    "summarise",
    "INPUT_SUFFIX",
    "make_activation",
    "validate_activation",
    "validate_collection",
    "to_tree",
    "save_collection",
    "load_collection",
]

VARIABLE = "activation"
REDUCTIONS = ("mean", "max")
_SUMMARY_DIMS = ("sample", "unit")
_MAP_DIMS = ("sample", "unit", "y", "x")


#: Suffix of a layer name that records the module's input (e.g. a ReLU's pre-activation).
INPUT_SUFFIX = "@in"


def layer_names(model: nn.Module) -> list[str]:
    """Names of every submodule that can be recorded, in definition order."""
    return [name for name, _ in model.named_modules() if name]


def _type_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def resolve_layers(model: nn.Module, layers: Sequence[str], model_name: str = "model") -> dict[str, tuple[nn.Module, bool]]:
    """Expand layer selectors into ``{layer name: (module, records_input)}``.

    A selector is a module name from ``named_modules()`` (``"layer1.0.conv1"``), a glob
    over names (``"layer*.relu"``), or ``"type:<Class>"`` for every module of that class
    or a subclass (``"type:Conv2d"``; ``"type:BasicBlock"`` gives every residual block
    output of a torchvision ResNet). A ``"@in"`` suffix records the module's input
    instead of its output, e.g. ``"relu1@in"`` is the pre-activation REPAIR needs.

    Raises
    ------
    ConfigError
        A selector matches nothing; the message lists the model's layers (or types)
        and the closest match.
    """
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    found: dict[str, tuple[nn.Module, bool]] = {}
    for selector in layers:
        base, records_input = selector, False
        if selector.endswith(INPUT_SUFFIX):
            base, records_input = selector[: -len(INPUT_SUFFIX)], True
        suffix = INPUT_SUFFIX if records_input else ""
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
            guess = closest(base, names)
            hint = f" Did you mean {guess!r}?" if guess else ""
            raise ConfigError(
                f"model {model_name!r} has no layer {base!r}.{hint} Its layers: {', '.join(names)}.",
                where="key 'layers'",
            )
        for name in matched:
            found[name + suffix] = (modules[name], records_input)
    return found


def attach_recorders(
    model: nn.Module, layers: Sequence[str], sink: Callable[[str, torch.Tensor], None], model_name: str = "model"
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook ``layers`` of ``model`` so every forward pass calls ``sink(layer, tensor)``; return the handles."""
    handles = []
    for name, (module, records_input) in resolve_layers(model, layers, model_name).items():
        if records_input:
            handles.append(module.register_forward_pre_hook(lambda _m, args, _n=name: sink(_n, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda _m, _i, out, _n=name: sink(_n, out)))
    return handles


def summarise(output: torch.Tensor, reduce: str) -> np.ndarray:
    """A layer output as float32 NumPy: conv maps reduced over space (``"none"`` keeps them)."""
    out = output.detach()
    if out.ndim > 2 and reduce != "none":
        flat = out.flatten(2)
        out = flat.mean(dim=2) if reduce == "mean" else flat.amax(dim=2)
    return out.float().cpu().numpy()


def make_activation(
    values: np.ndarray,
    *,
    sample_ids: np.ndarray,
    labels: np.ndarray,
    model: str,
    layer: str,
    units: np.ndarray | None = None,
) -> xr.DataArray:
    """Wrap an array ``(sample, unit[, y, x])`` in the labelled contract form."""
    dims = _SUMMARY_DIMS if values.ndim == 2 else _MAP_DIMS
    if values.ndim not in (2, 4):
        raise ContractError(f"activation values must be 2-D or 4-D, got shape {values.shape} ({model}/{layer})")
    return xr.DataArray(
        values,
        dims=dims,
        coords={
            "sample": np.asarray(sample_ids, dtype=np.int64),
            "unit": np.arange(values.shape[1]) if units is None else np.asarray(units),
            "label": ("sample", np.asarray(labels, dtype=np.int64)),
            "model": model,
            "layer": layer,
        },
        name=VARIABLE,
    )


def validate_activation(da: xr.DataArray, where: str = "activation") -> xr.DataArray:
    """Check a DataArray against the activation contract; return it unchanged.

    Raises
    ------
    ContractError
        Naming the first thing that is wrong (dims, a missing coord, duplicate samples).
    """
    if not isinstance(da, xr.DataArray):
        raise ContractError(f"{where}: expected an xarray.DataArray, got {type(da).__name__}")
    if da.dims not in (_SUMMARY_DIMS, _MAP_DIMS):
        raise ContractError(f"{where}: dims must be {_SUMMARY_DIMS} or {_MAP_DIMS}, got {da.dims}")
    for coord in ("sample", "unit"):
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
    batch_size: int = 256,
    context: Context | None = None,
) -> dict[str, xr.DataArray]:
    """Record ``layers`` of ``model`` over ``data`` in one forward pass.

    Parameters
    ----------
    model
        Any ``nn.Module``; layers are picked by their ``named_modules()`` name.
    data
        The images; their ``sample_ids`` and ``labels`` become coords.
    layers
        Layer names.
    model_name
        Value of the scalar ``model`` coord.
    reduce
        ``"mean"`` or ``"max"`` over spatial positions of conv maps, or ``"none"``
        for full ``(sample, unit, y, x)`` maps.
    batch_size
        Images per forward pass.
    context
        Supplies the progress bar.

    Returns
    -------
    dict
        Layer name -> activation DataArray with dims ``("sample", "unit")``.
    """
    if reduce not in (*REDUCTIONS, "none"):
        raise ConfigError(f"unknown reduction {reduce!r}; accepted: mean, max, none", where="key 'reduce'")
    if len(data) == 0:
        raise ConfigError(f"dataset {data.name!r} is empty; nothing to collect")
    names = list(resolve_layers(model, layers, model_name))
    n = len(data)
    buffers: dict[str, np.ndarray] = {}
    offset = 0

    def sink(layer: str, output: torch.Tensor) -> None:
        out = summarise(output, reduce)
        if layer not in buffers:
            buffers[layer] = np.empty((n, *out.shape[1:]), dtype=np.float32)
        buffers[layer][offset : offset + len(out)] = out

    handles = attach_recorders(model, layers, sink, model_name)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    context = context or Context(quiet=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for images, _labels in context.progress(loader, desc=f"activations {model_name}", total=len(loader)):
                model(images)
                offset += len(images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [layer for layer in names if layer not in buffers]
    if missing:
        raise ConfigError(f"layers {missing} of model {model_name!r} never ran in the forward pass", where="key 'layers'")
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
