"""Where a unit fires: activation maps resized to an image and drawn over it.

A unit of a spatial layer gives one map ``(h, w)`` per image (the ``("y", "x")`` dims of
an activation recorded with ``reduce="none"``). Two pure functions turn it into a picture:

- :func:`upsample` resizes the map to the image's ``(H, W)`` by bilinear interpolation
  with ``align_corners=False``, so map cell ``(i, j)`` covers the image block
  ``[i * H / h, (i + 1) * H / h) x [j * W / w, (j + 1) * W / w)`` and its value sits at the
  block's centre;
- :func:`overlay` scales the resized map to ``[0, 1]`` (``m = clip(a, 0, vmax) / vmax``,
  ``vmax`` the map's maximum unless given, so maps of several images can share a scale),
  colours it with a colour map ``c(m)`` and blends it over the image:
  ``out = (1 - alpha) * image + alpha * c(m)``.

Colour maps ``"inferno"``, ``"magma"``, ``"viridis"`` and ``"gray"`` are built in (17
stops each, interpolated linearly), so drawing needs neither matplotlib nor a display;
any other name is looked up in matplotlib when it is installed.

Only NumPy and torch are used; the module sits in the basics layer of the core.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, ContractError, did_you_mean

__all__ = ["COLOUR_MAPS", "colourize", "upsample", "overlay"]

# 17 evenly spaced stops (0, 1/16, ..., 1) of matplotlib's perceptually uniform maps, as 8-bit RGB.
_STOPS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "inferno": (
        (0, 0, 4), (11, 7, 36), (33, 12, 74), (61, 9, 101), (87, 16, 110), (113, 25, 110),
        (138, 34, 106), (163, 44, 97), (188, 55, 84), (210, 70, 68), (228, 90, 49), (241, 115, 29),
        (249, 142, 9), (252, 172, 17), (249, 203, 53), (242, 234, 105), (252, 255, 164),
    ),
    "magma": (
        (0, 0, 4), (10, 8, 34), (29, 17, 71), (54, 16, 107), (81, 18, 124), (106, 28, 129),
        (131, 38, 129), (156, 46, 127), (183, 55, 121), (208, 65, 111), (231, 82, 99), (245, 107, 92),
        (252, 137, 97), (254, 167, 114), (254, 196, 136), (253, 226, 163), (252, 253, 191),
    ),
    "viridis": (
        (68, 1, 84), (72, 24, 106), (71, 45, 123), (66, 64, 134), (59, 82, 139), (51, 99, 141),
        (44, 114, 142), (38, 130, 142), (33, 145, 140), (31, 160, 136), (40, 174, 128), (63, 188, 115),
        (94, 201, 98), (132, 212, 75), (173, 220, 48), (216, 226, 25), (253, 231, 37),
    ),
    "gray": tuple((v, v, v) for v in (0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 255)),
}  # fmt: skip

#: Names of the built-in colour maps.
COLOUR_MAPS: tuple[str, ...] = tuple(_STOPS)


def _check_map(amap: np.ndarray, name: str = "amap") -> np.ndarray:
    array = np.asarray(amap)
    if array.ndim != 2 or 0 in array.shape:
        raise ContractError(f"{name} must be a 2-D activation map (h, w), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ContractError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ContractError(f"{name} holds NaN or inf; a map to draw must be finite")
    return array


def upsample(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an activation map to an image's size by bilinear interpolation.

    Parameters
    ----------
    amap
        The map ``(h, w)`` of one unit on one image; any real dtype, finite.
    size
        The target ``(H, W)``, both >= 1.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32: ``torch.nn.functional.interpolate(..., mode="bilinear",
        align_corners=False)`` of the map. A map already of that size comes back unchanged
        (as float32).

    Raises
    ------
    ContractError
        When ``amap`` is not a finite 2-D real array, or ``size`` is not two positive ints.
    """
    array = _check_map(amap)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in size):
        raise ContractError(f"size must be two positive integers (H, W), got {size!r}")
    return _resize(array, (int(size[0]), int(size[1])), np.float32)


def _resize(array: np.ndarray, size: tuple[int, int], dtype: type) -> np.ndarray:
    """Bilinear resize (``align_corners=False``) computed in ``dtype``."""
    array = np.ascontiguousarray(array, dtype=dtype)
    if array.shape == size:
        return array.copy()
    with torch.no_grad():
        tensor = torch.from_numpy(array)[None, None]
        resized = torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False)
    return resized[0, 0].numpy()


