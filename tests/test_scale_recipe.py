"""The scale-out recipe of docs/scale.md (one worker per device, shards joined) runs as written.

The recipe's code block is taken from the page and run on a ``LocalCluster`` of two
worker processes, each recording one shard on the CPU; the joined store must equal a
single-process collection of the same pipeline.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from mergescope import load_pipeline
from mergescope.runner import collect_activations
from mergescope.store import Store

from pipelines import DIGITS_PAIR

SCALE_MD = Path(__file__).resolve().parents[1] / "docs" / "scale.md"
RECIPE = "def collect_on_workers("


def recipe() -> dict:
    """Run the page's code block that defines the recipe; return its namespace."""
    blocks = re.findall(r"^```python\n(.*?)^```", SCALE_MD.read_text(encoding="utf-8"), flags=re.S | re.M)
    found = [b for b in blocks if RECIPE in b]
    assert len(found) == 1, f"docs/scale.md needs exactly one python block with {RECIPE!r}, found {len(found)}"
    # A module name that cannot be imported: the cluster receives the function by value.
    namespace: dict = {"__name__": "scale_recipe"}
    exec(compile(found[0], f"{SCALE_MD.name} (recipe)", "exec", dont_inherit=True), namespace)
    return namespace


def leaves(tree: xr.DataTree) -> Iterator[tuple[str, np.ndarray]]:
    for node in tree.subtree:
        for name, var in node.to_dataset(inherit=False).data_vars.items():
            yield f"{node.path}/{name}", np.asarray(var.values)


def test_the_recipe_on_a_local_cluster_equals_one_process(tmp_path):
    distributed = pytest.importorskip(
        "dask.distributed", reason="the scale-out recipe needs dask.distributed (the 'dask' extra)"
    )
    pipeline_file = tmp_path / "study.toml"
    pipeline_file.write_text(DIGITS_PAIR, encoding="utf-8")
    # The single-process collection first: it also trains the pipeline's two models into
    # the model cache, which the workers then load (the recipe asks for that order).
    single = collect_activations(load_pipeline(pipeline_file), tmp_path / "single", quiet=True, device="cpu")
    collect_on_workers = recipe()["collect_on_workers"]

    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
        distributed.get_task_stream(client) as tasks,
    ):
        workers = sorted(client.scheduler_info()["workers"])
        assert len(workers) == 2
        devices = {w: "cpu" for w in workers}
        joined = collect_on_workers(client, str(pipeline_file), str(tmp_path / "store"), devices)
    ran_on = {t["worker"] for t in tasks.data if "collect_activations" in t["key"]}
    assert ran_on == set(workers), f"the two shards ran on {ran_on}, not one on each of {workers}"

    shards = [Store.open(tmp_path / "store" / f"shard-{i}-of-2").info["samples"] for i in range(2)]
    assert all(s > 0 for s in shards) and sum(shards) == single.info["samples"] == joined.info["samples"]
    a, b = dict(leaves(single.statistics_tree())), dict(leaves(joined.statistics_tree()))
    assert a.keys() == b.keys()
    for key, x in a.items():
        y = b[key]
        if key.endswith("topk_sample") or not np.issubdtype(x.dtype, np.floating):
            np.testing.assert_array_equal(y, x, err_msg=key)
        else:
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-9, err_msg=key)
    assert any(k.endswith("topk_sample") for k in a)  # the ids were compared
    for model in single.models:
        for layer in single.layers(model):
            xr.testing.assert_equal(joined.activation(model, layer).compute(), single.activation(model, layer))


def test_shards_collected_with_pairs_join_to_the_statistics_of_one_pass(tmp_path, capsys):
    """`collect --pairs b:a --positions`: what activation matching reads, recorded shard by shard."""
    from mergescope.cli import main
    from mergescope.errors import ConfigError
    from mergescope.store import join_stores

    pipeline_file = tmp_path / "pairs.toml"
    pipeline_file.write_text(DIGITS_PAIR, encoding="utf-8")
    pipeline = load_pipeline(pipeline_file)
    single = collect_activations(pipeline, tmp_path / "single", quiet=True, pairs=[("b", "a")], positions=True)
    for i in range(2):
        args = ["-q", "collect", str(pipeline_file), "--out", str(tmp_path / f"shard-{i}"), "--shard", f"{i}/2"]
        assert main([*args, "--pairs", "b:a", "--positions", "--statistics-only"]) == 0
    joined = join_stores([tmp_path / f"shard-{i}" for i in range(2)])
    expected = single.cross("b", "a", "relu1")
    np.testing.assert_allclose(joined.cross("b", "a", "relu1").correlation, expected.correlation, atol=1e-9)
    assert joined.cross("b", "a", "relu1").count == expected.count == single.info["samples"]
    assert not joined.info["keep_activations"]
    with pytest.raises(ConfigError, match=r"pairs name models the pipeline does not have: \['z'\]"):
        collect_activations(pipeline, tmp_path / "bad", quiet=True, pairs=[("b", "z")])
    assert main(["-q", "collect", str(pipeline_file), "--out", str(tmp_path / "bad"), "--pairs", "b-a"]) != 0
    assert "--pairs must look like model:reference" in capsys.readouterr().err
