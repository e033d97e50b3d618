from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image

import mergescope_plugins.topk as topk_module
from mergescope import ConfigError, Context, ModelSpec, Pipeline, Step, TensorImageDataset, run
from mergescope.pipeline import ActivationSpec
from mergescope.statistics import TopK
from mergescope.testing import check_component
from mergescope_plugins.topk import (
    INDEX_FILE,
    TopKGrids,
    _browser_assets,
    _Text,
    display_image,
    has_unit_index,
    safe_name,
    unit_browser,
    unit_browser_panel,
)

TILE, GAP = 16, 2


# ----------------------------------------------------------------------------- helpers


class FakeStore:
    """A recording stand-in: one TopK per (model, layer)."""

    def __init__(self, tops: dict[tuple[str, str], TopK]) -> None:
        self.tops = tops

    def topk(self, model: str, layer: str) -> TopK:
        return self.tops[(model, layer)]


def make_topk(values: np.ndarray, ids: np.ndarray, k: int) -> TopK:
    top = TopK(values.shape[1], k)
    top.update(values, ids)
    return top


def fake_context(data, models=("a", "b"), layers=("relu1",), units=3, k=4, seed=0, context_cls=Context) -> Context:
    rng = np.random.default_rng(seed)
    ids = np.asarray(data.sample_ids)
    tops = {(m, layer): make_topk(rng.normal(size=(len(ids), units)), ids, k) for m in models for layer in layers}
    store = FakeStore(tops)
    return context_cls(data=data, quiet=True, models=list(models), layers=list(layers), stores=lambda m: store)


def tensor_dataset(n: int = 12, shape=(1, 10, 10), seed: int = 0) -> TensorImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn((n, *shape), generator=g)
    return TensorImageDataset("toy", images, np.arange(n) % 2, np.arange(50, 50 + n), ["0", "1"])


def grid_geometry(png, rows: int, k: int, tile: int = TILE, gap: int = GAP) -> tuple[np.ndarray, int, int]:
    """The PNG as an array and the top-left corner of its tiles (they fill the bottom-right corner)."""
    pixels = np.asarray(Image.open(png).convert("RGB"))
    grid_h, grid_w = rows * tile + (rows - 1) * gap, k * tile + (k - 1) * gap
    return pixels, pixels.shape[0] - grid_h, pixels.shape[1] - grid_w


def tile_at(pixels: np.ndarray, top: int, left: int, row: int, rank: int, tile: int = TILE, gap: int = GAP):
    y, x = top + row * (tile + gap), left + rank * (tile + gap)
    return pixels[y : y + tile, x : x + tile]


# --------------------------------------------------------------------------- the kit


def test_conformance():
    check_component(TopKGrids)
    check_component(
        TopKGrids(k=5, units=[0, 3], max_units=2, rows_from=["regression"], metrics=["tau"], tile=32, gap=0)
    )


def test_nothing_to_draw_without_context_or_models(tmp_path):
    tree = xr.DataTree()
    assert TopKGrids().render(tree, tmp_path / "a") == []
    assert TopKGrids().render(tree, tmp_path / "b", context=Context(data=tensor_dataset(), quiet=True)) == []


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="'units'"):
        TopKGrids(units=[-1])
    with pytest.raises(ValueError, match="'rows_from'"):
        TopKGrids(rows_from=[""])
    with pytest.raises(ValueError, match="tile"):
        TopKGrids(tile=2)


# ------------------------------------------------------------------- images and layout


def test_display_image_normalises_and_letterboxes():
    grey = torch.tensor([[[-2.0, 0.0], [2.0, 6.0]]])  # (1, 2, 2): min-max -> 0, 64, 128, 255
    tile = display_image(grey, 4)
    assert tile.shape == (4, 4, 3) and tile.dtype == np.uint8
    assert (tile[..., 0] == tile[..., 2]).all()  # grey RGB
    assert tile[0, 0, 0] == 0 and tile[3, 3, 0] == 255 and tile[0, 2, 0] == 64  # nearest-neighbour enlargement
    wide = display_image(np.random.default_rng(0).normal(size=(3, 10, 20)), 16)  # 2:1 -> 16 x 8, centred
    assert (wide[:4] == 255).all() and (wide[12:] == 255).all() and not (wide[4:12] == 255).all()
    assert (display_image(np.full((1, 5, 5), 3.0), 8) == 0).all()  # constant image: black
    with pytest.raises(ValueError, match=r"\(1 or 3, H, W\)"):
        display_image(np.zeros((2, 4, 4)), 8)


