"""Bundled procedural image tasks: rendered polyhedral dice and cartoon creatures, offline.

Both datasets draw every image from scratch (numpy and Pillow), so they need no files
and no network, come in any size and resolution, and stand in for small fine-tuning
tasks of pretrained CNNs (a tabletop-dice task and a creature-sprite task).

Item ``i`` of a split is rendered from its own random generator, seeded by the dataset,
``seed``, the split and ``i``: the same item has the same pixels in every process and
in any access order, and nothing is rendered before it is asked for. The sample id of
item ``i`` is ``3 * i + k`` with ``k`` = 0, 1, 2 for train, test and validation, so ids
never collide across splits, and the splits are disjoint by construction (their items
come from different random streams). The label of item ``i`` is ``i % n_classes``, so
every split is balanced to within one item per class.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import attrs
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from mergescope.hookspecs import hookimpl
from mergescope.validators import finite, int_range, list_of, non_negative_int, one_of, positive, positive_int

__all__ = [
    "DICE_CLASSES",
    "CRITTER_CLASSES",
    "Dice",
    "Critters",
    "ProceduralImageDataset",
    "render_dice",
    "render_critter",
    "register_datasets",
]

SPLITS = ("train", "test", "validation")
# Ids interleave the splits: id = 3 * i + code.
_SPLIT_CODE = {"train": 0, "test": 1, "validation": 2}

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

#: Class names of ``dice``, indexed by label.
DICE_CLASSES = ("d4", "d6", "d8", "d10", "d12", "d20")
#: Class names of ``critters``, indexed by label.
CRITTER_CLASSES = ("blob", "bird", "fish", "bug", "beast", "serpent", "star", "ghost")

# Drawn at this multiple of the image size, then shrunk: cheap anti-aliasing.
_SUPERSAMPLE = 2
# Keeps the random streams of the two datasets apart for one seed.
_DICE_STREAM = 1
_CRITTER_STREAM = 2

Renderer = Callable[[np.random.Generator, int, int], Image.Image]


def _rng(stream: int, seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed, _SPLIT_CODE[split], index])


# --------------------------------------------------------------------- lazy dataset


@attrs.define(eq=False)
class ProceduralImageDataset(torch.utils.data.Dataset):
    """An :class:`~mergescope.components.ImageDataset` that renders each item when asked.

    Parameters
    ----------
    name
        A short name used in labels, e.g. ``"dice/train"``.
    labels
        Integer class of every item, ``(N,)``.
    sample_ids
        Stable id of every item, ``(N,)``: ``3 * i + k`` for item ``i`` of split ``k``.
    classes
        Class names, indexed by label.
    render
        ``render(rng, label, size) -> PIL.Image`` (RGB, ``size`` x ``size``).
    stream, seed, split
        Seed the random generator of each item, together with its index.
    image_size
        Side of the images in pixels.
    mean, std
        Per-channel normalisation (one value or three).
    """

    name: str
    labels: np.ndarray = attrs.field(converter=lambda a: np.asarray(a, dtype=np.int64))
    sample_ids: np.ndarray = attrs.field(converter=lambda a: np.asarray(a, dtype=np.int64))
    classes: tuple[str, ...] = attrs.field(converter=tuple)
    render: Renderer
    stream: int
    seed: int
    split: str
    image_size: int
    mean: tuple[float, ...] = attrs.field(converter=tuple)
    std: tuple[float, ...] = attrs.field(converter=tuple)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        """The RGB image of item ``index`` (a position), before normalisation."""
        i = int(self.sample_ids[index]) // 3
        return self.render(_rng(self.stream, self.seed, self.split, i), int(self.labels[index]), self.image_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = np.asarray(self.image(index), dtype=np.float32) / 255.0
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        tensor = torch.from_numpy(np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1)))
        return tensor, int(self.labels[index])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    def subset(self, indices: Sequence[int], name: str | None = None) -> ProceduralImageDataset:
        """Return the items at ``indices`` (positions, not sample ids), keeping their ids."""
        idx = np.asarray(indices, dtype=np.int64)
        return attrs.evolve(self, name=name or self.name, labels=self.labels[idx], sample_ids=self.sample_ids[idx])


# ------------------------------------------------------------------------ options


def _one_or_three(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if len(value) not in (1, 3):
        raise ValueError(f"'{attribute.name}' must have 1 or 3 values (one per channel), got {len(value)}")


def _float_list(value: Any) -> Any:
    # Integers in a list of floats are fine ([0, 0, 0]); anything else is left to the validator.
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    return value


@attrs.define
class _ProceduralDataset:
    """Options shared by the procedural datasets."""

    split: str = attrs.field(default="test", validator=one_of(*SPLITS))
    size: int = attrs.field(default=600, validator=positive_int)
    image_size: int = attrs.field(default=64, validator=int_range(8, 1024))
    seed: int = attrs.field(default=0, validator=non_negative_int)
    mean: list[float] = attrs.field(
        factory=lambda: list(IMAGENET_MEAN),
        converter=_float_list,
        validator=[list_of(finite, min_length=1), _one_or_three],
    )
    std: list[float] = attrs.field(
        factory=lambda: list(IMAGENET_STD),
        converter=_float_list,
        validator=[list_of(positive, min_length=1), _one_or_three],
    )

    name: ClassVar[str]
    classes: ClassVar[tuple[str, ...]]
    stream: ClassVar[int]

    @staticmethod
    def _renderer() -> Renderer:
        raise NotImplementedError

    def load(self) -> ProceduralImageDataset:
        """The chosen split as a lazily rendered :class:`ProceduralImageDataset`."""
        i = np.arange(self.size, dtype=np.int64)
        return ProceduralImageDataset(
            name=f"{self.name}/{self.split}",
            labels=i % len(self.classes),
            sample_ids=3 * i + _SPLIT_CODE[self.split],
            classes=self.classes,
            render=self._renderer(),
            stream=self.stream,
            seed=self.seed,
            split=self.split,
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
        )


_OPTIONS = """\
    Parameters
    ----------
    split
        ``"train"``, ``"test"`` or ``"validation"``; disjoint by construction.
    size
        Number of images in the split.
    image_size
        Side of the square RGB images in pixels (8 to 1024).
    seed
        Selects one family of images: item ``i`` of a split is the same for one seed.
    mean, std
        Per-channel normalisation (one value or three); ImageNet's by default.
