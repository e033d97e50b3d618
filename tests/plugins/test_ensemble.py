"""The ensemble: combined predictions worked by hand, identical members, guards, rebuilding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mergescope import Context
from mergescope.errors import ConfigError
from mergescope.testing import checks_for, example_dataset, example_models
from mergescope_plugins.ensemble import Ensemble, EnsembleModel, combine_outputs
from mergescope_plugins.zoo import MLP

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def context():
    return Context(data=example_dataset(n=90, shape=(1, 4, 4)), quiet=True)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_combined_outputs_are_the_hand_averages():
    a = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    b = np.array([[0.0, 1.0, 0.0], [4.0, -2.0, 0.0]])
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    mean_p = (softmax(a) + softmax(b)) / 2
    np.testing.assert_allclose(combine_outputs([ta, tb], "probabilities").numpy(), np.log(mean_p), rtol=1e-12)
    np.testing.assert_allclose(combine_outputs([ta, tb], "logits").numpy(), (a + b) / 2, rtol=1e-12)
    best = np.maximum(softmax(a), softmax(b))
    np.testing.assert_allclose(combine_outputs([ta, tb], "max-probability").numpy(), np.log(best), rtol=1e-12)
    # the first row: mean probabilities put class 0 first, max-probability too; logits as well
    assert combine_outputs([ta, tb], "probabilities").argmax(dim=1).tolist() == mean_p.argmax(axis=1).tolist()
    with pytest.raises(ValueError, match="differ in shape"):
        combine_outputs([ta, tb[:, :2]])


def test_the_ensemble_model_averages_its_members_softmax(context):
    models = example_models()
    ensemble = Ensemble().merge(models, context)
    x = context.data.images
    with torch.no_grad():
        got = ensemble.model(x)
        hand = sum(torch.softmax(m(x), dim=1) for m in models.values()) / 2
    torch.testing.assert_close(got, torch.log(hand), atol=1e-6, rtol=1e-5)
    accuracy = float((got.argmax(dim=1).numpy() == context.data.labels).mean())
    assert float(ensemble.results["accuracy"]) == pytest.approx(accuracy)
    own = [context.evaluate(m) for m in models.values()]
    np.testing.assert_allclose(ensemble.results["member_accuracy"], [e.accuracy for e in own])
    np.testing.assert_allclose(ensemble.results["member_loss"], [e.loss for e in own])
    assert "ensemble of 2 models (probabilities): accuracy" in Ensemble().describe(ensemble.results)


def test_two_identical_models_score_as_one(context):
    torch.manual_seed(0)
    model = MLP(hidden=[8]).build((1, 4, 4), 3).eval()
    single = context.evaluate(model)
    for combine in ("probabilities", "logits", "max-probability"):
        result = Ensemble(combine=combine).merge({"a": model, "b": copy.deepcopy(model)}, context).results
        assert float(result["accuracy"]) == pytest.approx(single.accuracy)
        assert float(result["loss"]) == pytest.approx(single.loss, rel=1e-5)


def test_a_saved_ensemble_is_rebuilt_from_the_models(context):
    models = example_models()
    merged = Ensemble(combine="logits").merge(models, context).model
    assert isinstance(merged, EnsembleModel)
    state = {k: v.clone() for k, v in merged.state_dict().items()}
    assert set(state) == {f"members.{i}.{k}" for i in range(2) for k in models["model0"].state_dict()}
    rebuilt = Ensemble(combine="logits").rebuild(models, state)
    rebuilt.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(context.data.images), merged(context.data.images))


def test_guards_name_what_is_wrong(context):
    models = example_models()
    with pytest.raises(ConfigError, match="at least two models") as info:
        Ensemble().merge({"a": models["model0"]}, context)
    assert info.value.where == "key 'models'"
    with pytest.raises(ConfigError, match="remove the 'alignment' key"):
        Ensemble().merge(models, context, alignment=object())
    with pytest.raises(ConfigError, match="no \\[data\\]"):
        Ensemble().merge(models, Context(quiet=True))
    with pytest.raises(ConfigError, match="cannot ensemble models"):
        Ensemble().merge({"a": models["model0"], "b": example_models(hidden=5)["model1"]}, context)
    with pytest.raises(ValueError, match="'combine' must be one of"):
        Ensemble(combine="vote")


# The kit checks a merged model against the structure its rebuild() method makes from the
# inputs (the runner loads a cached ensemble into it): every member's parameters.
_CHECKS = list(checks_for(Ensemble))


@pytest.mark.parametrize("check", _CHECKS)
def test_conformance(check):
    check(Ensemble)
