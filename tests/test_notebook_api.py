"""The notebook-first API: specs by name, results as labelled objects, inline display, step by step."""

from __future__ import annotations

import html
import re

import pytest
import xarray as xr

import mergescope as ms
from mergescope.errors import ConfigError
from mergescope.results import inline_page
from tests.test_report import CHROMIUM_ARGS, _chromium

FILE = """
seed = 0

[data]
use = "mnist5000"
split = "test"
per_class = 10

[activations]
layers = ["relu1"]
batch_size = 100
topk = 3

[[models]]
name = "a"
use = "mlp"
hidden = [16, 16]

[models.train]
seed = 0
epochs = 1

[[models]]
name = "b"
use = "mlp"
hidden = [16, 16]

[models.train]
seed = 1
epochs = 1

[[steps]]
use = "weight-matching"
name = "wm"
models = ["a", "b"]

[[steps]]
use = "interpolation"
models = ["a", "b@wm"]
alphas = [0.0, 0.5, 1.0]

[[steps]]
use = "kendall-tau"
name = "kt"
models = ["a", "b@wm"]

[[steps]]
use = "top-k"
models = ["a", "b@wm"]
metrics = ["kt"]
"""


def by_name() -> ms.Pipeline:
    """FILE, written as a notebook writes it."""
    return ms.Pipeline(
        data=ms.Data("mnist5000", split="test", per_class=10),
        activations=ms.ActivationSpec(layers=["relu1"], batch_size=100, topk=3),
        models=[ms.Model(n, "mlp", hidden=[16, 16], train={"seed": s, "epochs": 1}) for s, n in enumerate("ab")],
        steps=[
            ms.Step("weight-matching", name="wm", models=["a", "b"]),
            ms.Step("interpolation", models=["a", "b@wm"], alphas=[0, 0.5, 1]),
            ms.Step("kendall-tau", name="kt", models=["a", "b@wm"]),
            ms.Step("top-k", models=["a", "b@wm"], metrics=["kt"]),
        ],
    )


# ----------------------------------------------------------------------------- compose by name


def test_a_pipeline_by_name_is_the_pipeline_of_its_file():
    assert by_name() == ms.Pipeline.from_toml(FILE)
    assert ms.Pipeline.from_toml(by_name().to_toml()) == by_name()


def test_names_and_instances_build_the_same_specs():
    registry = ms.get_registry()
    interpolation, mlp = registry.get("merger", "interpolation"), registry.get("architecture", "mlp")
    mnist = registry.get("dataset", "mnist5000")
    assert ms.Step("interpolation", models=("a", "b"), alphas=[0.5]) == ms.Step(
        interpolation(alphas=[0.5]), models=["a", "b"]
    )
    assert ms.Model("a", "mlp", hidden=[8], train={"seed": 3}) == ms.ModelSpec(
        "a", mlp(hidden=[8]), train=ms.Training(seed=3)
    )
    assert ms.Model("a", "mlp", train_data={"use": "mnist5000", "split": "train"}).train_data == mnist(split="train")
    assert ms.Data("mnist5000", per_class=5) == mnist(per_class=5)
    assert ms.Task("digits", "mnist5000", split="test", expert="a") == ms.TaskSpec("digits", mnist(split="test"), "a")
    assert ms.Model is ms.ModelSpec and ms.Task is ms.TaskSpec
    # An instance where the file would have a table is kept as it is.
    step = ms.Step("repair", models=["a", "b"], alignment="wm", data=ms.Data("mnist5000", split="train"))
    assert step.data == mnist(split="train")


def _paragraph(error: BaseException, key: str) -> str:
    """The message after its location: what a file and a notebook must say alike."""
    text = str(error)
    return text[text.index(f"key {key!r}: ") :]


def test_a_misspelt_option_gets_the_paragraph_a_file_gets():
    with pytest.raises(ConfigError) as in_python:
        ms.Step("interpolation", models=["a", "b"], alphass=[0.5])
    file = FILE.replace("alphas = [0.0, 0.5, 1.0]", "alphass = [0.5]")
    with pytest.raises(ConfigError) as in_file:
        ms.Pipeline.from_toml(file, source="pipeline.toml")
    assert "Did you mean 'alphas'?" in str(in_python.value)
    assert _paragraph(in_python.value, "alphass") == _paragraph(in_file.value, "alphass")
    assert str(in_python.value).startswith("Step (use = 'interpolation'), key 'alphass': ")
    assert str(in_file.value).startswith("pipeline.toml, [[steps]] #2 (use = 'interpolation'), key 'alphass': ")


