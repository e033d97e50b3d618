from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import ClassVar

import attrs
import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image

from mergescope import (
    ConfigError,
    Context,
    DataError,
    Pipeline,
    TensorImageDataset,
    component_from_table,
    hookimpl,
    register_plugin,
    run,
)
from mergescope.components import ImageDataset
from mergescope.options import structure_options, unstructure_options
from mergescope.testing import check_component
from mergescope_plugins.concat import ID_STRIDE, Concat, ConcatImageDataset, part_of
from mergescope_plugins.images import SKIMAGE_PHOTOS, ImageFolderDataset

needs_photos = pytest.mark.skipif(
    importlib.util.find_spec("foolbox") is None or importlib.util.find_spec("skimage") is None,
    reason="needs foolbox and scikit-image",
)

IMAGENET = {"use": "foolbox-samples", "source": "imagenet", "image_size": 16}
CIFAR10 = {"use": "foolbox-samples", "source": "cifar10", "image_size": 16}
PHOTOS = {"use": "skimage-photos", "image_size": 16}


def concat(*parts: dict, **options) -> Concat:
    """Build through the option converter, as a pipeline file would."""
    return structure_options(Concat, {"parts": list(parts), **options})


# --------------------------------------------------------------- ids and classes


@needs_photos
def test_ids_labels_and_classes_of_three_parts():
    data = concat(IMAGENET, CIFAR10, PHOTOS).load()
    imagenet, cifar, photos = (component_from_table("dataset", t).load() for t in (IMAGENET, CIFAR10, PHOTOS))
    assert isinstance(data, ConcatImageDataset) and isinstance(data, ImageDataset)
    assert len(data) == 20 + 20 + 15
    assert data.input_shape == (3, 16, 16)
    assert data.part_names == ("foolbox/imagenet", "foolbox/cifar10", "skimage-photos")
    assert data.name == "concat/foolbox/imagenet+foolbox/cifar10+skimage-photos"
    # ids: part i's own ids plus i * 10**9
    assert data.sample_ids[:20].tolist() == imagenet.sample_ids.tolist()
    assert data.sample_ids[20:40].tolist() == [ID_STRIDE + i for i in cifar.sample_ids]
    assert data.sample_ids[40:].tolist() == [2 * ID_STRIDE + i for i in photos.sample_ids]
    assert part_of(data.sample_ids).tolist() == data.part.tolist() == [0] * 20 + [1] * 20 + [2] * 15
    assert data.part_name[45] == "skimage-photos"
    # classes: the three class lists, prefixed; labels point at the same class names
    assert len(data.classes) == 1000 + 10 + 15
    assert data.classes[:2] == ("foolbox/imagenet:0", "foolbox/imagenet:1")
    assert data.classes[1000] == "foolbox/cifar10:0" and data.classes[-1] == "skimage-photos:rocket"
    for offset, part in ((0, imagenet), (20, cifar), (40, photos)):
        for j in range(len(part)):
            image, label = data[offset + j]
            prefix = data.part_names[int(data.part[offset + j])]
            assert data.classes[label] == f"{prefix}:{part.classes[part.labels[j]]}"
            assert label == data.labels[offset + j]
            assert torch.equal(image, part[j][0])
    assert data.labels[0] == 243 and data.labels[20] == 1000 + 3 and data.labels[40] == 1010


@needs_photos
def test_ids_of_earlier_parts_stay_when_a_part_is_appended_or_a_later_one_changes():
    two = concat(IMAGENET, PHOTOS).load()
    three = concat(IMAGENET, PHOTOS, CIFAR10).load()
    assert three.sample_ids[: len(two)].tolist() == two.sample_ids.tolist()
    assert three.labels[: len(two)].tolist() == two.labels.tolist()
    assert three.classes[: len(two.classes)] == two.classes
    fewer_photos = concat(IMAGENET, {**PHOTOS, "photos": ["camera"]}, CIFAR10).load()
    assert fewer_photos.sample_ids[:20].tolist() == three.sample_ids[:20].tolist()
    # the changed part keeps its own ids too: camera is photo 2 of part 1
    assert fewer_photos.sample_ids[20] == ID_STRIDE + SKIMAGE_PHOTOS.index("camera")
    # ...and the part after it keeps its ids although the one before it shrank
    assert fewer_photos.sample_ids[21:].tolist() == three.sample_ids[35:].tolist()
    assert len(np.unique(three.sample_ids)) == len(three)


