"""Tests of the crosscoder's latent dashboards: the math by hand, the sheets and histograms drawn, the panel's data.

The page itself (10,000 latents in Chromium, and the demo's report) is tested in
tests/test_demo_report.py.
"""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image

from mergescope.components import Context, TensorImageDataset
from mergescope.errors import ConfigError
from mergescope.heatmaps import overlay
from mergescope.options import structure_options
from mergescope.report import Panel, render_report
from mergescope_plugins.crosscoder import Crosscoder, CrosscoderPlots
from mergescope_plugins.latent_dashboard import (
    INDEX_FILE,
    JOINT,
    add_to_histogram,
    crosscoder_nodes,
    dashboard_data,
    dashboard_panel,
    gate,
    latent_histograms,
    model_parts,
    overlay_tiles,
    position_activations,
    typed_column,
    write_dashboards,
)
from mergescope_plugins.topk import display_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TYPES = {"f4": "<f4", "i4": "<i4", "u4": "<u4", "u2": "<u2", "u1": "u1"}


def column(c: dict) -> np.ndarray:
    """A typed column decoded as the page's script decodes it."""
    return np.frombuffer(base64.b64decode(c["b"]), dtype=TYPES[c["t"]]).reshape(c["s"])


# --------------------------------------------------------------------------- a toy crosscoder


def toy_result(threshold: float = float("nan")) -> xr.Dataset:
    """Two models (2 and 1 units), two latents, weights chosen so the numbers can be followed by hand."""
    encoder = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]], dtype=np.float32)
    norms = np.array([[1.0, 1.0], [2.0, 0.5]])
    return xr.Dataset(
        {
            "encoder": (("input", "latent"), encoder),
            "encoder_bias": ("latent", np.array([0.0, -0.5], dtype=np.float32)),
            "decoder_bias": ("input", np.array([0.5, 0.0, 1.0], dtype=np.float32)),
            "scale": ("model", [1.0, 2.0]),
            "units": ("model", [2, 1]),
            "decoder_norm": (("latent", "model"), norms),
            "relative_norm": (("latent", "model"), norms / norms.sum(1, keepdims=True)),
            "latent_class": ("latent", ["shared", "exclusive:a"]),
            "cosine": (("latent", "pair"), [[np.nan], [0.25]]),
            "density": ("latent", [0.5, 0.25]),
            "topk_sample": (("rank", "latent"), [[10, 11], [11, 10]]),
            "topk_value": (("rank", "latent"), [[3.0, 1.0], [1.0, 0.0]]),
            "threshold": ((), threshold),
        },
        coords={"latent": [0, 1], "model": ["a", "b"], "pair": ["a~b"], "rank": [0, 1], "layer": "conv"},
    )


def test_model_parts_by_hand():
    # Centred input (x - b_dec) = [0.5, 2, 2]; model a owns columns 0 and 1, model b column 2.
    x = np.array([[1.0, 2.0, 3.0]])
    ds = toy_result()
    parts = model_parts(x, ds["encoder"].values, ds["decoder_bias"].values, np.array([0, 0, 1]), 2)
    assert parts.shape == (2, 1, 2)
    np.testing.assert_allclose(parts[0, 0], [0.5 * 1 + 2 * 0, 0.5 * 0 + 2 * 1])  # a: [0.5, 2]
    np.testing.assert_allclose(parts[1, 0], [2 * 2, 2 * -1])  # b: [4, -2]
    # One latent per row: the same numbers, picked.
    rows = np.repeat(x, 2, axis=0)
    each = model_parts(rows, ds["encoder"].values, ds["decoder_bias"].values, np.array([0, 0, 1]), 2, np.array([1, 0]))
    np.testing.assert_allclose(each, [[2.0, 0.5], [-2.0, 4.0]])


def test_gate_is_relu_and_batchtopks_threshold():
    pre = np.array([[-1.0, 0.5, 2.0]])
    np.testing.assert_array_equal(gate(pre), [[0.0, 0.5, 2.0]])
    # BatchTopK keeps f where f * sum ||d|| > threshold: 0.5 * 1 = 0.5 < 0.8 is dropped, 2 * 1 = 2 kept.
    np.testing.assert_array_equal(gate(pre, np.array([1.0, 1.0, 1.0]), 0.8), [[0.0, 0.0, 2.0]])
    np.testing.assert_array_equal(gate(pre, np.array([1.0, 2.0, 1.0]), 0.8), [[0.0, 0.5, 2.0]])  # 0.5 * 2 > 0.8
    with pytest.raises(ValueError, match="decoder-norm weight"):
        gate(pre, None, 0.8)


