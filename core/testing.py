"""Conformance checks for component authors (modelled on scikit-learn's ``parametrize_with_checks``).

Run every check that applies to your components from your own test suite::

    from mergescope.testing import parametrize_with_checks
    from my_plugin import MyMetric

    @parametrize_with_checks([MyMetric, MyMetric(window=3)])
    def test_conformance(component, check):
        check(component)

A component is given as a class (built with its default options) or as an instance.
Each check raises ``AssertionError`` saying what the component got wrong. The checks:

- the class is registrable: a ``name``, an attrs class, the kind's method, a docstring;
- options round-trip through TOML;
- an unknown option and a value of the wrong type are rejected with a :class:`ConfigError`
  naming the key;
- the output is deterministic (two runs under one seed agree);
- the output follows the contract for the kind (dims, coords, types);
- bad input raises an error with a message, not a crash deep inside.

Mergers and aligners are given two small MLPs of one architecture (``example_models``).
A component that needs other inputs (e.g. a base model and fine-tunes of it) provides a
classmethod ``conformance_models() -> dict[str, nn.Module]``; the checks then use those.
A component whose outputs need files that never ship with it (weights to download, say)
provides a classmethod ``conformance_instance(directory: Path)`` returning an instance
that works from files it writes into ``directory`` (a small random model, say); the
kind's output checks then run on that instance, in a temporary directory.
"""

from __future__ import annotations

import copy
import functools
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import xarray as xr
from torch import nn

from .activations import make_activation
from .context import Context
from .errors import ConfigError
from .groups import align_to_reference, channel_groups, check_equivalence, example_input
from .kinds import KINDS, Kind, takes_context
from .options import option_names, structure_options, unstructure_options
from .values import CHANNEL_GROUPS, Alignment, ImageDataset, MergeResult, TensorImageDataset

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
import tomli_w

__all__ = [
    "parametrize_with_checks",
    "check_component",
    "checks_for",
    "kind_of",
    "example_activations",
    "example_models",
    "example_dataset",
    "example_context",
]

Check = Callable[[Any], None]


# --------------------------------------------------------------------- examples


def example_dataset(
    n: int = 48, shape: tuple[int, ...] = (1, 4, 4), classes: int = 3, seed: int = 0
) -> TensorImageDataset:
    """A small random labelled dataset (every class present)."""
    g = torch.Generator().manual_seed(seed)
    labels = np.arange(n) % classes
    images = torch.randn((n, *shape), generator=g) + torch.from_numpy(labels).float().view(-1, *[1] * len(shape))
    return TensorImageDataset("example", images, labels, np.arange(100, 100 + n), [str(c) for c in range(classes)])


def example_models(n: int = 2, in_features: int = 16, hidden: int = 8, classes: int = 3) -> dict[str, nn.Module]:
    """``n`` small MLPs of one architecture from different seeds, named ``model0``, ``model1``, ..."""
    models: dict[str, nn.Module] = {}
    for i in range(n):
        torch.manual_seed(i)
        models[f"model{i}"] = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        ).eval()
    return models


