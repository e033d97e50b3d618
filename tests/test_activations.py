from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from mergescope import ConfigError, ContractError, collect, load_collection, save_collection, validate_activation
from mergescope.activations import make_activation, to_tree
from mergescope.testing import example_dataset


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))

    def forward(self, x):
        return self.head(self.relu(self.conv(x)))


@pytest.fixture
def data():
    return example_dataset(n=10)


def test_collect_labels_and_reduces(data):
    torch.manual_seed(0)
    model = TinyCNN()
    acts = collect(model, data, ["relu", "head.1"], model_name="m", batch_size=4)
    relu = acts["relu"]
    validate_activation(relu)
    assert relu.dims == ("sample", "unit") and relu.shape == (10, 3)
    assert list(relu["sample"].values) == list(data.sample_ids)
    assert list(relu["label"].values) == list(data.labels)
    assert relu["model"].item() == "m" and relu["layer"].item() == "relu"
    with torch.no_grad():
        maps = model.relu(model.conv(data.images))
    np.testing.assert_allclose(relu.values, maps.mean(dim=(2, 3)).numpy(), rtol=1e-6)
    top = collect(model, data, ["relu"], model_name="m", reduce="max")["relu"]
    np.testing.assert_allclose(top.values, maps.amax(dim=(2, 3)).numpy(), rtol=1e-6)
    assert acts["head.1"].shape == (10, 3)


def test_netcdf_round_trip_is_identical(tmp_path, data):
    acts = collect(TinyCNN(), data, ["relu", "conv"], model_name="m")
    tree = to_tree({"m": acts})
    path = save_collection(tree, tmp_path / "acts.nc")
    back = load_collection(path)
    for layer in ("relu", "conv"):
        xr.testing.assert_identical(back[f"m/{layer}"].ds["activation"], acts[layer])
    assert not list(tmp_path.glob("*.partial"))


def test_unknown_layer_lists_layers_and_closest(data):
    with pytest.raises(ConfigError) as info:
        collect(TinyCNN(), data, ["rellu"], model_name="m")
    message = str(info.value)
    assert "no layer 'rellu'" in message and "Did you mean 'relu'" in message and "conv, relu, head" in message


def test_bad_reduction_and_empty_data(data):
    with pytest.raises(ConfigError, match="unknown reduction 'median'"):
        collect(TinyCNN(), data, ["relu"], model_name="m", reduce="median")
    with pytest.raises(ConfigError, match="is empty"):
        collect(TinyCNN(), data.subset([]), ["relu"], model_name="m")


def test_validator_names_what_is_wrong():
    good = make_activation(np.zeros((3, 2)), sample_ids=[1, 2, 3], labels=[0, 1, 0], model="m", layer="l")
    validate_activation(good)
    with pytest.raises(ContractError, match="dims must be"):
        validate_activation(good.rename(unit="channel"))
    with pytest.raises(ContractError, match="'label'"):
        validate_activation(good.drop_vars("label"))
    with pytest.raises(ContractError, match="scalar coord 'model'"):
        validate_activation(good.drop_vars("model"))
    with pytest.raises(ContractError, match="not unique"):
        validate_activation(good.assign_coords(sample=[1, 1, 2]))


def test_truncated_file_is_reported(tmp_path, data):
    path = save_collection(to_tree({"m": collect(TinyCNN(), data, ["relu"], model_name="m")}), tmp_path / "a.nc")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ContractError, match="truncated or corrupt"):
        load_collection(path)


def test_layer_selectors_by_type_glob_and_input(data):
    from mergescope.activations import resolve_layers

    model = TinyCNN()
    assert list(resolve_layers(model, ["type:Conv2d", "type:Linear"])) == ["conv", "head.1"]
    assert list(resolve_layers(model, ["head.*"])) == ["head.0", "head.1"]
    assert list(resolve_layers(model, ["type:Module"]))[:2] == ["conv", "relu"]  # subclasses count
    with pytest.raises(ConfigError, match="no module of type 'Conv3d'.*Did you mean 'type:Conv2d'"):
        resolve_layers(model, ["type:Conv3d"])
    with pytest.raises(ConfigError, match="no layer of model 'model' matches 'tail.*'"):
        resolve_layers(model, ["tail.*"])
    acts = collect(model, data, ["relu@in", "relu"], model_name="m")
    with torch.no_grad():
        pre = model.conv(data.images).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(acts["relu@in"].values, pre, rtol=1e-5, atol=1e-6)  # the pre-activation
    assert (acts["relu"].values >= 0).all() and (acts["relu@in"].values < 0).any()
