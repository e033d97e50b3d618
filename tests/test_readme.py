"""The README's examples work as written."""

from __future__ import annotations

import re
from pathlib import Path

from mergescope.testing import check_component

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_plugin_example_passes_the_conformance_kit():
    (block,) = [b for b in BLOCKS if "@hookimpl" in b]
    namespace: dict = {}
    exec(block, namespace)
    check_component(namespace["MeanGap"])


def test_pipeline_example_parses():
    from mergescope import Pipeline

    (block,) = re.findall(r"```toml\n(.*?)```", README, flags=re.S)
    pipeline = Pipeline.from_toml(block)
    assert [s.use for s in pipeline.steps] == ["interpolation", "weight-matching", "kendall-tau"]
    assert Pipeline.from_toml(pipeline.to_toml()) == pipeline


def test_python_example_composes_by_name_without_registry_lookups():
    (block,) = [b for b in BLOCKS if "ms.Pipeline(" in b]
    assert "get_registry" not in block and ".get(" not in block
    namespace: dict = {}
    exec(block[: block.index("result = ms.run")], namespace)  # the pipeline, not its run
    pipeline = namespace["pipeline"]
    pipeline.check()
    assert [s.use for s in pipeline.steps] == ["interpolation", "weight-matching", "kendall-tau"]
    assert type(pipeline).from_toml(pipeline.to_toml()) == pipeline
