"""mergescope: merge neural networks and see what merging does to their features.

The public API a user or plugin author needs is importable from here.
"""

from __future__ import annotations

from ._version import __version__
from .activations import (
    collect,
    load_collection,
    make_activation,
    save_collection,
    validate_activation,
    validate_collection,
)
from .components import (
    Aligner,
    Alignment,
    Architecture,
    ComponentExtras,
    Context,
    DatasetSource,
    Differ,
    Embedder,
    Evaluation,
    ImageDataset,
    Merger,
    MergeResult,
    Metric,
    TensorImageDataset,
    Visualizer,
)
from .errors import (
    CheckpointError,
    ConfigError,
    ContractError,
    DataError,
    DuplicateComponentError,
    MergescopeError,
    PluginError,
    UnknownComponentError,
)
from .hookspecs import hookimpl
from .kinds import KINDS
from .pipeline import ActivationSpec, ModelSpec, Pipeline, Step, component_from_table, load_pipeline
from .plugins import get_registry, register_plugin
from .progress import Progress
from .runner import RunResult, run
from .training import Training

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
    "ComponentExtras",
    "Progress",
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
    "DataError",
    "PluginError",
    "UnknownComponentError",
    "DuplicateComponentError",
]
