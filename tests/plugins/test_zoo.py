from __future__ import annotations

import pluggy
import pytest
import torch
from torch import nn

from mergescope import hookspecs
from mergescope.components import Architecture
from mergescope.errors import ConfigError
from mergescope.options import structure_options
from mergescope_plugins import zoo
from mergescope_plugins.zoo import MLP, SmallCNN, ViT


def module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def test_default_mlp_is_784_512_512_512_10():
    model = MLP().build((1, 28, 28), 10)
    assert module_names(model) == ["flatten", "fc1", "relu1", "fc2", "relu2", "fc3", "relu3", "head"]
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {
        "fc1.weight": (512, 784),
        "fc1.bias": (512,),
        "fc2.weight": (512, 512),
        "fc2.bias": (512,),
        "fc3.weight": (512, 512),
        "fc3.bias": (512,),
        "head.weight": (10, 512),
        "head.bias": (10,),
    }
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_mlp_follows_its_options_and_the_input_size():
    model = MLP(hidden=[16, 8]).build((1, 8, 8), 4)
    assert module_names(model) == ["flatten", "fc1", "relu1", "fc2", "relu2", "head"]
    assert model.fc1.in_features == 64 and model.head.out_features == 4
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 4)


def test_default_options_are_not_shared():
    a, b = MLP(), MLP()
    a.hidden.append(3)
    assert b.hidden == [512, 512, 512]


def test_cnn_layers_without_batchnorm():
    model = SmallCNN().build((1, 28, 28), 10)
    assert module_names(model) == [
        "conv1", "relu1", "conv2", "relu2", "conv3", "relu3", "pool", "flatten", "head"
    ]
    assert [model.get_submodule(f"conv{i}").stride for i in (1, 2, 3)] == [(1, 1), (2, 2), (2, 2)]
    assert [model.get_submodule(f"conv{i}").out_channels for i in (1, 2, 3)] == [32, 64, 64]
    assert all(model.get_submodule(f"conv{i}").bias is not None for i in (1, 2, 3))


def test_cnn_layers_with_batchnorm_drop_the_conv_bias():
    model = SmallCNN(widths=[8, 16, 16], batchnorm=True).build((1, 28, 28), 10)
    assert module_names(model) == [
        "conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "conv3", "bn3", "relu3", "pool", "flatten", "head"
    ]
    assert all(model.get_submodule(f"conv{i}").bias is None for i in (1, 2, 3))
    assert model.bn2.num_features == 16


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 8, 8)])
def test_cnn_runs_on_small_and_mnist_sized_inputs(shape, batchnorm):
    model = SmallCNN(widths=[4, 8, 8], batchnorm=batchnorm).build(shape, 10)
    model.eval()
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (MLP, {"hidden": []}),
        (MLP, {"hidden": [512, 0]}),
        (SmallCNN, {"widths": []}),
        (SmallCNN, {"widths": [32, -1]}),
    ],
)
def test_bad_widths_are_rejected(cls, options):
    key = next(iter(options))
    with pytest.raises(ValueError, match=f"'{key}' must be a non-empty list of positive integers"):
        cls(**options)
    with pytest.raises(ConfigError, match=f"'{key}' must be a non-empty list of positive integers"):
        structure_options(cls, options)


def test_options_structure_from_a_table():
    assert structure_options(SmallCNN, {"widths": [8, 16], "batchnorm": True}) == SmallCNN([8, 16], True)
    assert structure_options(MLP, {"hidden": [100]}) == MLP([100])


def test_cnn_needs_image_shaped_input():
    with pytest.raises(ValueError, match=r"needs images \(C, H, W\)"):
        SmallCNN().build((784,), 10)


@pytest.mark.parametrize("cls", [MLP, SmallCNN, ViT])
def test_components_follow_the_protocol(cls):
    assert isinstance(cls(), Architecture)
    lines = cls.__doc__.strip().splitlines()
    assert lines[0].endswith(".") and lines[1].strip() == ""
    assert isinstance(cls.paper, str)


