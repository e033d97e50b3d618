"""The HTML report every run writes: contents, escaping, self-containment, panels, and (in Chromium) the page at work.

The unit browser is the top-k plugin's panel (tests/plugins/test_topk.py); here a test
visualizer that writes the same index uses it, so the browser runs in the whole page.
"""

from __future__ import annotations

import html
import importlib.resources
import json
import os
import re
import shutil
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote

import attrs
import numpy as np
import pytest
import xarray as xr

import mergescope.report
from mergescope import Pipeline, hookimpl, run
from mergescope.report import REPORT_FILE, Panel, default_panel, line_chart, render_report, write_report

from pipelines import SMALL

ROOT = Path(__file__).resolve().parents[1]
UNITS = 6  # grids drawn per layer: enough to sort, cheap to draw
# A file name that must come out as text (step names are restricted to safe characters).
HOSTILE = 'x<script>alert(1)<b>&"'

REPORT_PIPELINE = (
    SMALL
    + """
[[steps]]
use = "weight-matching"
name = "wm"
models = ["a", "b"]

[[steps]]
use = "repair"
models = ["a", "b"]
alignment = "wm"
alphas = [0.0, 0.5, 1.0]

[[steps]]
use = "test-unit-grids"
name = "grids"

[[steps]]
use = "test-own-panel"

[[steps]]
use = "test-broken-panel"

[[steps]]
use = "test-gallery"
name = "gallery"
"""
)


# --------------------------------------------------------------------------- test visualizers


