from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mergescope import component_from_table
from mergescope.components import ImageDataset
from mergescope.errors import ConfigError
from mergescope.options import structure_options
from mergescope.testing import parametrize_with_checks
from mergescope_plugins import photo_crops
from mergescope_plugins.images import IMAGENET_MEAN, IMAGENET_STD, SKIMAGE_PHOTOS
from mergescope_plugins.photo_crops import PHOTO_SOURCES, PhotoCrops, crop_box, photos
from mergescope_plugins.procedural import ProceduralImageDataset

HAS_FOOLBOX = importlib.util.find_spec("foolbox") is not None
HAS_SKIMAGE = importlib.util.find_spec("skimage") is not None
# The sources this machine has: scikit-learn's photos always (a core dependency).
AVAILABLE = [s for s, ok in zip(PHOTO_SOURCES, (HAS_FOOLBOX, HAS_SKIMAGE, True)) if ok]
needs_all = pytest.mark.skipif(not (HAS_FOOLBOX and HAS_SKIMAGE), reason="needs foolbox and scikit-image")

SMALL = {"sources": AVAILABLE, "size": 12, "image_size": 16}


def crops(**options) -> ProceduralImageDataset:
    """Load through the option converter, as a pipeline file would."""
    return structure_options(PhotoCrops, {**SMALL, **options}).load()


def digest(data: ImageDataset, positions) -> list[str]:
    return [hashlib.sha256(data[i][0].numpy().tobytes()).hexdigest() for i in positions]


@pytest.fixture
def fresh_photo_cache():
    photo_crops._source_photos.cache_clear()
    yield
    photo_crops._source_photos.cache_clear()


# ------------------------------------------------------------------ determinism


