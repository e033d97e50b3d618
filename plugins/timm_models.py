"""Bundled architecture: any image model of timm (PyTorch Image Models), by name.

``build`` calls ``timm.create_model(arch, pretrained=..., num_classes=..., in_chans=...,
img_size=...)``, the last only for the models that take it (vision transformers and
their kin fix their position embeddings to the input size; convolutional networks run on
any size). Layer names are timm's own (``blocks.3.attn.qkv``, ``layer2.0.conv1``, ...).

Weights never come from the network. A model starts untrained unless

- the pipeline gives its ``[[models]]`` table a ``checkpoint``: the runner builds the
  model and loads that state dict into it strictly (any architecture takes one; see the
  user guide's *Checkpoints as they come*), or
- ``pretrained = true`` and timm's weights for the model are already in the local
  Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``) or torch hub's cache (``$TORCH_HOME/hub/checkpoints``).
  The file is found here, handed to timm as a local file, and timm runs with
  ``HF_HUB_OFFLINE=1``; when no cached file exists, the build stops with a message
  saying how to provide one. timm adapts the weights as usual: a head of another
  number of classes is left freshly initialised, a first convolution of other than 3
  input channels is summed or repeated from the pretrained one.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import attrs
from torch import nn

from mergescope.errors import ConfigError
from mergescope.extras import require
from mergescope.hookspecs import hookimpl
from mergescope.validators import boolean

__all__ = [
    "TimmModel",
    "available_models",
    "cached_weights",
    "hf_cache_dir",
    "register_architectures",
]

_WHAT = "architecture 'timm'"
# The names a Hugging Face repository of timm stores its weights under, best first.
_HF_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _timm() -> Any:
    return require("timm", "timm", _WHAT)


@functools.cache
def available_models() -> tuple[str, ...]:
    """Names of every architecture timm can build, sorted (``timm.list_models()``)."""
    return tuple(sorted(_timm().list_models()))


def _check_arch(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise TypeError(f"'{attribute.name}' must be a string naming a timm model, got {value!r}")
    known = available_models()
    base, _, tag = value.partition(".")
    if base not in known:
        close = difflib.get_close_matches(base, known, n=5, cutoff=0.6)
        hint = f"Did you mean {', '.join(repr(c) for c in close)}?" if close else "See timm.list_models()."
        raise ValueError(f"'{attribute.name}' = {value!r} is not a timm model. {hint}")
    if tag:
        tags = _timm().list_pretrained(f"{base}.*")
        if value not in tags:
            listed = ", ".join(repr(t) for t in tags) or "(none)"
            raise ValueError(
                f"'{attribute.name}' = {value!r}: timm knows no pretrained tag {tag!r} of {base!r}; its tags: {listed}"
            )


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, as ``huggingface_hub`` resolves it from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def _torch_hub_dir() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir())


def _pretrained_cfg(arch: str) -> Any:
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(arch)


def cached_weights(arch: str) -> tuple[Path | None, bool, list[str]]:
    """Where timm's pretrained weights for ``arch`` lie in the local caches, without any network.

    Parameters
    ----------
    arch
        A timm model name, with or without a pretrained tag (``"resnet18.a1_in1k"``).

    Returns
    -------
    tuple
        ``(path, from_hub, looked)``: the cached file (``None`` when there is none);
        whether it is a Hugging Face file (a plain state dict, whatever custom loader
        timm uses for the original file); and the places looked in, for messages.
    """
    from huggingface_hub import try_to_load_from_cache

    cfg = _pretrained_cfg(arch)
    if cfg is None:
        return None, False, []
    looked: list[str] = []
    repo = cfg.hf_hub_id
    if repo:
        repo_id, _, revision = repo.partition("@")
        names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HF_FILES
        cache = hf_cache_dir()
        for filename in names:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision or None)
            if isinstance(found, str):
                return Path(found), True, looked
        looked.append(f"Hugging Face repository {repo_id!r} in {str(cache)!r} (files {', '.join(names)})")
    if cfg.url:
        path = _torch_hub_dir() / "checkpoints" / os.path.basename(cfg.url.split("?")[0])
        if path.is_file():
            return path, False, looked
        looked.append(f"torch hub file {str(path)!r}")
    return None, False, looked


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` for the duration, restored afterwards (also where huggingface_hub already read it)."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = None
    with contextlib.suppress(ImportError):
        from huggingface_hub import constants
    before = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved
        if constants is not None:
            constants.HF_HUB_OFFLINE = before


def _check_runs(model: nn.Module, arch: str, input_shape: tuple[int, ...]) -> None:
    """One image through the model: some timm models build for any size and fail only on the first batch."""
    import torch

    training = model.training
    model.eval()  # no dropout, no BatchNorm update: the pass changes nothing and draws no random numbers
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    except (AssertionError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"timm model {arch!r} builds but does not run on images of shape {tuple(input_shape)}: {exc}. "
            "Resize the images (e.g. the dataset's image_size) so that they fit the model: a patch model needs "
            "sides that are multiples of its patch size"
        ) from exc
    finally:
        model.train(training)


@attrs.define
class TimmModel:
    """Any image model of timm by name (ViT, DeiT, ConvNeXt, ResNet, EfficientNet, ...), offline.

    ``build`` creates ``timm.create_model(arch, pretrained=pretrained,
    num_classes=<classes of the data>, in_chans=<channels of the images>)``, adding
    ``img_size`` for the models that take it (transformers size their position
    embeddings by it). Module names are timm's.

    Trained weights come from the pipeline's ``checkpoint`` key, loaded strictly into
    the built model, or, with ``pretrained = true``, from timm's weights already in the
    local Hugging Face or torch hub cache (never downloaded; see the module docstring).

    Parameters
    ----------
    arch
        A name from ``timm.list_models()`` (e.g. ``"vit_tiny_patch16_224"``,
        ``"resnet18"``, ``"convnext_atto"``), optionally with a pretrained tag
        (``"vit_tiny_patch16_224.augreg_in21k"``) choosing which cached weights
        ``pretrained`` loads.
    pretrained
        Start from timm's pretrained weights, read from the local cache only.
    """

    name: ClassVar[str] = "timm"
    paper: ClassVar[str] = "Wightman 2019, PyTorch Image Models (timm)"
    # Conformance checks build the model for this shape (a ViT's patches must fit).
    example_input_shape: ClassVar[tuple[int, int, int]] = (3, 32, 32)

    arch: str = attrs.field(default="vit_tiny_patch16_224", validator=_check_arch)
    pretrained: bool = attrs.field(default=False, validator=boolean)

    def _weights_file(self) -> tuple[Path, bool]:
        path, from_hub, looked = cached_weights(self.arch)
        if path is not None:
            return path, from_hub
        if not looked:
            raise ConfigError(
                f"timm has no pretrained weights for {self.arch!r}; set pretrained = false and give the model a "
                "checkpoint, or pick a model from timm.list_pretrained()",
                where="key 'pretrained'",
            )
        repo = _pretrained_cfg(self.arch).hf_hub_id
        fetch = (
            f"e.g. `huggingface-cli download {repo.partition('@')[0]}` with the same HF_HOME / HF_HUB_CACHE"
            if repo
            else "e.g. timm.create_model(..., pretrained=True) with the same TORCH_HOME"
        )
        raise ConfigError(
            f"pretrained = true, but timm's weights for {self.arch!r} are not in the local cache and nothing is "
            f"downloaded here. Looked in: {'; '.join(looked)}. Provide them either as a local checkpoint: set "
            'pretrained = false and give the model checkpoint = "/path/to/weights.safetensors" (a state dict '
            f"saved from timm.create_model({self.arch!r}) with this run's number of classes), or by filling the "
            f"cache on a machine with network access ({fetch}) and copying the cache folder to this machine",
            where="key 'pretrained'",
        )

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        """Build the model for images ``(C, H, W)`` and ``num_classes`` classes.

        Parameters
        ----------
        input_shape
            Shape of one image, ``(channels, height, width)``.
        num_classes
            Number of outputs of the classifier.

        Returns
        -------
        torch.nn.Module
            The model, mapping ``(N, C, H, W)`` images to ``(N, num_classes)`` logits.

        Raises
        ------
        ConfigError
            When the images are not ``(C, H, W)``, timm cannot build the model for them,
            or ``pretrained`` weights are not in the local cache (the message says how to
            provide them).
        MissingDependencyError
            When timm is not installed.
        """
        timm = _timm()
        if len(input_shape) != 3:
            raise ConfigError(f"timm model {self.arch!r} needs images (C, H, W), got input shape {tuple(input_shape)}")
        channels, height, width = (int(s) for s in input_shape)
        options: dict[str, Any] = {"num_classes": num_classes, "in_chans": channels}
        if self.pretrained:
            path, from_hub = self._weights_file()
            # A Hugging Face file is a converted state dict: timm's custom loader (e.g. for the
            # original .npz of a ViT) must not read it.
            overlay: dict[str, Any] = {"file": str(path)}
            if from_hub:
                overlay["custom_load"] = False
            options["pretrained_cfg_overlay"] = overlay
        size = height if height == width else (height, width)
        with _offline():
            try:
                try:
                    model = timm.create_model(self.arch, pretrained=self.pretrained, img_size=size, **options)
                except TypeError as exc:
                    if "img_size" not in str(exc):
                        raise
                    # a model without a fixed input size (most CNNs) does not take the option
                    model = timm.create_model(self.arch, pretrained=self.pretrained, **options)
            except (ValueError, AssertionError, RuntimeError, TypeError) as exc:
                raise ConfigError(
                    f"timm model {self.arch!r} cannot be built for input shape {tuple(input_shape)} and "
                    f"{num_classes} classes: {exc}"
                ) from exc
        _check_runs(model, self.arch, input_shape)
        return model


@hookimpl
def register_architectures(register):
    """Register the timm architecture."""
    register(TimmModel)