def example_activations(samples: int = 64, units: int = 6, seed: int = 0) -> tuple[xr.DataArray, xr.DataArray]:
    """Two correlated activation tensors ``(sample, unit)`` following the contract."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(samples, units))
    b = 0.7 * a + 0.3 * rng.normal(size=(samples, units))
    ids, labels = np.arange(samples) * 3, np.arange(samples) % 4
    return (
        make_activation(a.astype(np.float32), sample_ids=ids, labels=labels, model="a", layer="layer"),
        make_activation(b.astype(np.float32), sample_ids=ids, labels=labels, model="b", layer="layer"),
    )


def example_context(a: xr.DataArray, shape: tuple[int, ...] = (3, 16, 16)) -> Context:
    """A context whose dataset holds one small random RGB image per sample id of ``a``."""
    ids = np.asarray(a["sample"].values)
    g = torch.Generator().manual_seed(0)
    labels = np.asarray(a["label"].values) if "label" in a.coords else np.zeros(len(ids), dtype=np.int64)
    images = torch.rand((len(ids), *shape), generator=g)
    classes = [str(c) for c in range(int(labels.max()) + 1)]
    return Context(data=TensorImageDataset("example", images, labels, ids, classes), quiet=True)


# ----------------------------------------------------------------- generic checks


def kind_of(component: Any) -> str:
    """The component kind implied by which method the class implements."""
    cls = component if isinstance(component, type) else type(component)
    kinds = [k.name for k in KINDS.values() if callable(getattr(cls, k.method, None))]
    assert len(kinds) == 1, (
        f"{cls.__qualname__} must implement exactly one of "
        f"{', '.join(k.method + '()' for k in KINDS.values())}; it implements {kinds or 'none'}"
    )
    return kinds[0]


def _instance(component: Any) -> Any:
    return component() if isinstance(component, type) else copy.deepcopy(component)


def check_registrable(component: Any) -> None:
    """A ``name`` string, an attrs class, the kind's method and a one-line docstring summary."""
    cls = component if isinstance(component, type) else type(component)
    name = getattr(cls, "name", None)
    assert isinstance(name, str) and name, f"{cls.__qualname__} needs a string 'name'"
    assert attrs.has(cls), f"{cls.__qualname__} must be an attrs class"
    kind = KINDS[kind_of(cls)]
    assert (cls.__doc__ or "").strip(), (
        f"{cls.__qualname__} needs a docstring (its first line is the catalogue summary)"
    )
    assert not kind.is_step or takes_context(getattr(cls, kind.method)), (
        f"{cls.__qualname__}.{kind.method}() must accept the step's context as a parameter named 'context'"
    )


def check_options_roundtrip(component: Any) -> None:
    """Options -> TOML -> options gives an equal component."""
    obj = _instance(component)
    text = tomli_w.dumps(unstructure_options(obj))
    back = structure_options(type(obj), tomllib.loads(text))
    assert back == obj, f"{type(obj).name!r}: options do not round-trip through TOML:\n{text}\n{obj!r} != {back!r}"


def check_unknown_option_rejected(component: Any) -> None:
    """An unknown key is a ConfigError naming the key and the component."""
    obj = _instance(component)
    options = {**unstructure_options(obj), "no_such_option": 1}
    try:
        structure_options(type(obj), options)
    except ConfigError as exc:
        assert "no_such_option" in str(exc) and type(obj).name in str(exc), f"unclear error: {exc}"
    else:
        raise AssertionError(f"{type(obj).name!r} accepted the unknown option 'no_such_option'")


class _Unfit:
    """A value no option type accepts (not str, number, bool, list or table)."""

    def __repr__(self) -> str:
        return "<unfit value>"


def check_bad_option_type(component: Any) -> None:
    """A value of the wrong type for any option is a ConfigError naming that option."""
    obj = _instance(component)
    for key in option_names(type(obj)):
        field = attrs.fields_dict(type(obj)).get(key)
        if field is not None and field.type in (Any, "Any", object, "object"):
            continue
        options = {**unstructure_options(obj), key: _Unfit()}
        try:
            structure_options(type(obj), options)
        except ConfigError as exc:
            assert key in str(exc), f"{type(obj).name!r}: the error for a bad {key!r} does not name it: {exc}"
        else:
            raise AssertionError(f"{type(obj).name!r} accepted {_Unfit()!r} for option {key!r}")


# ------------------------------------------------------------ kind-specific checks


def _seeded(fn: Callable[[], Any]) -> Any:
    torch.manual_seed(0)
    np.random.seed(0)
    return fn()


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, (xr.DataArray, xr.Dataset)):
        return x.identical(y)
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, torch.Tensor):
        return torch.equal(x, y)
    return bool(x == y)


def _metric_output(component: Any) -> None:
    metric = _instance(component)
    a, b = example_activations()
    extra = {"context": example_context(a)}
    first = _seeded(lambda: metric.score(a, b, **extra))
    assert isinstance(first, xr.DataArray), (
        f"{metric.name!r}.score() must return a DataArray, got {type(first).__name__}"
    )
    assert first.dims == ("unit",), f"{metric.name!r}.score() must return dims ('unit',), got {first.dims}"
    assert np.array_equal(first["unit"].values, b["unit"].values), f"{metric.name!r}: 'unit' coord differs from b's"
    assert _same(first, _seeded(lambda: metric.score(a, b, **extra))), f"{metric.name!r}.score() is not deterministic"