@needs_photos
def test_a_part_name_sets_the_class_prefix_and_two_equal_names_are_refused():
    data = concat({**CIFAR10, "name": "cifar"}, {**PHOTOS, "name": "skimage"}).load()
    assert data.part_names == ("cifar", "skimage")
    assert data.classes[3] == "cifar:3" and data.classes[10] == "skimage:astronaut"
    with pytest.raises(ConfigError, match=r"parts #1 and #2 are both named 'foolbox/cifar10'.*give one of them a 'name'"):
        concat(CIFAR10, CIFAR10).load()
    assert len(concat(CIFAR10, {**CIFAR10, "name": "again"}).load()) == 40


@needs_photos
def test_options_round_trip_and_parts_keep_their_tables():
    component = concat(IMAGENET, {**PHOTOS, "name": "skimage"})
    assert unstructure_options(component) == {"parts": [IMAGENET, {**PHOTOS, "name": "skimage"}]}
    pipeline = Pipeline.from_toml(
        '[data]\nuse = "concat"\nparts = [{use = "skimage-photos", image_size = 16, name = "skimage"}]\n'
    )
    assert Pipeline.from_toml(pipeline.to_toml()) == pipeline
    assert pipeline.data == concat({**PHOTOS, "name": "skimage"})


# ----------------------------------------------------------------------- errors


@needs_photos
def test_parts_of_different_shapes_are_named_with_their_shapes():
    with pytest.raises(ConfigError) as info:
        concat(IMAGENET, {"use": "foolbox-samples", "source": "cifar10"}).load()
    message = str(info.value)
    assert "part #2 (use = 'foolbox-samples')" in message
    assert "'foolbox/cifar10' gives images of shape (3, 32, 32)" in message
    assert "part #1 'foolbox/imagenet' gives (3, 16, 16)" in message
    assert "set 'image_size'" in message


def test_an_unknown_part_dataset_names_the_known_ones_and_the_closest():
    with pytest.raises(ConfigError) as info:
        Pipeline.from_toml('[data]\nuse = "concat"\nparts = [{use = "skimage-photos"}, {use = "foolbx-samples"}]\n')
    message = str(info.value)
    assert message.startswith("<pipeline>, [data] (use = 'concat')")
    assert "part #2, key 'use': unknown dataset 'foolbx-samples'. Did you mean 'foolbox-samples'?" in message
    assert "Known datasets: " in message and "imagefolder" in message and "mnist5000" in message


def test_an_unknown_part_option_is_named_with_the_part():
    with pytest.raises(ConfigError, match=r"part #1 \(use = 'skimage-photos'\), key 'imagesize': unknown option .*'image_size'"):
        concat({"use": "skimage-photos", "imagesize": 16})


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([], "'parts' must be a non-empty list of dataset tables"),
        (["skimage-photos"], r"part #1 must be a table like \{use = \"foolbox-samples\"\}, got 'skimage-photos'"),
        ([{"image_size": 16}], r"part #1, key 'use': missing 'use = \"<dataset name>\"'"),
        ([{"use": "concat", "parts": [PHOTOS]}], "part #1 \\(use = 'concat'\\) is itself a concat; list its parts here"),
        ([{**PHOTOS, "name": 3}], "part #1 \\(use = 'skimage-photos'\\) has 'name' = 3; it must be a non-empty string"),
    ],
)
def test_bad_parts_are_rejected_when_read(parts, message):
    with pytest.raises(ConfigError, match=message):
        concat(*parts)


@attrs.define
class _FarIds:
    """Four blank 1x4x4 images whose sample ids start at 10**9 (too large for a part)."""

    name: ClassVar[str] = "test-far-ids"

    def load(self) -> TensorImageDataset:
        return TensorImageDataset("far", torch.zeros(4, 1, 4, 4), [0, 1, 0, 1], [10**9 + i for i in range(4)], ("x", "y"))


class _FarIdsPlugin:
    @hookimpl
    def register_datasets(self, register):
        register(_FarIds)


def test_part_ids_beyond_the_stride_are_refused(fresh_registry):
    register_plugin(_FarIdsPlugin(), name="far-ids")
    with pytest.raises(ConfigError, match=r"part 'far' has sample ids from 1000000000 to 1000000003; .*stride of 1000000000"):
        concat({"use": "test-far-ids"}).load()


def test_split_is_refused_for_a_part_without_splits():
    component = concat({"use": "mnist5000", "per_class": 2}, {**PHOTOS, "image_size": 28}, split="train")
    with pytest.raises(ConfigError) as info:
        component.load()
    assert str(info.value).startswith("dataset 'concat', part #2 (use = 'skimage-photos'): split = 'train'")
    assert "'skimage-photos' has no 'split' option" in str(info.value)
    with pytest.raises(ConfigError, match=r"part #1 \(use = 'mnist5000'\): split = 'bogus': 'split' must be one of"):
        concat({"use": "mnist5000", "per_class": 2}, split="bogus").load()