def test_safe_names():
    assert safe_name("layer1.0") == "layer1.0"
    assert safe_name("relu1@in") == "relu1_in"
    assert safe_name("a/b c") == "a_b_c" and safe_name("..") == "_"


class VariedSizes(torch.utils.data.Dataset):
    """Images of different sizes and channels: a folder of photos as a dataset."""

    name = "varied"
    classes = ("0",)

    def __init__(self, n: int = 9) -> None:
        g = torch.Generator().manual_seed(0)
        shapes = [(1, 28, 28), (3, 64, 64), (1, 20, 40), (3, 50, 30)]
        self.images = [torch.rand(shapes[i % len(shapes)], generator=g) for i in range(n)]
        self.sample_ids = np.arange(10, 10 + n)
        self.labels = np.zeros(n, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], 0

    @property
    def input_shape(self):
        return tuple(self.images[0].shape)


def test_images_of_mixed_sizes_tile_consistently(tmp_path):
    data = VariedSizes()
    context = fake_context(data, units=2, k=3)
    files = TopKGrids(tile=TILE, gap=GAP).render(xr.DataTree(), tmp_path, context=context)
    pngs = [f for f in files if f.suffix == ".png"]
    assert [f.relative_to(tmp_path).as_posix() for f in pngs] == ["relu1/unit-0000.png", "relu1/unit-0001.png"]
    shapes = {np.asarray(Image.open(f)).shape for f in pngs}
    assert len(shapes) == 1 and Image.open(pngs[0]).mode == "RGB"  # some images have three channels
    top = context.topk("b", "relu1")
    for unit, png in enumerate(pngs):
        pixels, y0, x0 = grid_geometry(png, rows=2, k=3)
        for rank in range(3):
            sample = int(top.sample_ids[rank, unit])
            expected = display_image(data[int(np.flatnonzero(data.sample_ids == sample)[0])][0], TILE)
            np.testing.assert_array_equal(tile_at(pixels, y0, x0, row=1, rank=rank), expected)


@attrs.define
class CountingContext(Context):
    """Counts the ids each ``images`` call asks for."""

    calls: list = attrs.field(factory=list)

    def images(self, sample_ids):
        self.calls.append(sorted(int(i) for i in np.asarray(sample_ids).ravel()))
        return super().images(sample_ids)


def test_each_image_is_loaded_once(tmp_path):
    data = tensor_dataset(n=30)
    context = fake_context(data, models=("a", "b", "c"), layers=("l1", "l2"), units=5, k=4, context_cls=CountingContext)
    TopKGrids().render(xr.DataTree(), tmp_path, context=context)
    loaded = [i for call in context.calls for i in call]
    assert len(loaded) == len(set(loaded))  # never twice, across units, rows and layers
    assert len(context.calls) <= 2  # one call per layer at most
    first = {int(i) for m in "abc" for i in context.topk(m, "l1").sample_ids.ravel()}
    assert set(context.calls[0]) == first


# -------------------------------------------------------------------------- bad input


def test_k_larger_than_the_dataset_names_k_the_store_k_and_the_samples(tmp_path):
    data = tensor_dataset(n=6)
    context = fake_context(data, k=10)  # the store kept 10 slots but saw only 6 samples
    with pytest.raises(ValueError, match=r"k = 8 .*top 10 .*of 6 samples.*k <= 6"):
        TopKGrids(k=8).render(xr.DataTree(), tmp_path, context=context)
    small = fake_context(tensor_dataset(n=30), k=4)
    with pytest.raises(ValueError, match=r"k = 5 .*top 4 .*of 30 samples.*\[activations\] topk"):
        TopKGrids(k=5).render(xr.DataTree(), tmp_path, context=small)
    # k = 0 draws what there is: min(store's k, samples)
    files = TopKGrids(tile=TILE, gap=GAP).render(xr.DataTree(), tmp_path / "all", context=context)
    index = xr.open_dataset(files[-1]).load()
    assert index.sizes["rank"] == 6 and (index["topk_sample"] >= 0).all()


