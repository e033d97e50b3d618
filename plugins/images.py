"""Bundled datasets of real photographs: a user's image folder, foolbox's and scikit-image's samples.

``imagefolder`` reads a directory in the ImageNet layout (``root/<class>/<image>``)
lazily, one file per item, with the usual resize / centre-crop / normalise
preprocessing; it checks at load that every chosen file decodes (``verify``) and lets
the pipeline choose the classes and their order (``classes``). ``foolbox-samples`` loads the 20 real images per dataset that the
``foolbox`` package ships (ImageNet validation, CIFAR-10/100, MNIST, Fashion-MNIST),
enough to check a pretrained model offline. ``skimage-photos`` loads the photographs
that ship inside the scikit-image wheel (astronaut, camera, coffee, ...).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import attrs
import numpy as np
import torch

from mergescope.components import TensorImageDataset
from mergescope.datasets import PARTS, class_imbalanced_split, per_class_subset
from mergescope.errors import ConfigError, DataError, closest
from mergescope.extras import locate, require
from mergescope.hookspecs import hookimpl
from mergescope.keys import OMIT_DEFAULT_FROM_KEY
from mergescope.options import PATH
from mergescope.progress import progress_bar
from mergescope.validators import (
    Check,
    boolean,
    distinct,
    finite,
    in_range,
    list_of,
    non_empty_str,
    one_of,
    optional,
    positive,
    positive_int,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFileDataset",
    "ImageFolderDataset",
    "FoolboxSamples",
    "FOOLBOX_SOURCES",
    "SkimagePhotos",
    "SKIMAGE_PHOTOS",
    "register_datasets",
    "verify_images",
]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

log = logging.getLogger("mergescope")

# Options added after the first release: left out of cache keys at their defaults.
_NEW_OPTION = {OMIT_DEFAULT_FROM_KEY: True}
# How many unreadable files a verification error names; more than this many files to
# verify draw a progress bar.
_SHOWN_FAILURES = 5
_VERIFY_BAR_FROM = 200


# ------------------------------------------------------------------------ validators


# Per-channel normalisation (one value, or one per channel): any mean, a positive std.
_MEAN = list_of(finite, min_length=1)
_STD = list_of(positive, min_length=1)


def _check_resize(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    positive_int(instance, attribute, value)
    if isinstance(instance.image_size, int) and value < instance.image_size:
        raise ValueError(
            f"'{attribute.name}' = {value} must be at least 'image_size' = {instance.image_size} "
            "(images are resized, then centre-cropped to image_size)"
        )


# The share of each majority class a part of a class-imbalanced split receives.
_major_fraction = in_range(0.5, 1)


def _transform(image_size: int, resize: int, mean: Sequence[float], std: Sequence[float]) -> Any:
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(list(mean), list(std)),
        ]
    )


def _read_rgb(path: str) -> Any:
    """Decode ``path`` fully into an 8-bit RGB PIL image (the conversion rules are in the user guide).

    As torchvision's ``ImageFolder`` loader (``Image.convert("RGB")``), but for 16-bit
    grey images, which ``convert`` would clip to white: they keep their top 8 bits, as
    Pillow does for 16-bit RGB images.
    """
    from PIL import Image

    with Image.open(path) as image:
        if image.mode.startswith("I;16"):
            grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
            return Image.fromarray(grey, "L").convert("RGB")
        return image.convert("RGB")


def _decode_error(path: str) -> str | None:
    """``None`` when ``path`` decodes as :func:`_read_rgb` reads it, else what went wrong."""
    try:
        _read_rgb(path)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return f"{type(exc).__name__}: {exc}"
    return None


def _unreadable(dataset: str, path: str, problem: str) -> DataError:
    return DataError(f"dataset {dataset!r}: cannot read image file {path!r}: {problem}; fix or remove the file")


def verify_images(dataset: str, paths: Sequence[str], *, quiet: bool = False) -> None:
    """Decode every file of ``paths`` fully; raise one :class:`DataError` naming the first failures.

    A full decode (not ``PIL.Image.verify``, which does not see a truncated JPEG) in a
    few threads, with a progress bar from 200 files on.

    Raises
    ------
    DataError
        Naming ``dataset``, up to five unreadable files with their error, and how many
        more there are.
    """
    bar = progress_bar(quiet or len(paths) <= _VERIFY_BAR_FROM)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        errors = list(bar(pool.map(_decode_error, paths), f"verifying {dataset}", total=len(paths)))
    failed = [(path, error) for path, error in zip(paths, errors) if error is not None]
    if len(failed) == 1:
        raise _unreadable(dataset, *failed[0])
    if failed:
        shown = "; ".join(f"{path!r} ({error})" for path, error in failed[:_SHOWN_FAILURES])
        more = f"; and {len(failed) - _SHOWN_FAILURES} more" if len(failed) > _SHOWN_FAILURES else ""
        raise DataError(
            f"dataset {dataset!r}: {len(failed)} of {len(paths)} image files cannot be read: {shown}{more}; "
            "fix or remove them"
        )


# ----------------------------------------------------------------- lazy dataset


@attrs.define(eq=False)
class ImageFileDataset(torch.utils.data.Dataset):
    """An :class:`~mergescope.components.ImageDataset` that reads one image file per item.

    Files are opened on ``dataset[i]`` (not when the dataset is built), converted to RGB
    and passed through ``transform``, so a large folder costs no memory until used. A
    file that cannot be decoded raises a :class:`~mergescope.errors.DataError` naming
    the dataset and the file.

    Parameters
    ----------
    name
        A short name used in labels.
    paths
        Image file of every item.
    labels
        Integer class of every item, ``(N,)``.
    sample_ids
        Stable id of every item, ``(N,)``.
    classes
        Class names, indexed by label.
    transform
        Maps a PIL image to a float tensor of shape ``image_shape``.
    image_shape
        Shape ``(C, H, W)`` of every transformed image.
    """

    name: str
    paths: tuple[str, ...] = attrs.field(converter=tuple)
    labels: np.ndarray = attrs.field(converter=lambda a: np.asarray(a, dtype=np.int64))
    sample_ids: np.ndarray = attrs.field(converter=lambda a: np.asarray(a, dtype=np.int64))
    classes: tuple[str, ...] = attrs.field(converter=tuple)
    transform: Callable[[Any], torch.Tensor]
    image_shape: tuple[int, ...] = attrs.field(converter=tuple)

    def __attrs_post_init__(self) -> None:
        n = len(self.paths)
        if len(self.labels) != n or len(self.sample_ids) != n:
            raise ValueError(
                f"dataset {self.name!r}: {n} files but {len(self.labels)} labels and {len(self.sample_ids)} sample ids"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        try:
            image = _read_rgb(path)
        except Exception as exc:  # whatever Pillow raises, reported as a data error naming the file
            raise _unreadable(self.name, path, f"{type(exc).__name__}: {exc}") from exc
        return self.transform(image), int(self.labels[index])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.image_shape

    def subset(self, indices: Sequence[int], name: str | None = None) -> ImageFileDataset:
        """Return the items at ``indices`` (positions, not sample ids), keeping their ids."""
        idx = np.asarray(indices, dtype=np.int64)
        return attrs.evolve(
            self,
            name=name or self.name,
            paths=[self.paths[i] for i in idx],
            labels=self.labels[idx],
            sample_ids=self.sample_ids[idx],
        )


# ------------------------------------------------------------------- image folder


def _scan_folder(
    root: Path, chosen: Sequence[str] | None = None
) -> tuple[list[str], list[tuple[str, int]], np.ndarray]:
    """Class names, ``(path, label)`` and sample id of every image of the chosen classes.

    Without ``chosen``: every class folder, sorted, in torchvision ``ImageFolder`` order.
    With it: only those folders, label ``i`` for ``chosen[i]``, the others ignored. The
    files keep the order of the full listing and their position in it is their sample id,
    so an image has the same id whichever classes are chosen.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    if not root.exists():
        raise ConfigError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ConfigError(f"image folder {str(root)!r} is not a directory")
    folders = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    if not folders:
        raise ConfigError(f"image folder {str(root)!r} has no class folders; expected the layout root/<class>/<image>")
    classes = folders if chosen is None else list(chosen)
    missing = [c for c in classes if c not in folders]
    if missing:
        suggestion = closest(missing[0], [f for f in folders if f not in classes])
        others = f" (nor do {', '.join(map(repr, missing[1:]))})" if len(missing) > 1 else ""
        raise ConfigError(
            f"class {missing[0]!r} of 'classes' has no folder in image folder {str(root)!r}{others}."
            + (f" Did you mean {suggestion!r}?" if suggestion else "")
            + f" Class folders found: {', '.join(folders)}"
        )
    listing = make_dataset(root, {c: i for i, c in enumerate(folders)}, extensions=IMG_EXTENSIONS, allow_empty=True)
    label_of = {folders.index(c): i for i, c in enumerate(classes)}
    ids = np.array([i for i, (_, folder) in enumerate(listing) if folder in label_of], dtype=np.int64)
    samples = [(listing[i][0], label_of[listing[i][1]]) for i in ids]
    ignored = [f for f in folders if f not in classes]
    if chosen is None:
        log.info(
            "image folder %s: %d classes, the class folders in alphabetical order (label 0 = %r): %s; "
            "set 'classes' in [data] to choose them and their order",
            root,
            len(classes),
            classes[0],
            ", ".join(classes),
        )
    elif ignored:
        log.info(
            "image folder %s: %d classes from 'classes'; ignoring %d class folder(s) not listed there: %s",
            root,
            len(classes),
            len(ignored),
            ", ".join(ignored),
        )
    counts = np.bincount([label for _, label in samples], minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise ConfigError(
            f"class folder {str(root / empty[0])!r} has no images"
            + (f" (nor do {len(empty) - 1} other class folders)" if len(empty) > 1 else "")
            + f"; accepted extensions: {', '.join(IMG_EXTENSIONS)}"
        )
    return classes, samples, ids


@attrs.define
class ImageFolderDataset:
    """Your own images in the ImageNet folder layout root/<class>/<image>, read lazily.

    Class names are the sorted folder names, or ``classes`` when given (only those
    folders, in that order); labels index them. Every image is read when it is used,
    converted to RGB, resized (shorter side to ``resize``), centre-cropped to
    ``image_size`` and normalised with ``mean`` / ``std`` (ImageNet statistics by
    default). Sample ids are positions in the full sorted listing of every class folder
    (the order of ``torchvision.datasets.ImageFolder``), so they do not change when
    ``classes``, ``per_class`` or ``class_split`` select a subset.

    With ``verify`` (the default), :meth:`load` decodes every chosen file once, fully
    (``PIL.Image.verify`` would miss a truncated JPEG), and raises one
    :class:`~mergescope.errors.DataError` naming the dataset and the first five files
    that fail with the count of the rest, before any model is built or step runs.
    Measured cost: about 0.2 ms per small file and 1.5 ms per ImageNet-sized JPEG
    (500x375), 5 ms per such PNG. A file that fails to decode later (``verify = false``,
    or changed since) raises a ``DataError`` naming the file and the dataset.

    Parameters
    ----------
    root
        The folder holding one sub-folder of images per class. In a pipeline file a
        relative path is taken relative to the file's folder.
    image_size
        Side of the square images the models see.
    resize
        Length the shorter side is resized to before the centre crop.
    mean, std
        Per-channel normalisation of the [0, 1] RGB values.
    per_class
        Keep only the first ``per_class`` images (in listing order) of every class.
    class_split
        ``"a"`` or ``"b"``: one of two complementary parts with opposite class imbalance
        (see :func:`mergescope.datasets.class_imbalanced_split`), for training a pair of
        models on differently distributed data. Applied before ``per_class``.
    major_fraction
        With ``class_split``: the share of each of its majority classes a part receives.
    classes
        The class folders to use, in label order (label ``i`` is ``classes[i]``); other
        folders are ignored (and logged). Unset: every class folder, alphabetically.
        Give the classes a checkpoint was trained on, in its order.
    verify
        Decode every chosen file at :meth:`load` and report the unreadable ones at once.
    """

    name: ClassVar[str] = "imagefolder"
    paper: ClassVar[str] = "Deng et al. 2009, ImageNet: A large-scale hierarchical image database (folder layout)"

    root: str = attrs.field(validator=non_empty_str, metadata=PATH)
    image_size: int = attrs.field(default=224, validator=positive_int)
    resize: int = attrs.field(default=256, validator=_check_resize)
    mean: list[float] = attrs.field(factory=lambda: list(IMAGENET_MEAN), validator=_MEAN)
    std: list[float] = attrs.field(factory=lambda: list(IMAGENET_STD), validator=_STD)
    per_class: int | None = attrs.field(default=None, validator=optional(positive_int))
    class_split: str | None = attrs.field(default=None, validator=optional(one_of(*PARTS)))
    major_fraction: float = attrs.field(default=0.8, validator=_major_fraction)
    classes: list[str] | None = attrs.field(
        default=None,
        validator=optional(
            [
                list_of(Check(non_empty_str.holds, "a class folder name", "class folder names"), min_length=1),
                distinct("class"),
            ]
        ),
        metadata=_NEW_OPTION,
    )
    verify: bool = attrs.field(default=True, validator=boolean, metadata=_NEW_OPTION)

    def load(self) -> ImageFileDataset:
        """List the folder, check the chosen files decode, and return them as a lazy :class:`ImageFileDataset`.

        Raises
        ------
        ConfigError
            When ``root`` is missing or has no class folders, a class of ``classes`` has
            no folder, a class folder has no images, ``mean`` / ``std`` do not have 1 or 3
            values, or ``per_class`` asks for more images than a class has.
        DataError
            With ``verify``: when chosen files cannot be decoded, naming them.
        """
        root = Path(self.root).expanduser()
        for key in ("mean", "std"):
            if len(getattr(self, key)) not in (1, 3):
                raise ConfigError(f"'{key}' needs 1 or 3 values for RGB images, got {getattr(self, key)!r}")
        classes, samples, ids = _scan_folder(root, self.classes)
        labels = np.array([label for _, label in samples], dtype=np.int64)
        chosen = np.arange(len(samples))
        if self.class_split is not None:
            chosen = class_imbalanced_split(labels, self.class_split, self.major_fraction)
        if self.per_class is not None:
            try:
                chosen = chosen[per_class_subset(labels[chosen], self.per_class, names=classes)]
            except ConfigError as exc:
                part = f", part {self.class_split!r}" if self.class_split else ""
                raise ConfigError(f"{exc.message} in image folder {str(root)!r}{part}") from None
        name = f"{self.name}/{root.name}" + (f"/{self.class_split}" if self.class_split else "")
        paths = [samples[i][0] for i in chosen]
        if self.verify:
            verify_images(name, paths)
        return ImageFileDataset(
            name,
            paths,
            labels[chosen],
            ids[chosen],
            classes,
            _transform(self.image_size, self.resize, self.mean, self.std),
            (3, self.image_size, self.image_size),
        )


# ---------------------------------------------------------------- foolbox samples

# The datasets foolbox ships 20 images of, with their number of classes.
FOOLBOX_SOURCES: dict[str, int] = {"imagenet": 1000, "cifar10": 10, "cifar100": 100, "mnist": 10, "fashionMNIST": 10}


def _foolbox_data_dir() -> Path:
    # Locate the package without importing it: only its image files are needed.
    return locate("foolbox", "datasets", "dataset 'foolbox-samples'") / "data"


def _foolbox_files(source: str) -> list[tuple[int, int, Path]]:
    """``(index, label, path)`` of the sample images of ``source``, by index."""
    folder = _foolbox_data_dir()
    pattern = re.compile(rf"{re.escape(source)}_(\d+)_(\d+)\.(?:png|jpg|jpeg)")
    found = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = pattern.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), int(match.group(2)), path))
    if not found:
        raise ConfigError(f"no {source!r} sample images in {str(folder)!r}; is foolbox 3.3.4 installed?")
    return sorted(found)


