"""Component protocols: what a plugin's classes implement, one method per kind.

A component is an ``attrs`` class with a ``name`` class attribute (the string a pipeline
file uses) whose fields are its options, and one method, depending on its kind:

==============  ==========================  ============================================
kind            hook                        method
==============  ==========================  ============================================
aligner         ``register_aligners``       ``align(models, reference, context)``
merger          ``register_mergers``        ``merge(models, context, alignment=None)``
visualizer      ``register_visualizers``    ``render(results, out_dir, context)``
metric          ``register_metrics``        ``score(a, b, context)``
differ          ``register_differs``        ``fit(activations, context)``
dataset         ``register_datasets``       ``load()``
architecture    ``register_architectures``  ``build(input_shape, num_classes)``
embedder        ``register_embedders``      ``embed(images)``
==============  ==========================  ============================================

The five kinds that can be pipeline steps always receive the step's
:class:`~mergescope.context.Context`, as the keyword ``context``; declare it
``context: Context | None = None`` to call the method by hand without one.

Everything else a component may offer is optional and declared once, in
:class:`ComponentExtras`. The values components exchange (datasets, alignments, merge
results) live in :mod:`mergescope.values` and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import xarray as xr
from torch import nn

from .context import Context
from .values import (
    ALIGNMENT_SPACES,
    CHANNEL_GROUPS,
    LAYERS,
    Alignment,
    Architecture,
    DatasetSource,
    Embedder,
    Evaluation,
    ImageDataset,
    MergeResult,
    TensorImageDataset,
    evaluate,
)

__all__ = [
    "Aligner",
    "Merger",
    "Visualizer",
    "Metric",
    "Differ",
    "DatasetSource",
    "Architecture",
    "Embedder",
    "ComponentExtras",
    "ImageDataset",
    "TensorImageDataset",
    "Alignment",
    "ALIGNMENT_SPACES",
    "CHANNEL_GROUPS",
    "LAYERS",
    "MergeResult",
    "Evaluation",
    "Context",
    "evaluate",
]


# ------------------------------------------------------------ step protocols


@runtime_checkable
class Aligner(Protocol):
    """Map every model's channels onto a reference model's channels.

    The returned :class:`~mergescope.values.Alignment` says its ``space``. An aligner
    whose transforms are keyed by layer names rather than channel groups declares the
    class attribute ``space = "layers"`` (see :class:`ComponentExtras`), so that a
    pipeline naming ``"b@<its step>"`` is refused before anything runs.
    """

    name: ClassVar[str]

    def align(self, models: Mapping[str, nn.Module], reference: str, context: Context) -> Alignment: ...


@runtime_checkable
class Merger(Protocol):
    """Combine several models of one architecture into one."""

    name: ClassVar[str]

    def merge(
        self, models: Mapping[str, nn.Module], context: Context, alignment: Alignment | None = None
    ) -> MergeResult: ...


@runtime_checkable
class Visualizer(Protocol):
    """Turn results into files (figures, image grids, panels of the report).

    ``results`` holds every earlier step's results; ``context`` gives the dataset's
    images and, for a step that names models, their recordings.
    """

    name: ClassVar[str]

    def render(self, results: xr.DataTree, out_dir: Path, context: Context) -> list[Path]: ...


@runtime_checkable
class Metric(Protocol):
    """Score every unit of two activation tensors over the same samples.

    ``a`` and ``b`` follow the activation contract (dims ``("sample", "unit", ...)``
    with identical ``sample`` coords and as many units: the runner checks this before
    calling); the result has dims ``("unit",)`` with ``b``'s ``unit`` coord.
    """

    name: ClassVar[str]

    def score(self, a: xr.DataArray, b: xr.DataArray, context: Context) -> xr.DataArray: ...


@runtime_checkable
class Differ(Protocol):
    """Fit a dictionary over the activations of N models and describe each feature."""

    name: ClassVar[str]

    def fit(
        self, activations: Mapping[str, xr.DataArray] | Mapping[str, Mapping[str, xr.DataArray]], context: Context
    ) -> xr.Dataset: ...


# ------------------------------------------------------------------ extras


class ComponentExtras(Protocol):
    """Everything optional a component class may define, of any kind unless said otherwise.

    None of these is required; each is looked up by name and used when present.

    Attributes
    ----------
    paper : str
        The reference the component reproduces, shown in ``registry.toml`` and
        ``mergescope plugins``.
    space : str
        Aligners only: ``"channel-groups"`` (the default) when the alignment's
        transforms are keyed by the architecture's channel groups and can be applied
        to weights, ``"layers"`` when they are keyed by layer names (maps between
        activations, such as a regression). ``"b@<step>"`` is refused for the latter.
    example_input_shape : tuple of int
        Architectures and embedders: the input shape the conformance kit feeds them
        (default ``(1, 8, 8)`` and ``(3, 32, 32)``).
    joint_layers : bool
        Differs only: when true, one ``fit`` reads every layer of the step at once (per
        model, a mapping layer -> activations) instead of one ``fit`` per layer; the
        step's result is one node named ``"layer_a+layer_b"``.
    """

    paper: ClassVar[str]
    space: ClassVar[str]
    example_input_shape: ClassVar[tuple[int, ...]]

    def describe(self, result: Any) -> str:
        """A one-line human summary of the component's result, used in ``summary.txt``.

        ``result`` is the step's root Dataset (mergers, aligners, visualizers), one
        model's per-unit scores (metrics) or one layer's Dataset (differs).
        """
        ...

    def endpoint_note(self, result: xr.Dataset) -> str:
        """Mergers that sweep a path: why their endpoints' accuracies may differ from the models' own.

        ``result`` is the step's root Dataset. The report shows the sentence beside the
        endpoints' accuracies, after the facts it knows itself (the data, the alignment).
        """
        ...

    def check_activations(self, activations: Any) -> None:
        """Steps that read recordings: refuse ``[activations]`` the component cannot use.

        ``activations`` is the pipeline's :class:`~mergescope.pipeline.ActivationSpec`
        (``layers``, ``reduce``, ``topk``, ...). Raise a
        :class:`~mergescope.errors.ConfigError` naming the key at fault; the pipeline
        check calls it before anything is recorded, and prefixes the step's location.
        """
        ...

    def intervene(
        self, result: xr.Dataset, models: Mapping[str, nn.Module], layer: str, context: Context
    ) -> xr.Dataset | None:
        """Differs: test a fitted dictionary causally on the models it was fitted to.

        Called after ``fit`` with that layer's result, the step's models (in the order
        of ``fit``'s activations; on ``context.device``, in eval mode) and the layer
        name (layers joined with ``+`` for ``joint_layers``). A differ edits the
        models' activations at the layer during forward passes over ``context.data``
        (e.g. removes some features) and measures what changes. The variables of the
        returned Dataset join the layer's result; ``None`` adds nothing. The step's
        key holds the models' fingerprints, so a cached result stays valid.
        """
        ...

    def report_panel(self, node: xr.Dataset, files: list[Path], run_dir: Path) -> str:
        """Visualizers: the HTML of the step's panel in the report (its files, tables, browsers).

        ``node`` is the step's result node, ``files`` the files it wrote; links are
        relative to ``run_dir``. Without it, the report shows the images and files.
        """
        ...

    def rebuild(self, models: Mapping[str, nn.Module], state: Mapping[str, Any]) -> nn.Module:
        """Mergers whose merged model is not of its inputs' structure (an ensemble, a multi-head model).

        Returns a module of the merged model's structure, built from the step's models (in
        the step's order; ``state``, the saved state dict, gives shapes the models do not).
        The runner loads ``state`` into it, strictly, when it restores a cached step; the
        conformance kit compares the merged model's parameters with its. Without it a
        merged model must have the parameters of the step's first model.
        """
        ...

    @classmethod
    def conformance_models(cls) -> dict[str, nn.Module]:
        """Aligners and mergers: the models the conformance kit gives them (default: two small MLPs)."""
        ...

    @classmethod
    def conformance_instance(cls, directory: Path) -> Any:
        """An instance that works from files it writes into ``directory`` (weights it cannot ship)."""
        ...
