"""The thesis feature pipeline runs unchanged on a user's own torchvision checkpoints and image folder.

examples/thesis-two-models.toml is loaded through the public API and only [data] (a
small image folder written here), [[models]] (torchvision state-dict files saved here
from random initialisations) and the layer names are replaced; every step keeps its
component and options. The run must give every step's results.

Shrunk for speed, against the example run: 4 classes x 6 images (scikit-learn's 8x8
digits, resized to 32x32 by the dataset) instead of 10 x 100 MNIST digits,
untrained instead of trained checkpoints, and two ResNet-18 block outputs (64 + 128
channels) instead of all eight, so that the top-k step draws 192 grids. Every step
option is the example's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
import torchvision
import xarray as xr
from PIL import Image

from mergescope import ModelSpec, get_registry, load_pipeline, run
from mergescope.activations import collect

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "thesis-two-models.toml"
CLASSES, PER_CLASS = 4, 6
# The layers the example names (the small CNN's conv block outputs) ...
EXAMPLE_LAYERS = ["relu1", "relu2", "relu3"]
# ... and what stands for them on ResNet-18: two residual block outputs, and their widths.
LAYERS, WIDTHS = ["layer1.1", "layer2.1"], [64, 128]
IMAGE_SIZE = 32


def _image_folder(root: Path) -> Path:
    """CLASSES x PER_CLASS handwritten digits (scikit-learn's 8x8 set) as RGB PNG files in root/<digit>/<id>.png."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).astype(np.uint8)
    for digit in range(CLASSES):
        folder = root / f"digit-{digit}"
        folder.mkdir(parents=True)
        for row in np.flatnonzero(digits.target == digit)[:PER_CLASS]:
            Image.fromarray(images[row]).convert("RGB").save(folder / f"{row:04d}.png")
    return root


def _checkpoint(path: Path, seed: int) -> Path:
    """A freshly initialised torchvision ResNet-18's state dict, saved as a user would."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=CLASSES)
    torch.save(model.state_dict(), path)
    return path


def test_thesis_steps_run_unchanged_on_torchvision_checkpoints_and_an_image_folder(tmp_path):
    layers, widths = LAYERS, WIDTHS
    registry = get_registry()
    example = load_pipeline(EXAMPLE)
    pipeline = load_pipeline(EXAMPLE)
    assert pipeline.activations.layers == EXAMPLE_LAYERS

    # Replace [data], [[models]] and the layer names; nothing else.
    ImageFolder = registry.get("dataset", "imagefolder")
    Torchvision = registry.get("architecture", "torchvision")
    pipeline.data = ImageFolder(root=str(_image_folder(tmp_path / "images")), image_size=IMAGE_SIZE, resize=IMAGE_SIZE)
    pipeline.models = [
        ModelSpec(spec.name, Torchvision(arch="resnet18"), checkpoint=_checkpoint(tmp_path / f"{spec.name}.pt", seed))
        for seed, spec in enumerate(example.models)
    ]
    pipeline.activations.layers = layers
    for step in pipeline.steps:
        if step.layers is not None:
            assert step.layers == EXAMPLE_LAYERS
            step.layers = layers

    # Every step is the example's, but for the layers.
    assert len(pipeline.steps) == len(example.steps)
    for ours, theirs in zip(pipeline.steps, example.steps):
        assert ours.component == theirs.component
        assert attrs.evolve(ours, layers=None) == attrs.evolve(theirs, layers=None)
    assert attrs.evolve(pipeline.activations, layers=[]) == attrs.evolve(example.activations, layers=[])

    out = tmp_path / "run"
    result = run(pipeline, out, quiet=True)
    tree = xr.open_datatree(out / "results.nc")
    names = pipeline.step_names()
    assert set(names) <= set(tree.children)
    assert all(f"{name} (" in result.summary for name in names)
    data = pipeline.data.load()
    images = torch.stack([data[i][0] for i in range(len(data))])

    # am (and the compared wm): a permutation for every channel group of ResNet-18 (the stem,
    # each residual stream, each block's inner activation), and the permuted model 2 the
    # feature views read computes what model 2 does
    for aligner in ("am", "wm"):
        groups = tree[f"{aligner}/model2"].children
        assert {"conv1", "layer2", "layer3", "layer4", "layer1.0.conv1", "layer4.1.conv1"} <= set(groups)
        for group in groups.values():
            matrix = group.ds["transform"].values
            assert set(np.unique(matrix)) <= {0.0, 1.0}
            assert (matrix.sum(0) == 1).all() and (matrix.sum(1) == 1).all()
    with torch.no_grad():
        torch.testing.assert_close(result.models["model2@am"](images), result.models["model2"](images))

    # the merges, evaluated on the image folder (REPAIR names its merge's scores merged_*)
    for merge, prefix in (
        ("permuted-merge", ""), ("repaired-merge", "merged_"), ("direct-merge", ""), ("permuted-merge-wm", "")
    ):
        assert 0.0 <= float(tree[merge].ds[f"{prefix}accuracy"]) <= 1.0
        assert np.isfinite(float(tree[merge].ds[f"{prefix}loss"]))

    # regression: every layer; R² defined on all data at every sparsity level
    regression = tree["regression"].ds
    assert list(regression["layer"].values) == layers
    assert np.isfinite(regression["mean_r2"].values).all()
    for layer, width in zip(layers, widths):
        assert tree[f"regression/{layer}"].ds["topk_sample"].sizes["unit"] == width

    # metrics: one score per channel, in range, NaN exactly where a channel is constant
    activations = {
        model: collect(result.models[model], data, layers, model_name=model)
        for model in ("model1", "model2@am", "permuted-merge", "repaired-merge", "direct-merge")
    }

    def constant(model: str, layer: str) -> np.ndarray:
        values = activations[model][layer].values
        return (values == values[:1]).all(axis=0)

    for step, variable, models in (
        ("kendall-tau", "kendall_tau", ["model2@am", "permuted-merge", "repaired-merge", "direct-merge"]),
        ("kendall-tau-dprime", "kendall_tau", ["model2@am", "permuted-merge", "repaired-merge", "direct-merge"]),
        ("correlation", "correlation", ["model2@am", "permuted-merge", "repaired-merge", "direct-merge"]),
        ("clip-delta", "clip_delta", ["model2@am", "permuted-merge"]),
        ("merge-vs-parents", "kendall_tau", ["model1", "model2@am"]),
    ):
        reference = "permuted-merge" if step == "merge-vs-parents" else "model1"
        for layer, width in zip(layers, widths):
            score = tree[f"{step}/{layer}"].ds[variable]
            assert list(score["model"].values) == models
            assert score.sizes["unit"] == width
            for model in models:
                values = score.sel(model=model).values
                if variable == "clip_delta":
                    assert np.isfinite(values).all(), (step, layer, model)
                else:
                    undefined = constant(reference, layer) | constant(model, layer)
                    np.testing.assert_array_equal(np.isnan(values), undefined, err_msg=f"{step} {layer} {model}")
                    assert np.nanmax(np.abs(values)) <= 1 + 1e-9

    # categories of the permuted merge's channels: fractions per layer and overall sum to 1
    categories = tree["categories"].ds
    assert list(categories["layer"].values) == layers
    np.testing.assert_allclose(categories["category_fraction"].sum("category"), 1.0)
    np.testing.assert_allclose(float(categories["total_fraction"].sum()), 1.0)
    assert list(categories["category_count"].sum("category").values) == widths
    assert (out / "figures" / "categories" / "categories.png").is_file()

    # top-k: one grid per channel of every layer, seven rows (six models and the regression at 100 %)
    index = tree["top-k"].ds
    assert index.sizes["entry"] == sum(widths)
    assert list(index["row"].values) == [
        "model1", "model2", "model2@am", "permuted-merge", "repaired-merge", "direct-merge", "regression:100%"
    ]
    grids = [out / "figures" / "top-k" / str(f) for f in index["grid_file"].values]
    assert len(set(grids)) == sum(widths)
    assert all(g.is_file() for g in grids)
    with Image.open(grids[0]) as image:
        assert image.size[0] > image.size[1] > 0


@pytest.mark.parametrize(
    ("example", "arch", "layers"),
    [
        ("thesis-user-resnet18.toml", "resnet18", ["type:BasicBlock"]),
        ("thesis-user-alexnet.toml", "alexnet", ["features.1", "features.4", "features.7", "features.9", "features.11"]),
    ],
)
def test_the_user_model_examples_copy_the_thesis_steps(example, arch, layers):
    """The examples' [[steps]] tables are the thesis example's but for the layer names.

    Read as plain TOML: the checkpoints they name exist only after prepare.py has run.
    """
    thesis = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    ours = tomllib.loads((EXAMPLE.parent / example).read_text(encoding="utf-8"))
    assert set(ours) == set(thesis)
    assert ours["seed"] == thesis["seed"]
    assert ours["data"]["use"] == "imagefolder"
    assert [(m["name"], m["use"], m["arch"], "train" in m) for m in ours["models"]] == [
        ("model1", "torchvision", arch, False),
        ("model2", "torchvision", arch, False),
    ]
    assert ours["activations"] == {**thesis["activations"], "layers": layers}
    assert [s.get("layers") for s in thesis["steps"] if "layers" in s] == [EXAMPLE_LAYERS]
    assert ours["steps"] == [{**s, "layers": layers} if "layers" in s else s for s in thesis["steps"]]
