"""Malformed stores: clear errors by file, array and chunk; ``store check`` finds every bad
chunk and ``--repair`` marks it for recomputation, touching nothing else."""
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from rep_pipeline.cli.app import app
from rep_pipeline.pipeline.config import ClusterConfig, EvaluateConfig, ExtractConfig
from rep_pipeline.pipeline.errors import StoreError
from rep_pipeline.pipeline.store import FeatureStore, check_store, validate_store
from rep_pipeline.stages.cluster import run_cluster
from rep_pipeline.stages.evaluate import run_evaluate
from rep_pipeline.stages.extract import run_extract

runner = CliRunner()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_an_empty_zarr_v2_group_is_no_feature_store(tmp_path):
    zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2)
    out = _cli("store", "info", tmp_path / "v2.zarr")
    assert out.exit_code == 1 and "not a rep-pipeline feature store" in out.output
    with pytest.raises(StoreError, match="v2.zarr"):
        FeatureStore(tmp_path / "v2.zarr")
    with pytest.raises(StoreError, match="v2.zarr"):
        run_extract(ExtractConfig(model="tiny-vit", weights="random", store=tmp_path / "v2.zarr"), progress=False)


def test_a_damaged_zarr_json_is_named_by_every_entry_point(hand_made_store, tmp_path):
    store = hand_made_store(tmp_path / "s.zarr")
    (store / "zarr.json").write_text("{not json")
    for args in (("store", "info", store), ("store", "check", store)):
        out = _cli(*args)
        assert out.exit_code in (1, 2) and ("zarr.json" in out.output or "Expecting" in out.output), out.output
        assert "Traceback" not in out.output
    for stage_run, cfg in ((run_evaluate, EvaluateConfig(store=store, split="val", results=tmp_path / "r")),
                           (run_cluster, ClusterConfig(store=store, model="m", train_split="train")),
                           (run_extract, ExtractConfig(model="tiny-vit", weights="random", store=store))):
        with pytest.raises(StoreError, match="s.zarr"):
            stage_run(cfg, progress=False)
    assert not (tmp_path / "r").exists()


def test_a_damaged_array_metadata_is_reported_by_array(hand_made_store, tmp_path):
    store = hand_made_store(tmp_path / "s.zarr")
    (store / "models/m/synthetic/val/keys/zarr.json").write_text('{"zarr_format": 3, "node_type": "arr')
    out = _cli("store", "check", store)
    assert out.exit_code in (1, 2) and "models/m/synthetic/val" in out.output and "Traceback" not in out.output


def test_check_finds_each_bad_chunk_by_array_and_chunk(hand_made_store, tmp_path):
    store = hand_made_store(tmp_path / "s.zarr")
    assert check_store(store).problems == []
    _truncate(store / "models/m/synthetic/val/keys/c.0.1.0.0.0")
    (store / "models/m/synthetic/val/class_tokens/c.0.0.0").unlink()
    FeatureStore(store, mode="a").model_split("m", "synthetic", "train").group["attention_mi"][0, 0, 0] = np.inf
    problems = check_store(store).problems
    assert any("models/m/synthetic/val/keys chunk c.0.1.0.0.0" in p for p in problems), problems
    assert "models/m/synthetic/val/class_tokens chunk c.0.0.0 is missing" in problems
    assert "models/m/synthetic/train/attention_mi chunk c.0.0.0 holds NaN/inf" in problems
    assert len(problems) == 3
    only = check_store(store, group="models/m/synthetic/train").problems
    assert only == ["models/m/synthetic/train/attention_mi chunk c.0.0.0 holds NaN/inf"]
    out = _cli("store", "check", store)
    assert out.exit_code == 1 and out.output.count("problem:") == 3


def test_repair_marks_only_the_bad_chunks_pending(hand_made_store, tmp_path):
    store = hand_made_store(tmp_path / "s.zarr")
    _truncate(store / "models/m/synthetic/val/keys/c.0.1.0.0.0")
    _truncate(store / "datasets/synthetic/train/labels/c.0.0.0")
    good = FeatureStore(store).model_split("m", "synthetic", "val").group["class_tokens"][:]
    out = _cli("store", "check", store, "--repair")
    assert out.exit_code == 0 and out.output.count("repaired:") == 3, out.output
    assert "datasets/synthetic/train: label chunks [0] marked pending" in out.output
    s = FeatureStore(store)
    val, train = s.model_split("m", "synthetic", "val"), s.model_split("m", "synthetic", "train")
    assert val.pending_chunks() == [1] and not val.finished and "attention_map" in val.group
    assert train.pending_chunks() == [0] and s.dataset_split("synthetic", "train").done[:].tolist() == [False, True]
    np.testing.assert_array_equal(val.group["class_tokens"][:], good)  # nothing else touched
    assert validate_store(store) == [] and check_store(store).problems == []
    with pytest.raises(StoreError, match="not finished"):
        run_evaluate(EvaluateConfig(store=store, split="val", results=tmp_path / "r"), progress=False)


