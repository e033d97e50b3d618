from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image
from simulated_device import SimulatedAccelerator
from torch import nn

from mergescope import ConfigError, Context, Step, TensorImageDataset
from mergescope.report import Panel
from mergescope.statistics import TopK
from mergescope.testing import check_component
from mergescope_plugins.feature_vis import (
    COLOUR_CORRELATION,
    INDEX_FILE,
    FeatureVis,
    apply_transforms,
    decorrelate_colour,
    fourier_image,
    gram_similarity,
    input_range,
    objective_values,
    redirected_relu_grad,
    spectrum_scale,
    to_input,
    transform_matrices,
)
from mergescope_plugins.zoo import SmallCNN

MEAN, STD = 0.1307, 0.3081  # MNIST's, as mnist5000 normalises

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The session's model cache is shared: a model trained here must be trained as the demo
# and the examples train it, with torch's own thread count (a different count rounds
# differently and would leave other weights under the same cache key).
TRAINING_THREADS = torch.get_num_threads()


# ----------------------------------------------------------------------------- helpers


@attrs.define
class ModelContext(Context):
    """A context that also holds the step's models as modules."""

    modules: dict[str, nn.Module] = attrs.field(factory=dict)


class FakeStore:
    """A recording stand-in: one TopK per (model, layer)."""

    def __init__(self, tops: dict[tuple[str, str], TopK]) -> None:
        self.tops = tops

    def topk(self, model: str, layer: str) -> TopK:
        return self.tops[(model, layer)]


def toy_data(n: int = 24, side: int = 12, seed: int = 0) -> TensorImageDataset:
    """Grey images with black and white pixels, normalised as MNIST is."""
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand((n, 1, side, side), generator=g) > 0.7).float() * torch.rand((n, 1, 1, 1), generator=g)
    pixels[0, 0, 0, 0], pixels[0, 0, 0, 1] = 0.0, 1.0
    return TensorImageDataset("toy", (pixels - MEAN) / STD, np.arange(n) % 2, np.arange(100, 100 + n), ["0", "1"])


def toy_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(widths=[4, 6, 6], batchnorm=True).build((1, 12, 12), 2).eval()


def toy_context(data=None, layers=("relu2",), **kwargs) -> Context:
    return Context(data=data if data is not None else toy_data(), quiet=True, layers=list(layers), **kwargs)


FAST = {"steps": 12, "tile": 24}


# --------------------------------------------------------------------------- the kit


def test_conformance():
    check_component(FeatureVis)
    check_component(FeatureVis(units=[0, 2], steps=3, parameterisation="pixel", batch=2, diversity=1.0))
    check_component(FeatureVis(objective="direction", directions=[[1, 0, 0], [0, 1, 0]], mean=[0.5], std=[0.25]))


def test_nothing_to_draw_without_context_models_or_layers(tmp_path):
    tree = xr.DataTree()
    assert FeatureVis().render(tree, tmp_path / "a") == []
    assert FeatureVis().render(tree, tmp_path / "b", context=toy_context(layers=())) == []


# ----------------------------------------------------------------- the paper's equations


