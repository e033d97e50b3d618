"""Where a unit fires (mergescope.heatmaps and the top-k heatmaps) and the optimised images beside the top-k."""

from __future__ import annotations

import json
import re

import attrs
import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image
from torch import nn

from mergescope import ConfigError, Context, TensorImageDataset, activations
from mergescope.errors import ContractError
from mergescope.heatmaps import COLOUR_MAPS, colourize, overlay, upsample
from mergescope.testing import check_component
from mergescope_plugins.topk import (
    INDEX_FILE,
    TopKGrids,
    _browser_assets,
    display_image,
    lead_width,
    map_peak,
    spatial_maps,
    unit_browser,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TILE, GAP = 16, 2
# matplotlib's inferno at 0, 12/16, 13/16 and 1, as 8-bit RGB.
INFERNO_0, INFERNO_12, INFERNO_13, INFERNO_1 = (0, 0, 4), (249, 142, 9), (252, 172, 17), (252, 255, 164)


# --------------------------------------------------------------- independent re-implementations


def bilinear(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with align_corners=False, written out: output pixel i samples source (i + 0.5) * h / H - 0.5."""

    def weights(n_in: int, n_out: int) -> np.ndarray:
        w = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            lo = min(int(np.floor(src)), n_in - 1)
            hi = min(lo + 1, n_in - 1)
            frac = src - lo
            w[i, lo] += 1 - frac
            w[i, hi] += frac
        return w

    return weights(amap.shape[0], size[0]) @ amap @ weights(amap.shape[1], size[1]).T


def inferno(m: np.ndarray) -> np.ndarray:
    stops = np.array(
        [
            (0, 0, 4), (11, 7, 36), (33, 12, 74), (61, 9, 101), (87, 16, 110), (113, 25, 110),
            (138, 34, 106), (163, 44, 97), (188, 55, 84), (210, 70, 68), (228, 90, 49), (241, 115, 29),
            (249, 142, 9), (252, 172, 17), (249, 203, 53), (242, 234, 105), (252, 255, 164),
        ],
        dtype=float,
    ) / 255  # fmt: skip
    grid = np.linspace(0, 1, 17)
    return np.stack([np.interp(m, grid, stops[:, c]) for c in range(3)], axis=-1)


def blend(image01: np.ndarray, amap: np.ndarray, alpha: float, vmax: float) -> np.ndarray:
    m = np.clip(bilinear(amap, image01.shape[:2]), 0, vmax) / vmax
    return np.rint(255 * ((1 - alpha) * image01 + alpha * inferno(m))).astype(np.uint8)


# ---------------------------------------------------------------------------- mergescope.heatmaps


def test_upsample_by_hand():
    amap = np.array([[0.0, 0.0], [0.0, 4.0]])
    # Rows and columns sample source positions -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1).
    ramp = np.array([0.0, 0.25, 0.75, 1.0])
    expected = 4 * np.outer(ramp, ramp)
    resized = upsample(amap, (4, 4))
    assert resized.dtype == np.float32 and resized.shape == (4, 4)
    np.testing.assert_allclose(resized, expected, atol=1e-6)
    assert expected[2, 2] == 2.25 and expected[3, 3] == 4.0
    np.testing.assert_allclose(upsample(np.arange(12.0).reshape(3, 4), (7, 5)), bilinear(np.arange(12.0).reshape(3, 4), (7, 5)), atol=1e-5)  # fmt: skip
    same = np.arange(6, dtype=np.int64).reshape(2, 3)
    assert upsample(same, (2, 3)).dtype == np.float32 and (upsample(same, (2, 3)) == same).all()


def test_the_hottest_pixel_is_on_the_patch_where_the_map_peaks():
    amap = np.zeros((4, 4))
    amap[2, 1] = 5.0  # fires on the image block rows 8..11, columns 4..7 of a 16 x 16 image
    resized = upsample(amap, (16, 16))
    y, x = np.unravel_index(np.argmax(resized), resized.shape)
    assert 8 <= y < 12 and 4 <= x < 8
    picture = overlay(np.zeros((16, 16), dtype=np.uint8), amap, alpha=1.0)
    heat = picture.astype(int).sum(axis=-1)
    hot = np.argwhere(heat == heat.max())
    assert ((hot[:, 0] >= 8) & (hot[:, 0] < 12) & (hot[:, 1] >= 4) & (hot[:, 1] < 8)).all()
    assert map_peak(amap) == (2.5 / 4, 1.5 / 4)


def test_overlay_shapes_dtypes_and_values_by_hand():
    amap = np.array([[0.0, -3.0], [1.0, 2.0]])
    grey = np.full((6, 4), 128, dtype=np.uint8)
    out = overlay(grey, amap)
    assert out.shape == (6, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(
        out, blend(np.full((6, 4, 3), 128 / 255), amap, 0.5, 2.0)
    )  # resized, then negatives clipped
    rgb = np.random.default_rng(0).random((5, 7, 3))
    out = overlay(rgb, amap, alpha=0.25, vmax=1.0)  # values above vmax saturate
    np.testing.assert_array_equal(out, blend(rgb, amap, 0.25, 1.0))
    # alpha 0: the image; alpha 1 with a map that is nowhere positive: the bottom colour everywhere.
    np.testing.assert_array_equal(overlay(rgb, amap, alpha=0.0), np.rint(rgb * 255).astype(np.uint8))
    flat = overlay(rgb, -np.ones((2, 2)), alpha=1.0)
    assert (flat == INFERNO_0).all()
    assert overlay(np.zeros((3, 3, 1)), np.ones((1, 1))).shape == (3, 3, 3)


def test_colour_maps_without_matplotlib_tables():
    np.testing.assert_allclose(colourize(np.array([0.0, 0.75, 1.0])) * 255, [INFERNO_0, INFERNO_12, INFERNO_1])
    np.testing.assert_allclose(colourize(np.array([12.25 / 16])) * 255, [[249.75, 149.5, 11.0]])
    assert set(COLOUR_MAPS) >= {"inferno", "viridis", "gray"}
    assert (colourize(np.array([-1.0, 2.0]), "gray") == [[0, 0, 0], [1, 1, 1]]).all()


def test_overlay_guards_name_what_is_wrong():
    image, amap = np.zeros((4, 4), np.uint8), np.ones((2, 2))
    with pytest.raises(ConfigError, match=r"key 'alpha'.*\[0, 1\], got 1.5"):
        overlay(image, amap, alpha=1.5)
    with pytest.raises(ConfigError, match=r"key 'vmax'.*positive finite"):
        overlay(image, amap, vmax=0.0)
    with pytest.raises(ConfigError, match=r"key 'cmap'.*unknown colour map 'infern'.*Did you mean 'inferno'"):
        overlay(image, amap, cmap="infern")
    with pytest.raises(ContractError, match=r"float image must hold values in \[0, 1\]"):
        overlay(np.full((4, 4), 2.0), amap)
    with pytest.raises(ContractError, match=r"image must be \(H, W\) or \(H, W, 3\)"):
        overlay(np.zeros((4, 4, 2)), amap)
    with pytest.raises(ContractError, match=r"2-D activation map"):
        upsample(np.ones((1, 2, 2)), (4, 4))
    with pytest.raises(ContractError, match="NaN or inf"):
        overlay(image, np.array([[np.nan, 1.0]]))
    with pytest.raises(ContractError, match="two positive integers"):
        upsample(amap, (0, 4))


# ------------------------------------------------------------------------------- a toy model


class PatchNet(nn.Module):
    """Unit 0 is the 2 x 2 mean of the image (fires on bright patches), unit 1 of its negative."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1))
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.relu(self.conv(x))).flatten(1))