@attrs.define
class FoolboxSamples:
    """The 20 real sample images per dataset that foolbox ships (ImageNet val, CIFAR, MNIST).

    Reads the image files bundled with the ``foolbox`` package (without importing it):
    20 ImageNet validation photos (512x512 JPEG), and 20 test images each of CIFAR-10,
    CIFAR-100, MNIST and Fashion-MNIST. Labels come from the file names and are the
    source's own class indices: for ImageNet the 1000-class index, so a pretrained
    ImageNet classifier is evaluated directly. ``classes`` are all the source's class
    indices as strings (``"0"`` ... ``"999"`` for ImageNet), not only those present.
    Sample ids are the image numbers 0..19 of the file names.

    ImageNet photos are resized (shorter side to ``image_size * 256 / 224``), centre-cropped
    to ``image_size`` and normalised with ``mean`` / ``std`` (ImageNet statistics by
    default). The small sets keep their native size (CIFAR 3x32x32, MNIST 1x28x28) and
    [0, 1] pixel values unless ``image_size`` / ``mean`` / ``std`` are set.

    Parameters
    ----------
    source
        ``"imagenet"``, ``"cifar10"``, ``"cifar100"``, ``"mnist"`` or ``"fashionMNIST"``.
    image_size
        Side of the square images; unset: 224 for ImageNet, native for the others.
    mean, std
        Per-channel normalisation of the [0, 1] values (1 value or one per channel);
        unset: ImageNet statistics for ImageNet, none for the others.
    """

    name: ClassVar[str] = "foolbox-samples"
    paper: ClassVar[str] = "Rauber et al. 2017, Foolbox: A Python toolbox to benchmark the robustness of ML models"

    source: str = attrs.field(default="imagenet", validator=one_of(*FOOLBOX_SOURCES))
    image_size: int | None = attrs.field(default=None, validator=optional(positive_int))
    mean: list[float] | None = attrs.field(default=None, validator=optional(_MEAN))
    std: list[float] | None = attrs.field(default=None, validator=optional(_STD))

    def load(self) -> TensorImageDataset:
        """Read and preprocess the 20 images of :attr:`source` into a tensor dataset.

        Raises
        ------
        ConfigError
            When ``mean`` / ``std`` do not fit the channels, or foolbox is not installed
            (a :class:`~mergescope.errors.MissingDependencyError`: the ``datasets`` extra).
        """
        images, labels, ids = _foolbox_tensors(
            self.source,
            self.image_size,
            None if self.mean is None else tuple(self.mean),
            None if self.std is None else tuple(self.std),
        )
        classes = [str(c) for c in range(FOOLBOX_SOURCES[self.source])]
        # A copy, so that changing one loaded dataset leaves the cache and other loads alone.
        return TensorImageDataset(f"foolbox/{self.source}", images.clone(), labels, ids, classes)


