"""The plugin surface: hooks through pluggy's relay, tracing, isolation, one signature per step kind."""

from __future__ import annotations

import subprocess
import sys
import types

import attrs
import pytest
import xarray as xr

from mergescope import hookimpl


@attrs.define
class _Metric:
    """A metric that takes the step's context."""

    name = "surface-metric"

    def score(self, a, b, context=None):
        return xr.DataArray(a.values[0], dims=("unit",))


def _plugin(**hooks):
    return types.SimpleNamespace(**{name: hookimpl(fn) for name, fn in hooks.items()})


def test_a_hook_body_that_raises_loses_only_its_own_plugin(fresh_registry):
    def register_metrics(register):
        register(_Metric)
        raise RuntimeError("the plugin's own bug")

    fresh_registry.register_plugin(_plugin(register_metrics=register_metrics), name="raising_plugin")
    with pytest.warns(UserWarning, match="hook register_metrics of plugin 'raising_plugin' raised RuntimeError"):
        registry = fresh_registry.get_registry()
    (failed,) = [p for p in registry.failed() if p.name == "raising_plugin"]
    assert "the plugin's own bug" in failed.error
    # Every other plugin loaded, and the bundled metrics are there.
    assert "kendall-tau" in registry.names("metric") and "interpolation" in registry.names("merger")


def test_a_step_method_without_context_is_refused_naming_the_class(fresh_registry):
    @attrs.define
    class NoContext:
        """A metric written for the old signature."""

        name = "no-context"

        def score(self, a, b):
            return a

    def register_metrics(register):
        register(NoContext)

    fresh_registry.register_plugin(_plugin(register_metrics=register_metrics), name="old_style")
    with pytest.warns(UserWarning, match=r"NoContext.score\(\) must accept the step's context"):
        registry = fresh_registry.get_registry()
    assert "no-context" not in registry.names("metric")


def test_methods_of_kinds_that_are_not_steps_need_no_context(fresh_registry):
    @attrs.define
    class Shape:
        """An architecture: build() takes no context."""

        name = "surface-arch"

        def build(self, input_shape, num_classes):
            raise NotImplementedError

    def register_architectures(register):
        register(Shape)

    fresh_registry.register_plugin(_plugin(register_architectures=register_architectures), name="arch_plugin")
    assert "surface-arch" in fresh_registry.get_registry().names("architecture")


def test_hooks_go_through_the_relay_so_monitoring_sees_every_call(fresh_registry):
    def register_metrics(register):
        register(_Metric)

    fresh_registry.register_plugin(_plugin(register_metrics=register_metrics), name="monitored")
    seen: list[tuple[str, list[str]]] = []
    original = fresh_registry._new_plugin_manager

    def monitored_manager():
        pm = original()
        pm.add_hookcall_monitoring(lambda name, impls, kwargs: seen.append((name, [i.plugin_name for i in impls])), lambda *a: None)
        return pm

    fresh_registry._new_plugin_manager = monitored_manager
    try:
        registry = fresh_registry.get_registry()
    finally:
        fresh_registry._new_plugin_manager = original
    assert ("register_metrics", ["monitored"]) in seen
    assert ("register_metrics", ["kendall_tau"]) in seen
    assert "surface-metric" in registry.names("metric")


def test_trace_environment_variable_logs_hook_calls():
    env = {"MERGESCOPE_TRACE_PLUGINS": "1", "PATH": "", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mergescope", "plugins"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "mergescope trace: register_metrics called on plugin 'kendall_tau'" in done.stderr
    assert "mergescope trace: register_metrics on plugin 'kendall_tau' returned" in done.stderr


def test_no_trace_without_the_variable():
    done = subprocess.run(
        [sys.executable, "-m", "mergescope", "plugins"], capture_output=True, text=True, env={"PATH": ""}, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "mergescope trace" not in done.stderr