# Image i is black with a white-ish 2 x 2 patch on pool cell CELLS[i], of strength 1 - i / 20.
CELLS = [(0, 0), (3, 2), (1, 3), (2, 1), (0, 3), (3, 0), (1, 1), (2, 2)]


def patch_data() -> TensorImageDataset:
    images = torch.zeros((len(CELLS), 1, 8, 8))
    for i, (cy, cx) in enumerate(CELLS):
        images[i, 0, 2 * cy : 2 * cy + 2, 2 * cx : 2 * cx + 2] = 1.0 - i / 20
    return TensorImageDataset("patches", images, np.zeros(len(CELLS), np.int64), np.arange(10, 10 + len(CELLS)), ["0"])


def recorded(tmp_path, layers=("pool",), models=("a", "b"), k=3) -> Context:
    data = patch_data()
    torch.manual_seed(0)
    modules = {m: PatchNet().eval() for m in models}
    context = Context(data=data, quiet=True, batch_size=3, workdir=tmp_path / "rec")
    store = context.record(modules, {m: list(layers) for m in modules}, topk=k, keep_activations=False)
    return attrs.evolve(context, models=list(models), layers=list(layers), stores=lambda m: store, modules=modules)


def tile_of(png, row: int, rank: int, rows: int, k: int) -> np.ndarray:
    pixels = np.asarray(Image.open(png).convert("RGB"))
    top = pixels.shape[0] - (rows * TILE + (rows - 1) * GAP) + row * (TILE + GAP)
    left = pixels.shape[1] - (k * TILE + (k - 1) * GAP) + rank * (TILE + GAP)
    return pixels[top : top + TILE, left : left + TILE]


