"""A simulated accelerator: CPU tensors that behave, for device checks, as if they lived on a GPU.

On a machine without a GPU every tensor of a run is on the CPU, so code that builds a
tensor on the host and feeds it to a model on the device passes there and fails only
on a GPU. :class:`SimulatedAccelerator` is a :class:`torch.overrides.TorchFunctionMode`
that tells the two apart on the CPU:

- the run's device is a distinct device object, ``torch.device("cpu", 0)`` by default,
  which torch accepts wherever a device goes (``tensor.to``, ``module.to``, factories);
- a tensor is *on the device* when its storage was made by a move there (``.to(device)``,
  ``Module.to``, a factory with ``device=device``) or by an operation on device tensors;
  every other tensor is *on the host*. Storages are tracked by identity (weak
  references), so views, in-place operations, ``.data`` and ``Parameter`` objects that
  share a storage share its place, as they do on a GPU;
- an operation that mixes a device tensor with a host tensor of one dimension or more
  raises the ``RuntimeError`` torch raises on CUDA (``Expected all tensors to be on the
  same device ...``); 0-dim host tensors (CPU scalars) mix freely, and host index tensors
  may index a device tensor, as on CUDA;
- ``.cpu()``, ``.to("cpu")`` and the Python values of ``.tolist()`` / ``.item()`` leave the
  device; ``.numpy()`` and ``numpy.asarray`` of a device tensor raise the ``TypeError``
  of CUDA tensors; ``tensor.device`` of a device tensor is the simulated device, so
  ``torch.zeros(n, device=x.device)`` lands on the device.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SimulatedAccelerator", "SIMULATED_DEVICE"]

#: The device object of a simulated run: a CPU device that compares unequal to ``torch.device("cpu")``.
SIMULATED_DEVICE = torch.device("cpu", 0)

_T = torch.Tensor
# Methods that may copy between devices: the destination keeps its place, the source may be anywhere.
_COPIES = {_T.copy_, _T.__setitem__}
_INDEXING = {_T.__getitem__, _T.__setitem__}
_TO_NUMPY = {_T.numpy, _T.__array__}
# Questions about tensors that compute nothing (``Module._apply`` asks one of a parameter and its moved copy).
_METADATA = {torch._has_compatible_shallow_copy_type}


def _tensors(value: Any) -> Iterator[Any]:
    """The tensors (and NumPy arrays) in an argument: itself, or inside lists and tuples."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class SimulatedAccelerator(TorchFunctionMode):
    """Track which CPU tensors stand for tensors on an accelerator, and fail as CUDA would on a mix.

    Use as a context manager around the code under test::

        with SimulatedAccelerator() as gpu:
            model.to(gpu.device)
            model(images)                # RuntimeError: images are on the host
            model(images.to(gpu.device)) # fine

    Parameters
    ----------
    device
        The device object that stands for the accelerator; it must be accepted by torch
        on the CPU and differ from ``torch.device("cpu")``.
    """

    def __init__(self, device: torch.device = SIMULATED_DEVICE) -> None:
        super().__init__()
        if torch.device(device) == torch.device("cpu") or torch.device(device).type != "cpu":
            raise ValueError(f"the simulated device must be a CPU device other than 'cpu', got {device!r}")
        self.device = torch.device(device)
        #: How many operations had an input on the device (a run that never used it counts none).
        self.device_operations = 0
        self._storages: dict[int, weakref.ref] = {}

    # -- where a tensor is ---------------------------------------------------------------

    def on_device(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` stands for a tensor on the accelerator."""
        storage = self._storage(tensor)
        if storage is None:
            return False
        ref = self._storages.get(id(storage))
        return ref is not None and ref() is storage

    def _storage(self, tensor: torch.Tensor) -> Any:
        try:
            return tensor.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):  # tensors without storage
            return None

    def _mark(self, value: Any, unless: set[int] = frozenset()) -> None:
        """Put the storages of the tensors in ``value`` on the device (except those in ``unless``)."""
        for tensor in _tensors(value):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = self._storage(tensor)
            if storage is None or id(storage) in unless:
                continue
            key = id(storage)
            self._storages[key] = weakref.ref(storage, lambda _ref, key=key: self._storages.pop(key, None))

    def _is_device(self, device: Any) -> bool:
        return device is not None and torch.device(device) == self.device

    # -- the mode ------------------------------------------------------------------------------

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = getattr(func, "__self__", None)
        if isinstance(owner, types.GetSetDescriptorType):
            if func.__name__ == "__get__":
                return self._attribute(owner.__name__, func, args)
            return func(*args, **kwargs)  # e.g. `param.data = other`: the tensor takes other's storage
        if func in _TO_NUMPY and self.on_device(args[0]) and not kwargs.get("force", False):
            raise TypeError(
                f"can't convert {self.device} device type tensor to numpy. "
                "Use Tensor.cpu() to copy the tensor to host memory first."
            )
        if func is _T.to:
            return self._to(func, args, kwargs)
        if func is _T.cpu:
            result = func(*args, **kwargs)
            return result.clone() if self.on_device(args[0]) else result
        if func is _T.type_as:
            result = func(*args, **kwargs)
            return self._moved(result, args[0], self.on_device(args[1]))
        inputs = [t for value in (*args, *kwargs.values()) for t in _tensors(value)]
        if kwargs.get("device") is not None:  # a factory: the result is where `device` says
            result = func(*args, **kwargs)
            return self._moved(result, inputs, self._is_device(kwargs["device"]))
        device_inputs = [t for t in inputs if isinstance(t, torch.Tensor) and self.on_device(t)]
        if func in _INDEXING:
            self._check_indexing(args, device_inputs)
        elif func not in _COPIES and func not in _METADATA and device_inputs:
            host = [t for t in inputs if t.ndim > 0 and not (isinstance(t, torch.Tensor) and self.on_device(t))]
            if host:
                raise RuntimeError(
                    f"Expected all tensors to be on the same device, but found at least two devices, "
                    f"{self.device} and cpu! (when checking arguments for {getattr(func, '__name__', func)})"
                )
        result = func(*args, **kwargs)
        self.device_operations += bool(device_inputs)
        if func in _COPIES or func in _METADATA:  # the destination keeps its place; no tensor made
            return result
        if device_inputs:
            host_storages = {
                id(self._storage(t)) for t in inputs if isinstance(t, torch.Tensor) and not self.on_device(t)
            }
            self._mark(result, unless=host_storages)
        return result

    def _attribute(self, name: str, func, args):
        """``tensor.<name>``: the device of a device tensor is the simulated one; ``.grad``, ``.data``... follow it."""
        tensor = args[0]
        if name == "device":
            return self.device if self.on_device(tensor) else func(*args)
        result = func(*args)
        if isinstance(result, torch.Tensor) and self.on_device(tensor):
            self._mark(result)  # e.g. a gradient autograd made for a device parameter
        return result

    def _to(self, func, args, kwargs):
        source = args[0]
        rest = args[1:]
        if rest and isinstance(rest[0], torch.Tensor):  # tensor.to(other): other's device and dtype
            target_is_device = self.on_device(rest[0])
            dtype = rest[0].dtype
        else:
            device, dtype, _non_blocking, _memory_format = torch._C._nn._parse_to(*rest, **kwargs)
            if device is None:  # a change of dtype only: stays where it is
                return self._follow(func(*args, **kwargs), source)
            target_is_device = self._is_device(device)
        if target_is_device and self.on_device(source) and dtype in (None, source.dtype) and not kwargs.get("copy"):
            return source  # already there: no copy, as on CUDA
        return self._moved(func(*args, **kwargs), source, target_is_device)

    def _follow(self, result: Any, source: torch.Tensor) -> Any:
        if self.on_device(source):
            self._mark(result)
        return result

    def _moved(self, result: Any, sources: Any, to_device: bool) -> Any:
        """``result`` of a move: on the device or on the host, never sharing a storage with a source elsewhere."""
        sources = [t for t in _tensors(sources) if isinstance(t, torch.Tensor)]
        if isinstance(result, torch.Tensor):
            storage = self._storage(result)
            shared = storage is not None and any(self._storage(s) is storage for s in sources)
            if shared and self.on_device(result) != to_device:
                result = result.clone()  # a real move copies between devices
            if to_device:
                self._mark(result)
        return result

    def _check_indexing(self, args, device_inputs) -> None:
        """Host index tensors may index a device tensor; device indices may not index a host tensor."""
        target = args[0]
        if self.on_device(target) or not device_inputs:
            return
        indices = [t for t in _tensors(args[1]) if isinstance(t, torch.Tensor) and self.on_device(t)]
        if indices:
            raise RuntimeError("indices should be either on cpu or on the same device as the indexed tensor (cpu)")