def test_unknown_steps_and_units_are_errors_naming_the_key(tmp_path):
    context = fake_context(tensor_dataset(), units=3)
    tree = xr.DataTree.from_dict({"tau/relu1": xr.Dataset({"x": ("unit", np.zeros(3))})})
    with pytest.raises(ConfigError, match=r"key 'rows_from'.*'regression'.*earlier steps: tau"):
        TopKGrids(rows_from=["regression"]).render(tree, tmp_path, context=context)
    with pytest.raises(ConfigError, match=r"key 'rows_from'.*no 'topk_sample' at layer 'relu1'.*holds x"):
        TopKGrids(rows_from=["tau"]).render(tree, tmp_path, context=context)
    with pytest.raises(ConfigError, match=r"key 'metrics'.*'kendall'"):
        TopKGrids(metrics=["kendall"]).render(tree, tmp_path, context=context)
    with pytest.raises(ConfigError, match=r"key 'units'.*unit 3 is outside layer 'relu1', which has 3 units"):
        TopKGrids(units=[0, 3]).render(tree, tmp_path, context=context)


# ------------------------------------------------------------ extra rows and metric labels


def test_rows_from_results_and_metric_values_beside_rows(tmp_path):
    data = tensor_dataset(n=20)
    context = fake_context(data, units=3, k=4)
    regression_ids = np.asarray(data.sample_ids)[np.arange(12).reshape(4, 3)]  # (rank, unit)
    tau = np.array([[0.71, -0.2, np.nan]])
    results = xr.DataTree.from_dict(
        {
            "regression/relu1": xr.Dataset(
                {"topk_sample": (("rank", "unit"), regression_ids), "topk_value": (("rank", "unit"), np.ones((4, 3)))}
            ),
            "tau/relu1": xr.Dataset(
                {
                    "kendall_tau": (("model", "unit"), tau),
                    "kendall_tau_mean": ("unit", tau[0]),
                    "unused": (("unit", "pair"), np.zeros((3, 2))),  # not (model, unit): not shown
                },
                coords={"model": ["b"], "unit": [0, 1, 2], "reference": "a"},
            ),
        }
    )
    tile = 40  # room for a metric line beside the name
    files = TopKGrids(rows_from=["regression"], metrics=["tau"], tile=tile, gap=GAP).render(
        results, tmp_path, context=context
    )
    index = xr.open_dataset(tmp_path / INDEX_FILE).load()
    assert files[-1] == tmp_path / INDEX_FILE
    assert list(index["row"].values) == ["a", "b", "regression"]
    np.testing.assert_array_equal(index["topk_sample"].sel(row="regression").values, regression_ids.T)
    values = index["metric_value"].sel(metric="tau:kendall_tau")
    np.testing.assert_array_equal(values.sel(row="b").values, tau[0])
    assert np.isnan(values.sel(row="a")).all() and np.isnan(values.sel(row="regression")).all()
    np.testing.assert_array_equal(index["unit_metric_value"].sel(unit_metric="tau:kendall_tau_mean").values, tau[0])
    assert "metric" in index.dims and list(index["metric"].values) == ["tau:kendall_tau"]

    # Row "b" (the one with a value) has a second text line beside its tiles; "a" has none.
    pixels, y0, x0 = grid_geometry(files[0], rows=3, k=4, tile=tile)
    line = _Text().line
    def second_line(r: int) -> np.ndarray:
        top = y0 + r * (tile + GAP) + 2 + line
        return pixels[top : top + line, :x0]

    assert second_line(1).min() < 128 and second_line(0).min() == 255
    # header: the layer/unit line and one unit-wide metric line above the tiles
    assert y0 >= 2 * line


