from __future__ import annotations

import os

import pytest
import torch

from mergescope.components import Architecture
from mergescope.errors import ConfigError
from mergescope.options import structure_options
from mergescope_plugins.timm_models import TimmModel, cached_weights

timm = pytest.importorskip("timm")


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    """Every test sees empty Hugging Face and torch hub caches of its own, and no network."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def put_in_hf_cache(cache, arch: str, state: dict[str, torch.Tensor]) -> None:
    """Lay ``state`` out as huggingface_hub caches a download of timm's repository for ``arch``."""
    import safetensors.torch
    from timm.models import get_pretrained_cfg

    repo = get_pretrained_cfg(arch).hf_hub_id
    folder = cache / "hub" / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abc")
    (folder / "snapshots" / "0123abc").mkdir(parents=True)
    safetensors.torch.save_file(state, folder / "snapshots" / "0123abc" / "model.safetensors")


def test_builds_any_timm_model_by_name_for_the_data():
    vit = TimmModel("test_vit").build((1, 32, 32), 7).eval()
    assert vit.patch_embed.proj.in_channels == 1 and vit.head.out_features == 7
    # img_size reaches a model that takes it: position embeddings for 32x32 images
    assert vit.patch_embed.img_size == (32, 32)
    cnn = TimmModel("test_resnet").build((3, 20, 24), 4).eval()  # a CNN takes no img_size and any size
    with torch.no_grad():
        assert vit(torch.zeros(2, 1, 32, 32)).shape == (2, 7)
        assert cnn(torch.zeros(2, 3, 20, 24)).shape == (2, 4)
    assert isinstance(TimmModel("test_vit"), Architecture)


def test_a_wrong_name_suggests_the_closest():
    with pytest.raises(
        ValueError, match=r"'vit_tiny_patch16_22' is not a timm model. Did you mean 'vit_tiny_patch16_224'"
    ):
        TimmModel("vit_tiny_patch16_22")
    with pytest.raises(ConfigError, match=r"key 'arch'.*is not a timm model"):
        structure_options(TimmModel, {"arch": "resnet_18"})
    with pytest.raises(ValueError, match=r"no pretrained tag 'nope' of 'resnet18'; its tags: .*'resnet18.a1_in1k'"):
        TimmModel("resnet18.nope")


def test_images_the_model_cannot_take_are_a_config_error():
    with pytest.raises(
        ConfigError, match=r"does not run on images of shape \(1, 28, 28\).*multiples of its patch size"
    ):
        TimmModel("test_vit").build((1, 28, 28), 3)  # patch 16 does not tile 28 pixels
    with pytest.raises(ConfigError, match=r"needs images \(C, H, W\)"):
        TimmModel("test_vit").build((784,), 3)


def test_missing_pretrained_weights_say_how_to_provide_them(empty_caches):
    with pytest.raises(ConfigError) as info:
        TimmModel("test_vit", pretrained=True).build((3, 32, 32), 3)
    message = str(info.value)
    assert info.value.where == "key 'pretrained'"
    assert "not in the local cache and nothing is downloaded" in message
    assert "'timm/test_vit.r160_in1k'" in message and str(empty_caches / "hub") in message
    assert 'checkpoint = "/path/to/weights.safetensors"' in message
    assert "huggingface-cli download timm/test_vit.r160_in1k" in message
    assert not (empty_caches / "hub").exists()  # nothing was fetched


def test_pretrained_weights_come_from_the_local_cache_only(empty_caches):
    torch.manual_seed(5)
    source = timm.create_model("test_vit", pretrained=False)  # 1000 classes, 3 channels, 160 pixels: timm's own
    put_in_hf_cache(empty_caches, "test_vit", source.state_dict())
    os.environ.pop("HF_HUB_OFFLINE")
    path, from_hub, _ = cached_weights("test_vit")
    assert path is not None and path.name == "model.safetensors" and from_hub
    model = TimmModel("test_vit", pretrained=True).build((3, 32, 32), 3)
    assert "HF_HUB_OFFLINE" not in os.environ  # the offline switch was set for the build only
    got, want = model.state_dict(), source.state_dict()
    # every block is the cached one; timm adapts the head (other classes) and the position embeddings (other size)
    differ = sorted(k for k in want if k in got and (got[k].shape != want[k].shape or not torch.equal(got[k], want[k])))
    assert differ == ["head.bias", "head.weight", "pos_embed"]
    assert torch.equal(got["blocks.0.attn.qkv.weight"], want["blocks.0.attn.qkv.weight"])


def test_pretrained_is_false_by_default_and_deterministic_under_a_seed():
    arch = TimmModel("test_vit")
    assert arch.pretrained is False
    torch.manual_seed(1)
    first = arch.build((3, 32, 32), 3).state_dict()
    torch.manual_seed(1)
    second = arch.build((3, 32, 32), 3).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