def test_histogram_counts_by_hand_and_grows_by_merging_bins():
    counts = np.zeros((1, 1, 4), dtype=np.int64)
    high = np.array([1.0])
    # Bins of width 0.25 on [0, 1]; 0 and negatives are rows where the latent does not fire.
    add_to_histogram(counts, high, np.array([0.1, 0.3, 0.6, 1.0, 0.0, -1.0]).reshape(-1, 1, 1))
    assert counts.ravel().tolist() == [1, 1, 1, 1] and high.tolist() == [1.0]
    # 1.5 doubles the range to [0, 2]: bins merge pairwise into [2, 2, 0, 0], then 1.5 lands in [1.5, 2).
    add_to_histogram(counts, high, np.array([1.5]).reshape(1, 1, 1))
    assert counts.ravel().tolist() == [2, 2, 0, 1] and high.tolist() == [2.0]
    with pytest.raises(ValueError, match="even number of bins"):
        add_to_histogram(np.zeros((1, 1, 3), dtype=np.int64), np.ones(1), np.ones((1, 1, 1)))


def test_streamed_histogram_equals_one_histogram_of_all_values():
    rng = np.random.default_rng(0)
    values = rng.exponential(size=(500, 2, 3)) * [1.0, 5.0, 0.1] - 0.2  # some below 0, latents of other scales
    counts, high = np.zeros((3, 2, 8), dtype=np.int64), np.full(3, 0.01)
    for chunk in np.array_split(values, 7):
        add_to_histogram(counts, high, chunk)
    for i in range(3):
        assert values[:, :, i].max() <= high[i] < 2 * values[:, :, i].max()
        for r in range(2):
            v = values[:, r, i]
            expected, _ = np.histogram(v[v > 0], bins=8, range=(0, high[i]))
            assert counts[i, r].tolist() == expected.tolist()


def test_latent_histograms_match_a_direct_computation():
    ds = toy_result()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3)).astype(np.float32) * 2  # scaled input rows
    counts, high = latent_histograms(ds, lambda a, b: x[a:b], len(x), bins=4)
    assert counts.shape == (2, 3, 4)
    for i in range(2):
        w = ds["encoder"].values[:, i].astype(float)
        b = float(ds["encoder_bias"].values[i])
        c = x - ds["decoder_bias"].values
        rows = {
            JOINT: np.maximum(c @ w + b, 0),
            "a": np.maximum(c[:, :2] @ w[:2] + b, 0),
            "b": np.maximum(c[:, 2:] @ w[2:] + b, 0),
        }
        top = max(v.max() for v in rows.values())
        assert high[i] >= top and (high[i] == ds["topk_value"].values[0, i] or high[i] / 2 < top)
        for r, v in enumerate(rows.values()):
            expected, _ = np.histogram(v[v > 0], bins=4, range=(0, high[i]))
            assert counts[i, r].tolist() == expected.tolist()


def test_position_activations_encode_every_position_for_its_latent():
    ds = toy_result()
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 2, 2, 2)).astype(np.float32)  # model a: 2 units on a 2x2 grid
    b = rng.normal(size=(3, 1, 1, 1)).astype(np.float32)  # model b: 1 unit on a 1x1 grid, resized to 2x2
    latents = np.array([0, 1, 1])
    maps, grid = position_activations([a, b], ds, latents)
    assert grid == (2, 2) and maps.shape == (3, 3, 2, 2)
    w, bias, b_dec = ds["encoder"].values.astype(float), ds["encoder_bias"].values, ds["decoder_bias"].values
    for p, i in enumerate(latents):
        for y in range(2):
            for x in range(2):
                # A 1x1 map resized is the same value everywhere; model b's scale is 2.
                row = np.array([a[p, 0, y, x], a[p, 1, y, x], 2 * b[p, 0, 0, 0]]) - b_dec
                assert maps[p, 0, y, x] == pytest.approx(max(row @ w[:, i] + bias[i], 0), abs=1e-5)
                assert maps[p, 1, y, x] == pytest.approx(max(row[:2] @ w[:2, i] + bias[i], 0), abs=1e-5)
                assert maps[p, 2, y, x] == pytest.approx(max(row[2:] @ w[2:, i] + bias[i], 0), abs=1e-5)


