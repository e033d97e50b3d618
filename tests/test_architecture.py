"""The shape of the core: layered without cycles, no plugin imports, modules of a readable size, all documented."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "core"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

needs_linter = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e '.[test]')")


def _core_modules() -> list[str]:
    """Dotted names of every module of the core, packages as their package name."""
    names = []
    for path in sorted(CORE.rglob("*.py")):
        parts = path.relative_to(CORE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(("mergescope", *parts)))
    return names


def _lint(root: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@needs_linter
def test_import_contracts_are_kept():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@needs_linter
def test_a_core_module_importing_a_plugin_breaks_the_contract(tmp_path):
    # A copy of both packages on PYTHONPATH, one core module importing the bundled plugins.
    (tmp_path / "src").mkdir()
    shutil.copytree(CORE, tmp_path / "src" / "mergescope", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "plugins", tmp_path / "src" / "mergescope_plugins", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    errors = tmp_path / "src" / "mergescope" / "errors.py"
    errors.write_text(errors.read_text(encoding="utf-8") + "\nimport mergescope_plugins  # noqa\n", encoding="utf-8")
    done = _lint(tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "src")})
    assert done.returncode != 0
    assert "The core never imports a plugin BROKEN" in done.stdout
    assert "mergescope.errors -> mergescope_plugins" in done.stdout


def test_every_core_module_is_in_a_layer_of_the_contract():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    (layers,) = [c for c in config["contracts"] if c["type"] == "layers"]
    listed = {m.strip() for layer in layers["layers"] for m in layer.replace("|", ":").split(":")}
    top_level = {".".join(m.split(".")[:2]) for m in _core_modules() if m != "mergescope"}
    assert sorted(top_level - listed) == []


def test_no_core_module_imports_the_package_itself():
    # `from . import x` of a name defined in __init__ would import every module through it.
    offenders = []
    for path in CORE.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == CORE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None and path.parent == CORE:
                offenders += [f"{path.name}: from . import {a.name}" for a in node.names if not (CORE / f"{a.name}.py").exists() and not (CORE / a.name).is_dir()]
            if isinstance(node, ast.Import) and any(a.name == "mergescope" for a in node.names):
                offenders.append(f"{path.name}: import mergescope")
    assert offenders == []


def test_no_core_module_is_over_900_lines():
    long = {
        str(path.relative_to(CORE)): n
        for path in CORE.rglob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > 900
    }
    assert long == {}


def test_groups_is_a_package():
    assert not (CORE / "groups.py").exists()
    assert (CORE / "groups" / "__init__.py").is_file()


def test_architecture_page_names_every_core_module():
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = []
    for path in sorted(CORE.rglob("*.py")):
        relative = path.relative_to(CORE).as_posix()
        if relative.endswith("__init__.py") and relative != "__init__.py":
            relative = relative[: -len("/__init__.py")] + "/"
        if f"`{relative}`" not in page:
            missing.append(relative)
    assert missing == []


def test_importing_the_hook_marker_loads_neither_the_runner_nor_torch():
    # A plugin module's first line, `from mergescope import hookimpl`, stays cheap.
    code = (
        "import sys\nfrom mergescope import hookimpl\n"
        "heavy = [m for m in ('mergescope.runner', 'mergescope.report', 'mergescope.pipeline', 'torch') if m in sys.modules]\n"
        "print(heavy)\n"
        "import mergescope\nassert mergescope.run.__module__ == 'mergescope.runner'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
