"""Tests of ablate_latents: removing a class of crosscoder latents from one model's activations."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from mergescope.components import Context
from mergescope.errors import ContractError
from mergescope_plugins.crosscoder import Crosscoder, ablate_latents
from tests.plugins.test_crosscoder import FAST, activation, atom_kinds, small, synthesise, true_class
from tests.plugins.test_crosscoder_layers import layered

# One torch thread (tests/plugins/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


NAMES = ["a", "b", "c"]
UNITS = (10, 12, 14)


def planted(seed: int = 0, samples: int = 400) -> tuple[dict[str, xr.DataArray], xr.Dataset, np.ndarray, np.ndarray]:
    """Activations that are exact sums of known decoder directions, and a crosscoder that is the ground truth.

    Every latent is one true atom (its decoder vectors: the atom's directions in the
    models that hold it, zero elsewhere); the encoder is the decoder's pseudo-inverse,
    so ``f(x)`` gives back the planted non-negative codes. Returns the activations, the
    crosscoder as a result Dataset, the decoder ``(latent, input)`` and the codes.
    """
    rng = np.random.default_rng(seed)
    kinds = atom_kinds(3, shared=3, exclusive=2, pairs=2)
    width = sum(UNITS)
    offsets = np.cumsum([0, *UNITS])
    decoder = np.zeros((len(kinds), width))
    for i, models in enumerate(kinds):
        for m in models:
            decoder[i, offsets[m] : offsets[m + 1]] = rng.normal(size=UNITS[m]) / np.sqrt(UNITS[m])
    codes = (rng.random((samples, len(kinds))) < 0.3) * rng.uniform(0.5, 1.5, size=(samples, len(kinds)))
    x = codes @ decoder
    acts = {m: activation(x[:, offsets[i] : offsets[i + 1]], m) for i, m in enumerate(NAMES)}
    result = xr.Dataset(
        {
            "encoder": (("input", "latent"), np.linalg.pinv(decoder).astype(np.float32)),
            "encoder_bias": ("latent", np.zeros(len(kinds), np.float32)),
            "decoder": (("latent", "input"), decoder.astype(np.float32)),
            "decoder_bias": ("input", np.zeros(width, np.float32)),
            "scale": ("model", np.ones(3)),
            "units": ("model", np.asarray(UNITS)),
            "threshold": ((), np.nan),
            "latent_class": ("latent", [true_class(k, NAMES) for k in kinds]),
        },
        coords={"model": NAMES, "input_model": ("input", np.repeat(NAMES, UNITS))},
    )
    return acts, result, decoder, codes


def coefficients(x: np.ndarray, atoms: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of every row of ``x`` on the ``(atoms, units)`` directions."""
    return np.linalg.lstsq(atoms.T, x.T, rcond=None)[0].T


def test_removing_a_class_changes_only_its_own_directions():
    acts, result, decoder, codes = planted()
    classes = result["latent_class"].values.astype(str)
    a = slice(0, UNITS[0])
    held = np.flatnonzero(np.abs(decoder[:, a]).sum(axis=1) > 0)  # the atoms model a holds
    target = np.flatnonzero(classes == "shared:a+b")
    others = np.setdiff1d(held, target)

    edited = ablate_latents(result, acts, "a", "shared:a+b")
    assert edited.dims == acts["a"].dims and (edited["sample"] == acts["a"]["sample"]).all()
    before = coefficients(acts["a"].values, decoder[held][:, a])
    after = coefficients(edited.values, decoder[held][:, a])
    column = {atom: j for j, atom in enumerate(held)}
    # The class is gone from model a, every other atom is untouched.
    np.testing.assert_allclose(after[:, [column[i] for i in target]], 0, atol=1e-4)
    np.testing.assert_allclose(after[:, [column[i] for i in others]], codes[:, others], atol=1e-4)
    np.testing.assert_allclose(before, codes[:, held], atol=1e-4)
    np.testing.assert_allclose(edited.values, acts["a"].values - codes[:, target] @ decoder[target][:, a], atol=1e-4)

    # The same number of random latents model a holds hits the directions of other atoms.
    rng = np.random.default_rng(0)
    random = rng.choice(others, size=len(target), replace=False)
    shuffled = coefficients(ablate_latents(result, acts, "a", random).values, decoder[held][:, a])
    kept = [column[i] for i in others if i not in random]
    hit = [column[i] for i in random]
    np.testing.assert_allclose(shuffled[:, kept], codes[:, [held[j] for j in kept]], atol=1e-4)
    assert np.abs(shuffled[:, hit] - before[:, hit]).mean() > 0.1  # other directions changed
    np.testing.assert_allclose(shuffled[:, [column[i] for i in target]], codes[:, target], atol=1e-4)

    # Model c does not hold shared:a+b: nothing of it changes.
    np.testing.assert_allclose(ablate_latents(result, acts, "c", "shared:a+b").values, acts["c"].values, atol=1e-5)