def test_mean_over_positions_is_the_pooled_rows_pre_activation():
    """The pre-activation is affine: averaged over a map it is the pooled row's, which the crosscoder encodes."""
    ds = toy_result().assign(encoder_bias=("latent", np.array([50.0, 50.0], dtype=np.float32)))  # all positive
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 2, 3, 3)), rng.normal(size=(2, 1, 3, 3))
    maps, _ = position_activations([a, b], ds, np.array([0, 1]))
    pooled = np.concatenate([a.mean((2, 3)), 2 * b.mean((2, 3))], axis=1)
    parts = model_parts(pooled, ds["encoder"].values, ds["decoder_bias"].values, np.array([0, 0, 1]), 2)
    for p, i in enumerate([0, 1]):
        assert maps[p, 0].mean() == pytest.approx(parts[:, p, i].sum() + 50.0, rel=1e-5)


def test_batchtopk_gate_applies_to_maps():
    ds = toy_result(threshold=100.0)  # far above every value: nothing fires
    maps, _ = position_activations([np.ones((1, 2, 2, 2)), np.ones((1, 1, 2, 2))], ds, np.array([0]))
    assert not maps.any()


def test_overlay_tiles_draw_as_heatmaps_overlay():
    rng = np.random.default_rng(4)
    tiles = rng.integers(0, 256, size=(3, 12, 12, 3), dtype=np.uint8)
    maps = rng.normal(size=(3, 3, 3)).astype(np.float32)
    vmax = np.array([1.0, 0.5, 2.0])
    drawn = overlay_tiles(tiles, maps, vmax, (0, 0, 12, 12), alpha=0.4)
    for j in range(3):
        expected = overlay(tiles[j], maps[j], alpha=0.4, vmax=float(vmax[j])).astype(int)
        assert np.abs(drawn[j].astype(int) - expected).max() <= 1  # one 8-bit step: a table of the colour map
        assert (drawn[j] == expected).mean() > 0.9
    # Inside a box (a letterboxed image) only the box is drawn on.
    boxed = overlay_tiles(tiles, maps, vmax, (3, 0, 6, 12))
    np.testing.assert_array_equal(boxed[:, :3], tiles[:, :3])
    np.testing.assert_array_equal(boxed[:, 9:], tiles[:, 9:])


def test_typed_columns_round_trip_with_nan():
    values = np.array([[1.5, np.nan], [-2.0, 3.25]])
    c = typed_column(values, "f4")
    assert c["t"] == "f4" and c["s"] == [2, 2]
    np.testing.assert_array_equal(column(c), values.astype(np.float32))
    assert column(typed_column([0, 65535], "u2")).tolist() == [0, 65535]
    with pytest.raises(ValueError, match="unknown column type"):
        typed_column([1], "f8")


def test_dashboard_data_without_images():
    ds = toy_result()
    data = dashboard_data(ds)
    assert data["n"] == 2 and data["models"] == ["a", "b"] and data["pairs"] == ["a~b"] and data["k"] == 2
    assert data["classes"] == ["shared", "exclusive:a"]  # shared first
    assert column(data["cols"]["class"]).tolist() == [0, 1]
    assert np.isnan(column(data["cols"]["cosine"])[0, 0]) and column(data["cols"]["cosine"])[1, 0] == 0.25
    assert column(data["cols"]["max"]).tolist() == [3.0, 1.0]
    assert column(data["cols"]["top_sample"]).tolist() == [[10, 11], [11, 10]]  # (latent, rank)
    assert "hist" not in data and "sheets" not in data
    json.dumps(data, allow_nan=False)  # NaN travels inside the typed columns only


def test_crosscoder_nodes_skip_sweeps():
    sweep = toy_result().expand_dims(l1=[1.0, 2.0])
    tree = xr.DataTree.from_dict({"cc/conv": toy_result(), "sweep/conv": sweep, "other": xr.Dataset({"x": 1})})
    assert [p for p, _ in crosscoder_nodes(tree)] == ["cc/conv"]


# --------------------------------------------------------------------------- drawn from real maps


class Models(torch.nn.Module):
    """A tiny convolution with a 1-channel input: ``stride`` sets its map's grid."""

    def __init__(self, seed: int, channels: int, stride: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(1, channels, 3, stride=stride, padding=1)
        self.relu = torch.nn.ReLU()
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv(x)))