def test_same_items_give_identical_bytes_in_a_fresh_process():
    positions = [7, 0, 3, 11]
    options = {**SMALL, "split": "validation", "seed": 3}
    script = (
        "import hashlib\n"
        "from mergescope.options import structure_options\n"
        "from mergescope_plugins.photo_crops import PhotoCrops\n"
        f"data = structure_options(PhotoCrops, {options!r}).load()\n"
        f"for i in {positions!r}:\n"
        "    print(hashlib.sha256(data[i][0].numpy().tobytes()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    there = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert there.stdout.split() == digest(crops(split="validation", seed=3), positions)


def test_an_item_does_not_depend_on_the_other_items_read():
    alone = crops(split="train")
    five = digest(alone, [5])  # item 5 first and alone
    among = crops(split="train")
    every = digest(among, reversed(range(12)))[::-1]
    assert five == [every[5]]
    assert digest(among, [5, 0, 5]) == [every[5], every[0], every[5]]
    assert len(set(every)) == 12  # twelve distinct images


def test_a_larger_size_extends_a_smaller_one():
    small, large = crops(size=6), crops(size=20)
    assert large.sample_ids[:6].tolist() == small.sample_ids.tolist()
    assert large.labels[:6].tolist() == small.labels.tolist()
    assert digest(large, range(6)) == digest(small, range(6))


def test_the_seed_changes_the_crops_not_the_ids():
    a, b = crops(seed=0), crops(seed=1)
    assert np.array_equal(a.sample_ids, b.sample_ids) and np.array_equal(a.labels, b.labels)
    assert not set(digest(a, range(12))) & set(digest(b, range(12)))


def test_splits_are_disjoint_in_ids_and_pixels():
    splits = {s: crops(split=s) for s in ("train", "test", "validation")}
    ids = {s: set(d.sample_ids.tolist()) for s, d in splits.items()}
    assert ids["train"] == {3 * i for i in range(12)}
    assert ids["test"] == {3 * i + 1 for i in range(12)}
    assert ids["validation"] == {3 * i + 2 for i in range(12)}
    hashes = [set(digest(d, range(12))) for d in splits.values()]
    assert not (hashes[0] & hashes[1] or hashes[0] & hashes[2] or hashes[1] & hashes[2])


# ------------------------------------------------------------------ photos and labels


def test_labels_cycle_through_the_photos():
    names = [name for name, _ in photos(AVAILABLE)]
    n = len(names)
    data = crops(size=2 * n + 3)
    assert data.classes == tuple(names)
    assert data.labels.tolist() == [i % n for i in range(2 * n + 3)]
    counts = np.bincount(data.labels, minlength=n)
    assert counts.max() - counts.min() <= 1
    assert [data[i][1] for i in range(n + 1)] == data.labels[: n + 1].tolist()


@needs_all
def test_the_default_sources_are_the_37_photos_with_clear_names():
    data = PhotoCrops(size=40, image_size=16).load()
    assert len(data.classes) == 20 + 15 + 2 == 37
    assert all(re.fullmatch(r"imagenet/\d\d_\d+", c) for c in data.classes[:20])
    assert data.classes[20:35] == tuple(f"skimage/{p}" for p in SKIMAGE_PHOTOS)
    assert data.classes[35:] == ("sklearn/china", "sklearn/flower")
    # The order of 'sources' does not renumber the photos.
    reordered = PhotoCrops(sources=["sklearn", "skimage", "foolbox-imagenet"], size=40, image_size=16).load()
    assert reordered.classes == data.classes
    assert digest(reordered, [0, 36]) == digest(data, [0, 36])
    assert digest(PhotoCrops(sources=["skimage"], size=3, image_size=16).load(), [0])  # skimage alone loads
    assert all(image.mode == "RGB" for _, image in photos(PHOTO_SOURCES))  # grey photos made RGB


def test_an_item_is_its_photos_crop_by_the_documented_recipe():
    data = crops(size=30, split="test", seed=4, min_scale=0.2, max_scale=0.9, mean=[0.0], std=[1.0])
    flips = 0
    for i in range(30):
        name, photo = photos(AVAILABLE)[i % len(data.classes)]
        rng = np.random.default_rng([photo_crops._STREAM, 4, 1, i])
        box = crop_box(rng, photo.width, photo.height, 0.2, 0.9)
        flip = bool(rng.random() < 0.5)
        flips += flip
        expected = photo.resize((16, 16), Image.LANCZOS, box=box)
        if flip:
            expected = expected.transpose(Image.FLIP_LEFT_RIGHT)
        got = (data[i][0].numpy().transpose(1, 2, 0) * 255.0).round().astype(np.uint8)
        assert np.array_equal(got, np.asarray(expected)), (i, name)
    assert 5 <= flips <= 25


def test_a_crop_that_cannot_fit_falls_back_to_the_centred_box():
    # sklearn/china is 640 x 427: its whole area at a ratio within [3/4, 4/3] never fits.
    data = crops(sources=["sklearn"], size=2, min_scale=1.0, max_scale=1.0, mean=[0.0], std=[1.0])
    _, china = photos(["sklearn"])[0]
    assert china.size == (640, 427)
    expected = np.asarray(china.resize((16, 16), Image.LANCZOS, box=(35, 0, 604, 427)))
    got = (data[0][0].numpy().transpose(1, 2, 0) * 255.0).round().astype(np.uint8)
    assert np.array_equal(got, expected) or np.array_equal(got, expected[:, ::-1])


def test_crop_boxes_follow_the_scale_and_ratio_ranges():
    for k in range(300):
        rng = np.random.default_rng(k)
        left, top, right, bottom = crop_box(rng, 500, 400, 0.1, 0.6)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 500 and 0 <= top < bottom <= 400
        assert 0.1 * 0.98 <= w * h / (500 * 400) <= 0.6 * 1.02
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03


# ------------------------------------------------------------------ the dataset


def test_shape_dtype_and_normalisation():
    data = crops(image_size=24)
    plain = crops(image_size=24, mean=[0], std=[1])
    assert isinstance(data, ImageDataset) and len(data) == 12
    assert data.input_shape == (3, 24, 24) and data.name == "photo-crops/test"
    image, label = data[3]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and isinstance(label, int)
    raw = plain[3][0]
    assert raw.min() >= 0 and raw.max() <= 1 and raw.std() > 0.01
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(image * std + mean, raw, atol=1e-6)


def test_subset_keeps_ids_classes_and_pixels():
    data = crops()
    part = data.subset([4, 1, 9], name="some")
    assert part.name == "some" and len(part) == 3
    assert part.sample_ids.tolist() == data.sample_ids[[4, 1, 9]].tolist()
    assert part.labels.tolist() == data.labels[[4, 1, 9]].tolist()
    assert part.classes == data.classes
    assert digest(part, range(3)) == digest(data, [4, 1, 9])
    assert data.subset([2]).name == data.name


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"size": 0}, "size"),
        ({"size": -4}, "size"),
        ({"size": 2.5}, "size"),
        ({"image_size": 7}, "image_size"),
        ({"image_size": 0}, "image_size"),
        ({"min_scale": 0}, "min_scale"),
        ({"min_scale": 1.5}, "min_scale"),
        ({"max_scale": 0.0}, "max_scale"),
        ({"max_scale": 1.01}, "max_scale"),
        ({"min_scale": 0.6, "max_scale": 0.5}, "max_scale' = 0.5 must be at least 'min_scale"),
        ({"sources": []}, "sources"),
        ({"sources": "sklearn"}, "sources"),
        ({"sources": ["skimag"]}, "sources' names an unknown photo source 'skimag'; did you mean 'skimage'"),
        ({"sources": ["imagenet"]}, "did you mean 'foolbox-imagenet'"),
        ({"sources": ["foolbox"]}, "did you mean 'foolbox-imagenet'"),
        ({"sources": ["scikit-learn"]}, "sources"),
        ({"sources": ["sklearn", "sklearn"]}, "sources"),
        ({"split": "val"}, "split"),
        ({"seed": -1}, "seed"),
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"std": [0.0]}, "std"),
    ],
)
def test_bad_options_are_config_errors_naming_the_option(options, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        structure_options(PhotoCrops, options)


def test_integer_scales_are_accepted():
    crops_options = structure_options(PhotoCrops, {"min_scale": 1, "max_scale": 1})
    assert (crops_options.min_scale, crops_options.max_scale) == (1.0, 1.0)


@pytest.mark.parametrize(
    ("source", "modules", "package"),
    [("skimage", ["skimage", "skimage.data"], "scikit-image"), ("foolbox-imagenet", ["foolbox"], "foolbox")],
)
def test_a_missing_package_says_how_to_install_it(monkeypatch, fresh_photo_cache, source, modules, package):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)
    pattern = rf"dataset 'photo-crops' needs the {package} package .*pip install 'mergescope\[datasets\]'"
    with pytest.raises(ConfigError, match=pattern):
        PhotoCrops(sources=[source, "sklearn"], size=4, image_size=16).load()


