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
from mergescope_plugins.zoo import MLP, SmallCNN


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


@pytest.mark.parametrize("cls", [MLP, SmallCNN])
def test_components_follow_the_protocol(cls):
    assert isinstance(cls(), Architecture)
    lines = cls.__doc__.strip().splitlines()
    assert lines[0].endswith(".") and lines[1].strip() == ""
    assert isinstance(cls.paper, str)


def test_plugin_registers_both_architectures():
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(zoo)
    registered: list[type] = []
    manager.hook.register_architectures(register=registered.append)
    assert {cls.name: cls for cls in registered} == {"mlp": MLP, "cnn": SmallCNN}
