from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr

from mergescope import ConfigError, __version__
from mergescope.cli import main

from pipelines import SMALL

ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and __version__ in capsys.readouterr().out


@pytest.mark.parametrize("command", [[], ["run"], ["collect"], ["demo"], ["plugins"], ["registry"]])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0 and "usage: mergescope" in capsys.readouterr().out


def test_plugins_json_lists_components_by_kind():
    out = subprocess.run(
        [sys.executable, "-m", "mergescope", "plugins", "--json"], capture_output=True, text=True, check=True
    ).stdout
    plugins = {p["name"]: p for p in json.loads(out)["plugins"]}
    assert plugins["interpolation"]["components"] == {"merger": ["interpolation"]}
    assert plugins["kendall_tau"]["components"] == {"metric": ["kendall-tau"]}
    assert set(plugins["datasets"]["components"]["dataset"]) >= {"mnist5000", "digits"}
    assert plugins["zoo"]["distribution"] == "mergescope" and plugins["zoo"]["version"] == __version__


def test_plugins_text(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "interpolation  (mergescope_plugins.interpolation, mergescope" in out and "merger: interpolation" in out


def test_registry_check_passes_on_the_repository_file(capsys):
    assert main(["registry", "--check", "--file", str(ROOT / "registry.toml")]) == 0


@pytest.mark.parametrize("line_start", ["name = ", "paper = ", "summary = ", "[[component]]"])
def test_registry_check_fails_when_a_line_is_deleted(tmp_path, capsys, line_start):
    lines = (ROOT / "registry.toml").read_text().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if line.startswith(line_start) and i > 5)
    broken = tmp_path / "registry.toml"
    broken.write_text("".join(lines[:index] + lines[index + 1 :]))
    assert main(["registry", "--check", "--file", str(broken)]) == 1
    assert "disagrees with the loaded plugins" in capsys.readouterr().err


def test_registry_write_then_check(tmp_path, capsys):
    path = tmp_path / "registry.toml"
    assert main(["registry", "--write", "--file", str(path)]) == 0
    assert main(["registry", "--check", "--file", str(path)]) == 0
    assert path.read_text() == (ROOT / "registry.toml").read_text()


def test_bad_pipeline_is_one_paragraph_without_traceback(tmp_path, capsys):
    path = tmp_path / "p.toml"
    path.write_text(SMALL.replace('alphas = [0.0, 0.5, 1.0]', "alpha_s = 1"))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert str(path) in err and "[[steps]] #1 (use = 'interpolation')" in err and "key 'alpha_s'" in err
    with pytest.raises(ConfigError):
        main(["--debug", "run", str(path), "--out", str(tmp_path / "out")])


def test_run_command_writes_results(tmp_path, capsys):
    path = tmp_path / "p.toml"
    path.write_text(SMALL)
    assert main(["--quiet", "run", str(path), "--out", str(tmp_path / "out")]) == 0
    tree = xr.open_datatree(tmp_path / "out" / "results.nc")
    assert "interpolation" in tree.children
    log_lines = (tmp_path / "out" / "run.log").read_text().splitlines()
    assert log_lines and all(json.loads(line)["message"] for line in log_lines)


def test_run_steps_runs_only_the_steps_named_and_refuses_unknown_ones(tmp_path, capsys):
    path = tmp_path / "p.toml"
    path.write_text(SMALL)
    assert main(["--quiet", "run", str(path), "--steps", "interpolation", "--out", str(tmp_path / "out")]) == 0
    tree = xr.open_datatree(tmp_path / "out" / "results.nc")
    assert "interpolation" in tree.children and "kendall-tau" not in tree.children
    assert main(["run", str(path), "--steps", "interpolaton", "--out", str(tmp_path / "out")]) == 2
    assert "interpolaton" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", str(path), "--steps", "a,,b", "--out", str(tmp_path / "out")])


def test_demo_show_prints_the_embedded_pipeline(capsys):
    assert main(["demo", "--show"]) == 0
    assert 'use = "interpolation"' in capsys.readouterr().out


def test_collect_shards_join_to_the_single_collection(tmp_path, capsys):
    from mergescope.store import Store, join_stores

    path = tmp_path / "p.toml"
    path.write_text(SMALL)
    for i in range(2):
        assert main(["--quiet", "collect", str(path), "--out", str(tmp_path / f"shard{i}"), "--shard", f"{i}/2"]) == 0
    assert main(["--quiet", "collect", str(path), "--out", str(tmp_path / "all")]) == 0
    joined, single = join_stores([tmp_path / "shard0", tmp_path / "shard1"]), Store.open(tmp_path / "all")
    assert joined.info["samples"] == single.info["samples"] == 200
    diff = abs(joined.moments("a", "relu2").m2 - single.moments("a", "relu2").m2).max()
    assert diff <= 1e-9
    assert main(["collect", str(path), "--out", str(tmp_path / "x"), "--shard", "2/2"]) == 2
    assert "shard must be i/n" in capsys.readouterr().err
