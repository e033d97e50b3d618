"""Step kinds are declared once, in mergescope.kinds, and alignments say what space they are in."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from mergescope import Alignment, ConfigError, Pipeline
from mergescope.groups import permutation_matrix
from mergescope.kinds import KINDS, STEP_KINDS, step_kind
from mergescope.values import CHANNEL_GROUPS, LAYERS

from pipelines import DIGITS_PAIR

CORE = Path(__file__).resolve().parents[1] / "core"


def test_kind_names_are_compared_nowhere_but_in_the_kinds_module():
    pattern = re.compile(
        r"== ?\"(aligner|merger|metric|visualizer|differ)\"|in \(\"(aligner|merger|metric|visualizer|differ)\""
    )
    offenders = [
        f"{path.relative_to(CORE)}:{i}"
        for path in sorted(CORE.rglob("*.py"))
        if path.name != "kinds.py"
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_step_kinds_and_the_others():
    assert STEP_KINDS == ("aligner", "merger", "visualizer", "metric", "differ")
    assert [k for k, kind in KINDS.items() if not kind.is_step] == ["dataset", "architecture", "embedder"]
    with pytest.raises(ValueError, match="'dataset' is not a step kind; step kinds are aligner, merger"):
        step_kind("dataset")


class _Step:
    def __init__(self, models=None, layers=None):
        self.models, self.layers = models, layers


@pytest.mark.parametrize(
    ("kind", "step", "reads_models", "reads_recordings", "resolves_layers"),
    [
        ("metric", _Step(), True, True, True),
        ("differ", _Step(), True, True, True),
        ("visualizer", _Step(), False, False, True),
        ("visualizer", _Step(models=["a"]), True, True, True),  # top-k grids of the models it names
        ("aligner", _Step(), True, False, False),
        ("aligner", _Step(layers=["relu1"]), True, False, True),
        ("merger", _Step(), True, False, False),
    ],
)
def test_what_a_step_reads(kind, step, reads_models, reads_recordings, resolves_layers):
    rules = step_kind(kind)
    assert rules.reads_models(step) is reads_models
    assert rules.reads_recordings(step) is reads_recordings
    assert rules.resolves_layers(step) is resolves_layers


def test_what_a_key_holds():
    common = dict(
        fingerprints=["fa", "fb"], selectors=["relu1"], recording=["mean", 10], earlier=["k1"], alignment=None, batch_size=64
    )
    assert step_kind("metric").key_inputs(_Step(), **common) == ["fa", "fb", ["relu1"], "mean", 10]
    assert step_kind("merger").key_inputs(_Step(layers=["x"]), **common) == ["fa", "fb", {"layers": ["x"]}, {"batch_size": 64}]
    assert step_kind("visualizer").key_inputs(_Step(), **{**common, "fingerprints": []}) == ["k1"]
    with_alignment = step_kind("merger").key_inputs(_Step(), **{**common, "alignment": "kwm"})
    assert "kwm" in with_alignment


def test_rules_that_the_pipeline_check_reads():
    assert [k for k in STEP_KINDS if step_kind(k).takes_own_data] == ["aligner", "merger"]
    assert [k for k in STEP_KINDS if step_kind(k).min_models == 2] == ["aligner", "metric"]
    assert [k for k in STEP_KINDS if step_kind(k).needs_layers] == ["metric", "differ"]
    assert [k for k in STEP_KINDS if step_kind(k).makes_model] == ["merger"]
    assert [k for k in STEP_KINDS if step_kind(k).makes_alignment] == ["aligner"]
    assert {k: step_kind(k).report_section for k in STEP_KINDS} == {
        "aligner": "results",
        "merger": "results",
        "visualizer": "panels",
        "metric": "metrics",
        "differ": "results",
    }


# ------------------------------------------------------------- honest alignments


def test_alignment_space_round_trips_and_old_trees_are_channel_groups():
    t = permutation_matrix(np.array([1, 0, 2]))
    alignment = Alignment("a", {"b": {"relu1": t}}, space=LAYERS)
    back = Alignment.from_tree(alignment.to_tree())
    assert back.space == LAYERS and not back.applies_to_weights
    assert back.transforms["b"]["relu1"].equals(t)
    old = alignment.to_tree()
    old.dataset = old.to_dataset(inherit=False).drop_vars("space")  # written before spaces were recorded
    assert Alignment.from_tree(old).space == CHANNEL_GROUPS
    with pytest.raises(ValueError, match="space is one of channel-groups, layers, not 'units'"):
        Alignment("a", space="units")


LASSO_THEN_ALIGNED = (
    DIGITS_PAIR
    + """
[[steps]]
use = "lasso"
name = "reg"
models = ["a", "b"]
layers = ["relu1"]

[[steps]]
use = "interpolation"
models = ["a", "b@reg"]
"""
)


def test_naming_a_model_through_a_layer_alignment_is_refused_at_check_time():
    with pytest.raises(ConfigError) as info:
        Pipeline.from_toml(LASSO_THEN_ALIGNED).check()
    message = str(info.value)
    assert "[[steps]] #2" in message and "key 'models'" in message
    assert "'b@reg'" in message and "'layers' space" in message and "weight-matching" in message
