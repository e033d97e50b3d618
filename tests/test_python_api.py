"""docs/python-api.md: the TOML block and the Python block give identical results."""

from __future__ import annotations

import re
from pathlib import Path

import xarray as xr

from mergescope import Pipeline, run

PAGE = (Path(__file__).resolve().parents[1] / "docs" / "python-api.md").read_text(encoding="utf-8")


def _block(language: str, index: int = 0) -> str:
    return re.findall(rf"```{language}\n(.*?)```", PAGE, flags=re.S)[index]


def test_the_toml_and_python_blocks_give_the_same_results(tmp_path, monkeypatch):
    from_toml = run(Pipeline.from_toml(_block("toml"), source="experiment.toml"), tmp_path / "toml", quiet=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_block("python").replace("print(result.summary)", ""), "python-api.md", "exec"), namespace)
    from_python = namespace["result"]
    assert from_python.out_dir.resolve() == (tmp_path / "runs" / "python").resolve()
    a = xr.open_datatree(tmp_path / "toml" / "results.nc")
    b = xr.open_datatree(tmp_path / "runs" / "python" / "results.nc")
    assert set(a.groups) == set(b.groups)
    for path in a.groups:
        assert a[path].to_dataset(inherit=False).identical(b[path].to_dataset(inherit=False)), path
    assert from_toml.summary == from_python.summary
    assert Pipeline.from_toml(namespace["pipeline"].to_toml()) == Pipeline.from_toml(_block("toml"))
