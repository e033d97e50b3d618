from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pluggy
import pytest
import torch
from PIL import Image

from mergescope import hookspecs
from mergescope.components import DatasetSource, ImageDataset, TensorImageDataset
from mergescope.errors import ConfigError, DataError
from mergescope.options import structure_options
from mergescope.testing import check_component
from mergescope_plugins import images
from mergescope_plugins.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SKIMAGE_PHOTOS,
    FoolboxSamples,
    ImageFileDataset,
    ImageFolderDataset,
    SkimagePhotos,
)

needs_foolbox = pytest.mark.skipif(importlib.util.find_spec("foolbox") is None, reason="needs foolbox")
needs_skimage = pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="needs scikit-image")

# Class -> number of images; each image is one flat colour, so its pixels are known.
CLASSES = {"cat": 4, "dog": 6, "emu": 5}


def colour(label: int, index: int) -> tuple[int, int, int]:
    return (40 * label + 10, 20 * index, 200 - 30 * label)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    for label, (name, count) in enumerate(CLASSES.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            suffix = ".png" if i % 2 else ".jpg"
            Image.new("RGB", (20 + 3 * i, 16), colour(label, i)).save(root / name / f"img{i:02d}{suffix}")
    # A grey image and files that are no images, which the listing skips.
    Image.new("L", (16, 16), 128).save(root / "emu" / "zz_grey.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "README").write_text("top-level file, not a class")
    return root


def small(root: Path, **options) -> ImageFolderDataset:
    return ImageFolderDataset(root=str(root), image_size=8, resize=8, **options)


# ------------------------------------------------------------------- image folder


def test_folder_layout_gives_classes_labels_and_ids(folder):
    data = small(folder).load()
    assert isinstance(data, ImageDataset) and isinstance(data, ImageFileDataset)
    assert data.classes == ("cat", "dog", "emu")
    assert len(data) == 4 + 6 + 6
    assert data.labels.tolist() == [0] * 4 + [1] * 6 + [2] * 6
    assert data.sample_ids.tolist() == list(range(16))
    assert data.input_shape == (3, 8, 8)
    assert data.name == "imagefolder/pets"
    assert [Path(p).name for p in data.paths[:3]] == ["img00.jpg", "img01.png", "img02.jpg"]


def test_listing_matches_torchvision_image_folder(folder):
    from torchvision.datasets import ImageFolder

    reference = ImageFolder(str(folder))
    data = small(folder).load()
    assert [p for p, _ in reference.samples] == list(data.paths)
    assert reference.classes == list(data.classes)


def test_images_are_cropped_and_normalised(folder):
    data = small(folder).load()
    image, label = data[5]  # dog, img01.png: a flat colour
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and label == 1
    expected = (torch.tensor(colour(1, 1)) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(image[:, 4, 4], expected, atol=1e-5)


def test_grey_images_become_rgb(folder):
    data = small(folder).load()
    grey, label = data[len(data) - 1]
    assert grey.shape == (3, 8, 8) and label == 2
    assert torch.allclose(grey[0], grey[0, 0, 0]) and not torch.allclose(grey[0], grey[2])


def test_resize_then_centre_crop(folder):
    data = ImageFolderDataset(root=str(folder), image_size=12, resize=16, mean=[0.0], std=[1.0]).load()
    image, _ = data[0]
    assert image.shape == (3, 12, 12)
    assert torch.allclose(image[:, 6, 6], torch.tensor(colour(0, 0)) / 255, atol=0.02)


def test_images_are_read_lazily(folder):
    data = small(folder).load()
    Path(data.paths[0]).unlink()
    assert data[1][0].shape == (3, 8, 8)
    # A file gone since the listing is a data error naming it and the dataset.
    with pytest.raises(DataError, match=r"dataset 'imagefolder/pets': cannot read image file .*img00\.jpg") as info:
        data[0]
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_a_data_loader_batches_the_images(folder):
    loader = torch.utils.data.DataLoader(small(folder).load(), batch_size=5)
    images_, labels = next(iter(loader))
    assert images_.shape == (5, 3, 8, 8) and labels.tolist() == [0, 0, 0, 0, 1]


def test_per_class_keeps_the_first_images_and_their_ids(folder):
    full = small(folder).load()
    data = small(folder, per_class=2).load()
    assert data.sample_ids.tolist() == [0, 1, 4, 5, 10, 11]
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert list(data.paths) == [full.paths[i] for i in data.sample_ids]
    assert torch.equal(data[2][0], full[4][0])


def test_per_class_larger_than_a_class_names_the_folder(folder):
    with pytest.raises(ConfigError, match=r"'per_class' = 5 is more than the 4 items of class 0 \('cat'\) in image folder"):
        small(folder, per_class=5).load()


def test_class_split_parts_are_disjoint_and_imbalanced(folder):
    a = small(folder, class_split="a", major_fraction=0.75).load()
    b = small(folder, class_split="b", major_fraction=0.75).load()
    assert not set(a.sample_ids) & set(b.sample_ids)
    assert sorted([*a.sample_ids, *b.sample_ids]) == list(range(16))
    # cat and dog are the first half of the classes, emu the second.
    assert np.bincount(a.labels, minlength=3).tolist() == [3, 4, 2]
    assert np.bincount(b.labels, minlength=3).tolist() == [1, 2, 4]
    assert a.classes == b.classes == ("cat", "dog", "emu")
    assert (a.name, b.name) == ("imagefolder/pets/a", "imagefolder/pets/b")
    both = small(folder, class_split="a", major_fraction=0.75, per_class=1).load()
    assert set(both.sample_ids) <= set(a.sample_ids) and len(both) == 3
    with pytest.raises(ConfigError, match=r"the 1 items of class 2 \('emu'\) in image folder .*, part 'a'$"):
        small(folder, class_split="a", per_class=2).load()


def test_missing_root_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=f"image folder '{tmp_path / 'nope'}' does not exist"):
        small(tmp_path / "nope").load()


def test_root_that_is_a_file_is_a_config_error(tmp_path):
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="is not a directory"):
        small(tmp_path / "file.png").load()


def test_root_without_class_folders_is_a_config_error(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "loose.png")
    with pytest.raises(ConfigError, match=f"image folder '{tmp_path}' has no class folders"):
        small(tmp_path).load()


def test_class_folder_without_images_is_a_config_error(folder):
    (folder / "fox").mkdir()
    (folder / "fox" / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError, match=f"class folder '{folder / 'fox'}' has no images; accepted extensions: .jpg"):
        small(folder).load()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"image_size": 0}, "'image_size' must be a positive integer"),
        ({"resize": 100}, "'resize' = 100 must be at least 'image_size' = 224"),
        ({"std": [0.2, 0.0, 0.2]}, "'std' must be a non-empty list of positive numbers"),
        ({"mean": []}, "'mean' must be a non-empty list of finite numbers"),
        ({"per_class": 0}, "'per_class' must be a positive integer or unset"),
        ({"class_split": "c"}, "'class_split' must be one of 'a', 'b' or unset, got 'c'"),
        ({"major_fraction": 0.2}, r"'major_fraction' must be a number in \[0.5, 1\], got 0.2"),
    ],
)
def test_bad_folder_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        ImageFolderDataset(root="x", **options)
    with pytest.raises(ConfigError, match=message):
        structure_options(ImageFolderDataset, {"root": "x", **options})


