"""Bundled architectures: small image classifiers with readable layer names.

Users pick layers by name (``fc2``, ``relu2``, ``conv3``, ...) in pipeline files, so
the names of the modules are part of the interface: they are built from an ordered
list and never depend on anything but the options.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import ClassVar

import attrs
from torch import nn

from mergescope.hookspecs import hookimpl
from mergescope.validators import boolean, list_of, positive_int

__all__ = ["MLP", "SmallCNN", "register_architectures"]


# Layer widths: at least one layer, every width a positive integer.
_widths = list_of(positive_int, min_length=1)


@attrs.define
class MLP:
    """A fully connected ReLU classifier (784-512-512-512-10 on MNIST by default).

    Modules, in order: ``flatten``, then ``fc1, relu1, fc2, relu2, ...`` for every
    hidden layer, then the linear ``head``.

    Parameters
    ----------
    hidden
        Width of every hidden layer.
    """

    name: ClassVar[str] = "mlp"
    paper: ClassVar[str] = "Ainsworth et al. 2023, Git Re-Basin (MNIST MLP 784-512-512-512-10)"

    hidden: list[int] = attrs.field(factory=lambda: [512, 512, 512], validator=_widths)

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
        """Build an untrained MLP for images of ``input_shape`` and ``num_classes`` classes."""
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        width = math.prod(input_shape)
        for i, out in enumerate(self.hidden, start=1):
            layers[f"fc{i}"] = nn.Linear(width, out)
            layers[f"relu{i}"] = nn.ReLU()
            width = out
        layers["head"] = nn.Linear(width, num_classes)
        return nn.Sequential(layers)


@attrs.define
class SmallCNN:
    """A small convolutional classifier: 3x3 convolutions, global average pooling, linear head.

    Modules, in order: ``conv1, [bn1], relu1, conv2, [bn2], relu2, ...`` (the first
    convolution keeps the resolution, every later one halves it with stride 2), then
    ``pool`` (global average), ``flatten`` and the linear ``head``. Works on 28x28 and
    8x8 inputs alike.

    Parameters
    ----------
    widths
        Output channels of every convolution.
    batchnorm
        Add a ``BatchNorm2d`` after every convolution (whose bias is then dropped).
    """

    name: ClassVar[str] = "cnn"
    paper: ClassVar[str] = ""

    widths: list[int] = attrs.field(factory=lambda: [32, 64, 64], validator=_widths)
    batchnorm: bool = attrs.field(default=False, validator=boolean)

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
        """Build an untrained CNN for images ``(C, H, W)`` and ``num_classes`` classes."""
        if len(input_shape) != 3:
            raise ValueError(f"architecture 'cnn' needs images (C, H, W), got input shape {tuple(input_shape)}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = input_shape[0]
        for i, out in enumerate(self.widths, start=1):
            stride = 1 if i == 1 else 2
            layers[f"conv{i}"] = nn.Conv2d(
                channels, out, kernel_size=3, stride=stride, padding=1, bias=not self.batchnorm
            )
            if self.batchnorm:
                layers[f"bn{i}"] = nn.BatchNorm2d(out)
            layers[f"relu{i}"] = nn.ReLU()
            channels = out
        layers["pool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten()
        layers["head"] = nn.Linear(channels, num_classes)
        return nn.Sequential(layers)


@hookimpl
def register_architectures(register):
    """Register the bundled architectures."""
    register(MLP)
    register(SmallCNN)
