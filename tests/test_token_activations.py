"""Token layers (N, T, D) in the activation contract: class, mean or every token; store, metrics, crosscoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
import xarray as xr
from torch import nn

from mergescope import ConfigError, ContractError, collect, validate_activation
from mergescope import store as store_module
from mergescope.activations import check_metric_inputs, make_activation, token_grid
from mergescope.components import Context
from mergescope.pipeline import Pipeline
from mergescope.specs import ActivationSpec
from mergescope.store import MARKER, StoreSpec, collect_store
from mergescope.testing import example_dataset
from mergescope_plugins.correlation import Correlation
from mergescope_plugins.crosscoder import Crosscoder, ablate_latents
from mergescope_plugins.kendall_tau import KendallTau

BLOCK = "encoder.layers.encoder_layer_0"
ATTENTION = f"{BLOCK}.self_attention"
TOKENS = 17  # a class token and 4 x 4 patches of 7 x 7 pixels


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small matrices: one thread is faster, and leaves the machine's other cores alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    vit = torchvision.models.VisionTransformer(
        image_size=28, patch_size=7, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3
    )
    vit.conv_proj = nn.Conv2d(1, 16, kernel_size=7, stride=7)  # grey images
    return vit.eval()


@pytest.fixture(scope="module")
def data():
    return example_dataset(n=10, shape=(1, 28, 28))


@pytest.fixture(scope="module")
def vits():
    return {"a": tiny_vit(0), "b": tiny_vit(1)}


def direct(vit: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The block's output and its attention's output, (N, T, D), from a plain forward pass of the parts."""
    with torch.no_grad():
        patches = vit._process_input(images)
        x = torch.cat([vit.class_token.expand(len(images), -1, -1), patches], dim=1) + vit.encoder.pos_embedding
        block = vit.encoder.layers[0]
        h = block.ln_1(x)
        return {BLOCK: block(x), ATTENTION: block.self_attention(h, h, h, need_weights=False)[0]}


def rows_of(token_map: xr.DataArray) -> np.ndarray:
    """(sample * token, unit) rows of a token map, each image's tokens together, in float64."""
    return token_map.transpose("sample", "token", "unit").values.reshape(-1, token_map.sizes["unit"]).astype(float)


# ------------------------------------------------------------------ recording


@pytest.mark.parametrize("tokens", ["cls", "mean", "all"])
def test_each_tokens_choice_records_what_the_forward_pass_gives(data, vits, tokens):
    vit = vits["a"]
    acts = collect(vit, data, [BLOCK, ATTENTION], model_name="a", tokens=tokens, batch_size=4)
    expected = direct(vit, data.images)
    for layer in (BLOCK, ATTENTION):
        out = expected[layer].numpy()  # (N, T, D)
        want = {"cls": out[:, 0, :], "mean": out.mean(axis=1), "all": out.transpose(0, 2, 1)}[tokens]
        da = validate_activation(acts[layer])
        np.testing.assert_allclose(da.values, want, rtol=1e-5, atol=1e-6)
        assert da["sample"].values.tolist() == list(data.sample_ids)
        if tokens == "all":
            assert da.dims == ("sample", "unit", "token") and da.shape == (10, 16, TOKENS)
            assert da["token"].values.tolist() == list(range(TOKENS))
        else:
            assert da.dims == ("sample", "unit") and da.shape == (10, 16)


def test_the_mean_is_the_default_and_includes_the_class_token(data, vits):
    default = collect(vits["a"], data, [BLOCK], model_name="a")[BLOCK]
    every = collect(vits["a"], data, [BLOCK], model_name="a", tokens="all")[BLOCK]
    np.testing.assert_allclose(default.values, every.mean("token").values, rtol=1e-6, atol=1e-7)
    assert ActivationSpec().tokens == StoreSpec(layers={}).tokens == "mean"


def test_a_token_map_is_a_contract_layout_with_a_token_coord():
    values = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    da = make_activation(values, sample_ids=np.array([7, 9]), labels=np.array([0, 1]), model="m", layer="l")
    assert validate_activation(da).dims == ("sample", "unit", "token")
    assert da["token"].values.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ContractError, match="missing the index coord 'token'"):
        validate_activation(da.drop_vars("token"))
    with pytest.raises(ContractError, match=r"dims must be .*'token'"):
        validate_activation(da.rename(token="position"))


