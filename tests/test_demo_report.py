"""The report's latent dashboard and the demo's report in Chromium.

- A dashboard of 10,000 synthetic latents (a crosscoder result made up, no training):
  time to interactive, no console errors, sorting, filtering, scrolling a virtualised table,
  and a latent's panel with its images.
- The demo pipeline (``mergescope demo``), smaller: its data cut to 50 images per class, its
  models trained one epoch, and of its steps the alignment, the crosscoder (5 epochs), the
  crosscoder plots and the feature visualisation (16 steps), otherwise as the demo declares
  them; the optimised images load and the dashboard opens a latent with its heatmaps.

Both are skipped without Chromium or playwright unless ``MERGESCOPE_REQUIRE_BROWSER=1``
(tests/test_report.py).
"""

from __future__ import annotations

import importlib.resources
import re
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from test_report import CHROMIUM_ARGS, _artifacts, _chromium

from mergescope import Pipeline, run
from mergescope.report import REPORT_FILE, render_report
from mergescope_plugins.crosscoder import CrosscoderPlots, classify
from mergescope_plugins.latent_dashboard import INDEX_FILE, JOINT

LATENTS = 10_000
MODELS = ["a", "b", "c"]
TILE, GAP, K = 28, 2, 10


@pytest.fixture
def chromium() -> str:
    return _chromium()


def _sheet_png(path: Path) -> bytes:
    """One sheet of 1 + 3 rows of K tiles, drawn once and copied for every latent."""
    from PIL import Image

    height, width = 4 * TILE + 3 * GAP, K * TILE + (K - 1) * GAP
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    for r in range(4):
        for k in range(K):
            pixels[r * (TILE + GAP) : r * (TILE + GAP) + TILE, k * (TILE + GAP) : k * (TILE + GAP) + TILE] = (
                40 * r,
                20 * k,
                120,
            )
    Image.fromarray(pixels).save(path)
    return path.read_bytes()


FILTERED = ("exclusive:b", 0.5)  # the class and the least density the browser test filters by


def synthetic_run(run_dir: Path) -> tuple[xr.Dataset, Path]:
    """A run directory with a crosscoder result of ``LATENTS`` latents and its dashboard index.

    Every latent that fired has a sheet in the index; the files are written for the
    latents the test can open (the first ones, and those it filters for), which saves
    thousands of identical files.
    """
    rng = np.random.default_rng(0)
    norms = rng.gamma(1.0, size=(LATENTS, 3)) * (rng.random((LATENTS, 3)) < 0.8)
    total = norms.sum(axis=1, keepdims=True)
    relative = np.divide(norms, total, out=np.full_like(norms, np.nan), where=total > 0)
    density = np.where(rng.random(LATENTS) < 0.1, 0.0, rng.random(LATENTS) ** 3)
    labels = np.where(density <= 0, "dead", classify(relative, MODELS, 0.05))
    values = np.sort(rng.exponential(size=(K, LATENTS)), axis=0)[::-1] * (density > 0)
    ds = xr.Dataset(
        {
            "decoder_norm": (("latent", "model"), norms),
            "relative_norm": (("latent", "model"), relative),
            "latent_class": ("latent", labels),
            "cosine": (("latent", "pair"), rng.uniform(-1, 1, size=(LATENTS, 3))),
            "density": ("latent", density),
            "dead": ("latent", density <= 0),
            "topk_sample": (("rank", "latent"), rng.integers(0, 5000, size=(K, LATENTS))),
            "topk_value": (("rank", "latent"), values),
        },
        coords={"latent": np.arange(LATENTS), "model": MODELS, "pair": ["a~b", "a~c", "b~c"], "rank": np.arange(K)},
    )
    folder = run_dir / "figures" / "plots"
    (folder / "cc-relu4").mkdir(parents=True)
    fired = density > 0
    names = [f"cc-relu4/latent-{i:05d}.png" if fired[i] else "" for i in range(LATENTS)]
    sheet = _sheet_png(folder / "sheet.png")
    openable = (np.arange(LATENTS) < 50) | ((labels == FILTERED[0]) & (density >= FILTERED[1]))
    for name in np.asarray(names)[fired & openable]:
        (folder / name).write_bytes(sheet)
    (folder / "sheet.png").unlink()
    counts = rng.integers(0, 500, size=(LATENTS, 4, 32)) * fired[:, None, None]
    index = xr.Dataset(
        {
            "sprite_file": ("entry", names),
            "sprite_rows": ("entry", np.where(fired, 4, 0)),
            "heatmap_vmax": ("entry", np.where(fired, 2.0, np.nan)),
            "histogram": (("entry", "row", "bin"), counts.astype(np.int32)),
            "histogram_high": ("entry", np.where(fired, values[0] * 2, np.nan)),
            "sprite_tile": ((), TILE),
            "sprite_gap": ((), GAP),
        },
        coords={
            "crosscoder": ("entry", ["cc/relu4"] * LATENTS),
            "latent": ("entry", np.arange(LATENTS)),
            "row": [JOINT, *MODELS],
            "bin": np.arange(32),
        },
    )
    files = [f"figures/plots/{n}" for n in names if n] + [f"figures/plots/{INDEX_FILE}"]
    index.to_netcdf(folder / INDEX_FILE)
    node = index.assign(files=("file", files))
    tree = xr.DataTree.from_dict({"cc/relu4": ds, "plots": node})
    steps = {"cc": {"use": "crosscoder", "kind": "differ"}, "plots": {"use": "crosscoder-plots", "kind": "visualizer"}}
    page = render_report(run_dir, tree, info={"steps": steps}, components={"plots": CrosscoderPlots()})
    path = run_dir / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return ds, path


