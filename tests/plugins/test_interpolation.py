"""Tests of the interpolation merger: state arithmetic, barriers, options and the labelled sweep."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from mergescope.components import Context, Evaluation, Merger, TensorImageDataset
from mergescope.states import average_states, check_compatible
from mergescope_plugins import interpolation as interp
from mergescope_plugins.interpolation import Interpolation, default_alphas, loss_barrier


def tiny(seed: int, hidden: int = 8) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def with_batchnorm(seed: int, batches: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))
    model[1].running_mean.normal_()
    model[1].num_batches_tracked.fill_(batches)
    return model


@pytest.fixture
def data() -> TensorImageDataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(48, 3, 2, 2, generator=gen)
    return TensorImageDataset("random", images, np.arange(48) % 3, np.arange(1000, 1048), ["a", "b", "c"])


# -------------------------------------------------------------------- state arithmetic


def test_endpoints_equal_the_models_exactly() -> None:
    a, b = tiny(0).state_dict(), tiny(1).state_dict()
    for weights, expected in (([1.0, 0.0], a), ([0.0, 1.0], b)):
        out = average_states([a, b], weights)
        assert out.keys() == expected.keys()
        for key in expected:
            assert out[key].dtype == expected[key].dtype
            assert torch.equal(out[key], expected[key]), key


def test_midpoint_is_the_average() -> None:
    a, b = tiny(0).state_dict(), tiny(1).state_dict()
    out = average_states([a, b], [0.5, 0.5])
    for key in a:
        expected = ((a[key].double() + b[key].double()) / 2).float()
        assert torch.equal(out[key], expected), key


def test_interpolation_does_not_alias_inputs() -> None:
    a, b = tiny(0).state_dict(), tiny(1).state_dict()
    out = average_states([a, b], [1.0, 0.0])
    out["1.weight"].add_(1.0)
    assert not torch.equal(out["1.weight"], a["1.weight"])


def test_integer_buffers_come_from_the_first_model() -> None:
    a, b = with_batchnorm(0, batches=7).state_dict(), with_batchnorm(1, batches=40).state_dict()
    out = average_states([a, b], [0.25, 0.75])
    assert out["1.num_batches_tracked"].dtype == torch.int64
    assert int(out["1.num_batches_tracked"]) == 7
    expected = (0.25 * a["1.running_mean"].double() + 0.75 * b["1.running_mean"].double()).float()
    assert torch.equal(out["1.running_mean"], expected)


def test_n_model_weights() -> None:
    states = [tiny(s).state_dict() for s in range(3)]
    weights = [0.2, 0.3, 0.5]
    out = average_states(states, weights)
    for key in states[0]:
        expected = sum(w * s[key].double() for w, s in zip(weights, states)).float()
        assert torch.equal(out[key], expected), key
    with pytest.raises(ValueError, match="3 state dicts but 2 weights"):
        average_states(states, [0.5, 0.5])


def test_check_compatible_names_the_parameter() -> None:
    states = {"small": tiny(0, hidden=8).state_dict(), "wide": tiny(1, hidden=9).state_dict()}
    with pytest.raises(ValueError, match=r"'1\.weight' has shape \(8, 12\) in model 'small' but \(9, 12\) in model 'wide'"):
        check_compatible(states)
    other = tiny(2).state_dict()
    del other["3.bias"]
    with pytest.raises(ValueError, match=r"'3\.bias' of model 'a' is missing from model 'b'"):
        check_compatible({"a": tiny(0).state_dict(), "b": other})


def test_check_compatible_rejects_non_finite_values() -> None:
    bad = tiny(1).state_dict()
    bad["3.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'3\.weight' of model 'broken' holds NaN or inf"):
        check_compatible({"ok": tiny(0).state_dict(), "broken": bad})
    check_compatible({"ok": tiny(0).state_dict(), "fine": tiny(1).state_dict()})


# ----------------------------------------------------------------------------- barrier


def test_loss_barrier_on_a_hand_made_curve() -> None:
    # The line from L(0) = 1 to L(1) = 2 is 1.25 at 0.25 and 1.5 at 0.5.
    assert loss_barrier([0, 0.25, 0.5, 1], [1.0, 2.0, 3.0, 2.0]) == pytest.approx(1.5)
    # Order does not matter, and a convex curve below the line has barrier 0.
    assert loss_barrier([1, 0, 0.5], [2.0, 1.0, 1.0]) == 0.0
    # Extrapolated points have no line to compare with and are ignored.
    assert loss_barrier([-0.5, 0, 0.5, 1, 1.5], [99.0, 1.0, 1.5, 1.0, 99.0]) == pytest.approx(0.5)


def test_loss_barrier_needs_the_endpoints() -> None:
    with pytest.raises(ValueError, match="alpha = 0 and alpha = 1"):
        loss_barrier([0.0, 0.5], [1.0, 2.0])


# ----------------------------------------------------------------------------- options


def test_default_alphas() -> None:
    alphas = default_alphas()
    assert len(alphas) == 21 and alphas[0] == 0.0 and alphas[-1] == 1.0
    assert alphas[3] == 0.15 and alphas[7] == 0.35


def test_extrapolation_guard() -> None:
    with pytest.raises(ValueError, match="extrapolate = true"):
        Interpolation(alphas=[-0.5, 0.0, 1.0])
    with pytest.raises(ValueError, match="extrapolate = true"):
        Interpolation(alpha=1.2)
    with pytest.raises(ValueError, match="non-negative.*extrapolate = true"):
        Interpolation(weights=[1.5, -0.5])
    with pytest.raises(ValueError, match="sum to 1.*extrapolate = true"):
        Interpolation(weights=[0.5, 0.6])
    Interpolation(alphas=[-0.5, 0.0, 1.0, 1.5], alpha=1.2, extrapolate=True)
    Interpolation(weights=[1.5, -0.5], extrapolate=True)


def test_option_validation_messages() -> None:
    with pytest.raises(ValueError, match=r"'weights' must be a list of at least 2 finite numbers, got nan at position 1"):
        Interpolation(weights=[0.5, float("nan")])
    with pytest.raises(ValueError, match="'alphas' must not repeat"):
        Interpolation(alphas=[0.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="exclude each other"):
        Interpolation(alphas=[0.0, 1.0], weights=[0.5, 0.5])
    assert Interpolation(alphas=[0, 1]).alphas == [0.0, 1.0]


# ------------------------------------------------------------------------------- merge


def test_sweep_results_are_labelled(data: TensorImageDataset) -> None:
    a, b = tiny(0), tiny(1)
    context = Context(data=data, quiet=True)
    merger = Interpolation(alphas=[0.0, 0.25, 0.75, 1.0], alpha=0.5)
    assert isinstance(merger, Merger)
    out = merger.merge({"A": a, "B": b}, context)
    res = out.results

    # alpha (the returned point) is added to the sweep.
    np.testing.assert_array_equal(res["alpha"].values, [0.0, 0.25, 0.5, 0.75, 1.0])
    assert res["loss"].dims == ("alpha",) and res["accuracy"].dims == ("alpha",)
    assert res["loss_barrier"].dims == () and res["accuracy_barrier"].dims == ()
    assert res["endpoints"].dims == ("endpoint",)
    assert list(res["endpoints"].values) == ["A", "B"]
    assert list(res["model"].values) == ["A", "B"]
    np.testing.assert_array_equal(res["weights"].values, [0.5, 0.5])
    assert float(res["merged_alpha"]) == 0.5

    # The endpoints of the curve are the input models' own scores.
    for alpha, model in ((0.0, a), (1.0, b)):
        ev = context.evaluate(model)
        assert res["loss"].sel(alpha=alpha).item() == pytest.approx(ev.loss, abs=1e-6)
        assert res["accuracy"].sel(alpha=alpha).item() == pytest.approx(ev.accuracy)

    # The barrier is the definition applied to the stored curve.
    assert res["loss_barrier"].item() == pytest.approx(loss_barrier(res["alpha"].values, res["loss"].values))
    acc_line = (1 - res["alpha"]) * res["accuracy"][0] + res["alpha"] * res["accuracy"][-1]
    assert res["accuracy_barrier"].item() == pytest.approx(float((acc_line - res["accuracy"]).max()))
    assert res["loss_barrier"].item() >= 0.0

    # The returned model is the midpoint, evaluated where the curve says.
    expected = average_states([a.state_dict(), b.state_dict()], [0.5, 0.5])
    for key, tensor in out.model.state_dict().items():
        assert torch.equal(tensor, expected[key])
    assert out.model is not a and out.model is not b
    assert context.evaluate(out.model).loss == pytest.approx(res["loss"].sel(alpha=0.5).item(), abs=1e-6)

    # The inputs are untouched.
    assert torch.equal(a.state_dict()["1.weight"], tiny(0).state_dict()["1.weight"])

    text = merger.describe(res)
    acc = res["accuracy"]
    assert text == (
        f"accuracy {acc.sel(alpha=0.0).item():.3f} -> {acc.sel(alpha=0.5).item():.3f} (alpha 0.50) -> "
        f"{acc.sel(alpha=1.0).item():.3f}; loss barrier {res['loss_barrier'].item():.3f}"
    )


def test_sweep_results_round_trip_through_netcdf(data: TensorImageDataset, tmp_path) -> None:
    res = Interpolation(alphas=[0.0, 1.0]).merge({"A": tiny(0), "B": tiny(1)}, Context(data=data, quiet=True)).results
    res.to_netcdf(tmp_path / "results.nc", engine="netcdf4")
    with xr.open_dataset(tmp_path / "results.nc", engine="netcdf4") as back:
        xr.testing.assert_allclose(back.load(), res)


def test_default_sweep_has_21_points(data: TensorImageDataset) -> None:
    res = Interpolation().merge({"A": tiny(0), "B": tiny(1)}, Context(data=data, quiet=True)).results
    assert res.sizes["alpha"] == 21


class CountingContext(Context):
    """A Context that records which models it evaluates."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls = 0

    def evaluate(self, model: nn.Module) -> Evaluation:
        self.calls += 1
        return super().evaluate(model)


