"""The conformance kit applies every aligner's alignment: an alignment must be what it says it is."""

from __future__ import annotations

from typing import ClassVar

import attrs
import numpy as np
import pytest
import xarray as xr

from mergescope import Alignment
from mergescope.groups import channel_groups, example_input, permutation_matrix
from mergescope.testing import check_component, example_dataset, example_models
from mergescope.values import LAYERS


def _identity_like(size: int, swap: bool) -> np.ndarray:
    perm = np.arange(size)
    if swap:
        perm[[0, 1]] = perm[[1, 0]]
    return perm


@attrs.define
class HonestAligner:
    """Swaps two units of every channel group (a permutation, so the function stays the same)."""

    name: ClassVar[str] = "honest"

    def align(self, models, reference, context=None):
        groups = channel_groups(models[reference], example_input(context.data))
        transforms = {
            m: {g.name: permutation_matrix(_identity_like(g.size, swap=True)) for g in groups}
            for m in models
            if m != reference
        }
        return Alignment(reference, transforms)


@attrs.define
class LayerKeyedButSilent(HonestAligner):
    """Keys its transforms by layer names but claims channel groups (the default space)."""

    name: ClassVar[str] = "layer-keyed"

    def align(self, models, reference, context=None):
        layer = "2"  # a layer of the example MLPs (its ReLU, nn.Sequential index 2), not a channel group
        eye = xr.DataArray(np.eye(8), dims=("unit", "unit_ref"))
        return Alignment(reference, {m: {layer: eye} for m in models if m != reference})


@attrs.define
class LayerKeyedAndSaysSo(LayerKeyedButSilent):
    """Keys its transforms by layer names and declares the layers space."""

    name: ClassVar[str] = "layer-keyed-declared"
    space: ClassVar[str] = LAYERS

    def align(self, models, reference, context=None):
        alignment = super().align(models, reference, context)
        return attrs.evolve(alignment, space=LAYERS)


@attrs.define
class BrokenPermutation(HonestAligner):
    """Returns permutation matrices whose rows and columns are swapped the wrong way for one model's biases."""

    name: ClassVar[str] = "broken-permutation"

    def align(self, models, reference, context=None):
        alignment = super().align(models, reference, context)
        # Claim a permutation of a group that does not exist in the architecture.
        for transforms in alignment.transforms.values():
            transforms["no-such-group"] = permutation_matrix(np.arange(3))
        return alignment


def test_an_honest_aligner_passes():
    check_component(HonestAligner)


def test_a_layer_keyed_alignment_claiming_channel_groups_fails():
    with pytest.raises(AssertionError, match=r"groups \['2'\] that the architecture does not have.*space = 'layers'"):
        check_component(LayerKeyedButSilent)


def test_a_layer_keyed_alignment_that_says_so_passes():
    check_component(LayerKeyedAndSaysSo)


def test_a_class_declaring_one_space_and_returning_another_fails():
    @attrs.define
    class Mismatch(HonestAligner):
        """Declares layers, returns channel groups."""

        name: ClassVar[str] = "mismatch"
        space: ClassVar[str] = LAYERS

    with pytest.raises(AssertionError, match="declares space = 'layers' but its alignment is in 'channel-groups'"):
        check_component(Mismatch)


def test_an_alignment_naming_groups_the_architecture_lacks_fails():
    with pytest.raises(AssertionError, match=r"\['no-such-group'\]"):
        check_component(BrokenPermutation)


def test_applying_the_alignment_checks_the_function(monkeypatch):
    # A permutation that the kit applies must leave the output unchanged: break the
    # application of permutations and the kit says so.
    import mergescope.testing as kit

    models = example_models()
    scrambled = {"model1": models["model0"]}  # another model entirely: the function changes
    monkeypatch.setattr(kit, "align_to_reference", lambda m, alignment, groups, example=None: scrambled)
    with pytest.raises(AssertionError, match="changed the model's output"):
        check_component(HonestAligner)


def test_bundled_aligners_apply(fresh_registry):
    registry = fresh_registry.get_registry()
    for name in ("weight-matching", "activation-matching"):
        check_component(registry.get("aligner", name))
    assert registry.get("aligner", "lasso").space == LAYERS
    assert example_dataset() is not None
