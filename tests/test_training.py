from __future__ import annotations

import copy
from pathlib import Path

import attrs
import pytest
import torch

from mergescope import training
from mergescope.components import Context
from mergescope.errors import CheckpointError, ConfigError
from mergescope.options import structure_options
from mergescope.training import Training, cache_dir, cache_key, train_classifier, trained_model
from mergescope_plugins.datasets import MNIST5000, Digits
from mergescope_plugins.zoo import MLP, SmallCNN

# A small, fast setting for tests that only need some training to happen.
SMALL_DATA = MNIST5000(split="train", per_class=20)
SMALL_MLP = MLP(hidden=[32])
SHORT = Training(epochs=2, batch_size=32)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MERGESCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fresh_model(seed: int = 0):
    torch.manual_seed(seed)
    return SMALL_MLP.build((1, 28, 28), 10)


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------ options


def test_training_options_structure_from_a_table():
    options = structure_options(Training, {"seed": 3, "epochs": 2, "lr": 1, "optimizer": "sgd"})
    assert options == Training(seed=3, epochs=2, lr=1.0, optimizer="sgd")
    assert isinstance(options.lr, float)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"epochs": -1}, "epochs"),
        ({"batch_size": -1}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_training_options_name_the_option(options, key):
    with pytest.raises(ValueError, match=f"'{key}' must be"):
        Training(**options)
    with pytest.raises(ConfigError, match=f"'{key}' must be"):
        structure_options(Training, options)


def test_unknown_optimizer_lists_the_accepted_ones():
    with pytest.raises(ValueError, match="'optimizer' must be one of 'adam', 'sgd', got 'rmsprop'"):
        Training(optimizer="rmsprop")


# ----------------------------------------------------------------------- training


def test_training_is_deterministic_for_a_seed():
    data = SMALL_DATA.load()
    start = fresh_model()
    a, b, c = copy.deepcopy(start), copy.deepcopy(start), copy.deepcopy(start)
    losses_a = train_classifier(a, data, SHORT)
    losses_b = train_classifier(b, data, SHORT)
    train_classifier(c, data, attrs.evolve(SHORT, seed=1))
    assert losses_a == losses_b
    assert states_equal(a, b)
    # Another seed shuffles the batches differently.
    assert not states_equal(a, c)
    assert not states_equal(a, start)


def test_training_does_not_disturb_the_global_random_stream():
    data = SMALL_DATA.load()
    model = fresh_model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_classifier(model, data, Training(epochs=1))
    assert torch.equal(torch.rand(3), expected)


def test_sgd_lowers_the_loss_and_leaves_eval_mode():
    data = SMALL_DATA.load()
    model = fresh_model()
    losses = train_classifier(model, data, Training(epochs=4, batch_size=32, lr=0.01, optimizer="sgd"))
    assert len(losses) == 4
    assert losses[-1] < losses[0]
    assert not model.training


def test_progress_is_reported_through_the_callable():
    calls = []

    def progress(iterable, desc, total=None):
        calls.append((desc, total))
        return iter(iterable)

    train_classifier(fresh_model(), SMALL_DATA.load(), SHORT, progress=progress)
    assert calls == [("training on mnist5000/train", 2)]

    @attrs.define
    class Recording(Context):
        def progress(self, iterable, desc, total=None):
            calls.append((desc, total))
            return iter(iterable)

    train_classifier(fresh_model(), SMALL_DATA.load(), SHORT, progress=Recording(quiet=True).progress)
    assert calls[-1] == ("training on mnist5000/train", 2)


def test_zero_epochs_give_the_common_starting_point_of_fine_tunes(cache):
    start = trained_model(SMALL_MLP, SMALL_DATA, attrs.evolve(SHORT, epochs=0))
    assert states_equal(start, fresh_model(0))
    assert not start.training
    # Nothing trained, nothing cached: building from the seed is the whole model.
    assert not (cache / "models").exists()
    # A fine-tune with the same seed starts from exactly these weights.
    tuned = trained_model(SMALL_MLP, SMALL_DATA, SHORT)
    replayed = copy.deepcopy(start)
    train_classifier(replayed, SMALL_DATA.load(), SHORT)
    assert states_equal(tuned, replayed)
    assert train_classifier(copy.deepcopy(start), SMALL_DATA.load(), attrs.evolve(SHORT, epochs=0)) == []


def test_reset_batchnorm_recomputes_the_statistics_after_training():
    from mergescope.batchnorm import reset_batchnorm

    data = SMALL_DATA.load()
    torch.manual_seed(0)
    start = SmallCNN(widths=[4, 8], batchnorm=True).build((1, 28, 28), 10)
    plain, reset = copy.deepcopy(start), copy.deepcopy(start)
    one_epoch = attrs.evolve(SHORT, epochs=1)
    train_classifier(plain, data, one_epoch)
    train_classifier(reset, data, attrs.evolve(one_epoch, reset_batchnorm=True))
    expected = reset_batchnorm(copy.deepcopy(plain), data, batch_size=one_epoch.batch_size)
    assert states_equal(reset, expected)
    assert not torch.equal(reset.bn1.running_mean, plain.bn1.running_mean)
    assert torch.equal(reset.conv1.weight, plain.conv1.weight)  # the weights are those trained
    assert not reset.training


def test_trained_mlp_reaches_85_percent_on_mnist5000(tmp_path):
    model = trained_model(MLP(), MNIST5000(split="train"), Training(epochs=2), cache=tmp_path)
    accuracy = Context(data=MNIST5000(split="test").load()).evaluate(model).accuracy
    assert accuracy > 0.85
    assert not model.training


# -------------------------------------------------------------------------- cache


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGESCOPE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MERGESCOPE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "mergescope"


def test_cache_key_changes_with_every_option():
    base = cache_key(SMALL_MLP, SMALL_DATA, SHORT)
    assert base == cache_key(MLP(hidden=[32]), MNIST5000(split="train", per_class=20), Training(epochs=2, batch_size=32))
    assert len(base) == 64 and int(base, 16) >= 0
    variants = [
        cache_key(MLP(hidden=[33]), SMALL_DATA, SHORT),
        cache_key(SMALL_MLP, attrs.evolve(SMALL_DATA, per_class=21), SHORT),
        cache_key(SMALL_MLP, attrs.evolve(SMALL_DATA, test_fraction=0.25), SHORT),
        cache_key(SMALL_MLP, attrs.evolve(SMALL_DATA, split="all"), SHORT),
        # Same options, another component: the name is part of the key.
        cache_key(SMALL_MLP, Digits(split="train", per_class=20), SHORT),
        cache_key(SmallCNN(), SMALL_DATA, SHORT),
        *(
            cache_key(SMALL_MLP, SMALL_DATA, attrs.evolve(SHORT, **change))
            for change in (
                {"seed": 1},
                {"epochs": 3},
                {"batch_size": 64},
                {"lr": 2e-3},
                {"optimizer": "sgd"},
                {"weight_decay": 1e-4},
                {"reset_batchnorm": True},
            )
        ),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_cache_keys_of_existing_options_are_pinned():
    # Cached models are found by these keys: options added later must not move them.
    pinned = "24b7793d6a6ee839b68625375195aa9913d3cb2650a15f3e8601bab7e083d69d"
    assert cache_key(SMALL_MLP, SMALL_DATA, SHORT) == pinned
    assert cache_key(SMALL_MLP, SMALL_DATA, attrs.evolve(SHORT, reset_batchnorm=False)) == pinned


def test_options_flagged_new_are_left_out_of_keys_at_their_default():
    @attrs.define
    class Old:
        name = "old-component"
        size: int = 1

    @attrs.define
    class New:
        name = "old-component"
        size: int = 1
        extra: list[int] = attrs.field(factory=list, metadata={training.OMIT_DEFAULT_FROM_KEY: True})
        plain: int = attrs.field(default=0)

    assert cache_key(New(plain=0)) != cache_key(Old())  # an unflagged new option is always in the key
    assert cache_key(New(extra=[])) == cache_key(New())
    assert cache_key(New(extra=[1])) != cache_key(New())


def test_cache_key_names_classes_and_refuses_opaque_objects():
    assert cache_key(MLP) == cache_key(MLP) != cache_key(SmallCNN)
    # A class is not one of its instances.
    assert cache_key(MLP) != cache_key(MLP())
    with pytest.raises(TypeError, match="cannot build a cache key"):
        cache_key(object())


def test_second_call_loads_from_the_cache(cache, monkeypatch):
    first = trained_model(SMALL_MLP, SMALL_DATA, SHORT)
    saved = list((cache / "models").iterdir())
    assert [p.name for p in saved] == [f"mlp-{cache_key(SMALL_MLP, SMALL_DATA, SHORT)}.pt"]

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model should have been used")

    monkeypatch.setattr(training, "train_classifier", no_training)
    second = trained_model(SMALL_MLP, SMALL_DATA, SHORT)
    assert states_equal(first, second)
    assert not second.training

    # A changed option is a miss, which would train.
    with pytest.raises(AssertionError, match="cached model"):
        trained_model(SMALL_MLP, SMALL_DATA, attrs.evolve(SHORT, seed=1))


def test_trained_model_is_reproducible_without_the_cache(tmp_path):
    a = trained_model(SMALL_MLP, SMALL_DATA, SHORT, cache=tmp_path / "a")
    b = trained_model(SMALL_MLP, SMALL_DATA, SHORT, cache=tmp_path / "b")
    c = trained_model(SMALL_MLP, SMALL_DATA, attrs.evolve(SHORT, seed=5), cache=tmp_path / "c")
    assert states_equal(a, b)
    assert not states_equal(a, c)


def test_a_cached_file_that_does_not_fit_is_reported(cache):
    key = cache_key(SMALL_MLP, SMALL_DATA, SHORT)
    path = cache / "models" / f"mlp-{key}.pt"
    training.checkpoints.save_state_dict(MLP(hidden=[16]).build((1, 28, 28), 10), path)
    with pytest.raises(CheckpointError, match=r"fc1.weight: checkpoint \(16, 784\) vs model \(32, 784\)"):
        trained_model(SMALL_MLP, SMALL_DATA, SHORT)
