"""Weight matching and activation matching recover a hidden permutation and remove the barrier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergescope import Context
from mergescope.groups import align_to_reference, channel_groups, example_input, perm_from_matrix, permute
from mergescope.testing import example_dataset
from mergescope_plugins.activation_matching import ActivationMatching, match_correlations
from mergescope_plugins.interpolation import Interpolation
from mergescope_plugins.weight_matching import WeightMatching
from mergescope_plugins.zoo import MLP, SmallCNN


@pytest.fixture(scope="module")
def data():
    return example_dataset(n=64, shape=(1, 8, 8))


def scrambled(model, data, seed, noise=0.0):
    """The same function with every group's units shuffled (and a little weight noise)."""
    groups = channel_groups(model, example_input(data))
    rng = np.random.default_rng(seed)
    perms = {g.name: rng.permutation(g.size) for g in groups}
    other = permute(model, perms, groups)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(noise * torch.randn_like(p))
    return other, perms, groups


@pytest.mark.parametrize("aligner", [WeightMatching(), ActivationMatching()])
@pytest.mark.parametrize("arch", [MLP(hidden=[32, 16]), SmallCNN(widths=[8, 16], batchnorm=True)])
def test_a_hidden_permutation_is_recovered(aligner, arch, data):
    torch.manual_seed(0)
    model = arch.build((1, 8, 8), 3).eval()
    other, perms, groups = scrambled(model, data, seed=1, noise=1e-4)
    alignment = aligner.align({"ref": model, "other": other}, "ref", Context(data=data, quiet=True))
    for g in groups:
        found = perm_from_matrix(alignment.transforms["other"][g.name])
        # other's position i holds ref's unit perms[i]; matching must undo that
        np.testing.assert_array_equal(perms[g.name][found], np.arange(g.size))
    aligned = align_to_reference({"ref": model, "other": other}, alignment, groups)["other"]
    for (k, v), w in zip(model.state_dict().items(), aligned.state_dict().values()):
        if v.is_floating_point():
            assert torch.allclose(v, w, atol=1e-3), k


def test_aligned_interpolation_has_no_barrier_on_a_permuted_copy(data):
    torch.manual_seed(0)
    model = MLP(hidden=[32]).build((1, 8, 8), 3).eval()
    other, _, _ = scrambled(model, data, seed=2)
    context = Context(data=data, quiet=True)
    naive = Interpolation(alphas=[0.0, 0.5, 1.0]).merge({"ref": model, "other": other}, context)
    alignment = WeightMatching().align({"ref": model, "other": other}, "ref", context)
    aligned = Interpolation(alphas=[0.0, 0.5, 1.0]).merge({"ref": model, "other": other}, context, alignment)
    assert float(aligned.results["loss_barrier"]) == pytest.approx(0.0, abs=1e-5)
    x = data.images[:16]
    with torch.no_grad():  # the aligned midpoint is the model itself; the naive one is not
        assert torch.allclose(aligned.model(x), model(x), atol=1e-5)
        assert not torch.allclose(naive.model(x), model(x), atol=1e-2)


def test_match_correlations_and_dead_units():
    corr = np.array([[0.1, 0.9, 0.0], [0.8, 0.2, 0.1], [np.nan, np.nan, np.nan]])
    perm, mean = match_correlations(corr)
    assert perm.tolist() == [1, 0, 2] and mean == pytest.approx((0.8 + 0.9 + 0.0) / 3)
    with pytest.raises(ValueError, match="square"):
        match_correlations(np.zeros((2, 3)))


def test_models_of_another_width_are_refused(data):
    torch.manual_seed(0)
    a = MLP(hidden=[32]).build((1, 8, 8), 3)
    b = MLP(hidden=[16]).build((1, 8, 8), 3)
    context = Context(data=data, quiet=True)
    with pytest.raises(ValueError, match=r"parameter 'fc1.weight' has shape \(32, 64\) in model 'a' but \(16, 64\)"):
        WeightMatching().align({"a": a, "b": b}, "a", context)
    with pytest.raises(ValueError, match="16 units but the reference 'a' has 32"):
        ActivationMatching().align({"a": a, "b": b}, "a", context)


def test_merge_many_recovers_hidden_permutations_of_three_copies(data):
    torch.manual_seed(0)
    model = SmallCNN(widths=[8, 16], batchnorm=True).build((1, 8, 8), 3).eval()
    b, perms_b, groups = scrambled(model, data, seed=3, noise=1e-4)
    c, perms_c, _ = scrambled(model, data, seed=4, noise=1e-4)
    aligner = WeightMatching(strategy="merge-many", seed=1)
    alignment = aligner.align({"a": model, "b": b, "c": c}, "a", Context(data=data, quiet=True))
    assert set(alignment.transforms) == {"b", "c"}
    assert int(alignment.diagnostics["rounds"]) >= 1
    assert "MergeMany converged" in aligner.describe(alignment.diagnostics)
    for other, perms in (("b", perms_b), ("c", perms_c)):
        for g in groups:
            found = perm_from_matrix(alignment.transforms[other][g.name])
            np.testing.assert_array_equal(perms[g.name][found], np.arange(g.size))


