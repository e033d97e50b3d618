"""Channel groups: which weight axes must be permuted together, found by tracing.

Permuting the hidden units of a network leaves its function unchanged only when every
tensor axis that indexes those units moves with them: the producing layer's output
axis and bias, the per-channel parameters and statistics of a BatchNorm that follows,
the input axis of every consumer, and, through a residual connection, every other
layer writing to the same stream. Re-basin code usually lists these axes by hand for
each architecture (a "permutation spec"). :func:`channel_groups` finds them by tracing
the model with :mod:`torch.fx` and following every channel dimension through the graph.

How a tensor's channels are followed
------------------------------------
Every convolution, linear or embedding output opens a new *channel space*. Operations
that act on each channel separately (BatchNorm, activations, pooling, dropout, padding,
interpolation, depthwise convolutions) pass a space through; an elementwise ``add`` /
``sub`` / ``mul`` of two tensors unifies their spaces (residual connections,
squeeze-excitation gates); ``cat`` along the channel dim lays spaces side by side, each
part keeping its own group; ``flatten`` / ``view`` / ``reshape`` after a convolution
turns every channel into a block of ``repeat`` consecutive features. The union of the
spaces tied together is a :class:`ChannelGroup`. Spaces that reach the model's output
(the logits) or are tied to something that cannot be permuted (the input image, a
constant tensor) are left out. An operation whose effect on channels is unknown, applied
to a group that would otherwise be permuted, is an error (:class:`UnsupportedLayerError`)
rather than a silent mistake.

Conventions
-----------
A permutation ``perm`` of a group of ``size`` channels puts the old channel ``perm[i]``
at position ``i``. As a matrix (:func:`permutation_matrix`) it has dims
``("unit", "unit_ref")`` with ``P[perm[j], j] = 1``: unit ``perm[j]`` of the model goes
to unit ``j`` of the reference, the orientation of the transforms in
:class:`mergescope.Alignment`. :func:`apply_linear` takes maps ``T`` acting on
activation vectors (``new = T @ old``), so for an alignment transform ``M`` it is
``T = M.T`` (see :func:`maps_from_transforms`).

Modules
-------
Layered bottom to top; each imports only from the ones above it in this list.

- :mod:`.model`: :class:`Axis`, :class:`ChannelGroup` and the errors.
- :mod:`.ops`: the op tables, which torch functions, methods and modules are known.
- :mod:`.values`: what the analysis tracks (channel spaces, tensor layouts).
- :mod:`.state`: the analyzer's state during a walk, and the helpers all ops share.
- :mod:`.handlers`: how each family of operations moves channels.
- :mod:`.analyzer`: the walk over the traced graph that dispatches nodes and builds the groups.
- :mod:`.trace`: :func:`channel_groups`, :func:`group_layers`, :func:`example_input`.
- :mod:`.permute`: :func:`permute`, :func:`check_equivalence`, permutation matrices.
- :mod:`.fold`: :func:`fold_layernorms` and the tests of maps an affine-free LayerNorm keeps.
- :mod:`.linear`: :func:`apply_linear`, :func:`maps_from_transforms`, :func:`is_head_orthogonal`.
- :mod:`.apply`: :func:`align_to_reference`, :func:`align_step_models`.

Example
-------
>>> groups = channel_groups(model, torch.randn(2, 3, 32, 32))  # doctest: +SKIP
>>> check_equivalence(model, torch.randn(2, 3, 32, 32), groups=groups)  # doctest: +SKIP
"""

from __future__ import annotations

# The redundant aliases re-export names of the former single module that are not in
# __all__: mergescope.activations calls _eval_mode; ROLES and SUPPORTED are constants.
from .apply import align_step_models, align_to_reference
from .fold import affine_free, fold_layernorms, is_centred_orthogonal, layernorm_paths
from .linear import apply_linear, is_head_orthogonal, maps_from_transforms
from .model import ROLES as ROLES
from .model import Axis, ChannelGroup, EquivalenceError, UnsupportedLayerError
from .ops import SUPPORTED as SUPPORTED
from .permute import (
    check_equivalence,
    head_permutation,
    head_structure,
    perm_from_matrix,
    permutation_matrix,
    permute,
    random_permutations,
)
from .trace import _eval_mode as _eval_mode
from .trace import channel_groups, example_input, group_layers

__all__ = [
    "Axis",
    "ChannelGroup",
    "UnsupportedLayerError",
    "EquivalenceError",
    "channel_groups",
    "group_layers",
    "permute",
    "random_permutations",
    "head_permutation",
    "head_structure",
    "check_equivalence",
    "permutation_matrix",
    "perm_from_matrix",
    "apply_linear",
    "maps_from_transforms",
    "is_head_orthogonal",
    "fold_layernorms",
    "layernorm_paths",
    "affine_free",
    "is_centred_orthogonal",
    "example_input",
    "align_to_reference",
    "align_step_models",
]