def test_a_bad_codebook_layer_is_marked_untrained(hand_made_store, tmp_path):
    store = hand_made_store(tmp_path / "s.zarr")
    _truncate(store / "models/m/synthetic/train/codebooks/lloyd-k2-s0/keys/c.0.0.0")
    report = check_store(store, repair=True)
    assert report.problems and report.repairs == [
        "models/m/synthetic/train/codebooks/lloyd-k2-s0/keys: layers [0] marked untrained; run the same cluster command"]
    book = FeatureStore(store).model_split("m", "synthetic", "train").codebook("lloyd", 2, 0)
    assert not book.is_done("keys", 0)


def test_a_chunk_unreadable_while_evaluating_is_named(hand_made_store, tmp_path):
    store = hand_made_store(tmp_path / "s.zarr")
    (store / "models/m/synthetic/val/keys/c.0.1.0.0.0").write_bytes(b"\x00" * 7)
    with pytest.raises(StoreError, match=r"models/m/synthetic/val/keys \(layer 0, images 2..3\) cannot be read"):
        run_evaluate(EvaluateConfig(store=store, split="val", results=tmp_path / "r"), progress=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["file", "folder of other files"])
def test_a_path_that_is_no_store_is_refused_before_any_work(tmp_path, kind):
    path = tmp_path / "store.zarr"
    if kind == "file":
        path.write_text("not a store")
    else:
        path.mkdir()
        (path / "notes.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    out = _cli("extract", "--model", "tiny-vit", "--weights", "random", "--store", path, "--no-progress")
    assert out.exit_code == 2 and str(path) in out.output and "Traceback" not in out.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing adopted or written


def test_a_read_only_store_location_is_refused_before_any_work(hand_made_store, tmp_path):
    """A store on a read-only file system (a tmpfs remounted read-only; root ignores file modes)."""
    import subprocess

    disk = tmp_path / "ro"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        store = hand_made_store(disk / "s.zarr")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        out = _cli("cluster", "--store", store, "--model", "m", "--train-split", "train", "--k", "2",
                   "--results", tmp_path / "results")
        assert out.exit_code == 2 and f"cannot write to {store}" in out.output and "Traceback" not in out.output
        out = _cli("extract", "--model", "tiny-vit", "--weights", "random", "--store", disk / "new.zarr")
        assert out.exit_code == 2 and "is not writable" in out.output
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.parametrize("group", ["datasets/synthetic/val", "models/m/synthetic", "models/m/synthetic/train/codebooks"])
def test_a_damaged_group_metadata_is_named_by_the_stages(hand_made_store, tmp_path, group):
    store = hand_made_store(tmp_path / "s.zarr")
    (store / group / "zarr.json").write_text("{broken")
    with pytest.raises(StoreError, match=f"{group}/zarr.json cannot be read"):
        run_evaluate(EvaluateConfig(store=store, split="val", results=tmp_path / "r"), progress=False)
    out = _cli("store", "check", store)
    assert out.exit_code in (1, 2) and "zarr.json" in out.output and "Traceback" not in out.output
    assert not (tmp_path / "r").exists()


def test_orphan_files_and_a_finished_flag_without_its_chunks_are_found_and_repaired(hand_made_store, tmp_path):
    store = hand_made_store(tmp_path / "s.zarr")
    orphan = store / "models/m/synthetic/val/attention_sum"
    orphan.mkdir()
    (orphan / "c.0.0.0.0").write_bytes(b"left behind")
    FeatureStore(store, mode="a").model_split("m", "synthetic", "val").done[1] = False
    problems = check_store(store).problems
    assert "models/m/synthetic/val/attention_sum holds files of no array (left by an interrupted run)" in problems
    assert "models/m/synthetic/val is marked finished but chunks [1] are not done" in problems
    report = check_store(store, repair=True)
    assert not orphan.exists() and len(report.repairs) == 2
    group = FeatureStore(store).model_split("m", "synthetic", "val")
    assert not group.finished and "attention_map" in group.group and check_store(store).problems == []