def test_split_reaches_every_part():
    parts = ({"use": "mnist5000", "per_class": 3}, {"use": "digits", "per_class": 3, "image_size": 28})
    train = concat(*parts, split="train").load()
    test = concat(*parts).load()
    assert train.part_names == ("mnist5000/train", "digits/train")
    assert test.part_names == ("mnist5000/test", "digits/test")
    assert len(train) == len(test) == 60 and train.input_shape == (1, 28, 28)
    assert not set(train.sample_ids) & set(test.sample_ids)


# ---------------------------------------------------------------- lazy parts


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "shapes"
    for label, name in enumerate(("circle", "square")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 10), (80 * label, 40 * i, 200)).save(root / name / f"{i}.png")
    return root


def test_an_image_folder_part_stays_lazy(folder):
    digits = {"use": "digits", "per_class": 1, "image_size": 8, "rgb": True}
    data = concat(digits, {"use": "imagefolder", "root": str(folder), "image_size": 8, "resize": 8}).load()
    own = ImageFolderDataset(root=str(folder), image_size=8, resize=8).load()
    assert data.part_names == ("digits/test", "imagefolder/shapes")
    assert len(data) == 10 + 6 and data.input_shape == (3, 8, 8)
    assert data.sample_ids[10:].tolist() == [ID_STRIDE + i for i in range(6)]
    assert data.classes[10:] == ("imagefolder/shapes:circle", "imagefolder/shapes:square")
    assert data.labels[10:].tolist() == [10, 10, 10, 11, 11, 11]
    assert torch.equal(data[13][0], own[3][0])
    # files are read when an item is used, not when the data is loaded
    Path(own.paths[4]).unlink()
    assert data[15][0].shape == (3, 8, 8)
    with pytest.raises(DataError, match=r"dataset 'imagefolder/shapes': cannot read image file .*1\.png") as info:
        data[14]
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_subset_and_context_images_find_items_by_concat_id(folder):
    data = concat(
        {"use": "digits", "per_class": 1, "image_size": 8, "rgb": True},
        {"use": "imagefolder", "root": str(folder), "image_size": 8, "resize": 8},
    ).load()
    part = data.subset([12, 3], name="two")
    assert part.name == "two" and part.sample_ids.tolist() == [data.sample_ids[12], data.sample_ids[3]]
    assert part.labels.tolist() == [data.labels[12], data.labels[3]] and part.classes == data.classes
    assert torch.equal(part[0][0], data[12][0])
    context = Context(data=data)
    images = context.images([ID_STRIDE + 2, int(data.sample_ids[0])])
    assert images.shape == (2, 3, 8, 8)
    assert torch.equal(images[0], data[12][0]) and torch.equal(images[1], data[0][0])
    with pytest.raises(KeyError, match=f"sample id {2 * ID_STRIDE} is not in the dataset"):
        context.images([2 * ID_STRIDE])


def test_a_data_loader_batches_across_parts(folder):
    data = concat(
        {"use": "digits", "per_class": 1, "image_size": 8, "rgb": True},
        {"use": "imagefolder", "root": str(folder), "image_size": 8, "resize": 8},
    ).load()
    images, labels = next(iter(torch.utils.data.DataLoader(data.subset(range(8, 14)), batch_size=6)))
    assert images.shape == (6, 3, 8, 8)
    assert labels.tolist() == data.labels[8:14].tolist() and labels.tolist()[2:] == [10, 10, 10, 11]
    assert torch.equal(images[1], data[9][0]) and torch.equal(images[2], data[10][0])


@needs_photos
def test_conformance_with_a_lazy_part(folder):
    lazy = {"use": "imagefolder", "root": str(folder), "image_size": 8, "resize": 8}
    check_component(concat(lazy, {**PHOTOS, "image_size": 8}))


# ------------------------------------------------------------------- pipelines


CONCAT_PIPELINE = """
seed = 0

[data]
use = "concat"
parts = [
    { use = "mnist5000", per_class = 6, name = "mnist" },
    { use = "digits", per_class = 6, image_size = 28, name = "digits" },
]

[activations]
layers = ["relu1"]
batch_size = 50
topk = 4

[[models]]
name = "a"
use = "mlp"
hidden = [12]

[models.train]
seed = 0
epochs = 1

[[models]]
name = "b"
use = "mlp"
hidden = [12]

[models.train]
seed = 1
epochs = 1

[[steps]]
use = "kendall-tau"
models = ["a", "b"]
allow_unaligned = true

[[steps]]
use = "top-k"
models = ["a", "b"]
max_units = 2
tile = 16
"""


