"""Tests of task arithmetic: the exact formula, base selection, the scaling search and its guards."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from mergescope.components import Context, Merger, TensorImageDataset
from mergescope.errors import ConfigError
from mergescope.options import structure_options
from mergescope.task_vectors import example_finetunes
from mergescope.testing import check_component, example_dataset, example_models
from mergescope_plugins.task_arithmetic import TaskArithmetic, sum_task_vectors


def finetunes_with_bn() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    out = {"base": base}
    for i, name in enumerate(["ft_a", "ft_b"]):
        tuned = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
            tuned[2].running_mean.normal_(generator=gen)
        out[name] = tuned
    return out


# ---------------------------------------------------------------------------- formula


def test_merge_is_base_plus_scaled_sum_of_task_vectors_exactly() -> None:
    models = example_finetunes(3)
    # The base is named and listed last: base selection is by name, not position.
    step = {"a": models["model1"], "b": models["model2"], "c": models["model3"], "pretrained": models["model0"]}
    out = TaskArithmetic(base="pretrained", scaling=0.4).merge(step, Context(quiet=True))
    base = models["model0"].state_dict()
    for key, got in out.model.state_dict().items():
        taus = [step[n].state_dict()[key].double() - base[key].double() for n in ("a", "b", "c")]
        expected = (base[key].double() + 0.4 * (taus[0] + taus[1] + taus[2])).to(base[key].dtype)
        assert torch.equal(got, expected), key
    res = out.results
    assert list(res["model"].values) == ["a", "b", "c"]
    assert str(res["base"].values) == "pretrained"
    np.testing.assert_array_equal(res["coefficient"].values, [0.4, 0.4, 0.4])
    assert float(res["merged_scaling"]) == 0.4
    assert res["relative_distance"].dims == ("model",) and bool((res["relative_distance"] < 0.1).all())
    assert "loss" not in res and "scaling" not in res.dims


def test_scaling_zero_returns_the_base_and_inputs_are_untouched() -> None:
    models = example_finetunes(2)
    before = copy.deepcopy(models)
    out = TaskArithmetic(scaling=0.0).merge(models, Context(quiet=True))
    for key, tensor in models["model0"].state_dict().items():
        assert torch.equal(out.model.state_dict()[key], tensor)
    assert out.model is not models["model0"]
    for name in models:
        for key, tensor in before[name].state_dict().items():
            assert torch.equal(models[name].state_dict()[key], tensor)


def test_sum_task_vectors() -> None:
    taus = [{"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([0.5, 0.5])}]
    assert sum_task_vectors(taus)["w"].tolist() == [1.5, -1.5]
    with pytest.raises(ValueError, match="no task vectors"):
        sum_task_vectors([])


def test_batchnorm_statistics_are_the_finetunes_average_without_data() -> None:
    models = finetunes_with_bn()
    out = TaskArithmetic().merge(models, Context(quiet=True))
    expected = (models["ft_a"][2].running_mean.double() + models["ft_b"][2].running_mean.double()) / 2
    torch.testing.assert_close(out.model[2].running_mean, expected.float())
    assert str(out.results["batchnorm_statistics"].values) == "averaged"
    # With data they are measured again on it.
    data = example_dataset()
    reset = TaskArithmetic().merge(models, Context(data=data, quiet=True, batch_size=len(data)))
    assert str(reset.results["batchnorm_statistics"].values) == "recomputed"
    with torch.no_grad():
        features = reset.model[1](reset.model[0](data.images))
    torch.testing.assert_close(reset.model[2].running_mean, features.mean(dim=0), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- scaling search


def threshold_problem() -> tuple[dict[str, nn.Module], TensorImageDataset]:
    """A 1-D toy where the best scaling is 0.5.

    The base predicts class 1 when ``x > 2`` (logits ``[0, x - 2]``); each of the two
    fine-tunes adds 1 to the class-1 bias, so ``base + lambda * (tau_a + tau_b)``
    predicts class 1 when ``x > 2 - 2 lambda``. The labels are ``x > 1``: only
    ``lambda = 0.5`` classifies every point (0 predicts all 0, 1 predicts all 1).
    """

    def classifier(bias: float) -> nn.Sequential:
        model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2))
        with torch.no_grad():
            model[1].weight.copy_(torch.tensor([[0.0], [1.0]]))
            model[1].bias.copy_(torch.tensor([0.0, bias]))
        return model

    x = torch.tensor([0.15, 0.35, 0.55, 0.75, 0.95, 1.05, 1.25, 1.45, 1.65, 1.85])
    data = TensorImageDataset("line", x.view(-1, 1, 1, 1), (x > 1).long().numpy(), np.arange(10), ["low", "high"])
    return {"base": classifier(-2.0), "ft_a": classifier(-1.0), "ft_b": classifier(-1.0)}, data


def test_scaling_search_picks_the_best_scaling_on_a_toy_problem() -> None:
    models, data = threshold_problem()
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    out = TaskArithmetic(scalings=grid).merge(models, Context(data=data, quiet=True))
    res = out.results
    assert float(res["merged_scaling"]) == 0.5
    np.testing.assert_array_equal(res["coefficient"].values, [0.5, 0.5])
    np.testing.assert_array_equal(res["scaling"].values, grid)
    assert res["search_accuracy"].dims == ("scaling",) and res["search_loss"].dims == ("scaling",)
    # Thresholds 2, 1.5, 1, 0.5, 0 -> 5, 7, 10, 7, 5 of the 10 points right.
    np.testing.assert_allclose(res["search_accuracy"].values, [0.5, 0.7, 1.0, 0.7, 0.5])
    assert float(res["accuracy"]) == 1.0
    assert float(res["loss"]) == pytest.approx(float(res["search_loss"].sel(scaling=0.5)))
    torch.testing.assert_close(out.model[1].bias, torch.tensor([0.0, -1.0]))
    assert "best of 5" in TaskArithmetic(scalings=grid).describe(res)


def test_scaling_search_needs_data() -> None:
    models, _ = threshold_problem()
    with pytest.raises(ConfigError, match="needs data.*validation split"):
        TaskArithmetic(scalings=[0.0, 0.5]).merge(models, Context(quiet=True))


def test_scaling_options() -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        TaskArithmetic(scaling=0.5, scalings=[0.1, 0.2])
    with pytest.raises(ValueError, match="at least one value"):
        TaskArithmetic(scalings=[])
    with pytest.raises(ValueError, match="must not repeat"):
        TaskArithmetic(scalings=[0.1, 0.1])
    with pytest.raises(ValueError, match="finite"):
        TaskArithmetic(scaling=float("inf"))
    with pytest.raises(ConfigError, match="'base'"):
        structure_options(TaskArithmetic, {"base": 3})
    assert TaskArithmetic(scalings=[0, 1]).scalings == [0.0, 1.0]
    assert TaskArithmetic(scaling=-1).scaling == -1.0  # negation (forgetting a task) is allowed


# ---------------------------------------------------------------------------- guards


def test_raw_independent_weights_are_rejected() -> None:
    models = example_models(3)  # three independently initialised networks
    with pytest.raises(ConfigError) as info:
        TaskArithmetic().merge(models, Context(quiet=True))
    message = str(info.value)
    assert "model 'model1' does not look like a fine-tune of the base model 'model0'" in message
    assert "task-arithmetic merges task vectors" in message and "'interpolation'" in message


def test_base_errors() -> None:
    models = example_finetunes(2)
    with pytest.raises(ConfigError, match="base model 'theta0' is not among the step's models"):
        TaskArithmetic(base="theta0").merge(models, Context(quiet=True))
    with pytest.raises(ConfigError, match="needs the base and at least one fine-tune"):
        TaskArithmetic().merge({"model0": models["model0"]}, Context(quiet=True))
    with pytest.raises(ConfigError, match="the alignment's reference 'elsewhere' is not among this step's models"):
        from mergescope.components import Alignment

        TaskArithmetic().merge(models, Context(quiet=True), alignment=Alignment("elsewhere"))


def test_an_alignment_is_applied_before_the_task_vectors_are_taken() -> None:
    """Composition: a fine-tune given with its units shuffled merges as the unshuffled one once aligned."""
    from mergescope.components import Alignment
    from mergescope.groups import channel_groups, permutation_matrix, permute

    models = example_finetunes(2)
    groups = channel_groups(models["model0"], torch.zeros(1, 16))
    (group,) = groups
    perm = np.random.default_rng(0).permutation(group.size)
    shuffled = dict(models, model2=permute(models["model2"], {group.name: perm}, groups))
    # Unit perm[j] of the shuffled copy is unit j of the original: the alignment moves it back.
    back = Alignment("model0", {"model2": {group.name: permutation_matrix(np.argsort(perm))}})
    context = Context(data=example_dataset(), quiet=True)
    expected = TaskArithmetic(scaling=0.5).merge(models, context).model.state_dict()
    got = TaskArithmetic(scaling=0.5).merge(shuffled, context, alignment=back).model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value)
    with pytest.raises(ConfigError, match="does not look like a fine-tune"):
        TaskArithmetic(scaling=0.5).merge(shuffled, context)


def test_describe() -> None:
    models = example_finetunes(2)
    merger = TaskArithmetic()
    assert isinstance(merger, Merger)
    text = merger.describe(merger.merge(models, Context(data=example_dataset(), quiet=True)).results)
    assert text.startswith("base 'model0' + 0.3 x sum of 2 task vectors: accuracy ")
    without_data = merger.describe(merger.merge(models, Context(quiet=True)).results)
    assert without_data.endswith("(not evaluated: the pipeline has no data)")


@pytest.mark.parametrize(
    "component", [TaskArithmetic, TaskArithmetic(base="model0", scaling=0.5), TaskArithmetic(scalings=[0.0, 0.5])]
)
def test_conformance(component) -> None:
    check_component(component)
