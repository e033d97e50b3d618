"""Every bundled component passes the conformance kit that third parties use."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from mergescope.catalogue import bundled_entries
from mergescope.plugins import get_registry
from mergescope.testing import parametrize_with_checks


def _image_folder() -> str:
    """A tiny ImageFolder (two classes, two images each) for components that need a root."""
    root = Path(tempfile.mkdtemp(prefix="mergescope-imagefolder-"))
    # Built while collecting, before any fixture exists: removed when the session ends.
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (100 * i, 50, 0)).save(root / c / f"{i}.png")
    return str(root)


def _example(cls):
    """Default options, except where a component has a required option."""
    if cls.name == "imagefolder":
        return cls(root=_image_folder(), image_size=8, resize=8)
    if cls.name == "concat":  # two small offline parts of one shape
        return cls(parts=[
            {"use": "foolbox-samples", "source": "cifar10"},
            {"use": "skimage-photos", "image_size": 32, "photos": ["camera", "coffee"]},
        ])
    if cls.name == "clip-delta":  # the default embedder at 32 px: the same code, a tenth of the time
        return cls(k=3, embedder_options={"image_size": 32})
    if cls.name == "adamerging":  # the same code at 20 Adam steps instead of 500
        return cls(iterations=20)
    return cls


BUNDLED = [_example(e.cls) for e in bundled_entries(get_registry())]


def test_every_kind_with_bundled_components_is_covered():
    kinds = {get_registry().kind_of(c if isinstance(c, type) else type(c)) for c in BUNDLED}
    assert {"merger", "metric", "dataset", "architecture"} <= kinds


@parametrize_with_checks(BUNDLED)
def test_bundled_component(component, check):
    check(component)
