"""The documentation site builds with ``mkdocs build --strict``: no broken links, every page in the nav."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("mkdocs")


def test_mkdocs_builds_strict(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not included in the \"nav\"" not in proc.stderr  # every page is reachable from the nav
    assert (site / "index.html").is_file() and (site / "reliability" / "index.html").is_file()