def test_heatmaps_show_where_the_unit_fires(tmp_path):
    context = recorded(tmp_path)
    files = TopKGrids(heatmaps=True, tile=TILE, gap=GAP).render(xr.DataTree(), tmp_path / "grids", context=context)
    names = sorted(f.relative_to(tmp_path / "grids").as_posix() for f in files if f.suffix == ".png")
    assert names == ["pool/unit-0000-heatmap.png", "pool/unit-0000.png", "pool/unit-0001-heatmap.png", "pool/unit-0001.png"]  # fmt: skip
    index = xr.open_dataset(tmp_path / "grids" / INDEX_FILE).load()
    assert list(index["heatmap_file"].values) == ["pool/unit-0000-heatmap.png", "pool/unit-0001-heatmap.png"]
    data = patch_data()
    ids = index["topk_sample"].sel(row="a").isel(entry=0).values
    assert list(ids) == [10, 11, 12]  # the strongest patches first
    for rank, sample in enumerate(ids):
        i = int(sample) - 10
        cy, cx = CELLS[i]
        strength = 1.0 - i / 20
        np.testing.assert_allclose(index["heatmap_peak_y"].isel(entry=0, rank=rank).values, (cy + 0.5) / 4)
        np.testing.assert_allclose(index["heatmap_peak_x"].isel(entry=0, rank=rank).values, (cx + 0.5) / 4)
        np.testing.assert_allclose(index["heatmap_max"].isel(entry=0, rank=rank).values, strength, rtol=1e-6)
        # The whole tile, by hand: the displayed image (black, patch white) under the map, row-wide scale.
        amap = np.zeros((4, 4))
        amap[cy, cx] = np.float32(strength)  # the model's value, in its precision
        shown = display_image(data.images[i], TILE).astype(float) / 255
        expected = blend(shown, amap, 0.5, vmax=1.0)  # the row's largest map maximum: image 10's 1.0
        for row in (0, 1):
            np.testing.assert_array_equal(tile_of(tmp_path / "grids/pool/unit-0000-heatmap.png", row, rank, 2, 3), expected)  # fmt: skip
        # the plain grid keeps the image
        np.testing.assert_array_equal(tile_of(tmp_path / "grids/pool/unit-0000.png", 0, rank, 2, 3), display_image(data.images[i], TILE))  # fmt: skip
    np.testing.assert_allclose(index["heatmap_vmax"].isel(entry=0).values, 1.0, rtol=1e-6)
    # Unit 1 (the negative image, after the ReLU) is silent on every image: its maps draw as the bottom colour.
    assert (index["heatmap_max"].isel(entry=1) == 0).all()
    i = int(index["topk_sample"].isel(entry=1, row=0, rank=0)) - 10
    shown = display_image(data.images[i], TILE).astype(float) / 255
    bottom = np.rint(255 * (0.5 * shown + 0.5 * np.array(INFERNO_0) / 255)).astype(np.uint8)
    np.testing.assert_array_equal(tile_of(tmp_path / "grids/pool/unit-0001-heatmap.png", 0, 0, 2, 3), bottom)
    assert "heatmaps for 2" in TopKGrids().describe(index)