"""


def _with_options(cls: type) -> type:
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n" + _OPTIONS
    return cls


# ------------------------------------------------------------------ drawing helpers


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """An RGB colour in [0, 1] from hue, saturation and value in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _rgb(colour: np.ndarray, alpha: int | None = None) -> tuple[int, ...]:
    c = tuple(int(round(x)) for x in np.clip(np.asarray(colour) * 255.0, 0, 255))
    return c if alpha is None else (*c, alpha)


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1]: a random grid, bicubically enlarged."""
    grid = Image.fromarray(rng.random((cells, cells)).astype(np.float32))
    return np.clip(np.asarray(grid.resize((size, size), Image.BICUBIC)), 0.0, 1.0)


def _finish(canvas: Image.Image, size: int) -> Image.Image:
    return canvas.convert("RGB").resize((size, size), Image.LANCZOS)


# ------------------------------------------------------------------------ dice


def _faces(vertices: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The vertices (circumradius 1) and faces of a convex solid, each face's vertices in order."""
    from scipy.spatial import ConvexHull

    v = np.asarray(vertices, dtype=np.float64)
    v = v / np.linalg.norm(v, axis=1).max()
    hull = ConvexHull(v)
    groups: dict[tuple[float, ...], set[int]] = {}
    for simplex, eq in zip(hull.simplices, hull.equations):
        groups.setdefault(tuple(np.round(eq[:3], 4)), set()).update(int(s) for s in simplex)
    faces = []
    for normal, members in groups.items():
        idx = np.array(sorted(members))
        n = np.array(normal)
        c = v[idx].mean(axis=0)
        u = v[idx[0]] - c
        u /= np.linalg.norm(u)
        w = np.cross(n, u)
        # Counter-clockwise seen from outside.
        angle = np.arctan2((v[idx] - c) @ w, (v[idx] - c) @ u)
        faces.append(idx[np.argsort(angle)])
    # One order of faces for every run: by their centre's coordinates.
    faces.sort(key=lambda f: tuple(np.round(v[f].mean(axis=0), 6)))
    return v, faces


