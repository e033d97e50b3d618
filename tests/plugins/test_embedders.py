"""Tests of the bundled image embedders: preprocessing, the offline EfficientNet features, open_clip's errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mergescope.errors import CheckpointError, ConfigError
from mergescope.options import structure_options
from mergescope.testing import check_component, checks_for
from mergescope_plugins import embedders
from mergescope_plugins.embedders import EfficientNetFeatures, OpenClip, resize_centre_crop, to_unit_rgb


def _images(n: int = 3, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, channels, size, size), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- preprocessing


def test_minmax_maps_every_image_onto_0_1():
    x = _images() * 5 - 2
    out = to_unit_rgb(x, "minmax")
    assert out.dtype == torch.float32 and out.shape == x.shape
    flat = out.reshape(len(out), -1)
    torch.testing.assert_close(flat.amin(dim=1), torch.zeros(3))
    torch.testing.assert_close(flat.amax(dim=1), torch.ones(3))


def test_minmax_undoes_an_affine_normalisation():
    x = _images()
    torch.testing.assert_close(to_unit_rgb((x - 0.45) / 0.22), to_unit_rgb(x), atol=1e-6, rtol=0)


def test_constant_image_becomes_mid_grey_and_grey_is_repeated_over_channels():
    x = torch.full((1, 1, 4, 4), 3.0)
    out = to_unit_rgb(x, "minmax")
    assert out.shape == (1, 3, 4, 4)
    assert torch.all(out == 0.5)


def test_unit_pixels_are_clipped():
    x = torch.tensor([-1.0, 0.25, 2.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    assert to_unit_rgb(x, "unit")[0, 0, 0].tolist() == [0.0, 0.25, 1.0]


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.zeros(2, 4, 4), r"\(N, C, H, W\)"),
        (torch.zeros(2, 2, 4, 4), "1 \\(grey\\) or 3 \\(RGB\\) channels"),
        (torch.full((1, 3, 4, 4), float("nan")), "NaN or inf"),
    ],
)
def test_bad_images_are_rejected(images, match):
    with pytest.raises(ValueError, match=match):
        to_unit_rgb(images, "minmax", who="embedder 'x'")


def test_resize_centre_crop_keeps_the_centre_of_a_wide_image():
    x = torch.zeros(1, 3, 10, 20)
    x[..., 5:15] = 1.0  # the centre 10 columns
    out = resize_centre_crop(x, 10)
    assert out.shape == (1, 3, 10, 10)
    assert torch.all(out == 1.0)
    assert resize_centre_crop(_images(size=8), (12, 6)).shape == (3, 3, 12, 6)


# ------------------------------------------------------------------ EfficientNet-Lite0


@pytest.fixture(scope="module")
def small_efficientnet() -> EfficientNetFeatures:
    return EfficientNetFeatures(image_size=64)


def test_efficientnet_features_conformance():
    check_component(EfficientNetFeatures(image_size=64))


def test_efficientnet_features_at_the_default_size_are_unit_vectors():
    out = EfficientNetFeatures().embed(_images(2, size=20))
    assert out.shape == (2, 1280) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_efficientnet_grey_equals_grey_repeated(small_efficientnet):
    grey = _images(2, channels=1)
    np.testing.assert_allclose(
        small_efficientnet.embed(grey), small_efficientnet.embed(grey.expand(-1, 3, -1, -1)), atol=1e-6
    )


def test_efficientnet_ignores_how_the_dataset_normalised(small_efficientnet):
    x = _images(2)
    np.testing.assert_allclose(small_efficientnet.embed(x), small_efficientnet.embed(x * 4 - 1), atol=1e-5)
    different = small_efficientnet.embed(_images(2, seed=1))
    assert not np.allclose(small_efficientnet.embed(x), different, atol=1e-3)


def test_efficientnet_identity_names_model_size_and_weights():
    identity = EfficientNetFeatures(image_size=64, pixels="unit").identity()
    assert "efficientnet-lite0" in identity and "64px" in identity and "pixels unit" in identity


@pytest.mark.parametrize(
    "options, key",
    [({"pixels": "zscore"}, "pixels"), ({"batch_size": 0}, "batch_size"), ({"device": "warp-drive"}, "device")],
)
def test_bad_options_name_the_key(options, key):
    with pytest.raises(ConfigError, match=key):
        structure_options(EfficientNetFeatures, options)
    with pytest.raises(ConfigError, match=key):
        structure_options(OpenClip, options)


def test_embedders_register_under_their_names(fresh_registry):
    registry = fresh_registry.get_registry()
    if "open-clip" not in registry.names("embedder"):
        fresh_registry.register_plugin(embedders)
        registry = fresh_registry.get_registry()
    assert registry.get("embedder", "open-clip") is OpenClip
    assert registry.get("embedder", "efficientnet-lite0-features") is EfficientNetFeatures


# --------------------------------------------------------------------------- open_clip


@pytest.mark.parametrize("check", [c for c in checks_for(OpenClip) if c.__name__ != "check_embedder_output"])
def test_open_clip_options_conformance(check):
    check(OpenClip)


def test_open_clip_identity():
    assert OpenClip().identity() == "open-clip ViT-B-32 openai (pixels minmax)"


def test_open_clip_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail
    with pytest.raises(ConfigError, match=r"embedder 'open-clip' needs the open_clip_torch package .*pip install 'mergescope\[clip\]'"):
        OpenClip().embed(_images(1))


def test_open_clip_missing_checkpoint_file_says_how_to_provide_weights(tmp_path):
    missing = tmp_path / "nowhere" / "open_clip_pytorch_model.bin"
    with pytest.raises(CheckpointError) as info:
        OpenClip(pretrained=str(missing)).embed(_images(1))
    message = str(info.value)
    assert str(missing) in message and "does not exist" in message
    assert 'pretrained = "/path/to/open_clip_pytorch_model.bin"' in message and "HF_HUB_OFFLINE=1" in message


def test_open_clip_tag_offline_fails_at_once_and_says_how_to_provide_weights(monkeypatch, tmp_path):
    pytest.importorskip("open_clip")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        OpenClip(cache_dir=str(tmp_path)).embed(_images(1))
    message = str(info.value)
    assert "'openai'" in message and "not available" in message
    assert "timm/vit_base_patch32_clip_224.openai" in message  # where the file comes from
    assert 'pretrained = "/path/to/open_clip_pytorch_model.bin"' in message and "HF_HUB_OFFLINE=1" in message


def test_open_clip_unknown_tag_and_architecture_list_what_exists():
    pytest.importorskip("open_clip")
    with pytest.raises(ConfigError, match="laion2b_s34b_b79k"):
        OpenClip(pretrained="no-such-tag").embed(_images(1))
    with pytest.raises(ConfigError, match="Did you mean 'ViT-B-32'"):
        OpenClip(model="ViT-B-33").embed(_images(1))


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """The conformance kit's tiny random CLIP, saved as a local checkpoint, and the same network."""
    open_clip = pytest.importorskip("open_clip")
    path = Path(OpenClip.conformance_instance(tmp_path).pretrained)
    expected = open_clip.create_model("mergescope-tiny-clip", pretrained=None)
    expected.load_state_dict(torch.load(path, weights_only=True))
    return path, expected.eval()


def test_open_clip_loads_a_local_checkpoint(tiny_checkpoint):
    path, reference = tiny_checkpoint
    embedder = OpenClip(model="mergescope-tiny-clip", pretrained=str(path), batch_size=2)
    check_component(embedder)
    images = _images(3, channels=1, size=20)
    out = embedder.embed(images)
    assert out.shape == (3, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # Same as running the model by hand on CLIP's preprocessing of the [0, 1] images.
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    x = (resize_centre_crop(to_unit_rgb(images), 32) - mean) / std
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference.encode_image(x), dim=-1).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_open_clip_checkpoint_of_another_architecture_is_a_checkpoint_error(tiny_checkpoint):
    path, _ = tiny_checkpoint
    with pytest.raises(CheckpointError, match="could not load the checkpoint"):
        OpenClip(model="ViT-S-32", pretrained=str(path)).embed(_images(1))