def test_heatmap_scales_and_determinism(tmp_path):
    context = recorded(tmp_path)
    first = TopKGrids(heatmaps=True, heatmap_scale="image", tile=TILE, gap=GAP)
    first.render(xr.DataTree(), tmp_path / "one", context=context)
    first.render(xr.DataTree(), tmp_path / "two", context=context)
    for name in ("unit-0000-heatmap.png", "unit-0001-heatmap.png"):
        assert (tmp_path / "one/pool" / name).read_bytes() == (tmp_path / "two/pool" / name).read_bytes()
    index = xr.open_dataset(tmp_path / "one" / INDEX_FILE).load()
    np.testing.assert_array_equal(index["heatmap_vmax"].values, index["heatmap_max"].values)  # each its own
    TopKGrids(heatmaps=True, heatmap_scale="unit", tile=TILE, gap=GAP).render(xr.DataTree(), tmp_path / "u", context=context)  # fmt: skip
    unit = xr.open_dataset(tmp_path / "u" / INDEX_FILE).load()
    top = unit["heatmap_max"].max(dim=("row", "rank"))
    np.testing.assert_allclose(unit["heatmap_vmax"].values, np.broadcast_to(top.values[:, None, None], (2, 2, 3)))


def test_layers_without_positions_get_no_heatmap(tmp_path):
    context = recorded(tmp_path, layers=("pool", "head"))
    files = TopKGrids(heatmaps=True, tile=TILE, gap=GAP, units=[0]).render(xr.DataTree(), tmp_path / "g", context=context)  # fmt: skip
    assert sorted(f.name for f in files if f.suffix == ".png" and f.parent.name == "head") == ["unit-0000.png"]
    index = xr.open_dataset(tmp_path / "g" / INDEX_FILE).load()
    assert list(index["heatmap_file"].values) == ["pool/unit-0000-heatmap.png", ""]
    assert np.isnan(index["heatmap_peak_y"].isel(entry=1)).all()


def test_spatial_maps_of_conv_token_and_flat_outputs():
    conv = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    np.testing.assert_array_equal(spatial_maps(conv, 3), conv.numpy())
    assert spatial_maps(torch.ones(2, 3), 3) is None
    with pytest.raises(ConfigError, match=r"key 'heatmaps'.*with the top-k's 5 units"):
        spatial_maps(conv, 5)
    if not hasattr(activations, "token_grid"):
        pytest.skip("this core has no token_grid")
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # a class token and a 2 x 2 grid
    maps = spatial_maps(tokens, 3)
    assert maps.shape == (2, 3, 2, 2)
    np.testing.assert_array_equal(maps[1, 2], tokens[1, 1:, 2].reshape(2, 2).numpy())  # row-major patches
    square = spatial_maps(tokens[:, 1:], 3)  # four tokens: patches alone
    np.testing.assert_array_equal(square, maps)


