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

from collections.abc import Mapping, Sequence
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


def layer_names(model: nn.Module) -> list[str]:
    """Names of every submodule that can be recorded, in definition order."""
    return [name for name, _ in model.named_modules() if name]


def resolve_layers(model: nn.Module, layers: Sequence[str], model_name: str = "model") -> dict[str, nn.Module]:
    """Map layer names to modules, failing with the known names and the closest match."""
    modules = dict(model.named_modules())
    found: dict[str, nn.Module] = {}
    for layer in layers:
        if not layer or layer not in modules:
            known = layer_names(model)
            guess = closest(layer, known)
            hint = f" Did you mean {guess!r}?" if guess else ""
            raise ConfigError(
                f"model {model_name!r} has no layer {layer!r}.{hint} Its layers: {', '.join(known)}.",
                where="key 'layers'",
            )
        found[layer] = modules[layer]
    return found


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
        ``"mean"`` or ``"max"`` over spatial positions of conv maps.
    batch_size
        Images per forward pass.
    context
        Supplies the progress bar.

    Returns
    -------
    dict
        Layer name -> activation DataArray with dims ``("sample", "unit")``.
    """
    if reduce not in REDUCTIONS:
        raise ConfigError(f"unknown reduction {reduce!r}; accepted: {', '.join(REDUCTIONS)}", where="key 'reduce'")
    if len(data) == 0:
        raise ConfigError(f"dataset {data.name!r} is empty; nothing to collect")
    modules = resolve_layers(model, layers, model_name)
    n = len(data)
    buffers: dict[str, np.ndarray] = {}
    offset = 0

    def hook_for(layer: str):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            out = output.detach()
            if out.ndim > 2:  # channel summary over every position
                flat = out.flatten(2)
                out = flat.mean(dim=2) if reduce == "mean" else flat.amax(dim=2)
            if layer not in buffers:
                buffers[layer] = np.empty((n, out.shape[1]), dtype=np.float32)
            buffers[layer][offset : offset + len(out)] = out.cpu().numpy()

        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in modules.items()]
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
    missing = [layer for layer in modules if layer not in buffers]
    if missing:
        raise ConfigError(f"layers {missing} of model {model_name!r} never ran in the forward pass", where="key 'layers'")
    return {
        layer: make_activation(
            buffers[layer], sample_ids=data.sample_ids, labels=data.labels, model=model_name, layer=layer
        )
        for layer in modules
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
