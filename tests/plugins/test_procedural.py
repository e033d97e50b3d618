from __future__ import annotations

import hashlib
import pickle
import subprocess
import sys
import time

import numpy as np
import pluggy
import pytest
import torch

from mergescope import hookspecs
from mergescope.components import DatasetSource, ImageDataset
from mergescope.errors import ConfigError
from mergescope.options import structure_options
from mergescope.testing import parametrize_with_checks
from mergescope_plugins import procedural
from mergescope_plugins.procedural import CRITTER_CLASSES, DICE_CLASSES, Critters, Dice, _solids

DATASETS = [Dice, Critters]


def digest(data: ImageDataset, positions) -> list[str]:
    return [hashlib.sha256(data[i][0].numpy().tobytes()).hexdigest() for i in positions]


# ------------------------------------------------------------------ determinism


@pytest.mark.parametrize("cls", DATASETS)
def test_same_ids_give_identical_pixels_in_any_order(cls):
    first = cls(split="train", size=12, image_size=24).load()
    second = cls(split="train", size=12, image_size=24).load()
    forward = digest(first, range(12))
    backward = digest(second, reversed(range(12)))[::-1]
    assert forward == backward
    assert digest(first, [5, 5, 0, 5]) == [forward[5], forward[5], forward[0], forward[5]]


def test_same_ids_give_identical_pixels_in_a_fresh_process():
    positions = [7, 0, 3]
    script = (
        "import hashlib\n"
        "from mergescope_plugins.procedural import Critters, Dice\n"
        "for cls in (Dice, Critters):\n"
        "    data = cls(split='validation', size=10, image_size=20, seed=3).load()\n"
        f"    for i in {positions!r}:\n"
        "        print(hashlib.sha256(data[i][0].numpy().tobytes()).hexdigest())\n"
    )
    runs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
        for _ in range(2)
    ]
    here = [
        h for cls in DATASETS for h in digest(cls(split="validation", size=10, image_size=20, seed=3).load(), positions)
    ]
    assert runs[0] == runs[1] == here


@pytest.mark.parametrize("cls", DATASETS)
def test_different_items_differ(cls):
    data = cls(split="test", size=12, image_size=24).load()
    hashes = digest(data, range(12))
    assert len(set(hashes)) == 12


@pytest.mark.parametrize("cls", DATASETS)
def test_the_seed_selects_other_images_with_the_same_ids(cls):
    a = cls(size=6, image_size=16, seed=0).load()
    b = cls(size=6, image_size=16, seed=1).load()
    assert np.array_equal(a.sample_ids, b.sample_ids)
    assert not set(digest(a, range(6))) & set(digest(b, range(6)))


def test_the_two_datasets_draw_different_images():
    assert not set(digest(Dice(size=4, image_size=16).load(), range(4))) & set(
        digest(Critters(size=4, image_size=16).load(), range(4))
    )


# ------------------------------------------------------------------ splits, sizes


