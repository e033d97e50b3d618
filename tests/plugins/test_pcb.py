"""Tests of PCB-Merging: the balancing matrix worked by hand from the paper's equations, the merger, its guards."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from mergescope.components import Context, Merger
from mergescope.errors import ConfigError
from mergescope.task_vectors import example_finetunes
from mergescope.testing import check_component, example_dataset, example_models
from mergescope_plugins.pcb import (
    Pcb,
    balancing_matrix,
    drop,
    inter_balancing,
    intra_balancing,
    minmax_normalize,
    pcb_merge,
    rescale,
)

# Two task vectors of three entries: tau_1 = [0, 1, 2], tau_2 = [2, -1, 1]; N = 2.
TAUS = torch.tensor([[0.0, 1.0, 2.0], [2.0, -1.0, 1.0]], dtype=torch.float64)


def softmax(values: list[float]) -> list[float]:
    z = sum(math.exp(v) for v in values)
    return [math.exp(v) / z for v in values]


def test_balancing_matrix_worked_by_hand() -> None:
    # (P1) intra-balancing, Softmax(N * Norm(tau_i * tau_i)) over the entries of each task:
    #   tau_1^2 = [0, 1, 4] -> Norm = [0, .25, 1] -> x2 = [0, .5, 2]
    #     -> e^0, e^.5, e^2 = 1, 1.64872, 7.38906 (sum 10.03778) -> [.09962, .16425, .73612]
    #   tau_2^2 = [4, 1, 1] -> Norm = [1, 0, 0]   -> x2 = [2, 0, 0]
    #     -> e^2, 1, 1 (sum 9.38906)                             -> [.78699, .10651, .10651]
    intra = intra_balancing(TAUS)
    np.testing.assert_allclose(intra.numpy(), [[0.09962, 0.16425, 0.73612], [0.78699, 0.10651, 0.10651]], atol=5e-6)
    np.testing.assert_allclose(intra[0].numpy(), softmax([0.0, 0.5, 2.0]), rtol=1e-12)
    np.testing.assert_allclose(intra[1].numpy(), softmax([2.0, 0.0, 0.0]), rtol=1e-12)

    # (P2) inter-balancing, sum over j of Softmax(Norm(tau_i * tau_j)) (no factor N):
    #   tau_1 * tau_1 = [0, 1, 4]  -> Norm [0, .25, 1]  -> softmax [.19991, .25669, .54341]
    #   tau_1 * tau_2 = [0, -1, 2] -> Norm [1/3, 0, 1]  -> e^(1/3), 1, e (sum 5.11389)
    #                                                   -> softmax [.27291, .19555, .53155]
    #   tau_2 * tau_2 = [4, 1, 1]  -> Norm [1, 0, 0]    -> softmax [.57612, .21194, .21194]
    #   inter_1 = [.19991 + .27291, .25669 + .19555, .54341 + .53155] = [.47281, .45223, 1.07495]
    #   inter_2 = [.27291 + .57612, .19555 + .21194, .53155 + .21194] = [.84902, .40749, .74349]
    inter = inter_balancing(TAUS)
    np.testing.assert_allclose(inter.numpy(), [[0.47281, 0.45223, 1.07495], [0.84902, 0.40749, 0.74349]], atol=5e-6)
    s11, s12, s22 = softmax([0, 0.25, 1]), softmax([1 / 3, 0, 1]), softmax([1, 0, 0])
    np.testing.assert_allclose(inter[0].numpy(), np.add(s11, s12), rtol=1e-12)
    np.testing.assert_allclose(inter[1].numpy(), np.add(s12, s22), rtol=1e-12)

    # (P3) beta_i = intra_i * inter_i:
    #   beta_1 = [.09962 * .47281, .16425 * .45223, .73612 * 1.07495] = [.04710, .07428, .79130]
    #   beta_2 = [.78699 * .84902, .10651 * .40749, .10651 * .74349]  = [.66817, .04340, .07919]
    beta = balancing_matrix(TAUS)
    np.testing.assert_allclose(beta.numpy(), [[0.04710, 0.07428, 0.79130], [0.66817, 0.04340, 0.07919]], atol=5e-6)
    torch.testing.assert_close(beta, intra * inter)

    # (P4) drop with r = 2/3: keep round(2/3 * 3) = 2 entries of each beta_i:
    #   beta_1 keeps entries 2 and 3 (.07428, .79130); beta_2 keeps entries 1 and 3 (.66817, .07919).
    mask = drop(beta, 2 / 3)
    assert mask.tolist() == [[False, True, True], [True, False, True]]

    # (P5) rescale: sum_i m_i beta_i tau_i / sum_i m_i beta_i per entry:
    #   entry 1: only model 2 kept -> tau_2 = 2
    #   entry 2: only model 1 kept -> tau_1 = 1
    #   entry 3: (.79130 * 2 + .07919 * 1) / (.79130 + .07919) = 1.66179 / .87049 = 1.90903
    merged = rescale(TAUS, beta, mask)
    np.testing.assert_allclose(merged.numpy(), [2.0, 1.0, 1.90903], atol=5e-6)
    b1, b2 = float(beta[0, 2]), float(beta[1, 2])
    assert float(merged[2]) == pytest.approx((2 * b1 + 1 * b2) / (b1 + b2), rel=1e-12)

    result = pcb_merge(TAUS, 2 / 3)
    torch.testing.assert_close(result.merged, merged)
    np.testing.assert_allclose(result.kept().numpy(), [2 / 3, 2 / 3])
    # Mean rescaling weight over the three entries: model 1 gets 0, 1 and .79130 / .87049.
    np.testing.assert_allclose(result.share().numpy()[0], (0 + 1 + b1 / (b1 + b2)) / 3, rtol=1e-12)
    assert float(result.share().sum()) == pytest.approx(1.0)


def test_softmax_runs_over_entries_so_rows_are_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    taus = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    np.testing.assert_allclose(intra_balancing(taus).sum(dim=1).numpy(), [1.0] * 3)
    np.testing.assert_allclose(inter_balancing(taus).sum(dim=1).numpy(), [3.0] * 3)  # N softmaxes per row


def test_minmax_normalize_handles_constant_vectors() -> None:
    np.testing.assert_array_equal(minmax_normalize(torch.tensor([[2.0, 4.0, 3.0]])).numpy(), [[0.0, 1.0, 0.5]])
    np.testing.assert_array_equal(minmax_normalize(torch.zeros(2, 3)).numpy(), np.zeros((2, 3)))


def test_identical_and_zero_task_vectors() -> None:
    tau = torch.tensor([[0.3, -0.2, 0.1, 0.0]], dtype=torch.float64)
    # Identical task vectors, everything kept: the weighted mean is the task vector itself.
    np.testing.assert_allclose(pcb_merge(torch.cat([tau, tau]), 1.0).merged.numpy(), tau[0].numpy())
    # A fine-tune equal to its base (a zero task vector) leaves no NaN behind.
    result = pcb_merge(torch.cat([tau, torch.zeros_like(tau)]), 0.5)
    assert bool(torch.isfinite(result.merged).all())


def test_merger_adds_the_rescaled_vector_to_the_base() -> None:
    base = nn.Sequential(nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        base[0].weight.copy_(torch.tensor([[4.0, -2.0, 5.0]]))
    tuned = {}
    for name, tau in zip(("first", "second"), TAUS):
        tuned[name] = copy.deepcopy(base)
        with torch.no_grad():
            tuned[name][0].weight.add_(tau.float())
    out = Pcb(ratio=2 / 3, scaling=0.5, base="pretrained").merge({"pretrained": base, **tuned}, Context(quiet=True))
    expected = torch.tensor([[4.0, -2.0, 5.0]], dtype=torch.float64) + 0.5 * torch.tensor([[2.0, 1.0, 1.909031]])
    torch.testing.assert_close(out.model[0].weight, expected.float(), rtol=1e-6, atol=1e-6)
    res = out.results
    assert list(res["model"].values) == ["first", "second"] and str(res["base"].values) == "pretrained"
    np.testing.assert_allclose(res["kept"].values, [2 / 3, 2 / 3])
    # Kept values: entry 1 tau_2 = 2, entry 2 tau_1 = 1, entry 3 both positive -> no conflict.
    assert float(res["sign_conflicts"]) == 0.0
    assert float(res["merged_density"]) == 1.0
    assert res["share"].dims == ("model",)


def test_raw_weights_are_rejected_the_seed_study_bug() -> None:
    # Two independently trained networks and no base: exactly what PCB must not be fed.
    models = example_models(2)
    with pytest.raises(ConfigError) as info:
        Pcb().merge({"pokemon": models["model0"], "dice": models["model1"]}, Context(quiet=True))
    message = str(info.value)
    assert "model 'dice' does not look like a fine-tune of the base model 'pokemon'" in message
    assert "pcb merges task vectors" in message and "'base' option" in message and "'interpolation'" in message


def test_options() -> None:
    assert Pcb().ratio == 0.1 and Pcb().scaling == 1.0 and Pcb().reset_batchnorm
    with pytest.raises(ValueError, match=r"'ratio' must be a number in \(0, 1\]"):
        Pcb(ratio=0)
    with pytest.raises(ValueError, match="exclude each other"):
        Pcb(scaling=1.2, scalings=[1.0, 1.2])


def test_describe_and_search() -> None:
    models = example_finetunes(2)
    data = example_dataset()
    merger = Pcb(scalings=[0.8, 1.0, 1.2])
    assert isinstance(merger, Merger)
    res = merger.merge(models, Context(data=data, quiet=True)).results
    np.testing.assert_array_equal(res["scaling"].values, [0.8, 1.0, 1.2])
    assert float(res["accuracy"]) == float(res["search_accuracy"].sel(scaling=float(res["merged_scaling"])))
    text = merger.describe(res)
    assert text.startswith("base 'model0', kept 10% of each task vector, ") and "(best of 3)" in text


def mnist_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)).eval()
    out = {"pretrained": base}
    for i, name in enumerate(("pokemon", "dice")):
        tuned = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        out[name] = tuned
    return out


def test_pipeline_run_with_the_runner(tmp_path, fresh_registry) -> None:
    from mergescope import ModelSpec, Pipeline, Step, run

    registry = fresh_registry.get_registry()
    data = registry.get("dataset", "mnist5000")(split="test", per_class=5)
    models = mnist_models()

    def pipeline(step_models: list[str], **options) -> Pipeline:
        return Pipeline(
            data=data,
            models=[ModelSpec(name, module=module) for name, module in models.items()],
            steps=[Step(Pcb(**options), models=step_models)],
        )

    good = pipeline(["pokemon", "pretrained", "dice"], base="pretrained")
    first = run(good, tmp_path / "run", quiet=True)
    res = first.results["pcb"].ds
    assert list(res["model"].values) == ["pokemon", "dice"] and str(res["base"].values) == "pretrained"
    assert str(res["batchnorm_statistics"].values) == "recomputed"
    assert "pcb" in first.models and "base 'pretrained'" in first.summary
    again = run(good, tmp_path / "run", quiet=True)  # cached: the results come back from disk
    assert again.results["pcb"].ds.identical(res)

    # The two fine-tunes without their base: the first plays the base and passes the
    # distance check (siblings are close), so the base must be named...
    with pytest.raises(ConfigError, match="base model 'pretrained' is not among the step's models"):
        run(pipeline(["pokemon", "dice"], base="pretrained"), tmp_path / "bad1", quiet=True)
    # ...and raw independently trained weights fail loudly, naming the step.
    torch.manual_seed(7)
    models["dice"] = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    with pytest.raises(ConfigError, match=r"\[\[steps\]\] #1 \(use = 'pcb'\).*'dice' does not look like a fine-tune"):
        run(pipeline(["pretrained", "pokemon", "dice"]), tmp_path / "bad2", quiet=True)


@pytest.mark.parametrize("component", [Pcb, Pcb(ratio=0.3, scaling=0.9), Pcb(scalings=[0.9, 1.1])])
def test_conformance(component) -> None:
    check_component(component)
