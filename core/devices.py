"""Where models run and at which precision: ``device`` and ``precision`` of a pipeline.

:func:`resolve_device` turns a device spec (``"auto"``, ``"cpu"``, ``"cuda"``,
``"cuda:N"``, ``"mps"``) into a :class:`torch.device` that exists on this machine, or
raises a :class:`~mergescope.errors.ConfigError` listing the devices that do.
:func:`autocast` is the mixed-precision context of forward passes: ``"fp32"`` runs as
written (no autocast), ``"bf16"`` and ``"fp16"`` run under :func:`torch.autocast`.
``"fp16"`` is refused on the CPU (a ``ConfigError``): CPU kernels in half precision are
slow and lose accuracy; ``"bf16"`` is the reduced precision the CPU supports.

Statistics never change precision: layer outputs are reduced on the device, cast to
float32 and accumulated in float64 on the host.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from .errors import ConfigError

__all__ = [
    "DEVICE_SPECS",
    "PRECISIONS",
    "autocast",
    "available_devices",
    "check_device_spec",
    "check_precision",
    "resolve_device",
]

#: The accepted forms of a device spec (``"cuda:N"`` with any index N).
DEVICE_SPECS = ("auto", "cpu", "cuda", "cuda:N", "mps")
#: The accepted precisions of forward passes.
PRECISIONS = ("fp32", "bf16", "fp16")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The devices of this machine: ``"cpu"``, then ``"cuda:0"``... and ``"mps"`` where they exist."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        devices.append("mps")
    return devices


def check_device_spec(spec: object, where: str | None = None) -> str:
    """``spec`` if it has one of the forms of :data:`DEVICE_SPECS` (whether or not it exists here)."""
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise ConfigError(f"device must be one of {', '.join(DEVICE_SPECS)}, got {spec!r}", where=where)
    return spec


def check_precision(precision: object, where: str | None = None) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}", where=where)
    return precision


def resolve_device(spec: str) -> torch.device:
    """The :class:`torch.device` of ``spec``: ``"auto"`` is CUDA if available, then MPS, then the CPU.

    Raises
    ------
    ConfigError
        ``spec`` has none of the forms of :data:`DEVICE_SPECS`, or names a device this
        machine does not have (the message lists those it has).
    """
    check_device_spec(spec)
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        exists = torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())
        if exists and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type == "mps":
        exists = _mps_available()
    else:
        exists = True
    if not exists:
        raise ConfigError(f"device {spec!r} is not available here; available: {', '.join(available_devices())}")
    return device


def autocast(device: torch.device | str, precision: str = "fp32") -> contextlib.AbstractContextManager[None]:
    """The mixed-precision context of forward passes on ``device`` at ``precision``.

    ``"fp32"`` changes nothing. ``"bf16"`` and ``"fp16"`` enter :func:`torch.autocast`
    for the device's type.

    Raises
    ------
    ConfigError
        An unknown precision, or ``"fp16"`` on the CPU (use ``"bf16"`` there).
    """
    check_precision(precision)
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("precision 'fp16' is not supported on the CPU; use 'bf16' (or 'fp32') there")
    return _autocast(device.type, _DTYPES[precision])


@contextlib.contextmanager
def _autocast(device_type: str, dtype: torch.dtype) -> Iterator[None]:
    with torch.autocast(device_type=device_type, dtype=dtype):
        yield