@pytest.mark.parametrize("cls", DATASETS)
def test_splits_are_disjoint(cls):
    loaded = {split: cls(split=split, size=30, image_size=16).load() for split in procedural.SPLITS}
    ids = [set(d.sample_ids.tolist()) for d in loaded.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    hashes = [set(digest(d, range(30))) for d in loaded.values()]
    assert not (hashes[0] & hashes[1] or hashes[0] & hashes[2] or hashes[1] & hashes[2])
    # An id names its split and its item: id = 3 * i + k.
    assert loaded["test"].sample_ids[:3].tolist() == [1, 4, 7]


@pytest.mark.parametrize("cls", DATASETS)
def test_a_larger_split_extends_a_smaller_one(cls):
    small = cls(split="train", size=5, image_size=16).load()
    large = cls(split="train", size=40, image_size=16).load()
    assert np.array_equal(large.sample_ids[:5], small.sample_ids)
    assert digest(large, range(5)) == digest(small, range(5))


@pytest.mark.parametrize("cls", DATASETS)
@pytest.mark.parametrize(("size", "image_size"), [(1, 8), (7, 33), (3, 96)])
def test_size_and_image_size_are_honoured(cls, size, image_size):
    data = cls(size=size, image_size=image_size).load()
    assert len(data) == len(data.labels) == len(data.sample_ids) == size
    assert data.input_shape == (3, image_size, image_size)
    image, label = data[size - 1]
    assert tuple(image.shape) == (3, image_size, image_size) and image.dtype == torch.float32
    assert torch.isfinite(image).all()
    assert label == data.labels[size - 1]


@pytest.mark.parametrize(("cls", "classes"), [(Dice, DICE_CLASSES), (Critters, CRITTER_CLASSES)])
def test_labels_are_balanced(cls, classes):
    data = cls(size=101).load()
    assert data.classes == classes
    counts = np.bincount(data.labels, minlength=len(classes))
    assert counts.max() - counts.min() <= 1


def test_images_are_normalised_with_mean_and_std():
    data = Critters(size=2, image_size=16, mean=[0.5], std=[0.25]).load()
    pixels = np.asarray(data.image(1), dtype=np.float32) / 255.0
    expected = torch.from_numpy(((pixels - 0.5) / 0.25).transpose(2, 0, 1).copy())
    assert torch.allclose(data[1][0], expected)
    default = Critters(size=2, image_size=16).load()
    assert default.mean == tuple(procedural.IMAGENET_MEAN) and default.std == tuple(procedural.IMAGENET_STD)


def test_subset_and_pickle_keep_ids_and_pixels():
    data = Dice(split="train", size=10, image_size=16).load()
    part = data.subset([8, 2])
    assert part.sample_ids.tolist() == [24, 6]
    assert digest(part, [0, 1]) == digest(data, [8, 2])
    # DataLoader workers get a pickled copy.
    assert digest(pickle.loads(pickle.dumps(data)), [3]) == digest(data, [3])


def test_dice_solids_have_the_right_faces():
    faces = [len(f) for _, f in _solids()]
    sides = [sorted({len(face) for face in f}) for _, f in _solids()]
    assert faces == [4, 6, 8, 10, 12, 20]
    assert sides == [[3], [4], [3], [4], [5], [3]]


# ---------------------------------------------------------------------- options


@pytest.mark.parametrize("cls", DATASETS)
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("split", "dev"),
        ("split", "all"),
        ("size", 0),
        ("size", 2.5),
        ("image_size", 4),
        ("image_size", "64"),
        ("seed", -1),
        ("seed", True),
        ("mean", [0.5, 0.5]),
        ("std", [0.0]),
        ("std", []),
    ],
)
def test_bad_options_are_config_errors_naming_the_key(cls, key, value):
    with pytest.raises(ConfigError, match=key):
        structure_options(cls, {key: value})


def test_good_options_from_a_table():
    dice = structure_options(Dice, {"split": "validation", "size": 9, "image_size": 48, "seed": 5, "mean": [0, 0, 0]})
    assert (dice.split, dice.size, dice.image_size, dice.seed, dice.mean) == ("validation", 9, 48, 5, [0.0, 0.0, 0.0])


# ------------------------------------------------------------------ learnability


def _random_conv_features(images: torch.Tensor) -> np.ndarray:
    # Fixed random filters, rectified and pooled over the image: a cheap probe that does
    # not depend on where the object is.
    filters = torch.randn(48, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    h = torch.relu(torch.nn.functional.conv2d(images, filters, padding=2) - 0.5)
    h = torch.nn.functional.avg_pool2d(h, 2)
    return torch.cat([h.mean((2, 3)), h.amax((2, 3)), (h > 0).float().mean((2, 3))], 1).numpy()


@pytest.mark.parametrize(("cls", "floor"), [(Dice, 0.25), (Critters, 0.5)])
def test_classes_are_learnable_beyond_chance(cls, floor):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()

    def features(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
        data = cls(split=split, size=size, image_size=32).load()
        return _random_conv_features(torch.stack([data[i][0] for i in range(size)])), data.labels

    x_train, y_train = features("train", 600)
    x_test, y_test = features("test", 300)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=0.05)).fit(x_train, y_train)
    accuracy = probe.score(x_test, y_test)
    chance = 1 / len(cls.classes)
    # 300 test images: chance accuracy has a standard error of about 0.02.
    assert accuracy > max(floor, chance + 0.08), f"{cls.name}: probe accuracy {accuracy:.3f}, chance {chance:.3f}"
    assert time.perf_counter() - start < 60


# ------------------------------------------------------------- registration, kit


@pytest.mark.parametrize("cls", DATASETS)
def test_components_follow_the_protocol(cls):
    assert isinstance(cls(), DatasetSource)
    assert isinstance(cls(size=2, image_size=8).load(), ImageDataset)
    lines = cls.__doc__.strip().splitlines()
    assert lines[0].endswith(".") and lines[1].strip() == ""


def test_plugin_registers_both_datasets():
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(procedural)
    registered: list[type] = []
    manager.hook.register_datasets(register=registered.append)
    assert {cls.name: cls for cls in registered} == {"dice": Dice, "critters": Critters}


def test_the_installed_plugins_include_both_datasets():
    from mergescope.plugins import get_registry

    names = {entry.name for entry in get_registry().entries() if entry.kind == "dataset"}
    assert {"dice", "critters"} <= names


@parametrize_with_checks([Dice(size=6, image_size=16), Critters(size=6, image_size=16, split="train")])
def test_conformance(component, check):
    check(component)