@functools.lru_cache(maxsize=1)
def _solids() -> tuple[tuple[np.ndarray, list[np.ndarray]], ...]:
    phi = (1 + 5**0.5) / 2
    signs = [(a, b, c) for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)]

    def cyclic(points: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
        return [p[k:] + p[:k] for p in points for k in range(3)]

    tetra = [(1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)]
    cube = signs
    octa = [tuple(s * (k == j) for j in range(3)) for k in range(3) for s in (-1, 1)]
    # Pentagonal trapezohedron: the apex height that makes each kite planar.
    a = 0.11
    apex = a * (1 + math.cos(math.pi / 5)) / (1 - math.cos(math.pi / 5))
    ring = [(math.cos(k * math.pi / 5), math.sin(k * math.pi / 5), a if k % 2 == 0 else -a) for k in range(10)]
    d10 = [(0.0, 0.0, apex), (0.0, 0.0, -apex), *ring]
    dodeca = signs + cyclic([(0.0, b / phi, c * phi) for b in (-1, 1) for c in (-1, 1)])
    icosa = cyclic([(0.0, b, c * phi) for b in (-1, 1) for c in (-1, 1)])
    return tuple(_faces(np.array(s, dtype=np.float64)) for s in (tetra, cube, octa, d10, dodeca, icosa))


# Seven-segment digits in a 1 x 2 cell (x right, y up): the segments each digit lights.
_SEGMENTS = {
    "a": ((0, 2), (1, 2)),
    "b": ((1, 2), (1, 1)),
    "c": ((1, 1), (1, 0)),
    "d": ((0, 0), (1, 0)),
    "e": ((0, 0), (0, 1)),
    "f": ((0, 1), (0, 2)),
    "g": ((0, 1), (1, 1)),
}
_DIGITS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg")
# Pip positions of a d6 face, in units of the face's half-width.
_PIPS = {
    1: [(0, 0)],
    2: [(-1, -1), (1, 1)],
    3: [(-1, -1), (0, 0), (1, 1)],
    4: [(-1, -1), (-1, 1), (1, -1), (1, 1)],
    5: [(-1, -1), (-1, 1), (0, 0), (1, -1), (1, 1)],
    6: [(-1, -1), (-1, 0), (-1, 1), (1, -1), (1, 0), (1, 1)],
}


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _wood(rng: np.random.Generator, size: int) -> np.ndarray:
    """Wooden planks: streaks and wavy rings along the grain, seams between planks, at a random angle."""
    big = int(size * 1.45)
    yy = np.mgrid[0:big, 0:big][0].astype(np.float32) / big
    # Noise with many rows and few columns stretches into streaks along the grain.
    streaks = Image.fromarray(rng.random((int(rng.integers(40, 90)), 4)).astype(np.float32))
    streaks = np.asarray(streaks.resize((big, big), Image.BICUBIC))
    bend = _noise(rng, big, int(rng.integers(2, 5)))
    rings = (0.5 + 0.5 * np.sin(2 * np.pi * (yy * rng.uniform(6, 16) + bend * rng.uniform(0.5, 1.5)))) ** 2
    grain = np.clip(0.5 * streaks + 0.5 * rings, 0, 1)
    planks = int(rng.integers(2, 6))
    plank = np.minimum((yy * planks).astype(np.int64), planks - 1)
    grain = grain * rng.uniform(0.8, 1.0, size=planks)[plank]
    seam = (yy * planks) % 1.0
    grain = np.where((seam < 0.012) | (seam > 0.988), 0.0, grain)
    dark = _hsv(rng.uniform(0.04, 0.11), rng.uniform(0.5, 0.85), rng.uniform(0.15, 0.4))
    light = _hsv(rng.uniform(0.05, 0.12), rng.uniform(0.3, 0.65), rng.uniform(0.5, 0.9))
    pixels = dark + grain[..., None] * (light - dark)
    image = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    image = image.rotate(float(rng.uniform(0, 180)), resample=Image.BICUBIC)
    lo = (big - size) // 2
    return np.asarray(image.crop((lo, lo, lo + size, lo + size)), dtype=np.float32) / 255.0


def _tabletop(rng: np.random.Generator, size: int) -> Image.Image:
    """A wood, felt or stone table top with clutter on it."""
    kind = rng.choice(3, p=[0.55, 0.25, 0.2])
    if kind == 0:
        pixels = _wood(rng, size)
    elif kind == 1:  # felt: one colour with fine noise
        base = _hsv(rng.uniform(0, 1), rng.uniform(0.3, 0.8), rng.uniform(0.25, 0.7))
        pixels = base * (0.85 + 0.3 * _noise(rng, size, int(rng.integers(32, 64))))[..., None]
    else:  # stone: blotchy grey-ish
        base = _hsv(rng.uniform(0, 1), rng.uniform(0, 0.2), rng.uniform(0.4, 0.8))
        blotch = 0.6 * _noise(rng, size, 6) + 0.4 * _noise(rng, size, 20)
        pixels = base * (0.7 + 0.6 * blotch)[..., None]
    canvas = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).convert("RGBA")
    overlay = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for _ in range(int(rng.integers(2, 9))):
        colour = _rgb(_hsv(rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 1)), int(rng.integers(90, 230)))
        x, y = rng.uniform(-0.1, 1.1, size=2) * size
        r = rng.uniform(0.03, 0.2) * size
        shape = rng.integers(4)
        if shape == 0:
            draw.ellipse([x - r, y - r * rng.uniform(0.4, 1), x + r, y + r * rng.uniform(0.4, 1)], fill=colour)
        elif shape == 1:
            draw.rectangle([x - r, y - r * rng.uniform(0.2, 1), x + r, y + r * rng.uniform(0.2, 1)], fill=colour)
        elif shape == 2:
            end = (x + rng.uniform(-3, 3) * r, y + rng.uniform(-3, 3) * r)
            draw.line([(x, y), end], fill=colour, width=max(1, int(r * rng.uniform(0.05, 0.3))))
        else:
            draw.arc(
                [x - r, y - r, x + r, y + r], 0, float(rng.uniform(90, 360)), fill=colour, width=max(1, int(r * 0.15))
            )
    return Image.alpha_composite(canvas, overlay)


