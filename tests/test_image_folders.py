"""Image folders are checked before any work starts: unreadable files, class lists, class counts.

Tiny folders are written here with PIL: valid images of every kind the loader converts
(grey, alpha, palette, 16-bit), a truncated JPEG (a valid one cut short) and a garbage
``.jpg`` (random bytes). Runs go through ``mergescope.run`` and the CLI with a small
pipeline (two ``cnn`` checkpoints, an ``interpolation`` step) and must fail before any
step folder exists.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mergescope import CheckpointError, ConfigError, DataError, MergescopeError, get_registry, load_pipeline, run
from mergescope.cli import main
from mergescope_plugins.images import ImageFolderDataset

SIZE = 8


def _jpeg(path: Path, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def _folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 3) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _jpeg(root / name / f"{i}.jpg", seed=10 * c + i)
    return root


def _truncate(path: Path) -> Path:
    """Cut the file inside its image data, leaving the headers whole (as an interrupted copy does)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 1000, dtype=np.uint8).tobytes())
    return path


def _data(root: Path, **options) -> ImageFolderDataset:
    return ImageFolderDataset(root=str(root), image_size=SIZE, resize=SIZE, **options)


# ------------------------------------------------------------------- verify at load


def test_a_truncated_jpeg_is_named_at_load(tmp_path):
    bad = _truncate(_folder(tmp_path / "pets") / "dog" / "1.jpg")
    with Image.open(bad) as image:
        image.verify()  # PIL's cheap check does not see it: verify decodes fully
    with pytest.raises(DataError) as info:
        _data(tmp_path / "pets").load()
    message = str(info.value)
    assert "dataset 'imagefolder/pets'" in message and str(bad) in message
    assert "truncated" in message
    assert isinstance(info.value, ConfigError)


def test_several_unreadable_files_are_listed_up_to_five_with_the_count_of_the_rest(tmp_path):
    root = _folder(tmp_path / "pets", per_class=3)
    bad = [_garbage(root / c / f"{i}.jpg") for c in ("cat", "dog", "fox") for i in range(3) if (c, i) < ("fox", 1)]
    with pytest.raises(DataError) as info:
        _data(root).load()
    message = str(info.value)
    assert "7 of 9 image files cannot be read" in message
    assert sum(str(path) in message for path in bad) == 5
    assert "and 2 more" in message
    assert "cannot identify image file" in message


def test_only_the_chosen_files_are_verified(tmp_path):
    root = _folder(tmp_path / "pets")
    _garbage(root / "dog" / "2.jpg")
    assert len(_data(root, per_class=2).load()) == 6  # the third dog is not used
    assert len(_data(root, classes=["cat", "fox"]).load()) == 6


def test_without_verify_a_bad_file_is_a_data_error_naming_it_when_read(tmp_path):
    root = _folder(tmp_path / "pets")
    bad = _truncate(root / "dog" / "0.jpg")
    data = _data(root, verify=False).load()
    assert data[0][0].shape == (3, SIZE, SIZE)
    with pytest.raises(DataError, match=r"dataset 'imagefolder/pets': cannot read image file .*dog/0\.jpg.*OSError"):
        data[3]
    # also through a DataLoader worker process: the message stays the dataset's, without the worker's traceback
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=1)
    with pytest.raises(DataError) as info:
        list(loader)
    assert str(info.value).startswith("dataset 'imagefolder/pets': cannot read image file") and str(bad) in str(
        info.value
    )
    assert "Traceback" not in str(info.value)


def test_verify_is_left_out_of_cache_keys_at_its_default(tmp_path):
    from mergescope.keys import cache_key

    root = str(tmp_path)
    assert cache_key(_data(root)) == cache_key(_data(root, verify=True, classes=None))
    assert cache_key(_data(root, verify=False)) != cache_key(_data(root))


# ------------------------------------------------------------------- conversions


def test_grey_alpha_palette_and_16_bit_images_become_rgb(tmp_path):
    root = tmp_path / "kinds"
    (root / "a").mkdir(parents=True)
    Image.new("L", (SIZE, SIZE), 100).save(root / "a" / "grey.png")
    Image.new("RGBA", (SIZE, SIZE), (200, 10, 20, 0)).save(root / "a" / "rgba.png")
    palette = Image.new("P", (SIZE, SIZE), 1)
    palette.putpalette([0, 0, 0, 30, 60, 90])
    palette.save(root / "a" / "palette.png", transparency=1)
    Image.fromarray(np.full((SIZE, SIZE), 40000, dtype=np.uint16)).save(root / "a" / "sixteen.png")
    data = _data(root, mean=[0.0], std=[1.0]).load()
    pixels = {Path(p).stem: data[i][0] for i, p in enumerate(data.paths)}
    expected = {
        "grey": (100, 100, 100),  # repeated into three channels
        "rgba": (200, 10, 20),  # alpha dropped, not composited
        "palette": (30, 60, 90),  # the palette colour; its transparency dropped
        "sixteen": (40000 >> 8,) * 3,  # 16-bit grey: the top 8 bits
    }
    for stem, rgb in expected.items():
        assert pixels[stem].shape == (3, SIZE, SIZE)
        torch.testing.assert_close(pixels[stem][:, 0, 0], torch.tensor(rgb) / 255.0, msg=stem)