def test_mean_and_std_need_one_or_three_values(folder):
    with pytest.raises(ConfigError, match="'mean' needs 1 or 3 values for RGB images"):
        small(folder, mean=[0.5, 0.5]).load()


def test_root_is_required():
    with pytest.raises(ConfigError, match="root"):
        structure_options(ImageFolderDataset, {"image_size": 32})


@pytest.mark.parametrize("options", [{}, {"class_split": "b", "per_class": 1}])
def test_folder_conformance(folder, options):
    check_component(ImageFolderDataset(root=str(folder), image_size=8, resize=8, **options))


def test_subset_keeps_ids_and_stays_lazy(folder):
    data = small(folder).load()
    part = data.subset([3, 7], name="two")
    assert part.name == "two" and part.sample_ids.tolist() == [3, 7]
    assert part.labels.tolist() == [0, 1]
    assert torch.equal(part[1][0], data[7][0])


# ---------------------------------------------------------------- foolbox samples


@needs_foolbox
def test_foolbox_imagenet_photos():
    data = FoolboxSamples().load()
    assert isinstance(data, TensorImageDataset)
    assert data.input_shape == (3, 224, 224) and len(data) == 20
    assert len(data.classes) == 1000 and data.classes[243] == "243"
    assert data.labels[:4].tolist() == [243, 559, 438, 990]
    assert data.sample_ids.tolist() == list(range(20))
    assert data.name == "foolbox/imagenet"
    # Normalised with the ImageNet statistics: roughly centred.
    assert -1 < data.images.mean().item() < 1 and data.images.min() < -1