def test_weights_merge_many_models(data: TensorImageDataset) -> None:
    models = {f"m{i}": tiny(i) for i in range(3)}
    context = CountingContext(data=data, quiet=True)
    merger = Interpolation(weights=[0.2, 0.3, 0.5])
    out = merger.merge(models, context)
    assert context.calls == 1  # one merge, no sweep
    res = out.results
    assert res["weights"].dims == ("model",)
    assert list(res["model"].values) == ["m0", "m1", "m2"]
    np.testing.assert_array_equal(res["weights"].values, [0.2, 0.3, 0.5])
    assert "alpha" not in res.dims
    ev = context.evaluate(out.model)
    assert res["loss"].item() == pytest.approx(ev.loss) and res["accuracy"].item() == pytest.approx(ev.accuracy)
    expected = average_states([m.state_dict() for m in models.values()], [0.2, 0.3, 0.5])
    for key, tensor in out.model.state_dict().items():
        assert torch.equal(tensor, expected[key])
    assert merger.describe(res).startswith("weights 0.20/0.30/0.50: accuracy ")


def test_two_models_with_weights_do_not_sweep(data: TensorImageDataset) -> None:
    context = CountingContext(data=data, quiet=True)
    out = Interpolation(weights=[0.25, 0.75]).merge({"A": tiny(0), "B": tiny(1)}, context)
    assert context.calls == 1 and "alpha" not in out.results.dims
    np.testing.assert_array_equal(out.results["weights"].values, [0.25, 0.75])


