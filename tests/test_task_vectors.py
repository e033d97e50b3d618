"""Tests of the shared task-vector helpers: differences, checks, flattening, scaling search."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mergescope.components import Context, Evaluation, TensorImageDataset
from mergescope.errors import ConfigError
from mergescope.states import average_states, check_compatible
from mergescope.task_vectors import (
    MAX_RELATIVE_DISTANCE,
    add_to_base,
    check_finetuned,
    example_finetunes,
    flatten,
    merge_keys,
    prepare,
    relative_distances,
    search_scaling,
    sign_conflicts,
    task_vectors,
    top_fraction_mask,
    unflatten,
)
from mergescope.testing import example_models


def with_bn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    model[2].running_mean.normal_()
    model[2].num_batches_tracked.fill_(seed + 3)
    return model


def nudged(model: nn.Module, scale: float, seed: int) -> nn.Module:
    import copy

    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return out


# ------------------------------------------------------------------- task vectors


def test_task_vectors_are_exact_differences_and_skip_integer_buffers() -> None:
    base, a, b = with_bn(0), with_bn(1), with_bn(2)
    taus = task_vectors(base.state_dict(), [a.state_dict(), b.state_dict()])
    assert len(taus) == 2
    assert "2.num_batches_tracked" not in taus[0]
    for tau, model in zip(taus, (a, b)):
        for key, t in tau.items():
            assert t.dtype == torch.float64
            # float64 holds the difference of two float32 values exactly: base + tau is the fine-tune.
            assert torch.equal((base.state_dict()[key].double() + t).float(), model.state_dict()[key]), key


def test_task_vectors_name_the_first_mismatch() -> None:
    small, wide = example_models(1)["model0"], example_models(2, hidden=5)["model1"]
    expected = r"'1\.weight' has shape \(8, 16\) in the base model but \(5, 16\) in model 'wide'"
    with pytest.raises(ValueError, match=expected):
        task_vectors(small.state_dict(), [wide.state_dict()], names=["wide"])
    partial = dict(small.state_dict())
    del partial["3.bias"]
    with pytest.raises(ValueError, match=r"'3\.bias' of the base model is missing from model '#1'"):
        task_vectors(small.state_dict(), [partial])


def test_check_compatible_names_parameter_shapes_and_models() -> None:
    small, wide = example_models(1)["model0"], example_models(2, hidden=5)["model1"]
    with pytest.raises(ValueError, match=r"'1\.weight' has shape \(8, 16\) in model 'a' but \(5, 16\) in model 'b'"):
        check_compatible({"a": small.state_dict(), "b": wide.state_dict()})
    broken = {k: v.clone() for k, v in small.state_dict().items()}
    broken["3.weight"][0, 0] = math.inf
    with pytest.raises(ValueError, match="'3.weight' of model 'x' holds NaN or inf"):
        check_compatible({"a": small.state_dict(), "x": broken})


def test_merge_keys_separate_batchnorm_statistics() -> None:
    vector, stats = merge_keys(with_bn(0))
    assert stats == ["2.running_mean", "2.running_var"]
    assert vector == ["1.weight", "1.bias", "2.weight", "2.bias", "3.weight", "3.bias"]


# ------------------------------------------------------------------ fine-tune check


def test_independent_networks_are_about_sqrt2_apart() -> None:
    models = example_models(2)
    (distance,) = relative_distances(models["model0"].state_dict(), [models["model1"].state_dict()])
    assert 1.2 < distance < 1.7  # about sqrt(2): the reason for the threshold of 1.0
    assert MAX_RELATIVE_DISTANCE == 1.0


def test_check_finetuned_rejects_raw_weights_with_a_clear_message() -> None:
    models = example_models(3)
    base, others = models["model0"].state_dict(), [models["model1"].state_dict(), models["model2"].state_dict()]
    with pytest.raises(ConfigError) as info:
        check_finetuned(base, others, ["pokemon", "dice"], base_name="resnet", method="pcb")
    message = str(info.value)
    assert "'pokemon'" in message and "'resnet'" in message
    assert re_number(message) > 1.0  # the ratio is quoted
    assert "fine-tunes of one pre-trained base" in message and "'interpolation'" in message
    assert "key 'models'" in message


def re_number(message: str) -> float:
    import re

    return float(re.search(r"= ([0-9.]+), above", message).group(1))


def test_check_finetuned_accepts_fine_tunes_and_returns_distances() -> None:
    models = example_finetunes(2, scale=0.1)
    base = models["model0"].state_dict()
    distances = check_finetuned(base, [models["model1"].state_dict(), models["model2"].state_dict()], ["a", "b"])
    assert all(0.05 < d < 0.15 for d in distances)


def test_check_finetuned_needs_a_fine_tune() -> None:
    with pytest.raises(ConfigError, match="needs the base and at least one fine-tune of it; the step has only 'base'"):
        check_finetuned(with_bn(0).state_dict(), [], [], base_name="base")


def test_prepare_resolves_the_base_by_name() -> None:
    models = example_finetunes(2)
    renamed = {"tuned_a": models["model1"], "pretrained": models["model0"], "tuned_b": models["model2"]}
    inputs = prepare(renamed, "pretrained", method="ties")
    assert inputs.base == "pretrained" and inputs.names == ["tuned_a", "tuned_b"]
    assert inputs.template is models["model0"]
    expected = r"base model 'nope' is not among the step's models \(tuned_a, pretrained, tuned_b\)"
    with pytest.raises(ConfigError, match=expected):
        prepare(renamed, "nope", method="ties")
    # Default: the first model is the base, so here a fine-tune would play the base.
    assert prepare(renamed, None, method="ties").base == "tuned_a"


def test_prepare_rejects_a_lone_model_and_other_architectures() -> None:
    models = example_finetunes(1)
    with pytest.raises(ConfigError, match="at least one fine-tune"):
        prepare({"only": models["model0"]}, None, method="pcb")
    wide = example_models(2, hidden=5)["model1"]
    with pytest.raises(ConfigError, match=r"cannot merge models .*'1\.weight' has shape"):
        prepare({"base": models["model0"], "wide": wide}, None, method="pcb")


def test_prepare_measures_distance_over_parameters_not_batchnorm_statistics() -> None:
    base = with_bn(0)
    tuned = nudged(base, 0.01, seed=5)
    tuned[2].running_mean.add_(100.0)  # new data moves the statistics a lot, the weights little
    inputs = prepare({"base": base, "tuned": tuned}, None, method="task-arithmetic")
    assert inputs.distances[0] < 0.1
    assert inputs.statistic_keys == ["2.running_mean", "2.running_var"]
    assert torch.equal(inputs.statistics()["2.running_mean"], tuned[2].running_mean)


def test_prepare_is_not_fooled_by_constant_initialised_norm_layers() -> None:
    # BatchNorm scales start at 1 in every network; over all parameters two unrelated
    # networks would look closer than sqrt(2). Over the weight matrices they do not.
    def net(seed: int) -> nn.Sequential:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))

    a, b = net(0), net(1)
    params = [k for k, _ in a.named_parameters()]
    (everything,) = relative_distances(a.state_dict(), [b.state_dict()], keys=params)
    assert everything < MAX_RELATIVE_DISTANCE  # fooled
    with pytest.raises(ConfigError, match="does not look like a fine-tune"):
        prepare({"a": a, "b": b}, None, method="pcb")


# ---------------------------------------------------------------- state arithmetic


def test_average_states_and_add_to_base() -> None:
    a, b = with_bn(0).state_dict(), with_bn(1).state_dict()
    avg = average_states([a, b], [0.25, 0.75])
    assert avg.keys() == a.keys()  # a complete state dict: integer entries come from the first
    assert torch.equal(avg["2.num_batches_tracked"], a["2.num_batches_tracked"])
    assert average_states([a, b], keys=["2.running_mean"]).keys() == {"2.running_mean"}
    assert torch.equal(avg["1.weight"], (0.25 * a["1.weight"].double() + 0.75 * b["1.weight"].double()).float())
    delta = {"1.weight": torch.ones(5, 4, dtype=torch.float64)}
    out = add_to_base(a, delta, 0.5, overrides={"2.running_mean": torch.zeros(5)})
    assert out.keys() == a.keys()
    assert torch.equal(out["1.weight"], (a["1.weight"].double() + 0.5).float())
    assert torch.equal(out["2.running_mean"], torch.zeros(5))
    assert torch.equal(out["3.bias"], a["3.bias"]) and out["3.bias"] is not a["3.bias"]
    assert int(out["2.num_batches_tracked"]) == 3


def test_flatten_roundtrip() -> None:
    state = with_bn(0).state_dict()
    keys, _ = merge_keys(with_bn(0))
    taus = task_vectors(state, [with_bn(1).state_dict(), with_bn(2).state_dict()], keys=keys)
    flat = flatten(taus, keys)
    assert flat.shape == (2, sum(state[k].numel() for k in keys)) and flat.dtype == torch.float64
    back = unflatten(flat[1], taus[1], keys)
    assert all(torch.equal(back[k], taus[1][k]) for k in keys)
    with pytest.raises(ValueError, match="entries but the keys cover"):
        unflatten(flat[1][:-1], taus[1], keys)


def test_top_fraction_mask_keeps_the_top_entries_per_row() -> None:
    scores = torch.tensor([[5.0, 1.0, 3.0, 4.0, 2.0], [0.1, 0.5, 0.4, 0.3, 0.2]])
    mask = top_fraction_mask(scores, 0.4)  # round(0.4 * 5) = 2 per row
    assert mask.tolist() == [[True, False, False, True, False], [False, True, True, False, False]]
    assert top_fraction_mask(scores, 0.01).sum(dim=1).tolist() == [1, 1]  # at least one
    assert bool(top_fraction_mask(scores, 1.0).all())
    # Ties at the threshold are all kept.
    assert top_fraction_mask(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), 0.25).tolist() == [[False, True, True, False]]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        top_fraction_mask(scores, 0.0)


def test_sign_conflicts() -> None:
    values = torch.tensor([[1.0, 0.0, -2.0, 0.0], [-1.0, 3.0, -1.0, 0.0]])
    assert sign_conflicts(values) == 0.25  # only the first column holds both signs


# ------------------------------------------------------------------ scaling search


class _Scored(nn.Module):
    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = s


def test_search_scaling_prefers_accuracy_then_loss_then_order() -> None:
    scores = {0.0: (0.9, 0.5), 0.5: (0.4, 0.8), 1.0: (0.3, 0.8), 1.5: (0.5, 0.8)}  # scaling -> (loss, accuracy)

    class FakeContext(Context):
        def evaluate(self, model: nn.Module) -> Evaluation:
            loss, acc = scores[model.s]
            return Evaluation(loss=loss, accuracy=acc)

    data = TensorImageDataset("d", torch.zeros(2, 1, 1, 1), [0, 1], [0, 1], ["a", "b"])
    context = FakeContext(data=data, quiet=True)
    search = search_scaling(_Scored, [0.0, 0.5, 1.0, 1.5], context, desc="test")
    assert search.scaling == 1.0  # three points reach accuracy 0.8; the lowest loss wins
    assert search.accuracies == [0.5, 0.8, 0.8, 0.8] and search.losses == [0.9, 0.4, 0.3, 0.5]
    scores[1.0], scores[1.5] = (0.6, 0.8), (0.4, 0.8)  # 0.5 and 1.5 now tie on both: the earlier wins
    assert search_scaling(_Scored, [0.0, 0.5, 1.0, 1.5], context, desc="test").scaling == 0.5


def test_search_scaling_needs_data() -> None:
    with pytest.raises(ConfigError, match="needs data.*validation split"):
        search_scaling(_Scored, [0.0, 1.0], Context(quiet=True), desc="test")


def test_example_finetunes_are_close_to_their_base_and_deterministic() -> None:
    first, second = example_finetunes(3), example_finetunes(3)
    assert list(first) == ["model0", "model1", "model2", "model3"]
    base = first["model0"].state_dict()
    distances = relative_distances(base, [first[f"model{i}"].state_dict() for i in (1, 2, 3)])
    assert all(0.03 < d < 0.08 for d in distances)
    for name in first:
        again = second[name].state_dict()
        assert all(torch.equal(t, again[k]) for k, t in first[name].state_dict().items())
    assert not torch.equal(first["model1"].state_dict()["1.weight"], first["model2"].state_dict()["1.weight"])
    plain = example_models(1)["model0"].state_dict()
    np.testing.assert_array_equal(base["1.weight"].numpy(), plain["1.weight"].numpy())