# ------------------------------------------------------------------- classes


def test_classes_select_and_order_the_labels(tmp_path, caplog):
    root = _folder(tmp_path / "pets", classes=("cat", "dog", "emu", "fox"), per_class=2)
    full = _data(root).load()
    with caplog.at_level(logging.INFO, logger="mergescope"):
        data = _data(root, classes=["fox", "cat"]).load()
    assert data.classes == ("fox", "cat")
    assert [Path(p).parent.name for p in data.paths] == ["cat", "cat", "fox", "fox"]
    assert data.labels.tolist() == [1, 1, 0, 0]
    # the same file keeps its sample id whichever classes are chosen
    assert [full.paths[i] for i in data.sample_ids] == list(data.paths)
    assert "ignoring 2 class folder(s) not listed there: dog, emu" in caplog.text


def test_without_classes_every_folder_alphabetically_and_the_list_is_logged(tmp_path, caplog):
    root = _folder(tmp_path / "pets", classes=("dog", "cat"), per_class=1)
    with caplog.at_level(logging.INFO, logger="mergescope"):
        data = _data(root).load()
    assert data.classes == ("cat", "dog")
    assert "2 classes, the class folders in alphabetical order (label 0 = 'cat'): cat, dog" in caplog.text


def test_a_listed_class_without_a_folder_is_named_with_a_suggestion(tmp_path):
    root = _folder(tmp_path / "pets")
    with pytest.raises(ConfigError) as info:
        _data(root, classes=["cat", "fx"]).load()
    message = str(info.value)
    assert "class 'fx' of 'classes' has no folder" in message
    assert "Did you mean 'fox'?" in message
    assert "Class folders found: cat, dog, fox" in message


def test_unlisted_empty_folders_are_ignored_but_a_listed_empty_one_is_refused(tmp_path):
    root = _folder(tmp_path / "pets")
    (root / "empty").mkdir()
    assert _data(root, classes=["cat", "dog"]).load().classes == ("cat", "dog")
    with pytest.raises(ConfigError, match="has no images"):
        _data(root, classes=["cat", "empty"]).load()


def test_classes_option_is_checked(tmp_path):
    with pytest.raises(ValueError, match="classes"):
        _data(tmp_path, classes=[])
    with pytest.raises(ValueError, match="classes"):
        _data(tmp_path, classes=["cat", "cat"])


# ------------------------------------------------------------------- in a run