def _metric_bad_input(component: Any) -> None:
    metric = _instance(component)
    a, b = example_activations()
    extra = {"context": example_context(a)}
    shifted = b.assign_coords(sample=b["sample"].values + 1)
    for bad, what in ((shifted, "different sample ids"), (b.isel(unit=slice(0, 3)), "a different number of units")):
        try:
            metric.score(a, bad, **extra)
        except (ValueError, LookupError) as exc:
            assert str(exc), f"{metric.name!r}: empty error message for {what}"
        else:
            raise AssertionError(f"{metric.name!r}.score() accepted two activations with {what}")


def _conformance_models(component: Any) -> dict[str, nn.Module]:
    """The component's own example inputs when it declares them (e.g. a base and its fine-tunes)."""
    cls = component if isinstance(component, type) else type(component)
    make = getattr(cls, "conformance_models", None)
    return dict(make()) if callable(make) else example_models()


def _merger_output(component: Any) -> None:
    merger = _instance(component)
    context = Context(data=example_dataset(), quiet=True)
    models = _conformance_models(component)

    def merge() -> MergeResult:
        return merger.merge(copy.deepcopy(models), context)

    first = _seeded(merge)
    assert isinstance(first, MergeResult), f"{merger.name!r}.merge() must return a MergeResult"
    assert isinstance(first.results, xr.Dataset), f"{merger.name!r}: MergeResult.results must be an xarray Dataset"
    second = _seeded(merge)
    assert first.results.identical(second.results), f"{merger.name!r}: results differ between two seeded runs"
    if first.model is not None:
        rebuild = getattr(merger, "rebuild", None)
        template = rebuild(models, first.model.state_dict()) if callable(rebuild) else next(iter(models.values()))
        ref = template.state_dict()
        got = first.model.state_dict()
        assert got.keys() == ref.keys(), f"{merger.name!r}: the merged model has other parameters than its inputs"
        for k in ref:
            assert got[k].shape == ref[k].shape, f"{merger.name!r}: merged {k} has shape {tuple(got[k].shape)}"
        assert _same(got, second.model.state_dict()), f"{merger.name!r}: merged weights differ between seeded runs"


def _merger_bad_input(component: Any) -> None:
    merger = _instance(component)
    models = _conformance_models(component)
    last = list(models)[-1]
    models[last] = example_models(hidden=5)["model1"]  # another width than the others
    try:
        merger.merge(models, Context(data=example_dataset(), quiet=True))
    except (ValueError, LookupError) as exc:
        assert str(exc), f"{merger.name!r}: empty error message for models of different widths"
    else:
        raise AssertionError(f"{merger.name!r}.merge() accepted models of different widths")


def _aligner_output(component: Any) -> None:
    aligner = _instance(component)
    context = Context(data=example_dataset(), quiet=True)
    models = _conformance_models(component)
    reference, other = list(models)[:2]
    first = _seeded(lambda: aligner.align(models, reference, context))
    assert isinstance(first, Alignment), f"{aligner.name!r}.align() must return an Alignment"
    assert first.reference == reference, f"{aligner.name!r}: Alignment.reference must be the reference model"
    assert other in first.transforms, f"{aligner.name!r}: no transforms for the non-reference model"
    for group, t in first.transforms[other].items():
        assert t.dims == ("unit", "unit_ref"), f"{aligner.name!r}: transform {group!r} has dims {t.dims}"
    declared = getattr(type(aligner), "space", CHANNEL_GROUPS)
    assert first.space == declared, (
        f"{aligner.name!r}: its class declares space = {declared!r} but its alignment is in {first.space!r} space"
    )
    second = _seeded(lambda: aligner.align(models, reference, context))
    assert first.to_tree().identical(second.to_tree()), f"{aligner.name!r}: alignment differs between seeded runs"


