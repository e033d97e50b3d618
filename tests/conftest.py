"""Shared test setup: offline, a private model cache, a fresh plugin registry."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """One trained-model cache for the whole session, never the user's."""
    path = tmp_path_factory.mktemp("mergescope-cache")
    old = os.environ.get("MERGESCOPE_CACHE")
    os.environ["MERGESCOPE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MERGESCOPE_CACHE", None)
    else:
        os.environ["MERGESCOPE_CACHE"] = old


@pytest.fixture
def fresh_registry(monkeypatch):
    """Reload plugins for one test (env vars, sys.path) and restore the default afterwards."""
    from mergescope import plugins

    monkeypatch.delenv(plugins.SELECT_ENV, raising=False)
    monkeypatch.delenv(plugins.BLOCK_ENV, raising=False)
    plugins.reset()
    yield plugins
    plugins.reset()
