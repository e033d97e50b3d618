from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import xarray as xr

from mergescope import ConfigError, ContractError, collect
from mergescope.store import MARKER, Store, StoreSpec, collect_store, join_stores, shard_positions
from mergescope.testing import example_dataset, example_models


class ConvNet(torch.nn.Module):
    def __init__(self, seed: int, width: int = 6):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(1, width, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.head = torch.nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.pool(self.relu(self.conv(x))).flatten(1))


@pytest.fixture
def data():
    return example_dataset(n=90)


@pytest.fixture
def models():
    return {"a": ConvNet(0).eval(), "b": ConvNet(1).eval()}


def spec(**kw):
    base = dict(layers={"a": ["conv", "relu"], "b": ["conv", "relu"]}, batch_size=8, chunk_size=20, topk=3,
                covariance=True, pairs=[("a", "b")])
    base.update(kw)
    return StoreSpec(**base)


def test_store_matches_direct_collection_and_statistics(tmp_path, data, models):
    store = collect_store(models, data, spec(), tmp_path / "s", key="k")
    for m in ("a", "b"):
        direct = collect(models[m], data, ["relu"], model_name=m)["relu"]
        stored = store.activation(m, "relu")
        xr.testing.assert_equal(stored.drop_vars(["model", "layer"]), direct.drop_vars(["model", "layer"]))
        assert str(stored["model"].values) == m and str(stored["layer"].values) == "relu"
        x = direct.values.astype(np.float64)
        np.testing.assert_allclose(store.moments(m, "relu").mean, x.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(store.moments(m, "relu").variance, x.var(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(store.covariance(m, "relu").covariance, np.cov(x.T, bias=True), atol=1e-10)
        order = np.lexsort((direct["sample"].values[:, None].repeat(x.shape[1], 1).T, -x.T))  # value desc, id asc
        top = direct["sample"].values[order[:, :3]].T
        np.testing.assert_array_equal(store.topk(m, "relu").sample_ids, top)
    xa = store.activation("a", "conv").values.astype(np.float64)
    xb = store.activation("b", "conv").values.astype(np.float64)
    expected = np.corrcoef(xa.T, xb.T)[:6, 6:]
    np.testing.assert_allclose(store.cross("a", "b", "conv").correlation, expected, atol=1e-9)
    assert not (tmp_path / "s" / ".work").exists() and (tmp_path / "s" / MARKER).exists()


def test_full_maps_are_opt_in(tmp_path, data, models):
    store = collect_store(models, data, spec(reduce="none", pairs=[]), tmp_path / "s")
    maps = store.activation("a", "relu")
    assert maps.dims == ("sample", "unit", "y", "x") and maps.shape == (90, 6, 4, 4)
    means = collect(models["a"], data, ["relu"], model_name="a")["relu"].values
    np.testing.assert_allclose(store.moments("a", "relu").mean, means.mean(0), rtol=1e-5)


def test_a_complete_store_is_reused_and_a_new_key_redoes_it(tmp_path, data, models):
    collect_store(models, data, spec(), tmp_path / "s", key="k")
    stamp = (tmp_path / "s" / "a.nc").stat().st_mtime_ns
    collect_store(models, data, spec(), tmp_path / "s", key="k")
    assert (tmp_path / "s" / "a.nc").stat().st_mtime_ns == stamp
    collect_store(models, data, spec(), tmp_path / "s", key="other")
    assert (tmp_path / "s" / "a.nc").stat().st_mtime_ns != stamp


KILLER = """
import os, signal, sys
import torch
sys.path.insert(0, {tests!r})
from test_store import ConvNet, spec
from mergescope.testing import example_dataset
from mergescope.store import collect_store

class Dying(type(example_dataset())):
    def __getitem__(self, i):
        if i == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)

base = example_dataset(n=90)
data = Dying(base.name, base.images, base.labels, base.sample_ids, base.classes)
models = {{"a": ConvNet(0).eval(), "b": ConvNet(1).eval()}}
collect_store(models, data, spec(), {out!r}, key="k")
"""


@pytest.mark.parametrize("kill_at", [5, 47])
def test_a_killed_collection_resumes_to_identical_results(tmp_path, data, models, kill_at):
    out = tmp_path / "killed"
    script = KILLER.format(tests=os.path.dirname(__file__), kill_at=kill_at, out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not (out / MARKER).exists()
    with pytest.raises(ContractError, match="incomplete"):
        Store.open(out)
    assert not list(out.glob("*.nc"))  # nothing half-written under a final name
    resumed = collect_store(models, data, spec(), out, key="k")
    clean = collect_store(models, data, spec(), tmp_path / "clean", key="k")
    for m in ("a", "b"):
        xr.testing.assert_identical(resumed.activation(m, "relu"), clean.activation(m, "relu"))
    assert resumed.statistics_tree().identical(clean.statistics_tree())


def test_shards_join_to_the_single_run(tmp_path, data, models):
    single = collect_store(models, data, spec(), tmp_path / "single")
    shards = [collect_store(models, data, spec(), tmp_path / f"shard{i}", shard=(i, 3)) for i in range(3)]
    assert sum(s.info["samples"] for s in shards) == 90
    joined = join_stores([tmp_path / f"shard{i}" for i in range(3)])
    for m in ("a", "b"):
        np.testing.assert_allclose(joined.moments(m, "relu").mean, single.moments(m, "relu").mean, rtol=0, atol=1e-12)
        np.testing.assert_allclose(joined.moments(m, "relu").m2, single.moments(m, "relu").m2, rtol=0, atol=1e-9)
        np.testing.assert_array_equal(joined.topk(m, "relu").sample_ids, single.topk(m, "relu").sample_ids)
        joined_acts = joined.activation(m, "relu")
        assert joined_acts.chunks is not None  # dask-backed, one chunk per shard
        xr.testing.assert_equal(joined_acts.compute(), single.activation(m, "relu"))
    diff = np.abs(joined.cross("a", "b", "conv").comoment - single.cross("a", "b", "conv").comoment).max()
    assert diff <= 1e-9


def test_dask_reductions_on_a_local_cluster_equal_the_single_process(tmp_path, data, models):
    distributed = pytest.importorskip("distributed")
    for i in range(2):
        collect_store(models, data, spec(), tmp_path / f"shard{i}", shard=(i, 2))
    joined = join_stores([tmp_path / "shard0", tmp_path / "shard1"])
    single = collect_store(models, data, spec(), tmp_path / "single")
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster),
    ):
        acts = joined.activation("a", "relu").astype("float64")
        mean = acts.mean("sample").compute()
        centred = acts - mean
        cov = xr.dot(centred, centred.rename(unit="unit_y"), dim="sample").compute() / acts.sizes["sample"]
    np.testing.assert_allclose(mean.values, single.moments("a", "relu").mean, atol=1e-12)
    np.testing.assert_allclose(cov.values, single.covariance("a", "relu").covariance, atol=1e-12)


def test_bad_input(tmp_path, data, models):
    with pytest.raises(ConfigError, match="no layer 'rleu'"):
        collect_store(models, data, spec(layers={"a": ["rleu"], "b": ["relu"]}, pairs=[]), tmp_path / "x")
    with pytest.raises(ConfigError, match="is empty|no samples"):
        collect_store(models, data.subset([]), spec(), tmp_path / "y")
    with pytest.raises(ConfigError, match="shard must be"):
        shard_positions(10, (3, 2))
    with pytest.raises(ConfigError, match="unknown reduction"):
        spec(reduce="median")
    with pytest.raises(ConfigError, match="pair"):
        spec(pairs=[("a", "c")])


def test_a_corrupt_statistics_file_is_named(tmp_path, data, models):
    collect_store(models, data, spec(), tmp_path / "s")
    stats = tmp_path / "s" / "statistics.nc"
    stats.write_bytes(stats.read_bytes()[:200])
    with pytest.raises(ContractError, match="statistics.nc.*truncated or corrupt"):
        Store.open(tmp_path / "s")


def test_example_models_record_linear_layers(tmp_path):
    models = example_models()
    store = collect_store(models, example_dataset(n=30), StoreSpec(layers={m: ["2"] for m in models}, batch_size=7), tmp_path / "s")
    assert store.activation("model0", "2").shape == (30, 8)


def test_evaluation_is_measured_in_the_same_pass(tmp_path, data, models):
    from mergescope import Context

    store = collect_store(models, data, spec(), tmp_path / "s")
    for m in ("a", "b"):
        expected = Context(data=data, batch_size=13).evaluate(models[m])
        got = store.evaluation(m)
        assert got.accuracy == pytest.approx(expected.accuracy, abs=1e-12)
        assert got.loss == pytest.approx(expected.loss, rel=1e-6)


def test_an_image_size_the_model_cannot_take(tmp_path, models):
    wrong = example_dataset(n=10, shape=(2, 4, 4))  # two channels for a one-channel conv
    with pytest.raises(ConfigError, match=r"model 'a' cannot run on images of shape \(2, 4, 4\)"):
        collect_store(models, wrong, spec(), tmp_path / "s")


def test_cross_statistics_need_one_architecture(tmp_path, data):
    models = {"a": ConvNet(0).eval(), "b": example_models()["model0"]}
    bad = StoreSpec(layers={"a": ["relu"], "b": ["relu"]}, pairs=[("a", "b")])
    with pytest.raises(ConfigError, match="one architecture.*'a' is a ConvNet and 'b' a Sequential"):
        collect_store(models, data, bad, tmp_path / "s")


def test_disk_full_leaves_the_previous_complete_store_untouched(tmp_path, data, models, monkeypatch):
    import mergescope.store as store_module

    out = tmp_path / "s"
    before = collect_store(models, data, spec(), out, key="old")
    old_acts = before.activation("a", "relu")
    old_stats = before.statistics_tree()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "_join_chunks", full)
    with pytest.raises(OSError, match="No space left"):
        collect_store(models, data, spec(topk=2), out, key="new")
    monkeypatch.undo()
    again = Store.open(out)
    assert "old" in again.info["key"]
    xr.testing.assert_identical(again.activation("a", "relu"), old_acts)
    assert again.statistics_tree().identical(old_stats)


def test_context_record_reuses_identical_recordings(tmp_path, data, models):
    from mergescope import Context

    context = Context(data=data, batch_size=16, workdir=tmp_path)
    store = context.record(models, {"a": ["relu"], "b": ["relu"]}, pairs=[("a", "b")])
    corr = store.cross("a", "b", "relu").correlation
    assert corr.shape == (6, 6) and np.isfinite(corr).all()
    again = context.record(models, {"a": ["relu"], "b": ["relu"]}, pairs=[("a", "b")])
    assert again.directories == store.directories
    other = context.record({"a": ConvNet(5).eval(), "b": models["b"]}, {"a": ["relu"], "b": ["relu"]})
    assert other.directories != store.directories


def test_statistics_over_spatial_positions(tmp_path, data, models):
    store = collect_store(models, data, spec(positions=True), tmp_path / "s")
    with torch.no_grad():
        maps = {m: models[m].conv(data.images) for m in models}
    rows = {m: maps[m].movedim(1, -1).reshape(-1, 6).double().numpy() for m in maps}
    np.testing.assert_allclose(store.moments("a", "conv").mean, rows["a"].mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(store.moments("a", "conv").variance, rows["a"].var(0), rtol=1e-8)
    expected = np.corrcoef(rows["a"].T, rows["b"].T)[:6, 6:]
    np.testing.assert_allclose(store.cross("a", "b", "conv").correlation, expected, atol=1e-9)
    assert store.activation("a", "conv").dims == ("sample", "unit")  # still written per image


def test_the_returned_store_equals_the_one_on_disk(tmp_path, data, models, monkeypatch):
    import mergescope.store as store_module

    saved = []
    save_tree = store_module.save_tree
    monkeypatch.setattr(store_module, "save_tree", lambda tree, path: saved.append(path.name) or save_tree(tree, path))
    store = collect_store(models, data, spec(), tmp_path / "s", key="k")
    # 90 samples in chunks of 24: a checkpoint after each of the first three, none after the last.
    assert saved == ["checkpoint.nc"] * 3 + ["statistics.nc"]
    again = Store.open(tmp_path / "s")
    assert store.info == again.info and store.directories == again.directories
    assert store.statistics_tree().identical(again.statistics_tree())


def test_a_collection_killed_before_its_final_files_redoes_the_last_chunk(tmp_path, data, models, monkeypatch):
    import mergescope.store as store_module

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "_finish", killed)
    with pytest.raises(KeyboardInterrupt):
        collect_store(models, data, spec(), tmp_path / "s", key="k")
    monkeypatch.undo()
    assert int(xr.open_datatree(tmp_path / "s" / ".work" / "checkpoint.nc").ds["samples_done"]) == 72
    resumed = collect_store(models, data, spec(), tmp_path / "s", key="k")
    clean = collect_store(models, data, spec(), tmp_path / "clean", key="k")
    for m in ("a", "b"):
        xr.testing.assert_identical(resumed.activation(m, "relu"), clean.activation(m, "relu"))
    assert resumed.statistics_tree().identical(clean.statistics_tree())


def test_layers_selected_by_channel_group(tmp_path, data, models):
    store = collect_store(models, data, spec(layers={"a": ["group:*"], "b": ["group:*"]}), tmp_path / "s")
    # The relu maps carry the conv's channels to the head (through pooling and a 1x1 flatten).
    assert store.layers("a") == store.layers("b") == ["relu"]
    assert store.cross("a", "b", "relu").count == 90
    one = collect_store(models, data, spec(layers={"a": ["group:conv"], "b": ["conv"]}, pairs=[]), tmp_path / "t")
    assert one.layers("a") == ["relu"]


def test_large_result_variables_are_compressed_and_read_back_exactly(tmp_path):
    import xarray as xr

    from mergescope.storage import load_tree, save_tree

    perm = np.eye(1024)[np.random.default_rng(0).permutation(1024)]
    tree = xr.DataTree.from_dict(
        {"/": xr.Dataset({"small": ("x", np.arange(3.0))}), "/wm/b/conv": xr.Dataset({"transform": (("unit", "unit_ref"), perm)})}
    )
    path = save_tree(tree, tmp_path / "results.nc")
    assert path.stat().st_size < perm.nbytes / 20  # 8 MiB of 0/1 values
    back = load_tree(path)
    np.testing.assert_array_equal(back["wm/b/conv"]["transform"].values, perm)
    np.testing.assert_array_equal(back["/"]["small"].values, np.arange(3.0))


class InPlaceNet(torch.nn.Module):
    """Outputs that later layers change in place, as in torchvision's models."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 8)  # 8x8 inputs: a 1x1 map
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 5)
        self.relu = torch.nn.ReLU(inplace=True)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += 10.0  # a residual addition in place
        return self.head(self.relu(self.fc(out.flatten(1))))  # ReLU in place on fc's output


@pytest.mark.parametrize("positions", [False, True])
def test_outputs_changed_in_place_later_are_recorded_as_the_layer_returned_them(tmp_path, positions):
    data = example_dataset(n=40, shape=(1, 8, 8))
    model = InPlaceNet().eval()
    direct = {}
    with torch.no_grad():
        pre = model.bn(model.conv(data.images))
        direct["bn"] = pre.flatten(1).double().numpy()
        direct["fc"] = model.fc(pre.flatten(1) + 10.0).double().numpy()
    assert (direct["fc"] < 0).any()  # the ReLU would change the recorded values
    spec_ = StoreSpec(layers={"m": ["bn", "fc"]}, batch_size=16, topk=2, positions=positions)
    store = collect_store({"m": model}, data, spec_, tmp_path / "s")
    for layer, x in direct.items():
        np.testing.assert_allclose(store.moments("m", layer).mean, x.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(store.activation("m", layer).values.reshape(len(x), -1), x, rtol=1e-5, atol=1e-5)
