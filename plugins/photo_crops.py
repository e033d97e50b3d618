"""Bundled dataset ``photo-crops``: any number of natural images, cut at random from the photos that ship offline.

Offline, only about forty real photographs are at hand: foolbox's 20 ImageNet
validation images, scikit-image's 15 bundled photos and scikit-learn's 2 sample images
(``load_sample_images``). ``photo-crops`` turns them into as many distinct images as
asked by random resized crops (the Inception / torchvision ``RandomResizedCrop``
recipe) and horizontal flips, each item drawn from its own random generator so that
the same item has the same pixels in every process and in any access order, as the
procedural datasets (``dice``, ``critters``) do.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import attrs
import numpy as np
from PIL import Image

from mergescope.errors import ConfigError, closest
from mergescope.extras import locate, require
from mergescope.hookspecs import hookimpl
from mergescope.validators import (
    Check,
    distinct,
    in_range,
    list_of,
    non_empty_str,
)
from mergescope_plugins.images import _SKIMAGE_FUNCTIONS, SKIMAGE_PHOTOS
from mergescope_plugins.procedural import Renderer, _ProceduralDataset

__all__ = ["PHOTO_SOURCES", "PhotoCrops", "crop_box", "photos", "register_datasets", "render_crop"]

#: The photo sources, in the order their photos are numbered (a photo's label is its
#: position in the concatenated list, whatever order ``sources`` gives them in).
PHOTO_SOURCES: tuple[str, ...] = ("foolbox-imagenet", "skimage", "sklearn")

# Keeps this dataset's random streams apart from dice (1) and critters (2) for one seed.
_STREAM = 3
# The aspect ratios (width / height) of a crop: log-uniform in [3/4, 4/3].
_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Tries at a crop that fits the photo before falling back to a centre crop (torchvision's 10).
_TRIES = 10

_WHAT = "dataset 'photo-crops'"


# ------------------------------------------------------------------------ the photos


def _foolbox_imagenet() -> list[tuple[str, Image.Image]]:
    # Located without importing foolbox: only its image files are read.
    folder = locate("foolbox", "datasets", _WHAT) / "data"
    pattern = re.compile(r"imagenet_(\d+)_(\d+)\.(?:png|jpg|jpeg)")
    found = sorted(
        (int(m.group(1)), m.group(1), m.group(2), path)
        for path in (folder.iterdir() if folder.is_dir() else ())
        if (m := pattern.fullmatch(path.name))
    )
    if not found:
        raise ConfigError(f"{_WHAT}: no ImageNet sample images in {str(folder)!r}; is foolbox 3.3.4 installed?")
    photos = []
    for _, number, label, path in found:
        with Image.open(path) as image:
            photos.append((f"imagenet/{number}_{label}", image.convert("RGB")))
    return photos


def _skimage() -> list[tuple[str, Image.Image]]:
    data = require("skimage.data", "datasets", _WHAT)
    photos = []
    for name in SKIMAGE_PHOTOS:
        function = _SKIMAGE_FUNCTIONS.get(name, name)
        try:
            array = getattr(data, function)()
        except (ImportError, OSError, AttributeError, ValueError) as exc:
            import skimage

            raise ConfigError(
                f"{_WHAT} cannot read the photo {name!r} (skimage.data.{function}) from "
                f"scikit-image {skimage.__version__}: {exc}"
            ) from exc
        if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
            array = array[0]
        photos.append((f"skimage/{name}", Image.fromarray(np.asarray(array)).convert("RGB")))
    return photos


def _sklearn() -> list[tuple[str, Image.Image]]:
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    names = [re.sub(r"\.\w+$", "", str(f).replace("\\", "/").rsplit("/", 1)[-1]) for f in bunch.filenames]
    return [(f"sklearn/{n}", Image.fromarray(np.asarray(a)).convert("RGB")) for n, a in zip(names, bunch.images)]


_READERS = {"foolbox-imagenet": _foolbox_imagenet, "skimage": _skimage, "sklearn": _sklearn}


@functools.lru_cache(maxsize=len(PHOTO_SOURCES))
def _source_photos(source: str) -> tuple[tuple[str, Image.Image], ...]:
    """``(name, RGB image)`` of every photo of ``source`` at full resolution, read once per process."""
    photos = tuple(_READERS[source]())
    for _, image in photos:
        image.load()
    return photos


def photos(sources: Sequence[str]) -> tuple[tuple[str, Image.Image], ...]:
    """The photos of ``sources`` in :data:`PHOTO_SOURCES` order: ``(name, full-size RGB PIL image)``.

    Cached per source and process; treat the images as read-only.
    """
    chosen = [s for s in PHOTO_SOURCES if s in sources]
    return tuple(p for s in chosen for p in _source_photos(s))


# ------------------------------------------------------------------------ the crop


def crop_box(
    rng: np.random.Generator, width: int, height: int, min_scale: float, max_scale: float
) -> tuple[int, int, int, int]:
    """A random crop ``(left, top, right, bottom)`` of a ``width`` x ``height`` photo (RandomResizedCrop).

    As ``torchvision.transforms.RandomResizedCrop.get_params``: up to ten times, draw an
    area fraction uniform in ``[min_scale, max_scale]`` and an aspect ratio log-uniform
    in [3/4, 4/3]; the first box that fits is placed uniformly at random. When none fits,
    the largest centred box whose aspect ratio is clamped into [3/4, 4/3].
    """
    area = width * height
    log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    for _ in range(_TRIES):
        target = area * rng.uniform(min_scale, max_scale)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < _RATIO[0]:
        w, h = width, int(round(width / _RATIO[0]))
    elif ratio > _RATIO[1]:
        w, h = int(round(height * _RATIO[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def render_crop(
    rng: np.random.Generator, label: int, size: int, *, sources: tuple[str, ...], min_scale: float, max_scale: float
) -> Image.Image:
    """Photo ``label`` of ``sources`` cut by a random box, resized to ``size`` and flipped with probability 1/2."""
    _, photo = photos(sources)[label]
    box = crop_box(rng, photo.width, photo.height, min_scale, max_scale)
    flip = bool(rng.random() < 0.5)
    crop = photo.resize((size, size), Image.LANCZOS, box=box)
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if flip else crop


# ------------------------------------------------------------------------ options


def _as_float(value: Any) -> Any:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _known_sources(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    for source in value:
        if source not in PHOTO_SOURCES:
            # "imagenet" or "foolbox" means foolbox-imagenet, whatever difflib finds closer.
            within = [s for s in PHOTO_SOURCES if isinstance(source, str) and source and source.lower() in s]
            suggestion = within[0] if len(within) == 1 else closest(str(source), PHOTO_SOURCES)
            raise ValueError(
                f"'{attribute.name}' names an unknown photo source {source!r}"
                + (f"; did you mean {suggestion!r}?" if suggestion else "")
                + f" Sources: {', '.join(map(repr, PHOTO_SOURCES))}"
            )


def _not_below_min_scale(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    lo = instance.min_scale
    if isinstance(lo, (int, float)) and isinstance(value, (int, float)) and value < lo:
        raise ValueError(f"'{attribute.name}' = {value} must be at least 'min_scale' = {lo}")


_SCALE = in_range(0, 1, lo_open=True)
_SOURCE = Check(non_empty_str.holds, "a photo source name", "photo source names")


@attrs.define
class PhotoCrops(_ProceduralDataset):
    """Natural photographs, as many as asked: random resized crops of the ~37 photos that ship offline.

    **Photos.** The sources (``sources``, numbered in this order whatever order the
    option gives): ``"foolbox-imagenet"``, the 20 ImageNet validation images foolbox
    ships (classes ``imagenet/<nn>_<imagenet label>``, e.g. ``imagenet/03_281``, from
    the file names); ``"skimage"``, the 15 photographs inside the scikit-image wheel
    (``skimage/astronaut`` ... ``skimage/rocket``, the list of ``skimage-photos``);
    ``"sklearn"``, scikit-learn's two sample images (``sklearn/china``,
    ``sklearn/flower``). Each photo is read once per process at its full resolution as
    RGB (grey photos repeated into three channels); nothing is downloaded.

    **Crops.** Item ``i`` is cut from photo ``i % n_photos``: a box covering a share of
    the photo's area uniform in ``[min_scale, max_scale]``, of aspect ratio log-uniform
    in [3/4, 4/3], placed uniformly (up to ten tries, then the largest centred box of a
    clamped ratio: the random-resized-crop augmentation of Szegedy et al. 2015 as
    torchvision's ``RandomResizedCrop`` implements it), resized to ``image_size`` with
    Lanczos antialiasing and flipped left-right with probability 1/2, then normalised
    with ``mean`` / ``std``.

    **Determinism.** Box and flip of item ``i`` come from a numpy generator seeded by
    (``seed``, split, ``i``) only: the same item has the same pixels in every process,
    in any access order and whichever other items are read, and a larger ``size``
    extends a smaller one (its first items are the same). Crops are cut when indexed;
    nothing is stored.

    **Ids and labels.** The sample id of item ``i`` is ``3 * i + k`` with ``k`` = 0, 1,
    2 for train, test and validation, so ids never collide and the splits are disjoint
    by construction (different random streams). The label is the photo's index and
    ``classes`` the photo names, so every photo appears equally often (to within one).

    Parameters
    ----------
    sources
        Photo sources to use: any of ``"foolbox-imagenet"`` (needs foolbox),
        ``"skimage"`` (needs scikit-image) and ``"sklearn"``; all three by default.
    split
        ``"train"``, ``"test"`` or ``"validation"``; disjoint by construction.
    size
        Number of crops in the split.
    image_size
        Side of the square RGB images in pixels (8 to 1024).
    seed
        Selects one family of crops: item ``i`` of a split is the same for one seed.
    min_scale, max_scale
        Range of the share of the photo's area a crop covers, in (0, 1].
    mean, std
        Per-channel normalisation (one value or three); ImageNet's by default.
    """

    name: ClassVar[str] = "photo-crops"
    paper: ClassVar[str] = "Szegedy et al. 2015, Going deeper with convolutions (random-resized-crop augmentation)"

    sources: list[str] = attrs.field(
        factory=lambda: list(PHOTO_SOURCES),
        validator=[list_of(_SOURCE, min_length=1), _known_sources, distinct("source")],
    )
    min_scale: float = attrs.field(default=0.08, converter=_as_float, validator=_SCALE)
    max_scale: float = attrs.field(default=1.0, converter=_as_float, validator=[_SCALE, _not_below_min_scale])

    stream: ClassVar[int] = _STREAM

    @property
    def classes(self) -> tuple[str, ...]:  # type: ignore[override]
        """The photo names of :attr:`sources`: the labels (reading the photos, once per process)."""
        return tuple(name for name, _ in photos(self.sources))

    def _renderer(self) -> Renderer:  # type: ignore[override]
        chosen = tuple(s for s in PHOTO_SOURCES if s in self.sources)
        return functools.partial(render_crop, sources=chosen, min_scale=self.min_scale, max_scale=self.max_scale)


@hookimpl
def register_datasets(register):
    """Register the photo-crops dataset."""
    register(PhotoCrops)