def test_registered_through_its_entry_point_and_blockable(fresh_registry, monkeypatch):
    registry = fresh_registry.get_registry()
    assert registry.get("dataset", "photo-crops") is PhotoCrops
    info = registry.plugins["photo_crops"]
    assert info.distribution == "mergescope" and info.error is None
    monkeypatch.setenv(fresh_registry.BLOCK_ENV, "photo_crops")
    fresh_registry.reset()
    blocked = fresh_registry.get_registry()
    assert "photo_crops" not in blocked.plugins
    assert "photo-crops" not in blocked.names("dataset") and "dice" in blocked.names("dataset")


def test_paper_cites_the_random_resized_crop():
    assert "Szegedy et al. 2015" in PhotoCrops.paper and "Going deeper with convolutions" in PhotoCrops.paper
    assert PhotoCrops.name == "photo-crops"


# ------------------------------------------------------------------ with other datasets


def test_concat_with_dice_mixes_task_and_natural_images():
    dice = {"use": "dice", "size": 6, "image_size": 16}
    natural = {"use": "photo-crops", "sources": AVAILABLE, "size": 5, "image_size": 16, "name": "photos"}
    table = {"use": "concat", "split": "train", "parts": [dice, natural]}
    data = component_from_table("dataset", table).load()
    own = {k: v for k, v in natural.items() if k != "name"}
    alone = component_from_table("dataset", {**own, "split": "train"}).load()
    assert len(data) == 11 and data.input_shape == (3, 16, 16)
    assert data.part_names == ("dice/train", "photos")
    n_photos = len(alone.classes)
    assert len(data.classes) == 6 + n_photos
    assert data.classes[6] == f"photos:{alone.classes[0]}"
    assert data.sample_ids[6:].tolist() == [10**9 + 3 * i for i in range(5)]
    for j in range(5):
        image, label = data[6 + j]
        assert torch.equal(image, alone[j][0])
        assert label == 6 + alone.labels[j]


@parametrize_with_checks([PhotoCrops(sources=AVAILABLE, size=12, image_size=16)])
def test_conformance(component, check):
    check(component)


def test_the_photos_are_read_once_per_process(fresh_photo_cache):
    crops(size=3)[0]
    before = photo_crops._source_photos.cache_info()
    crops(size=3, seed=5)[2]
    after = photo_crops._source_photos.cache_info()
    assert after.misses == before.misses and after.hits > before.hits
    assert math.isfinite(float(crops(size=1)[0][0].sum()))
