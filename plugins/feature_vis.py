"""Feature visualisation: images optimised to excite one unit each (Olah, Mordvintsev & Schubert 2017).

For a unit ``u`` of a layer of a model, feature visualisation looks for the input that
maximises the unit's activation by gradient ascent on the image itself. Left alone, the
ascent finds high-frequency patterns no natural image holds, so "Feature Visualization"
(Distill, 2017) and its library, Lucid, regularise it in two ways, both implemented here
with Lucid's defaults (as torch-lucent ports them to PyTorch) unless said otherwise.

**Parameterisation.** The image is optimised through a decorrelated space in which
gradient steps are closer to whitened. Its parameters ``w`` are a spectrum, scaled by the
inverse of the frequency and brought back by an inverse real FFT
(``parameterisation = "fourier"``)::

    s(f) = 1 / max(|f|, 1 / max(H, W))          (|f| in cycles per pixel)
    y    = irfft2(s * w, norm="ortho") / 4        (4: Lucid's constant against saturation)
    x    = sigmoid(M y + logit(b))               (pixel values in [0, 1])

where ``M`` decorrelates colour for three-channel inputs (Lucid's square root of the
ImageNet colour covariance, its columns scaled to a largest norm of one) and is the
identity otherwise. ``parameterisation = "pixel"`` optimises ``x = sigmoid(w + logit(b))``.
``w`` starts as N(0, 0.01^2) noise, so an image starts as a plain field ``b``: Lucid's
grey 0.5 (``background = "grey"``), the data's mean pixel value per channel
(``"mean"``: 0.13 for MNIST, about Lucid's grey for ImageNet-normalised photos), or by
default (``"auto"``) whichever of the two the unit responds to more (grey on a tie). On
MNIST a grey field is as bright as a page of ink: units that detect dark regions are
dead on it and end in poor optima, while units that detect strokes find better ones
from grey than from the dark mean. On ``relu3`` of the demo's three CNNs the optimised
image beats the unit's top dataset image for 89 to 97 % of the units from grey, 98 to
100 % from the mean and 97 % from either start as chosen; against torch-lucent (grey)
at the same steps, it reaches at least its activation for 42 of 48 units from the mean
and for all 48 as chosen (``bench/bench_feature_vis.py``). The image reaches the model
as the data do, ``z = (x - mean) / std`` per channel, so it is always an image the data
could hold.

**Transformation robustness.** At every step the image is transformed at random before
the model sees it. Lucid's standard transforms, in order: pad by 12 grey pixels, jitter
by up to 8 pixels, scale by one of ``1 + (i - 5) / 50`` (i = 0..10), rotate by one of
-10..10 degrees (0 drawn six times as often as the others), jitter by up to 4 pixels.
The pixel amounts are for Lucid's 128-pixel images; here they are scaled by
``min(H, W) / 128``, so a 28x28 MNIST image gets a pad of 3 pixels and jitters spanning
1.75 and 0.875 pixels, centred on zero (scale and rotation need no scaling). The chain
is one affine map per image (``affine_grid`` and a bilinear ``grid_sample`` onto the
canvas, the background wherever the image is not). Three departures from torch-lucent:

- the pad is filled with the data's mean pixel (grey with ``background = "grey"``);
- the pad (twice the amount) lies to the right of and below the image, which keeps its
  top-left corner on the canvas's, and scaling and rotation turn about the image's
  centre. A pad on every side that is not a multiple of a layer's stride shifts the
  image against the layer's sampling grid by the same amount at every step; the
  patterns the ascent finds are tuned to that phase of the grid and lose much of their
  activation at the phase the image is finally measured at (without transforms). On
  ``relu3`` (stride 4) of the demo's three CNNs, 83 to 89 % of the units' images beat
  their top dataset image with a 3-pixel pad on every side, 97 % with the pad after the
  image;
- jitters are continuous and centred on zero (torch-lucent moves by 0..d-1 whole pixels,
  always the same way); a scaled-up image is cropped to the canvas instead of growing it.

**Redirected ReLU gradients** (Lucid's ``relu_gradient_override``, which torch-lucent
lacks). For the first 16 steps, every ``nn.ReLU`` passes, for an image to which its
ordinary gradient gives nothing, the incoming gradient except where it would push a
negative input lower; a unit dead on its start can so still be reached. With the default
start it changes nothing on the demo CNNs' ``relu3``; from grey, 84 to 95 % of the
units beat their top dataset image without it, 89 to 97 % with it.

**Objectives** (``objective``), for the layer's activations ``a`` of shape
``(channel, *positions)``::

    channel     h(a) = mean_p a[u, p]                (default)
    neuron      h(a) = a[u, centre]                  (Lucid's centre position)
    direction   h(a) = mean_p <v, a[:, p]>           (Lucid's direction, a dot product)

**Diversity** (Lucid's ``diversity`` objective). With ``B = batch`` images ``i`` per unit
and their Gram matrices ``G_i = A_i A_i^T`` over positions (``A_i``: channels x positions),
each divided by its Frobenius norm, every unit's loss is::

    L = -(1 / B) sum_i h(a_i)  +  diversity * (1 / B) sum_{i != j} <G_i, G_j>

minimised by Adam. Lucid takes 512 steps at a learning rate of 0.05; the defaults here
are 256 steps at 0.1, the same distance in half the time (Adam moves a parameter by about
the learning rate per step).

**Batched over units.** Adam's update is elementwise and every image's loss reads only
its own unit, so images of many units optimised in one tensor are exactly those
optimised one by one: one forward and backward pass per step serves ``units_per_pass``
units, the forward pass stops at the layer read, and no gradient of the model's weights
is computed. Every image draws its start and its transforms from a generator of its own,
seeded by ``(seed, layer, unit, image)``: an image does not depend on which other units
are optimised with it, and every model's image of a unit starts from the same noise and
sees the same transforms.

**Measured.** ``activation_reached`` is the objective of the final image as its PNG
stores it (8 bits), without transforms; ``top_dataset_activation`` the largest value of
the same objective over the dataset's images: over each unit's recorded top-k images,
measured again, when the run recorded top-k (``objective = "channel"``), else over every
image in one pass over the data.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar
from urllib.parse import quote

import attrs
import numpy as np
import torch
import xarray as xr
from torch import nn
from torch.nn import functional

from mergescope.activations import attach_recorders, check_single_calls, resolve_layers
from mergescope.components import Context
from mergescope.errors import ConfigError, ContractError, MergescopeError
from mergescope.hookspecs import hookimpl
from mergescope.loading import make_loader, to_device
from mergescope.report import Panel, file_list, html_table
from mergescope.validators import (
    Check,
    as_float,
    boolean,
    distinct,
    finite,
    float_list,
    int_range,
    list_of,
    non_negative,
    non_negative_int,
    one_of,
    optional,
    positive,
    positive_int,
)
from mergescope_plugins.topk import safe_name

__all__ = [
    "FeatureVis",
    "COLOUR_CORRELATION",
    "STANDARD_SCALES",
    "STANDARD_ANGLES",
    "spectrum_frequencies",
    "spectrum_scale",
    "fourier_image",
    "decorrelate_colour",
    "to_input",
    "transform_matrices",
    "apply_transforms",
    "standard_amounts",
    "objective_values",
    "all_objective_values",
    "gram_similarity",
    "redirected_relu_grad",
    "input_range",
    "register_visualizers",
]

OBJECTIVES = ("channel", "neuron", "direction")
PARAMETERISATIONS = ("fourier", "pixel")
INDEX_FILE = "feature-vis.nc"

#: Lucid's square root of the ImageNet colour covariance (rows: R, G, B).
COLOUR_CORRELATION = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float32)
#: Lucid's ``random_scale`` factors.
STANDARD_SCALES = tuple(1 + (i - 5) / 50 for i in range(11))
#: Lucid's ``random_rotate`` angles in degrees: -10..10, and 0 five more times.
STANDARD_ANGLES = tuple(range(-10, 11)) + (0,) * 5
# Lucid's pixel amounts (pad, first jitter, last jitter), for its 128-pixel images.
_PAD, _JITTER_FIRST, _JITTER_LAST, _LUCID_SIDE = 12, 8, 4, 128
_INIT_SD = 0.01  # standard deviation of the starting parameters (Lucid's)
_FOURIER_DIVISOR = 4.0  # Lucid's constant against saturation
_GREY = 0.5  # Lucid's start and pad value, in [0, 1]
_BACKGROUND_MIN = 0.01  # keeps the start's logit finite for data whose mean pixel is 0 or 1
_REDIRECTED_STEPS = 16  # Lucid redirects ReLU gradients for its first 16 steps
_RANGE_IMAGES = 2048  # images read to measure the data's value range
_MAX_PIXEL_BYTES = 16 * 2**20  # the images go into results.nc up to this size


# ----------------------------------------------------------------- parameterisation


def spectrum_frequencies(h: int, w: int) -> np.ndarray:
    """``|f|`` of every coefficient of a real 2-D FFT of an ``h`` x ``w`` image, ``(h, w // 2 + 1)``.

    In cycles per pixel, from numpy's ``fftfreq`` (rows) and ``rfftfreq`` (columns).
    """
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    return np.sqrt(fx * fx + fy * fy)


def spectrum_scale(h: int, w: int, decay_power: float = 1.0) -> np.ndarray:
    """Lucid's scale of every spectrum coefficient: ``1 / max(|f|, 1 / max(h, w)) ** decay_power``.

    The constant term gets the scale of the lowest non-zero frequency, so the image's mean
    brightness learns as fast as its coarsest pattern.
    """
    return 1.0 / np.maximum(spectrum_frequencies(h, w), 1.0 / max(h, w)) ** decay_power


def fourier_image(spectrum: torch.Tensor, scale: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The image of a scaled spectrum: ``irfft2(scale * spectrum, norm="ortho") / 4``.

    Parameters
    ----------
    spectrum
        Real and imaginary parts, ``(..., h, w // 2 + 1, 2)``.
    scale
        ``(h, w // 2 + 1)``, from :func:`spectrum_scale`.
    h, w
        The image's size.

    Returns
    -------
    torch.Tensor
        ``(..., h, w)``, before the sigmoid.
    """
    scaled = torch.view_as_complex((spectrum * scale[..., None]).contiguous())
    return torch.fft.irfftn(scaled, s=(h, w), dim=(-2, -1), norm="ortho") / _FOURIER_DIVISOR


def decorrelate_colour(image: torch.Tensor) -> torch.Tensor:
    """Map decorrelated colour channels to RGB: ``M y`` per pixel, ``image`` ``(n, 3, H, W)``.

    ``M`` is :data:`COLOUR_CORRELATION` with its columns divided by the largest column norm.
    """
    matrix = COLOUR_CORRELATION / np.max(np.linalg.norm(COLOUR_CORRELATION, axis=0))
    m = torch.as_tensor(matrix, dtype=image.dtype, device=image.device)
    return torch.einsum("ck,nkhw->nchw", m, image)


def to_input(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] as the model's input: ``(pixels - mean) / std`` per channel (``mean``, ``std``: ``(C,)``)."""
    return (pixels - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def input_range(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The ``mean`` and ``std`` that map pixels in [0, 1] to the value range of ``images`` ``(n, C, H, W)``.

    A dataset stored as ``(pixels - mean) / std`` with black and white pixels in every
    channel has ``min = -mean / std`` and ``max = (1 - mean) / std``; so
    ``std = 1 / (max - min)`` and ``mean = -min * std``, per channel.
    """
    low = images.amin(dim=(0, 2, 3)).double().cpu().numpy()
    high = images.amax(dim=(0, 2, 3)).double().cpu().numpy()
    std = 1.0 / (high - low)
    return -low * std, std


# ----------------------------------------------------------------------- transforms


def transform_matrices(
    shifts_first: torch.Tensor,
    scales: torch.Tensor,
    angles: torch.Tensor,
    shifts_last: torch.Tensor,
    image_size: tuple[int, int],
    canvas_size: tuple[int, int],
) -> torch.Tensor:
    """``affine_grid`` matrices of Lucid's chain jitter, scale, rotate, jitter, ``(n, 2, 3)``.

    The image sits in the canvas's top-left corner (the pad is on its right and below
    it). A point ``p`` of the image (pixels, from the image's centre ``c``) lands at
    ``c + R(angle) S(scale) (p + shift_first) + shift_last`` on the canvas: scaling and
    rotation turn about the image's centre. ``affine_grid`` wants the inverse, from the
    canvas's normalised coordinates to the image's.

    Parameters
    ----------
    shifts_first, shifts_last
        ``(n, 2)`` shifts ``(x, y)`` in pixels.
    scales
        ``(n,)`` scale factors.
    angles
        ``(n,)`` angles in degrees, counter-clockwise on screen.
    image_size, canvas_size
        ``(H, W)`` of the image and of the canvas.
    """
    radians = angles * (math.pi / 180)
    cos, sin = torch.cos(radians), torch.sin(radians)
    # y points down in pixel coordinates, so a counter-clockwise turn on screen is R(-angle).
    forward = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2) * scales[:, None, None]
    inverse = torch.linalg.inv(forward)
    (h, w), (ch, cw) = image_size, canvas_size
    to_image = torch.tensor([2.0 / w, 2.0 / h], dtype=scales.dtype)
    from_canvas = torch.tensor([cw / 2.0, ch / 2.0], dtype=scales.dtype)
    linear = to_image[None, :, None] * inverse * from_canvas[None, None, :]
    # The image's centre, from the canvas's centre (the image in the top-left corner).
    corner = torch.tensor([(w - cw) / 2.0, (h - ch) / 2.0], dtype=scales.dtype)
    offset = -(inverse @ (shifts_last + corner)[..., None])[..., 0] - shifts_first
    return torch.cat([linear, (to_image * offset)[..., None]], dim=-1)


def apply_transforms(
    pixels: torch.Tensor, matrices: torch.Tensor, canvas_size: tuple[int, int], background: torch.Tensor | float = 0.5
) -> torch.Tensor:
    """Draw every image of ``pixels`` ``(n, C, H, W)`` onto a canvas of ``background`` through its matrix (bilinear).

    ``background``: a value in [0, 1], or one per channel ``(C,)``.
    """
    grid = functional.affine_grid(matrices, [pixels.shape[0], pixels.shape[1], *canvas_size], align_corners=False)
    fill = torch.as_tensor(background, dtype=pixels.dtype, device=pixels.device).reshape(1, -1, 1, 1)
    # Sampling (pixels - background) with zeros outside puts the background wherever the image is not.
    moved = functional.grid_sample(pixels - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved + fill


def standard_amounts(image_size: tuple[int, int]) -> tuple[int, float, float]:
    """Lucid's pad and jitters (pixels at 128 pixels) scaled to ``image_size``: ``(pad, first, last)``."""
    factor = min(image_size) / _LUCID_SIDE
    return round(_PAD * factor), _JITTER_FIRST * factor, _JITTER_LAST * factor


# ----------------------------------------------------------------------- objectives


def objective_values(
    activations: torch.Tensor, units: torch.Tensor, objective: str, directions: torch.Tensor | None = None
) -> torch.Tensor:
    """Every image's objective, reading its own unit: ``(n,)``.

    Parameters
    ----------
    activations
        ``(n, channels, *positions)`` (no positions for a linear layer's output).
    units
        ``(n,)``: image ``i`` reads unit ``units[i]`` (for ``"direction"``, row ``units[i]``
        of ``directions``).
    objective
        ``"channel"`` (mean over positions), ``"neuron"`` (the centre position) or
        ``"direction"`` (mean over positions of the dot product with a direction).
    directions
        ``(d, channels)``, for ``"direction"``.
    """
    n, channels = activations.shape[:2]
    flat = activations.reshape(n, channels, -1)
    rows = torch.arange(n, device=activations.device)
    units = units.to(activations.device)
    if objective == "channel":
        return flat[rows, units].mean(dim=-1)
    if objective == "neuron":
        spatial = activations.shape[2:]
        centre = int(np.ravel_multi_index([s // 2 for s in spatial], spatial)) if spatial else 0
        return flat[rows, units, centre]
    if objective == "direction":
        assert directions is not None
        vectors = directions.to(activations.device, activations.dtype)[units]  # (n, channels)
        return torch.einsum("nc,ncp->np", vectors, flat).mean(dim=-1)
    raise ValueError(f"unknown objective {objective!r}; accepted: {', '.join(OBJECTIVES)}")


def all_objective_values(activations: torch.Tensor, objective: str, directions: torch.Tensor | None) -> torch.Tensor:
    """The objective of every unit (or direction) for every image: ``(n, units)``."""
    n, channels = activations.shape[:2]
    flat = activations.reshape(n, channels, -1)
    if objective == "channel":
        return flat.mean(dim=-1)
    if objective == "neuron":
        spatial = activations.shape[2:]
        centre = int(np.ravel_multi_index([s // 2 for s in spatial], spatial)) if spatial else 0
        return flat[:, :, centre]
    assert directions is not None
    return torch.einsum("dc,ncp->ndp", directions.to(flat.device, flat.dtype), flat).mean(dim=-1)


def gram_similarity(activations: torch.Tensor, batch: int) -> torch.Tensor:
    """Lucid's diversity term per unit: ``(1 / B) sum_{i != j} <G_i, G_j>`` over each run of ``batch`` images.

    ``activations`` is ``(units * batch, channels, *positions)``, the images of one unit
    consecutive; ``G_i`` is image ``i``'s Gram matrix over positions, divided by its
    Frobenius norm. Returns ``(units,)``.
    """
    n, channels = activations.shape[:2]
    flat = activations.reshape(n, channels, -1)
    grams = functional.normalize((flat @ flat.transpose(1, 2)).reshape(n // batch, batch, -1), dim=-1)
    similarity = grams @ grams.transpose(1, 2)  # (units, batch, batch)
    off_diagonal = similarity.sum(dim=(1, 2)) - similarity.diagonal(dim1=1, dim2=2).sum(dim=-1)
    return off_diagonal / batch


def redirected_relu_grad(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Lucid's redirected ReLU gradient: the ReLU's input gradient, or, for an image it gives none, a redirected one.

    ``grad`` is the loss's gradient at the ReLU's output, ``x`` its input, both
    ``(n, ...)``. The ReLU passes ``grad`` where ``x > 0``. For an image ``i`` whose
    ReLU gradient is zero everywhere (the unit is dead on it, and plain gradient descent
    would never revive it), every entry passes instead, except where ``x < 0`` and the
    step would push ``x`` lower still (``grad > 0``, the loss being minimised).
    """
    relu_grad = torch.where(x > 0, grad, torch.zeros_like(grad))
    redirected = torch.where((x < 0) & (grad > 0), torch.zeros_like(grad), grad)
    passes = relu_grad.reshape(len(x), -1).norm(dim=1) > 0
    return torch.where(passes.view(-1, *([1] * (x.ndim - 1))), relu_grad, redirected)


class _RedirectedReLU(torch.autograd.Function):
    """``relu(x)`` whose backward pass is :func:`redirected_relu_grad`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return redirected_relu_grad(x, grad)


class _Redirect:
    """While :attr:`on`, every ``nn.ReLU`` of ``model`` computes its output through :class:`_RedirectedReLU`.

    The ReLUs are made out-of-place meanwhile, so their input is still there to redirect.
    Made before the capture's hooks, so a captured ReLU hands on the redirected output.
    """

    def __init__(self, model: nn.Module) -> None:
        self.on = False
        self.relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
        self.inplace = [m.inplace for m in self.relus]
        for module in self.relus:
            module.inplace = False
        self.handles = [m.register_forward_hook(self._hook) for m in self.relus]

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        return _RedirectedReLU.apply(args[0]) if self.on and torch.is_grad_enabled() else None

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        for module, inplace in zip(self.relus, self.inplace):
            module.inplace = inplace


# ------------------------------------------------------------------ forward passes


class _Enough(Exception):
    """Raised by a hook once every wanted layer has run: the rest of the network is not needed."""


class _Capture:
    """Hooks on ``layers`` of ``model`` that keep their outputs and stop the pass after the last one."""

    def __init__(self, model: nn.Module, layers: Sequence[str], model_name: str) -> None:
        self.model, self.name = model, model_name
        self.wanted = list(layers)
        self.acts: dict[str, torch.Tensor] = {}
        self.handles = attach_recorders(model, self.wanted, self._sink, model_name)

    def _sink(self, layer: str, tensor: torch.Tensor) -> None:
        self.acts[layer] = tensor
        if len(self.acts) == len(self.wanted):
            raise _Enough

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.acts = {}
        with contextlib.suppress(_Enough):
            self.model(x)
        missing = [layer for layer in self.wanted if layer not in self.acts]
        if missing:
            raise ContractError(f"layer {missing[0]!r} of model {self.name!r} did not run in a forward pass")
        return self.acts

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _image_seed(seed: int, layer: str, unit: int, image: int) -> int:
    """A generator seed of its own for every (seed, layer, unit, image)."""
    digest = hashlib.sha256(f"feature-vis/{seed}/{layer}/{unit}/{image}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@attrs.frozen
class _Setup:
    """What every chunk of one model and layer shares."""

    shape: tuple[int, ...]  # (C, H, W)
    mean: torch.Tensor
    std: torch.Tensor
    directions: torch.Tensor | None
    scale: torch.Tensor  # the spectrum's scale
    amounts: tuple[int, float, float]  # pad, first jitter, last jitter
    background: torch.Tensor  # (C,) the pad's value, in [0, 1]
    starts: dict[str, torch.Tensor]  # (C,) the plain fields an image may start from, by name

    @property
    def canvas(self) -> tuple[int, int]:
        """The image and the pad (Lucid's on each side, here both after the image)."""
        pad = self.amounts[0]
        return self.shape[1] + 2 * pad, self.shape[2] + 2 * pad


# ------------------------------------------------------------------------- options


def _directions(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    vector = Check(
        lambda v: isinstance(v, list) and len(v) > 0 and all(finite.holds(x) for x in v) and any(x != 0 for x in v),
        "a list of non-zero vectors",
        "non-zero vectors (non-empty lists of finite numbers, not all zero)",
    )
    list_of(vector)(instance, attribute, value)
    if len({len(v) for v in value}) > 1:
        raise ValueError(f"'{attribute.name}' must hold vectors of one length, got lengths {[len(v) for v in value]}")


def _float_vectors(value: Any) -> Any:
    if isinstance(value, list):
        return [[float(x) for x in v] if isinstance(v, list) and all(finite.holds(x) for x in v) else v for v in value]
    return value


@attrs.define
class FeatureVis:
    """Images optimised to excite each unit of the step's models (Lucid's feature visualisation).

    For every model of the step, every layer of the step and every chosen unit, ``batch``
    images are optimised by Adam through a Fourier (or pixel) parameterisation, under
    Lucid's random transforms, to maximise the unit's objective; the images stay in the
    data's value range. One PNG per image, ``<model>/<layer>/unit-<NNNN>[-<i>].png``
    under the step's figure folder, and ``feature-vis.nc`` indexing them with the
    objective reached, the unit's top dataset activation and the images themselves.

    Parameters
    ----------
    units
        Units to visualise (indices), the same for every layer; empty (default): every
        unit of each layer (see ``max_units``).
    max_units
        At most this many units per layer (the first ones); 0 (default): no cap.
    objective
        ``"channel"`` (mean over positions, default), ``"neuron"`` (the centre position)
        or ``"direction"`` (the mean dot product with each vector of ``directions``).
    directions
        For ``objective = "direction"``: vectors over the layer's channels; the results'
        ``unit`` dim then numbers the directions.
    steps
        Adam steps (Lucid takes 512; see ``lr``).
    lr
        Adam's learning rate: twice Lucid's 0.05 for half its steps. Adam moves every
        parameter by about ``lr`` per step, so the images travel as far as Lucid's in half
        the time (on ``relu3`` of the demo's CNNs, 256 steps at 0.05 leave 89 to 95 % of
        the units beating their top dataset image, at 0.1 97 %).
    parameterisation
        ``"fourier"`` (default: scaled spectrum, colour decorrelated for three channels)
        or ``"pixel"`` (the sigmoid of free pixels).
    transforms
        Optimise under Lucid's random pad, jitter, scale, rotation and jitter, the pixel
        amounts scaled to the image size (default); ``false``: on the image as it is.
    diversity
        Weight of Lucid's diversity term between the ``batch`` images of a unit (0: none).
    batch
        Images per unit.
    seed
        Seeds every image's start and transforms.
    units_per_pass
        Units optimised together, one forward and backward pass per step for all of them.
    redirect_relu
        Lucid's ``relu_gradient_override`` (default): for the first 16 steps, every
        ``nn.ReLU`` of the model passes a redirected gradient for an image its ordinary
        gradient misses entirely, so a unit dead on the starting image can still be
        reached; ``false``: plain gradients throughout.
    mean, std
        The dataset's normalisation ``(pixels - mean) / std``, one value or one per
        channel. Unset (default): read from the data's value range (the ``mean`` and
        ``std`` that map pixel values 0 and 1 to its smallest and largest value per
        channel, over its first 2048 images), which holds for data normalised so with
        black and white pixels, as MNIST-5000's and ImageNet-normalised photos are.
    background
        Where the images start and what pads them: ``"auto"`` (default) starts each unit
        from a plain field of Lucid's grey or of the data's mean pixel value per channel,
        whichever the unit responds to more, and pads with the data's mean; ``"mean"``
        starts and pads with the data's mean; ``"grey"`` with Lucid's 0.5.
    tile
        Side of the saved PNGs in pixels: an image is enlarged by a whole factor
        (nearest neighbour) to about this size; never shrunk.
    """

    name: ClassVar[str] = "feature-vis"
    paper: ClassVar[str] = "Olah, Mordvintsev & Schubert 2017, Feature Visualization (Distill)"

    units: list[int] = attrs.field(factory=list, validator=[list_of(int_range(0)), distinct("unit")])
    max_units: int = attrs.field(default=0, validator=non_negative_int)
    objective: str = attrs.field(default="channel", validator=one_of(*OBJECTIVES))
    directions: list[list[float]] = attrs.field(factory=list, converter=_float_vectors, validator=_directions)
    steps: int = attrs.field(default=256, validator=positive_int)
    lr: float = attrs.field(default=0.1, converter=as_float, validator=positive)
    parameterisation: str = attrs.field(default="fourier", validator=one_of(*PARAMETERISATIONS))
    transforms: bool = attrs.field(default=True, validator=boolean)
    diversity: float = attrs.field(default=0.0, converter=as_float, validator=non_negative)
    batch: int = attrs.field(default=1, validator=positive_int)
    seed: int = attrs.field(default=0, validator=int_range(0))
    units_per_pass: int = attrs.field(default=64, validator=positive_int)
    redirect_relu: bool = attrs.field(default=True, validator=boolean)
    background: str = attrs.field(default="auto", validator=one_of("auto", "mean", "grey"))
    mean: list[float] | None = attrs.field(default=None, converter=float_list, validator=optional(list_of(finite)))
    std: list[float] | None = attrs.field(default=None, converter=float_list, validator=optional(list_of(positive)))
    tile: int = attrs.field(default=112, validator=positive_int)

    def __attrs_post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            given, missing = ("mean", "std") if self.mean is not None else ("std", "mean")
            raise ConfigError(
                f"{given!r} is set but {missing!r} is not; give both (the dataset's normalisation) or neither "
                "(read from the data's value range)",
                where=f"key '{missing}'",
            )
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ConfigError(
                f"'mean' has {len(self.mean)} values but 'std' has {len(self.std)}; give one per channel or one each",
                where="key 'std'",
            )
        if self.objective == "direction" and not self.directions:
            raise ConfigError(
                "objective = 'direction' needs 'directions': a list of vectors over the layer's channels",
                where="key 'directions'",
            )
        if self.objective != "direction" and self.directions:
            raise ConfigError(
                f"'directions' are only read with objective = 'direction', not {self.objective!r}",
                where="key 'directions'",
            )
        if self.objective == "direction" and self.units:
            raise ConfigError(
                "'units' picks channels; with objective = 'direction' every vector of 'directions' is visualised",
                where="key 'units'",
            )
        if self.diversity > 0 and self.batch < 2:
            raise ConfigError(
                f"diversity = {self.diversity:g} compares the images of a unit with each other, but batch = "
                f"{self.batch}; set batch >= 2",
                where="key 'batch'",
            )

    # -- the step

    def render(self, results: xr.DataTree, out_dir: Path, context: Context | None = None) -> list[Path]:
        """Optimise the images of the step's models and layers; write the PNGs and ``feature-vis.nc``.

        The models come from ``context.modules`` (name -> module, the step's ``models``);
        without models or layers (outside a pipeline) nothing is drawn.

        Returns
        -------
        list of Path
            The PNGs and ``feature-vis.nc``.

        Raises
        ------
        ConfigError
            The context names models but gives no modules, a layer the models lack, a unit
            outside a layer, a direction of another length than a layer's channels, or no
            data to take the image shape and normalisation from.
        """
        if context is None or not context.models or not context.layers:
            return []
        modules = getattr(context, "modules", None)
        if not modules:
            raise ConfigError(
                f"feature-vis optimises inputs of the step's models ({', '.join(context.models)}), but this context "
                "holds no modules; name the models in the step's 'models' key, or call FeatureVis.visualize(models, "
                "context, out_dir) from Python",
                where="key 'models'",
            )
        ds = self.visualize({m: modules[m] for m in context.models if m in modules}, context, out_dir)
        index = Path(out_dir) / INDEX_FILE
        ds.to_netcdf(index)
        files = [Path(out_dir) / f for f in np.asarray(ds["image_file"].values).ravel() if str(f)]
        return [*files, index]

    def visualize(
        self, models: Mapping[str, nn.Module], context: Context, out_dir: str | Path | None = None
    ) -> xr.Dataset:
        """Optimise the images of ``models`` at ``context.layers``; write PNGs into ``out_dir`` when given.

        Parameters
        ----------
        models
            Name -> module, on the device they run on.
        context
            ``layers`` (the layers to visualise), ``data`` (the image shape, the value range
            and the top dataset activations), ``batch_size``, ``progress`` and, in a run,
            the recorded top-k.
        out_dir
            Where the PNGs go (``<model>/<layer>/unit-<NNNN>.png``); ``None``: none written,
            and ``image_file`` is empty.

        Returns
        -------
        xarray.Dataset
            Dims ``model``, ``layer``, ``unit``, ``image`` (and ``step``, ``channel``, ``y``,
            ``x``): ``activation_reached``, ``activation_initial``, ``top_dataset_activation``,
            ``top_dataset_sample``, ``share_beating_dataset``, ``objective_curve``, ``start``,
            ``image_file``, ``pixels`` (when at most 16 MiB), ``input_mean``, ``input_std``,
            ``units_in_layer``, ``top_dataset_source``. NaN (or ``""``, -1) where a layer
            has no such unit.
        """
        if not models:
            raise ConfigError("feature-vis needs at least one model", where="key 'models'")
        if context.data is None:
            raise ConfigError(
                "feature-vis needs the pipeline's [data]: the image shape, the value range of the model's input and "
                "the top dataset activations come from it",
                where="key 'data'",
            )
        if len(context.data) == 0:
            raise ConfigError(f"the data {context.data.name!r} is empty", where="key 'data'")
        names = list(models)
        shape = tuple(int(s) for s in context.data.input_shape)
        if len(shape) != 3:
            raise ConfigError(
                f"feature-vis optimises images (C, H, W); the data's items are {shape}", where="key 'data'"
            )
        mean, std = self._normalisation(context, shape[0])
        layers, sizes = self._layers(models, context.layers, shape)
        unit_coord = self._unit_coord(layers, sizes)
        directions = self._direction_tensor(layers, sizes)

        n_models, n_layers, n_units = len(names), len(layers), len(unit_coord)
        shape4 = (n_models, n_layers, n_units, self.batch)
        reached = np.full(shape4, np.nan)
        initial = np.full(shape4, np.nan)
        pixels = np.zeros((*shape4, *shape), dtype=np.uint8)
        done = np.zeros(shape4, dtype=bool)
        starts = np.full(shape4[:3], "", dtype=object)
        curve = np.full((n_models, n_layers, self.steps), np.nan)
        for m, name in enumerate(names):
            model = models[name]
            for li, layer in enumerate(layers):
                chosen = self._chosen_units(sizes[name][layer], layer)
                if not len(chosen):
                    continue
                columns = np.searchsorted(unit_coord, chosen)
                result = self._optimise(model, name, layer, chosen, shape, mean, std, directions, context)
                reached[m, li, columns] = result["reached"]
                initial[m, li, columns] = result["initial"]
                pixels[m, li, columns] = result["pixels"]
                starts[m, li, columns] = result["start"]
                done[m, li, columns] = True
                curve[m, li] = result["curve"]
        top, top_sample, source = self._top_dataset(models, layers, unit_coord, done, directions, context)
        files = self._write_images(pixels, done, names, layers, unit_coord, out_dir) if out_dir is not None else None
        arrays = {
            "done": done,
            "reached": reached,
            "initial": initial,
            "pixels": pixels,
            "curve": curve,
            "top": top,
            "sample": top_sample,
            "source": source,
            "start": starts,
        }
        return self._dataset(names, layers, unit_coord, sizes, arrays, files, mean, std)

    # -- what to optimise

    def _normalisation(self, context: Context, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean is not None and self.std is not None:
            mean, std = np.asarray(self.mean), np.asarray(self.std)
            if len(mean) not in (1, channels):
                raise ConfigError(
                    f"'mean' has {len(mean)} values for images of {channels} channels; give one or {channels}",
                    where="key 'mean'",
                )
            mean, std = np.broadcast_to(mean, (channels,)), np.broadcast_to(std, (channels,))
        else:
            assert context.data is not None
            seen = []
            loader = make_loader(context.data, min(context.batch_size, _RANGE_IMAGES), workers=0)
            count = 0
            for images, _ in loader:
                seen.append(images)
                count += len(images)
                if count >= _RANGE_IMAGES:
                    break
            mean, std = input_range(torch.cat(seen)[:_RANGE_IMAGES])
            if not np.all(np.isfinite(std)) or np.any(std <= 0):
                raise ConfigError(
                    f"the data {context.data.name!r} has a channel whose images are all one value, so its "
                    "normalisation cannot be read from its range; give 'mean' and 'std'",
                    where="key 'mean'",
                )
        return torch.as_tensor(np.array(mean), dtype=torch.float32), torch.as_tensor(np.array(std), dtype=torch.float32)

    def _layers(
        self, models: Mapping[str, nn.Module], selectors: Sequence[str], shape: tuple[int, ...]
    ) -> tuple[list[str], dict[str, dict[str, int]]]:
        """The layer names (resolved on the first model) and every model's unit count per layer."""
        first = next(iter(models))
        layers = list(resolve_layers(models[first], list(selectors), first))
        sizes: dict[str, dict[str, int]] = {}
        for name, model in models.items():
            device = _device_of(model)
            probe = torch.zeros((1, *shape), device=device)
            check_single_calls(model, layers, name, probe)
            capture = _Capture(model, layers, name)
            try:
                with torch.no_grad(), _evaluating(model):
                    acts = capture(probe)
            finally:
                capture.close()
            for layer, tensor in acts.items():
                if tensor.ndim < 2:
                    raise ConfigError(
                        f"layer {layer!r} of model {name!r} gives activations of shape {tuple(tensor.shape)}; "
                        "feature-vis reads (batch, units, ...)",
                        where="key 'layers'",
                    )
            sizes[name] = {layer: int(acts[layer].shape[1]) for layer in layers}
        return layers, sizes

    def _chosen_units(self, count: int, layer: str) -> np.ndarray:
        if self.objective == "direction":
            return np.arange(len(self.directions))
        units = np.asarray(self.units if self.units else range(count), dtype=np.int64)
        outside = units[units >= count]
        if outside.size:
            raise ConfigError(
                f"unit {int(outside[0])} is outside layer {layer!r}, which has {count} units (0..{count - 1})",
                where="key 'units'",
            )
        return units[: self.max_units] if self.max_units else units

    def _unit_coord(self, layers: list[str], sizes: dict[str, dict[str, int]]) -> np.ndarray:
        chosen = [self._chosen_units(per[layer], layer) for per in sizes.values() for layer in layers]
        return np.unique(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)

    def _direction_tensor(self, layers: list[str], sizes: dict[str, dict[str, int]]) -> torch.Tensor | None:
        if self.objective != "direction":
            return None
        length = len(self.directions[0])
        for name, per in sizes.items():
            for layer in layers:
                if per[layer] != length:
                    raise ConfigError(
                        f"the directions have {length} entries but layer {layer!r} of model {name!r} has "
                        f"{per[layer]} channels; give vectors over that layer's channels",
                        where="key 'directions'",
                    )
        return torch.tensor(self.directions, dtype=torch.float32)

    # -- the optimisation

    def _optimise(
        self,
        model: nn.Module,
        name: str,
        layer: str,
        units: np.ndarray,
        shape: tuple[int, ...],
        mean: torch.Tensor,
        std: torch.Tensor,
        directions: torch.Tensor | None,
        context: Context,
    ) -> dict[str, np.ndarray]:
        """Optimise ``batch`` images for each of ``units`` at ``layer``, ``units_per_pass`` units at a time."""
        device = _device_of(model)
        data_mean = mean.clamp(_BACKGROUND_MIN, 1 - _BACKGROUND_MIN)
        grey = torch.full_like(mean, _GREY)
        background = grey if self.background == "grey" else data_mean
        setup = _Setup(
            shape=shape,
            mean=mean.to(device),
            std=std.to(device),
            directions=directions.to(device) if directions is not None else None,
            scale=torch.as_tensor(spectrum_scale(shape[1], shape[2]), dtype=torch.float32, device=device),
            amounts=standard_amounts(shape[1:]),
            background=background.to(device),
            starts={"grey": grey.to(device), "mean": data_mean.to(device)},
        )
        b = self.batch
        out = {
            "reached": np.zeros((len(units), b)),
            "initial": np.zeros((len(units), b)),
            "pixels": np.zeros((len(units), b, *shape), dtype=np.uint8),
            "start": np.full(len(units), "", dtype=object),
        }
        curve_sum = np.zeros(self.steps)
        redirect = _Redirect(model) if self.redirect_relu else None
        capture = _Capture(model, [layer], name)
        step = self.units_per_pass
        chunks = [units[i : i + step] for i in range(0, len(units), step)]
        try:
            with _evaluating(model):
                for c, chunk in enumerate(chunks):
                    desc = f"feature-vis {name} {layer}" + (f" ({c + 1}/{len(chunks)})" if len(chunks) > 1 else "")
                    found = self._optimise_chunk(capture, redirect, layer, chunk, setup, device, desc, context)
                    rows = slice(c * step, c * step + len(chunk))
                    for key in ("reached", "initial", "pixels", "start"):
                        out[key][rows] = found[key]
                    curve_sum += found["curve"]
        finally:
            capture.close()
            if redirect is not None:
                redirect.close()
        out["curve"] = curve_sum / (len(units) * b)
        return out

    def _image(self, param: torch.Tensor, setup: _Setup, offset: torch.Tensor) -> torch.Tensor:
        """The images of the parameters, in [0, 1]; ``offset`` ``(n, C)`` is the logit of each one's start."""
        offset = offset[:, :, None, None]
        if self.parameterisation == "pixel":
            return torch.sigmoid(param + offset)
        channels, h, w = setup.shape
        y = fourier_image(param, setup.scale, h, w)
        return torch.sigmoid((decorrelate_colour(y) if channels == 3 else y) + offset)

    def _optimise_chunk(
        self,
        capture: _Capture,
        redirect: _Redirect | None,
        layer: str,
        chunk: np.ndarray,
        setup: _Setup,
        device: torch.device,
        desc: str,
        context: Context,
    ) -> dict[str, np.ndarray]:
        """One tensor of images for the units of ``chunk``, optimised together: one pass per step for all."""
        n, b = len(chunk), self.batch
        start, draws = self._draws(layer, chunk, setup.shape, setup.amounts[1:])
        param = start.to(device).requires_grad_(True)
        which = torch.as_tensor(np.repeat(chunk, b), device=device)

        def measure(pixels: torch.Tensor) -> np.ndarray:
            """The objective without transforms, on the 8-bit image."""
            with torch.no_grad():
                acts = capture(to_input(_quantised(pixels), setup.mean, setup.std))[layer]
                return objective_values(acts, which, self.objective, setup.directions).view(n, b).cpu().numpy()

        start_names, offset = self._starts(measure, setup, n)
        initial = measure(self._image(param.detach(), setup, offset))
        # Adam is elementwise: images optimised in one tensor move as they would alone.
        optimiser = torch.optim.Adam([param], lr=self.lr)
        canvas = setup.canvas
        matrices = _matrices(draws, setup.shape[1:], canvas).to(device) if self.transforms else None
        curve = np.zeros(self.steps)
        for step in context.progress(range(self.steps), desc=desc, total=self.steps):
            if redirect is not None:
                redirect.on = step < _REDIRECTED_STEPS
            x = self._image(param, setup, offset)
            if matrices is not None:
                x = apply_transforms(x, matrices[:, step], canvas, setup.background)
            acts = capture(to_input(x, setup.mean, setup.std))[layer]
            values = objective_values(acts, which, self.objective, setup.directions)
            loss = -values.view(n, b).mean(dim=1).sum()
            if self.diversity > 0:
                loss = loss + self.diversity * gram_similarity(acts, b).sum()
            # Only the image's gradient: the model's parameters get none.
            (grad,) = torch.autograd.grad(loss, [param])
            param.grad = grad
            optimiser.step()
            curve[step] = float(values.detach().sum())
        if redirect is not None:
            redirect.on = False
        final = self._image(param.detach(), setup, offset)
        pixels = _to_uint8(final).view(n, b, *setup.shape).cpu().numpy()
        return {"initial": initial, "reached": measure(final), "pixels": pixels, "curve": curve, "start": start_names}

    def _starts(self, measure: Any, setup: _Setup, n: int) -> tuple[np.ndarray, torch.Tensor]:
        """Each unit's start and the logit of it for each of its images, ``(n * batch, C)``.

        With ``background = "auto"``, the plain field (grey, or the data's mean) on which the
        unit's objective is larger; grey, Lucid's, on a tie (a unit dead on both).
        """
        if self.background == "auto":
            h, w = setup.shape[1:]
            fields = {k: v.view(1, -1, 1, 1).expand(n * self.batch, -1, h, w) for k, v in setup.starts.items()}
            mean_wins = measure(fields["mean"])[:, 0] > measure(fields["grey"])[:, 0]
            names = np.where(mean_wins, "mean", "grey").astype(object)
        else:
            names = np.full(n, self.background, dtype=object)
        chosen = torch.stack([setup.starts[str(k)] for k in names])  # (n, C)
        return names, torch.logit(chosen).repeat_interleave(self.batch, dim=0)

    def _draws(
        self, layer: str, units: np.ndarray, shape: tuple[int, ...], jitters: tuple[float, float]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every image's starting parameters and its transforms at every step, from its own generator."""
        channels, h, w = shape
        size = (channels, h, w // 2 + 1, 2) if self.parameterisation == "fourier" else (channels, h, w)
        starts, draws = [], {"first": [], "scale": [], "angle": [], "last": []}
        scales, angles = torch.tensor(STANDARD_SCALES), torch.tensor(STANDARD_ANGLES, dtype=torch.float32)
        for unit in units:
            for i in range(self.batch):
                g = torch.Generator().manual_seed(_image_seed(self.seed, layer, int(unit), i))
                starts.append(torch.randn(size, generator=g) * _INIT_SD)
                if self.transforms:
                    draws["first"].append((torch.rand((self.steps, 2), generator=g) - 0.5) * jitters[0])
                    draws["scale"].append(scales[torch.randint(len(scales), (self.steps,), generator=g)])
                    draws["angle"].append(angles[torch.randint(len(angles), (self.steps,), generator=g)])
                    draws["last"].append((torch.rand((self.steps, 2), generator=g) - 0.5) * jitters[1])
        return torch.stack(starts), {k: torch.stack(v) for k, v in draws.items() if v}

    # -- the dataset's best

    def _top_dataset(
        self,
        models: Mapping[str, nn.Module],
        layers: list[str],
        unit_coord: np.ndarray,
        done: np.ndarray,
        directions: torch.Tensor | None,
        context: Context,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every unit's largest objective over the data, its sample id and where it came from.

        With ``objective = "channel"`` and a recorded top-k of the model at the layer, the
        recorded top images of each unit are measured again with this objective and the
        largest kept ("recording"); otherwise one pass over the data measures every image
        ("data"), all models and layers at once.
        """
        names = list(models)
        top = np.full(done.shape[:3], np.nan)
        sample = np.full(done.shape[:3], -1, dtype=np.int64)
        source = np.full(done.shape[:2], "", dtype=object)
        pending: dict[str, list[int]] = {}
        for m, name in enumerate(names):
            for li, layer in enumerate(layers):
                chosen = done[m, li, :, 0]
                if not chosen.any():
                    continue
                recorded = None
                if self.objective == "channel":
                    recorded = _from_recording(models[name], name, layer, unit_coord[chosen], context)
                if recorded is None:
                    pending.setdefault(name, []).append(li)
                    continue
                top[m, li, chosen], sample[m, li, chosen] = recorded
                source[m, li] = "recording"
        if pending:
            found = _data_pass(
                {n: models[n] for n in pending},
                {n: [layers[i] for i in pending[n]] for n in pending},
                self.objective,
                directions,
                context,
            )
            for name, per_layer in found.items():
                m = names.index(name)
                for layer, (values, ids) in per_layer.items():
                    li = layers.index(layer)
                    chosen = done[m, li, :, 0]
                    top[m, li, chosen] = values[unit_coord[chosen]]
                    sample[m, li, chosen] = ids[unit_coord[chosen]]
                    source[m, li] = "data"
        return top, sample, source

    # -- output

    def _write_images(
        self,
        pixels: np.ndarray,
        done: np.ndarray,
        names: list[str],
        layers: list[str],
        unit_coord: np.ndarray,
        out_dir: str | Path,
    ) -> np.ndarray:
        """One PNG per image; their paths relative to ``out_dir``, ``""`` where none."""
        out_dir = Path(out_dir)
        files = np.full(done.shape, "", dtype=object)
        model_folders = _unique_names(names)
        layer_folders = _unique_names(layers)
        for (m, li, u, i), _ in np.ndenumerate(done):
            if not done[m, li, u, i]:
                continue
            folder = out_dir / model_folders[m] / layer_folders[li]
            folder.mkdir(parents=True, exist_ok=True)
            suffix = f"-{i}" if self.batch > 1 else ""
            path = folder / f"unit-{int(unit_coord[u]):04d}{suffix}.png"
            _save_png(pixels[m, li, u, i], path, self.tile)
            files[m, li, u, i] = path.relative_to(out_dir).as_posix()
        return files

    def _dataset(
        self,
        names: list[str],
        layers: list[str],
        unit_coord: np.ndarray,
        sizes: dict[str, dict[str, int]],
        arrays: dict[str, np.ndarray],
        files: np.ndarray | None,
        mean: torch.Tensor,
        std: torch.Tensor,
    ) -> xr.Dataset:
        """The labelled results (see :meth:`visualize`)."""
        done, reached, top = arrays["done"], arrays["reached"], arrays["top"]
        best = np.where(done, reached, -np.inf).max(axis=-1)  # (model, layer, unit): the unit's best image
        beats = np.where(done[..., 0], best > top, False).sum(axis=-1)
        counted = done[..., 0].sum(axis=-1)
        share = np.divide(beats, counted, out=np.full(counted.shape, np.nan), where=counted > 0)
        key4, key3, key2 = ("model", "layer", "unit", "image"), ("model", "layer", "unit"), ("model", "layer")
        ds = xr.Dataset(
            {
                "activation_reached": (key4, reached),
                "activation_initial": (key4, arrays["initial"]),
                "top_dataset_activation": (key3, top),
                "top_dataset_sample": (key3, arrays["sample"]),
                "top_dataset_source": (key2, np.asarray(arrays["source"], dtype=str)),
                "start": (key3, np.asarray(arrays["start"], dtype=str)),
                "share_beating_dataset": (key2, share),
                "objective_curve": (("model", "layer", "step"), arrays["curve"]),
                "units_in_layer": (key2, np.array([[sizes[n][layer] for layer in layers] for n in names])),
                "input_mean": ("channel", mean.double().numpy()),
                "input_std": ("channel", std.double().numpy()),
            },
            coords={
                "model": np.asarray(names, dtype=str),
                "layer": np.asarray(layers, dtype=str),
                "unit": unit_coord.astype(np.int64),
                "image": np.arange(self.batch),
                "step": np.arange(1, self.steps + 1),
                "channel": np.arange(len(mean)),
            },
        )
        if files is not None:
            ds["image_file"] = (key4, np.asarray(files, dtype=str))
        if arrays["pixels"].nbytes <= _MAX_PIXEL_BYTES:
            ds["pixels"] = ((*key4, "channel", "y", "x"), arrays["pixels"])
        return ds

    # -- summaries

    def describe(self, result: xr.Dataset) -> str:
        """How many units were visualised, and for what share the image beat the data's best."""
        if "activation_reached" not in result:
            return "no feature visualisations (no models or layers)"
        share = result["share_beating_dataset"]
        done = np.isfinite(np.asarray(result["activation_reached"].values)).any(axis=-1)
        units, layers, models = int(done.sum()), result.sizes["layer"], result.sizes["model"]
        per_layer = ", ".join(
            f"{layer} {100 * float(share.sel(layer=layer).mean()):.0f}%" for layer in result["layer"].values
        )
        overall = float(np.sum(np.nan_to_num(share.values) * done.sum(axis=-1)) / max(units, 1))
        return (
            f"{units} units visualised over {layers} layers of {models} models; the optimised image beats the top "
            f"dataset image for {100 * overall:.0f}% of them ({per_layer})"
        )

    def report_panel(self, node: xr.Dataset, files: list[Path], run_dir: Path) -> Panel | str:
        """The step's panel: a table per model and layer, then each layer's images with their unit and values."""
        if "activation_reached" not in node or "image_file" not in node:
            return file_list(files, run_dir)
        index = next((f for f in files if Path(f).name == INDEX_FILE), None)
        base = PurePosixPath(Path(index).parent.as_posix()) if index is not None else PurePosixPath(".")
        models = [str(m) for m in node["model"].values]
        layers = [str(layer) for layer in node["layer"].values]
        units = np.asarray(node["unit"].values)
        reached = np.asarray(node["activation_reached"].values)
        top = np.asarray(node["top_dataset_activation"].values)
        share = np.asarray(node["share_beating_dataset"].values)
        image_files = np.asarray(node["image_file"].values).astype(str)
        rows, sections = [], []
        for m, model in enumerate(models):
            for li, layer in enumerate(layers):
                chosen = np.isfinite(reached[m, li]).any(axis=-1)
                if not chosen.any():
                    continue
                best = np.nanmax(reached[m, li][chosen], axis=-1)
                rows.append(
                    [model, layer, int(chosen.sum()), share[m, li], np.median(best), np.nanmedian(top[m, li][chosen])]
                )
                figures = []
                for u in np.flatnonzero(chosen):
                    for i, file in enumerate(image_files[m, li, u]):
                        if not file:
                            continue
                        src = quote(os.path.normpath((base / file).as_posix()).replace(os.sep, "/"))
                        label = f"unit {int(units[u])}" + (f" #{i}" if image_files.shape[-1] > 1 else "")
                        figures.append(
                            f'<figure><a href="{src}"><img src="{src}" alt="{html.escape(label)}" loading="lazy"></a>'
                            f"<figcaption>{html.escape(label)}<br>{reached[m, li, u, i]:.3g} "
                            f"(data {top[m, li, u]:.3g})</figcaption></figure>"
                        )
                title = f"{model}, {layer}: {int(chosen.sum())} units, {100 * share[m, li]:.0f}% beat the data"
                opened = " open" if not sections else ""
                sections.append(
                    f"<details{opened}><summary>{html.escape(title)}</summary>"
                    f'<div class="fv-grid">{"".join(figures)}</div></details>'
                )
        table = html_table(
            ["model", "layer", "units", "share beating the data", "median reached", "median top dataset"],
            rows,
            caption="Objective of the optimised image (no transforms) against the unit's top dataset image",
        )
        rest = [f for f in files if Path(f).suffix.lower() != ".png"]
        return Panel(table + "".join(sections) + file_list(rest, run_dir), css=_PANEL_CSS)


_PANEL_CSS = (
    ".fv-grid{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0}"
    ".fv-grid figure{margin:0;text-align:center;font-size:11px;line-height:1.2}"
    ".fv-grid img{width:84px;height:84px;image-rendering:pixelated;display:block}"
)


def _from_recording(
    model: nn.Module, name: str, layer: str, units: np.ndarray, context: Context
) -> tuple[np.ndarray, np.ndarray] | None:
    """The largest channel mean of each unit over its recorded top-k images, measured again; ``None`` without one."""
    try:
        recorded = context.topk(name, layer)
    except (KeyError, ValueError, MergescopeError):
        return None
    ids = np.asarray(recorded.sample_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] <= int(units.max()):
        return None
    candidates = ids[:, units]  # (k, units)
    valid = candidates >= 0
    if not valid.any(axis=0).all():
        return None
    unique = np.unique(candidates[valid])
    device = _device_of(model)
    capture = _Capture(model, [layer], name)
    values = []
    try:
        with torch.no_grad(), _evaluating(model):
            for start in range(0, len(unique), context.batch_size):
                images = context.images(unique[start : start + context.batch_size]).to(device)
                values.append(all_objective_values(capture(images)[layer], "channel", None).double().cpu().numpy())
    finally:
        capture.close()
    table = np.concatenate(values)  # (unique images, channels)
    rows = np.searchsorted(unique, np.where(valid, candidates, unique[0]))
    measured = np.where(valid, table[rows, units[None, :]], -np.inf)
    best = measured.argmax(axis=0)
    columns = np.arange(len(units))
    return measured[best, columns], candidates[best, columns]


def _data_pass(
    models: Mapping[str, nn.Module],
    layers: Mapping[str, list[str]],
    objective: str,
    directions: torch.Tensor | None,
    context: Context,
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """One pass over ``context.data``: every unit's largest objective and its sample id, per model and layer."""
    assert context.data is not None
    ids = np.asarray(context.data.sample_ids, dtype=np.int64)
    best: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {name: {} for name in models}
    captures = {name: _Capture(model, layers[name], name) for name, model in models.items()}
    loader = make_loader(context.data, context.batch_size)
    position = 0
    try:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for model in models.values():
                stack.enter_context(_evaluating(model))
            for images, _ in context.progress(loader, desc="feature-vis: top dataset activations", total=len(loader)):
                batch_ids = ids[position : position + len(images)]
                position += len(images)
                for name, model in models.items():
                    acts = captures[name](to_device(images, _device_of(model)))
                    for layer in layers[name]:
                        values = all_objective_values(acts[layer], objective, directions).double().cpu().numpy()
                        top = values.argmax(axis=0)
                        value, sample = values[top, np.arange(values.shape[1])], batch_ids[top]
                        if layer in best[name]:
                            old_value, old_sample = best[name][layer]
                            keep = old_value >= value  # ties: the earlier sample
                            value, sample = np.where(keep, old_value, value), np.where(keep, old_sample, sample)
                        best[name][layer] = (value, sample)
    finally:
        for capture in captures.values():
            capture.close()
    return best


# ------------------------------------------------------------------------- helpers


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


class _evaluating:
    """``model`` in evaluation mode for a while (BatchNorm on its running statistics), then as it was."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        for module, mode in self.modes:
            module.training = mode


def _quantised(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels as the 8 bits of a PNG hold them."""
    return torch.round(pixels.clamp(0, 1) * 255) / 255


def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    return torch.round(pixels.clamp(0, 1) * 255).to(torch.uint8)


def _matrices(draws: dict[str, torch.Tensor], image: tuple[int, int], canvas: tuple[int, int]) -> torch.Tensor:
    """``(n, steps, 2, 3)`` affine matrices of every image at every step."""
    n, steps = draws["scale"].shape
    flat = transform_matrices(
        draws["first"].reshape(-1, 2),
        draws["scale"].reshape(-1).float(),
        draws["angle"].reshape(-1),
        draws["last"].reshape(-1, 2),
        image,
        canvas,
    )
    return flat.reshape(n, steps, 2, 3)


def _unique_names(names: Sequence[str]) -> list[str]:
    """A safe folder name per name, none repeated."""
    taken: set[str] = set()
    out = []
    for name in names:
        base = candidate = safe_name(name)
        n = 2
        while candidate in taken:
            candidate, n = f"{base}-{n}", n + 1
        taken.add(candidate)
        out.append(candidate)
    return out


def _save_png(image: np.ndarray, path: Path, tile: int) -> None:
    """``image`` ``(C, H, W)`` uint8 as a PNG, enlarged by a whole factor to about ``tile`` pixels."""
    from PIL import Image

    channels, h, w = image.shape
    if channels == 3:
        picture = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), "RGB")
    else:  # grey; other channel counts are shown as their mean
        grey = image[0] if channels == 1 else np.rint(image.mean(axis=0)).astype(np.uint8)
        picture = Image.fromarray(np.ascontiguousarray(grey), "L")
    factor = max(1, round(tile / max(h, w)))
    if factor > 1:
        picture = picture.resize((w * factor, h * factor), Image.Resampling.NEAREST)
    picture.save(path, compress_level=1)


@hookimpl
def register_visualizers(register):
    """Register :class:`FeatureVis`."""
    register(FeatureVis)
