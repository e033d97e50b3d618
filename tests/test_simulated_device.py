"""The simulated accelerator itself: it fails where CUDA fails and passes where CUDA passes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from simulated_device import SIMULATED_DEVICE, SimulatedAccelerator
from torch import nn

MIXED = "Expected all tensors to be on the same device"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))


@pytest.fixture
def gpu():
    with SimulatedAccelerator() as simulator:
        yield simulator


def test_the_device_is_a_cpu_device_other_than_the_host():
    assert torch.device("cpu") != SIMULATED_DEVICE and SIMULATED_DEVICE.type == "cpu"
    with pytest.raises(ValueError, match="a CPU device other than 'cpu'"):
        SimulatedAccelerator(torch.device("cpu"))


def test_a_moved_model_refuses_a_host_input(gpu):
    model = _model().to(gpu.device)
    with pytest.raises(RuntimeError, match=MIXED):
        model(torch.randn(5, 4))


def test_a_moved_model_takes_a_moved_input_and_its_output_is_on_the_device(gpu):
    model = _model().to(gpu.device)
    out = model(torch.randn(5, 4).to(gpu.device))
    assert gpu.on_device(out) and out.device == gpu.device
    assert all(gpu.on_device(t) for t in model.state_dict().values())  # parameters and buffers


def test_a_model_never_moved_refuses_a_device_input(gpu):
    with pytest.raises(RuntimeError, match=MIXED):
        _model()(torch.randn(5, 4, device=gpu.device))


def test_results_are_those_of_the_cpu(gpu):
    x = torch.randn(5, 4)
    expected = _model().eval()(x)
    got = _model().eval().to(gpu.device)(x.to(gpu.device))
    torch.testing.assert_close(got.cpu(), expected)


def test_leaving_the_device(gpu):
    y = torch.ones(3).to(gpu.device)
    for host in (y.cpu(), y.to("cpu"), y.to(torch.device("cpu")), y.detach().to("cpu", torch.float64)):
        assert not gpu.on_device(host) and host.device == torch.device("cpu")
    assert gpu.on_device(y)  # the device tensor stays there
    assert y.tolist() == [1.0, 1.0, 1.0] and y.sum().item() == 3.0 and float(y[0]) == 1.0
    with pytest.raises(TypeError, match="can't convert cpu:0 device type tensor to numpy"):
        y.numpy()
    with pytest.raises(TypeError, match="Use Tensor.cpu"):
        np.asarray(y)
    np.testing.assert_array_equal(y.cpu().numpy(), [1.0, 1.0, 1.0])


def test_views_in_place_operations_and_derived_tensors_stay_on_the_device(gpu):
    y = torch.arange(6.0).to(gpu.device)
    for derived in (
        y.view(2, 3),
        y[1:],
        y.view(2, 3).mT,
        y.data,
        y.detach(),
        y.double(),
        y * 2,
        torch.zeros_like(y),
        y.new_ones(2),
    ):
        assert gpu.on_device(derived)
    y.add_(torch.tensor(1.0))  # a 0-dim host tensor mixes freely, as CPU scalars do on CUDA
    y.mul_(2)
    assert gpu.on_device(y)
    assert y.to(gpu.device) is y  # already there: no copy
    assert all(gpu.on_device(row) for row in y.view(2, 3))
    with pytest.raises(RuntimeError, match=MIXED):
        y.add_(torch.ones(6))
    with pytest.raises(RuntimeError, match=MIXED):
        torch.cat([y, torch.ones(2)])


def test_factories_follow_their_device_argument(gpu):
    y = torch.ones(2).to(gpu.device)
    assert gpu.on_device(torch.zeros(3, device=gpu.device))
    assert gpu.on_device(torch.zeros(3, device=y.device))  # tensor.device names the simulated device
    assert gpu.on_device(torch.as_tensor(np.ones(3), device=gpu.device))
    assert not gpu.on_device(torch.zeros(3)) and not gpu.on_device(torch.zeros(3, device="cpu"))
    assert not gpu.on_device(torch.zeros_like(y, device="cpu"))
    host = torch.ones(3)
    moved = torch.as_tensor(host, device=gpu.device)
    assert gpu.on_device(moved) and not gpu.on_device(host)  # a move copies: the host tensor stays there


def test_indexing_as_on_cuda(gpu):
    y = torch.arange(6.0).to(gpu.device)
    assert gpu.on_device(y[torch.tensor([0, 2])])  # host indices may index a device tensor
    assert gpu.on_device(y[torch.tensor([True, False] * 3)])
    host = torch.arange(6.0)
    with pytest.raises(RuntimeError, match="indices should be either on cpu or on the same device"):
        host[torch.tensor([0, 2]).to(gpu.device)]
    with pytest.raises(RuntimeError, match=MIXED):
        y.index_select(0, torch.tensor([0, 2]))  # an index argument must be on the device


def test_copies_between_devices(gpu):
    y = torch.zeros(3).to(gpu.device)
    y.copy_(torch.ones(3))
    y[1:] = torch.full((2,), 2.0)
    host = torch.zeros(3)
    host.copy_(y)
    assert gpu.on_device(y) and not gpu.on_device(host)
    assert host.tolist() == [1.0, 2.0, 2.0]


def test_module_moves_copies_training_and_state_dicts(gpu):
    model = _model().to(gpu.device)
    twin = copy.deepcopy(model)
    assert all(gpu.on_device(t) for t in twin.state_dict().values())
    optimiser = torch.optim.Adam(model.parameters(), lr=0.1)
    model.train()
    model(torch.randn(8, 4).to(gpu.device)).sum().backward()
    assert all(gpu.on_device(p.grad) for p in model.parameters())
    optimiser.step()
    model.cpu()
    assert not any(gpu.on_device(t) for t in model.state_dict().values())
    model(torch.randn(8, 4))  # all on the host again
    model.load_state_dict(twin.state_dict())  # copies into the host tensors, which stay there
    assert not any(gpu.on_device(t) for t in model.state_dict().values())


def test_a_plain_tensor_attribute_stays_behind(gpu):
    class KeepsOffset(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.offset = torch.zeros(3)

        def forward(self, x):
            return self.fc(x) + self.offset

    model = KeepsOffset().to(gpu.device)
    assert gpu.on_device(model.fc.weight) and not gpu.on_device(model.offset)
    with pytest.raises(RuntimeError, match=MIXED):
        model(torch.randn(2, 4).to(gpu.device))