@functools.lru_cache(maxsize=4)
def _foolbox_tensors(
    source: str, image_size: int | None, mean: tuple[float, ...] | None, std: tuple[float, ...] | None
) -> tuple[torch.Tensor, list[int], list[int]]:
    from PIL import Image
    from torchvision import transforms

    files = _foolbox_files(source)
    imagenet = source == "imagenet"
    channels = 1 if "mnist" in source.lower() else 3
    mean = mean if mean is not None else (tuple(IMAGENET_MEAN) if imagenet else None)
    std = std if std is not None else (tuple(IMAGENET_STD) if imagenet else None)
    for key, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) not in (1, channels):
            raise ConfigError(
                f"'{key}' needs 1 or {channels} values for the {channels}-channel {source!r} images, got {list(values)!r}"
            )
    steps: list[Any] = []
    size = image_size if image_size is not None else (224 if imagenet else None)
    if size is not None:
        # The usual ImageNet evaluation crop: 224 out of 256.
        steps += [transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)]
    steps.append(transforms.ToTensor())
    if mean is not None or std is not None:
        steps.append(transforms.Normalize(list(mean or [0.0]), list(std or [1.0])))
    transform = transforms.Compose(steps)
    images = []
    for _, _, path in files:
        with Image.open(path) as image:
            images.append(transform(image.convert("L" if channels == 1 else "RGB")))
    return torch.stack(images), [label for _, label, _ in files], [index for index, _, _ in files]


