"""The batch job of ray_cluster.yaml's header, run as written: `ray job submit --working-dir .`
of `rep-pipeline run` to a head and two worker nodes started with `ray start` on this machine,
with no shared filesystem between them. The data, the store, the results and the report are in
the S3 test server; the nodes have its variables in their environment, as an instance profile
would give them credentials, and the job itself names none. Then its outputs, from the bucket."""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import psutil
import pytest
import yaml
from PIL import Image

from rep_pipeline.pipeline.datasets import build_dataset
from rep_pipeline.pipeline.location import as_location
from rep_pipeline.pipeline.store import FeatureStore

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "rep_pipeline.cli.app"]
SIZES = {"train": 8, "val": 4}


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _processes_of(sessions: list[int]) -> list[psutil.Process]:
    """Every live process in the sessions of our `ray start` calls: each ran in a session of its
    own, and the GCS, raylet, dashboard, agents and workers it started stay in it."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) in sessions and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            pass
    return found


def _stop(sessions: list[int]) -> None:
    """End every process of this test's cluster, and only those (`ray stop` would end every Ray
    instance on the machine): SIGTERM, a moment's grace, then SIGKILL."""
    procs = _processes_of(sessions)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=3)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def ray_cluster(s3):
    """A head (no CPUs; the dashboard, and with it the job server, on a free port) and two worker
    nodes of one CPU each, in a temp dir and on ports of their own, the S3 variables in their
    environment; yields (job server URL, environment). Every process of it ends with the test."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(s3.env, RAY_USAGE_STATS_ENABLED="0")
    env.setdefault("RAY_AUTH_MODE", "disabled")  # a local, single-user test cluster
    temp = tempfile.mkdtemp(prefix="rj-")  # short: Ray's socket paths live under it
    gcs, dashboard, client, *agents = _free_ports(6)
    common = ["--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--object-store-memory=100000000",
              "--disable-usage-stats"]
    nodes = [["--head", f"--port={gcs}", "--num-cpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
              f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
              f"--dashboard-agent-listen-port={agents[0]}"]]
    nodes += [[f"--address=127.0.0.1:{gcs}", "--num-cpus=1", f"--dashboard-agent-listen-port={port}",
               "--include-log-monitor=false"] for port in agents[1:]]
    sessions: list[int] = []
    try:
        for args in nodes:  # one after another: two nodes registering at once can time out
            start = subprocess.Popen(["ray", "start", *args, *common], env=env, start_new_session=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            sessions.append(start.pid)
            out, _ = start.communicate(timeout=120)
            assert start.returncode == 0, out
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _stop(sessions)
        shutil.rmtree(temp, ignore_errors=True)
        assert not _processes_of(sessions), "a process of the test cluster outlived it"


def _folder_dataset_in(root) -> None:
    """The synthetic scenes as a `folder` dataset (images, labels, classes.txt) under ``root``:
    the worker nodes read them from the bucket."""
    scenes = build_dataset("synthetic", None, sizes=SIZES)
    (root / "classes.txt").write_text("\n".join(scenes.classes) + "\n")
    for split, n in SIZES.items():
        for i in range(n):
            rgb, label = scenes.render(split, i)
            for folder, array in (("images", rgb), ("labels", label)):
                out = io.BytesIO()
                Image.fromarray(array).save(out, format="PNG")
                (root / folder / split / f"{i:03d}.png").write_bytes(out.getvalue())


def _cli(*args) -> str:
    done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_documented_batch_job_runs_on_a_cluster_without_a_shared_filesystem(ray_cluster, s3, tmp_path,
                                                                                 documented_job):
    job_server, env = ray_cluster
    _folder_dataset_in(as_location(s3.url("data")))
    run = {"title": "a batch job", "store": s3.url("features.zarr"), "results": s3.url("results"),
           "report": s3.url("report"),
           "dataset": {"name": "folder", "root": s3.url("data"), "train_split": "train", "test_split": "val"},
           "models": [{"model": "tiny-vit", "weights": "random"}],
           "extract": {"layers": [0, 1], "chunk_images": 4, "embeddings": ["keys", "tokens"]},
           "cluster": {"k": [3], "steps": 20, "init_batches": 2, "batch_images": 2},
           "comparisons": [{"compare": "layers", "embedding": "keys", "models": ["tiny-vit"]}]}
    work = tmp_path / "job"
    work.mkdir()
    command = list(documented_job)
    config = command.index("run") + 1  # `rep-pipeline run <config>`: the one path in the command
    (work / command[config]).write_text(yaml.safe_dump(run))
    address = command.index("--address") + 1  # the job server's, before ` -- `
    assert command[address] == "http://<head>:8265"
    command[address] = job_server

    client = {k: v for k, v in env.items() if not k.startswith("AWS_")}  # the credentials are the nodes'
    done = subprocess.run(command, cwd=work, env=client, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in log, log[-6000:]
    assert "report: done" in log.replace(s3.url("report") + ": done", "report: done"), log[-6000:]
    assert sorted(p.name for p in work.iterdir()) == [command[config]]  # nothing written beside the config

    table = _cli("query", s3.url("results"), "SELECT model, layer, embedding, miou FROM segmentation ORDER BY ALL")
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in table.splitlines()
            if line.startswith("│ tiny-vit ")]
    assert {(layer, embedding) for _, layer, embedding, _ in rows} == {
        (layer, embedding) for layer in "01" for embedding in ("keys", "tokens")}, table
    assert all(0 <= float(miou) <= 1 for *_, miou in rows), table
    store = FeatureStore(s3.url("features.zarr"))
    nodes = set()
    for split in SIZES:
        group = store.model_split("tiny-vit", "folder", split)
        assert group.finished, split
        nodes |= {p["node"] for p in group.provenance()}
    assert len(nodes) == 2  # the chunks were written on both worker nodes (the head has no CPUs)
    assert "layout valid" in _cli("store", "info", s3.url("features.zarr"), "--chunks")
    assert "<html" in as_location(s3.url("report/index.html")).read_text()
