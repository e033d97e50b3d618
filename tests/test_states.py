"""The shared state-dict helpers: compatibility checks, the weighted sum, building a model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mergescope.task_vectors
from mergescope.components import Context
from mergescope.states import average_states, build_model, check_compatible, check_finite, float_keys
from mergescope.testing import example_dataset


def with_bn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    model[2].running_mean.normal_()
    model[2].num_batches_tracked.fill_(seed + 3)
    return model


def test_check_compatible_names_the_entry_and_the_models():
    a, b = with_bn(0).state_dict(), with_bn(1).state_dict()
    check_compatible({"a": a, "b": b})
    with pytest.raises(ValueError, match="no models to merge"):
        check_compatible({})
    wide = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).state_dict()
    with pytest.raises(ValueError, match=r"'1\.weight' has shape \(5, 4\) in model 'a' but \(6, 4\) in model 'w'"):
        check_compatible({"a": a, "w": wide})
    ints = {**b, "1.bias": b["1.bias"].long()}
    with pytest.raises(ValueError, match=r"'1\.bias' is torch.float32 in model 'a' but torch.int64 in model 'i'"):
        check_compatible({"a": a, "i": ints})


def test_check_finite_names_the_first_bad_entry():
    state = with_bn(0).state_dict()
    check_finite({"a": state})
    state["3.bias"][1] = float("inf")
    with pytest.raises(ValueError, match=r"parameter '3\.bias' of model 'a' holds NaN or inf values"):
        check_finite({"a": state})


def test_float_keys():
    state = with_bn(0).state_dict()
    assert "2.num_batches_tracked" not in float_keys(state)
    assert float_keys(state, ["3.bias", "2.num_batches_tracked", "1.weight"]) == ["3.bias", "1.weight"]
    with pytest.raises(ValueError, match="parameter 'nope' is not in the state dict"):
        float_keys(state, ["nope"])


def test_average_states_is_a_complete_weighted_sum():
    a, b = with_bn(0).state_dict(), with_bn(1).state_dict()
    out = average_states([a, b], [0.25, 0.75])
    assert out.keys() == a.keys()
    for key, tensor in a.items():
        assert out[key].dtype == tensor.dtype
        if tensor.is_floating_point():
            expected = (0.25 * tensor.double() + 0.75 * b[key].double()).to(tensor.dtype)
            assert torch.equal(out[key], expected), key
    assert int(out["2.num_batches_tracked"]) == 3  # integer entries: the first state dict's
    # Uniform by default; a weight of exactly 1 gives the model back exactly; no aliasing.
    uniform = average_states([a, b])
    assert torch.equal(uniform["1.weight"], ((a["1.weight"].double() + b["1.weight"].double()) / 2).float())
    first = average_states([a, b], [1.0, 0.0])
    assert all(torch.equal(first[k], a[k]) for k in a)
    first["1.weight"].add_(1.0)
    assert not torch.equal(first["1.weight"], a["1.weight"])
    # Extrapolation: weights are used as given.
    assert torch.equal(
        average_states([a, b], [2.0, -1.0])["3.bias"], (2 * a["3.bias"].double() - b["3.bias"].double()).float()
    )


def test_average_states_of_some_keys_and_bad_calls():
    a, b = with_bn(0).state_dict(), with_bn(1).state_dict()
    assert average_states([a, b], keys=["2.running_var", "1.bias"]).keys() == {"2.running_var", "1.bias"}
    with pytest.raises(ValueError, match="no state dicts to average"):
        average_states([])
    with pytest.raises(ValueError, match="got 2 state dicts but 3 weights"):
        average_states([a, b], [0.2, 0.3, 0.5])


def test_build_model_copies_the_template_and_resets_batchnorm_on_data():
    template = with_bn(0).train()
    state = with_bn(1).state_dict()
    model = build_model(template, state)
    assert model is not template and not model.training and template.training
    assert torch.equal(model[2].running_mean, state["2.running_mean"])
    assert torch.equal(template[2].running_mean, with_bn(0)[2].running_mean)  # the template is untouched

    data = example_dataset(n=32, shape=(1, 2, 2))  # flattened to the 4 inputs
    reset = build_model(template, state, Context(data=data, quiet=True), reset=True)
    assert not torch.equal(reset[2].running_mean, state["2.running_mean"])
    # Without data, or without reset, the statistics are the state's.
    kept = build_model(template, state, Context(quiet=True), reset=True)
    assert torch.equal(kept[2].running_mean, state["2.running_mean"])


def test_task_vectors_still_exports_the_moved_helpers():
    for name in ("check_compatible", "check_finite", "average_states", "build_model"):
        assert getattr(mergescope.task_vectors, name) is getattr(mergescope.states, name)
