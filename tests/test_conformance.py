"""Every bundled component passes the conformance kit that third parties use."""

from __future__ import annotations

from mergescope.catalogue import bundled_entries
from mergescope.plugins import get_registry
from mergescope.testing import parametrize_with_checks

BUNDLED = [e.cls for e in bundled_entries(get_registry())]


def test_every_kind_with_bundled_components_is_covered():
    assert {"merger", "metric", "dataset", "architecture"} <= {get_registry().kind_of(c) for c in BUNDLED}


@parametrize_with_checks(BUNDLED)
def test_bundled_component(component, check):
    check(component)
