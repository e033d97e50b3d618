"""Tests of the crosscoder's AuxK loss for dead latents (Gao et al. 2024, appendix A.2)."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch
import xarray as xr

from mergescope.components import Context
from mergescope.errors import ConfigError
from mergescope.keys import _key_options, cache_key
from mergescope.options import structure_options
from mergescope_plugins import crosscoder as cc
from mergescope_plugins.crosscoder import Crosscoder
from tests.plugins.test_crosscoder import FAST, Interrupting, atom_kinds, small, synthesise

# One torch thread (tests/plugins/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ the loss itself

# Two sources: units 0 and 1 belong to the first (2 units), unit 2 to the second.
MEMBERSHIP = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
DECODER = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, -1.0, 2.0]])
RESIDUAL = torch.tensor([[2.0, -1.0, 4.0], [0.0, 1.0, 2.0]])
DEAD = torch.tensor([True, False, True])


def toy_f() -> torch.Tensor:
    return torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 1.0]], requires_grad=True)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        # k = 1: each row keeps dead latent 2 (3 and 1; live latent 1 may not take part),
        # estimate [[1.5, -3, 6], [0.5, -1, 2]]. Squared errors per unit: 0.5, 8, 4; the
        # residual's spread per unit (around the batch mean): 2, 2, 2.
        # First source: 2 units * (0.5 + 8) / (2 + 2) = 4.25; second: 1 * 4 / 2 = 2.
        (1, 6.25),
        # k = 2: row 0 adds latent 0 (1), row 1 adds latent 0 (0.5): estimate
        # [[2.5, -3, 6], [1, -1, 2]]; errors 0.25 + 1 = 1.25, 8, 4.
        # 2 * 9.25 / 4 + 4 / 2 = 6.625.
        (2, 6.625),
    ],
)
def test_auxk_loss_by_hand(k, expected):
    f = toy_f()
    loss = cc._auxk_loss(f, RESIDUAL, DECODER, DEAD, k, MEMBERSHIP)
    assert float(loss.detach()) == pytest.approx(expected)
    loss.backward()
    assert torch.all(f.grad[:, 1] == 0)  # a live latent gets no gradient from it
    assert torch.all(f.grad[:, 2] != 0)  # the chosen dead latent does


def test_auxk_loss_has_no_gradient_without_dead_latents():
    f = toy_f()
    decoder = DECODER.clone().requires_grad_(True)
    loss = cc._auxk_loss(f, RESIDUAL, decoder, torch.zeros(3, dtype=torch.bool), 2, MEMBERSHIP)
    # Nothing is chosen, so the estimate is 0: ||e||^2 per unit 4, 2, 20 over the spreads
    # 2, 2, 2 gives 2 * (4 + 2) / 4 + 1 * 20 / 2 = 13.
    assert float(loss.detach()) == pytest.approx(13.0)
    loss.backward()
    assert torch.all(f.grad == 0) and torch.all(decoder.grad == 0)


def test_auxk_loss_skips_a_source_whose_residual_is_constant():
    residual = RESIDUAL.clone()
    residual[:, 2] = 5.0  # the second source's residual has no spread over the batch
    loss = cc._auxk_loss(toy_f(), residual, DECODER, DEAD, 1, MEMBERSHIP)
    assert float(loss.detach()) == pytest.approx(4.25)  # the first source alone, as in the k = 1 case
    assert torch.isfinite(loss)


def test_training_counts_the_rows_since_each_latent_fired():
    crosscoder = Crosscoder(dictionary_size=4, sparsity="batchtopk", k=1, aux_k=2)
    coder = cc._Coder([2, 2], 4, track_dead=True)
    cc._initialise(coder, "transpose", [2, 2], 0.1, np.zeros(4), seed=0)
    coder.since_fired.copy_(torch.tensor([0, 7, 100, 3]))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = coder.activations(x)
        kept, _ = cc._batchtopk(f, coder.decoder_norms().sum(dim=1), 1)
    fired = (kept > 0).any(dim=0)
    loss, _ = crosscoder._loss(coder, x, 0, 10, torch.device("cpu"), "fp32", dead_after=50)
    assert torch.isfinite(loss)
    before = torch.tensor([0, 7, 100, 3])
    np.testing.assert_array_equal(coder.since_fired.numpy(), torch.where(fired, 0, before + 5).numpy())


# ------------------------------------------------------------- dead latents revive


def _shrink_most_decoders(monkeypatch, fraction: float = 0.75, factor: float = 0.01) -> None:
    """A bad initialisation: most latents start with tiny decoder vectors.

    BatchTopK ranks ``f_i * sum_m ||d_i^m||``, so these latents never win a place, get
    no gradient from the reconstruction and stay dead for good.
    """
    initialise = cc._initialise

    def bad(coder, *args, **kwargs):
        initialise(coder, *args, **kwargs)
        latents = coder.decoder.shape[0]
        with torch.no_grad():
            coder.decoder[latents - int(fraction * latents) :] *= factor

    monkeypatch.setattr(cc, "_initialise", bad)


def test_auxk_revives_latents_left_dead_by_a_bad_initialisation(tmp_path, monkeypatch):
    _shrink_most_decoders(monkeypatch)
    # 20 planted atoms for 32 latents, 24 of which start (almost) without a decoder.
    kinds = atom_kinds(2, shared=8, exclusive=6, pairs=0)
    acts, _ = synthesise((24, 32), kinds, samples=2000, p=0.1, positive=False, seed=1)
    options = dict(sparsity="batchtopk", k=2, learning_rate=5e-3, dictionary_size=32, epochs=20)
    plain = Crosscoder(**options).fit(acts, Context(quiet=True, workdir=tmp_path / "plain"))
    auxk = Crosscoder(**options, aux_k=16).fit(acts, Context(quiet=True, workdir=tmp_path / "auxk"))
    dead_plain, dead_auxk = float(plain["dead"].mean()), float(auxk["dead"].mean())
    # Measured: 0.75 without AuxK (the 24 shrunk latents), 0.28 with it.
    assert dead_plain >= 0.7, dead_plain
    assert dead_auxk <= dead_plain - 0.3, (dead_plain, dead_auxk)
    assert (auxk["fvu"] < plain["fvu"]).all()  # the revived latents explain more of the data
    assert list(auxk["latent_class"].values).count("dead") == int(auxk["dead"].sum())
    assert abs(float(auxk["l0"]) - 2) < 0.5


def test_auxk_changes_nothing_while_no_latent_is_dead(tmp_path):
    # dead_after longer than the whole training: AuxK never has a dead latent to use.
    acts = small()
    options = dict(FAST, sparsity="batchtopk", k=3)
    plain = Crosscoder(**options).fit(acts, Context(quiet=True, workdir=tmp_path / "plain"))
    idle = Crosscoder(**options, aux_k=4, dead_after=10**6).fit(acts, Context(quiet=True, workdir=tmp_path / "idle"))
    np.testing.assert_allclose(idle["decoder"].values, plain["decoder"].values, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(idle["dead"].values, plain["dead"].values)


def test_resume_with_auxk_equals_uninterrupted(tmp_path):
    acts = small()
    crosscoder = Crosscoder(**FAST, sparsity="batchtopk", k=3, aux_k=4, dead_after=40)
    whole = crosscoder.fit(acts, Context(quiet=True, workdir=tmp_path / "whole"))
    interrupted = Interrupting(quiet=True, workdir=tmp_path / "resumed", after=2)
    with pytest.raises(KeyboardInterrupt):
        crosscoder.fit(acts, interrupted)
    resumed_context = Interrupting(quiet=True, workdir=tmp_path / "resumed")
    resumed = crosscoder.fit(acts, resumed_context)
    assert resumed_context.epochs_run == 2  # the rows since firing came back with the weights
    xr.testing.assert_identical(resumed, whole)


# ------------------------------------------------------------------------- options


def test_auxk_options_are_validated():
    for key, value in [("aux_k", -1), ("aux_coefficient", -0.5), ("dead_after", 0), ("aux_k", 1.5)]:
        with pytest.raises(ConfigError, match=key):
            structure_options(Crosscoder, {"sparsity": "batchtopk", key: value})
    with pytest.raises(ConfigError, match=r"key 'aux_k': aux_k = 4 asks for the AuxK loss, which only sparsity"):
        structure_options(Crosscoder, {"aux_k": 4})  # sparsity = "l1"
    with pytest.raises(ConfigError, match=r"key 'aux_k': aux_k = 40 dead latents per row is more than"):
        structure_options(Crosscoder, {"sparsity": "batchtopk", "aux_k": 40, "dictionary_size": 32})
    Crosscoder(aux_coefficient=0.5, dead_after=100)  # unused without aux_k: accepted
    assert Crosscoder().aux_k == 0 and Crosscoder().aux_coefficient == 1 / 32 and Crosscoder().dead_after is None


def test_auxk_options_join_the_keys_only_when_set():
    # Step cache keys of crosscoders without the new options stay what they were.
    plain = Crosscoder(sparsity="batchtopk")
    assert not {"aux_k", "aux_coefficient", "dead_after"} & set(_key_options(plain))
    assert cache_key(plain) != cache_key(attrs.evolve(plain, aux_k=2))
    assert cache_key(plain) != cache_key(attrs.evolve(plain, aux_coefficient=0.1))
    assert cache_key(plain) != cache_key(attrs.evolve(plain, dead_after=10))
    # The checkpoint key: the AuxK options count only with aux_k > 0.
    survey = cc._Survey("digest", np.ones(2), np.zeros(4))
    assert plain._key(survey) == attrs.evolve(plain, aux_coefficient=0.5, dead_after=7)._key(survey)
    with_auxk = attrs.evolve(plain, aux_k=2)
    assert with_auxk._key(survey) != plain._key(survey)
    assert with_auxk._key(survey) != attrs.evolve(with_auxk, aux_coefficient=0.5)._key(survey)
    assert with_auxk._key(survey) != attrs.evolve(with_auxk, dead_after=7)._key(survey)


def test_default_dead_after_is_one_epoch_at_most_ten_million_rows():
    crosscoder = Crosscoder(sparsity="batchtopk", aux_k=2)
    assert crosscoder._dead_rows(5000) == 5000
    assert crosscoder._dead_rows(10**9) == 10_000_000
    assert attrs.evolve(crosscoder, dead_after=64)._dead_rows(5000) == 64


def test_auxk_under_bf16_trains_close_to_fp32(tmp_path, monkeypatch):
    _shrink_most_decoders(monkeypatch)
    acts = small(samples=480)
    crosscoder = Crosscoder(**{**FAST, "epochs": 8}, sparsity="batchtopk", k=3, aux_k=4, dead_after=64)
    full = crosscoder.fit(acts, Context(quiet=True, workdir=tmp_path))
    half = crosscoder.fit(acts, Context(quiet=True, workdir=tmp_path, precision="bf16"))
    assert np.isfinite(half["loss_history"]).all() and not bool(half["diverged"])
    np.testing.assert_allclose(half["fvu"], full["fvu"], atol=0.05)
    assert abs(float(half["dead"].mean()) - float(full["dead"].mean())) <= 0.25


def test_divergence_with_auxk_keeps_the_initial_state(tmp_path):
    crosscoder = Crosscoder(**FAST, sparsity="batchtopk", k=3, aux_k=4, dead_after=32, learning_rate=1e20)
    with pytest.warns(RuntimeWarning, match=r"at epoch 1 .*after epoch 0"):
        result = crosscoder.fit(small(), Context(quiet=True, workdir=tmp_path))
    assert bool(result["diverged"]) and int(result["epochs_trained"]) == 0
    assert np.isfinite(result["encoder"].values).all()