@needs_foolbox
@pytest.mark.parametrize(
    ("source", "shape", "n_classes", "first_labels"),
    [
        ("cifar10", (3, 32, 32), 10, [3, 8, 8, 0]),
        ("cifar100", (3, 32, 32), 100, [49, 33, 72, 51]),
        ("mnist", (1, 28, 28), 10, [7, 2, 1, 0]),
        ("fashionMNIST", (1, 28, 28), 10, [9, 2, 1, 1]),
    ],
)
def test_foolbox_small_sets(source, shape, n_classes, first_labels):
    data = FoolboxSamples(source=source).load()
    assert data.input_shape == shape and len(data) == 20
    assert len(data.classes) == n_classes
    assert data.labels[:4].tolist() == first_labels
    assert data.images.min() >= 0 and data.images.max() <= 1 and data.images.max() > 0.9


@needs_foolbox
def test_foolbox_options_resize_and_normalise_any_set():
    data = FoolboxSamples(source="mnist", image_size=14, mean=[0.5], std=[0.5]).load()
    assert data.input_shape == (1, 14, 14)
    assert data.images.min() >= -1 and data.images.min() < -0.9
    small_imagenet = FoolboxSamples(image_size=32, mean=[0.5, 0.5, 0.5], std=[0.25]).load()
    assert small_imagenet.input_shape == (3, 32, 32)


@needs_foolbox
def test_foolbox_statistics_must_fit_the_channels():
    with pytest.raises(ConfigError, match="'mean' needs 1 or 1 values for the 1-channel 'mnist' images"):
        FoolboxSamples(source="mnist", mean=[0.1, 0.2, 0.3]).load()


def test_foolbox_source_must_be_known():
    with pytest.raises(ConfigError, match="'source' must be one of 'imagenet', 'cifar10', 'cifar100', 'mnist'"):
        structure_options(FoolboxSamples, {"source": "svhn"})


@needs_foolbox
@pytest.mark.parametrize("component", [FoolboxSamples, FoolboxSamples(source="cifar10"), FoolboxSamples(source="mnist")])
def test_foolbox_conformance(component):
    check_component(component)


# ------------------------------------------------------------- scikit-image photos


@pytest.fixture
def fresh_skimage_cache():
    """Forget loaded photos, so a test sees what loading does now (and leaves no odd entry behind)."""
    images._skimage_tensors.cache_clear()
    yield
    images._skimage_tensors.cache_clear()


def _reference_crop(array: np.ndarray, size: int) -> torch.Tensor:
    """The ImageNet evaluation crop of one photo, spelled out with PIL: [0, 1] RGB, (3, size, size)."""
    image = Image.fromarray(array).convert("RGB")
    short = round(size * 256 / 224)
    w, h = image.size
    scale = short / min(w, h)
    image = image.resize((max(short, int(w * scale)), max(short, int(h * scale))), Image.BILINEAR)
    left, top = round((image.width - size) / 2), round((image.height - size) / 2)
    crop = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    return torch.from_numpy(crop).permute(2, 0, 1)


@needs_skimage
def test_skimage_photos_are_all_the_listed_photos_one_class_each():
    data = SkimagePhotos(image_size=32).load()
    assert isinstance(data, TensorImageDataset) and data.name == "skimage-photos"
    assert len(data) == len(SKIMAGE_PHOTOS) == 15
    assert data.classes == SKIMAGE_PHOTOS
    assert data.classes[:4] == ("astronaut", "brick", "camera", "chelsea") and data.classes[-1] == "rocket"
    assert data.sample_ids.tolist() == data.labels.tolist() == list(range(15))
    assert data.input_shape == (3, 32, 32)
    assert SkimagePhotos().load().input_shape == (3, 224, 224)