def test_latents_by_index_mask_or_class_agree_and_nothing_removed_is_the_input():
    acts, result, _, _ = planted(samples=50)
    classes = result["latent_class"].values.astype(str)
    by_class = ablate_latents(result, acts, "b", "exclusive:b")
    by_index = ablate_latents(result, acts, "b", list(np.flatnonzero(classes == "exclusive:b")))
    by_mask = ablate_latents(result, acts, "b", classes == "exclusive:b")
    xr.testing.assert_identical(by_class, by_index)
    xr.testing.assert_identical(by_class, by_mask)
    nothing = ablate_latents(result, acts, "b", [])
    np.testing.assert_array_equal(nothing.values, acts["b"].values)
    assert nothing.name == acts["b"].name and nothing.attrs == acts["b"].attrs


def test_a_fitted_crosscoder_removes_the_planted_directions_of_a_class(tmp_path):
    # The recovery setup of the crosscoder tests: 3 models, 6 shared atoms, 4 exclusive to
    # each, 3 per pair; the fitted latents stand for the atoms.
    kinds = atom_kinds(3, shared=6, exclusive=4, pairs=3)
    acts, atoms = synthesise((24, 32, 40), kinds, samples=2000, p=0.08, positive=True, seed=0)
    result = Crosscoder().fit(acts, Context(quiet=True, workdir=tmp_path))
    names = ["a", "b", "c"]
    truth = np.array([true_class(k, names) for k in kinds])
    held = np.flatnonzero([0 in k for k in kinds])  # atoms of model a
    basis = np.stack([atoms[i][0] for i in held])
    target = truth[held] == "shared:a+b"
    classes = result["latent_class"].values.astype(str)
    chosen = np.flatnonzero(classes == "shared:a+b")
    assert len(chosen) >= 2

    before = coefficients(acts["a"].values, basis)

    def remaining(latents: np.ndarray) -> np.ndarray:
        """Variance of every atom's coefficient in model a left after the ablation, as a fraction.

        The variance over samples, not the mean: the decoder bias holds part of the mean.
        """
        return coefficients(ablate_latents(result, acts, "a", latents).values, basis).var(axis=0) / before.var(axis=0)

    own = remaining(chosen)
    # Random live latents, as many, of the other classes model a uses.
    others = np.flatnonzero(~result["dead"].values & np.isin(classes, ["shared", "exclusive:a", "shared:a+c"]))
    random = remaining(np.random.default_rng(0).choice(others, size=len(chosen), replace=False))
    # Measured: the class's atoms keep 0.10-0.18 of their variance, the others 0.998-1.000;
    # random latents leave the class's atoms whole and take 16 % from the others on average.
    assert (own[target] < 0.3).all(), own
    np.testing.assert_allclose(own[~target], 1.0, atol=0.01)
    np.testing.assert_allclose(random[target], 1.0, atol=0.01)
    assert np.abs(1 - random[~target]).mean() > 5 * np.abs(1 - own[~target]).mean(), random


def test_removing_every_latent_leaves_the_crosscoder_error(tmp_path):
    acts = small()
    result = Crosscoder(**FAST, sparsity="batchtopk", k=3).fit(acts, Context(quiet=True, workdir=tmp_path))
    for m in "ab":
        s = float(result["scale"].sel(model=m))
        edited = ablate_latents(result, acts, m, np.arange(result.sizes["latent"]))
        bias = result["decoder_bias"].values[result["input_model"].values == m]
        residual = s * edited.values - bias  # s x - x' in the crosscoder's units
        x = s * acts[m].values.astype(np.float64)
        fvu = (residual**2).sum() / ((x - x.mean(axis=0)) ** 2).sum()
        assert fvu == pytest.approx(float(result["fvu"].sel(model=m)), rel=1e-4)


