"""Bundled architectures: small image classifiers with readable layer names.

Users pick layers by name (``fc2``, ``relu2``, ``conv3``, ...) in pipeline files, so
the names of the modules are part of the interface: they are built from an ordered
list and never depend on anything but the options. The small Vision Transformer is
torchvision's own ``VisionTransformer`` class, so its module names (and the structure
the channel-group analysis reads) are torchvision's.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import ClassVar

import attrs
from torch import nn

from mergescope.errors import ConfigError
from mergescope.hookspecs import hookimpl
from mergescope.validators import boolean, list_of, optional, positive_int, probability

__all__ = ["MLP", "SmallCNN", "ViT", "register_architectures"]


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


def _patch_embedding(channels: int, width: int, patch_size: int) -> nn.Conv2d:
    """A patch embedding reading ``channels`` channels, initialised as torchvision initialises its own."""
    conv = nn.Conv2d(channels, width, kernel_size=patch_size, stride=patch_size)
    fan_in = channels * patch_size * patch_size
    nn.init.trunc_normal_(conv.weight, std=math.sqrt(1 / fan_in))
    nn.init.zeros_(conv.bias)
    return conv


@attrs.define
class ViT:
    """A small Vision Transformer (torchvision's class): patch embedding, pre-LayerNorm encoder blocks, linear head.

    ``build`` returns ``torchvision.models.VisionTransformer`` (Dosovitskiy et al. 2021):
    the image is cut into ``patch_size`` x ``patch_size`` patches, each embedded by
    ``conv_proj`` into ``width`` channels; a class token and learned position
    embeddings are added; ``layers`` blocks follow, each ``x + attention(ln_1(x))`` then
    ``x + mlp(ln_2(x))`` (``heads`` heads, an MLP ``width -> mlp_width -> width`` with
    GELU); the final ``encoder.ln`` and ``heads.head`` classify the class token.

    Module names are torchvision's: ``conv_proj``, ``encoder.layers.encoder_layer_<i>``
    with ``ln_1``, ``self_attention``, ``ln_2``, ``mlp.0`` (hidden units), ``mlp.3``,
    then ``encoder.ln`` and ``heads.head``. The number of input channels and the image
    size come from the data: images with other than 3 channels get a patch embedding
    with that many input channels (torchvision's initialisation), and the position
    embeddings are sized for the image.

    Parameters
    ----------
    patch_size
        Side of the square patches; must divide the image side.
    layers
        Encoder blocks.
    heads
        Attention heads per block; must divide ``width``.
    width
        Channels of the residual stream (the embedding dimension).
    mlp_width
        Hidden units of every block's MLP; unset: ``4 * width``, the ViT paper's ratio.
    dropout
        Dropout probability after the embeddings, each attention and each MLP layer
        (0: none, as a small model trained on a small set wants).
    """

    name: ClassVar[str] = "vit"
    paper: ClassVar[str] = (
        "Dosovitskiy et al. 2021, An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale"
    )

    patch_size: int = attrs.field(default=4, validator=positive_int)
    layers: int = attrs.field(default=4, validator=positive_int)
    heads: int = attrs.field(default=4, validator=positive_int)
    width: int = attrs.field(default=64, validator=positive_int)
    mlp_width: int | None = attrs.field(default=None, validator=optional(positive_int))
    dropout: float = attrs.field(default=0.0, validator=probability)

    def __attrs_post_init__(self) -> None:
        if self.width % self.heads:
            raise ConfigError(
                f"width = {self.width} cannot be split into {self.heads} attention heads; "
                "choose a width that is a multiple of heads",
                where="key 'heads'",
            )

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        """Build an untrained ViT for square images ``(C, S, S)`` and ``num_classes`` classes.

        Parameters
        ----------
        input_shape
            Shape of one image, ``(channels, side, side)``.
        num_classes
            Number of outputs of the classifier head.

        Returns
        -------
        torchvision.models.VisionTransformer
            The model, mapping ``(N, C, S, S)`` images to ``(N, num_classes)`` logits.

        Raises
        ------
        ConfigError
            When the images are not square ``(C, S, S)`` or their side is not a multiple
            of ``patch_size``.
        """
        from torchvision.models import VisionTransformer

        if len(input_shape) != 3:
            raise ConfigError(f"architecture 'vit' needs images (C, H, W), got input shape {tuple(input_shape)}")
        channels, height, width = (int(s) for s in input_shape)
        if height != width:
            raise ConfigError(
                f"architecture 'vit' needs square images (torchvision's ViT has one image size), got {height}x{width}"
            )
        if height % self.patch_size:
            fits = [p for p in range(1, height + 1) if height % p == 0]
            raise ConfigError(
                f"patch_size = {self.patch_size} does not divide the image side {height}: the patches must tile "
                f"the image; patch sizes that fit {height}x{height} images: {', '.join(map(str, fits))}",
                where="key 'patch_size'",
            )
        model = VisionTransformer(
            image_size=height,
            patch_size=self.patch_size,
            num_layers=self.layers,
            num_heads=self.heads,
            hidden_dim=self.width,
            mlp_dim=self.mlp_width or 4 * self.width,
            dropout=self.dropout,
            num_classes=num_classes,
        )
        if channels != 3:
            model.conv_proj = _patch_embedding(channels, self.width, self.patch_size)
        return model


@hookimpl
def register_architectures(register):
    """Register the bundled architectures."""
    register(MLP)
    register(SmallCNN)
    register(ViT)