def test_empty_alphas_means_no_sweep(data: TensorImageDataset) -> None:
    context = CountingContext(data=data, quiet=True)
    out = Interpolation(alphas=[], alpha=0.3).merge({"A": tiny(0), "B": tiny(1)}, context)
    assert context.calls == 1 and "alpha" not in out.results.dims
    np.testing.assert_allclose(out.results["weights"].values, [0.7, 0.3])


def test_without_data_nothing_is_evaluated() -> None:
    context = CountingContext(data=None, quiet=True)
    merger = Interpolation()
    out = merger.merge({"A": tiny(0), "B": tiny(1)}, context)
    assert context.calls == 0
    assert out.model is not None
    assert set(out.results.data_vars) == {"weights", "endpoints", "merged_alpha"}
    assert "not evaluated" in merger.describe(out.results)


def test_merge_errors(data: TensorImageDataset) -> None:
    context = Context(data=data, quiet=True)
    from mergescope import Alignment

    with pytest.raises(ValueError, match="reference 'Z' is not among this step's models"):
        Interpolation().merge({"A": tiny(0), "B": tiny(1)}, context, alignment=Alignment("Z"))
    with pytest.raises(ValueError, match="at least two models"):
        Interpolation().merge({"A": tiny(0)}, context)
    with pytest.raises(ValueError, match="'weights' has 2 values but the step has 3 models"):
        Interpolation(weights=[0.5, 0.5]).merge({f"m{i}": tiny(i) for i in range(3)}, context)
    with pytest.raises(ValueError, match=r"'1\.weight' has shape"):
        Interpolation().merge({"A": tiny(0), "B": tiny(1, hidden=5)}, context)


def test_registers_the_merger() -> None:
    registered: list[type] = []
    interp.register_mergers(registered.append)
    assert registered == [Interpolation]
