"""Everything on object storage: a real S3-compatible server (SeaweedFS) on 127.0.0.1, configured
only through the standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``...). The
whole run, resume after a killed driver, leases by conditional writes, store check and repair,
codebook replacement and the results, each against the same done on local disk."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from rep_pipeline.pipeline.config import ClusterConfig, ExtractConfig
from rep_pipeline.pipeline.errors import LeaseHeldError, StoreError
from rep_pipeline.pipeline.leases import Lease
from rep_pipeline.pipeline.location import ObjectPath, as_location
from rep_pipeline.pipeline.results import Results
from rep_pipeline.pipeline.store import FeatureStore, check_store
from rep_pipeline.stages.cluster import run_cluster
from rep_pipeline.stages.extract import run_extract

SYNTH = {"sizes": {"train": 10, "val": 6}}
CLI = [sys.executable, "-m", "rep_pipeline.cli.app"]


def _arrays(store, model, split, dataset="synthetic"):
    group = FeatureStore(store).model_split(model, dataset, split).group
    return {name: arr[:] for name, arr in group.arrays() if name != "provenance"}


def _cli(*args, cwd=None, check=True):
    done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=dict(os.environ))
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


# -- the location contract: a local folder and a prefix in a bucket answer alike -----------------
class LocationContract:
    """Written once, run on every backend; a subclass overrides ``folder`` (the store and
    results contracts, tests/test_store_contract.py and tests/test_results_contract.py, build
    on this one)."""

    @pytest.fixture
    def folder(self):
        raise NotImplementedError("a backend's subclass says where the folder is")

    def test_a_folder_and_a_prefix_answer_alike(self, folder):
        assert not folder.exists() and not folder.is_dir()
        for rel, data in (("a/b.txt", b"1"), ("a/c/d.png", b"22"), ("top.json", b"{}")):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
        assert folder.is_dir() and (folder / "a").is_dir() and not (folder / "a").is_file()
        assert (folder / "top.json").is_file() and (folder / "a/c/d.png").read_bytes() == b"22"
        assert sorted(p.name for p in folder.iterdir()) == ["a", "top.json"]
        assert [p.name for p in folder.glob("**/*.png")] == ["d.png"]
        assert [p.name for p in (folder / "a").glob("*.txt")] == ["b.txt"]
        assert (folder / "a/c/d.png").parent.name == "c" and (folder / "a/c/d.png").stem == "d"
        assert (folder / "a/b.txt").open("rb").read() == b"1"
        with pytest.raises(FileNotFoundError):
            (folder / "missing.txt").read_bytes()
        (folder / "a/b.txt").unlink()
        assert not (folder / "a/b.txt").exists()


class TestLocationLocal(LocationContract):
    @pytest.fixture
    def folder(self, tmp_path):
        return tmp_path / "root"


@pytest.mark.integration
class TestLocationS3(LocationContract):
    @pytest.fixture
    def folder(self, s3):
        return as_location(s3.url("root"))


def test_conditional_writes_are_honoured_by_the_server(s3):
    obj = as_location(s3.url("cond.json"))
    tag = obj.write_bytes(b"first", if_absent=True)
    with pytest.raises(FileExistsError):
        obj.write_bytes(b"second", if_absent=True)
    newer = obj.write_bytes(b"third", if_etag=tag)
    with pytest.raises(FileExistsError):
        obj.write_bytes(b"stale", if_etag=tag)  # another writer changed it since
    assert obj.read_bytes() == b"third" and newer != tag


def test_urls_and_options_reach_every_stage_config(s3):
    cfg = ClusterConfig.parse({"store": s3.url("f.zarr"), "model": "m", "train_split": "train",
                               "storage_options": ["region=eu-west-1", "allow_http=true"]})
    assert isinstance(cfg.store, ObjectPath) and str(cfg.results) == s3.url("results")
    assert dict(cfg.store.options) == dict(cfg.results.options) == {"region": "eu-west-1", "allow_http": "true"}
    assert as_location("file:///tmp/x.zarr") == Path("/tmp/x.zarr")


# -- leases: conditional writes instead of file locks ---------------------------------------------
def test_a_lease_on_object_storage_refuses_a_second_writer_and_is_taken_over_when_stale(s3):
    folder = as_location(s3.url("leases"))
    with Lease(folder, "models/m/d/train", "the group") as first:
        with pytest.raises(LeaseHeldError, match="being written by .*pid"):
            Lease(folder, "models/m/d/train", "the group").acquire()
        record = json.loads((folder / "models__m__d__train.json").read_text())
        assert record["token"] == first.holder()["token"] == first.token
    # its holder's node is lost: the record stays behind, its heartbeat an hour old
    record.update(heartbeat=time.time() - 3600, host="another-host")
    (folder / "models__m__d__train.json").write_bytes(json.dumps(record).encode())
    with Lease(folder, "models/m/d/train", "the group") as second:
        assert second.holder()["token"] == second.token
    assert not (folder / "models__m__d__train.json").exists()


def test_two_takers_of_a_stale_lease_never_both_win(s3):
    folder = as_location(s3.url("race"))
    stale = {"what": "x", "owner": "gone@elsewhere", "host": "elsewhere", "pid": 1, "command": "-",
             "token": "old", "heartbeat": time.time() - 3600}
    for round_ in range(5):
        name = f"lease-{round_}"
        (folder / f"{name}.json").write_bytes(json.dumps(stale).encode())
        won, refused, go = [], [], threading.Barrier(4)

        def take():
            lease = Lease(folder, name, "x")
            go.wait()
            try:
                won.append(lease.acquire())
            except LeaseHeldError:
                refused.append(lease)

        threads = [threading.Thread(target=take) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(won) == 1 and len(refused) == 3, (won, refused)
        won[0].release()


# -- the stages ---------------------------------------------------------------------------------------
def _upload(local: Path, target: ObjectPath, names: list[str]) -> None:
    for rel in names:
        (target / rel).write_bytes((local / rel).read_bytes())


def _coco_subset(shared: Path, target: ObjectPath, n: int) -> None:
    """The listing and the first ``n`` images and labels of each split of the COCO-Stuff sample."""
    names = ["categories_stuffthingmaps.tsv"]
    for split in ("train2017", "val2017"):
        listing = f"curated/{split}/Coco164kFull_Stuff_Coarse_7.txt"
        ids = (shared / listing).read_text().split()[:n]
        names += [listing, *(f"images/{split}/{i}.jpg" for i in ids), *(f"annotations/{split}/{i}.png" for i in ids)]
    _upload(shared, target, names)


def test_the_whole_run_on_object_storage_equals_the_local_run(ray_local, s3, shared_datasets, tmp_path):
    """Data, store, results and report in the bucket: extract -> cluster -> evaluate -> report ->
    query through the CLI, with the same tables as the same run on local disk."""
    data = as_location(s3.url("cocostuff"))
    _coco_subset(shared_datasets / "cocostuff-sample", data, n=4)
    run = {"title": "on S3", "dataset": {"name": "cocostuff27", "limit": 4, "train_split": "train2017",
                                         "test_split": "val2017"},
           "models": [{"model": "tiny-vit", "weights": "random"}],
           "extract": {"layers": [0, 2], "chunk_images": 2, "embeddings": ["keys", "tokens"]},
           "cluster": {"k": [5], "steps": 20, "init_batches": 2, "batch_images": 2},
           "correspond": {"dataset": {"name": "synthetic-pairs", "options": {"pairs": 2}, "split": "test"},
                          "examples": 1, "keep_matches": True},
           "comparisons": [{"compare": "layers", "embedding": "keys", "models": ["tiny-vit"]}]}
    remote = {**run, "store": s3.url("features.zarr"), "dataset": {**run["dataset"], "root": str(data)}}
    local = {**run, "store": str(tmp_path / "local/features.zarr"),
             "dataset": {**run["dataset"], "root": str(shared_datasets / "cocostuff-sample")}}
    for name, cfg in (("remote.yaml", remote), ("local.yaml", local)):
        (tmp_path / name).write_text(yaml.safe_dump(cfg))
    work = tmp_path / "cwd"
    work.mkdir()
    out = _cli("run", tmp_path / "remote.yaml", "--no-progress", "--address",
               ray_local.get_runtime_context().gcs_address, cwd=work)
    assert "report: done" in out.stdout.replace(s3.url("report") + ": done", "report: done"), out.stdout
    assert list(work.iterdir()) == []  # nothing was written locally
    _cli("run", tmp_path / "local.yaml", "--no-progress", "--address", ray_local.get_runtime_context().gcs_address)

    sql = "SELECT layer, embedding, round(miou, 6) AS miou FROM segmentation ORDER BY layer, embedding"
    remote_rows = _cli("query", s3.url("results"), sql).stdout
    assert remote_rows == _cli("query", tmp_path / "local/results", sql).stdout and "keys" in remote_rows
    sql = "SELECT pair_id, kp_id, embedding, layer, pred_x, pred_y FROM correspondence_matches ORDER BY ALL"
    remote_rows = _cli("query", s3.url("results"), sql, "--limit", "1000").stdout
    assert remote_rows == _cli("query", tmp_path / "local/results", sql, "--limit", "1000").stdout and "pair" in remote_rows
    for name, want in _arrays(tmp_path / "local/features.zarr", "tiny-vit", "train2017", "cocostuff27").items():
        got = _arrays(s3.url("features.zarr"), "tiny-vit", "train2017", "cocostuff27")[name]
        np.testing.assert_array_equal(got, want, err_msg=name)
    page = as_location(s3.url("report/index.html")).read_text()
    figures = [p for p in as_location(s3.url("report")).glob("**/*.svg")]
    assert "<html" in page and figures
    assert "layout valid" in _cli("store", "info", s3.url("features.zarr"), "--chunks").stdout
    assert "store valid" in _cli("store", "check", s3.url("features.zarr")).stdout
    rerun = _cli("run", tmp_path / "remote.yaml", "--no-progress", "--address",
                 ray_local.get_runtime_context().gcs_address, cwd=work).stdout
    assert "extract tiny-vit: skipped" in rerun and "cluster tiny-vit: skipped" in rerun
    assert not as_location(s3.url("features.zarr.leases")).exists()  # every lease released




def test_a_killed_driver_resumes_on_object_storage_to_the_single_run_result(ray_local, s3, tmp_path,
                                                                            kill_a_driver_midway):
    reference = ExtractConfig(model="tiny-vit", weights="random", store=tmp_path / "ref.zarr", chunk_images=2,
                              splits=("train",), dataset_options=SYNTH)
    run_extract(reference, progress=False)
    cfg = reference.replace(store=s3.url("s.zarr"))
    kill_a_driver_midway(cfg.store, tmp_path / "hanging")
    target = FeatureStore(cfg.store).model_split("tiny-vit", "synthetic", "train")
    done_before = set(np.flatnonzero(target.done[:]).tolist())
    assert 2 <= len(done_before) < 5 and not target.finished
    redone = []
    run_extract(cfg, progress=False, on_chunk_done=lambda s, c, _: redone.append(c))  # its lease: a dead pid here
    assert sorted(redone) == sorted(set(range(5)) - done_before)
    got, want = _arrays(cfg.store, "tiny-vit", "train"), _arrays(reference.store, "tiny-vit", "train")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_check_repair_and_codebook_replacement_on_object_storage(ray_local, s3, tmp_path):
    cfg = ExtractConfig(model="tiny-vit", weights="random", store=s3.url("s.zarr"), chunk_images=2,
                        splits=("train",), layers=(0, 1), embeddings=("keys",), dataset_options=SYNTH)
    run_extract(cfg, progress=False)
    want = _arrays(cfg.store, "tiny-vit", "train")
    chunk = as_location(s3.url("s.zarr/models/tiny-vit/synthetic/train/keys/c.1.2.0.0.0"))
    chunk.write_bytes(chunk.read_bytes()[:40])  # a torn object
    report = check_store(cfg.store)
    assert any("keys chunk c.1.2.0.0.0" in p for p in report.problems), report.problems
    check_store(cfg.store, repair=True)
    assert FeatureStore(cfg.store).model_split("tiny-vit", "synthetic", "train").pending_chunks() == [2]
    run_extract(cfg, progress=False)
    assert check_store(cfg.store).problems == []
    np.testing.assert_array_equal(_arrays(cfg.store, "tiny-vit", "train")["keys"], want["keys"])

    cluster = ClusterConfig(store=cfg.store, model="tiny-vit", train_split="train", k=(3,), steps=10,
                            init_batches=2, batch_images=2)
    run_cluster(cluster, progress=False)
    group = FeatureStore(cfg.store).model_split("tiny-vit", "synthetic", "train")
    before = group.codebook("online", 3, 0).centroids("keys", 1)
    run_cluster(cluster.replace(force=True, lr=1e-2), progress=False)  # other hyperparameters, swapped in whole
    book = FeatureStore(cfg.store).model_split("tiny-vit", "synthetic", "train").codebook("online", 3, 0)
    assert book.attrs["hyperparameters"]["lr"] == 1e-2 and book.is_done("keys", 0) and book.is_done("keys", 1)
    assert not np.array_equal(book.centroids("keys", 1), before)
    assert [n for n in FeatureStore(cfg.store).model_split("tiny-vit", "synthetic", "train").codebook_names()] == [
        "online-k3-s0"]
    assert Results(cluster.results).tables() == ["training_curves"]


def test_a_store_url_that_cannot_be_used_is_refused_before_any_work(s3, tmp_path):
    missing = _cli("extract", "--model", "tiny-vit", "--weights", "random", "--store", "s3://no-such-bucket/x.zarr",
                   check=False)
    assert missing.returncode == 2 and "s3://no-such-bucket/x.zarr" in missing.stderr
    as_location(s3.url("other/notes.txt")).write_bytes(b"not a store")
    other = _cli("extract", "--model", "tiny-vit", "--weights", "random", "--store", s3.url("other"), check=False)
    assert other.returncode == 2 and "folder of other files" in other.stderr
    assert as_location(s3.url("other")).keys() == ["notes.txt"]
    scheme = _cli("query", "ftp://host/results", "SELECT 1", check=False)
    assert scheme.returncode == 2 and "unknown storage scheme 'ftp'" in scheme.stderr
    with pytest.raises(StoreError, match="does not exist"):
        FeatureStore(s3.url("nothing.zarr"))