def test_heatmap_option_errors(tmp_path):
    context = recorded(tmp_path)
    without = attrs.evolve(context, modules={})
    with pytest.raises(ConfigError, match=r"key 'heatmaps'.*no module for 'a', 'b'"):
        TopKGrids(heatmaps=True).render(xr.DataTree(), tmp_path / "x", context=without)
    assert not (tmp_path / "x").exists()  # refused before any work
    node = xr.Dataset({"topk_sample": (("rank", "unit"), np.array([[10, 11]]))})
    with pytest.raises(ConfigError, match=r"key 'heatmaps'.*model_rows = false"):
        TopKGrids(heatmaps=True, model_rows=False, rows_from=["r"]).render(
            xr.DataTree.from_dict({"r/pool": node}), tmp_path / "y", context=context
        )
    with pytest.raises(ValueError, match=r"'heatmap_scale' must be one of 'image', 'row', 'unit'"):
        TopKGrids(heatmap_scale="layer")
    with pytest.raises(ValueError, match="'heatmap_alpha'"):
        TopKGrids(heatmap_alpha=1.5)
    with pytest.raises(ValueError, match="'heatmaps' must be true or false"):
        TopKGrids(heatmaps=1)
    with pytest.raises(ValueError, match="'optimised' must be a non-empty string or unset"):
        TopKGrids(optimised="")
    check_component(TopKGrids(heatmaps=True, heatmap_scale="unit", heatmap_alpha=0.3, optimised="fv"))


# ---------------------------------------------------------------------------- optimised images


def feature_vis(context: Context, out: str, tmp_path, units=(0, 1)) -> xr.DataTree:
    """A real feature-vis step's results, its files where a run puts them (beside the grids' folder)."""
    from mergescope_plugins.feature_vis import FeatureVis

    fv = FeatureVis(units=list(units), steps=3, tile=16, transforms=False)
    ds = fv.visualize({m: context.modules[m] for m in context.models}, context, tmp_path / "figures" / out)
    return xr.DataTree.from_dict({out: ds})


def test_the_optimised_image_sits_beside_each_models_row(tmp_path):
    context = recorded(tmp_path)
    results = feature_vis(attrs.evolve(context, models=["a"]), "fv", tmp_path)  # model b was not visualised
    grids = tmp_path / "figures" / "grids"
    TopKGrids(optimised="fv", tile=TILE, gap=GAP).render(results, grids, context=context)
    TopKGrids(tile=TILE, gap=GAP).render(results, tmp_path / "plain", context=context)
    index = xr.open_dataset(grids / INDEX_FILE).load()
    fv = results["fv"].to_dataset()
    reached = fv["activation_reached"].sel(model="a", layer="pool").values[:, 0]
    np.testing.assert_allclose(index["optimised_activation"].sel(row="a").values, reached)
    assert np.isnan(index["optimised_activation"].sel(row="b")).all()
    files = index["optimised_file"].sel(row="a").values
    assert list(files) == ["../fv/a/pool/unit-0000.png", "../fv/a/pool/unit-0001.png"]
    assert all((grids / f).is_file() for f in files) and list(index["optimised_file"].sel(row="b").values) == ["", ""]
    assert "; 2 optimised images)" in TopKGrids().describe(index)

    png = np.asarray(Image.open(grids / "pool/unit-0001.png").convert("RGB"))
    plain = np.asarray(Image.open(tmp_path / "plain/pool/unit-0001.png").convert("RGB"))
    assert png.shape[1] - plain.shape[1] >= lead_width(TILE, GAP) and png.shape[0] > plain.shape[0]  # column + caption
    left = png.shape[1] - (3 * TILE + 2 * GAP) - lead_width(TILE, GAP)
    top = png.shape[0] - (2 * TILE + GAP)
    expected = display_image(fv["pixels"].sel(model="a", layer="pool", unit=1).values[0], TILE)
    np.testing.assert_array_equal(png[top : top + TILE, left : left + TILE], expected)
    row_b = png[top + TILE + GAP : top + 2 * TILE + GAP, left : left + TILE]
    assert (row_b == 255).all()  # b has no optimised image: an empty tile
    np.testing.assert_array_equal(tile_of(grids / "pool/unit-0001.png", 1, 2, 2, 3), tile_of(tmp_path / "plain/pool/unit-0001.png", 1, 2, 2, 3))  # fmt: skip
    assert "optimised_file" not in xr.open_dataset(tmp_path / "plain" / INDEX_FILE)

    # Without the pixels (a large feature-vis run keeps only its PNGs) the images come from the files.
    lean = xr.DataTree.from_dict({"fv": fv.drop_vars("pixels")})
    TopKGrids(optimised="fv", tile=TILE, gap=GAP).render(lean, tmp_path / "figures" / "lean", context=context)
    png = np.asarray(Image.open(tmp_path / "figures/lean/pool/unit-0001.png").convert("RGB"))
    saved = np.asarray(Image.open(tmp_path / "figures/fv/a/pool/unit-0001.png"))
    np.testing.assert_array_equal(png[top : top + TILE, left : left + TILE], display_image(saved, TILE))