def _png(path: Path, shade: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((24, 48), shade, dtype=np.uint8)
    image[4:20, 4 : 4 + shade % 40] = 255 - shade
    Image.fromarray(image).save(path)


@attrs.define
class UnitGrids:
    """One PNG per unit of every layer a metric scored, and an index of them (as ``top-k`` writes)."""

    name: ClassVar[str] = "test-unit-grids"

    def render(self, results: xr.DataTree, out_dir: Path, context=None) -> list[Path]:
        out_dir = Path(out_dir)
        paths, layers, units, files = [], [], [], []
        for layer in results["kendall-tau"].children:
            for unit in range(UNITS):
                path = out_dir / layer / f"unit-{unit:04d}.png"
                _png(path, 30 * unit + 7)
                paths.append(path)
                layers.append(layer)
                units.append(unit)
                files.append(f"{layer}/{path.name}")  # relative to the index file
        index = xr.Dataset(
            {"grid_file": ("entry", files)}, coords={"layer": ("entry", layers), "unit": ("entry", units)}
        )
        index_path = out_dir / "topk-index.nc"
        index.to_netcdf(index_path)
        return [*paths, index_path]

    def report_panel(self, node, files, run_dir, *, results=None, metric_steps=None):
        """The top-k plugin's panel: the index is laid out as ``top-k`` writes it."""
        from mergescope_plugins.topk import unit_browser_panel

        assert results is not None and metric_steps == ["kendall-tau"]  # what the report passes by keyword
        return unit_browser_panel(node, run_dir, results, files=files, metric_steps=metric_steps)


@attrs.define
class OwnPanel:
    """A visualizer that draws its own report panel."""

    name: ClassVar[str] = "test-own-panel"

    def render(self, results: xr.DataTree, out_dir: Path, context=None) -> list[Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "note.txt"
        path.write_text("hello")
        return [path]

    def report_panel(self, node: xr.Dataset, files: list[Path], run_dir: Path) -> str:
        assert all((run_dir / f).is_file() for f in files)  # relative to the run directory
        names = ", ".join(f.name for f in files)
        return f'<div class="own-panel">own panel: {names}</div>'


@attrs.define
class BrokenPanel:
    """A visualizer whose panel fails: the report shows the error and its files instead."""

    name: ClassVar[str] = "test-broken-panel"

    def render(self, results: xr.DataTree, out_dir: Path, context=None) -> list[Path]:
        out_dir = Path(out_dir)
        _png(out_dir / "picture.png", 90)
        return [out_dir / "picture.png"]

    def report_panel(self, node: xr.Dataset, files: list[Path], run_dir: Path) -> str:
        raise RuntimeError("panel <broken>")


@attrs.define
class Gallery:
    """A PNG, an SVG and a text file: the default panel's gallery and file list."""

    name: ClassVar[str] = "test-gallery"

    def render(self, results: xr.DataTree, out_dir: Path, context=None) -> list[Path]:
        out_dir = Path(out_dir)
        _png(out_dir / "a picture.png", 150)
        loss = results["interpolation"].ds["loss"]
        (out_dir / "loss.svg").write_text(line_chart(loss["alpha"].values, {"loss": loss.values}, title="loss"))
        (out_dir / "notes.txt").write_text("notes")
        (out_dir / f"{HOSTILE}.txt").write_text("a file name full of markup")
        return [out_dir / "a picture.png", out_dir / "loss.svg", out_dir / "notes.txt", out_dir / f"{HOSTILE}.txt"]


class _Plugin:
    @hookimpl
    def register_visualizers(register):
        register(UnitGrids)
        register(Gallery)
        register(OwnPanel)
        register(BrokenPanel)


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    """One run of the small pipeline with the test visualizers; its directory."""
    from mergescope import plugins

    out = tmp_path_factory.mktemp("report") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(plugins.SELECT_ENV, raising=False)
        mp.delenv(plugins.BLOCK_ENV, raising=False)
        plugins.reset()
        try:
            plugins.register_plugin(_Plugin, name="report-test")
            run(Pipeline.from_toml(REPORT_PIPELINE), out, quiet=True)
        finally:
            plugins.reset()
    return out


# --------------------------------------------------------------------------- the page


def _links(page: str) -> list[str]:
    """Every src / href attribute value of the page's HTML (unescaped, still URL-quoted)."""
    return [html.unescape(u) for u in re.findall(r"""\s(?:src|href)=["']([^"']*)["']""", page)]


def test_every_run_writes_a_report(report_run):
    page = (report_run / REPORT_FILE).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "[[steps]]" in page and "kendall-tau" in page  # the pipeline as run
    info = json.loads((report_run / "run.json").read_text())
    assert info["steps"]["kendall-tau"]["kind"] == "metric" and info["steps"]["grids"]["kind"] == "visualizer"
    assert info["steps"]["kendall-tau"]["cached"] is False
    for section in ("pipeline", "metrics", "results", "figures"):
        assert f'<section id="{section}">' in page
    # The metric table: one row per layer and compared model.
    assert re.search(r'<td>relu1</td><td>kendall_tau</td><td>b</td><td class="n">32</td>', page)
    # The interpolation sweep as SVG charts.
    assert page.count('<svg class="chart"') >= 2 and "alpha" in page
    # A plugin's own panel, and the fallback for a failing one.
    assert '<div class="own-panel">own panel: note.txt' in page
    assert "The panel of this step failed: RuntimeError: panel &lt;broken&gt;" in page
    assert 'src="figures/test-broken-panel/picture.png"' in page
    # A gallery of a step's images, its other files listed; names quoted in links and escaped in text.
    folder = "figures/gallery"
    assert f'<img src="{folder}/a%20picture.png"' in page and f'<img src="{folder}/loss.svg"' in page
    assert f'<a href="{folder}/notes.txt">' in page
    # The unit browser of the index node, not a gallery of its grids.
    assert page.count('class="ms-unit-browser"') == 1
    assert "figures/grids/topk-index.nc" in page and 'src="figures/grids/relu1' not in page


def test_report_is_self_contained(report_run):
    page = (report_run / REPORT_FILE).read_text(encoding="utf-8")
    links = _links(page)
    assert links
    external = [u for u in links if re.match(r"^[a-z][a-z0-9+.-]*:", u, re.I) and not u.startswith("data:")]
    assert not external, f"the report links outside itself: {external}"
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert '<link rel="stylesheet"' not in page and "<script src" not in page
    for url in links:
        if url.startswith(("#", "data:")):
            continue
        assert (report_run / unquote(url)).exists(), f"the report links to a missing file {url}"


def test_file_names_are_escaped_and_quoted(report_run):
    page = (report_run / REPORT_FILE).read_text(encoding="utf-8")
    assert HOSTILE not in page
    assert "x&lt;script&gt;alert(1)&lt;b&gt;&amp;&quot;" in page
    assert 'href="figures/gallery/x%3Cscript%3Ealert%281%29%3Cb%3E%26%22.txt"' in page
    # The only script elements are the report's own (its code and the browser's data).
    assert page.count("<script") == 2


def test_cached_steps_are_marked(tmp_path):
    out = tmp_path / "run"
    run(Pipeline.from_toml(SMALL), out, quiet=True)
    assert '<span class="badge">cached</span>' not in (out / REPORT_FILE).read_text(encoding="utf-8")
    run(Pipeline.from_toml(SMALL), out, quiet=True)
    info = json.loads((out / "run.json").read_text())
    assert all(step["cached"] for step in info["steps"].values())
    assert '<span class="badge">cached</span>' in (out / REPORT_FILE).read_text(encoding="utf-8")


def test_empty_pipeline_gets_a_valid_report(tmp_path):
    page = write_report(tmp_path, xr.DataTree(), info={"seed": 0, "steps": {}}).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "This pipeline has no steps." in page


def test_report_of_a_bare_tree_guesses_kinds(tmp_path):
    """Without run.json the steps are the tree's groups, their kinds read from their contents."""
    tau = xr.DataArray([[0.5, np.nan, 0.25]], dims=("model", "unit"), coords={"model": ["b"], "unit": [0, 1, 2]})
    tree = xr.DataTree.from_dict(
        {
            "metric/l1": xr.Dataset({"tau": tau}),
            "sweep": xr.Dataset({"loss": ("alpha", [1.0, 2.0, 1.5]), "barrier": 0.5}, coords={"alpha": [0, 0.5, 1]}),
            "tasks": xr.Dataset(
                {
                    "accuracy": (("model", "task"), [[0.9, 0.5]]),
                    "average_accuracy": ("model", [0.7]),
                    "normalized_accuracy": (("model", "task"), [[1.0, np.nan]]),
                    "average_normalized_accuracy": ("model", [1.0]),
                },
                coords={"model": ["m"], "task": ["t1", "t2"]},
            ),
        }
    )
    path = write_report(tmp_path, tree)
    page = path.read_text(encoding="utf-8")

    def cells(row):
        return "".join(f'<td class="n">{c}</td>' if c[0].isdigit() else f"<td>{c}</td>" for c in row)

    assert cells(["l1", "tau", "b", "3", "0.375", "0.375", "0.125", "1"]) in page
    assert '<td>barrier</td><td class="n">0.5</td>' in page and '<svg class="chart"' in page
    assert (
        cells(["m", "90.0", "50.0", "70.0", "100.0"]) in page and '<td>m</td><td class="n">100.0</td><td></td>' in page
    )
    assert not list(tmp_path.glob(".*partial"))


def test_line_chart_handles_gaps_and_constants():
    svg = line_chart([0, 1, 2, 3], {"a": [1, np.nan, 1, 1], "<b>": [2, 2, 2, 2]}, title="t & u")
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and "&lt;b&gt;" in svg and "t &amp; u" in svg
    assert "no finite values" in line_chart([0, 1], {"a": [np.nan, np.nan]})


def test_render_report_without_results_is_valid(tmp_path):
    page = render_report(tmp_path, xr.DataTree(), info={"seed": 3, "steps": {}})
    assert "This pipeline has no steps." in page and '<td>seed</td><td class="n">3</td>' in page


# --------------------------------------------------------------------------- the essentials: models, steps, alignments


def _step_html(page: str, name: str) -> str:
    """The HTML of one step's block (its heading to the next step or section)."""
    start = page.index(f'<h3 id="step-{name}">')
    ends = [i for i in (page.find('<div class="step">', start), page.find("</section>", start)) if i >= 0]
    return page[start : min(ends)]


def test_models_section_lists_every_model_and_the_data(report_run):
    page = (report_run / REPORT_FILE).read_text(encoding="utf-8")
    info = json.loads((report_run / "run.json").read_text())
    assert (
        page.index('<section id="pipeline">')
        < page.index('<section id="models">')
        < page.index('<section id="metrics">')
    )
    models = page[page.index('<section id="models">') : page.index('<section id="metrics">')]
    # Declared models, then merged ones; each with its source, architecture, parameters and its own accuracy.
    assert list(info["models"]) == ["a", "b", "interpolation", "repair"]
    for name, m in info["models"].items():
        assert m["parameters"] > 0 and 0 <= m["accuracy"] <= 1 and m["loss"] > 0
        assert f"<td>{name}</td>" in models and f'<td class="n">{100 * m["accuracy"]:.1f}</td>' in models
    assert info["models"]["a"]["source"]["kind"] == "trained" and info["models"]["a"]["architecture"]["use"] == "mlp"
    assert "trained here (seed = 0, epochs = 6" in models and "mlp (hidden = [32, 32]" in models
    assert "merged by step repair (repair) from a, b, alignment wm" in models
    # A merged model's numbers are its step's: REPAIR's merge at alpha 0.5.
    repair = xr.open_datatree(report_run / "results.nc")["repair"].ds
    assert info["models"]["repair"]["accuracy"] == float(repair["merged_accuracy"])
    # The declared models' own numbers: evaluated once on the run's data, cached by fingerprint.
    cached = sorted(report_run.glob("steps/models-*/evaluation.json"))
    assert len(cached) == 2
    assert sorted(json.loads(c.read_text())["accuracy"] for c in cached) == sorted(
        info["models"][m]["accuracy"] for m in ("a", "b")
    )
    # The data: name, number of images and the class list.
    data = info["data"]
    assert data["images"] == 200 and data["classes"] == [str(c) for c in range(10)]
    assert f"<b>{data['name']}</b>" in models and "200 images, 10 classes" in models
    assert '<span class="classes">0, 1, 2, 3, 4, 5, 6, 7, 8, 9</span>' in models


def test_steps_table_names_models_and_alignment(report_run):
    page = (report_run / REPORT_FILE).read_text(encoding="utf-8")
    steps = json.loads((report_run / "run.json").read_text())["steps"]
    assert steps["repair"]["models"] == ["a", "b"] and steps["repair"]["alignment"] == "wm"
    assert steps["wm"]["alignment"] is None and steps["grids"]["models"] == []
    assert '<th scope="col">models</th><th scope="col">alignment</th>' in page
    assert "<td>repair</td><td>repair</td><td>merger</td><td>a, b</td><td>wm</td>" in page
    assert "<td>wm</td><td>weight-matching</td><td>aligner</td><td>a, b</td><td></td>" in page


def test_aligner_diagnostics_are_one_table(report_run):
    page = (report_run / REPORT_FILE).read_text(encoding="utf-8")
    wm = _step_html(page, "wm")
    table = re.search(r'<table class="num alignment">(.*?)</table>', wm, re.S).group(1)
    head = re.findall(r'<th scope="col">([^<]*)</th>', table)
    assert head[:5] == ["model", "group", "units", "map", "moved"] and "sweeps" in head
    rows = re.findall(r"<tr><td>b</td><td>([^<]+)</td>", table)
    assert len(rows) >= 2  # one row per channel group of the MLP
    assert "Other arrays" not in wm and "<h4>" not in wm
    assert wm.count("<details") == 1 and '<details class="raw"><summary>Raw arrays' in wm
    assert (
        "Other arrays"
        not in page.split('<section id="figures">')[0]
        .split('<section id="results">')[1]
        .split('<h3 id="step-interpolation">')[0]
    )


def test_sweep_endpoints_are_explained(report_run):
    page = (report_run / REPORT_FILE).read_text(encoding="utf-8")
    info = json.loads((report_run / "run.json").read_text())
    repair = _step_html(page, "repair")
    assert "<caption>Endpoints</caption>" in repair
    own = f"{100 * info['models']['a']['accuracy']:.1f}"  # the endpoint beside the model's own accuracy
    assert re.search(rf'<td>a</td><td class="n">0</td><td class="n">[\d.]+</td><td class="n">{own}</td>', repair)
    # The facts the report knows, then the merger's own reason (its endpoint_note).
    assert "with b mapped onto a by alignment wm." in repair
    assert "REPAIR repairs its endpoints too: at alpha 0 and 1 each corrected layer (" in repair
    assert "not exactly the models as trained" in repair
    interpolation = _step_html(page, "interpolation")
    assert "evaluates the endpoint models themselves at alpha 0 and 1 (weights 1 and 0)" in interpolation


def test_a_component_without_an_endpoint_note_gets_the_facts_only():
    from mergescope.report_parts import endpoints_table

    ds = xr.Dataset(
        {"accuracy": ("alpha", [0.8, 0.5, 0.9]), "endpoints": ("end", ["a", "b"])}, coords={"alpha": [0.0, 0.5, 1.0]}
    )
    models = {"a": {"accuracy": 0.8, "evaluated_on": "d"}, "b": {"accuracy": 0.9, "evaluated_on": "d"}}
    table = endpoints_table(ds, {"name": "m", "use": "mine"}, models, component=object())
    assert table is not None and "The models' own are in the Models section." in table["note"]

    class Says:
        def endpoint_note(self, result):
            return "Mine rescales its endpoints."

    table = endpoints_table(ds, {"name": "m", "use": "mine"}, models, component=Says())
    assert table is not None and table["note"].endswith("Mine rescales its endpoints.")


def test_bare_alignment_tree_is_a_table(tmp_path):
    """An aligner's node read from its contents: one table with the diagnostics, raw arrays folded once."""
    perm = xr.DataArray(np.eye(3)[[1, 0, 2]], dims=("unit", "unit_ref"))
    tree = xr.DataTree.from_dict(
        {
            "am": xr.Dataset(
                {
                    "matched_correlation": (("model", "group"), [[0.9, 0.8], [0.7, 0.6]]),
                    "dead_units": (("model", "group"), [[0, 1], [2, 0]]),
                    "reference": "a",
                },
                coords={"model": ["b", "c"], "group": ["g1", "g2"]},
            ),
            **{f"am/{m}/{g}": xr.Dataset({"transform": perm}) for m in ("b", "c") for g in ("g1", "g2")},
        }
    )
    steps = {"am": {"use": "activation-matching", "kind": "aligner", "models": ["a", "b", "c"]}}
    steps["tau"] = {"use": "kendall-tau", "kind": "metric", "models": ["a", "b@am"]}
    page = render_report(tmp_path, tree, info={"steps": steps})
    step = _step_html(page, "am")
    assert "Other arrays" not in step and step.count("<details") == 1
    cells = '<td>c</td><td>g1</td><td class="n">3</td><td>permutation</td><td class="n">2</td>'
    assert cells + '<td class="n">0.7</td><td class="n">2</td>' in step
    assert "<td>tau</td><td>kendall-tau</td><td>metric</td><td>a, b@am</td><td>am</td>" in page


# --------------------------------------------------------------------------- panels and templates


def _template(name: str) -> str:
    return (importlib.resources.files("mergescope") / "templates" / name).read_text(encoding="utf-8")


def test_page_is_one_file_with_its_css_and_js_inlined(report_run):
    page = (report_run / REPORT_FILE).read_text(encoding="utf-8")
    css, js = _template("report.css"), _template("report.js")
    assert css.strip() and js.strip() and not any(m in css + js for m in ("{{", "{%", "{#"))  # no Jinja syntax
    # The package's files, verbatim, inside the page's one <style> and one <script> element.
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    assert page.count("<style") == 1 and page.count("<script>") == 1
    assert css.strip() in style and js.strip() in script
    # The unit browser's CSS and script (the top-k plugin's package data) follow the report's own.
    from mergescope_plugins.topk import _browser_assets

    browser_css, browser_js = _browser_assets()
    assert style.index(css.strip()) < style.index(browser_css.strip())
    assert script.index(js.strip()) < script.index(browser_js.strip())
    assert not list(report_run.glob("*.css")) and not list(report_run.glob("*.js"))


def _figure_tree(tmp_path: Path, steps: dict[str, list[str]]) -> xr.DataTree:
    """Visualizer nodes (``files``) for ``steps``: step -> file names, written under figures/<step>/."""
    nodes = {}
    for step, names in steps.items():
        files = []
        for name in names:
            path = tmp_path / "figures" / step / name
            if name.endswith(".png"):
                _png(path, 60)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("text")
            files.append(path.relative_to(tmp_path).as_posix())
        nodes[step] = xr.Dataset(coords={"files": ("file", files)})
    return xr.DataTree.from_dict(nodes)


class _LegacyPanel:
    """A third-party panel with the original three-parameter signature."""

    def __init__(self):
        self.calls = []

    def report_panel(self, node, files, run_dir):
        self.calls.append((sorted(node.variables), [f.as_posix() for f in files], run_dir))
        return '<div class="legacy">legacy panel</div>'


class _AssetPanel:
    """A panel with its own CSS and script, taking the report's extras through **kwargs."""

    def __init__(self):
        self.extras = []

    def report_panel(self, node, files, run_dir, **extras):
        self.extras.append(extras)
        return Panel('<div class="with-assets"></div>', css=".with-assets{color:red}", js="window.assetPanel = 1;")


def test_default_panel_custom_panels_and_their_assets(tmp_path):
    tree = _figure_tree(
        tmp_path, {"plain": ["a.png", "notes.txt"], "legacy": ["x.txt"], "styled": ["y.txt"], "styled-2": ["z.txt"]}
    )
    legacy, styled = _LegacyPanel(), _AssetPanel()
    components = {"plain": object(), "legacy": legacy, "styled": styled, "styled-2": styled}
    steps = {name: {"use": name, "kind": "visualizer"} for name in tree.children}
    steps = {"tau": {"use": "kendall-tau", "kind": "metric"}, **steps}
    page = render_report(tmp_path, tree, info={"steps": steps}, components=components)
    # No report_panel: the default panel, a gallery of the images and links to the rest.
    assert default_panel(tree["plain"].to_dataset(), tmp_path) in page
    assert '<img src="figures/plain/a.png"' in page and '<a href="figures/plain/notes.txt">' in page
    # The original signature is called with the three positional arguments only.
    assert legacy.calls == [(["files"], ["figures/legacy/x.txt"], tmp_path)]
    assert '<div class="legacy">legacy panel</div>' in page
    # **kwargs gets the results and the metric steps; a Panel's CSS and JS are inlined once for two steps.
    assert [sorted(e) for e in styled.extras] == [["metric_steps", "results"]] * 2
    assert styled.extras[0]["metric_steps"] == ["tau"] and styled.extras[0]["results"] is tree
    assert page.count('<div class="with-assets"></div>') == 2
    assert page.count(".with-assets{color:red}") == 1 and page.count("window.assetPanel = 1;") == 1
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    assert ".with-assets{color:red}" in style and "window.assetPanel = 1;" in script
    # Without any Panel's assets the page has the report's own CSS and JS only.
    plain = render_report(tmp_path, tree, info={"steps": steps}, components={"styled": _LegacyPanel()})
    assert "with-assets" not in plain and _template("report.js").strip() in plain


def test_core_report_knows_no_plugin_file_format():
    source = Path(mergescope.report.__file__).read_text(encoding="utf-8")
    assert "topk" not in source.lower() and "grid_file" not in source
    for name in ("unit_browser", "has_unit_index"):
        assert not hasattr(mergescope.report, name)


# --------------------------------------------------------------------------- in a browser


def _chromium() -> str:
    """Chromium's path, or skip (fail when MERGESCOPE_REQUIRE_BROWSER=1) without it or playwright."""
    required = os.environ.get("MERGESCOPE_REQUIRE_BROWSER") == "1"
    executable = os.environ.get("MERGESCOPE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "playwright is not installed (pip install playwright)"
    if problem is None and not Path(executable).is_file():
        problem = f"no Chromium at {executable} (apt-get install chromium, or set MERGESCOPE_CHROMIUM)"
    if problem:
        if required:
            pytest.fail(f"MERGESCOPE_REQUIRE_BROWSER=1 but {problem}")
        pytest.skip(problem)
    return executable


def _artifacts() -> Path:
    path = Path(os.environ.get("MERGESCOPE_ARTIFACTS") or ROOT / "tests" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def chromium() -> str:
    """Chromium's path; asked for before the run fixture, so a skip costs no run."""
    return _chromium()


def test_report_in_a_browser(chromium, report_run):
    executable = chromium
    from playwright.sync_api import sync_playwright

    tree = xr.open_datatree(report_run / "results.nc")
    tau = tree["kendall-tau/relu2"].ds["kendall_tau"].sel(model="b").values[:UNITS]
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto((report_run / REPORT_FILE).as_uri(), wait_until="load")

            broken = page.evaluate(
                "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
            )
            assert page.evaluate("document.images.length") >= 3
            assert broken == [], f"images that do not load: {broken}"

            browser_el = page.locator(".ms-unit-browser")
            # Opens on the first layer's first unit.
            assert browser_el.locator(".ms-detail h4").inner_text() == "relu1, unit 0"
            browser_el.locator("select.ms-layer").select_option(label=f"relu2 ({UNITS} units)")
            rows = browser_el.locator("table.ms-units tbody tr")
            assert rows.count() == UNITS

            # Sort by the score (highest first): NaN units go last.
            browser_el.locator("table.ms-units thead button", has_text="kendall_tau [b]").click()
            shown = [int(rows.nth(i).locator("td").first.inner_text()) for i in range(UNITS)]
            finite = [u for u in range(UNITS) if np.isfinite(tau[u])]
            assert shown[: len(finite)] == sorted(finite, key=lambda u: (-tau[u], u))

            # Click a unit: its grid and its values show.
            unit = shown[-1]
            rows.nth(UNITS - 1).click()
            detail = browser_el.locator(".ms-detail")
            assert detail.locator("h4").inner_text() == f"relu2, unit {unit}"
            image = detail.locator("img")
            assert image.get_attribute("src") == f"figures/grids/relu2/unit-{unit:04d}.png"
            image.evaluate("img => img.decode()")
            assert image.evaluate("img => img.naturalWidth") == 48
            cells = detail.locator("table tr").nth(1).locator("td").all_inner_texts()
            assert cells[:2] == ["kendall-tau", "kendall_tau [b]"]
            value = cells[2]
            assert value == "NaN" if not np.isfinite(tau[unit]) else abs(float(value) - tau[unit]) < 1e-3
            assert rows.nth(UNITS - 1).get_attribute("class") == "sel"

            # Every column of the unit list fits its container, also in a narrow window.
            for width in (1280, 520):
                page.set_viewport_size({"width": width, "height": 900})
                last = browser_el.locator("table.ms-units thead th").last.bounding_box()
                container = browser_el.locator(".ms-list").bounding_box()
                assert last["x"] + last["width"] <= container["x"] + container["width"] + 0.5, width
            page.set_viewport_size({"width": 1280, "height": 900})

            page.screenshot(path=str(_artifacts() / "report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == [], errors
    outside = [u for u in requests if not u.startswith(("file://", "data:"))]
    assert outside == [], f"the report fetched {outside}"