def test_rows_from_with_a_model_dim_give_one_row_per_model(tmp_path, caplog):
    data = tensor_dataset(n=20)
    context = fake_context(data, models=("a",), units=4, k=3)
    ids = np.broadcast_to(np.asarray(data.sample_ids)[:3, None, None], (3, 2, 4)).copy()  # (rank, model, unit)
    ids[:, 1] += 3
    regression = xr.Dataset({"topk_sample": (("rank", "model", "unit"), ids)}, coords={"model": ["b", "c"]})
    results = xr.DataTree.from_dict({"regression/relu1": regression})
    with caplog.at_level("INFO", logger="mergescope"):
        files = TopKGrids(rows_from=["regression"], max_units=2, tile=TILE, gap=GAP).render(
            results, tmp_path, context=context
        )
    assert "drawing 2 of the 4 units of relu1" in caplog.text
    index = xr.open_dataset(files[-1]).load()
    assert list(index["row"].values) == ["a", "regression:b", "regression:c"] and list(index["unit"].values) == [0, 1]
    np.testing.assert_array_equal(index["topk_sample"].sel(row="regression:c").values, ids[:, 1, :2].T)
    assert np.isnan(index["topk_value"].sel(row="regression:b")).all()  # no topk_value given


def test_sparsity_levels_become_rows_and_rows_select_picks_them(tmp_path):
    data = tensor_dataset(n=20)
    context = fake_context(data, models=("a",), units=2, k=3)
    levels = ["100%", "10%", "top-5"]
    ids = np.asarray(data.sample_ids)[np.arange(18).reshape(3, 3, 2)]  # (sparsity, rank, unit)
    node = xr.Dataset({"topk_sample": (("sparsity", "rank", "unit"), ids)}, coords={"sparsity": levels})
    results = xr.DataTree.from_dict({"lasso/relu1": node})
    files = TopKGrids(rows_from=["lasso"], tile=TILE, gap=GAP).render(results, tmp_path / "all", context=context)
    index = xr.open_dataset(files[-1]).load()
    assert list(index["row"].values) == ["a", "lasso:100%", "lasso:10%", "lasso:top-5"]
    np.testing.assert_array_equal(index["topk_sample"].sel(row="lasso:10%").values, ids[1].T)

    picked = TopKGrids(rows_from=["lasso"], rows_select={"sparsity": ["top-5", "100%"]}, tile=TILE, gap=GAP)
    index = xr.open_dataset(picked.render(results, tmp_path / "picked", context=context)[-1]).load()
    assert list(index["row"].values) == ["a", "lasso:top-5", "lasso:100%"]
    np.testing.assert_array_equal(index["topk_sample"].sel(row="lasso:top-5").values, ids[2].T)

    # Written to netCDF, the levels sit on the step's node and the layer's node inherits them.
    inherited = xr.DataTree.from_dict(
        {"lasso": xr.Dataset(coords={"sparsity": levels}), "lasso/relu1": node.drop_vars("sparsity")}
    )
    picked_again = picked.render(inherited, tmp_path / "inherited", context=context)
    assert list(xr.open_dataset(picked_again[-1])["row"].values) == ["a", "lasso:top-5", "lasso:100%"]

    with pytest.raises(ConfigError, match=r"key 'rows_select'.*sparsity = '5%'.*values \['100%', '10%', 'top-5'\]"):
        TopKGrids(rows_from=["lasso"], rows_select={"sparsity": ["5%"]}).render(results, tmp_path / "x", context=context)
    with pytest.raises(ConfigError, match=r"key 'rows_select'.*dim 'model', which no 'rows_from' result has"):
        TopKGrids(rows_from=["lasso"], rows_select={"model": ["b"]}).render(results, tmp_path / "y", context=context)
    with pytest.raises(ValueError, match="'rows_select' must map a dim name to a non-empty list"):
        TopKGrids(rows_select={"sparsity": "100%"})


# ------------------------------------------------------------------- the report panel


def test_unit_browser_needs_an_index(tmp_path):
    node = xr.Dataset({"grid_file": ("entry", ["a.png"])}, coords={"layer": ("entry", ["l"]), "unit": ("entry", [0])})
    assert has_unit_index(node) and not has_unit_index(node.drop_vars("unit"))
    with pytest.raises(ValueError, match="grid_file"):
        unit_browser(node.drop_vars("layer"), tmp_path)
    html = unit_browser(node, tmp_path, xr.DataTree())
    assert 'class="ms-unit-browser"' in html and '"files":["a.png"]' in html