def test_heatmaps_and_optimised_images_together_in_the_browser(tmp_path):
    context = recorded(tmp_path)
    results = feature_vis(context, "fv", tmp_path, units=(0,))
    grids = tmp_path / "figures" / "grids"
    files = TopKGrids(optimised="fv", heatmaps=True, tile=TILE, gap=GAP).render(results, grids, context=context)
    heat = np.asarray(Image.open(grids / "pool/unit-0000-heatmap.png").convert("RGB"))
    plain = np.asarray(Image.open(grids / "pool/unit-0000.png").convert("RGB"))
    assert heat.shape == plain.shape
    left = heat.shape[1] - (3 * TILE + 2 * GAP) - lead_width(TILE, GAP)
    np.testing.assert_array_equal(heat[:, : left + TILE], plain[:, : left + TILE])  # labels and optimised column alike
    assert not (heat[:, left + TILE :] == plain[:, left + TILE :]).all()

    node = xr.open_dataset(grids / INDEX_FILE).load()
    rel = [f.relative_to(tmp_path) for f in files]
    html = unit_browser(node, tmp_path, xr.DataTree(), files=rel)
    data = json.loads(re.search(r'class="ms-data">(.*?)</script>', html).group(1))
    layer = data["layers"][0]
    assert layer["heatmaps"] == ["figures/grids/pool/unit-0000-heatmap.png", "figures/grids/pool/unit-0001-heatmap.png"]
    assert layer["rows"] == ["a", "b"]
    assert layer["optimised"] == [["figures/fv/a/pool/unit-0000.png", "figures/fv/b/pool/unit-0000.png"], ["", ""]]
    assert all((tmp_path / f).is_file() for f in layer["optimised"][0])
    _, js = _browser_assets()
    assert 'img.loading = "lazy"' in js and "where it fires" in js


def test_optimised_option_errors(tmp_path):
    context = recorded(tmp_path)
    tau = xr.DataTree.from_dict({"tau/pool": xr.Dataset({"x": ("unit", np.zeros(2))})})
    with pytest.raises(ConfigError, match=r"key 'optimised'.*'fv' is not a step .*earlier steps: tau"):
        TopKGrids(optimised="fv").render(tau, tmp_path / "a", context=context)
    with pytest.raises(ConfigError, match=r"key 'optimised'.*'tau' holds no feature-vis images"):
        TopKGrids(optimised="tau").render(tau, tmp_path / "b", context=context)
    other = xr.Dataset(
        {"activation_reached": (("model", "layer", "unit", "image"), np.ones((1, 1, 1, 1))),
         "pixels": (("model", "layer", "unit", "image", "channel", "y", "x"), np.zeros((1, 1, 1, 1, 1, 2, 2)))},
        coords={"model": ["c"], "layer": ["pool"], "unit": [0]},
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"key 'optimised'.*visualised models \['c'\].*none of which"):
        TopKGrids(optimised="fv").render(xr.DataTree.from_dict({"fv": other}), tmp_path / "c", context=context)