def test_non_batch_first_transformers_are_transposed_or_refused(data):
    class RowsAsTokens(nn.Module):
        """Each image row one token, through a transformer layer built with batch_first=False."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Linear(28, 8)
            self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.embed(x.flatten(1, 2)).transpose(0, 1)  # (T, N, D)
            return self.head(self.layer(tokens).mean(0))

    model = RowsAsTokens().eval()
    acts = collect(model, data, ["layer", "layer.self_attn"], model_name="rows", tokens="all", batch_size=4)
    with torch.no_grad():
        tokens = model.embed(data.images.flatten(1, 2)).transpose(0, 1)
        out = model.layer(tokens).transpose(0, 1)  # (N, T, D)
        attention = model.layer.self_attn(tokens, tokens, tokens, need_weights=False)[0].transpose(0, 1)
    np.testing.assert_allclose(acts["layer"].values, out.numpy().transpose(0, 2, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acts["layer.self_attn"].values, attention.numpy().transpose(0, 2, 1), atol=1e-6)
    # A linear layer inside the block does not say its layout: (T, N, D) is refused, not misread.
    with pytest.raises(ConfigError, match=r"'layer.linear1' .* outputs \(28, 4, 16\) for a batch of 4 images"):
        collect(model, data, ["layer.linear1"], model_name="rows", batch_size=4)


def test_a_module_returning_a_tuple_is_refused(data):
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    model = nn.Sequential(nn.Flatten(), Pair())
    with pytest.raises(ConfigError, match=r"layer '1' of model 'p' \(Pair\) returns a tuple, not a tensor"):
        collect(model, data, ["1"], model_name="p")


# ------------------------------------------------------------------ guards


def test_a_bad_tokens_value_is_a_config_error_naming_the_key(data, vits):
    with pytest.raises(ConfigError, match=r"'tokens' must be one of 'cls' .* got 'first'"):
        ActivationSpec(tokens="first")
    with pytest.raises(ConfigError, match="'tokens' must be one of") as caught:
        StoreSpec(layers={"a": [BLOCK]}, tokens="first")
    assert caught.value.where == "key 'tokens'"
    with pytest.raises(ConfigError, match="'tokens' must be one of"):
        collect(vits["a"], data, [BLOCK], model_name="a", tokens="CLS")
    with pytest.raises(ConfigError, match=r"\[activations\], key 'tokens': .*got 'first'"):
        Pipeline.from_dict({"activations": {"tokens": "first"}}, source="p.toml")
    assert Pipeline.from_dict({"activations": {"tokens": "all"}}).activations.tokens == "all"


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 7, stride=7), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()


def test_tokens_on_a_model_without_token_layers_is_refused_before_recording(tmp_path, data):
    with pytest.raises(
        ConfigError, match=r"tokens = 'cls' .* no layer recorded of model 'cnn' is one \(1 \(4, 4, 4, 4\)"
    ):
        collect(conv_net(), data, ["1"], model_name="cnn", tokens="cls", batch_size=4)
    spec = StoreSpec(layers={"cnn": ["1", "3"]}, tokens="all", batch_size=4, chunk_size=4)
    with pytest.raises(ConfigError, match=r"tokens = 'all' .*'cnn'") as caught:
        collect_store({"cnn": conv_net()}, data, spec, tmp_path / "s")
    assert caught.value.where == "key 'tokens'"
    assert not (tmp_path / "s" / MARKER).exists() and not list((tmp_path / "s").rglob("*.nc"))  # nothing written
    # The default applies to CNNs too: their maps are reduced by `reduce` as always.
    maps = collect(conv_net(), data, ["1"], model_name="cnn", batch_size=4)["1"]
    with torch.no_grad():
        relu = conv_net()[:2](data.images)
    np.testing.assert_allclose(maps.values, relu.mean(dim=(2, 3)).numpy(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ the store


def test_store_of_every_token_takes_statistics_over_tokens(tmp_path, data, vits):
    spec = StoreSpec(
        layers={"a": [BLOCK], "b": [BLOCK]}, tokens="all", batch_size=4, chunk_size=4, topk=3, covariance=True,
        pairs=[("a", "b")],
    )  # fmt: skip
    store = collect_store(vits, data, spec, tmp_path / "s", key="k")
    maps = {m: store.activation(m, BLOCK) for m in vits}
    for m, vit in vits.items():
        assert maps[m].dims == ("sample", "unit", "token") and maps[m].shape == (10, 16, TOKENS)
        expected = direct(vit, data.images)[BLOCK].numpy()
        np.testing.assert_allclose(maps[m].values, expected.transpose(0, 2, 1), rtol=1e-5, atol=1e-6)
        rows = rows_of(maps[m])  # 170 rows: every token of every image
        moments = store.moments(m, BLOCK)
        assert moments.count == 10 * TOKENS
        np.testing.assert_allclose(moments.mean, rows.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(moments.variance, rows.var(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(store.covariance(m, BLOCK).covariance, np.cov(rows.T, bias=True), atol=1e-10)
        # Top-k ranks images by their mean token (ties aside, random data has none).
        means = maps[m].mean("token").values.astype(float)
        top = data.sample_ids[np.argsort(-means, axis=0, kind="stable")[:3]]
        np.testing.assert_array_equal(store.topk(m, BLOCK).sample_ids, top)
    xa, xb = rows_of(maps["a"]), rows_of(maps["b"])
    cross = (xa - xa.mean(0)).T @ (xb - xb.mean(0)) / len(xa)
    np.testing.assert_allclose(store.cross("a", "b", BLOCK).covariance, cross, atol=1e-10)


def test_store_of_class_tokens_and_positions(tmp_path, data, vits):
    vit = vits["a"]
    store = collect_store(
        {"a": vit}, data, StoreSpec(layers={"a": [BLOCK]}, tokens="cls", batch_size=4), tmp_path / "c"
    )
    cls = store.activation("a", BLOCK)
    expected = direct(vit, data.images)[BLOCK].numpy()
    np.testing.assert_allclose(cls.values, expected[:, 0, :], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(store.moments("a", BLOCK).mean, expected[:, 0, :].mean(0), rtol=1e-5)
    # positions: the statistics over every token, whatever the recorded summary.
    spec = StoreSpec(layers={"a": [BLOCK]}, tokens="cls", positions=True, covariance=True, batch_size=4)
    store = collect_store({"a": vit}, data, spec, tmp_path / "p")
    rows = expected.reshape(-1, 16).astype(float)
    assert store.activation("a", BLOCK).dims == ("sample", "unit")
    np.testing.assert_allclose(store.moments("a", BLOCK).mean, rows.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(store.covariance("a", BLOCK).covariance, np.cov(rows.T, bias=True), atol=1e-5)


@pytest.mark.parametrize(("tokens", "positions"), [("cls", True), ("all", False)])
def test_statistics_reduced_as_on_an_accelerator_equal_the_host_ones(
    tmp_path, monkeypatch, data, vits, tokens, positions
):
    spec = StoreSpec(
        layers={"a": [BLOCK], "b": [BLOCK]}, tokens=tokens, positions=positions, covariance=True, pairs=[("a", "b")],
        batch_size=4, chunk_size=4, topk=2,
    )  # fmt: skip
    host = collect_store(vits, data, spec, tmp_path / "host")
    # The rows stay torch tensors, reduced by the accumulators as on CUDA.
    monkeypatch.setattr(store_module, "_statistics_on_device", lambda device: True)
    device = collect_store(vits, data, spec, tmp_path / "device")
    for m in vits:
        assert device.moments(m, BLOCK).count == host.moments(m, BLOCK).count == 10 * TOKENS
        np.testing.assert_allclose(device.moments(m, BLOCK).variance, host.moments(m, BLOCK).variance, rtol=1e-6)
        np.testing.assert_allclose(
            device.covariance(m, BLOCK).covariance, host.covariance(m, BLOCK).covariance, atol=1e-6
        )
        np.testing.assert_array_equal(device.topk(m, BLOCK).sample_ids, host.topk(m, BLOCK).sample_ids)
    np.testing.assert_allclose(
        device.cross("a", "b", BLOCK).covariance, host.cross("a", "b", BLOCK).covariance, atol=1e-6
    )


def test_a_component_records_tokens_through_its_context(tmp_path, data, vits):
    context = Context(data=data, quiet=True, workdir=tmp_path, batch_size=4)
    store = context.record({"a": vits["a"]}, {"a": [BLOCK]}, tokens="all")
    assert store.activation("a", BLOCK).dims == ("sample", "unit", "token")
    assert store.moments("a", BLOCK).count == 10 * TOKENS
    cls = context.record({"a": vits["a"]}, {"a": [BLOCK]}, tokens="cls")  # another recording, not the same one
    assert cls.activation("a", BLOCK).dims == ("sample", "unit") and cls.directories != store.directories


# ------------------------------------------------------------------ consumers


def test_a_metric_compares_class_tokens(data, vits):
    a, b = (collect(vits[m], data, [BLOCK], model_name=m, tokens="cls")[BLOCK] for m in ("a", "b"))
    check_metric_inputs(a, b, "kendall-tau")
    r = Correlation().score(a, b)
    x, y = a.values.astype(float), b.values.astype(float)
    expected = [np.corrcoef(x[:, j], y[:, j])[0, 1] for j in range(16)]
    np.testing.assert_allclose(r.values, expected, rtol=1e-9, atol=1e-12)
    assert r.dims == ("unit",) and str(r["layer"].values) == BLOCK
    assert KendallTau().score(a, b).dims == ("unit",)
    every = {m: collect(vits[m], data, [BLOCK], model_name=m, tokens="all")[BLOCK] for m in ("a", "b")}
    with pytest.raises(ContractError, match=r"record token summaries \(tokens = 'cls' or 'mean'\)"):
        KendallTau().score(every["a"], every["b"])


def test_a_crosscoder_fits_on_token_rows(tmp_path, data, vits):
    maps = {m: collect(vits[m], data, [BLOCK], model_name=m, tokens="all")[BLOCK] for m in ("a", "b")}
    options = dict(dictionary_size=8, epochs=2, batch_size=32, chunk_size=64, topk=2)
    result = Crosscoder(**options, samples="positions").fit(maps, Context(quiet=True, workdir=tmp_path))
    # Every token of every image is one row: density is a multiple of 1 / 170.
    counts = result["density"].values * 10 * TOKENS
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)
    # The fit's numbers recomputed from its parameters on (sample x token) rows.
    x = np.concatenate([rows_of(maps[m]) * s for m, s in zip("ab", result["scale"].values)], axis=1)
    f = np.maximum((x - result["decoder_bias"].values) @ result["encoder"].values + result["encoder_bias"].values, 0)
    x_hat = f @ result["decoder"].values + result["decoder_bias"].values
    for i, m in enumerate("ab"):
        part = slice(16 * i, 16 * (i + 1))
        fvu = ((x[:, part] - x_hat[:, part]) ** 2).sum() / ((x[:, part] - x[:, part].mean(0)) ** 2).sum()
        assert float(result["fvu"].sel(model=m)) == pytest.approx(fvu, rel=1e-4)
    # Removing latents 0 and 3 from b's token map: sum_i f_i d_i^b / s_b off every token, in place.
    edited = ablate_latents(result, maps, "b", [0, 3], samples="positions")
    scale = float(result["scale"].sel(model="b"))
    removed = f[:, [0, 3]] @ result["decoder"].values[[0, 3], 16:] / scale  # (sample * token, unit)
    assert edited.dims == maps["b"].dims and edited["token"].values.tolist() == list(range(TOKENS))
    np.testing.assert_allclose(rows_of(edited), rows_of(maps["b"]) - removed, rtol=1e-4, atol=1e-5)
    # Pooled: a token map is read as its mean token.
    pooled = Crosscoder(**options).fit(maps, Context(quiet=True, workdir=tmp_path))
    means = {m: a.mean("token").astype(np.float32) for m, a in maps.items()}
    xr.testing.assert_identical(pooled, Crosscoder(**options).fit(means, Context(quiet=True, workdir=tmp_path)))
    # A pipeline of every token may train on positions; one of summaries may not.
    Crosscoder(samples="positions").check_activations(ActivationSpec(tokens="all"))
    with pytest.raises(ConfigError, match="tokens = 'all' for a transformer's token layers"):
        Crosscoder(samples="positions").check_activations(ActivationSpec(tokens="mean"))


# ------------------------------------------------------------------ the patch grid


def test_token_grid_lays_patch_tokens_out_as_the_patch_embedding_does(data, vits):
    vit = vits["a"]
    acts = collect(vit, data, ["conv_proj", "encoder.dropout"], model_name="a", reduce="none", tokens="all")
    grid = token_grid(acts["encoder.dropout"])  # class token dropped, 16 patches on a 4 x 4 grid
    assert grid.dims == ("sample", "unit", "y", "x") and grid.shape == (10, 16, 4, 4)
    validate_activation(grid)
    position = vit.encoder.pos_embedding.detach().numpy()[0].T  # (unit, token)
    patches = grid.values - token_grid(position)[None]  # the encoder's input less its position embedding
    np.testing.assert_allclose(patches, acts["conv_proj"].values, rtol=1e-5, atol=1e-6)


def test_token_grid_on_arrays_tensors_and_other_layouts():
    values = np.arange(2 * 7, dtype=float).reshape(2, 7)  # one class token, then a 2 x 3 grid
    grid = token_grid(values, shape=(2, 3))
    np.testing.assert_array_equal(grid[1], [[8, 9, 10], [11, 12, 13]])  # token 1 + i * 3 + j at (i, j)
    no_class = token_grid(torch.arange(9.0), prefix=0)
    assert isinstance(no_class, torch.Tensor) and no_class.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    tokens_first = token_grid(np.arange(5 * 2).reshape(5, 2), axis=0)  # (token, unit) -> (y, x, unit)
    assert tokens_first.shape == (2, 2, 2) and tokens_first[1, 0].tolist() == [6, 7]
    with pytest.raises(ContractError, match="leave 6 patch tokens, which is not a square grid"):
        token_grid(values)
    with pytest.raises(ContractError, match=r"not the 3 x 3 = 9 of shape=\(3, 3\)"):
        token_grid(values, shape=(3, 3))
    with pytest.raises(ContractError, match="a 'token' dim"):
        token_grid(xr.DataArray(values, dims=("sample", "unit")))
