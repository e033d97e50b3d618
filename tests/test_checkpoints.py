from __future__ import annotations

import os
from collections import OrderedDict

import pytest
import torch
from torch import nn

from mergescope import checkpoints
from mergescope.checkpoints import load_into, load_state_dict, save_state_dict
from mergescope.errors import CheckpointError


class Payload:
    """A custom object: unpickling it would need arbitrary code."""

    def __init__(self) -> None:
        self.value = 1


def mlp(hidden: int, depth: int = 1) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = 784
    for i in range(1, depth + 1):
        layers[f"fc{i}"] = nn.Linear(width, hidden)
        layers[f"relu{i}"] = nn.ReLU()
        width = hidden
    layers["head"] = nn.Linear(width, 10)
    return nn.Sequential(layers)


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_round_trip_creates_parents_and_leaves_no_temp_file(tmp_path):
    model = mlp(16)
    path = tmp_path / "deep" / "er" / "model.pt"
    assert save_state_dict(model, path) == path
    assert_same_state(load_state_dict(path), model.state_dict())
    assert os.listdir(path.parent) == ["model.pt"]


def test_save_accepts_a_state_dict_and_replaces_the_old_file(tmp_path):
    path = tmp_path / "model.pt"
    save_state_dict({"w": torch.zeros(3)}, path)
    save_state_dict({"w": torch.ones(3)}, path)
    assert torch.equal(load_state_dict(str(path))["w"], torch.ones(3))


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_state_dict({"w": torch.zeros(3)}, path)

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict({"w": torch.ones(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_state_dict(path)["w"], torch.zeros(3))
    assert os.listdir(tmp_path) == ["model.pt"]


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_state_dicts_are_unwrapped(tmp_path, wrapper):
    model = mlp(8)
    path = tmp_path / "wrapped.pt"
    torch.save({wrapper: model.state_dict(), "epoch": 3, "note": "best"}, path)
    assert_same_state(load_state_dict(path), model.state_dict())


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.pt"
    with pytest.raises(CheckpointError, match="nowhere.pt.*does not exist"):
        load_state_dict(path)


def test_arbitrary_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"fc1.weight": torch.zeros(2), "extra": Payload()}, path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert "evil.pt" in message
    assert "non-tensor objects" in message and "refused for safety" in message
    assert "torch.save(model.state_dict(), path)" in message


def test_non_tensor_value_names_the_key(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"fc1.weight": torch.zeros(2), "fc1.bias": [0.0, 1.0]}, path)
    with pytest.raises(CheckpointError, match="'fc1.bias' is a list, not a tensor"):
        load_state_dict(path)


def test_non_mapping_payload_is_refused(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="holds a Tensor, not a state dict"):
        load_state_dict(path)


def test_garbage_file_is_reported(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_state_dict(path)


def test_load_into_loads_strictly():
    source, target = mlp(8), mlp(8)
    load_into(target, source.state_dict(), source="a.pt", architecture="mlp")
    assert_same_state(target.state_dict(), source.state_dict())


def test_wrong_architecture_lists_the_shape_mismatch():
    with pytest.raises(CheckpointError) as info:
        load_into(mlp(256), mlp(512).state_dict(), source="runs/a.pt", architecture="mlp")
    message = str(info.value)
    assert "checkpoint 'runs/a.pt' does not fit architecture 'mlp'" in message
    assert "fc1.weight: checkpoint (512, 784) vs model (256, 784)" in message
    assert "fc1.bias: checkpoint (512,) vs model (256,)" in message


def test_missing_and_unexpected_keys_are_listed_up_to_five():
    deep, shallow = mlp(8, depth=8), mlp(8, depth=1)
    with pytest.raises(CheckpointError) as info:
        load_into(shallow, deep.state_dict(), source="deep.pt", architecture="mlp")
    message = str(info.value)
    # fc2..fc8 weights and biases are not in the shallow model: 14 keys, 5 shown.
    assert "14 unexpected keys" in message and "and 9 more" in message
    assert "fc2.weight" in message and "fc8.bias" not in message
    # Every hidden layer is 8 wide, so the head has the same shape in both.
    assert "shape mismatches" not in message

    with pytest.raises(CheckpointError, match="14 missing keys .*fc2.weight"):
        load_into(deep, shallow.state_dict(), source="shallow.pt", architecture="mlp")