def _aligner_applies(component: Any) -> None:
    """The alignment is what it says: keyed by channel groups that apply to the models, or by their layers.

    A channel-group alignment is applied to every other model; where all its transforms
    are permutations, the permuted model must compute the same function as before.
    """
    aligner = _instance(component)
    data = example_dataset()
    models = _conformance_models(component)
    reference = list(models)[0]
    alignment = _seeded(lambda: aligner.align(models, reference, Context(data=data, quiet=True)))
    x = example_input(data, count=4)
    if alignment.space != CHANNEL_GROUPS:
        for model, transforms in alignment.transforms.items():
            layers = dict(models[model].named_modules())
            unknown = sorted(set(transforms) - set(layers))
            assert not unknown, (
                f"{aligner.name!r}: an alignment in {alignment.space!r} space must be keyed by layer names of "
                f"{model!r}; {unknown} are not among them"
            )
        return
    groups = channel_groups(models[reference], x)
    names = {g.name for g in groups}
    for model, transforms in alignment.transforms.items():
        unknown = sorted(set(transforms) - names)
        assert not unknown, (
            f"{aligner.name!r}: its alignment of {model!r} has groups {unknown} that the architecture does not "
            f"have (its channel groups: {', '.join(sorted(names))}); declare space = 'layers' for layer-keyed maps"
        )
        aligned = align_to_reference({model: models[model]}, alignment, groups, x)[model]
        matrices = [np.asarray(t.transpose("unit", "unit_ref").values) for t in transforms.values()]
        if all(_is_permutation(m) for m in matrices):
            with torch.no_grad():
                before, after = models[model].eval()(x), aligned.eval()(x)
            scale = float(before.abs().max()) or 1.0
            difference = float((before - after).abs().max()) / scale
            assert difference <= 1e-5, (
                f"{aligner.name!r}: permuting {model!r} with its alignment changed the model's output "
                f"(relative difference {difference:.2e}); a permutation must leave the function unchanged"
            )
    # The reference itself, permuted at random in every group, must also stay the same function.
    check_equivalence(models[reference], x, groups=groups)


def _is_permutation(matrix: np.ndarray) -> bool:
    return bool(
        matrix.ndim == 2
        and matrix.shape[0] == matrix.shape[1]
        and np.isin(matrix, (0.0, 1.0)).all()
        and (matrix.sum(axis=0) == 1).all()
        and (matrix.sum(axis=1) == 1).all()
    )


def _differ_output(component: Any) -> None:
    differ = _instance(component)
    a, b = example_activations()
    context = Context(quiet=True)
    first = _seeded(lambda: differ.fit({"a": a, "b": b}, context))
    assert isinstance(first, xr.Dataset), f"{differ.name!r}.fit() must return an xarray Dataset"
    assert first.identical(_seeded(lambda: differ.fit({"a": a, "b": b}, context))), (
        f"{differ.name!r}: not deterministic"
    )


def _visualizer_output(component: Any) -> None:
    visualizer = _instance(component)
    a, b = example_activations()
    tree = xr.DataTree.from_dict({"metric/layer": xr.Dataset({"score": a.mean("sample")})})
    with tempfile.TemporaryDirectory() as tmp:
        files = visualizer.render(tree, Path(tmp) / "out", context=example_context(a))
        assert isinstance(files, list), f"{visualizer.name!r}.render() must return a list of paths"
        for f in files:
            assert Path(f).is_file(), f"{visualizer.name!r}.render() returned {f}, which does not exist"


def _dataset_output(component: Any) -> None:
    source = _instance(component)
    data = source.load()
    assert isinstance(data, ImageDataset), f"{source.name!r}.load() must return an ImageDataset"
    assert len(data) > 0, f"{source.name!r}.load() returned an empty dataset"
    ids = np.asarray(data.sample_ids)
    assert len(np.unique(ids)) == len(ids) == len(data), f"{source.name!r}: sample ids must be unique, one per item"
    labels = np.asarray(data.labels)
    assert labels.min() >= 0 and labels.max() < len(data.classes), f"{source.name!r}: labels outside the classes"
    image, label = data[0]
    assert tuple(image.shape) == tuple(data.input_shape), f"{source.name!r}: item shape {tuple(image.shape)}"
    assert label == labels[0], f"{source.name!r}: item label disagrees with .labels"
    again = source.load()
    assert np.array_equal(ids, again.sample_ids), f"{source.name!r}: sample ids differ between two loads"
    assert torch.equal(data[len(data) - 1][0], again[len(again) - 1][0]), (
        f"{source.name!r}: images differ between loads"
    )


