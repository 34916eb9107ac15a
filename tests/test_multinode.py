"""A real multi-node Ray cluster on this machine (a head and two worker nodes, each with its own
resources): extract and cluster spread over the nodes, an extract survives the loss of a worker
node (its raylet and actor SIGKILLed), and the store equals a single-node run either way."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from rep_pipeline.pipeline.config import ExtractConfig
from rep_pipeline.pipeline.store import FeatureStore, check_store
from rep_pipeline.stages.extract import run_extract

pytestmark = pytest.mark.integration
OPTIONS = {"sizes": {"train": 16}}

_DRIVER = """
import json, sys, time
from pathlib import Path
from rep_pipeline.pipeline.config import ClusterConfig, ExtractConfig
from rep_pipeline.stages.cluster import run_cluster
from rep_pipeline.stages.extract import run_extract
store, address, options, pause = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
done = []

def hold(split, chunk, stats):
    done.append(chunk)
    if pause != "-" and len(done) == 2:  # chunks still in flight on both nodes: the test kills one now
        Path(pause + ".ready").touch()
        while not Path(pause + ".go").exists():
            time.sleep(0.1)

# with both nodes up, the defaults: one actor per node, each with that node's CPUs; for the
# node loss, one CPU each, so that Ray can restart the lost node's actor on the survivor
sizing = {} if pause == "-" else {"workers": 2, "threads_per_worker": 1}
cfg = ExtractConfig(model="tiny-vit", weights="random", store=Path(store), chunk_images=2, splits=("train",),
                    dataset_options=options, **sizing)
result = run_extract(cfg, address=address, progress=False, on_chunk_done=hold)
nodes = []
if pause == "-":  # with both nodes up, cluster too
    books = run_cluster(ClusterConfig(store=Path(store), model="tiny-vit", train_split="train", k=(3,),
                                      methods=("lloyd",), init_batches=2, batch_images=4),
                        address=address, progress=False)
    nodes = sorted({t["node"] for t in books.trained})
print(json.dumps({"per_node": result.per_node, "cluster_nodes": nodes}))
"""


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [c.add_node(num_cpus=2) for _ in range(2)]
    c.wait_for_nodes()
    yield c, workers
    c.shutdown()


def _reference(tmp_path_factory, **sizing):
    cfg = ExtractConfig(model="tiny-vit", weights="random", store=tmp_path_factory.mktemp("ref") / "s.zarr",
                        chunk_images=2, splits=("train",), dataset_options=OPTIONS, **sizing)
    run_extract(cfg, progress=False)
    return FeatureStore(cfg.store).model_split("tiny-vit", "synthetic", "train").group


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory):
    """A single-node run with the defaults."""
    return _reference(tmp_path_factory)


@pytest.fixture(scope="module")
def reference_one_thread(ray_local, tmp_path_factory):
    """A single-node run with one thread per worker, as the node-loss run: torch's CPU kernels
    give the same bits for the same thread count, not across thread counts."""
    return _reference(tmp_path_factory, workers=2, threads_per_worker=1)


def _driver(store, address, pause="-"):
    """The run in a process of its own (a driver connects to one Ray instance per process)."""
    return subprocess.Popen([sys.executable, "-c", _DRIVER, str(store), address, json.dumps(OPTIONS), str(pause)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _same_as(reference, store):
    group = FeatureStore(store).model_split("tiny-vit", "synthetic", "train")
    assert group.finished and check_store(store).problems == []
    for name, arr in ((n, a) for n, a in reference.arrays() if n != "provenance"):
        np.testing.assert_array_equal(group.group[name][:], arr[:], err_msg=name)
    return group


def test_extract_and_cluster_spread_over_the_worker_nodes(cluster, reference, tmp_path):
    c, workers = cluster
    driver = _driver(tmp_path / "s.zarr", c.address)
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert len(summary["per_node"]) == 2 and sum(summary["per_node"].values()) == 16
    assert len(summary["cluster_nodes"]) == 2  # the codebook groups trained on both nodes
    group = _same_as(reference, tmp_path / "s.zarr")
    nodes = {p["node"] for p in group.provenance()}
    assert nodes == {w.node_id for w in workers}  # provenance names the two worker nodes


def test_an_extract_survives_a_killed_worker_node(cluster, reference_one_thread, tmp_path):
    c, workers = cluster
    pause = tmp_path / "pause"
    driver = _driver(tmp_path / "s.zarr", c.address, pause)
    deadline = time.monotonic() + 180
    while not pause.with_suffix(".ready").exists():
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the driver never got two chunks done"
        time.sleep(0.1)
    c.remove_node(workers[1], allow_graceful=False)
    pause.with_suffix(".go").touch()
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err[-3000:]
    group = _same_as(reference_one_thread, tmp_path / "s.zarr")
    assert workers[0].node_id in {p["node"] for p in group.provenance()}