def test_spectrum_scale_by_hand():
    # 2x2: |f| = [[0, 0.5], [0.5, sqrt(0.5)]]; 1 / max(|f|, 1/2).
    np.testing.assert_allclose(spectrum_scale(2, 2), [[2.0, 2.0], [2.0, 1 / np.sqrt(0.5)]])
    # Lucid's rfft2d_freqs for an even width, written out: rows fftfreq(h), columns fftfreq(w)[: w // 2 + 1].
    h, w = 5, 8
    fy, fx = np.fft.fftfreq(h)[:, None], np.abs(np.fft.fftfreq(w)[: w // 2 + 1])
    lucid = 1.0 / np.maximum(np.sqrt(fx**2 + fy**2), 1.0 / max(h, w))
    np.testing.assert_allclose(spectrum_scale(h, w), lucid)


def test_fourier_image_of_the_constant_term_and_against_numpy():
    # Only the constant term c: irfft2 (ortho) gives c / sqrt(HW) everywhere, scaled by 4 (= max(H, W)), / 4.
    spectrum = torch.zeros(1, 1, 4, 3, 2)
    spectrum[0, 0, 0, 0, 0] = 2.0
    image = fourier_image(spectrum, torch.as_tensor(spectrum_scale(4, 4), dtype=torch.float32), 4, 4)
    np.testing.assert_allclose(image.numpy(), np.full((1, 1, 4, 4), 2.0 * 4 / 4 / 4))
    g = torch.Generator().manual_seed(0)
    spectrum = torch.randn(2, 1, 6, 4, 2, generator=g)
    scale = spectrum_scale(6, 6)
    expected = np.fft.irfft2((spectrum[..., 0].numpy() + 1j * spectrum[..., 1].numpy()) * scale, s=(6, 6), norm="ortho")
    got = fourier_image(spectrum, torch.as_tensor(scale, dtype=torch.float32), 6, 6)
    np.testing.assert_allclose(got.numpy(), expected / 4, atol=1e-6)


def test_colour_decorrelation_by_hand():
    y = torch.zeros(1, 3, 1, 1)
    y[0, 0] = 1.0
    # Column 0 of Lucid's matrix over the largest column norm, sqrt(0.26^2 + 0.27^2 + 0.27^2).
    expected = np.array([0.26, 0.27, 0.27]) / np.sqrt(0.26**2 + 2 * 0.27**2)
    np.testing.assert_allclose(decorrelate_colour(y)[0, :, 0, 0].numpy(), expected, rtol=1e-6)
    assert COLOUR_CORRELATION.shape == (3, 3)


def test_input_range_recovers_the_normalisation():
    pixels = torch.tensor([0.0, 0.25, 1.0]).view(1, 1, 1, 3).repeat(2, 3, 1, 1)
    mean, std = np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.3, 0.4])
    images = (pixels - torch.tensor(mean).view(1, 3, 1, 1).float()) / torch.tensor(std).view(1, 3, 1, 1).float()
    got_mean, got_std = input_range(images)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-5)
    np.testing.assert_allclose(got_std, std, rtol=1e-5)
    back = to_input(pixels, torch.tensor(mean).float(), torch.tensor(std).float())
    np.testing.assert_allclose(back.numpy(), images.numpy(), rtol=1e-6)


def _transform(image: torch.Tensor, canvas: tuple[int, int], shift=(0.0, 0.0), scale=1.0, angle=0.0, last=(0.0, 0.0)):
    matrices = transform_matrices(
        torch.tensor([shift]),
        torch.tensor([scale]),
        torch.tensor([angle]),
        torch.tensor([last]),
        tuple(image.shape[-2:]),
        canvas,
    )
    return apply_transforms(image, matrices, canvas, torch.tensor([0.25]))[0, 0]


