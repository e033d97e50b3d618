"""Pairwise relative decoder norms of the crosscoder, and the training options its result records."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import xarray as xr

from mergescope.components import Context
from mergescope_plugins import crosscoder as cc
from mergescope_plugins.crosscoder import Crosscoder, CrosscoderPlots, classify

# One torch thread (tests/plugins/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Decoder norms of 4 latents in 3 models (a, b, c), set by hand.
NORMS = np.array(
    [
        [1.0, 1.0, 2.0],  # shared
        [3.0, 1.0, 0.0],  # a and b only
        [0.0, 0.0, 5.0],  # c only
        [0.0, 0.0, 0.0],  # no decoder at all
    ]
)
PAIRS = [(0, 1), (0, 2), (1, 2)]  # a~b, a~c, b~c
EXPECTED = np.array(
    [
        [1 / 2, 2 / 3, 2 / 3],
        [1 / 4, 0.0, 0.0],
        [np.nan, 1.0, 1.0],
        [np.nan, np.nan, np.nan],
    ]
)


def test_pair_relative_norm_of_hand_set_norms():
    got = cc._pair_relative_norm(NORMS, PAIRS)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(EXPECTED))
    np.testing.assert_allclose(got, EXPECTED, rtol=0, atol=1e-15)
    # The pair's second model's share, so the two orders of a pair add up to 1.
    back = cc._pair_relative_norm(NORMS, [(1, 0)])
    np.testing.assert_allclose(back[:2, 0], 1 - EXPECTED[:2, 0])


def test_two_models_pair_relative_norm_is_the_second_models_relative_norm():
    norms = np.array([[1.0, 3.0], [2.0, 0.0]])
    got = cc._pair_relative_norm(norms, [(0, 1)])
    np.testing.assert_allclose(got[:, 0], [0.75, 0.0])


def small(units: tuple[int, ...], samples: int = 120, seed: int = 0) -> dict[str, xr.DataArray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, u in zip("abc", units):
        values = np.maximum(rng.normal(size=(samples, u)), 0).astype(np.float32)
        out[name] = xr.DataArray(
            values,
            dims=("sample", "unit"),
            coords={"sample": np.arange(samples), "unit": np.arange(u), "layer": "block4"},
        )
    return out


FAST = dict(dictionary_size=8, epochs=2, batch_size=32, chunk_size=64)


def test_fit_result_holds_pair_relative_norms_and_its_training_options(tmp_path):
    result = Crosscoder(**FAST, l1=0.5, seed=3).fit(small((5, 6, 7)), Context(quiet=True, workdir=tmp_path))
    assert result["pair_relative_norm"].dims == ("latent", "pair")
    assert list(result["pair"].values) == ["a~b", "a~c", "b~c"]
    norms = result["decoder_norm"].values
    for name, (a, b) in zip(result["pair"].values, PAIRS):
        expected = norms[:, b] / (norms[:, a] + norms[:, b])
        np.testing.assert_allclose(result["pair_relative_norm"].sel(pair=name), expected, rtol=1e-12)
    assert result["sparsity"].item() == "l1" and result["l1"].item() == 0.5 and result["seed"].item() == 3
    assert "k" not in result.coords

    topk = Crosscoder(**FAST, sparsity="batchtopk", k=2).fit(small((5, 6)), Context(quiet=True, workdir=tmp_path))
    assert topk["sparsity"].item() == "batchtopk" and topk["k"].item() == 2 and topk["seed"].item() == 0
    assert "l1" not in topk.coords
    np.testing.assert_allclose(topk["pair_relative_norm"].sel(pair="a~b"), topk["relative_norm"].sel(model="b"))


def hand_result(models: list[str], norms: np.ndarray, dead: np.ndarray) -> xr.Dataset:
    """A crosscoder result reduced to what the plots read, from hand-set decoder norms."""
    pairs = list(itertools.combinations(range(len(models)), 2))
    total = norms.sum(axis=1, keepdims=True)
    relative = np.divide(norms, total, out=np.full_like(norms, np.nan), where=total > 0)
    classes = np.where(dead, "dead", classify(relative, models, 0.05))
    return xr.Dataset(
        {
            "decoder_norm": (("latent", "model"), norms),
            "relative_norm": (("latent", "model"), relative),
            "pair_relative_norm": (("latent", "pair"), cc._pair_relative_norm(norms, pairs)),
            "latent_class": ("latent", classes),
            "dead": ("latent", dead),
        },
        coords={"model": models, "pair": [f"{models[a]}~{models[b]}" for a, b in pairs]},
    )


def test_plots_draw_one_histogram_per_pair_without_dead_latents(tmp_path, monkeypatch):
    three = hand_result(["a", "b", "c"], NORMS, np.array([False, False, False, True]))
    two = hand_result(["a", "b"], NORMS[:, :2], np.zeros(4, bool))
    tree = xr.DataTree.from_dict({"diff3/block4": three, "diff2/block4": two})
    drawn: dict[str, list[float]] = {}
    plots = CrosscoderPlots(dpi=30, bins=10)
    original = CrosscoderPlots._pair_relative

    def spy(self, plt, ds, label):
        fig = original(self, plt, ds, label)
        if fig is not None:  # what every histogram received
            drawn[label] = [sum(p.get_height() for p in ax.patches) for ax in fig.axes]
        return fig

    monkeypatch.setattr(CrosscoderPlots, "_pair_relative", spy)
    files = {f.name for f in plots.render(tree, tmp_path / "figures")}
    assert "diff3-block4-pair-relative-norm.png" in files
    assert "diff2-block4-pair-relative-norm.png" not in files  # two models: relative-norm is that histogram
    # Three pairs, three live latents; a latent whose two norms are zero has no share in that pair.
    counts = [int(h) for h in drawn["diff3-block4"][:3]]
    assert counts == [2, 3, 3]


def test_plots_compute_pair_norms_of_older_results(tmp_path):
    three = hand_result(["a", "b", "c"], NORMS, np.zeros(4, bool)).drop_vars("pair_relative_norm")
    files = CrosscoderPlots(dpi=30).render(xr.DataTree.from_dict({"old/block4": three}), tmp_path / "f")
    assert "old-block4-pair-relative-norm.png" in {f.name for f in files}
