"""The CLIP task-merging protocol on a tiny CLIP trained here: zero-shot heads per task, scaling chosen on validation.

A two-layer CLIP is trained contrastively for a few seconds on mnist5000 digits with the
captions "a photo of the digit k" (the recipe of examples/make-tiny-clip.py); its image tower is fine-tuned on three digit tasks
against the frozen zero-shot head, and the fine-tunes are merged with task arithmetic,
TIES and PCB, the scaling chosen on each task's validation split with that task's head.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from mergescope import Pipeline, run
from mergescope.errors import ConfigError
from mergescope.specs import Task
from mergescope.tasks import TaskHead, ValidationTask, task_head
from mergescope_plugins.open_clip_image import (
    OpenClipImage,
    ZeroShotImageClassifier,
    prompts,
    zero_shot_logits,
    zero_shot_weights,
)

open_clip = pytest.importorskip("open_clip")

# The tiny CLIP's recipe is the example's: one script makes it for examples/task-merge-clip.toml and here.
_spec = importlib.util.spec_from_file_location(
    "make_tiny_clip", Path(__file__).parents[1] / "examples" / "make-tiny-clip.py"
)
make_tiny_clip = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tiny_clip)

CONFIG = make_tiny_clip.CONFIG
TEMPLATE = make_tiny_clip.TEMPLATE
DIGITS = make_tiny_clip.DIGITS
SIDE = CONFIG["vision_cfg"]["image_size"]
TASKS = {"low": [0, 1, 2, 3, 4], "high": [5, 6, 7, 8, 9], "mid": [3, 4, 5, 6, 7]}
GRID = [0.2, 0.5, 0.8, 1.1]


def _digits(split: str, classes: list[int] | None = None, per_class: int | None = None) -> dict:
    table = {"use": "mnist5000", "split": split, **make_tiny_clip.DIGIT_OPTIONS}
    if classes is not None:
        table["classes"] = classes
    if per_class is not None:
        table["per_class"] = per_class
    return table


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: the towers are tiny, and other jobs on the machine slow them less."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The tiny CLIP's training images, loaded once (the digits' arrays are then cached for the pipeline)."""
    return make_tiny_clip.digits("train", per_class=200)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, one_torch_thread, train_digits) -> Path:
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(make_tiny_clip.train_tiny_clip(*train_digits).state_dict(), path)
    return path


def _architecture(clip: Path) -> dict:
    return {"use": "open-clip-image", "config": CONFIG, "pretrained": str(clip), "classnames": DIGITS,
            "templates": [TEMPLATE]}  # fmt: skip


def _pipeline(clip: Path) -> Pipeline:
    models = [{"name": "base", **_architecture(clip), "train": {"seed": 0, "epochs": 0}}]
    for task, classes in TASKS.items():
        models.append(
            {
                "name": f"ft_{task}",
                **_architecture(clip),
                "train": {"seed": 0, "epochs": 2, "batch_size": 64, "lr": 3e-4},
                "train_data": _digits("train", classes, per_class=120),
            }
        )
    fine_tunes = ["base", *(f"ft_{t}" for t in TASKS)]
    steps = [
        {"use": "task-arithmetic", "models": fine_tunes, "base": "base", "scalings": GRID},
        {"use": "ties", "models": fine_tunes, "base": "base", "scalings": GRID},
        {"use": "pcb", "models": fine_tunes, "base": "base", "scalings": GRID},
    ]
    # Each task names its digits as the head's classes: the head of a task has a row per class of its data.
    tasks = [
        {
            "name": task,
            **_digits("test", classes, per_class=40),
            "expert": f"ft_{task}",
            "head": {"templates": [TEMPLATE], "classnames": DIGITS},
            "validation": {"split": "validation", "per_class": 30},
        }
        for task, classes in TASKS.items()
    ]
    return Pipeline.from_dict(
        {
            "seed": 0,
            "data": _digits("validation", per_class=20),
            "activations": {"batch_size": 200},
            "models": models,
            "steps": steps,
            "tasks": tasks,
        }  # fmt: skip
    )


@pytest.fixture(scope="module")
def merged(tiny_clip, tmp_path_factory, one_torch_thread):
    return run(_pipeline(tiny_clip), tmp_path_factory.mktemp("run"), quiet=True)