class FakeStore:
    def __init__(self, arrays: dict[str, xr.DataArray]) -> None:
        self.arrays = arrays

    def activation(self, model: str, layer: str) -> xr.DataArray:
        return self.arrays[model]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """A crosscoder fitted on two tiny conv models' maps (grids 8x8 and 4x4), and its dashboards drawn."""
    tmp = tmp_path_factory.mktemp("dashboard")
    g = torch.Generator().manual_seed(0)
    images = torch.rand((60, 1, 8, 8), generator=g)
    ids = np.arange(1000, 1060)
    models = {"a": Models(0, 4, 1), "b": Models(1, 3, 2)}
    arrays = {}
    with torch.no_grad():
        for name, model in models.items():
            model(images)  # the lazy head takes its size
            maps = model.relu(model.conv(images)).numpy()
            arrays[name] = xr.DataArray(
                maps,
                dims=("sample", "unit", "y", "x"),
                coords={"sample": ids, "unit": np.arange(maps.shape[1]), "label": ("sample", ids % 3),
                        "model": name, "layer": "relu"},
            )  # fmt: skip
    ds = Crosscoder(dictionary_size=12, epochs=4, batch_size=16, topk=4, checkpoint_every=4).fit(
        arrays, Context(quiet=True, workdir=tmp / "work")
    )
    data = TensorImageDataset("toy", images, ids % 3, ids, ["0", "1", "2"])
    context = Context(data=data, quiet=True, batch_size=16, stores=lambda m: FakeStore(arrays), modules=models)
    tree = xr.DataTree.from_dict({"cc/relu": ds})
    out = tmp / "run" / "figures" / "plots"
    files = write_dashboards(tree, out, context, tile=16, gap=2, bins=8)
    return {
        "ds": ds,
        "files": files,
        "out": out,
        "run": tmp / "run",
        "context": context,
        "tree": tree,
        "arrays": arrays,
    }


def test_sheets_hold_the_top_images_with_a_heatmap_row_per_model(drawn):
    ds, out = drawn["ds"], drawn["out"]
    index = xr.open_dataset(out / INDEX_FILE)
    values = ds["topk_value"].values  # (rank, latent)
    fired = values.max(axis=0) > 0
    assert fired.any() and (index["sprite_file"].values != "").tolist() == fired.tolist()
    assert list(index["row"].values) == [JOINT, "a", "b"]
    for i in np.flatnonzero(fired):
        assert index["sprite_rows"].values[i] == 3
        sheet = np.asarray(Image.open(out / str(index["sprite_file"].values[i])).convert("RGB"))
        assert sheet.shape == (3 * 16 + 2 * 2, 4 * 16 + 3 * 2, 3)
        for rank in range(4):
            tile = sheet[:16, rank * 18 : rank * 18 + 16]
            if values[rank, i] <= 0:  # a top sample where the latent is 0: left white
                assert (tile == 255).all()
            else:  # the image with its heatmap: not the plain grey image
                plain = display_images(drawn["context"].images([ds["topk_sample"].values[rank, i]]), 16)[0]
                assert tile.shape == plain.shape and not (tile == plain).all()
        assert index["heatmap_vmax"].values[i] > 0
    written = {p.name for p in (out / "cc-relu").iterdir()}
    assert written == {f"latent-{i:05d}.png" for i in np.flatnonzero(fired)}  # none for a latent that never fired


def test_sheet_heatmap_is_the_encoded_map_of_its_top_image(drawn):
    """The first row's first tile is overlay() of f_i at every position of the top image's maps."""
    ds, out, context = drawn["ds"], drawn["out"], drawn["context"]
    index = xr.open_dataset(out / INDEX_FILE)
    i = int(np.argmax(ds["topk_value"].values[0]))
    sample = int(ds["topk_sample"].values[0, i])
    images = context.images([sample])
    with torch.no_grad():
        maps = [context.modules[m].relu(context.modules[m].conv(images)).numpy() for m in ("a", "b")]
    encoded, _ = position_activations(maps, ds, np.array([i]))
    plain = display_images(images, 16)[0]
    expected = overlay(plain, encoded[0, 0], vmax=float(index["heatmap_vmax"].values[i])).astype(int)
    sheet = np.asarray(Image.open(out / str(index["sprite_file"].values[i])).convert("RGB")).astype(int)
    assert np.abs(sheet[:16, :16] - expected).max() <= 1


def test_histograms_count_the_rows_where_each_latent_fires(drawn):
    ds, out = drawn["ds"], drawn["out"]
    index = xr.open_dataset(out / INDEX_FILE)
    total = index["histogram"].values.sum(axis=-1)  # (latent, row)
    # Row "all models" is f_i itself: it fires on density * rows of the crosscoder's pooled rows.
    np.testing.assert_array_equal(total[:, 0], np.rint(ds["density"].values * 60).astype(int))
    high = index["histogram_high"].values
    top = ds["topk_value"].values[0]
    assert (high[top > 0] >= top[top > 0] * (1 - 1e-6)).all()