def _architecture_output(component: Any, input_shape: tuple[int, ...] = (1, 28, 28)) -> None:
    arch = _instance(component)
    shape = tuple(getattr(arch, "example_input_shape", input_shape))
    first = _seeded(lambda: arch.build(shape, 5))
    assert isinstance(first, nn.Module), f"{arch.name!r}.build() must return an nn.Module"
    first.eval()
    with torch.no_grad():
        out = first(torch.zeros(2, *shape))
    assert tuple(out.shape) == (2, 5), f"{arch.name!r}: output shape {tuple(out.shape)} for 5 classes, batch 2"
    second = _seeded(lambda: arch.build(shape, 5))
    assert _same(first.state_dict(), second.state_dict()), f"{arch.name!r}: initialisation ignores torch.manual_seed"


def _embedder_output(component: Any) -> None:
    embedder = _instance(component)
    shape = tuple(getattr(embedder, "example_input_shape", (3, 32, 32)))
    images = torch.rand((4, *shape), generator=torch.Generator().manual_seed(0))
    first = _seeded(lambda: embedder.embed(images))
    assert isinstance(first, np.ndarray), f"{embedder.name!r}.embed() must return a numpy array"
    assert first.ndim == 2 and first.shape[0] == 4, f"{embedder.name!r}.embed(): shape {first.shape} for 4 images"
    assert np.isfinite(first).all(), f"{embedder.name!r}.embed() returned non-finite values"
    assert np.allclose(first, _seeded(lambda: embedder.embed(images))), (
        f"{embedder.name!r}.embed() is not deterministic"
    )


# The checks of each kind, keyed by the kind's protocol method (one per kind, see mergescope.kinds).
_CHECKS_BY_METHOD: dict[str, list[Check]] = {
    "score": [_metric_output, _metric_bad_input],
    "merge": [_merger_output, _merger_bad_input],
    "align": [_aligner_output, _aligner_applies],
    "fit": [_differ_output],
    "render": [_visualizer_output],
    "load": [_dataset_output],
    "build": [_architecture_output],
    "embed": [_embedder_output],
}


def _kind_checks(kind: Kind) -> list[Check]:
    return _CHECKS_BY_METHOD[kind.method]


def _named(fn: Check, name: str) -> Check:
    @functools.wraps(fn)
    def wrapper(component: Any) -> None:
        cls = component if isinstance(component, type) else type(component)
        make = getattr(cls, "conformance_instance", None)
        if not callable(make):
            fn(component)
            return
        with tempfile.TemporaryDirectory(prefix="mergescope-conformance-") as directory:
            instance = make(Path(directory))
            assert isinstance(instance, cls), (
                f"{cls.__qualname__}.conformance_instance() must return an instance of the class, got {instance!r}"
            )
            fn(instance)

    wrapper.__name__ = name
    return wrapper


def checks_for(component: Any) -> Iterator[Check]:
    """Every check that applies to ``component``, generic ones first."""
    yield check_registrable
    yield check_options_roundtrip
    yield check_unknown_option_rejected
    yield check_bad_option_type
    for fn in _kind_checks(KINDS[kind_of(component)]):
        yield _named(fn, f"check_{fn.__name__.lstrip('_')}")


def check_component(component: Any) -> None:
    """Run every applicable check on ``component``; the first failure raises ``AssertionError``."""
    for check in checks_for(component):
        check(component)


def _label(component: Any) -> str:
    if isinstance(component, type):
        return str(getattr(component, "name", component.__qualname__))
    options = ", ".join(f"{k}={v!r}" for k, v in unstructure_options(component).items())
    return f"{type(component).name}({options})"


def parametrize_with_checks(components: Sequence[Any]):
    """A ``pytest.mark.parametrize`` over ``(component, check)`` for every component and check.

    Parameters
    ----------
    components
        Component classes (default options) or instances.
    """
    import pytest

    params, ids = [], []
    for component in components:
        for check in checks_for(component):
            params.append((component, check))
            ids.append(f"{_label(component)}-{check.__name__}")
    return pytest.mark.parametrize("component, check", params, ids=ids)
