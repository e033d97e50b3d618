from __future__ import annotations

import pytest
import torch

from mergescope import CheckpointError, ConfigError, ModelSpec, Pipeline, Step, Training, get_registry, run
from mergescope.pipeline import ActivationSpec, load_pipeline

from pipelines import SMALL


def write(tmp_path, text, name="pipeline.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_toml_round_trip():
    pipeline = Pipeline.from_toml(SMALL)
    again = Pipeline.from_toml(pipeline.to_toml())
    assert again == pipeline
    assert again.to_toml() == pipeline.to_toml()


def test_python_composition_equals_toml():
    reg = get_registry()
    mnist, mlp = reg.get("dataset", "mnist5000"), reg.get("architecture", "mlp")
    pipeline = Pipeline(
        data=mnist(split="test", per_class=20),
        activations=ActivationSpec(layers=["relu1", "relu2"], batch_size=100),
        models=[
            ModelSpec("a", mlp(hidden=[32, 32]), train=Training(seed=0, epochs=6)),
            ModelSpec("b", mlp(hidden=[32, 32]), train=Training(seed=1, epochs=6)),
        ],
        steps=[
            Step(reg.get("merger", "interpolation")(alphas=[0.0, 0.5, 1.0]), models=["a", "b"]),
            Step(reg.get("metric", "kendall-tau")(), models=["a", "b"], allow_unaligned=True),
        ],
    )
    assert pipeline == Pipeline.from_toml(SMALL)
    assert Pipeline.from_toml(pipeline.to_toml()) == pipeline


def test_step_names_default_to_the_component_and_stay_unique():
    text = SMALL + '\n[[steps]]\nuse = "kendall-tau"\nmodels = ["b", "a"]\nallow_unaligned = true\n'
    assert Pipeline.from_toml(text).step_names() == ["interpolation", "kendall-tau-2", "kendall-tau-3"]


@pytest.mark.parametrize(
    "edit, expected",
    [
        # a misspelled component
        (('use = "kendall-tau"', 'use = "kendal-tau"'), ["[[steps]] #2", "key 'use'", "Did you mean 'kendall-tau'"]),
        # an unknown option key, close to a step key
        (('alphas = [0.0, 0.5, 1.0]', 'alphass = [0.0]'), ["[[steps]] #1 (use = 'interpolation')", "key 'alphass'", "Did you mean 'alphas'", "Accepted options:"]),
        # a bad option value
        (('alphas = [0.0, 0.5, 1.0]', 'alphas = "all"'), ["[[steps]] #1 (use = 'interpolation')", "key 'alphas'"]),
        # a misspelled architecture option
        (('hidden = [32, 32]\n\n[models.train]\nseed = 0', 'hiden = [32, 32]\n\n[models.train]\nseed = 0'), ["[[models]] #1 (name = 'a')", "key 'hiden'", "Did you mean 'hidden'"]),
        # a bad training option
        (('epochs = 6\n\n[[models]]', 'epochs = -1\n\n[[models]]'), ["[[models]] #1 (name = 'a')", "[train]", "epochs"]),
        # an unknown model in a step
        (('models = ["a", "b"]\nalphas', 'models = ["a", "c"]\nalphas'), ["[[steps]] #1 (use = 'interpolation')", "key 'models'", "unknown model 'c'"]),
        # a misspelled top-level table
        (("[activations]", "[activation]"), ["key 'activation'", "Did you mean 'activations'"]),
        # a missing dataset option value
        (('split = "test"', 'split = "tset"'), ["[data]", "split"]),
    ],
)
def test_errors_name_file_table_and_key(tmp_path, edit, expected):
    old, new = edit
    assert old in SMALL
    path = write(tmp_path, SMALL.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, (fragment, message)


def test_missing_model_file(tmp_path):
    text = SMALL.replace('hidden = [32, 32]\n\n[models.train]\nseed = 0\nepochs = 6', 'hidden = [32, 32]\ncheckpoint = "nowhere.pt"', 1)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    message = str(info.value)
    for fragment in (str(path), "[[models]] #1 (name = 'a')", "key 'checkpoint'", "nowhere.pt", "does not exist"):
        assert fragment in message


def test_checkpoint_of_another_architecture(tmp_path):
    mlp = get_registry().get("architecture", "mlp")
    torch.save(mlp(hidden=[16, 16]).build((1, 28, 28), 10).state_dict(), tmp_path / "small.pt")
    text = SMALL.replace('hidden = [32, 32]\n\n[models.train]\nseed = 0\nepochs = 6', 'hidden = [32, 32]\ncheckpoint = "small.pt"', 1)
    pipeline = load_pipeline(write(tmp_path, text))
    with pytest.raises(CheckpointError) as info:
        run(pipeline, tmp_path / "run", quiet=True)
    message = str(info.value)
    for fragment in ("[[models]] #1 (name = 'a')", "key 'checkpoint'", "small.pt", "fc1.weight", "(16, 784)", "(32, 784)"):
        assert fragment in message, (fragment, message)


def test_a_step_reading_activations_needs_layers():
    text = SMALL.replace('layers = ["relu1", "relu2"]\n', "")
    with pytest.raises(ConfigError, match=r"\[\[steps\]\] #2 \(use = 'kendall-tau'\), key 'layers'"):
        Pipeline.from_toml(text)


def test_dataset_and_architecture_cannot_be_steps():
    with pytest.raises(ConfigError, match="unknown component 'mlp'"):
        Pipeline.from_toml(SMALL + '\n[[steps]]\nuse = "mlp"\n')


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[data\nuse=1")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_pipeline(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("bad", ["a/b", "<script>", "b@wm", " a"])
def test_names_that_cannot_be_groups_or_references_are_refused(bad):
    from mergescope import ConfigError

    with pytest.raises(ConfigError, match="must start with a letter or digit"):
        Pipeline.from_toml(SMALL.replace('name = "a"', f"name = {bad!r}".replace("'", '"'), 1))
    with pytest.raises(ConfigError, match="must start with a letter or digit"):
        Pipeline.from_toml(SMALL.replace('use = "interpolation"', f'use = "interpolation"\nname = "{bad}"', 1))


def test_relative_paths_in_a_pipeline_file_are_relative_to_the_file(tmp_path, monkeypatch):
    from mergescope import load_pipeline

    folder = tmp_path / "project"
    (folder / "images").mkdir(parents=True)
    (folder / "ckpt").mkdir()
    torch_save_target = folder / "ckpt" / "a.pt"
    import torch

    from mergescope_plugins.zoo import MLP

    torch.save(MLP(hidden=[4]).build((3, 8, 8), 2).state_dict(), torch_save_target)
    (folder / "study.toml").write_text(
        """
[data]
use = "concat"
parts = [{ use = "imagefolder", root = "images", image_size = 8, resize = 8 }]

[[models]]
name = "a"
use = "mlp"
hidden = [4]
checkpoint = "ckpt/a.pt"

[[tasks]]
name = "t"
use = "imagefolder"
root = "images"
image_size = 8
resize = 8
"""
    )
    monkeypatch.chdir(tmp_path)  # run from elsewhere: the paths still point next to the file
    pipeline = load_pipeline(folder / "study.toml")
    assert pipeline.data.parts[0]["root"] == str(folder / "images")
    assert pipeline.tasks[0].data.root == str(folder / "images")
    assert pipeline.models[0].checkpoint == folder / "ckpt" / "a.pt"
    # Absolute paths stay as they are, and a pipeline built from text keeps what it was given.
    text = (folder / "study.toml").read_text().replace('root = "images", image_size', f'root = "{folder / "images"}", image_size')
    text = text.replace('checkpoint = "ckpt/a.pt"', f'checkpoint = "{torch_save_target}"')
    assert Pipeline.from_toml(text).data.parts[0]["root"] == str(folder / "images")
    assert Pipeline.from_toml(text).tasks[0].data.root == "images"


def test_checkpoint_paths_among_embedder_options_are_relative_to_the_file(tmp_path):
    from mergescope import load_pipeline

    given = {
        "local": '{ pretrained = "weights/clip.bin", cache_dir = "hf" }',
        "tagged": '{ pretrained = "openai" }',
        "absolute": '{ pretrained = "/models/clip.bin" }',
    }
    steps = "".join(
        f'[[steps]]\nuse = "clip-delta"\nname = "{name}"\nmodels = ["a", "b"]\nallow_unaligned = true\n'
        f'embedder = "open-clip"\nembedder_options = {options}\n\n'
        for name, options in given.items()
    )
    (tmp_path / "study.toml").write_text(SMALL.split("[[steps]]")[0] + steps)
    options = {s.name: s.component.embedder_options for s in load_pipeline(tmp_path / "study.toml").steps}
    assert options["local"] == {"pretrained": str(tmp_path / "weights" / "clip.bin"), "cache_dir": str(tmp_path / "hf")}
    assert options["tagged"] == {"pretrained": "openai"}  # a tag is not a path
    assert options["absolute"] == {"pretrained": "/models/clip.bin"}