def test_drawing_is_deterministic(drawn, tmp_path):
    again = write_dashboards(drawn["tree"], tmp_path / "plots", drawn["context"], tile=16, gap=2, bins=8)
    assert [p.name for p in again] == [p.name for p in drawn["files"]]
    for a, b in zip(again, drawn["files"]):
        if a.suffix == ".png":
            assert a.read_bytes() == b.read_bytes()
    xr.testing.assert_identical(xr.open_dataset(again[-1]), xr.open_dataset(drawn["files"][-1]))


def test_without_models_the_sheets_are_images_only_and_without_data_nothing(drawn, tmp_path):
    context = Context(data=drawn["context"].data, quiet=True, batch_size=16)  # no modules, no recordings
    files = write_dashboards(drawn["tree"], tmp_path / "plain", context, tile=16, gap=2, bins=8)
    index = xr.open_dataset(tmp_path / "plain" / INDEX_FILE)
    assert set(index["sprite_rows"].values.tolist()) <= {0, 1} and index["sprite_rows"].values.max() == 1
    assert np.isnan(index["histogram_high"].values).all() and not index["histogram"].values.any()
    sheet = Image.open(files[0])
    assert sheet.size == (4 * 16 + 3 * 2, 16)
    assert write_dashboards(drawn["tree"], tmp_path / "none", Context(quiet=True)) == []
    assert write_dashboards(xr.DataTree(), tmp_path / "none", context) == []


def test_panel_embeds_the_table_and_links_the_sheets(drawn):
    run_dir, out = drawn["run"], drawn["out"]
    files = [p.relative_to(run_dir) for p in drawn["files"]]
    node = xr.open_dataset(out / INDEX_FILE).assign(files=("file", [f.as_posix() for f in files]))
    panel = dashboard_panel(node, files, run_dir, drawn["tree"])
    assert isinstance(panel, Panel) and 'mergescope.panel(".ms-latent-dashboard"' in panel.js
    assert panel.html.count('class="ms-latent-dashboard"') == 1 and "<img" not in panel.html  # sheets load on demand
    payload = re.search(r'<script type="application/json" class="ld-data">(.*?)</script>', panel.html).group(1)
    data = json.loads(payload)
    assert data["title"] == "cc/relu" and data["sheets"]["dir"] == "figures/plots/cc-relu/"
    assert data["sheets"]["files"] is None and data["sheets"]["labels"] == [JOINT, "a", "b"]
    rows = column(data["sheets"]["rows"])
    for i in np.flatnonzero(rows):
        assert (run_dir / data["sheets"]["dir"] / f"latent-{i:05d}.png").is_file()
    assert data["hist"]["rows"] == [JOINT, "a", "b"] and data["hist"]["bins"] == 8
    height, peak = column(data["hist"]["height"]), column(data["hist"]["peak"])
    counts = node["histogram"].values
    assert (peak == counts.max(axis=-1)).all() and ((height > 0) == (counts > 0)).all()
    assert (height[peak > 0].max(axis=-1) == 255).all()
    np.testing.assert_array_equal(
        column(data["cols"]["relative_norm"]), drawn["ds"]["relative_norm"].values.astype("f4")
    )


def test_report_shows_the_dashboard_of_the_plots_step(drawn):
    run_dir = drawn["run"]
    files = [p.relative_to(run_dir).as_posix() for p in drawn["files"]]
    node = xr.open_dataset(drawn["out"] / INDEX_FILE).assign(files=("file", files))
    tree = xr.DataTree.from_dict({"cc/relu": drawn["ds"], "plots": node})
    steps = {"cc": {"use": "crosscoder", "kind": "differ"}, "plots": {"use": "crosscoder-plots", "kind": "visualizer"}}
    page = render_report(run_dir, tree, info={"steps": steps}, components={"plots": CrosscoderPlots()})
    assert page.count('class="ms-latent-dashboard"') == 1 and page.count("function Dashboard(root)") == 1
    assert 'src="figures/plots/cc-relu/latent-' not in page  # no sheet is in the page until opened


def test_options_are_checked():
    with pytest.raises(ConfigError, match="histogram_bins.*even"):
        structure_options(CrosscoderPlots, {"histogram_bins": 31}, "crosscoder-plots")
    assert CrosscoderPlots(histogram_bins=8, tile=24, dashboard=False).histogram_bins == 8
