"""The hooks a mergescope plugin implements.

Every hook has the same shape: it receives a ``register`` callable and calls it once
per component class it contributes::

    from mergescope import hookimpl

    @hookimpl
    def register_metrics(register):
        register(MyMetric)

A component class is an ``attrs`` class with a ``name`` class attribute (the string a
pipeline file uses) whose fields are its options. What each kind must implement is
described by the protocols in :mod:`mergescope.components`.
"""

from __future__ import annotations

import pluggy

__all__ = ["hookspec", "hookimpl", "PROJECT"]

PROJECT = "mergescope"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_aligners(register):
    """Register aligner classes: models (and their activations) -> an ``Alignment``.

    Parameters
    ----------
    register : callable
        Call ``register(cls)`` for each class implementing
        :class:`mergescope.components.Aligner`.
    """


@hookspec
def register_mergers(register):
    """Register merger classes: models (+ alignment, activations) -> a merged model.

    Parameters
    ----------
    register : callable
        Call ``register(cls)`` for each class implementing
        :class:`mergescope.components.Merger`.
    """


@hookspec
def register_visualizers(register):
    """Register visualizer classes: results -> figures and image files.

    Parameters
    ----------
    register : callable
        Call ``register(cls)`` for each class implementing
        :class:`mergescope.components.Visualizer`.
    """


@hookspec
def register_metrics(register):
    """Register metric classes: two labelled activation tensors -> a per-unit score.

    Parameters
    ----------
    register : callable
        Call ``register(cls)`` for each class implementing
        :class:`mergescope.components.Metric`.
    """


@hookspec
def register_differs(register):
    """Register differ classes: activations of N models -> a fitted dictionary.

    Parameters
    ----------
    register : callable
        Call ``register(cls)`` for each class implementing
        :class:`mergescope.components.Differ`.
    """


@hookspec
def register_datasets(register):
    """Register dataset classes: options -> an image dataset with labels and sample ids.

    Parameters
    ----------
    register : callable
        Call ``register(cls)`` for each class implementing
        :class:`mergescope.components.DatasetSource`.
    """


@hookspec
def register_architectures(register):
    """Register model architecture classes: options -> an untrained ``torch.nn.Module``.

    Parameters
    ----------
    register : callable
        Call ``register(cls)`` for each class implementing
        :class:`mergescope.components.Architecture`.
    """


@hookspec
def register_embedders(register):
    """Register image embedder classes: images -> one feature vector per image.

    Embedders turn dataset images into vectors whose cosine similarity says how alike
    two images look (CLIP, or a pretrained classifier's penultimate features); metrics
    such as CLIP-delta compare the top-k image sets of units through them.

    Parameters
    ----------
    register : callable
        Call ``register(cls)`` for each class implementing
        :class:`mergescope.components.Embedder`.
    """
