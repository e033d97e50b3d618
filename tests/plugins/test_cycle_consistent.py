"""C2M3: cycle-consistent alignment through a universe, solved by Frank-Wolfe."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from mergescope import Context
from mergescope.errors import ConfigError
from mergescope.groups import (
    align_to_reference,
    channel_groups,
    example_input,
    perm_from_matrix,
    permute,
    random_permutations,
)
from mergescope.options import structure_options
from mergescope.testing import example_dataset
from mergescope_plugins.cycle_consistent import (
    CycleConsistent,
    apply_matrices,
    assignment_vertex,
    cycle_mismatches,
    frank_wolfe,
    initial_matrices,
    line_search,
    pairwise_objective,
    sinkhorn,
    universe_gradients,
    universe_maps,
)
from mergescope_plugins.weight_matching import WeightMatching, match_weights
from mergescope_plugins.zoo import MLP, SmallCNN

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SWAP = np.array([[0.0, 1.0], [1.0, 0.0]])


def _arrays(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}


def _summed_similarity(models: dict[str, nn.Module], params: list[str]) -> float:
    """``sum_{a < b} <W_a, W_b>`` over ``params``, straight from the state dicts."""
    states = [_arrays(m) for m in models.values()]
    return sum(
        float(np.sum(states[i][p] * states[j][p]))
        for i in range(len(states))
        for j in range(i + 1, len(states))
        for p in params
    )


def _grouped_params(groups) -> list[str]:
    return sorted({ax.param for g in groups for ax in g.axes})


# ------------------------------------------------------------------ a hand-worked step


def _toy(w1, w2, w3) -> nn.Module:
    """flatten -> fc1 (2 -> 2) -> relu -> fc2 (2 -> 2) -> relu -> fc3 (2 -> 1), no biases: groups fc1, fc2."""
    model = nn.Sequential(
        OrderedDict(
            flat=nn.Flatten(),
            fc1=nn.Linear(2, 2, bias=False),
            relu1=nn.ReLU(),
            fc2=nn.Linear(2, 2, bias=False),
            relu2=nn.ReLU(),
            fc3=nn.Linear(2, 1, bias=False),
        )
    ).eval()
    with torch.no_grad():
        for layer, w in ((model.fc1, w1), (model.fc2, w2), (model.fc3, w3)):
            layer.weight.copy_(torch.tensor(w, dtype=torch.float32))
    return model


@pytest.fixture(scope="module")
def toy():
    # a: W1 = [[1, 0], [0, 2]], W2 = 2 I, W3 = [1, 2]
    # b: W1 = [[0, 2], [1, 0]], W2 = 2 J, W3 = [2, 1]     (J the 2 x 2 swap)
    a = _toy([[1, 0], [0, 2]], [[2, 0], [0, 2]], [[1, 2]])
    b = _toy([[0, 2], [1, 0]], [[0, 2], [2, 0]], [[2, 1]])
    groups = channel_groups(a, example_input(example_dataset(n=4, shape=(2, 1, 1))))
    return {"a": _arrays(a), "b": _arrays(b)}, groups


def test_the_toy_has_the_two_groups_the_hand_computation_assumes(toy):
    _, groups = toy
    assert [(g.name, [(ax.param, ax.axis) for ax in g.axes]) for g in groups] == [
        ("fc1", [("fc1.weight", 0), ("fc2.weight", 1)]),
        ("fc2", [("fc2.weight", 0), ("fc3.weight", 1)]),
    ]


def test_gradient_at_the_identity_matches_the_hand_computation(toy):
    states, groups = toy
    identity = {m: {g.name: np.eye(2) for g in groups} for m in states}
    grads = universe_gradients(states, groups, identity)
    # At the identity the universe is each model's own order, so for b:
    #   fc1: W1b W1a^T + W2b^T W2a = [[0, 4], [1, 0]] + 4 J = [[0, 8], [5, 0]]
    #   fc2: W2b W2a^T + W3b^T W3a = 4 J + [[2, 4], [1, 2]] = [[2, 8], [5, 2]]
    # and a's are their transposes (the objective is symmetric in the pair).
    np.testing.assert_array_equal(grads["b"]["fc1"], [[0, 8], [5, 0]])
    np.testing.assert_array_equal(grads["b"]["fc2"], [[2, 8], [5, 2]])
    np.testing.assert_array_equal(grads["a"]["fc1"], [[0, 5], [8, 0]])
    np.testing.assert_array_equal(grads["a"]["fc2"], [[2, 5], [8, 2]])
    # The vertices: swapping scores 13 against 0 (fc1) and 13 against 4 (fc2).
    assert assignment_vertex(grads["b"]["fc1"]).tolist() == [1, 0]
    assert assignment_vertex(grads["b"]["fc2"]).tolist() == [1, 0]


def test_one_frank_wolfe_step_with_the_reference_held_matches_the_hand_computation(toy):
    states, groups = toy
    identity = {m: {g.name: np.eye(2) for g in groups} for m in states}
    found = frank_wolfe(states, groups, identity, max_iter=1, hold=("a",))
    # With S = (1 - t) I + t J for both of b's groups (a held at I):
    #   fc1: <W1a, S W1b> = 5t;  fc2: <2I, S 2J S> = 16 t (1 - t);  fc3: <[1, 2], [2, 1] S> = 4 + t
    #   f(t) = 4 + 22 t - 16 t^2,  f'(t) = 0 at t = 11/16,  f(11/16) = 185/16.
    # The Frank-Wolfe gap <G, D - S> is b's alone: (13 - 0) + (13 - 4) = 22 = f'(0).
    assert found.initial_objective == 4.0
    assert found.gap == [22.0]
    assert found.step_size[0] == pytest.approx(11 / 16, abs=1e-12)
    assert found.objective[0] == pytest.approx(185 / 16, abs=1e-12)
    for g in ("fc1", "fc2"):
        np.testing.assert_allclose(found.matrices["b"][g], 5 / 16 * np.eye(2) + 11 / 16 * SWAP, atol=1e-12)
        np.testing.assert_array_equal(found.matrices["a"][g], np.eye(2))
        assert found.perms["b"][g].tolist() == [1, 0]  # the projection of the mixed matrix
    assert not found.converged  # stopped by max_iter


def test_moving_both_of_two_models_meets_halfway_which_is_why_the_reference_is_held(toy):
    states, groups = toy
    identity = {m: {g.name: np.eye(2) for g in groups} for m in states}
    found = frank_wolfe(states, groups, identity, max_iter=10)
    # Both vertices swap, and swapping both models alike changes nothing: f(t) = f(1 - t),
    # and f(1/2) = 2.5 + 4 + 4.5 = 11 with every matrix the uniform 1/2.
    assert found.step_size[0] == pytest.approx(0.5, abs=1e-12)
    assert found.objective[0] == pytest.approx(11.0, abs=1e-12)
    for m in states:
        for g in ("fc1", "fc2"):
            np.testing.assert_allclose(found.matrices[m][g], np.full((2, 2), 0.5), atol=1e-12)
    # There the gradient is the same for every permutation: the search stops, and the
    # projection falls back to the identity, the objective of the start.
    assert found.step_size[1] == 0.0 and found.gap[1] == pytest.approx(0.0, abs=1e-9)
    assert found.converged and [found.perms[m][g].tolist() for m in states for g in ("fc1", "fc2")] == [[0, 1]] * 4


# -------------------------------------------------------------------- the pure functions


def _tiny_conv() -> nn.Module:
    """conv (1 -> 3) -> BatchNorm -> relu -> flatten -> linear (12 -> 4) -> relu -> linear (4 -> 2), for 2x2 inputs.

    The first linear layer reads each conv channel 4 times (``repeat = 4``).
    """
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12, 4),
        nn.ReLU(),
        nn.Linear(4, 2),
    ).eval()


def test_gradient_matches_finite_differences_and_the_search_reports_its_objective():
    data = example_dataset(n=4, shape=(1, 2, 2))
    states = {}
    for i in range(3):
        torch.manual_seed(i)
        model = _tiny_conv()
        with torch.no_grad():
            model[1].running_mean.normal_()
            model[1].running_var.uniform_(0.5, 2.0)
        states[f"m{i}"] = _arrays(model)
        groups = channel_groups(model, example_input(data))
    assert any(ax.repeat == 4 for g in groups for ax in g.axes)
    point = initial_matrices(states, groups, "sinkhorn", "m0", seed=3)
    grads = universe_gradients(states, groups, point)

    axes = {
        p: [(g.name, g.size, ax) for g in groups for ax in g.axes if ax.param == p] for p in _grouped_params(groups)
    }

    def f(matrices) -> float:
        return pairwise_objective(
            {m: {p: apply_matrices(states[m][p], occ, matrices[m]) for p, occ in axes.items()} for m in states}
        )

    eps = 1e-6
    for m in states:
        for g in groups:
            numeric = np.zeros((g.size, g.size))
            for i in range(g.size):
                for j in range(g.size):
                    up = {k: {h: s.copy() for h, s in v.items()} for k, v in point.items()}
                    down = {k: {h: s.copy() for h, s in v.items()} for k, v in point.items()}
                    up[m][g.name][i, j] += eps
                    down[m][g.name][i, j] -= eps
                    numeric[i, j] = (f(up) - f(down)) / (2 * eps)
            np.testing.assert_allclose(grads[m][g.name], numeric, rtol=1e-5, atol=1e-6)
    # The objective the search reports along the way is the one of the matrices it holds.
    found = frank_wolfe(states, groups, point, max_iter=3)
    assert found.objective[-1] == pytest.approx(f(found.matrices), rel=1e-10)
    assert found.objective[0] >= f(point)


def test_pairwise_objective_sums_every_pair_once():
    universe = {"a": {"w": np.array([1.0, 2.0])}, "b": {"w": np.array([3.0, 0.0])}, "c": {"w": np.array([0.0, 5.0])}}
    # <a, b> + <a, c> + <b, c> = 3 + 10 + 0
    assert pairwise_objective(universe) == 13.0


@pytest.mark.parametrize(
    "phi, expected",
    [
        (lambda t: -((t - 0.3) ** 2), 0.3),
        (lambda t: 4 + 22 * t - 16 * t**2, 11 / 16),
        (lambda t: t**3, 1.0),  # increasing: the far end
        (lambda t: -t, 0.0),  # decreasing: stay
        (lambda t: (t - 0.2) ** 2 * (t - 0.9) ** 2 + 0.1 * t, 1.0),  # two humps: the higher end wins
    ],
)
def test_line_search_finds_the_best_step_of_a_polynomial(phi, expected):
    t, value = line_search(phi, degree=4)
    assert t == pytest.approx(expected, abs=1e-9)
    assert value == pytest.approx(phi(t))


def test_sinkhorn_gives_a_doubly_stochastic_matrix():
    out = sinkhorn(np.random.default_rng(0).uniform(size=(5, 5)))
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-10)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-10)


def test_cycle_mismatches_counts_units_off_the_cycle():
    # a -> b swaps, b -> a keeps: a -> b -> a and b -> a -> b both land on the other unit.
    swap, keep = np.array([1, 0]), np.array([0, 1])
    maps = {("a", "a"): {"g": keep}, ("b", "b"): {"g": keep}, ("a", "b"): {"g": swap}, ("b", "a"): {"g": keep}}
    assert cycle_mismatches(maps) == 4
    maps["b", "a"] = {"g": swap}  # now the inverse of a -> b
    assert cycle_mismatches(maps) == 0


# ------------------------------------------------------------- permuted and noisy copies


def _copies(noise: float, count: int = 3, seed: int = 0) -> tuple[dict[str, nn.Module], list]:
    torch.manual_seed(seed)
    model = MLP(hidden=[16, 16]).build((1, 8, 8), 3).eval()
    groups = channel_groups(model, example_input(example_dataset(n=4, shape=(1, 8, 8))))
    models = {"m0": model}
    generator = torch.Generator().manual_seed(seed + 100)
    for i in range(1, count):
        copy = permute(model, random_permutations(groups, seed=10 * seed + i), groups)
        with torch.no_grad():
            for p in copy.parameters():
                p.add_(noise * p.std() * torch.randn(p.shape, generator=generator))
        models[f"m{i}"] = copy
    return models, groups


def test_three_permuted_copies_coincide_and_every_pairwise_map_is_the_true_one():
    data = example_dataset(n=8, shape=(1, 8, 8))
    torch.manual_seed(0)
    model = SmallCNN(widths=[8, 16], batchnorm=True).build((1, 8, 8), 3).eval()
    with torch.no_grad():  # distinct statistics, so they are permuted visibly
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    groups = channel_groups(model, example_input(data))
    perms = {"a": {g.name: np.arange(g.size) for g in groups}}
    perms["b"], perms["c"] = random_permutations(groups, seed=1), random_permutations(groups, seed=2)
    models = {m: permute(model, perms[m], groups) for m in perms}
    alignment = CycleConsistent().align(models, "a", Context(data=data, quiet=True))
    aligned = align_to_reference(models, alignment, groups)
    for m in ("b", "c"):
        for key, value in model.state_dict().items():
            assert torch.equal(aligned[m].state_dict()[key], value), (m, key)
    d = alignment.diagnostics
    assert int(d["cycle_mismatches"]) == 0 and bool(d["converged"])
    # Identical models: every pair scores |W|^2, three pairs.
    own = _summed_similarity({"x": model, "y": model}, _grouped_params(groups))
    assert float(d["final_objective"]) == pytest.approx(3 * own, rel=1e-12)
    np.testing.assert_allclose(d["cosine"].values, 1.0, atol=1e-12)
    # Every pairwise map through the universe, b -> c included, is the true one:
    # c's unit z holds the original unit perms[c][z], which b keeps at argsort(perms[b])[...].
    states = {m: _arrays(models[m]) for m in models}
    identity = initial_matrices(states, groups, "identity", "a")
    maps = universe_maps(frank_wolfe(states, groups, identity).perms)
    for (x, y), by_group in maps.items():
        for g in groups:
            np.testing.assert_array_equal(by_group[g.name], np.argsort(perms[x][g.name])[perms[y][g.name]])
    assert cycle_mismatches(maps) == 0


def test_on_noisy_copies_the_weight_matching_start_scores_at_least_weight_matching_and_stays_consistent():
    data = example_dataset(n=4, shape=(1, 8, 8))
    models, groups = _copies(noise=1.0, seed=0)
    params = _grouped_params(groups)
    context = Context(data=data, quiet=True)

    def summed_after(alignment) -> float:
        return _summed_similarity(align_to_reference(models, alignment, groups), params)

    baseline = summed_after(WeightMatching().align(models, "m0", context))
    c2m3 = CycleConsistent(initialisation="weight-matching").align(models, "m0", context)
    d = c2m3.diagnostics
    # The diagnostic is the same sum measured on the permuted models themselves.
    assert float(d["final_objective"]) == pytest.approx(summed_after(c2m3), rel=1e-9)
    assert float(d["unaligned_objective"]) == pytest.approx(_summed_similarity(models, params), rel=1e-9)
    assert float(d["initial_objective"]) == pytest.approx(baseline, rel=1e-9)
    # Frank-Wolfe only climbs from the weight-matching vertex; here the projection keeps that.
    assert float(d["final_objective"]) >= baseline - 1e-9
    assert np.all(np.diff(np.concatenate([[float(d["initial_objective"])], d["objective"].values])) >= -1e-9)
    assert int(d["cycle_mismatches"]) == 0
    # Matching every ordered pair on its own, the maps do not compose.
    states = {m: _arrays(models[m]) for m in models}
    pairwise = {(x, y): match_weights(states[y], states[x], groups)[0] for x in models for y in models}
    assert cycle_mismatches(pairwise) > 0


def test_the_identity_start_beats_no_alignment_on_noisy_copies():
    # From the identity the search can stop at a stationary point below weight
    # matching's score on such copies; it still improves on the unaligned models.
    models, _ = _copies(noise=1.0, seed=1)
    d = CycleConsistent().align(models, "m0", Context(data=example_dataset(n=4, shape=(1, 8, 8)), quiet=True))
    assert float(d.diagnostics["final_objective"]) > float(d.diagnostics["unaligned_objective"])
    assert int(d.diagnostics["cycle_mismatches"]) == 0


# --------------------------------------------------------------------------- behaviour


def test_the_sinkhorn_start_is_repeatable_under_its_seed():
    models, groups = _copies(noise=0.5, seed=2)
    context = Context(data=example_dataset(n=4, shape=(1, 8, 8)), quiet=True)
    first = CycleConsistent(initialisation="sinkhorn", seed=5).align(models, "m0", context)
    second = CycleConsistent(initialisation="sinkhorn", seed=5).align(models, "m0", context)
    assert first.to_tree().identical(second.to_tree())
    states = {m: _arrays(v) for m, v in models.items()}
    five, six = (initial_matrices(states, groups, "sinkhorn", "m0", seed=s) for s in (5, 6))
    assert not np.allclose(five["m1"]["fc1"], six["m1"]["fc1"])
    # Three models: nobody is held, the reference starts soft too.
    assert not np.allclose(five["m0"]["fc1"], np.eye(16))


def test_max_iter_stops_the_search_and_describe_says_so():
    models, _ = _copies(noise=1.0, seed=0)
    aligner = CycleConsistent(max_iter=1)
    d = aligner.align(models, "m0", Context(data=example_dataset(n=4, shape=(1, 8, 8)), quiet=True)).diagnostics
    assert int(d["iterations"]) == 1 and not bool(d["converged"])
    assert d["objective"].dims == ("iteration",) and d["objective"].sizes["iteration"] == 1
    text = aligner.describe(d)
    assert "stopped at max_iter after 1 Frank-Wolfe iterations" in text and "0 cycle mismatches" in text


def test_two_models_hold_the_reference_and_give_its_order():
    models, groups = _copies(noise=0.0, count=2, seed=3)
    alignment = CycleConsistent().align(models, "m1", Context(data=example_dataset(n=4, shape=(1, 8, 8)), quiet=True))
    assert set(alignment.transforms) == {"m0"}
    aligned = align_to_reference(models, alignment, groups)["m0"]
    for key, value in models["m1"].state_dict().items():
        assert torch.equal(aligned.state_dict()[key], value)
    assert list(alignment.diagnostics["model"].values) == ["m0"]
    # A random start leaves the held reference at the identity.
    start = initial_matrices({m: _arrays(v) for m, v in models.items()}, groups, "sinkhorn", "m1", hold_reference=True)
    np.testing.assert_array_equal(start["m1"]["fc1"], np.eye(16))
    assert not np.allclose(start["m0"]["fc1"], np.eye(16))


def test_batchnorm_statistics_count_in_the_objective_only_when_asked():
    data = example_dataset(n=8, shape=(1, 8, 8))
    models = {}
    for i in range(2):
        torch.manual_seed(i)
        models[f"m{i}"] = SmallCNN(widths=[4], batchnorm=True).build((1, 8, 8), 3).eval()
        with torch.no_grad():
            models[f"m{i}"].bn1.running_mean.normal_()
    context = Context(data=data, quiet=True)
    with_stats = CycleConsistent().align(models, "m0", context).diagnostics
    without = CycleConsistent(batchnorm_statistics=False).align(models, "m0", context).diagnostics
    a, b = _arrays(models["m0"]), _arrays(models["m1"])
    stats = sum(float(np.dot(a[k], b[k])) for k in ("bn1.running_mean", "bn1.running_var"))
    assert float(with_stats["unaligned_objective"]) - float(without["unaligned_objective"]) == pytest.approx(stats)


def test_one_model_is_refused_with_a_message():
    models, _ = _copies(noise=0.0, count=1)
    with pytest.raises(ConfigError, match="needs two models or more") as info:
        CycleConsistent().align(models, "m0", Context(data=example_dataset(n=4, shape=(1, 8, 8)), quiet=True))
    assert "models" in str(info.value)


@pytest.mark.parametrize(
    "options, key",
    [
        ({"initialisation": "random"}, "initialisation"),
        ({"tolerance": 0.0}, "tolerance"),
        ({"max_iter": 0}, "max_iter"),
        ({"batchnorm_statistics": "no"}, "batchnorm_statistics"),
    ],
)
def test_bad_options_name_their_key(options, key):
    with pytest.raises(ConfigError, match=key):
        structure_options(CycleConsistent, options)


def test_the_transforms_are_permutations_onto_the_reference():
    models, groups = _copies(noise=0.5, seed=4)
    alignment = CycleConsistent().align(models, "m0", Context(data=example_dataset(n=4, shape=(1, 8, 8)), quiet=True))
    assert alignment.reference == "m0" and set(alignment.transforms) == {"m1", "m2"}
    for m in ("m1", "m2"):
        assert set(alignment.transforms[m]) == {g.name for g in groups}
        for t in alignment.transforms[m].values():
            assert t.dims == ("unit", "unit_ref")
            perm_from_matrix(t)  # raises unless a permutation matrix
