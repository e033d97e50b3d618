"""mergescope: merge neural networks and see what merging does to their features.

The public API a user or plugin author needs is importable from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
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

# Everything else is imported when first used (PEP 562), so that a plugin module's
# `from mergescope import hookimpl` does not load the runner, the report and torch's
# whole stack before the plugin is even registered.
_LAZY = {
    "collect": "activations",
    "load_collection": "activations",
    "make_activation": "activations",
    "save_collection": "activations",
    "validate_activation": "activations",
    "validate_collection": "activations",
    "Aligner": "components",
    "Alignment": "components",
    "Architecture": "components",
    "ComponentExtras": "components",
    "Context": "components",
    "DatasetSource": "components",
    "Differ": "components",
    "Embedder": "components",
    "Evaluation": "components",
    "ImageDataset": "components",
    "Merger": "components",
    "MergeResult": "components",
    "Metric": "components",
    "TensorImageDataset": "components",
    "Visualizer": "components",
    "KINDS": "kinds",
    "ActivationSpec": "specs",
    "Data": "specs",
    "Model": "specs",
    "ModelSpec": "specs",
    "Pipeline": "pipeline",
    "Step": "specs",
    "Task": "specs",
    "TaskSpec": "specs",
    "component_from_table": "specs",
    "load_pipeline": "pipeline",
    "get_registry": "plugins",
    "register_plugin": "plugins",
    "Progress": "progress",
    "RunResult": "results",
    "StepResult": "results",
    "run": "runner",
    "Training": "training",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mergescope' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
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
    from .kinds import KINDS
    from .pipeline import Pipeline, load_pipeline
    from .plugins import get_registry, register_plugin
    from .progress import Progress
    from .results import RunResult, StepResult
    from .runner import run
    from .specs import ActivationSpec, Data, Model, ModelSpec, Step, Task, TaskSpec, component_from_table
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
    "Model",
    "Step",
    "TaskSpec",
    "Task",
    "Data",
    "ActivationSpec",
    "Training",
    "load_pipeline",
    "component_from_table",
    "run",
    "RunResult",
    "StepResult",
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