def _digit_strokes(text: str, height: float) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Segments of ``text`` in face units, centred on the origin (x right, y up)."""
    width, gap = height * 0.5, height * 0.25
    total = len(text) * width + (len(text) - 1) * gap
    strokes = []
    for k, ch in enumerate(text):
        x0 = -total / 2 + k * (width + gap)
        for seg in _DIGITS[int(ch)]:
            (ax, ay), (bx, by) = _SEGMENTS[seg]
            strokes.append(((x0 + ax * width, (ay - 1) * height / 2), (x0 + bx * width, (by - 1) * height / 2)))
    return strokes


def render_dice(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """Draw one die of class ``DICE_CLASSES[label]`` on a cluttered table top.

    Parameters
    ----------
    rng
        The item's random generator; every random choice of the image comes from it.
    label
        Index into :data:`DICE_CLASSES`.
    size
        Side of the returned RGB image in pixels.

    Returns
    -------
    PIL.Image.Image
        The die with Lambert-shaded visible faces, numbers (pips on a d6), an outline and
        a soft shadow.
    """
    s = size * _SUPERSAMPLE
    vertices, faces = _solids()[label]
    canvas = _tabletop(rng, s)
    rotation = _random_rotation(rng)
    v = vertices @ rotation.T
    radius = rng.uniform(0.24, 0.4) * s
    centre = rng.uniform(radius * 1.05, s - radius * 1.05, size=2)
    distance = rng.uniform(3.5, 8.0)  # camera distance in die radii: mild perspective
    light = np.array([rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.4, 1.2)])
    light /= np.linalg.norm(light)
    base = _hsv(rng.uniform(0, 1), rng.uniform(0.2, 1), rng.uniform(0.35, 1))
    ink = np.ones(3) if base @ [0.3, 0.59, 0.11] < 0.5 else np.full(3, 0.05)
    if rng.random() < 0.3:  # coloured numbers now and then
        ink = _hsv(rng.uniform(0, 1), 0.8, 1.0 if ink[0] > 0.5 else 0.25)

    def project(points: np.ndarray) -> np.ndarray:
        scale = distance / (distance - points[..., 2])
        return np.stack([centre[0] + radius * scale * points[..., 0], centre[1] - radius * scale * points[..., 1]], -1)

    # Soft shadow: the silhouette pushed away from the light, blurred.
    shadow = Image.new("L", (s, s), 0)
    shadow_draw = ImageDraw.Draw(shadow)
    offset = -light[:2] / max(light[2], 0.3) * radius * 0.35 * np.array([1, -1])
    for face in faces:
        shadow_draw.polygon([tuple(p + offset) for p in project(v[face])], fill=int(rng.integers(90, 150)))
    shadow = shadow.filter(ImageFilter.GaussianBlur(radius * 0.12))
    canvas = Image.composite(Image.new("RGBA", (s, s), (0, 0, 0, 255)), canvas, shadow)

    draw = ImageDraw.Draw(canvas)
    edge = _rgb(base * 0.35)
    line = max(1, int(round(s / 160)))
    camera = np.array([0.0, 0.0, distance])
    for k, face in enumerate(faces):
        corners = v[face]
        c = corners.mean(axis=0)
        n = np.cross(corners[1] - corners[0], corners[2] - corners[0])
        n /= np.linalg.norm(n)
        if n @ c < 0:
            n = -n
        if n @ (camera - c) <= 0:
            continue  # back face
        shade = 0.3 + 0.7 * max(0.0, float(n @ light))
        draw.polygon([tuple(p) for p in project(corners)], fill=_rgb(base * shade), outline=edge, width=line)
        # Face frame: u towards the first corner, w across, both in the face's plane.
        u = corners[0] - c
        u /= np.linalg.norm(u)
        w = np.cross(n, u)
        edges = np.roll(corners, -1, axis=0) - corners
        inner = min(np.linalg.norm(np.cross(e, c - p)) / np.linalg.norm(e) for e, p in zip(edges, corners))

        def to_image(points: np.ndarray, c=c, u=u, w=w, n=n) -> list[tuple[float, float]]:
            # x along -w keeps (x, y, outward normal) right-handed: digits read unmirrored.
            p3 = c - points[:, :1] * w + points[:, 1:2] * u + 0.002 * n
            return [tuple(p) for p in project(p3)]

        mark = _rgb(ink * (0.55 + 0.45 * shade))
        if label == 1:
            half, pip = inner * 0.55, inner * 0.17
            circle = np.stack([np.cos(np.linspace(0, 2 * np.pi, 12)), np.sin(np.linspace(0, 2 * np.pi, 12))], 1)
            for px, py in _PIPS[k + 1]:
                draw.polygon(to_image(np.array([px * half, py * half]) + pip * circle), fill=mark)
        else:
            number = str(k if label == 3 else k + 1)
            height = inner * (0.95 if len(number) == 1 else 0.75)
            stroke = max(1, int(round(height * radius * 0.16)))
            for a, b in _digit_strokes(number, height):
                draw.line(to_image(np.array([a, b])), fill=mark, width=stroke)
    return _finish(canvas, size)


# ---------------------------------------------------------------------- critters


class _Pen:
    """Draws shapes given in a creature's own frame (y up, body about 1 across)."""

    def __init__(
        self,
        draw: ImageDraw.ImageDraw,
        centre: np.ndarray,
        scale: float,
        angle: float,
        flip: bool,
        stretch: tuple[float, float],
        line: int,
    ):
        self.draw, self.centre, self.scale, self.line = draw, centre, scale, line
        cos, sin = math.cos(angle), math.sin(angle)
        sx, sy = stretch
        self.matrix = np.array([[cos, -sin], [sin, cos]]) @ np.diag([-sx if flip else sx, sy])

    def points(self, pts: Any) -> list[tuple[float, float]]:
        p = np.asarray(pts, dtype=np.float64) @ self.matrix.T
        return [(self.centre[0] + self.scale * x, self.centre[1] - self.scale * y) for x, y in p]

    def poly(self, pts: Any, fill: tuple[int, ...], outline: tuple[int, ...] | None = None) -> None:
        self.draw.polygon(self.points(pts), fill=fill, outline=outline, width=self.line if outline else 0)

    def ellipse(
        self, cx: float, cy: float, rx: float, ry: float, fill: Any, outline: Any = None, tilt: float = 0.0
    ) -> None:
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x, y = rx * np.cos(t), ry * np.sin(t)
        ct, st = math.cos(tilt), math.sin(tilt)
        self.poly(np.stack([cx + ct * x - st * y, cy + st * x + ct * y], 1), fill, outline)

    def stroke(self, pts: Any, fill: tuple[int, ...], width: float) -> None:
        self.draw.line(self.points(pts), fill=fill, width=max(1, int(round(width * self.scale))), joint="curve")

    def eye(self, cx: float, cy: float, r: float, dark: tuple[int, ...]) -> None:
        self.ellipse(cx, cy, r, r * 1.15, (255, 255, 255), dark)
        self.ellipse(cx + r * 0.25, cy, r * 0.5, r * 0.6, dark)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A plain, linear-gradient or radial-gradient light background."""
    a = _hsv(rng.uniform(0, 1), rng.uniform(0, 0.35), rng.uniform(0.85, 1))
    b = _hsv(rng.uniform(0, 1), rng.uniform(0, 0.5), rng.uniform(0.7, 1))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(3)
    if kind == 0:
        t = np.zeros_like(xx)
    elif kind == 1:
        theta = rng.uniform(0, 2 * np.pi)
        t = np.clip((xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta) + 0.5, 0, 1)
    else:
        t = np.clip(np.hypot(xx - 0.5, yy - 0.5) * 1.4, 0, 1)
    pixels = a + t[..., None] * (b - a)
    return Image.fromarray((pixels * 255).astype(np.uint8))


def _blob(pen: _Pen, body: Any, belly: Any, accent: Any, dark: Any, rng: np.random.Generator) -> None:
    t = np.linspace(0, np.pi, 40)
    top = np.stack([0.55 * np.cos(t), -0.3 + 0.75 * np.sin(t) ** 0.8], 1)
    pen.poly(np.vstack([top, [[-0.6, -0.35], [0.6, -0.35]]]), body, dark)
    pen.ellipse(0, -0.2, 0.3, 0.12, belly)
    pen.eye(-0.18, 0.15, 0.1, dark)
    pen.eye(0.18, 0.15, 0.1, dark)
    pen.stroke([(-0.1, -0.02), (0, -0.07), (0.1, -0.02)], dark, 0.025)


def _bird(pen: _Pen, body: Any, belly: Any, accent: Any, dark: Any, rng: np.random.Generator) -> None:
    for x in (-0.1, 0.1):
        pen.stroke([(x, -0.25), (x, -0.6), (x + 0.1, -0.62)], accent, 0.035)
    pen.ellipse(-0.05, 0, 0.42, 0.32, body, dark)
    pen.ellipse(0.0, -0.08, 0.26, 0.16, belly)
    pen.ellipse(-0.12, 0.04, 0.26, 0.13, accent, dark, tilt=-0.4)
    pen.ellipse(0.35, 0.3, 0.2, 0.2, body, dark)
    pen.poly([(0.52, 0.34), (0.78, 0.27), (0.52, 0.22)], accent, dark)
    pen.eye(0.4, 0.36, 0.06, dark)


def _fish(pen: _Pen, body: Any, belly: Any, accent: Any, dark: Any, rng: np.random.Generator) -> None:
    pen.poly([(-0.4, 0), (-0.75, 0.3), (-0.68, 0), (-0.75, -0.3)], accent, dark)
    pen.poly([(-0.15, 0.25), (0.05, 0.48), (0.2, 0.25)], accent, dark)
    pen.ellipse(0, 0, 0.5, 0.28, body, dark)
    for x in (-0.2, 0.0):
        pen.stroke([(x, 0.24), (x + 0.05, 0), (x, -0.24)], belly, 0.05)
    pen.eye(0.3, 0.06, 0.07, dark)
    pen.stroke([(0.42, -0.1), (0.48, -0.08)], dark, 0.02)


def _bug(pen: _Pen, body: Any, belly: Any, accent: Any, dark: Any, rng: np.random.Generator) -> None:
    for x in (-0.2, 0.0, 0.2):
        pen.stroke([(x, 0), (x - 0.1, 0.35), (x - 0.2, 0.42)], dark, 0.025)
        pen.stroke([(x, 0), (x - 0.1, -0.35), (x - 0.2, -0.42)], dark, 0.025)
    for y in (0.07, -0.07):
        pen.stroke([(0.45, y), (0.65, 3 * y + 0.1 * np.sign(y))], dark, 0.02)
        pen.ellipse(0.65, 3 * y + 0.1 * np.sign(y), 0.04, 0.04, accent)
    pen.ellipse(-0.3, 0, 0.28, 0.2, body, dark)
    pen.stroke([(-0.55, 0), (-0.05, 0)], dark, 0.02)
    pen.ellipse(0.05, 0, 0.12, 0.12, belly, dark)
    pen.ellipse(0.32, 0, 0.14, 0.14, accent, dark)
    pen.eye(0.37, 0.05, 0.045, dark)


def _beast(pen: _Pen, body: Any, belly: Any, accent: Any, dark: Any, rng: np.random.Generator) -> None:
    pen.stroke([(-0.4, 0.05), (-0.62, 0.25), (-0.7, 0.2)], body, 0.06)
    for x in (-0.3, -0.15, 0.15, 0.3):
        pen.poly([(x - 0.05, -0.05), (x + 0.05, -0.05), (x + 0.05, -0.5), (x - 0.05, -0.5)], body, dark)
    pen.ellipse(0, 0, 0.45, 0.22, body, dark)
    pen.ellipse(0, -0.06, 0.3, 0.1, belly)
    pen.poly([(0.38, 0.38), (0.42, 0.62), (0.52, 0.42)], accent, dark)
    pen.poly([(0.56, 0.42), (0.66, 0.62), (0.68, 0.38)], accent, dark)
    pen.ellipse(0.52, 0.25, 0.18, 0.17, body, dark)
    pen.ellipse(0.66, 0.2, 0.07, 0.05, belly)
    pen.eye(0.55, 0.3, 0.05, dark)


def _serpent(pen: _Pen, body: Any, belly: Any, accent: Any, dark: Any, rng: np.random.Generator) -> None:
    t = np.linspace(0, 1, 60)
    x, y = -0.65 + 1.25 * t, 0.25 * np.sin(2.5 * np.pi * t + 0.5)
    pen.stroke(np.stack([x, y], 1), dark, 0.22)
    pen.stroke(np.stack([x, y], 1), body, 0.17)
    for k in range(6, 55, 8):
        pen.ellipse(x[k], y[k], 0.035, 0.035, accent)
    hx, hy = x[-1], y[-1]
    pen.stroke([(hx + 0.12, hy), (hx + 0.28, hy), (hx + 0.33, hy + 0.04)], (200, 30, 40), 0.02)
    pen.ellipse(hx + 0.04, hy, 0.15, 0.12, body, dark)
    pen.eye(hx + 0.07, hy + 0.04, 0.045, dark)


def _star(pen: _Pen, body: Any, belly: Any, accent: Any, dark: Any, rng: np.random.Generator) -> None:
    angles = np.pi / 2 + np.arange(10) * np.pi / 5
    r = np.where(np.arange(10) % 2 == 0, 0.62, 0.27)
    pen.poly(np.stack([r * np.cos(angles), r * np.sin(angles)], 1), body, dark)
    for a in angles[::2]:
        pen.ellipse(0.42 * np.cos(a), 0.42 * np.sin(a), 0.05, 0.05, accent)
    pen.ellipse(0, 0, 0.2, 0.2, belly)
    pen.eye(-0.08, 0.04, 0.06, dark)
    pen.eye(0.08, 0.04, 0.06, dark)


def _ghost(pen: _Pen, body: Any, belly: Any, accent: Any, dark: Any, rng: np.random.Generator) -> None:
    t = np.linspace(0, np.pi, 30)
    dome = np.stack([0.38 * np.cos(t), 0.15 + 0.4 * np.sin(t)], 1)
    xs = np.linspace(-0.38, 0.38, 25)
    hem = np.stack([xs, -0.45 + 0.07 * np.cos(xs * 4 * np.pi / 0.38)], 1)
    pen.poly([(-0.52, 0.0), (-0.36, 0.05), (-0.36, -0.12)], body, dark)
    pen.poly([(0.52, 0.0), (0.36, 0.05), (0.36, -0.12)], body, dark)
    pen.poly(np.vstack([dome, hem]), body, dark)
    pen.ellipse(-0.13, 0.25, 0.07, 0.11, dark)
    pen.ellipse(0.13, 0.25, 0.07, 0.11, dark)
    pen.ellipse(0, 0.05, 0.07, 0.05, accent, dark)


_CRITTERS = (_blob, _bird, _fish, _bug, _beast, _serpent, _star, _ghost)


def render_critter(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """Draw one cartoon creature of class ``CRITTER_CLASSES[label]`` on a light background.

    Parameters
    ----------
    rng
        The item's random generator; every random choice of the image comes from it.
    label
        Index into :data:`CRITTER_CLASSES`.
    size
        Side of the returned RGB image in pixels.

    Returns
    -------
    PIL.Image.Image
        A sprite-like creature: outlined flat shapes whose layout (body plan) is the
        class, in random colours, size, position, tilt and facing.
    """
    s = size * _SUPERSAMPLE
    canvas = _background(rng, s)
    hue = rng.uniform(0, 1)
    body = _rgb(_hsv(hue, rng.uniform(0.35, 0.95), rng.uniform(0.5, 1)))
    belly = _rgb(_hsv(hue + rng.uniform(-0.1, 0.1), rng.uniform(0.05, 0.35), rng.uniform(0.85, 1)))
    accent = _rgb(_hsv(hue + rng.uniform(0.25, 0.75), rng.uniform(0.5, 1), rng.uniform(0.5, 1)))
    dark = _rgb(_hsv(hue, rng.uniform(0.3, 0.8), rng.uniform(0.05, 0.25)))
    scale = rng.uniform(0.55, 0.8) * s
    centre = s / 2 + rng.uniform(-0.12, 0.12, size=2) * s
    angle, flip = rng.uniform(-0.35, 0.35), bool(rng.random() < 0.5)
    # Squashed or stretched a little: one body plan, many builds.
    stretch = (float(rng.uniform(0.85, 1.15)), float(rng.uniform(0.85, 1.15)))
    pen = _Pen(ImageDraw.Draw(canvas), centre, scale, angle, flip, stretch, max(1, s // 90))
    _CRITTERS[label](pen, body, belly, accent, dark, rng)
    return _finish(canvas, size)


# ----------------------------------------------------------------------- datasets


@_with_options
@attrs.define
class Dice(_ProceduralDataset):
    """Rendered polyhedral dice (d4, d6, d8, d10, d12, d20) on cluttered table tops, any size.

    Each image is one die: the visible faces of the rotated solid in perspective, Lambert
    shaded from a random light, with numbers (pips on the d6), an outline and a soft
    shadow, on a wood, felt or stone table top with random shapes on it. Colour, pose,
    light, scale and position are random and independent of the class, so the class is
    in the silhouette and the number and shape of the faces. Images are rendered when
    indexed (nothing is stored); sample ids are ``3 * i + k`` for item ``i`` of split
    ``k`` (train 0, test 1, validation 2), and the label of item ``i`` is ``i % 6``.

    """

    name: ClassVar[str] = "dice"
    classes: ClassVar[tuple[str, ...]] = DICE_CLASSES
    stream: ClassVar[int] = _DICE_STREAM

    @staticmethod
    def _renderer() -> Renderer:
        return render_dice


@_with_options
@attrs.define
class Critters(_ProceduralDataset):
    """Procedural cartoon creatures in 8 body plans on light backgrounds, any size (a sprite-style task).

    Each image is one outlined, flat-coloured creature: blob, bird, fish, bug, beast
    (four legs), serpent, star or ghost. The body plan is the class; colours, size,
    position, tilt, facing and the plain or gradient background are random. Images are
    rendered when indexed; ids and labels follow ``dice`` (label ``i % 8``).

    """

    name: ClassVar[str] = "critters"
    classes: ClassVar[tuple[str, ...]] = CRITTER_CLASSES
    stream: ClassVar[int] = _CRITTER_STREAM

    @staticmethod
    def _renderer() -> Renderer:
        return render_critter


@hookimpl
def register_datasets(register):
    """Register the procedural datasets."""
    register(Dice)
    register(Critters)