def _visible(dashboard) -> list[list[str]]:
    """The cells of the rows in the DOM, top to bottom."""
    rows = dashboard.locator(".ld-row")
    tops = rows.evaluate_all("rs => rs.map(r => [parseFloat(r.style.top), Array.from(r.children, c => c.textContent)])")
    return [cells for _, cells in sorted(tops, key=lambda t: t[0])]


def test_dashboard_of_10000_latents_in_a_browser(chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    ds, report = synthetic_run(tmp_path)
    size = report.stat().st_size
    density = ds["density"].values
    labels = ds["latent_class"].values.astype(str)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            # Time to interactive: from navigation until a click on a row has opened its latent.
            start = time.perf_counter()
            page.goto(report.as_uri(), wait_until="commit")
            dashboard = page.locator(".ms-latent-dashboard[data-ld-ready]")
            dashboard.locator(".ld-row").nth(2).click()
            dashboard.locator(".ld-detail h5", has_text="latent 2:").wait_for()
            interactive = time.perf_counter() - start
            print(f"\n{LATENTS} latents ({size / 1e6:.1f} MB page): time to interactive {interactive:.2f} s")
            assert interactive < 5.0

            # Virtualised: a few dozen rows in the DOM, not ten thousand.
            assert dashboard.locator(".ld-row").count() < 100
            assert dashboard.locator(".ld-count").inner_text() == f"{LATENTS} of {LATENTS} latents"

            # Sort by density, highest first (ties by latent id).
            dashboard.locator(".ld-head button", has_text="density").click()
            expected = sorted(range(LATENTS), key=lambda i: (-density[i], i))
            shown = [int(cells[0]) for cells in _visible(dashboard)]
            assert shown == expected[: len(shown)] and len(shown) >= 15
            # Scrolled to the end, the last rows are the least dense.
            dashboard.locator(".ld-scroll").evaluate("s => { s.scrollTop = s.scrollHeight; }")
            page.wait_for_timeout(100)  # the rows are drawn on the next animation frame
            assert int(_visible(dashboard)[-1][0]) == expected[-1]

            # Filter: one class, then a range of density within it.
            klass, least = FILTERED
            dashboard.locator("select.ld-class").select_option(label=f"{klass} ({int((labels == klass).sum())})")
            assert dashboard.locator(".ld-count").inner_text() == f"{int((labels == klass).sum())} of {LATENTS} latents"
            assert {cells[1] for cells in _visible(dashboard)} == {klass}
            dashboard.locator("select.ld-column").select_option(label="density")
            dashboard.locator("input.ld-lo").fill(str(least))
            kept = np.flatnonzero((labels == klass) & (density >= least))
            assert dashboard.locator(".ld-count").inner_text() == f"{len(kept)} of {LATENTS} latents"
            assert {int(cells[0]) for cells in _visible(dashboard)} <= set(kept.tolist())

            # Click a latent: its numbers, decoder-norm bars, histograms and sheet (loaded now).
            first = int(_visible(dashboard)[0][0])
            dashboard.locator(".ld-row").filter(has_text=klass).first.click()
            detail = dashboard.locator(".ld-detail")
            assert detail.locator("h5").inner_text() == f"latent {first}: {klass}"
            assert detail.locator(".ld-bar").count() == 3 and detail.locator(".ld-hist").count() == 4
            image = detail.locator("img")
            assert image.get_attribute("src") == f"figures/plots/cc-relu4/latent-{first:05d}.png"
            assert image.get_attribute("loading") == "lazy"
            image.evaluate("img => img.decode()")
            assert image.evaluate("img => img.naturalWidth") == K * TILE + (K - 1) * GAP
            assert detail.locator(".ld-labels div").all_inner_texts() == [JOINT, *MODELS]
            page.screenshot(path=str(_artifacts() / "latent-dashboard-10000.png"), full_page=False)
        finally:
            browser.close()
    assert errors == [], errors


# --------------------------------------------------------------------------- the demo


def demo_pipeline() -> tuple[Pipeline, dict]:
    """The demo's alignment, crosscoder, crosscoder plots and feature visualisation, on less data and training.

    Returns the pipeline and its parsed table.
    """
    text = (importlib.resources.files("mergescope") / "pipelines" / "demo.toml").read_text(encoding="utf-8")
    raw = tomllib.loads(text)
    raw["data"]["per_class"] = 50
    for model in raw["models"]:
        model["train"]["epochs"] = 1
    kept = {"am", "crosscoder", "crosscoder-plots", "feature-vis"}
    raw["steps"] = [s for s in raw["steps"] if s.get("name", s["use"]) in kept]
    assert {s.get("name", s["use"]) for s in raw["steps"]} == kept, "the demo's steps were renamed"
    for step in raw["steps"]:  # the same steps, shorter: what the page shows does not depend on it
        if step["use"] == "crosscoder":
            step["epochs"] = 5
        if step["use"] == "feature-vis":
            step["steps"] = 16
    raw.pop("claims", None)
    return Pipeline.from_dict(raw, source="<the demo, smaller>"), raw


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "run"
    pipeline, raw = demo_pipeline()
    run(pipeline, out, quiet=True)
    return out, raw


def test_demo_report_in_a_browser(chromium, demo_run):
    from playwright.sync_api import sync_playwright

    demo_run, raw = demo_run
    optimising = next(s for s in raw["steps"] if s["use"] == "feature-vis")
    tree = xr.open_datatree(demo_run / "results.nc")
    cc = tree["crosscoder/relu4"].ds
    fired = np.flatnonzero(cc["topk_value"].values[0] > 0)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto((demo_run / REPORT_FILE).as_uri(), wait_until="load")

            # The optimised images: every one loads (folded sections opened, lazy images brought into view).
            page.locator("details:has(.fv-grid)").evaluate_all("ds => ds.forEach(d => { d.open = true; })")
            optimised = page.locator(".fv-grid img")
            count = optimised.count()
            assert count == len(optimising["models"]) * len(optimising["units"])
            for i in range(count):
                optimised.nth(i).scroll_into_view_if_needed()
                optimised.nth(i).evaluate("img => img.decode()")
                assert optimised.nth(i).evaluate("img => img.naturalWidth") > 0

            # The dashboard opens a latent that fired: its sheet has a heatmap row per model.
            dashboard = page.locator(".ms-latent-dashboard[data-ld-ready]")
            assert (
                dashboard.locator(".ld-count").inner_text() == f"{cc.sizes['latent']} of {cc.sizes['latent']} latents"
            )
            dashboard.locator(".ld-head button", has_text="max act.").click()
            top = int(dashboard.locator(".ld-row").first.locator("span").first.inner_text())
            assert top in fired and cc["topk_value"].values[0, top] == cc["topk_value"].values[0].max()
            dashboard.locator(".ld-row").first.click()
            image = dashboard.locator(".ld-detail img")
            assert image.get_attribute("src") == f"figures/crosscoder-plots/crosscoder-relu4/latent-{top:05d}.png"
            image.scroll_into_view_if_needed()
            image.evaluate("img => img.decode()")
            assert (
                image.evaluate("img => img.naturalHeight") == 4 * 56 + 3 * 2
            )  # all models, then cnn0, cnn1@am, cnn2@am
            labels = dashboard.locator(".ld-labels div").all_inner_texts()
            assert labels == [JOINT, "cnn0", "cnn1@am", "cnn2@am"]
            assert dashboard.locator(".ld-detail .ld-hist").count() == 4
            caption = dashboard.locator(".ld-detail .ld-hist .ld-caption").first.inner_text()
            fires = int(re.search(r"fires on (\d+) rows", caption).group(1))
            assert fires == round(float(cc["density"].values[top]) * 500)  # 50 images of 10 classes
            dashboard.screenshot(path=str(_artifacts() / "report-dashboard.png"))
        finally:
            browser.close()
    assert errors == [], errors