def _grids_node(run_dir, step: str, layer: str = "relu1", units: int = 3) -> xr.Dataset:
    """A step's results node as the report gets it: ``files`` and the index as TopKGrids writes it."""
    folder = run_dir / "figures" / step
    (folder / layer).mkdir(parents=True, exist_ok=True)
    names = []
    for unit in range(units):
        Image.fromarray(np.full((8, 8), 40 * unit, dtype=np.uint8)).save(folder / layer / f"unit-{unit:04d}.png")
        names.append(f"{layer}/unit-{unit:04d}.png")
    index = xr.Dataset(
        {"grid_file": ("entry", names)}, coords={"layer": ("entry", [layer] * units), "unit": ("entry", range(units))}
    )
    index.to_netcdf(folder / INDEX_FILE)
    files = [f"figures/{step}/{n}" for n in names] + [f"figures/{step}/{INDEX_FILE}"]
    return index.assign_coords(files=("file", files))


def test_report_panel_is_the_unit_browser_with_its_script_once(tmp_path):
    from mergescope.report import Panel, render_report

    tau = xr.DataArray([[0.5, np.nan, -0.25]], dims=("model", "unit"), coords={"model": ["b"], "unit": [0, 1, 2]})
    tree = xr.DataTree.from_dict(
        {
            "tau/relu1": xr.Dataset({"kendall_tau": tau}),
            "grids": _grids_node(tmp_path, "grids"),
            "grids-2": _grids_node(tmp_path, "grids-2"),
        }
    )
    steps = {"tau": {"kind": "metric"}, "grids": {"kind": "visualizer"}, "grids-2": {"kind": "visualizer"}}
    components = {"grids": TopKGrids(), "grids-2": TopKGrids()}
    page = render_report(tmp_path, tree, info={"steps": steps}, components=components)
    css, js = _browser_assets()
    assert "mergescope.panel(\".ms-unit-browser\"" in js and ".ms-units" in css
    assert page.count('class="ms-unit-browser"') == 2
    assert page.count(js.strip()) == 1 and page.count(css.strip()) == 1  # one script for both browsers
    assert '"files":["figures/grids/relu1/unit-0000.png"' in page and '"files":["figures/grids-2/relu1/' in page
    assert '{"step":"tau","var":"kendall_tau","model":"b"}' in page and '"values":[[0.5,null,-0.25]]' in page
    assert '<a href="figures/grids/topk-index.nc">' in page and '<img src="figures/grids/relu1' not in page

    # Called as a third party's panel would be (three arguments): the metric values come from results.nc.
    node = tree["grids"].to_dataset()
    files = [Path(str(f)) for f in node["files"].values]
    assert unit_browser_panel(node, tmp_path, files=files).html.count("kendall_tau") == 0
    tree.to_netcdf(tmp_path / "results.nc")
    panel = TopKGrids().report_panel(node, files, tmp_path)
    assert isinstance(panel, Panel) and panel.js == js and '"var":"kendall_tau"' in panel.html
    # A step that drew nothing (no index) gets the report's default panel.
    empty = TopKGrids().report_panel(xr.Dataset(), [], tmp_path)
    assert empty == '<p class="empty">This step wrote no files.</p>'


# ------------------------------------------------------------------- a real pipeline


@pytest.fixture
def with_topk(fresh_registry):
    """The plugin registered in-process when no entry point provides it yet."""
    from mergescope import get_registry

    if "top-k" not in get_registry().names("visualizer"):
        fresh_registry.register_plugin(topk_module)
    return get_registry()


def small_cnn(seed: int) -> torch.nn.Module:
    from mergescope_plugins.zoo import SmallCNN

    torch.manual_seed(seed)
    return SmallCNN(widths=[8, 12]).build((1, 28, 28), 10).eval()