# ------------------------------------------------------------------ the head's equations


def test_zero_shot_weights_follow_the_reference_recipe_on_a_hand_toy() -> None:
    # Text "tower": prompt -> fixed 2-d embedding; two templates, two classes.
    table = {"a cat": [3.0, 4.0], "the cat": [1.0, 0.0], "a dog": [0.0, 2.0], "the dog": [0.0, 5.0]}

    def encode(texts: list[str]) -> torch.Tensor:
        return torch.tensor([table[t] for t in texts])

    weights = zero_shot_weights(encode, ["cat", "dog"], ["a {}", "the {}"], logit_scale=float(np.log(10.0)))
    # cat: (0.6, 0.8) and (1, 0) -> mean (0.8, 0.4) -> / sqrt(0.8) -> (2, 1) / sqrt(5); dog: (0, 1).
    expected = 10.0 * torch.tensor([[2 / np.sqrt(5), 1 / np.sqrt(5)], [0.0, 1.0]])
    assert torch.allclose(weights, expected.float(), atol=1e-6)
    logits = zero_shot_logits(torch.tensor([[0.0, 3.0]]), weights)  # image along (0, 1)
    assert torch.allclose(logits, torch.tensor([[10 / np.sqrt(5), 10.0]]).float(), atol=1e-5)
    assert prompts("cat", ["a {}", "{} here"]) == ["a cat", "cat here"]