def test_merge_many_is_expressed_in_the_reference_order():
    from mergescope_plugins.weight_matching import match_weights, merge_many, permute_arrays

    torch.manual_seed(0)
    data = example_dataset(n=16, shape=(1, 8, 8))
    models = {f"m{i}": MLP(hidden=[24, 12]).build((1, 8, 8), 3) for i in range(4)}
    groups = channel_groups(models["m0"], example_input(data))
    states = {m: {k: v.double().numpy() for k, v in net.state_dict().items()} for m, net in models.items()}
    perms, rounds = merge_many(states, "m2", groups, seed=0)
    assert 1 <= rounds <= 50
    for g in groups:  # the reference keeps its own order
        np.testing.assert_array_equal(perms["m2"][g.name], np.arange(g.size))
    # At convergence no model moves when matched to the mean of the others (in the reference order).
    aligned = {m: permute_arrays(states[m], groups, perms[m]) for m in states}
    for m in states:
        rest = [aligned[o] for o in states if o != m]
        target = {k: np.mean([s[k] for s in rest], axis=0) for k in states[m]}
        again, _ = match_weights(target, states[m], groups, initial=perms[m])
        for g in groups:
            np.testing.assert_array_equal(again[g.name], perms[m][g.name])


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="'strategy' must be one of 'reference', 'merge-many'"):
        WeightMatching(strategy="average")


@pytest.mark.parametrize("aligner", [WeightMatching(), WeightMatching(strategy="merge-many"), ActivationMatching()])
def test_a_nan_weight_is_named(aligner, data):
    torch.manual_seed(0)
    a = MLP(hidden=[16]).build((1, 8, 8), 3)
    b = MLP(hidden=[16]).build((1, 8, 8), 3)
    with torch.no_grad():
        b.fc1.bias[3] = float("nan")
    with pytest.raises(ValueError, match="parameter 'fc1.bias' of model 'b' holds NaN or inf"):
        aligner.align({"a": a, "b": b}, "a", Context(data=data, quiet=True))


def _flattening_cnn() -> torch.nn.Module:
    """Conv maps flattened into a linear layer: that layer's input axis repeats each channel 16 times."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(8 * 16, 12), nn.ReLU(),
        nn.Linear(12, 5),
    )


@pytest.mark.parametrize("build", ["cnn", "flatten"])
def test_skipping_unchanged_groups_gives_the_plain_coordinate_descent(build):
    """Skipped groups, kept and column-updated products: the result must not change."""
    from scipy.optimize import linear_sum_assignment

    from mergescope_plugins.weight_matching import match_weights, permute_arrays

    data = example_dataset(n=8, shape=(3, 16, 16))
    torch.manual_seed(0)
    make = (lambda: SmallCNN(widths=[8, 12, 16], batchnorm=True).build((3, 16, 16), 5)) if build == "cnn" else _flattening_cnn
    a, b = make(), make()
    groups = channel_groups(a, example_input(data))
    ref, other = ({k: v.double().numpy() for k, v in m.state_dict().items() if v.is_floating_point()} for m in (a, b))

    def plain(seed):  # every group recomputed at every visit
        perms = {g.name: np.arange(g.size) for g in groups}
        rng = np.random.default_rng(seed)
        for sweep in range(1, 101):
            improved = False
            for index in rng.permutation(len(groups)):
                g = groups[index]
                score = np.zeros((g.size, g.size))
                for ax in g.axes:  # the other model with every other group's permutation applied
                    rest = {n: p for n, p in perms.items() if n != g.name}
                    w = permute_arrays(other, [h for h in groups if h.name != g.name], rest)[ax.param]
                    r = np.moveaxis(np.take(ref[ax.param], range(*ax.span(g.size)), axis=ax.axis), ax.axis, 0)
                    o = np.moveaxis(np.take(w, range(*ax.span(g.size)), axis=ax.axis), ax.axis, 0)
                    score += r.reshape(g.size, -1) @ o.reshape(g.size, -1).T
                rows, cols = linear_sum_assignment(score, maximize=True)
                new = cols[np.argsort(rows)]
                old_value = score[np.arange(g.size), perms[g.name]].sum()
                if score[np.arange(g.size), new].sum() > old_value + 1e-12 * max(1.0, abs(old_value)):
                    perms[g.name], improved = new, True
            if not improved:
                return perms, sweep
        return perms, 100

    for seed in (0, 1):
        expected, sweeps = plain(seed)
        found, found_sweeps = match_weights(ref, other, groups, seed=seed)
        assert found_sweeps == sweeps and sweeps > 1
        for g in groups:
            np.testing.assert_array_equal(found[g.name], expected[g.name])