def test_pipeline_draws_model_merge_and_permuted_rows(tmp_path, with_topk):
    from mergescope.store import MARKER, Store
    from mergescope_plugins.interpolation import Interpolation
    from mergescope_plugins.kendall_tau import KendallTau
    from mergescope_plugins.weight_matching import WeightMatching

    data = with_topk.get("dataset", "mnist5000")(split="test", per_class=10)
    rows = ["model1", "model2", "permuted", "permuted-merge", "direct-merge"]
    k = 5
    pipeline = Pipeline(
        data=data,
        activations=ActivationSpec(layers=["relu1", "relu2"], topk=10, batch_size=100),
        models=[ModelSpec("model1", module=small_cnn(0)), ModelSpec("model2", module=small_cnn(1))],
        steps=[
            Step(WeightMatching(), name="wm", models=["model1", "model2"]),
            Step(Interpolation(alpha=1.0, alphas=[]), name="permuted", models=["model1", "model2"], alignment="wm"),
            Step(
                Interpolation(alpha=0.5, alphas=[]), name="permuted-merge", models=["model1", "model2"], alignment="wm"
            ),
            Step(Interpolation(alpha=0.5, alphas=[]), name="direct-merge", models=["model1", "model2"]),
            Step(KendallTau(), name="tau", models=["model1", "permuted", "permuted-merge"]),
            Step(TopKGrids(k=k, metrics=["tau"], tile=TILE, gap=GAP), name="grids", models=rows),
        ],
    )
    out = tmp_path / "run"
    result = run(pipeline, out, quiet=True)
    figures = out / "figures" / "grids"
    pngs = sorted(figures.rglob("*.png"))
    assert len(pngs) == 8 + 12
    assert Image.open(pngs[0]).mode == "L"  # grey images, grey grids
    assert {p.parent.name for p in pngs} == {"relu1", "relu2"}

    index = xr.open_dataset(figures / INDEX_FILE).load()
    assert list(index["row"].values) == rows and index.sizes["rank"] == k
    assert [str(f) for f in index["grid_file"].values] == [p.relative_to(figures).as_posix() for p in pngs]
    # the index joined the step's group of results.nc
    grids = xr.open_datatree(out / "results.nc")["grids"].to_dataset()
    np.testing.assert_array_equal(grids["topk_sample"].values, index["topk_sample"].values)
    assert "files" in grids and "grid_file" in grids
    assert "grids (top-k): 20 top-k grids over 2 layers (rows: model1, model2, permuted" in result.summary
    # the report's panel of the step is the unit browser, with the tau step's values
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count('class="ms-unit-browser"') == 1 and page.count('mergescope.panel(".ms-unit-browser"') == 1
    assert '{"step":"tau","var":"kendall_tau","model":"permuted"}' in page
    assert '"files":["figures/grids/relu1/unit-0000.png"' in page

    # ids are the recording's top-k (the store the runner wrote)
    stores = [Store.open(d) for d in (out / "activations").iterdir() if (d / MARKER).is_file()]
    store = next(s for s in stores if "direct-merge" in s.models)
    loaded = data.load()
    lookup = Context(data=loaded, quiet=True)
    for i in range(index.sizes["entry"]):
        layer, unit = str(index["layer"][i].values), int(index["unit"][i])
        for row in rows:
            expected = store.topk(row, layer).sample_ids[:k, unit]
            np.testing.assert_array_equal(index["topk_sample"].isel(entry=i).sel(row=row).values, expected)
        pixels, y0, x0 = grid_geometry(figures / str(index["grid_file"][i].values), rows=len(rows), k=k)
        assert pixels.shape[0] - y0 == len(rows) * TILE + (len(rows) - 1) * GAP
        assert pixels.shape[1] - x0 == k * TILE + (k - 1) * GAP and x0 > 0 and y0 > 0
        top1 = int(store.topk("model1", layer).sample_ids[0, unit])
        np.testing.assert_array_equal(tile_at(pixels, y0, x0, 0, 0), display_image(lookup.images([top1])[0], TILE))

    # permuting model 2 permutes its units: the same top-k lists, in another unit order
    for layer in ("relu1", "relu2"):
        per_unit = lambda row: sorted(map(tuple, store.topk(row, layer).sample_ids.T[:, :k].tolist()))  # noqa: E731, B023
        assert per_unit("permuted") == per_unit("model2")

    # the metric value beside each row is the tau step's value for that model and unit
    tree = result.results
    for i in range(index.sizes["entry"]):
        layer, unit = str(index["layer"][i].values), int(index["unit"][i])
        tau = tree[f"tau/{layer}"].to_dataset()["kendall_tau"]
        shown = index["metric_value"].isel(entry=i).sel(metric="tau:kendall_tau")
        np.testing.assert_allclose(shown.sel(row="permuted"), tau.sel(model="permuted", unit=unit))
        assert np.isnan(shown.sel(row="model1")) and np.isnan(shown.sel(row="direct-merge"))


