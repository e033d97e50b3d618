from __future__ import annotations

import re

import pytest

from mergescope import ConfigError, DuplicateComponentError, PluginError, UnknownComponentError
from mergescope.kinds import KINDS

from helpers import install_plugin

BUNDLED = {"datasets", "zoo", "interpolation", "kendall_tau"}

METRIC_PLUGIN = """
import attrs
import xarray as xr
from mergescope import hookimpl

@attrs.define
class Dup:
    \"\"\"A metric whose name clashes with a bundled one.\"\"\"
    name = "kendall-tau"
    def score(self, a, b, context=None):
        return xr.DataArray(a.values[0], dims=("unit",))

@hookimpl
def register_metrics(register):
    register(Dup)
"""


def test_bundled_plugins_load_through_entry_points(fresh_registry):
    registry = fresh_registry.get_registry()
    assert set(registry.plugins) >= BUNDLED
    for name in BUNDLED:
        info = registry.plugins[name]
        assert info.distribution == "mergescope" and info.error is None
    assert "interpolation" in registry.names("merger")
    assert "kendall-tau" in registry.names("metric")
    assert {"mnist5000", "digits"} <= set(registry.names("dataset"))
    assert {"mlp", "cnn"} <= set(registry.names("architecture"))


def test_every_kind_has_a_hook_spec(fresh_registry):
    pm = fresh_registry.get_registry().pm
    for kind in KINDS.values():
        assert hasattr(pm.hook, kind.hook), kind.hook


def test_unknown_name_lists_known_names_and_closest(fresh_registry):
    registry = fresh_registry.get_registry()
    with pytest.raises(UnknownComponentError) as info:
        registry.get("metric", "kendal-tau")
    message = str(info.value)
    assert "'kendal-tau'" in message and "Did you mean 'kendall-tau'" in message
    assert "Known metrics: " in message and "kendall-tau" in message.split("Known metrics:")[1]
    assert isinstance(info.value, ConfigError)


def test_name_of_another_kind_is_pointed_out(fresh_registry):
    with pytest.raises(UnknownComponentError, match="'interpolation' is a merger, not a metric"):
        fresh_registry.get_registry().get("metric", "interpolation")


def test_duplicate_names_name_both_plugins(fresh_registry, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(install_plugin(tmp_path, "dup_metric_plugin", METRIC_PLUGIN)))
    fresh_registry.reset()
    registry = fresh_registry.get_registry()
    with pytest.raises(DuplicateComponentError) as info:
        registry.get("metric", "kendall-tau")
    assert "'kendall_tau'" in str(info.value) and "'dup_metric_plugin'" in str(info.value)
    # Other names are unaffected.
    assert registry.get("merger", "interpolation").name == "interpolation"


def test_block_and_select_environment_variables(fresh_registry, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(install_plugin(tmp_path, "dup_metric_plugin2", METRIC_PLUGIN)))
    monkeypatch.setenv(fresh_registry.BLOCK_ENV, "dup_metric_plugin2")
    fresh_registry.reset()
    registry = fresh_registry.get_registry()
    assert "dup_metric_plugin2" not in registry.plugins
    assert registry.get("metric", "kendall-tau").__module__ == "mergescope_plugins.kendall_tau"

    monkeypatch.delenv(fresh_registry.BLOCK_ENV)
    monkeypatch.setenv(fresh_registry.SELECT_ENV, "zoo, datasets")
    fresh_registry.reset()
    registry = fresh_registry.get_registry()
    assert set(registry.plugins) == {"zoo", "datasets"}
    assert registry.names("metric") == []


def test_a_broken_plugin_is_reported_and_the_others_load(fresh_registry, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(install_plugin(tmp_path, "broken_plugin", "import no_such_module_here\n")))
    fresh_registry.reset()
    with pytest.warns(UserWarning, match="broken_plugin"):
        registry = fresh_registry.get_registry()
    failed = registry.failed()
    assert [p.name for p in failed] == ["broken_plugin"]
    assert "ModuleNotFoundError" in failed[0].error and "no_such_module_here" in failed[0].error
    assert "kendall-tau" in registry.names("metric")


def test_a_misspelled_hook_is_an_error(fresh_registry, tmp_path, monkeypatch):
    source = """
    from mergescope import hookimpl

    @hookimpl
    def register_metric(register):
        pass
    """
    monkeypatch.syspath_prepend(str(install_plugin(tmp_path, "typo_plugin", source)))
    fresh_registry.reset()
    with pytest.raises(PluginError, match="typo_plugin.*register_metric"):
        fresh_registry.get_registry()


@pytest.mark.parametrize(
    "body, message",
    [
        ("class C:\n    name = 'c'\n    def score(self, a, b, context=None): pass\nregister(C)", "must be an attrs class"),
        ("@attrs.define\nclass C:\n    def score(self, a, b, context=None): pass\nregister(C)", "needs a non-empty string class attribute 'name'"),
        ("@attrs.define\nclass C:\n    name = 'c'\nregister(C)", "has no score() method"),
        ("register(lambda: None)", "not a class"),
    ],
)
def test_malformed_components_are_rejected_with_the_plugin_named(fresh_registry, body, message):
    import types

    import attrs

    from mergescope import hookimpl

    def register_metrics(register):
        exec(body, {"attrs": attrs, "register": register})

    plugin = types.SimpleNamespace(register_metrics=hookimpl(register_metrics))
    fresh_registry.register_plugin(plugin, name="bad_component_plugin")
    with pytest.warns(UserWarning, match=re.escape(message)):
        registry = fresh_registry.get_registry()
    (failed,) = registry.failed()
    assert failed.name == "bad_component_plugin" and message in failed.error
    assert "kendall-tau" in registry.names("metric")  # the others still load