def test_transforms_keep_the_image_in_the_corner_and_move_it_as_drawn():
    image = torch.arange(9.0).view(1, 1, 3, 3) / 10
    canvas = _transform(image, (5, 5))
    np.testing.assert_allclose(canvas[:3, :3].numpy(), image[0, 0].numpy(), atol=1e-6)  # top-left, unchanged
    np.testing.assert_allclose(canvas[3:].numpy(), 0.25)  # the pad holds the background
    np.testing.assert_allclose(canvas[:, 3:].numpy(), 0.25)
    moved = _transform(image, (5, 5), shift=(1.0, 0.0))  # one pixel right: x -> x + 1
    np.testing.assert_allclose(moved[:3, 1:4].numpy(), image[0, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(moved[:3, 0].numpy(), 0.25, atol=1e-6)
    down = _transform(image, (5, 5), last=(0.0, 2.0))  # two pixels down
    np.testing.assert_allclose(down[2:5, :3].numpy(), image[0, 0].numpy(), atol=1e-6)


def test_rotation_turns_counter_clockwise_about_the_image_centre():
    image = torch.zeros(1, 1, 3, 3)
    image[0, 0, 0, 1] = 1.0  # top middle
    turned = _transform(image, (3, 3), angle=90.0)
    expected = np.zeros((3, 3))
    expected[1, 0] = 1.0  # a quarter turn counter-clockwise on screen: top middle -> middle left
    np.testing.assert_allclose(turned.numpy(), expected, atol=1e-5)


def test_objectives_by_hand():
    a = torch.tensor(
        [
            [[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]],
            [[[5.0, 5.0], [5.0, 5.0]], [[1.0, -1.0], [2.0, 6.0]]],
        ]
    )  # (2 images, 2 channels, 2 x 2)
    units = torch.tensor([0, 1])
    np.testing.assert_allclose(objective_values(a, units, "channel").numpy(), [2.5, 2.0])
    np.testing.assert_allclose(objective_values(a, units, "neuron").numpy(), [4.0, 6.0])  # centre (1, 1)
    directions = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    # image 0 reads direction 0: mean of a0 + a1 = (1 + 2 + 3 + 12) / 4; image 1 direction 1: mean of 2 a0 - a1.
    np.testing.assert_allclose(
        objective_values(a, units, "direction", directions).numpy(), [18 / 4, (9 + 11 + 8 + 4) / 4]
    )
    flat = torch.tensor([[3.0, 7.0]])  # a linear layer's output
    np.testing.assert_allclose(objective_values(flat, torch.tensor([1]), "channel").numpy(), [7.0])


def test_diversity_by_hand_and_against_lucid():
    # One unit, two images, two channels at one position: G0 = [[1, 0], [0, 0]], G1 = all ones / 2 after
    # normalising; <G0, G1> = 1/2 both ways, summed over i != j and divided by B = 2: 1/2.
    a = torch.tensor([[[1.0], [0.0]], [[1.0], [1.0]]])
    np.testing.assert_allclose(gram_similarity(a, 2).numpy(), [0.5])
    g = torch.Generator().manual_seed(0)
    acts = torch.rand(6, 4, 3, 3, generator=g)  # two units of three images
    got = gram_similarity(acts, 3)
    for u in range(2):
        layer = acts[3 * u : 3 * u + 3].reshape(3, 4, -1)
        grams = layer @ layer.transpose(1, 2)
        grams = grams / grams.flatten(1).norm(dim=1)[:, None, None]
        lucid = sum((grams[i] * grams[j]).sum() for i in range(3) for j in range(3) if i != j) / 3
        assert got[u].item() == pytest.approx(lucid.item(), rel=1e-5)


def test_redirected_relu_gradient_by_hand():
    # Image 0 gets an ordinary gradient (x > 0 at entry 1): it is kept. Image 1 gets none: every entry passes but
    # the one that would push a negative input lower (x < 0 and grad > 0, the loss being minimised).
    x = torch.tensor([[-1.0, 2.0], [-1.0, -2.0]])
    grad = torch.tensor([[-1.0, -1.0], [-1.0, 1.0]])
    np.testing.assert_allclose(redirected_relu_grad(x, grad).numpy(), [[0.0, -1.0], [-1.0, 0.0]])


# ------------------------------------------------------------------------ behaviour


def test_images_are_the_same_under_one_seed_and_differ_under_another():
    model, context = toy_cnn(), toy_context()
    first = FeatureVis(**FAST).visualize({"m": model}, context)
    second = FeatureVis(**FAST).visualize({"m": model}, context)
    xr.testing.assert_identical(first, second)
    other = FeatureVis(**FAST, seed=1).visualize({"m": model}, context)
    assert not np.array_equal(first["pixels"].values, other["pixels"].values)


def test_units_optimised_together_are_those_optimised_alone():
    model, context = toy_cnn(), toy_context()
    together = FeatureVis(**FAST, units=[0, 2, 5]).visualize({"m": model}, context)
    alone = FeatureVis(**FAST, units=[0, 2, 5], units_per_pass=1).visualize({"m": model}, context)
    one = FeatureVis(**FAST, units=[2]).visualize({"m": model}, context)
    np.testing.assert_allclose(together["activation_reached"], alone["activation_reached"], rtol=1e-4)
    assert np.abs(together["pixels"].values.astype(int) - alone["pixels"].values.astype(int)).max() <= 1
    np.testing.assert_allclose(together["activation_reached"].sel(unit=[2]), one["activation_reached"], rtol=1e-4)


@pytest.mark.parametrize("parameterisation", ["fourier", "pixel"])
def test_both_parameterisations_raise_the_objective(parameterisation):
    model, context = toy_cnn(), toy_context()
    ds = FeatureVis(steps=40, parameterisation=parameterisation).visualize({"m": model}, context)
    reached, initial = ds["activation_reached"].values, ds["activation_initial"].values
    assert ds["pixels"].dtype == np.uint8 and ds["pixels"].shape == (1, 1, 6, 1, 1, 12, 12)
    assert (reached > initial).mean() >= 0.8
    assert np.isfinite(ds["objective_curve"]).all() and ds["objective_curve"][0, 0, -1] > ds["objective_curve"][0, 0, 0]


def test_parameterisations_and_backgrounds_give_different_images():
    model, context = toy_cnn(), toy_context()
    a = FeatureVis(**FAST).visualize({"m": model}, context)["pixels"].values
    b = FeatureVis(**FAST, parameterisation="pixel").visualize({"m": model}, context)["pixels"].values
    c = FeatureVis(**FAST, background="grey").visualize({"m": model}, context)["pixels"].values
    d = FeatureVis(**FAST, background="mean").visualize({"m": model}, context)["pixels"].values
    assert not np.array_equal(a, b) and not np.array_equal(c, d)


def test_auto_start_is_the_plain_field_the_unit_responds_to_more():
    model, context = toy_cnn(), toy_context(layers=["relu1", "relu2"])
    ds = FeatureVis(**FAST).visualize({"m": model}, context)
    acts = {}
    for layer in ("relu1", "relu2"):
        getattr(model, layer).register_forward_hook(lambda _m, _i, out, _l=layer: acts.__setitem__(_l, out))
    responses = {}
    for name, value in (("grey", 0.5), ("mean", MEAN)):
        field = torch.full((1, 1, 12, 12), round(value * 255) / 255)  # as an 8-bit image holds it
        with torch.no_grad():
            model((field - MEAN) / STD)
        responses[name] = {layer: acts[layer][0].mean(dim=(1, 2)).numpy() for layer in acts}
    for li, layer in enumerate(("relu1", "relu2")):
        expected = np.where(responses["mean"][layer] > responses["grey"][layer], "mean", "grey")
        got = ds["start"].values[0, li, : len(expected)]
        np.testing.assert_array_equal(got, expected)
    assert set(np.unique(ds["start"].values)) <= {"grey", "mean", ""}
    assert (
        FeatureVis(**FAST, background="grey").visualize({"m": model}, context)["start"].values[0, 1].tolist()
        == ["grey"] * 6
    )


def test_direction_along_a_channel_is_the_channel_objective():
    model, context = toy_cnn(), toy_context()
    channel = FeatureVis(**FAST, units=[0, 1]).visualize({"m": model}, context)
    eye = np.eye(6)[:2].tolist()
    direction = FeatureVis(**FAST, objective="direction", directions=eye).visualize({"m": model}, context)
    np.testing.assert_allclose(direction["activation_reached"], channel["activation_reached"], rtol=1e-5)


def test_neuron_objective_reads_the_centre():
    model, context = toy_cnn(), toy_context()
    ds = FeatureVis(**FAST, objective="neuron", units=[1]).visualize({"m": model}, context)
    image = torch.as_tensor(ds["pixels"].values[0, 0, 0, 0], dtype=torch.float32)[None] / 255
    acts = {}
    model.relu2.register_forward_hook(lambda _m, _i, out: acts.__setitem__("a", out))
    with torch.no_grad():
        model(to_input(image, torch.tensor([MEAN]), torch.tensor([STD])))
    # relu2's map of a 12x12 image is 6x6: the centre is (3, 3).
    assert ds["activation_reached"].item() == pytest.approx(acts["a"][0, 1, 3, 3].item(), rel=1e-4)


def test_diversity_makes_a_units_images_differ_in_style():
    model, context = toy_cnn(), toy_context()
    acts = {}
    model.relu2.register_forward_hook(lambda _m, _i, out: acts.__setitem__("a", out))

    def similarity(diversity: float) -> np.ndarray:
        ds = FeatureVis(steps=30, units=[0, 1], batch=2, diversity=diversity).visualize({"m": model}, context)
        pixels = torch.as_tensor(ds["pixels"].values[0, 0], dtype=torch.float32).reshape(4, 1, 12, 12) / 255
        with torch.no_grad():
            model(to_input(pixels, torch.tensor([MEAN]), torch.tensor([STD])))
        return gram_similarity(acts["a"], 2).numpy()  # per unit, of its two final images

    assert (similarity(1.0) < 0.5 * similarity(0.0)).all()


def test_top_dataset_activation_is_the_largest_over_the_data():
    model, data = toy_cnn(), toy_data()
    ds = FeatureVis(**FAST, units=[0, 3]).visualize({"m": model}, toy_context(data))
    acts = {}
    model.relu2.register_forward_hook(lambda _m, _i, out: acts.__setitem__("a", out))
    with torch.no_grad():
        model(data.images)
    means = acts["a"].mean(dim=(2, 3)).double().numpy()
    np.testing.assert_allclose(ds["top_dataset_activation"].values[0, 0], means[:, [0, 3]].max(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(ds["top_dataset_sample"].values[0, 0], data.sample_ids[means[:, [0, 3]].argmax(0)])
    assert ds["top_dataset_source"].item() == "data"
    np.testing.assert_allclose(ds["input_mean"], [MEAN], rtol=1e-5)
    np.testing.assert_allclose(ds["input_std"], [STD], rtol=1e-5)


def test_top_dataset_activation_from_a_recorded_top_k():
    model, data = toy_cnn(), toy_data()
    acts = {}
    model.relu2.register_forward_hook(lambda _m, _i, out: acts.__setitem__("a", out))
    with torch.no_grad():
        model(data.images)
    means = acts["a"].mean(dim=(2, 3)).double().numpy()
    top = TopK(means.shape[1], 3)
    top.update(means, np.asarray(data.sample_ids))
    store = FakeStore({("m", "relu2"): top})
    context = toy_context(data, models=["m"], stores=lambda _m: store)
    ds = FeatureVis(**FAST).visualize({"m": model}, context)
    assert ds["top_dataset_source"].item() == "recording"
    np.testing.assert_allclose(ds["top_dataset_activation"].values[0, 0], means.max(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(ds["top_dataset_sample"].values[0, 0], data.sample_ids[means.argmax(axis=0)])


def test_layers_of_several_models_and_unequal_widths():
    models = {"a": toy_cnn(0), "b": toy_cnn(1)}
    ds = FeatureVis(**FAST, max_units=5).visualize(models, toy_context(layers=["relu1", "relu2"]))
    assert ds.sizes == {"model": 2, "layer": 2, "unit": 5, "image": 1, "step": 12, "channel": 1, "y": 12, "x": 12}
    reached = ds["activation_reached"].values
    assert np.isnan(reached[:, 0, 4]).all() and np.isfinite(reached[:, 0, :4]).all()  # relu1 has 4 units
    np.testing.assert_array_equal(ds["units_in_layer"].values, [[4, 6], [4, 6]])


def test_every_tensor_stays_on_the_models_device_and_the_result_equals_the_cpu_result():
    data = toy_data()
    options = {**FAST, "units": [0, 3], "diversity": 1.0, "batch": 2}
    expected = FeatureVis(**options).visualize({"m": toy_cnn()}, toy_context(data))
    with SimulatedAccelerator() as gpu:
        model = toy_cnn().to(gpu.device)
        result = FeatureVis(**options).visualize({"m": model}, toy_context(data, device=gpu.device))
        assert all(gpu.on_device(p) for p in model.parameters())
    xr.testing.assert_identical(result, expected)


# ---------------------------------------------------------------------- files and report


def test_render_writes_pngs_and_an_index_that_the_report_shows(tmp_path):
    model = toy_cnn()
    context = ModelContext(data=toy_data(), quiet=True, models=["m@x"], layers=["relu2"], modules={"m@x": model})
    out = tmp_path / "figures" / "fv"
    files = FeatureVis(**FAST, units=[1, 4]).render(xr.DataTree(), out, context=context)
    assert files[-1] == out / INDEX_FILE and all(Path(f).is_file() for f in files)
    ds = xr.open_dataset(out / INDEX_FILE).load()
    assert sorted(ds["image_file"].values.ravel().tolist()) == ["m_x/relu2/unit-0001.png", "m_x/relu2/unit-0004.png"]
    png = np.asarray(Image.open(out / "m_x/relu2/unit-0004.png"))
    assert png.shape == (24, 24)  # 12 pixels enlarged twice to the tile of 24
    np.testing.assert_array_equal(png[::2, ::2], ds["pixels"].values[0, 0, 1, 0, 0])
    # The reached objective is the one of the saved 8-bit image.
    acts = {}
    model.relu2.register_forward_hook(lambda _m, _i, out_: acts.__setitem__("a", out_))
    with torch.no_grad():
        model((torch.tensor(png[::2, ::2], dtype=torch.float32)[None, None] / 255 - MEAN) / STD)
    assert ds["activation_reached"].values[0, 0, 1, 0] == pytest.approx(acts["a"][0, 4].mean().item(), rel=1e-5)

    node = ds.assign(files=("file", [str(Path(f).relative_to(tmp_path)) for f in files]))
    panel = FeatureVis().report_panel(node, [Path(f).relative_to(tmp_path) for f in files], tmp_path)
    assert isinstance(panel, Panel)
    assert 'src="figures/fv/m_x/relu2/unit-0004.png"' in panel.html and "unit 4" in panel.html
    assert "m@x, relu2" in panel.html and INDEX_FILE in panel.html
    assert "2 units visualised over 1 layers of 1 models" in FeatureVis().describe(ds)


def test_render_without_modules_names_the_models(tmp_path):
    context = toy_context(models=["cnn0", "cnn1"])
    with pytest.raises(ConfigError, match="cnn0, cnn1") as info:
        FeatureVis().render(xr.DataTree(), tmp_path, context=context)
    assert info.value.where == "key 'models'"


# ----------------------------------------------------------------------------- guards


def test_unknown_layer_and_unit_outside_the_layer_are_named():
    model = toy_cnn()
    with pytest.raises(ConfigError, match="relu9") as info:
        FeatureVis(**FAST).visualize({"m": model}, toy_context(layers=["relu9"]))
    assert info.value.where == "key 'layers'"
    with pytest.raises(ConfigError, match="unit 7 is outside layer 'relu2', which has 6 units") as info:
        FeatureVis(**FAST, units=[0, 7]).visualize({"m": model}, toy_context())
    assert info.value.where == "key 'units'"


def test_directions_of_another_length_than_the_layer():
    with pytest.raises(ConfigError, match="the directions have 3 entries but layer 'relu2' of model 'm' has 6"):
        FeatureVis(**FAST, objective="direction", directions=[[1, 0, 0]]).visualize({"m": toy_cnn()}, toy_context())


def test_no_data_is_an_error():
    with pytest.raises(ConfigError, match=r"\[data\]"):
        FeatureVis(**FAST).visualize({"m": toy_cnn()}, Context(quiet=True, layers=["relu2"]))


@pytest.mark.parametrize(
    ("options", "key", "message"),
    [
        ({"mean": [0.5]}, "std", "'mean' is set but 'std' is not"),
        ({"mean": [0.5, 0.5], "std": [0.2]}, "std", "'mean' has 2 values but 'std' has 1"),
        ({"objective": "direction"}, "directions", "needs 'directions'"),
        ({"directions": [[1.0]]}, "directions", "only read with objective = 'direction'"),
        ({"objective": "direction", "directions": [[1.0]], "units": [0]}, "units", "'units' picks channels"),
        ({"diversity": 1.0}, "batch", "set batch >= 2"),
    ],
)
def test_options_that_contradict_each_other(options, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        FeatureVis(**options)
    assert info.value.where == f"key '{key}'"


def test_bad_option_values_name_the_key():
    with pytest.raises(ConfigError, match="objective"):
        Step("feature-vis", objective="channels")
    with pytest.raises(ConfigError, match="units"):
        Step("feature-vis", units=[1, 1])
    with pytest.raises(ConfigError, match="directions"):
        Step("feature-vis", objective="direction", directions=[[0, 0]])
    with pytest.raises(ConfigError, match="parameterisation"):
        Step("feature-vis", parameterisation="wavelet")


def test_mean_for_another_channel_count():
    with pytest.raises(ConfigError, match="'mean' has 2 values for images of 1 channels"):
        FeatureVis(**FAST, mean=[0.1, 0.2], std=[0.3, 0.3]).visualize({"m": toy_cnn()}, toy_context())


# ------------------------------------------------------------------- the demo's CNN


def test_optimised_images_beat_the_data_on_the_demo_cnn():
    """The demo's cnn0, trained as the demo trains it: >= 90 % of relu3's units beat their top dataset image."""
    from mergescope.training import Training, trained_model
    from mergescope_plugins.datasets import MNIST5000

    threads = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)
    try:
        model = trained_model(
            SmallCNN(widths=[16, 32, 64, 64], batchnorm=True), MNIST5000(split="train"), Training(seed=0, epochs=3)
        ).eval()
    finally:
        torch.set_num_threads(threads)
    data = MNIST5000(split="test").load()
    ds = FeatureVis().visualize({"cnn0": model}, Context(data=data, quiet=True, layers=["relu3"], batch_size=500))
    reached = ds["activation_reached"].values[0, 0, :, 0]
    top = ds["top_dataset_activation"].values[0, 0]
    assert reached.shape == (64,)
    assert (reached > top).mean() >= 0.9, f"{(reached > top).mean():.0%} of the units beat their top dataset image"
    assert ds["share_beating_dataset"].item() == pytest.approx((reached > top).mean())