def _checkpoint(path: Path, classes: int, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = get_registry().get("architecture", "cnn")(widths=[4]).build((3, SIZE, SIZE), classes)
    torch.save(model.state_dict(), path)
    return path


def _pipeline(tmp_path: Path, data_options: str = "", classes: int = 3) -> Path:
    _checkpoint(tmp_path / "a.pt", classes, 0)
    _checkpoint(tmp_path / "b.pt", classes, 1)
    path = tmp_path / "pipeline.toml"
    path.write_text(
        f"""
[data]
use = "imagefolder"
root = "pets"
image_size = {SIZE}
resize = {SIZE}
{data_options}

[[models]]
name = "a"
use = "cnn"
widths = [4]
checkpoint = "a.pt"

[[models]]
name = "b"
use = "cnn"
widths = [4]
checkpoint = "b.pt"

[[steps]]
use = "interpolation"
alphas = [0.0, 0.5, 1.0]
"""
    )
    return path


def test_the_pipeline_runs_on_a_good_folder(tmp_path):
    _folder(tmp_path / "pets")
    result = run(load_pipeline(_pipeline(tmp_path)), tmp_path / "run", quiet=True)
    assert "interpolation" in result.results.children


@pytest.mark.parametrize("spoil", [_truncate, _garbage])
def test_a_bad_file_stops_the_run_before_any_step(tmp_path, spoil, capsys):
    bad = spoil(_folder(tmp_path / "pets") / "fox" / "2.jpg")
    pipeline = _pipeline(tmp_path)
    with pytest.raises(DataError) as info:
        run(load_pipeline(pipeline), tmp_path / "run", quiet=True)
    assert str(bad) in str(info.value) and "imagefolder/pets" in str(info.value)
    assert "merger" not in str(info.value)
    assert not (tmp_path / "run" / "steps").exists()

    assert main(["run", str(pipeline), "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "imagefolder/pets" in err and "Traceback" not in err
    assert not (tmp_path / "cli" / "steps").exists()


def test_a_bad_file_met_in_a_step_is_a_data_error_with_the_step_as_location(tmp_path):
    bad = _truncate(_folder(tmp_path / "pets") / "fox" / "2.jpg")  # not among the first images traced
    with pytest.raises(DataError) as info:
        run(load_pipeline(_pipeline(tmp_path, "verify = false")), tmp_path / "run", quiet=True)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'pipeline.toml'}, [[steps]] #1 (use = 'interpolation'): ")
    assert f"dataset 'imagefolder/pets': cannot read image file {str(bad)!r}" in message
    assert "failed in merger" not in message


def test_a_checkpoint_with_another_class_count_is_refused_at_model_load(tmp_path, capsys):
    _folder(tmp_path / "pets")
    pipeline = _pipeline(tmp_path, classes=4)
    with pytest.raises(CheckpointError) as info:
        run(load_pipeline(pipeline), tmp_path / "run", quiet=True)
    message = str(info.value)
    assert "[[models]] #1 (name = 'a'), key 'checkpoint'" in message
    assert (
        f"checkpoint {str(tmp_path / 'a.pt')!r} has 4 output classes (head.weight 4x4) "
        "but the data has 3 classes (cat, dog, fox); "
        "give the classes the model was trained on, in its order, with `classes = [...]` in [data]"
    ) in message
    assert not (tmp_path / "run" / "steps").exists()
    assert main(["run", str(pipeline), "--out", str(tmp_path / "cli")]) == 2
    assert "has 4 output classes" in capsys.readouterr().err


def test_choosing_the_classes_makes_the_checkpoints_fit(tmp_path):
    _folder(tmp_path / "pets", classes=("cat", "dog", "emu", "fox", "yak"))
    pipeline = _pipeline(tmp_path, 'classes = ["fox", "dog", "cat", "emu"]', classes=4)
    result = run(load_pipeline(pipeline), tmp_path / "run", quiet=True)
    assert "interpolation" in result.results.children


def test_other_checkpoint_mismatches_keep_the_full_report(tmp_path):
    _folder(tmp_path / "pets")
    pipeline = _pipeline(tmp_path)
    torch.manual_seed(0)
    wider = get_registry().get("architecture", "cnn")(widths=[6]).build((3, SIZE, SIZE), 4)
    torch.save(wider.state_dict(), tmp_path / "a.pt")
    with pytest.raises(MergescopeError) as info:
        run(load_pipeline(pipeline), tmp_path / "run", quiet=True)
    assert "does not fit architecture 'cnn'" in str(info.value) and "output classes" not in str(info.value)


def test_a_model_trained_on_a_folder_is_trained_again_when_the_folder_changes(tmp_path, monkeypatch):
    # The training cache key holds what the folder holds, not only its path.
    monkeypatch.setenv("MERGESCOPE_CACHE", str(tmp_path / "cache"))
    _folder(tmp_path / "pets")
    folder = f'use = "imagefolder"\nroot = "pets"\nimage_size = {SIZE}\nresize = {SIZE}\n'
    path = tmp_path / "pipeline.toml"
    path.write_text(
        f"[data]\n{folder}\n"
        + "".join(
            f'[[models]]\nname = "{m}"\nuse = "cnn"\nwidths = [4]\n\n[models.train]\nepochs = 1\nbatch_size = 4\n'
            f"seed = {seed}\n\n[models.train_data]\n{folder}\n"
            for seed, m in enumerate("ab")
        )
        + '[[steps]]\nuse = "interpolation"\nalphas = [0.0, 1.0]\n'
    )
    monkeypatch.chdir(tmp_path)
    run(load_pipeline(path), tmp_path / "run", quiet=True)
    trained = sorted((tmp_path / "cache" / "models").glob("*.pt"))
    assert len(trained) == 2
    run(load_pipeline(path), tmp_path / "run", quiet=True)
    assert sorted((tmp_path / "cache" / "models").glob("*.pt")) == trained  # the same folder: reused
    _jpeg(tmp_path / "pets" / "cat" / "0.jpg", seed=99)  # one image replaced
    run(load_pipeline(path), tmp_path / "run", quiet=True)
    again = sorted((tmp_path / "cache" / "models").glob("*.pt"))
    assert len(again) == 4 and set(trained) < set(again)
