"""Bundled architecture: any classification model of the torchvision model zoo.

Models are built untrained (``weights=None``); trained weights come from the
pipeline's checkpoints, so nothing is ever downloaded. Layer names are torchvision's
own (``layer1.0.conv1``, ``features.3``, ``classifier.1``, ...).
"""

from __future__ import annotations

import difflib
import functools
from typing import Any, ClassVar

import attrs
from torch import nn

from mergescope.errors import ConfigError
from mergescope.hookspecs import hookimpl

__all__ = ["TorchvisionModel", "available_models", "register_architectures"]

# Smallest square input (pixels) each family accepts: below it a pooling or
# convolution gets an empty input. Measured with torchvision 0.29 for every model of
# the family; families not listed run on any size down to 1x1.
_MIN_SIZE: dict[str, int] = {
    "alexnet": 63,
    "inception_v3": 75,
    "vgg": 32,
    "convnext": 32,
    "densenet": 29,
    "squeezenet1_0": 21,
    "squeezenet1_1": 17,
    "googlenet": 15,
    "swin": 4,
}

# GoogLeNet and Inception v3 return a tuple with auxiliary logits in training mode;
# the trainer and the mergers expect plain logits. Setting init_weights keeps
# torchvision's default initialisation without its warning about a future change.
_EXTRA_OPTIONS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


@functools.cache
def available_models() -> tuple[str, ...]:
    """Names of the torchvision classification models, sorted.

    Returns
    -------
    tuple[str, ...]
        What ``torchvision.models.list_models(module=torchvision.models)`` lists (no
        detection, segmentation, video or quantized models).
    """
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def _check_arch(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"'{attribute.name}' must be a string naming a torchvision model, got {value!r}")
    known = available_models()
    if value not in known:
        close = difflib.get_close_matches(value, known, n=5, cutoff=0.6)
        hint = f"Did you mean {', '.join(repr(c) for c in close)}?" if close else f"Known models: {', '.join(known)}."
        raise ValueError(f"'{attribute.name}' = {value!r} is not a torchvision classification model. {hint}")


def _min_size(arch: str) -> int:
    for prefix, size in _MIN_SIZE.items():
        if arch.startswith(prefix):
            return size
    return 1


def _size_options(arch: str, height: int, width: int) -> dict[str, Any]:
    """Builder options that fix a transformer to the input resolution."""
    if arch.startswith("vit_"):
        if height != width:
            raise ConfigError(f"torchvision model {arch!r} needs square images, got {height}x{width}")
        return {"image_size": height}
    if arch.startswith("maxvit"):
        return {"input_size": (height, width)}
    return {}


def _replace_first_conv(model: nn.Module, channels: int) -> None:
    """Swap the model's first convolution for a fresh one reading ``channels`` channels."""
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    parent, _, attr = name.rpartition(".")
    fresh = nn.Conv2d(
        channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    setattr(model.get_submodule(parent), attr, fresh)


@attrs.define
class TorchvisionModel:
    """Any classification model of the torchvision model zoo (ResNet, VGG, MobileNet, ViT, ...).

    ``build`` calls ``torchvision.models.get_model(arch, weights=None,
    num_classes=...)``: the model starts untrained and its weights come from the
    pipeline's checkpoints, never from a download. Module names are torchvision's.

    Adjustments to the input, all documented here so nothing is hidden:

    - images with other than 3 channels (e.g. grey MNIST): the first convolution is
      replaced by a freshly initialised one with as many input channels, the rest of
      the model is unchanged;
    - ``vit_*`` and ``maxvit_t`` are built for the input resolution (their position
      embeddings and window partitions depend on it); ViTs need square images whose
      side is a multiple of the patch size;
    - ``googlenet`` and ``inception_v3`` are built without auxiliary classifiers so
      they return plain logits in training mode too.

    Some families need a minimum image size (alexnet 63, inception_v3 75, vgg and
    convnext 32, densenet 29, squeezenet 17-21, googlenet 15 pixels); smaller inputs
    are rejected when the model is built.

    Parameters
    ----------
    arch
        Name of the model, one of ``torchvision.models.list_models(module=torchvision.models)``,
        e.g. ``"resnet18"``, ``"vgg11_bn"``, ``"mobilenet_v2"``, ``"vit_b_16"``.
    """

    name: ClassVar[str] = "torchvision"
    paper: ClassVar[str] = (
        "torchvision model zoo (Krizhevsky et al. 2012 AlexNet, Simonyan & Zisserman 2015 VGG, "
        "He et al. 2016 ResNet, Sandler et al. 2018 MobileNetV2, Dosovitskiy et al. 2021 ViT, ...)"
    )
    # Conformance checks build the model for this shape (28x28 is too small for some).
    example_input_shape: ClassVar[tuple[int, int, int]] = (3, 64, 64)

    arch: str = attrs.field(default="resnet18", validator=_check_arch)

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        """Build the untrained model for images ``(C, H, W)`` and ``num_classes`` classes.

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
            When the images are not ``(C, H, W)``, are too small for the model, or do not
            fit a transformer's patch or window size.
        """
        import torchvision

        if len(input_shape) != 3:
            raise ConfigError(
                f"torchvision model {self.arch!r} needs images (C, H, W), got input shape {tuple(input_shape)}"
            )
        channels, height, width = (int(s) for s in input_shape)
        smallest = _min_size(self.arch)
        if min(height, width) < smallest:
            raise ConfigError(
                f"torchvision model {self.arch!r} needs images of at least {smallest}x{smallest} pixels, "
                f"got {height}x{width}; resize the images or pick a model for small inputs (e.g. 'resnet18')"
            )
        options = {**_EXTRA_OPTIONS.get(self.arch, {}), **_size_options(self.arch, height, width)}
        try:
            model = torchvision.models.get_model(self.arch, weights=None, num_classes=num_classes, **options)
        except (ValueError, AssertionError) as exc:
            # e.g. a ViT side that is not a multiple of the patch size, a MaxViT window misfit
            raise ConfigError(
                f"torchvision model {self.arch!r} cannot be built for input shape {tuple(input_shape)}: {exc}"
            ) from exc
        if channels != 3:
            _replace_first_conv(model, channels)
        return model


@hookimpl
def register_architectures(register):
    """Register the torchvision architecture."""
    register(TorchvisionModel)
