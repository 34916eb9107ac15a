"""The k-means sensitivity study (PROTOCOL.md 12.2): variant codebooks beside the main one,
their names, the run section that plans them, and the table evaluate fills."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rep_pipeline.cli.run import RunConfig
from rep_pipeline.pipeline.errors import ConfigError
from rep_pipeline.pipeline.results import Results
from rep_pipeline.pipeline.store import FeatureStore, fingerprint_hash
from rep_pipeline.storage_schemas.feature_store import codebook_name, parse_codebook_name


def test_variant_names_round_trip():
    assert codebook_name("online", 27, 0) == "online-k27-s0"
    assert parse_codebook_name("online-k27-s0") == ("online", 27, 0, None)
    assert codebook_name("online", 27, 1, "3fa2c1d0") == "online-k27-s1-h3fa2c1d0"
    assert parse_codebook_name("online-k27-s1-h3fa2c1d0") == ("online", 27, 1, "3fa2c1d0")
    assert parse_codebook_name("ultra_s-k6-s0") == ("ultra_s", 6, 0, None)


def _config(tmp_path: Path, **sensitivity) -> dict:
    return {"store": str(tmp_path / "s.zarr"), "results": str(tmp_path / "r"), "report": str(tmp_path / "report"),
            "dataset": {"name": "synthetic", "options": {"sizes": {"train": 16, "val": 8}}, "train_split": "train",
                        "test_split": "val"},
            "models": [{"model": "tiny-vit", "weights": "random"}],
            "extract": {"embeddings": ["keys", "tokens"], "image_size": 64},
            "cluster": {"k": [4], "steps": 15, "init_batches": 2, "batch_images": 4},
            "sensitivity": {"model": "tiny-vit", "k": 4, **sensitivity}}


def test_the_study_varies_one_setting_at_a_time_and_keeps_the_main_codebook(tmp_path):
    cfg = RunConfig.from_dict(_config(tmp_path, layer=2, seeds=[0, 1], batch_images=[4, 8], init_intervals=[1, 3]),
                              base=tmp_path)
    study = cfg.sensitivity
    assert study.settings() == [{"batch_images": 4, "init_interval": 1}, {"batch_images": 8, "init_interval": 1},
                                {"batch_images": 4, "init_interval": 3}]
    clusters = study.clusters(2)
    # 3 settings x 2 seeds, less the main codebook (baseline, seed 0)
    assert len(clusters) == 5
    assert {(c.batch_images, c.init_interval, c.seed) for c in clusters} == {(4, 1, 1), (8, 1, 0), (8, 1, 1),
                                                                            (4, 3, 0), (4, 3, 1)}
    by_change = {(c.batch_images, c.init_interval): c.variant for c in clusters}
    assert by_change[(8, 1)] == fingerprint_hash({"batch_images": 8})[:8]
    assert by_change[(4, 3)] == fingerprint_hash({"init_interval": 3})[:8]
    assert by_change[(4, 1)] == fingerprint_hash({})[:8]
    assert all(c.layers == (2,) and c.k == (4,) and c.methods == ("online",) for c in clusters)
    assert [c.hyperparameters("online").get("init_interval") for c in clusters if c.init_interval == 3] == [3, 3]
    assert "init_interval" not in cfg.clusters[0].hyperparameters("online")  # old fingerprints hold


@pytest.mark.parametrize("bad,match", [({"model": "nope"}, "sensitivity.model"),
                                       ({"batch_images": [4, 4]}, "sensitivity.batch_images"),
                                       ({"layer": "middle"}, "sensitivity.layer"),
                                       ({"embedding": "pixels"}, "sensitivity.embedding")])
def test_a_bad_study_is_refused_before_any_work(tmp_path, bad, match):
    raw = _config(tmp_path)
    raw["sensitivity"].update(bad)
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(raw, base=tmp_path)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.integration
def test_the_study_runs_after_the_main_evaluation_and_fills_its_table(tmp_path):
    """Run as a user runs it, ``rep-pipeline run ... --address inline``, in a process of its own
    (inline mode is the process's: this one's later tests start their Ray pools as usual)."""
    raw = _config(tmp_path, seeds=[0, 1], batch_images=[4, 6], init_intervals=[1, 2])
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "rep_pipeline.cli.app", "run", str(tmp_path / "run.yaml"),
                           "--address", "inline", "--no-progress"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sensitivity tiny-vit: done" in done.stdout, done.stdout
    cfg = RunConfig.from_dict(raw, base=tmp_path)
    results = Results(tmp_path / "r")
    best = results.rows("SELECT best_layer FROM best_layers WHERE embedding = 'tokens' AND k = 4")[0]["best_layer"]
    rows = results.rows("SELECT * FROM kmeans_sensitivity ORDER BY batch_images, pca_interval, seed")
    assert {(r["batch_images"], r["pca_interval"], r["seed"]) for r in rows} == {
        (4, 1, 0), (4, 1, 1), (6, 1, 0), (6, 1, 1), (4, 2, 0), (4, 2, 1)}
    assert {r["layer"] for r in rows} == {best} and {r["embedding"] for r in rows} == {"tokens"}
    assert all(r["miou_lo"] <= r["miou"] <= r["miou_hi"] for r in rows)
    main = next(r for r in rows if r["codebook"] == "online-k4-s0")
    seg = results.rows(f"SELECT miou FROM segmentation WHERE embedding = 'tokens' AND k = 4 AND layer = {best}")
    assert [s["miou"] for s in seg] == [pytest.approx(main["miou"])]  # variants stay out of segmentation
    group = FeatureStore(tmp_path / "s.zarr").model_split("tiny-vit", "synthetic", "train")
    names = group.codebook_names()
    assert len(names) == 6 and sum("-h" in n for n in names) == 5
    assert cfg.sensitivity.is_done()  # a second run skips it