def test_a_pipeline_runs_on_concat_data_and_trains_on_its_train_split(tmp_path):
    pipeline = Pipeline.from_toml(CONCAT_PIPELINE)
    data = pipeline.data.load()
    result = run(pipeline, tmp_path / "run", quiet=True)
    # trained on 20 classes: the models' heads have one output per concat class
    assert result.models["a"].head.out_features == len(data.classes) == 20
    tau = result.results["kendall-tau/relu1"].ds["kendall_tau"]
    assert tau.sizes["unit"] == 12 and np.isfinite(tau.values).any()
    index = xr.open_dataset(tmp_path / "run" / "figures" / "top-k" / "topk-index.nc").load()
    shown = index["topk_sample"].values.ravel()
    assert set(shown.tolist()) <= set(data.sample_ids.tolist()) and len(shown) == 2 * 2 * 4
    grids = sorted((tmp_path / "run" / "figures" / "top-k" / "relu1").glob("unit-*.png"))
    assert len(grids) == 2
    assert Pipeline.from_toml((tmp_path / "run" / "pipeline.toml").read_text()) == pipeline


@needs_photos
def test_training_on_concat_data_without_splits_is_a_clear_error(tmp_path):
    text = """
[data]
use = "concat"
parts = [{ use = "skimage-photos", image_size = 16 }]

[[models]]
name = "a"
use = "mlp"
hidden = [4]

[[models]]
name = "b"
use = "mlp"
hidden = [4]

[[steps]]
use = "interpolation"
models = ["a", "b"]
"""
    with pytest.raises(ConfigError, match=r"'skimage-photos' has no 'split' option.*\[models.train_data\] table"):
        run(Pipeline.from_toml(text), tmp_path / "run", quiet=True)


# ------------------------------------------------------ the public table builder


def test_component_from_table_builds_like_data_and_names_bad_tables():
    source = component_from_table("dataset", {"use": "digits", "per_class": 2, "name": "d"}, reserved=("name",))
    assert type(source).name == "digits" and source.per_class == 2
    with pytest.raises(ConfigError, match=r"^part x \(use = 'digits'\), key 'name': unknown option 'name'"):
        component_from_table("dataset", {"use": "digits", "name": "d"}, where="part x")
    with pytest.raises(ConfigError, match=r"^dataset table, key 'use': unknown dataset 'digit'. Did you mean 'digits'\?"):
        component_from_table("dataset", {"use": "digit"})
    with pytest.raises(ConfigError, match=r"expected a table naming a dataset with 'use', got str 'digits'"):
        component_from_table("dataset", "digits")
    with pytest.raises(ValueError, match=r"unknown component kind 'datasets'"):
        component_from_table("datasets", {"use": "digits"})


# ------------------------------------------------------------------------ only


DICE = {"use": "dice", "split": "train", "size": 12, "image_size": 16}
CRITTERS = {"use": "critters", "split": "train", "size": 16, "image_size": 16}


def test_only_keeps_one_parts_items_under_every_parts_classes():
    whole = concat(DICE, CRITTERS).load()
    critters = concat(DICE, CRITTERS, only=["critters/train"]).load()
    assert critters.classes == whole.classes and len(critters.classes) == 6 + 8
    assert len(critters) == 16 and set(critters.part_name) == {"critters/train"}
    # The labels keep their places in the joint class list: critters' classes come after dice's six.
    assert critters.labels.min() >= 6 and np.array_equal(critters.labels, whole.labels[12:])
    assert np.array_equal(critters.sample_ids, whole.sample_ids[12:])
    assert torch.equal(critters[3][0], whole[15][0])
    np.testing.assert_array_equal(critters.part_classes("critters/train"), np.arange(6, 14))
    np.testing.assert_array_equal(critters.part_classes("dice/train"), np.arange(6))
    both = concat(DICE, CRITTERS, only=["dice/train", "critters/train"]).load()
    assert np.array_equal(both.sample_ids, whole.sample_ids)


def test_only_with_an_unknown_part_names_the_parts():
    with pytest.raises(ConfigError, match=r"'only' names the part 'critters'.*did you mean 'critters/train'"):
        concat(DICE, CRITTERS, only=["critters"]).load()
    with pytest.raises(ConfigError, match="only"):
        concat(DICE, CRITTERS, only=[])
    with pytest.raises(ConfigError, match="repeat"):
        concat(DICE, CRITTERS, only=["dice/train", "dice/train"])