def _table(cmap: str) -> np.ndarray:
    """The colour map ``cmap`` as a float ``(n, 3)`` table of RGB in ``[0, 1]``."""
    if cmap in _STOPS:
        return np.asarray(_STOPS[cmap], dtype=np.float64) / 255.0
    colormaps: Any = None
    with contextlib.suppress(ImportError):
        from matplotlib import colormaps  # only for maps that are not built in
    if colormaps is not None and cmap in colormaps:
        return np.asarray(colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3], dtype=np.float64)
    known = COLOUR_MAPS if colormaps is None else (*COLOUR_MAPS, *colormaps)
    extra = "" if colormaps is not None else " (install matplotlib for its other colour maps)"
    raise ConfigError(
        f"unknown colour map {cmap!r}; built in are {', '.join(COLOUR_MAPS)}{extra}.{did_you_mean(cmap, known)}",
        where="key 'cmap'",
    )


def colourize(values: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """Colour values in ``[0, 1]`` with a colour map.

    Parameters
    ----------
    values
        Any shape; values outside ``[0, 1]`` are clipped.
    cmap
        A built-in map (:data:`COLOUR_MAPS`) or, with matplotlib installed, any of its names.

    Returns
    -------
    numpy.ndarray
        ``values.shape + (3,)`` float64 RGB in ``[0, 1]``, each channel interpolated
        linearly between the map's evenly spaced stops.
    """
    table = _table(cmap)
    position = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(table) - 1)
    lower = np.minimum(np.floor(position).astype(np.intp), len(table) - 2)
    weight = (position - lower)[..., None]
    return (1.0 - weight) * table[lower] + weight * table[lower + 1]


def _image_as_float(image: np.ndarray) -> np.ndarray:
    """An image ``(H, W)`` or ``(H, W, 3)``, uint8 or float in ``[0, 1]``, as float ``(H, W, 3)`` in ``[0, 1]``."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)) or 0 in array.shape:
        raise ContractError(f"image must be (H, W) or (H, W, 3), got shape {array.shape}")
    if array.dtype == np.uint8:
        result = array.astype(np.float64) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        result = array.astype(np.float64)
        if not np.isfinite(result).all() or result.min() < 0.0 or result.max() > 1.0:
            raise ContractError(
                "a float image must hold values in [0, 1] "
                f"(got {np.nanmin(result):.4g} .. {np.nanmax(result):.4g}); pass uint8 or rescale it"
            )
    else:
        raise ContractError(f"image must be uint8 or float in [0, 1], got dtype {array.dtype}")
    if result.ndim == 2:
        result = np.repeat(result[..., None], 3, axis=-1)
    return result


def overlay(
    image: np.ndarray,
    amap: np.ndarray,
    *,
    alpha: float = 0.5,
    cmap: str = "inferno",
    vmax: float | None = None,
) -> np.ndarray:
    """Draw a unit's activation map over an image as a colour map.

    Parameters
    ----------
    image
        ``(H, W)`` (grey) or ``(H, W, 3)``, uint8 or float in ``[0, 1]``.
    amap
        The unit's map ``(h, w)`` on this image, of any size: it is resized to ``(H, W)``
        with :func:`upsample`.
    alpha
        Weight of the colour map in the blend, in ``[0, 1]``: 0 gives the image, 1 the
        coloured map alone.
    cmap
        Name of the colour map (:func:`colourize`).
    vmax
        The activation drawn at the top of the colour map; values above it saturate and
        negatives count as 0. ``None`` uses the maximum of ``amap`` (a map with no positive
        value is drawn at the bottom colour everywhere). Give one value to a set of images
        to compare how strongly the unit fires on each.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8: ``round(255 * ((1 - alpha) * image + alpha * cmap(m)))`` with
        ``m = clip(upsample(amap), 0, vmax) / vmax`` (the map resized in double precision).

    Raises
    ------
    ConfigError
        For ``alpha`` outside ``[0, 1]``, ``vmax`` not positive and finite, or an unknown ``cmap``.
    ContractError
        For an image or map of the wrong shape, dtype or range.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be a number in [0, 1], got {alpha!r}", where="key 'alpha'")
    if vmax is not None and (
        isinstance(vmax, bool) or not isinstance(vmax, (int, float)) or not math.isfinite(vmax) or vmax <= 0
    ):
        raise ConfigError(f"vmax must be a positive finite number or None, got {vmax!r}", where="key 'vmax'")
    _table(cmap)  # an unknown colour map fails before any resizing
    picture = _image_as_float(image)
    array = _check_map(amap)
    # The map's own maximum, not the resized one's: interpolation can only lower the peak.
    top = float(vmax) if vmax is not None else float(array.max())
    # Resized in double precision: the blend is rounded to 8 bits, where float32 errors would show.
    resized = _resize(array, picture.shape[:2], np.float64)
    scaled = np.clip(resized, 0.0, top) / top if top > 0 else np.zeros_like(resized)
    blended = (1.0 - alpha) * picture + alpha * colourize(scaled, cmap)
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)
