from __future__ import annotations

import pluggy
import pytest
import torch
from torch import nn

from mergescope import hookspecs
from mergescope.components import Architecture
from mergescope.errors import ConfigError
from mergescope.options import structure_options
from mergescope.testing import check_component
from mergescope_plugins import torchvision_models
from mergescope_plugins.torchvision_models import TorchvisionModel, available_models


def forward(model: nn.Module, shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.zeros(batch, *shape, device=next(model.parameters()).device))


@pytest.mark.parametrize(
    ("arch", "shape"),
    [
        ("alexnet", (3, 64, 64)),
        ("vgg11_bn", (3, 32, 32)),
        ("resnet18", (3, 64, 64)),
        ("mobilenet_v2", (3, 64, 64)),
    ],
)
def test_build_and_forward(arch, shape):
    model = TorchvisionModel(arch=arch).build(shape, 7)
    assert forward(model, shape).shape == (2, 7)
    assert not any(p.requires_grad is False for p in model.parameters())


def test_layer_names_are_torchvision_names():
    model = TorchvisionModel().build((3, 32, 32), 10)
    names = {name for name, _ in model.named_modules()}
    assert {"conv1", "layer1.0.conv1", "layer4.1.bn2", "fc"} <= names
    assert model.fc.out_features == 10


def test_grey_images_get_a_one_channel_first_convolution():
    model = TorchvisionModel().build((1, 28, 28), 10)
    conv = model.conv1
    assert conv.in_channels == 1
    assert (conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (64, (7, 7), (2, 2), (3, 3))
    assert conv.bias is None
    assert forward(model, (1, 28, 28)).shape == (2, 10)


def test_first_convolution_inside_a_sequential_is_replaced():
    model = TorchvisionModel(arch="mobilenet_v2").build((1, 16, 16), 4)
    assert model.features[0][0].in_channels == 1
    assert forward(model, (1, 16, 16)).shape == (2, 4)


@pytest.mark.parametrize(
    ("arch", "shape"),
    [
        ("vit_b_16", (3, 32, 32)),
        ("swin_t", (1, 32, 32)),
        ("inception_v3", (3, 75, 75)),
        ("densenet121", (2, 32, 32)),
    ],
)
def test_transformers_and_large_models_fit_the_input(arch, shape):
    # Built on the meta device: checks shapes without allocating or initialising weights.
    with torch.device("meta"):
        model = TorchvisionModel(arch=arch).build(shape, 5)
    assert forward(model, shape).shape == (2, 5)


@pytest.mark.parametrize("arch", ["googlenet", "inception_v3"])
def test_auxiliary_classifiers_are_left_out(arch):
    with torch.device("meta"):
        model = TorchvisionModel(arch=arch).build((3, 96, 96), 5)
    model.train()
    out = model(torch.zeros(2, 3, 96, 96, device="meta"))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)


@pytest.mark.parametrize(
    ("arch", "shape", "message"),
    [
        ("alexnet", (3, 32, 32), "'alexnet' needs images of at least 63x63 pixels, got 32x32"),
        ("vgg11", (1, 28, 28), "'vgg11' needs images of at least 32x32 pixels, got 28x28"),
        ("inception_v3", (3, 64, 64), "at least 75x75"),
        ("vit_b_16", (3, 32, 48), "'vit_b_16' needs square images, got 32x48"),
        ("vit_b_16", (3, 40, 40), r"cannot be built for input shape \(3, 40, 40\)"),
        ("maxvit_t", (3, 64, 64), r"cannot be built for input shape \(3, 64, 64\).*partition size"),
        ("resnet18", (784,), r"needs images \(C, H, W\)"),
    ],
)
def test_inputs_a_model_cannot_take_are_config_errors(arch, shape, message):
    with torch.device("meta"), pytest.raises(ConfigError, match=message):
        TorchvisionModel(arch=arch).build(shape, 5)


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match=r"'arch' = 'resnet19' is not a torchvision classification model\. "
                       r"Did you mean 'resnet18'"):
        TorchvisionModel(arch="resnet19")
    with pytest.raises(ConfigError, match=r"option 'arch' of component 'torchvision'.*Did you mean 'vgg11_bn'"):
        structure_options(TorchvisionModel, {"arch": "vgg11bn"})


def test_unknown_model_without_close_names_lists_every_model():
    with pytest.raises(ValueError, match=r"Known models: alexnet, convnext_base, .*wide_resnet50_2\.$"):
        TorchvisionModel(arch="xyz")


def test_only_classification_models_are_offered():
    models = available_models()
    assert {"alexnet", "vgg11_bn", "resnet18", "mobilenet_v2", "vit_b_16"} <= set(models)
    assert not {"fasterrcnn_resnet50_fpn", "fcn_resnet50", "r3d_18"} & set(models)
    assert list(models) == sorted(models)


def test_conformance():
    # Includes: the initialisation follows torch.manual_seed.
    check_component(TorchvisionModel)


def test_component_follows_the_protocol():
    assert isinstance(TorchvisionModel(), Architecture)
    lines = TorchvisionModel.__doc__.strip().splitlines()
    assert lines[0].endswith(".") and lines[1].strip() == ""
    assert "He et al. 2016" in TorchvisionModel.paper
    assert structure_options(TorchvisionModel, {"arch": "alexnet"}) == TorchvisionModel("alexnet")


def test_plugin_registers_the_architecture():
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(torchvision_models)
    registered: list[type] = []
    manager.hook.register_architectures(register=registered.append)
    assert registered == [TorchvisionModel]