def test_maps_in_positions_and_pooled_modes(tmp_path):
    rng = np.random.default_rng(3)
    maps = {m: activation(np.maximum(rng.normal(size=(30, u, 3, 2)), 0), m) for m, u in (("a", 5), ("b", 7))}
    every = np.arange(FAST["dictionary_size"])
    positions = Crosscoder(**FAST, samples="positions").fit(maps, Context(quiet=True, workdir=tmp_path))
    edited = ablate_latents(positions, maps, "b", every, samples="positions")
    assert edited.dims == maps["b"].dims and edited.shape == maps["b"].shape
    # Position by position, as rows (sample, y, x) of the crosscoder.
    flat = {m: activation(a.values.transpose(0, 2, 3, 1).reshape(-1, a.sizes["unit"]), m) for m, a in maps.items()}
    rows = ablate_latents(positions, flat, "b", every)
    np.testing.assert_allclose(edited.values.transpose(0, 2, 3, 1).reshape(-1, 7), rows.values, atol=1e-5)

    pooled = Crosscoder(**FAST).fit(maps, Context(quiet=True, workdir=tmp_path))
    edited = ablate_latents(pooled, maps, "b", every)
    means = {m: a.mean(("y", "x")).astype(np.float32) for m, a in maps.items()}
    expected = ablate_latents(pooled, means, "b", every)
    np.testing.assert_allclose(edited.mean(("y", "x")).values, expected.values, atol=1e-5)
    # The same vector leaves every position.
    change = (maps["b"] - edited).values
    np.testing.assert_allclose(change, np.broadcast_to(change[:, :, :1, :1], change.shape), atol=1e-5)


def test_several_layers_come_back_as_given(tmp_path):
    acts, _, _ = layered(samples=240, per_kind=1)
    result = Crosscoder(**FAST).fit(acts, Context(quiet=True, workdir=tmp_path))
    edited = ablate_latents(result, acts, "a", np.arange(FAST["dictionary_size"]))
    assert list(edited) == list(acts["a"]) == ["l3", "l4"]
    bias = result["decoder_bias"]
    for layer, source in (("l3", "a/l3"), ("l4", "a/l4")):
        s = float(result["scale"].sel(source=source))
        b = bias.values[(result["input_model"].values == "a") & (result["input_layer"].values == layer)]
        x = s * acts["a"][layer].values.astype(np.float64)
        fvu = ((s * edited[layer].values - b) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum()
        assert fvu == pytest.approx(float(result["source_fvu"].sel(source=source)), rel=1e-4)
    untouched = ablate_latents(result, acts, "b", [])
    np.testing.assert_array_equal(untouched["l4"].values, acts["b"]["l4"].values)


def test_errors_name_what_does_not_fit():
    acts, result, _, _ = planted(samples=20)
    with pytest.raises(ContractError, match=r"model 'd' is not one of the crosscoder's models"):
        ablate_latents(result, acts, "d", [0])
    with pytest.raises(ContractError, match=r"lack \['c'\] \(the encoder reads every model"):
        ablate_latents(result, {"a": acts["a"], "b": acts["b"]}, "a", [0])
    with pytest.raises(ContractError, match=r"no latent has the class 'shared:a\+c\+d'"):
        ablate_latents(result, acts, "a", "shared:a+c+d")
    with pytest.raises(ContractError, match=r"latent 99 is out of range; the crosscoder has 15 latents"):
        ablate_latents(result, acts, "a", [1, 99])
    with pytest.raises(ContractError, match=r"the crosscoder read \(a: 10, b: 12, c: 14\) units"):
        ablate_latents(result, dict(acts, b=acts["b"].isel(unit=slice(0, 11))), "a", [0])
    with pytest.raises(ContractError, match=r"needs 15 values"):
        ablate_latents(result, acts, "a", np.ones(3, dtype=bool))


def test_an_edit_is_written_back_in_the_layout_the_module_returns():
    # A linear layer on (N, H, W, C) maps is recorded channels-first; an unchanged edit,
    # written back, must leave the logits as they were.
    import torch
    from torch import nn

    from mergescope.activations import resolve_layers
    from mergescope_plugins.crosscoder import _capture, _forward_edited

    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc, self.head = nn.Conv2d(1, 4, 1), nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.relu(self.fc(self.conv(x).permute(0, 2, 3, 1))).mean(dim=(1, 2)))

    torch.manual_seed(0)
    model, images = ChannelsLast().eval(), torch.randn(2, 1, 3, 4)
    with torch.no_grad():
        (captured,), (logits,) = _capture({"m": model}, "fc", images)
        assert captured.shape == (2, 5, 3, 4)
        place = resolve_layers(model, ["fc"], "m")["fc"]
        torch.testing.assert_close(_forward_edited(model, place, images, captured), logits)
        zeroed = _forward_edited(model, place, images, torch.zeros_like(captured))
        torch.testing.assert_close(zeroed, model.head(torch.zeros(2, 5)).expand_as(zeroed))