@pytest.mark.parametrize(
    ("build", "says"),
    [
        (lambda: ms.Step("interpolaton"), "unknown component 'interpolaton'. Did you mean 'interpolation'?"),
        (lambda: ms.Model("a", "mlp", hiden=[8]), "key 'hiden': unknown option 'hiden' for architecture 'mlp'"),
        (lambda: ms.Model("a", "mlp", train={"sed": 1}), "[train], key 'sed': unknown option 'sed'"),
        (lambda: ms.Data("mnist5000", splitt="test"), "Did you mean 'split'?"),
        (lambda: ms.Task("t", "mnist5000", expert=3), "'expert' must be a model name, got 3"),
        (lambda: ms.Step("kendall-tau", data={"use": "mnist5000"}), "only aligner and merger steps take their own"),
        (lambda: ms.Model("a", "mlp", checkpoint="a.pt", train={"seed": 1}), "give either 'checkpoint' or"),
    ],
)
def test_bad_specs_by_name_are_refused_with_the_files_messages(build, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        build()


def test_keywords_beside_an_instance_are_refused():
    interpolation = ms.get_registry().get("merger", "interpolation")()
    with pytest.raises(ConfigError, match=r"'alphas' is an option of the Interpolation instance given"):
        ms.Step(interpolation, alphas=[0.5])
    with pytest.raises(ConfigError, match=r"unknown key 'modles' in Step\. Did you mean 'models'\?"):
        ms.Step(interpolation, modles=["a", "b"])
    with pytest.raises(ConfigError, match=r"unknown key 'use' in Step"):
        ms.Step(interpolation, use="average")


def test_a_pipeline_shows_its_steps_as_a_table():
    shown = by_name()._repr_html_()
    assert shown.count("<table>") == 3
    assert "<td>weight-matching</td><td>aligner</td>" in shown
    assert "<td>a, b@wm</td><td></td><td>alphas = [0.0, 0.5, 1.0]" in shown


# ----------------------------------------------------------------------------- results


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> ms.RunResult:
    return ms.run(by_name(), tmp_path_factory.mktemp("nb") / "run", quiet=True)


def test_a_steps_group_is_a_datatree_of_its_results(finished):
    group = finished["kt"]
    assert isinstance(group, ms.StepResult) and isinstance(group, xr.DataTree)
    assert group.name == "kt" and group.run is finished
    expected = finished.results["kt/relu1"].to_dataset(inherit=False)
    assert group["relu1"].to_dataset(inherit=False).identical(expected)
    assert finished.steps == ["wm", "interpolation", "kt", "top-k"] == list(finished)
    assert finished._ipython_key_completions_() == finished.steps
    assert "kt" in finished and "tasks" not in finished
    with pytest.raises(KeyError, match=r"no step 'k-t' in this run\. Did you mean 'kt'\? Steps: wm, interpolation"):
        finished["k-t"]


def test_a_run_names_its_models_figures_and_report(finished):
    assert {"a", "b", "b@wm", "interpolation"} <= set(finished.models)
    figures = finished.figures
    assert list(figures) == ["top-k"]
    assert all(p.is_file() for p in figures["top-k"])
    assert {p.suffix for p in figures["top-k"]} == {".png", ".nc"}  # the grids and their index
    assert finished.report_path == finished.out_dir / "report.html" and finished.report_path.is_file()
    assert finished.claims is None and finished.tasks is None
    reopened = ms.RunResult.open(finished.out_dir)
    assert reopened.steps == finished.steps and reopened.models == {}
    assert reopened["kt"].identical(finished["kt"])
    with pytest.raises(FileNotFoundError, match="holds no results.nc"):
        ms.RunResult.open(finished.out_dir / "steps")


def _frame(shown: str) -> str:
    """The page inside a notebook display's iframe."""
    match = re.fullmatch(r'<iframe title="[^"]*" srcdoc="([^"]*)" sandbox="allow-scripts" style="[^"]*"></iframe>', shown)
    assert match, shown[:200]
    return html.unescape(match.group(1))


def test_the_displays_hold_the_reports_sections_with_images_inlined(finished):
    run_page = _frame(finished._repr_html_())
    assert all(f'<section id="{s}">' in run_page for s in ("pipeline", "models", "metrics", "results"))
    assert '<section id="figures">' not in run_page  # a step shows its own figures
    step_page = _frame(finished["top-k"]._repr_html_())
    assert '<section id="figures">' in step_page and '<section id="pipeline">' not in step_page
    grids = [p for p in finished.figures["top-k"] if p.suffix == ".png"]
    assert step_page.count("data:image/png;base64,") == len(grids)
    assert 'src="figures/' not in step_page  # every shown image is inlined
    curve_page = _frame(finished["interpolation"]._repr_html_())
    assert "<svg" in curve_page and '<section id="results">' in curve_page


def test_inlining_stops_at_its_budget(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"\x89PNG" + bytes(100))
    (tmp_path / "b.png").write_bytes(b"\x89PNG" + bytes(100))
    monkeypatch.setattr("mergescope.results.INLINE_LIMIT", 150)
    page = _frame(inline_page('<img src="a.png"><img src="b.png"><img src="c.png">', tmp_path, height=10, title="t"))
    assert page.count("data:image/png") == 1 and 'src="b.png"' in page and 'src="c.png"' in page


def test_the_displays_load_in_a_browser_without_errors(finished, tmp_path):
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    shown = {
        "run": finished._repr_html_(),
        "top-k": finished["top-k"]._repr_html_(),
        "kt": finished["kt"]._repr_html_(),
        "pipeline": by_name()._repr_html_(),
    }
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            for name, fragment in shown.items():
                path = tmp_path / f"{name}.html"
                path.write_text(f'<!DOCTYPE html><meta charset="utf-8"><link rel="icon" href="data:,">{fragment}')
                page = browser.new_page()
                page.on("console", lambda m, n=name: errors.append(f"{n}: {m.text}") if m.type == "error" else None)
                page.on("pageerror", lambda e, n=name: errors.append(f"{n}: {e}"))
                page.on("request", lambda r: requests.append(r.url))
                page.goto(path.as_uri(), wait_until="load")
                if name == "top-k":
                    frame = page.frames[1]
                    # The unit browser shows one unit's grid, read from its inlined JSON.
                    sources = frame.evaluate("Array.from(document.images).map(i => i.naturalWidth && i.src)")
                    assert sources and all(str(s).startswith("data:image/png;base64,") for s in sources)
                page.close()
        finally:
            browser.close()
    assert errors == []
    assert [r for r in requests if not r.startswith(("data:", "about:"))] == [
        (tmp_path / f"{n}.html").as_uri() for n in shown
    ]


# ----------------------------------------------------------------------------- step by step


def test_a_step_runs_with_what_it_needs_and_a_changed_step_alone_reruns(tmp_path):
    pipeline = by_name()
    assert pipeline.steps_needed_for(["kt"]) == ["wm", "kt"]
    assert pipeline.steps_needed_for(["top-k"]) == ["wm", "interpolation", "kt", "top-k"]
    assert pipeline.step_dependencies("interpolation") == ["wm"]
    with pytest.raises(ConfigError, match=r"no step 'kt2' to run\. Did you mean 'kt'\?"):
        ms.run(pipeline, tmp_path / "x", steps=["kt2"])
    assert not (tmp_path / "x").exists()  # refused before the run directory is made

    first = ms.run(pipeline, tmp_path / "run", quiet=True, steps=["kt"])
    assert first.steps == ["wm", "kt"]
    whole = ms.run(pipeline, tmp_path / "run", quiet=True)
    cached = {name: step["cached"] for name, step in whole.info["steps"].items()}
    assert cached == {"wm": True, "interpolation": False, "kt": True, "top-k": False}

    pipeline.steps[1] = ms.Step("interpolation", models=["a", "b@wm"], alphas=[0, 0.25, 0.5, 0.75, 1])
    again = ms.run(pipeline, tmp_path / "run", quiet=True, steps=["interpolation"])
    # The changed step reruns; the steps it does not need but whose inputs are at hand show from the cache.
    assert again.steps == ["wm", "interpolation", "kt"]
    cached = {name: step["cached"] for name, step in again.info["steps"].items()}
    assert cached == {"wm": True, "interpolation": False, "kt": True}
    assert again["interpolation"].ds.sizes["alpha"] == 5