def test_plugin_registers_every_architecture():
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(zoo)
    registered: list[type] = []
    manager.hook.register_architectures(register=registered.append)
    assert {cls.name: cls for cls in registered} == {"mlp": MLP, "cnn": SmallCNN, "vit": ViT}


# --- the small Vision Transformer


def test_vit_is_torchvisions_class_with_the_options_as_sizes():
    from torchvision.models import VisionTransformer

    model = ViT(patch_size=4, layers=2, heads=2, width=16).build((1, 28, 28), 10)
    assert type(model) is VisionTransformer
    blocks = model.encoder.layers
    assert len(blocks) == 2 and blocks.encoder_layer_0.self_attention.num_heads == 2
    assert model.conv_proj.in_channels == 1 and model.conv_proj.kernel_size == (4, 4)
    assert model.conv_proj.stride == (4, 4) and model.conv_proj.out_channels == 16
    # the MLP defaults to 4 * width hidden units; 7 x 7 patches and the class token
    assert blocks.encoder_layer_0.mlp[0].out_features == 64 and blocks.encoder_layer_0.mlp[3].in_features == 64
    assert tuple(model.encoder.pos_embedding.shape) == (1, 7 * 7 + 1, 16)
    assert model.heads.head.out_features == 10
    names = set(module_names(model))
    assert {"encoder.layers.encoder_layer_1.ln_1", "encoder.layers.encoder_layer_1.ln_2", "encoder.ln"} <= names


@pytest.mark.parametrize(("shape", "patch"), [((1, 28, 28), 4), ((3, 8, 8), 4), ((3, 12, 12), 3)])
def test_vit_runs_on_one_and_three_channel_images(shape, patch):
    model = ViT(patch_size=patch, layers=1, heads=2, width=8, mlp_width=12).build(shape, 5).eval()
    assert model.conv_proj.in_channels == shape[0]
    assert model.encoder.layers.encoder_layer_0.mlp[0].out_features == 12
    with torch.no_grad():
        assert model(torch.randn(3, *shape)).shape == (3, 5)


def test_vit_grey_patch_embedding_is_initialised_like_torchvisions():
    torch.manual_seed(0)
    weight = ViT(patch_size=7, layers=1, heads=1, width=256).build((1, 28, 28), 2).conv_proj.weight.detach()
    # truncated normal with std sqrt(1 / fan_in), fan_in = 1 * 7 * 7 (truncation at +-2 barely narrows it)
    assert abs(float(weight.std()) - (1 / 49) ** 0.5) < 0.01
    assert float(weight.abs().max()) <= 2.0


def test_vit_initialisation_follows_the_seed():
    arch = ViT(layers=1, heads=2, width=8)
    torch.manual_seed(3)
    first = arch.build((1, 8, 8), 3).state_dict()
    torch.manual_seed(3)
    second = arch.build((1, 8, 8), 3).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_vit_refuses_a_patch_size_that_does_not_tile_the_image():
    with pytest.raises(
        ConfigError, match=r"patch_size = 5 does not divide the image side 28.*1, 2, 4, 7, 14, 28"
    ) as info:
        ViT(patch_size=5).build((1, 28, 28), 10)
    assert info.value.where == "key 'patch_size'"


def test_vit_refuses_non_square_or_flat_inputs():
    with pytest.raises(ConfigError, match=r"square images.*28x32"):
        ViT().build((1, 28, 32), 10)
    with pytest.raises(ConfigError, match=r"needs images \(C, H, W\)"):
        ViT().build((784,), 10)


def test_vit_options_are_checked():
    with pytest.raises(ConfigError, match=r"width = 64 cannot be split into 3 attention heads"):
        structure_options(ViT, {"heads": 3})
    with pytest.raises(ConfigError, match="'patch_size'"):
        structure_options(ViT, {"patch_size": 0})
    with pytest.raises(ConfigError, match="'dropout'"):
        structure_options(ViT, {"dropout": 1.5})
    assert structure_options(ViT, {"width": 32, "mlp_width": 64}) == ViT(width=32, mlp_width=64)