def test_the_model_is_the_image_tower_alone_and_the_head_swaps(tiny_clip) -> None:
    model = OpenClipImage(config=CONFIG, pretrained=str(tiny_clip), classnames=DIGITS, templates=[TEMPLATE]).build(
        (3, SIDE, SIDE), 10
    )
    assert isinstance(model, ZeroShotImageClassifier)
    assert all(k.startswith("visual.") for k in model.state_dict())  # no head, no text tower: nothing else merges
    assert not any(p is model.head for p in model.parameters())
    clip = open_clip.CLIP(**copy.deepcopy(CONFIG))
    clip.load_state_dict(torch.load(tiny_clip, weights_only=True))
    clip.eval()
    images = torch.randn(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    tokens = open_clip.SimpleTokenizer(context_length=CONFIG["text_cfg"]["context_length"])(
        [TEMPLATE.format(d) for d in DIGITS]
    )
    with torch.no_grad():  # independent re-implementation with the whole CLIP
        image = nn.functional.normalize(clip.encode_image(images), dim=-1)
        text = nn.functional.normalize(clip.encode_text(tokens), dim=-1)
        expected = clip.logit_scale.exp() * image @ text.t()
        assert torch.allclose(model(images), expected, atol=1e-4)
        with model.task_head(["7", "1"], [TEMPLATE]):
            assert torch.allclose(model(images), expected[:, [7, 1]], atol=1e-4)
        assert torch.allclose(model(images), expected, atol=1e-4)  # its own head is back
    copied = copy.deepcopy(model)
    assert copied.text is model.text  # one text tower for every copy


def test_missing_weights_and_bad_heads_are_refused(tiny_clip) -> None:
    with pytest.raises(ConfigError, match="never downloads"):
        OpenClipImage(config=CONFIG, classnames=DIGITS).build((3, SIDE, SIDE), 10)
    with pytest.raises(ConfigError, match="one class name per class"):
        OpenClipImage(config=CONFIG, pretrained=str(tiny_clip), classnames=DIGITS[:3]).build((3, SIDE, SIDE), 10)
    with pytest.raises(ConfigError, match=f"RGB images of {SIDE}x{SIDE}"):
        OpenClipImage(config=CONFIG, pretrained=str(tiny_clip), classnames=DIGITS).build((1, 28, 28), 10)
    with pytest.raises(ConfigError, match="pretrained tag"):
        Pipeline.from_dict({"models": [{"name": "a", "use": "open-clip-image", "pretrained": "openai"}]})
    with pytest.raises(ConfigError, match="Did you mean 'ViT-B-32'"):
        Pipeline.from_dict({"models": [{"name": "a", "use": "open-clip-image", "model": "ViT-B-23"}]})
    with pytest.raises(ConfigError, match=r"head\], key 'templates'.*no '\{\}'"):
        Task("t", "mnist5000", head={"templates": ["a digit"]})
    with pytest.raises(ConfigError, match="cannot build one"), task_head(nn.Linear(2, 2), TaskHead(["a {}"]), _Data()):
        pass


class _Data:
    name, classes = "toy", ("a", "b")


def test_task_keys_round_trip_through_toml(tiny_clip) -> None:
    pipeline = _pipeline(tiny_clip)
    again = Pipeline.from_toml(pipeline.to_toml())
    assert again.tasks == pipeline.tasks
    task = pipeline.tasks[0]
    assert task.head == TaskHead([TEMPLATE], DIGITS)
    assert (task.validation.split, task.validation.classes, task.validation.per_class) == (
        "validation",
        [0, 1, 2, 3, 4],
        30,
    )


# ------------------------------------------------------------------- the merge table


def test_the_table_has_every_method_on_every_task(merged) -> None:
    table = merged.tasks
    methods = ["task-arithmetic", "ties", "pcb"]
    assert set(methods + ["base", "ft_low", "ft_high", "ft_mid"]) == set(table["model"].values)
    assert table["accuracy"].dims == ("model", "task") and list(table["task"].values) == list(TASKS)
    for variable in ("accuracy", "normalized_accuracy"):
        assert np.isfinite(table[variable].sel(model=methods).values).all()
    for variable in ("average_accuracy", "average_normalized_accuracy"):
        assert table[variable].dims == ("model",)
        assert np.isfinite(table[variable].sel(model=methods).values).all()
    experts = np.array([table["normalized_accuracy"].sel(model=f"ft_{t}", task=t) for t in TASKS])
    assert np.allclose(experts, 1.0)


def test_zero_shot_is_above_chance_and_each_fine_tune_above_it_on_its_task(merged) -> None:
    accuracy = merged.tasks["accuracy"]
    assert float(accuracy.sel(model="base").min()) > 0.2 + 0.4  # five digits compete: chance is 0.2
    for task in TASKS:
        assert float(accuracy.sel(model=f"ft_{task}", task=task)) > float(accuracy.sel(model="base", task=task))


def test_the_scaling_is_chosen_on_the_validation_splits(merged) -> None:
    for step in ("task-arithmetic", "ties", "pcb"):
        result = merged.results[step].to_dataset()
        assert list(result["scaling"].values) == GRID and list(result["task"].values) == list(TASKS)
        assert str(result["search_criterion"].values) == "average normalized validation accuracy"
        curve = result["search_task_accuracy"] / result["expert_validation_accuracy"]
        assert np.allclose(curve.mean("task"), result["search_normalized_accuracy"])
        assert float(result["merged_scaling"]) == GRID[int(np.argmax(curve.mean("task").values))]
        assert np.allclose(result["search_accuracy"], result["search_task_accuracy"].mean("task"))


def test_a_search_chooses_by_the_mean_over_tasks() -> None:
    from mergescope.context import Context
    from mergescope.task_vectors import search_scaling

    class Scored(nn.Module):  # accuracy on task t: what the scaling gives it
        def __init__(self, s: float) -> None:
            super().__init__()
            self.s = s

    scores = {"a": {0.0: 0.9, 1.0: 0.5, 2.0: 0.8}, "b": {0.0: 0.1, 1.0: 0.6, 2.0: 0.3}}

    class Fake(Context):
        def evaluate_task(self, model, task):
            from mergescope.values import Evaluation

            return Evaluation(loss=1.0, accuracy=scores[task.name][model.s])

    tasks = [ValidationTask("a", None), ValidationTask("b", None)]
    search = search_scaling(Scored, [0.0, 1.0, 2.0], Fake(quiet=True, tasks=tasks), desc="test")
    # Means 0.5, 0.55, 0.55: the highest wins, the earlier of a tie.
    assert search.scaling == 1.0 and search.criterion == "average validation accuracy"
    assert np.allclose(search.task_accuracies, [[0.9, 0.1], [0.5, 0.6], [0.8, 0.3]])
    assert isinstance(xr.Dataset({k: v for k, v in search.variables().items() if k != "search_criterion"}), xr.Dataset)