@needs_skimage
def test_skimage_photos_get_the_imagenet_crop_and_normalisation():
    import skimage.data

    plain = SkimagePhotos(image_size=48, mean=[0.0], std=[1.0], photos=["coffee"]).load()
    expected = _reference_crop(skimage.data.coffee(), 48)
    # torchvision resizes with antialiasing, PIL's resize as well: they agree to a few grey levels.
    assert (plain.images[0] - expected).abs().mean() < 0.01
    default = SkimagePhotos(image_size=48, photos=["coffee"]).load()
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(default.images[0], (plain.images[0] - mean) / std, atol=1e-5)


@needs_skimage
def test_grey_photos_become_three_equal_channels():
    data = SkimagePhotos(image_size=16, mean=[0.0], std=[1.0], photos=["camera", "astronaut"]).load()
    astronaut, camera = data.images  # loaded in list order, whatever the order asked for
    assert torch.equal(camera[0], camera[1]) and torch.equal(camera[0], camera[2])
    assert not torch.equal(astronaut[0], astronaut[2])


@needs_skimage
def test_chosen_photos_keep_their_ids_labels_and_pixels():
    full = SkimagePhotos(image_size=16).load()
    # Given out of order: loaded in list order, with the ids of the full list.
    some = SkimagePhotos(image_size=16, photos=["rocket", "camera", "moon"]).load()
    assert some.sample_ids.tolist() == some.labels.tolist() == [2, 11, 14]
    assert [some.classes[i] for i in some.labels] == ["camera", "moon", "rocket"]
    assert len(some.classes) == 15
    for row, photo_id in enumerate(some.sample_ids):
        assert torch.equal(some.images[row], full.images[photo_id])


@needs_skimage
def test_skimage_photos_load_without_a_network(monkeypatch, fresh_skimage_cache):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("skimage-photos tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert len(SkimagePhotos(image_size=8).load()) == 15


def test_missing_scikit_image_says_how_to_install_it(monkeypatch, fresh_skimage_cache):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ConfigError, match=r"dataset 'skimage-photos' needs the scikit-image package .*pip install 'mergescope\[datasets\]'"):
        SkimagePhotos(image_size=8).load()


@needs_skimage
def test_a_photo_that_cannot_be_read_is_named(monkeypatch, fresh_skimage_cache):
    import skimage.data

    def wants_download():
        raise ModuleNotFoundError("The requested file is not bundled; install pooch")

    monkeypatch.setattr(skimage.data, "stereo_motorcycle", wants_download)
    with pytest.raises(ConfigError, match=r"cannot read the photo 'motorcycle' \(skimage.data.stereo_motorcycle\) .*pooch"):
        SkimagePhotos(image_size=8).load()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"image_size": 0}, "'image_size' must be a positive integer"),
        ({"photos": ["astronaut", "eagle"]}, "'photos' names photos scikit-image does not ship here: 'eagle'"),
        ({"photos": ["camera", "camera"]}, "'photos' must not repeat a photo"),
        ({"photos": []}, "'photos' must be a non-empty list of photo names or unset"),
        ({"std": [0.0]}, "'std' must be a non-empty list of positive numbers"),
    ],
)
def test_bad_skimage_options_are_rejected(options, message):
    with pytest.raises(ConfigError, match=message):
        structure_options(SkimagePhotos, options)


@needs_skimage
def test_skimage_statistics_need_one_or_three_values():
    with pytest.raises(ConfigError, match=r"'mean' needs 1 or 3 values for RGB images, got \[0.5, 0.5\]"):
        SkimagePhotos(image_size=8, mean=[0.5, 0.5]).load()


@needs_skimage
@pytest.mark.parametrize("component", [SkimagePhotos(image_size=16), SkimagePhotos(image_size=8, photos=["rocket"])])
def test_skimage_conformance(component):
    check_component(component)


# ------------------------------------------------------------------------- plugin


@pytest.mark.parametrize("cls", [ImageFolderDataset, FoolboxSamples, SkimagePhotos])
def test_components_follow_the_protocol(cls):
    assert isinstance(cls(root="x") if cls is ImageFolderDataset else cls(), DatasetSource)
    lines = cls.__doc__.strip().splitlines()
    assert lines[0].endswith(".") and lines[1].strip() == ""
    assert cls.paper


def test_plugin_registers_the_three_datasets():
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(images)
    registered: list[type] = []
    manager.hook.register_datasets(register=registered.append)
    assert {cls.name: cls for cls in registered} == {
        "imagefolder": ImageFolderDataset,
        "foolbox-samples": FoolboxSamples,
        "skimage-photos": SkimagePhotos,
    }
