"""mergescope: merge neural networks and see what merging does to their features.

The public API a user or plugin author needs is importable from here.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("mergescope")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from .activations import (  # noqa: E402
    collect,
    load_collection,
    make_activation,
    save_collection,
    validate_activation,
    validate_collection,
)
from .components import (  # noqa: E402
    KINDS,
    Aligner,
    Alignment,
    Architecture,
    Embedder,
    Context,
    DatasetSource,
    Differ,
    Evaluation,
    ImageDataset,
    MergeResult,
    Merger,
    Metric,
    TensorImageDataset,
    Visualizer,
)
from .errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    ContractError,
    DuplicateComponentError,
    MergescopeError,
    PluginError,
    UnknownComponentError,
)
from .hookspecs import hookimpl  # noqa: E402
from .pipeline import ActivationSpec, ModelSpec, Pipeline, Step, component_from_table, load_pipeline  # noqa: E402
from .plugins import get_registry, register_plugin  # noqa: E402
from .runner import RunResult, run  # noqa: E402
from .training import Training  # noqa: E402

__all__ = [
    "__version__",
    "hookimpl",
    "KINDS",
    "Aligner",
    "Merger",
    "Metric",
    "Visualizer",
    "Differ",
    "DatasetSource",
    "Architecture",
    "Embedder",
    "ImageDataset",
    "TensorImageDataset",
    "Alignment",
    "MergeResult",
    "Evaluation",
    "Context",
    "Pipeline",
    "ModelSpec",
    "Step",
    "ActivationSpec",
    "Training",
    "load_pipeline",
    "component_from_table",
    "run",
    "RunResult",
    "get_registry",
    "register_plugin",
    "collect",
    "make_activation",
    "validate_activation",
    "validate_collection",
    "save_collection",
    "load_collection",
    "MergescopeError",
    "ConfigError",
    "ContractError",
    "CheckpointError",
    "PluginError",
    "UnknownComponentError",
    "DuplicateComponentError",
]
