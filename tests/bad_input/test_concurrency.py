"""Concurrent runs: one writer per model group, codebook set or evaluation, by leases that a
dead holder's successor takes over; a live holder's are refused with its name."""
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from rep_pipeline.pipeline.errors import LeaseHeldError
from rep_pipeline.pipeline.leases import Lease, leases_beside
from rep_pipeline.pipeline.store import FeatureStore, check_store, validate_store


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_record(lease: Lease, **fields) -> None:
    lease.path.parent.mkdir(parents=True, exist_ok=True)
    record = {"owner": "someone@elsewhere", "host": "elsewhere", "pid": 1, "command": "rep-pipeline extract ...",
              "token": "t", "heartbeat": time.time(), **fields}
    lease.path.write_text(json.dumps(record))


def test_a_live_holder_is_refused_by_name(tmp_path):
    with Lease(tmp_path, "models/m/d/s", "the group m/d/s"):
        with pytest.raises(LeaseHeldError, match=rf"the group m/d/s is being written by .*@{socket.gethostname()} "
                                                 rf"\(pid {os.getpid()}, heartbeat 0 s ago, command: "):
            Lease(tmp_path, "models/m/d/s", "the group m/d/s").acquire()
        Lease(tmp_path, "models/m/d/other", "another group").acquire().release()  # other groups are free
    Lease(tmp_path, "models/m/d/s", "the group m/d/s").acquire().release()  # released: free again
    assert not tmp_path.joinpath("models__m__d__s.json").exists()


def test_a_dead_holders_lease_is_taken_over(tmp_path):
    lease = Lease(tmp_path, "g", "g")
    _write_record(lease, host=socket.gethostname(), pid=_dead_pid())  # this host, process gone
    with lease:
        assert lease.holder()["pid"] == os.getpid()
    other = Lease(tmp_path, "h", "h", ttl=5)
    _write_record(other, heartbeat=time.time() - 6)  # another host, silent for longer than the ttl
    with other:
        assert other.holder()["token"] == other.token
    live = Lease(tmp_path, "i", "i", ttl=5)
    _write_record(live, heartbeat=time.time() - 1)  # another host, alive
    with pytest.raises(LeaseHeldError, match="someone@elsewhere"):
        live.acquire()


def test_the_heartbeat_keeps_a_long_holder_alive(tmp_path):
    holder = Lease(tmp_path, "g", "g", ttl=1.5).acquire()
    try:
        first = holder.holder()["heartbeat"]
        time.sleep(2.5)  # longer than the ttl: only the heartbeat keeps it
        assert holder.holder()["heartbeat"] > first
        with pytest.raises(LeaseHeldError):  # a second writer still finds it held, past the ttl
            Lease(tmp_path, "g", "g", ttl=1.5).acquire()
    finally:
        holder.release()


def _take(path, name, ready, results, done):
    ready.wait()
    try:
        lease = Lease(path, name, name).acquire()
        results.put("won")
        done.wait(60)  # held until every taker has answered, however slowly the others start
        lease.release()
    except LeaseHeldError:
        results.put("refused")


def test_of_several_takers_of_a_stale_lease_exactly_one_wins(tmp_path):
    _write_record(Lease(tmp_path, "g", "g"), host=socket.gethostname(), pid=_dead_pid())
    ctx = multiprocessing.get_context("spawn")
    ready, results, done = ctx.Event(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_take, args=(tmp_path, "g", ready, results, done)) for _ in range(4)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    ready.set()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    done.set()
    for p in procs:
        p.join()
    assert outcomes == ["refused"] * 3 + ["won"]


_EXTRACT = """
import json, sys
from pathlib import Path
from rep_pipeline.pipeline.config import ExtractConfig
from rep_pipeline.pipeline.errors import LeaseHeldError
from rep_pipeline.stages.extract import run_extract
store, address, options = sys.argv[1:4]
cfg = ExtractConfig(model="tiny-vit", weights="random", store=Path(store), chunk_images=2, splits=("train",),
                    dataset_options=json.loads(options))
try:
    run_extract(cfg, address=address, progress=False)
    print("COMPLETED")
except LeaseHeldError as exc:
    print("REFUSED", exc)
"""


def test_two_extracts_started_together_one_works_one_is_refused(ray_local, tmp_path):
    options = json.dumps({"sizes": {"train": 8}})
    store = tmp_path / "s.zarr"
    cmd = [sys.executable, "-c", _EXTRACT, str(store), ray_local.get_runtime_context().gcs_address, options]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = sorted(p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs)
    assert outs[0].startswith("COMPLETED") and outs[1].startswith("REFUSED"), outs
    assert "is being written by" in outs[1] and "models/tiny-vit/synthetic/train" in outs[1]
    assert validate_store(store) == [] and check_store(store).problems == []
    group = FeatureStore(store).model_split("tiny-vit", "synthetic", "train")
    assert group.finished and group.pending_chunks() == []
    assert not leases_beside(store).exists()  # released, folder gone


def test_cluster_and_evaluate_on_the_same_outputs_are_refused_while_one_runs(hand_made_store, tmp_path):
    from rep_pipeline.pipeline.config import ClusterConfig, EvaluateConfig
    from rep_pipeline.stages.cluster import run_cluster
    from rep_pipeline.stages.evaluate import run_evaluate

    store = hand_made_store(tmp_path / "s.zarr")
    books = "models/m/synthetic/train/codebooks"
    with Lease(leases_beside(store), books, "held by this test"):
        with pytest.raises(LeaseHeldError, match="train/codebooks is being written by .*command: "):
            run_cluster(ClusterConfig(store=store, model="m", train_split="train", k=(2,), methods=("lloyd",)),
                        progress=False)
    cfg = EvaluateConfig(store=store, split="val", results=tmp_path / "results")
    with Lease(leases_beside(cfg.results), "evaluate-val", "held by this test"):
        with pytest.raises(LeaseHeldError, match="evaluation of val .* is being written by"):
            run_evaluate(cfg, progress=False)
    assert not cfg.results.exists()
    run_evaluate(cfg, progress=False)  # free again
    assert cfg.results.is_dir() and not leases_beside(cfg.results).exists()
