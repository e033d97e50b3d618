"""Claims: parsing with located errors, reading quantities, relations computed by hand, outputs."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import xarray as xr

from mergescope import Pipeline
from mergescope.claims import (
    CLAIMS_GROUP,
    Expectation,
    Quantity,
    attach_verdicts,
    claims_of_file,
    evaluate,
    markdown_table,
    parse_claims,
    verdicts_from_dataset,
)
from mergescope.cli import main
from mergescope.errors import ConfigError
from mergescope.report import render_report
from mergescope.storage import load_tree, save_tree


def results() -> xr.DataTree:
    sweep = xr.Dataset(
        {"accuracy": ("alpha", [0.90, 0.70, 0.92]), "loss_barrier": ((), 0.4)},
        coords={"alpha": [0.0, 0.5, 1.0]},
    )
    scores = xr.Dataset(
        {
            "score": (("model", "unit"), [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]]),
            "category": ("unit", ["both", "one", "both", "neither"]),
        },
        coords={"model": ["b", "c"], "unit": [0, 1, 2, 3], "label": ("unit", ["u0", "u1", "u2", "u3"])},
    )
    return xr.DataTree.from_dict({"merge": sweep, "tau/relu2": scores})


def claim(**table):
    base = {"name": "c", "source": "Paper, Fig. 1", "says": "something", "value": "merge/loss_barrier", "expect": "< 1"}
    return parse_claims([{**base, **table}], "p.toml")[0]


# ----------------------------------------------------------------------------- relations


@pytest.mark.parametrize(
    ("expect", "measured", "against", "tolerance", "holds"),
    [
        ("<= 0.05", 0.05, 0.05, 0.0, True),
        ("< 0.05", 0.05, 0.05, 0.0, False),
        ("< 0.05", 0.055, 0.05, 0.01, True),  # 0.055 < 0.05 + 0.01
        ("> 0.5", 0.45, 0.5, 0.04, False),  # 0.45 > 0.5 - 0.04 = 0.46 is false
        ("> 0.5", 0.47, 0.5, 0.04, True),
        ("> random + 0.02", 0.63, 0.60, 0.0, True),  # 0.63 > 0.62
        ("> random + 0.02", 0.615, 0.60, 0.0, False),
        (">= best - 0.01", 0.89, 0.90, 0.0, True),
        ("within 5% of 0.673", 0.70, 0.673, 0.0, True),  # |0.027| <= 0.03365
        ("within 5% of 0.673", 0.71, 0.673, 0.0, False),  # |0.037| > 0.03365
        ("within 0.1 of 2", 2.1, 2.0, 0.0, True),
        ("within 0.1 of 2", 2.11, 2.0, 0.0, False),
    ],
)
def test_a_relation_is_what_it_says(expect, measured, against, tolerance, holds):
    assert Expectation.parse(expect).test(measured, against, tolerance) is holds


def test_nan_never_holds():
    assert not Expectation.parse("> 0").test(math.nan, 0.0, 0.0)


@pytest.mark.parametrize("bad", ["0.05", "=< 1", "within of 3", "> 1 * 2", "about 0.5"])
def test_an_unreadable_relation_is_refused_with_the_grammar(bad):
    with pytest.raises(ConfigError, match="key 'expect'.*write 'OP X'"):
        claim(expect=bad)


# ----------------------------------------------------------------------------- quantities


def test_a_quantity_selects_reduces_and_counts_shares():
    tree = results()
    assert Quantity("merge/accuracy", {"alpha": 0.5}).read(tree) == pytest.approx(0.70)
    assert Quantity("merge/accuracy", {"alpha": [0.0, 1.0]}, reduce="min").read(tree) == pytest.approx(0.90)
    assert Quantity("tau/relu2/score", {"model": "b", "label": "u2"}).read(tree) == pytest.approx(0.3)
    assert Quantity("tau/relu2/score", {"model": "b"}, reduce="mean").read(tree) == pytest.approx(0.25)
    assert Quantity("tau/relu2/category", equals="both", reduce="mean").read(tree) == pytest.approx(0.5)
    assert Quantity("merge/accuracy", {"alpha": 0.5}, scale=0.5).read(tree) == pytest.approx(0.35)


def test_half_of_another_quantity_is_a_scaled_against():
    # "The aligned accuracy drop is at most half of ..." read as value <= half, half = 0.5 * other.
    table = {"name": "c", "source": "s", "says": "s", "value": "merge/accuracy", "select": {"alpha": 0.5}}
    table |= {
        "expect": "<= half",
        "against": {"half": {"value": "merge/accuracy", "select": {"alpha": 0.0}, "scale": 0.5}},
    }
    (parsed,) = parse_claims([table], steps=["merge"])
    assert parsed.against["half"].scale == 0.5
    (verdict,) = evaluate([parsed], results())
    assert not verdict.holds  # 0.70 <= 0.5 * 0.90 is false
    table["against"]["half"]["scale"] = 0.8
    (verdict,) = evaluate(parse_claims([table], steps=["merge"]), results())
    assert verdict.holds  # 0.70 <= 0.72


@pytest.mark.parametrize(
    ("quantity", "message"),
    [
        (Quantity("mrege/accuracy", {"alpha": 0.5}), "no group 'mrege'; did you mean 'merge'"),
        (Quantity("merge/acc", {"alpha": 0.5}), "no variable 'acc'; it holds accuracy, loss_barrier"),
        (Quantity("merge/accuracy"), "leaves 3 values with dims \\('alpha',\\).*give 'reduce'"),
        (Quantity("merge/accuracy", {"alpha": 0.25}), "alpha = 0.25 is not among its values"),
        (Quantity("merge/accuracy", {"beta": 1}), "no coordinate 'beta'"),
    ],
)
def test_a_quantity_that_cannot_be_read_says_what_is_missing(quantity, message):
    with pytest.raises(ConfigError, match=message):
        quantity.read(results())


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"expct": "< 1"}, "unknown key 'expct'. Did you mean 'expect'"),
        ({"state": "fails"}, "'state' must be 'holds' or 'does not hold'"),
        ({"state": "does not hold"}, "needs 'why'"),
        ({"expect": "> random"}, "compares with 'random', which 'against' does not define"),
        ({"value": "accuracy"}, "'value' must be '<group path>/<variable>'"),
        ({"reduce": "average"}, "'reduce' must be one of mean, median"),
        ({"tolerance": -1}, "'tolerance' must be a number >= 0"),
        ({"scale": "half"}, "'scale' must be a finite number, got 'half'"),
        ({"against": {"random": {"vaule": "x/y"}}}, "against.random: unknown key 'vaule'"),
    ],
)
def test_a_wrong_claim_is_refused_naming_the_claim_and_key(table, message):
    with pytest.raises(ConfigError, match=message) as info:
        claim(**table)
    assert "p.toml, [[claims]] #1 ('c')" in str(info.value)


def test_a_claim_on_a_step_the_pipeline_lacks_is_refused_before_the_run():
    with pytest.raises(
        ConfigError, match="starts with 'mrege', which is not a step of the pipeline; did you mean 'merge'"
    ):
        parse_claims([{"name": "c", "source": "s", "says": "s", "value": "mrege/x", "expect": "< 1"}], steps=["merge"])


def test_two_claims_of_one_name_are_refused():
    table = {"name": "c", "source": "s", "says": "s", "value": "m/x", "expect": "< 1"}
    with pytest.raises(ConfigError, match="two claims are named 'c'"):
        parse_claims([table, table])


PIPELINE = """
[data]
use = "mnist5000"
[[models]]
name = "a"
use = "mlp"
[[steps]]
use = "interpolation"
name = "merge"
models = ["a", "a"]
[[claims]]
name = "barrier"
source = "Paper, Fig. 2"
says = "no barrier"
value = "merge/loss_barrier"
expect = "<= random + 0.05"
state = "does not hold"
why = "the page says why"
against.random = { value = "merge/accuracy", select = { alpha = 0.5 } }
"""


def test_a_pipeline_keeps_its_claims_through_toml():
    pipeline = Pipeline.from_toml(PIPELINE, source="p.toml")
    assert [c.name for c in pipeline.claims] == ["barrier"]
    again = Pipeline.from_toml(pipeline.to_toml())
    assert again.claims == pipeline.claims


def test_a_step_cannot_take_the_claims_group_name():
    text = PIPELINE.replace('name = "merge"', 'name = "claims"').replace("merge/", "claims/")
    with pytest.raises(ConfigError, match="cannot be named 'claims'"):
        Pipeline.from_toml(text, source="p.toml")


# ----------------------------------------------------------------------------- outputs


def test_verdicts_go_to_results_summary_and_report(tmp_path):
    claims = parse_claims(
        [
            {
                "name": "low",
                "source": "P, Fig. 1",
                "says": "low barrier",
                "value": "merge/loss_barrier",
                "expect": "< 0.5",
            },
            {
                "name": "mid",
                "source": "P, Table 2",
                "says": "midpoint keeps accuracy",
                "value": "merge/accuracy",
                "select": {"alpha": 0.5},
                "expect": ">= ends - 0.01",
                "against": {"ends": {"value": "merge/accuracy", "select": {"alpha": [0.0, 1.0]}, "reduce": "min"}},
                "state": "does not hold",
                "why": "too few epochs",
            },
            {"name": "gone", "source": "P", "says": "s", "value": "merge/nothing", "expect": "< 1"},
        ]
    )
    tree, lines = attach_verdicts(results(), claims)
    verdicts = evaluate(claims, results())
    assert [v.holds for v in verdicts] == [True, False, False]
    assert verdicts[1].bound == pytest.approx(0.89)  # min(0.90, 0.92) - 0.01
    assert [v.as_recorded for v in verdicts] == [True, True, False]
    assert "no variable 'nothing'" in verdicts[2].problem
    assert lines[0] == "claims: 1 of 3 hold; 2 as recorded"
    assert lines[2] == ("  mid: does not hold: measured 0.7, expected >= ends - 0.01 (= 0.89) [P, Table 2]")
    assert lines[3].startswith("  gone: cannot be evaluated: group 'merge' has no variable 'nothing'")
    save_tree(tree, tmp_path / "results.nc")
    rows = verdicts_from_dataset(load_tree(tmp_path / "results.nc")[CLAIMS_GROUP].to_dataset())
    assert [(r["name"], r["state"], r["recorded"]) for r in rows] == [
        ("low", "holds", "holds"),
        ("mid", "does not hold", "does not hold"),
        ("gone", "does not hold", "holds"),
    ]
    assert np.isnan(rows[2]["measured"])
    table = markdown_table(rows)
    assert (
        "| mid | P, Table 2 | midpoint keeps accuracy | >= ends - 0.01 (= 0.89) | 0.7 | does not hold: too few epochs |"
        in table
    )
    page = render_report(tmp_path, tree)
    assert re.findall(r'<section id="(\w+)"', page)[0] == "claims"  # the first thing the report shows
    assert "2 of 3" not in page and "1 of 3 claims hold on this run" in page
    assert "(recorded: holds)" in page


def test_the_claims_command_lists_claims_and_flags_a_run_that_disagrees(tmp_path, capsys):
    example = tmp_path / "ex.toml"
    example.write_text(PIPELINE, encoding="utf-8")
    assert [c.name for c in claims_of_file(example)] == ["barrier"]
    assert main(["claims", str(example), "--runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "ex.toml (1 claims; no run at" in out and "recorded: does not hold; not measured" in out
    # A run where the claim holds, although recorded as not holding: exit 1, flagged.
    claims = claims_of_file(example)
    tree = xr.DataTree.from_dict(
        {"merge": xr.Dataset({"loss_barrier": ((), 0.0), "accuracy": ("alpha", [0.9]), "alpha": ("alpha", [0.5])})}
    )
    (tmp_path / "runs" / "ex").mkdir(parents=True)
    save_tree(attach_verdicts(tree, claims)[0], tmp_path / "runs" / "ex" / "results.nc")
    assert main(["claims", str(example), "--runs", str(tmp_path / "runs")]) == 1
    assert "this run: holds, measured 0  <-- differs from the recorded state" in capsys.readouterr().out


def test_a_pipeline_composed_in_python_checks_its_claims_steps_too():
    pipeline = Pipeline.from_toml(PIPELINE, source="p.toml")
    wrong = parse_claims([{"name": "x", "source": "s", "says": "s", "value": "mrege/loss_barrier", "expect": "< 1"}])
    with pytest.raises(ConfigError, match="\\[\\[claims\\]\\] #1 \\('x'\\).*did you mean 'merge'"):
        Pipeline(models=pipeline.models, steps=pipeline.steps, data=pipeline.data, claims=wrong).check()