# ---------------------------------------------------------------- scikit-image photos

#: The photographs of ``skimage.data`` whose files are inside the scikit-image wheel
#: (no pooch, no network). A photo's sample id and label are its position here, so new
#: photos may only be appended. Left out: drawings and synthetic images (logo, horse,
#: checkerboard, binary_blobs, phantom), scans of text (page, text), the 102-pixel
#: microaneurysms crop, and everything scikit-image downloads on first use (eagle,
#: lily, skin, cells3d, ...).
SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "motorcycle",
    "retina",
    "rocket",
)

# The skimage.data function behind a photo, where it is not the photo's name.
# stereo_motorcycle returns (left, right, disparity): the left view is the photo.
_SKIMAGE_FUNCTIONS = {"motorcycle": "stereo_motorcycle"}


def _known_photos(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    unknown = [v for v in value if v not in SKIMAGE_PHOTOS]
    if unknown:
        raise ValueError(
            f"'{attribute.name}' names photos scikit-image does not ship here: {', '.join(map(repr, unknown))}; "
            f"photos: {', '.join(SKIMAGE_PHOTOS)}"
        )


_PHOTO = Check(non_empty_str.holds, "a photo name", "photo names")


def _skimage_data() -> Any:
    return require("skimage.data", "datasets", "dataset 'skimage-photos'")


@attrs.define
class SkimagePhotos:
    """The photographs that ship inside the scikit-image wheel (astronaut, camera, coffee, ...), offline.

    Fifteen real photographs from ``skimage.data`` whose files are part of the installed
    package, so nothing is downloaded: ``astronaut``, ``brick``, ``camera``, ``chelsea``
    (a cat), ``clock`` (motion-blurred), ``coffee``, ``coins``, ``grass``, ``gravel``,
    ``hubble_deep_field``, ``immunohistochemistry``, ``moon``, ``motorcycle`` (the left
    view of ``stereo_motorcycle``), ``retina`` and ``rocket`` (:data:`SKIMAGE_PHOTOS`).
    The seven grey ones (brick, camera, clock, coins, grass, gravel, moon) are repeated
    into three channels.

    Every photo is its own class: ``classes`` is the list of photo names and a photo's
    label and sample id are both its position in that list, whatever ``photos`` selects.
    Photos are resized (shorter side to ``image_size * 256 / 224``), centre-cropped to
    ``image_size`` and normalised with ``mean`` / ``std`` (ImageNet statistics by
    default), the usual ImageNet evaluation preprocessing.

    Parameters
    ----------
    image_size
        Side of the square images.
    mean, std
        Per-channel normalisation of the [0, 1] RGB values (1 value or 3).
    photos
        Keep only these photos (names from :data:`SKIMAGE_PHOTOS`); unset: all of them.
    """

    name: ClassVar[str] = "skimage-photos"
    paper: ClassVar[str] = "van der Walt et al. 2014, scikit-image: image processing in Python (skimage.data)"

    image_size: int = attrs.field(default=224, validator=positive_int)
    mean: list[float] = attrs.field(factory=lambda: list(IMAGENET_MEAN), validator=_MEAN)
    std: list[float] = attrs.field(factory=lambda: list(IMAGENET_STD), validator=_STD)
    photos: list[str] | None = attrs.field(
        default=None, validator=optional([list_of(_PHOTO, min_length=1), _known_photos, distinct("photo")])
    )

    def load(self) -> TensorImageDataset:
        """Read and preprocess the chosen photos into a tensor dataset.

        Raises
        ------
        ConfigError
            When scikit-image is not installed (a :class:`~mergescope.errors.MissingDependencyError`:
            the ``datasets`` extra), a photo cannot be read from it, or ``mean`` / ``std`` do not
            have 1 or 3 values.
        """
        for key in ("mean", "std"):
            if len(getattr(self, key)) not in (1, 3):
                raise ConfigError(f"'{key}' needs 1 or 3 values for RGB images, got {getattr(self, key)!r}")
        names = tuple(SKIMAGE_PHOTOS) if self.photos is None else tuple(sorted(self.photos, key=SKIMAGE_PHOTOS.index))
        images = _skimage_tensors(names, self.image_size, tuple(self.mean), tuple(self.std))
        ids = [SKIMAGE_PHOTOS.index(n) for n in names]
        # A copy, so that changing one loaded dataset leaves the cache and other loads alone.
        return TensorImageDataset(self.name, images.clone(), ids, ids, SKIMAGE_PHOTOS)


@functools.lru_cache(maxsize=4)
def _skimage_tensors(
    names: tuple[str, ...], image_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    from PIL import Image

    data = _skimage_data()
    transform = _transform(image_size, round(image_size * 256 / 224), mean, std)
    images = []
    for name in names:
        function = _SKIMAGE_FUNCTIONS.get(name, name)
        try:
            array = getattr(data, function)()
        except (ImportError, OSError, AttributeError, ValueError) as exc:
            # e.g. a scikit-image release that no longer ships the file and wants pooch
            import skimage

            raise ConfigError(
                f"dataset 'skimage-photos' cannot read the photo {name!r} (skimage.data.{function}) from "
                f"scikit-image {skimage.__version__}: {exc}"
            ) from exc
        if isinstance(array, tuple):
            array = array[0]
        images.append(transform(Image.fromarray(np.asarray(array)).convert("RGB")))
    return torch.stack(images)


@hookimpl
def register_datasets(register):
    """Register the image datasets."""
    register(ImageFolderDataset)
    register(FoolboxSamples)
    register(SkimagePhotos)