# ----------------------------------------------------------------- ResNet blocks (appendix C)


def test_resnet18_block_outputs_render(tmp_path):
    import torchvision

    from mergescope.activations import resolve_layers

    g = torch.Generator().manual_seed(0)
    images = torch.rand((40, 3, 32, 32), generator=g)
    data = TensorImageDataset("rgb", images, np.arange(40) % 4, np.arange(40), list("abcd"))
    models = {}
    for i, name in enumerate(("model1", "model2")):
        torch.manual_seed(i)
        models[name] = torchvision.models.resnet18(num_classes=4).eval()
    blocks = list(resolve_layers(models["model1"], ["type:BasicBlock"]))  # the thesis's 8 residual blocks
    assert blocks == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    drawn = ["layer1.0", "layer1.1", "layer4.1"]  # a few of them keep the recording quick
    context = Context(data=data, quiet=True, batch_size=40, workdir=tmp_path / "rec")
    store = context.record(models, {m: drawn for m in models}, topk=5, keep_activations=False)
    step = attrs.evolve(context, models=list(models), layers=drawn, stores=lambda m: store)
    files = TopKGrids(max_units=2, tile=TILE, gap=GAP).render(xr.DataTree(), tmp_path / "grids", context=step)
    pngs = [f for f in files if f.suffix == ".png"]
    assert [f.relative_to(tmp_path / "grids").as_posix() for f in pngs] == [
        f"{layer}/unit-{u:04d}.png" for layer in drawn for u in (0, 1)
    ]
    index = xr.open_dataset(tmp_path / "grids" / INDEX_FILE).load()
    assert list(index["unit"].values) == [0, 1] * 3 and index.sizes["rank"] == 5
    np.testing.assert_array_equal(
        index["topk_sample"].isel(entry=5).sel(row="model2").values, store.topk("model2", "layer4.1").sample_ids[:, 1]
    )
    pixels, y0, x0 = grid_geometry(pngs[0], rows=2, k=5)
    top1 = int(store.topk("model1", "layer1.0").sample_ids[0, 0])
    np.testing.assert_array_equal(tile_at(pixels, y0, x0, 0, 0), display_image(data.images[top1], TILE))


def test_latent_grids_from_a_dictionary_without_model_rows(tmp_path):
    """A crosscoder's (rank, latent) top-k draws one grid per latent, its only row."""
    import attrs as _attrs

    from mergescope.testing import example_activations, example_context
    from mergescope_plugins.topk import TopKGrids

    a, _ = example_activations()
    context = _attrs.evolve(example_context(a), models=["a"], layers=["layer"])
    ids = np.asarray(a["sample"].values)[:12].reshape(3, 4)  # (rank, latent)
    node = xr.Dataset({"topk_sample": (("rank", "latent"), ids), "topk_value": (("rank", "latent"), np.ones((3, 4)))})
    tree = xr.DataTree.from_dict({"cc/layer": node})
    files = TopKGrids(rows_from=["cc"], model_rows=False, tile=8).render(tree, tmp_path, context=context)
    grids = sorted(f.name for f in files if f.suffix == ".png")
    assert grids == [f"unit-{i:04d}.png" for i in range(4)]
    index = xr.open_dataset(tmp_path / "topk-index.nc")
    assert list(index["row"].values) == ["cc"]
    np.testing.assert_array_equal(index["topk_sample"].values[:, 0, :], ids.T)
    assert TopKGrids(rows_from=["cc"], model_rows=True).render(tree, tmp_path / "x", context=_without_models(context)) == []


def _without_models(context):
    import attrs as _attrs

    return _attrs.evolve(context, models=[])
