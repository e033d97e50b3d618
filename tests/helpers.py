"""Test helpers: installing throw-away plugin distributions on sys.path."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path


def install_plugin(root: Path, module: str, source: str, entry_name: str | None = None) -> Path:
    """Write ``module`` with ``source`` and a dist-info declaring it as a mergescope plugin under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    dist = root / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n", encoding="utf-8")
    (dist / "entry_points.txt").write_text(
        f"[mergescope.plugins]\n{entry_name or module} = {module}\n", encoding="utf-8"
    )
    return root


def forget_module(name: str) -> None:
    sys.modules.pop(name, None)
