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

A model whose own forward pass mixes devices (a tensor attribute that is not a
registered buffer stays behind when the model is moved; a device hard-coded in
``forward``) makes torch raise ``Expected all tensors to be on the same device``:
:func:`explain_device_mix` tells that apart from a component's mistake and says which
model, module and attributes it is, for the runner's error.
"""

from __future__ import annotations

import contextlib
import re
import traceback
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .errors import ConfigError

__all__ = [
    "DEVICE_SPECS",
    "MIXED_DEVICE_MESSAGES",
    "PRECISIONS",
    "autocast",
    "available_devices",
    "check_device_spec",
    "check_precision",
    "device_mix",
    "explain_device_mix",
    "float64_device",
    "place",
    "resolve_device",
    "stray_tensors",
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


def float64_device(device: torch.device | str) -> torch.device:
    """Where float64 arithmetic on tensors of ``device`` runs: there, or on the CPU for MPS (no float64)."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def place(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module`` moved to ``device`` (in place), in the memory layout its forward passes run fastest in there.

    On the CPU a network with 2-D convolutions is stored channels-last (NHWC): its
    convolutions then take oneDNN's fastest kernels, and the first one converts NCHW
    inputs itself. ``bench/bench_cpu_speed.py`` measures the gain and the difference
    from NCHW (float rounding, about 1e-6 relative); ``docs/performance.md`` records
    them. On other devices the layout is left as it is. Parameter values do not change,
    so fingerprints (:func:`mergescope.keys.state_digest`) do not either.
    """
    module.to(device)
    if torch.device(device).type == "cpu" and any(isinstance(m, nn.Conv2d) for m in module.modules()):
        module.to(memory_format=torch.channels_last)
    return module


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


# -- tensors on two devices --------------------------------------------------------------

#: What torch says when one operation meets tensors on two devices (CUDA, MPS, cuDNN's convolutions).
MIXED_DEVICE_MESSAGES = (
    "Expected all tensors to be on the same device",
    "should be the same or input should be a MKLDNN tensor",
    "indices should be either on cpu or on the same device",
    "Expected object of device type",
)
# Code of the toolkit: a component or the core, not a model's own forward pass.
_TOOLKIT_CODE = ("mergescope.", "mergescope_plugins.")


def device_mix(exc: BaseException) -> RuntimeError | None:
    """The error torch raised for an operation on tensors of two devices: ``exc`` or one it was raised from.

    Returns
    -------
    RuntimeError or None
        The first error in the chain of ``exc`` (itself, ``__cause__``, ``__context__``)
        whose message is one of :data:`MIXED_DEVICE_MESSAGES`; ``None`` when there is none.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RuntimeError) and any(m in str(current) for m in MIXED_DEVICE_MESSAGES):
            return current
        current = current.__cause__ or current.__context__
    return None


def stray_tensors(module: nn.Module, device: torch.device | str) -> dict[str, torch.device]:
    """Tensor attributes of ``module`` and its submodules that are not on ``device`` and that ``.to()`` does not move.

    A tensor kept as a plain attribute (``self.offset = torch.zeros(n)``) is neither a
    parameter nor a buffer, so moving the module leaves it where it was made.

    Returns
    -------
    dict
        Dotted name (``"block.offset"``) -> the device the tensor is on, in module order.
    """
    device = torch.device(device)
    found = {}
    for path, sub in module.named_modules():
        for attribute, value in vars(sub).items():
            tensors = value if isinstance(value, (list, tuple)) else [value]
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.device != device:
                    found[f"{path}.{attribute}" if path else attribute] = t.device
                    break
    return found


def _failing_module(error: BaseException, device: torch.device) -> nn.Module | None:
    """The module whose own ``forward`` (or other method) made ``error``, given inputs on ``device``.

    The innermost frame outside torch that runs a method of a module; ``None`` when the
    toolkit's own code comes first (a component's bug) or when that method was handed
    a tensor on another device (its caller's mistake, not the module's).
    """
    frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)]
    for frame in reversed(frames):
        module_name = str(frame.f_globals.get("__name__", ""))
        # Code of torch itself (and torch-function handlers) is never where a model goes wrong.
        if frame.f_code.co_name == "__torch_function__" or module_name == "torch" or module_name.startswith("torch."):
            continue
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module):
            code = frame.f_code
            names = code.co_varnames[1 : code.co_argcount + code.co_kwonlyargcount]
            arguments = [frame.f_locals.get(name) for name in names]
            tensors = [t for a in arguments for t in (a if isinstance(a, (list, tuple)) else [a])]
            if any(isinstance(t, torch.Tensor) and t.device != device for t in tensors):
                return None
            return owner
        if module_name.startswith(_TOOLKIT_CODE):
            return None
    return None


def explain_device_mix(exc: BaseException, models: Mapping[str, nn.Module], device: torch.device | str) -> str | None:
    """What a model did when its own forward pass mixed devices, in words; ``None`` for anything else.

    Parameters
    ----------
    exc
        The error of a step, a recording or an evaluation.
    models
        The run's models by name; a module that belongs to none of them (a copy a
        merger made) is named after the first model of its class.
    device
        Where the model was moved and its inputs were sent.

    Returns
    -------
    str or None
        Which model and module keep a tensor on another device, which tensor attributes
        are left behind (not registered buffers), and torch's message; ``None`` when
        ``exc`` is not torch's error of two devices or when the model's inputs, not the
        model, were on the wrong device.
    """
    error = device_mix(exc)
    device = torch.device(device)
    module = _failing_module(error, device) if error is not None else None
    if error is None or module is None:
        return None
    where = _owner(module, models)
    strays = stray_tensors(module, device)
    if strays:
        left = ", ".join(f"{name!r} (on {on})" for name, on in strays.items())
        why = (
            f"tensor attributes that are not registered buffers stay behind when the model moves to {device}: "
            f"{left}; register them with `self.register_buffer(name, tensor)` (or make them nn.Parameter)"
        )
    else:
        why = (
            "for example a tensor attribute that is not a registered buffer, or a device hard-coded in forward "
            "(make new tensors on the input's device, `x.device`)"
        )
    return (
        f"{where} mixes devices in its own forward pass: module {type(module).__name__} keeps a tensor on another "
        f"device than the one it runs on ({device}); {why}. {type(error).__name__}: {str(error).splitlines()[0]}"
    )


def _owner(module: nn.Module, models: Mapping[str, nn.Module]) -> str:
    """``"model 'c'"`` (with the submodule's path) for a module of a run's model, else its likeliest origin."""
    for name, model in models.items():
        for path, sub in model.named_modules():
            if sub is module:
                return f"model {name!r}" + (f" (its module {path!r})" if path else "")
    for name, model in models.items():  # a copy: a merge starts from a copy of its first model
        for path, sub in model.named_modules():
            if type(sub) is type(module):
                return f"a copy of model {name!r}" + (f" (its module {path!r})" if path else "")
    return "a model"
