"""The crosscoder's ablation option: latent classes removed inside the models' forward passes, scored per task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from mergescope import ConfigError, TensorImageDataset, hookimpl
from mergescope.components import Context
from mergescope.errors import ContractError
from mergescope_plugins.concat import ConcatImageDataset
from mergescope_plugins.crosscoder import Crosscoder, _LatentEditor, ablate_latents
from tests.plugins.test_crosscoder import FAST, activation

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 4  # planted features = classes: task t1 holds classes 0 and 1, task t2 classes 2 and 3


class Reader(nn.Module):
    """Logits are the features at ``feat``: class j wins when feature j is the largest."""

    def __init__(self) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.feat = nn.Linear(K, K, bias=False)
        self.head = nn.Linear(K, K, bias=False)
        with torch.no_grad():
            self.feat.weight.copy_(torch.eye(K))
            self.head.weight.copy_(torch.eye(K))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.feat(self.flat(x))))


def task_data() -> ConcatImageDataset:
    """Two tasks of 8 images each. An image of class j has feature j at 1 and its task partner at 0.5."""
    parts = []
    for task in range(2):
        images, labels = [], []
        for i in range(8):
            label = 2 * task + i % 2
            partner = 2 * task + 1 - i % 2
            x = np.zeros(K, np.float32)
            x[label], x[partner] = 1.0, 0.5
            images.append(x.reshape(1, 1, K))
            labels.append(label)
        classes = [str(c) for c in range(2 * task, 2 * task + 2)]
        # Part labels are positions in the part's class list; concat adds the offsets.
        parts.append(
            TensorImageDataset(
                f"t{task + 1}", torch.tensor(np.stack(images)), np.array(labels) - 2 * task, np.arange(8), classes
            )
        )
    return ConcatImageDataset("tasks", parts, ["t1", "t2"], np.repeat([0, 1], 8), np.tile(np.arange(8), 2))


def ground_truth() -> xr.Dataset:
    """The crosscoder whose latent i is feature i: 0 only in a, 1 and 2 in both, 3 only in b."""
    units = [K, K]
    decoder = np.zeros((K, 2 * K), np.float32)
    for i, models in enumerate([(0,), (0, 1), (0, 1), (1,)]):
        for m in models:
            decoder[i, m * K + i] = 1.0
    encoder = np.zeros((2 * K, K), np.float32)
    for i in range(K):
        encoder[(1 if i == 3 else 0) * K + i, i] = 1.0  # each latent reads its feature from a model that has it
    return xr.Dataset(
        {
            "encoder": (("input", "latent"), encoder),
            "encoder_bias": ("latent", np.zeros(K, np.float32)),
            "decoder": (("latent", "input"), decoder),
            "decoder_bias": ("input", np.zeros(2 * K, np.float32)),
            "scale": ("model", np.ones(2)),
            "units": ("model", np.asarray(units)),
            "threshold": ((), np.nan),
            "latent_class": ("latent", ["exclusive:a", "shared", "shared", "exclusive:b"]),
            "dead": ("latent", np.zeros(K, bool)),
        },
        coords={"model": ["a", "b"]},
    )


def ablation(**options) -> xr.Dataset:
    coder = Crosscoder(**FAST, ablation=True, **options)
    models = {"a": Reader().eval(), "b": Reader().eval()}
    out = coder.intervene(ground_truth(), models, "feat", Context(data=task_data(), batch_size=5, quiet=True))
    assert out is not None
    return out


def test_removing_a_planted_class_changes_only_what_it_should():
    out = ablation(ablation_draws=2)
    assert list(out["removed"].values) == ["shared", "exclusive:a", "exclusive:b"]
    assert list(out["task"].values) == ["t1", "t2"]
    np.testing.assert_array_equal(out["ablation_latents"].values, [2, 1, 1])
    np.testing.assert_array_equal(out["ablation_baseline"].values, np.ones((2, 2)))
    np.testing.assert_array_equal(out["ablation_images"].values, [8, 8])
    accuracy = out["ablation_accuracy"]
    # Feature 0 lives in a only: removing it from a flips class 0 of t1 (half of t1), and b keeps it.
    np.testing.assert_array_equal(accuracy.sel(removed="exclusive:a").values, [[0.5, 1.0], [1.0, 1.0]])
    # Features 1 and 2 are in both: each model loses class 1 of t1 and class 2 of t2.
    np.testing.assert_array_equal(accuracy.sel(removed="shared").values, [[0.5, 0.5], [0.5, 0.5]])
    # Feature 3 lives in b only: b loses class 3 of t2.
    np.testing.assert_array_equal(accuracy.sel(removed="exclusive:b").values, [[1.0, 1.0], [1.0, 0.5]])
    np.testing.assert_array_equal(out["ablation_change"].values, accuracy.values - 1.0)
    assert out["ablation_random_accuracy"].sizes == {"removed": 3, "draw": 2, "model": 2, "task": 2}
    np.testing.assert_allclose(
        out["ablation_effect"].values, out["ablation_change"].values - out["ablation_random_change"].values
    )


def test_the_random_control_draws_as_many_live_latents_and_is_seeded():
    first, again, other = ablation(ablation_draws=4), ablation(ablation_draws=4), ablation(ablation_draws=4, seed=1)
    xr.testing.assert_identical(first, again)
    assert not first["ablation_random_accuracy"].equals(other["ablation_random_accuracy"])
    # One random latent of four removes one feature: at most half of one task's images flip.
    single = first["ablation_random_accuracy"].sel(removed="exclusive:a")
    assert float(single.min()) >= 0.5 and set(np.unique(single.values)) <= {0.5, 1.0}


def test_tasks_and_samples_are_chosen_by_options():
    out = ablation(ablation_tasks=["t2"], ablation_samples=4, ablation_draws=1)
    assert list(out["task"].values) == ["t2"] and int(out["ablation_images"].sel(task="t2")) == 4
    np.testing.assert_array_equal(out["ablation_accuracy"].sel(removed="exclusive:b").values, [[1.0], [0.5]])
    assert np.all(out["ablation_random_change_std"].values == 0)


def test_the_edit_inside_the_forward_pass_is_ablate_latents_on_the_recorded_maps(tmp_path):
    rng = np.random.default_rng(0)
    maps = {m: activation(np.maximum(rng.normal(size=(24, 3, 2, 2)), 0), m) for m in ("a", "b")}
    every = np.arange(FAST["dictionary_size"])
    for samples in ("pooled", "positions"):
        fitted = Crosscoder(**FAST, samples=samples).fit(maps, Context(quiet=True, workdir=tmp_path))
        editor = _LatentEditor(fitted, torch.device("cpu"))
        captured = [torch.as_tensor(maps[m].values, dtype=torch.float32) for m in ("a", "b")]
        f = editor.latents(captured, pooled=samples == "pooled")
        edited = captured[1] - editor.contribution(f, every, 1, captured[1].shape, samples)
        expected = ablate_latents(fitted, maps, "b", every, samples=samples)
        np.testing.assert_allclose(edited.numpy(), expected.values, atol=1e-5)


def test_bad_ablation_options_are_named():
    with pytest.raises(ConfigError, match="ablation.*joint_layers"):
        Crosscoder(**FAST, ablation=True, joint_layers=True)
    with pytest.raises(ConfigError, match="ablation_tasks names 't3'.*'t1', 't2'"):
        ablation(ablation_tasks=["t3"])
    coder = Crosscoder(**FAST, ablation=True, ablation_tasks=["t1"])
    one = TensorImageDataset("one", torch.zeros(2, 1, 1, K), np.array([0, 1]), np.arange(2), ["0", "1"])
    models = {"a": Reader().eval(), "b": Reader().eval()}
    with pytest.raises(ConfigError, match="names parts of a concat"):
        coder.intervene(ground_truth(), models, "feat", Context(data=one, quiet=True))
    narrow = {"a": Reader().eval(), "b": Reader().eval()}
    for m in narrow.values():
        m.head = nn.Linear(K, 2, bias=False)
    with pytest.raises(ContractError, match="task 't2' needs the classes up to 3 but a model outputs 2"):
        Crosscoder(**FAST, ablation=True).intervene(
            ground_truth(), narrow, "feat", Context(data=task_data(), quiet=True)
        )
    assert Crosscoder(**FAST).intervene(ground_truth(), models, "feat", Context(data=task_data())) is None


class _ReturnsAList(Crosscoder):
    """A differ whose causal test breaks the contract: it must return a Dataset or None."""

    name = "crosscoder-returning-a-list"

    def intervene(self, result, models, layer, context):
        return [1, 2, 3]


class _Plugin:
    @staticmethod
    @hookimpl
    def register_differs(register):
        register(_ReturnsAList)


def test_a_step_runs_intervene_and_refuses_what_is_not_a_dataset(tmp_path, fresh_registry):
    from mergescope import ModelSpec, Pipeline, Step, run
    from mergescope.pipeline import ActivationSpec

    fresh_registry.register_plugin(_Plugin, name="returns-a-list")
    reg = fresh_registry.get_registry()

    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10))

    def pipeline(differ) -> Pipeline:
        return Pipeline(
            data=reg.get("dataset", "digits")(split="test", per_class=4),
            activations=ActivationSpec(layers=["2"]),
            models=[ModelSpec("x", module=net(0)), ModelSpec("y", module=net(1))],
            steps=[Step(differ, models=["x", "y"])],
        )

    result = run(pipeline(Crosscoder(**FAST, ablation=True, ablation_draws=1)), tmp_path / "good", quiet=True)
    node = result.results["crosscoder/2"].ds
    assert "ablation_accuracy" in node and int(node["ablation_images"].sum()) == 40
    with pytest.raises(ContractError, match="intervene must return an xarray.Dataset or None, got list"):
        run(pipeline(_ReturnsAList(**FAST)), tmp_path / "bad", quiet=True)
