"""A stage that refuses its inputs writes nothing: the results (and the store) stay exactly as
they were, byte for byte."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from rep_pipeline.pipeline.config import EvaluateConfig, ReportConfig
from rep_pipeline.pipeline.errors import NonFiniteFeaturesError, StoreError
from rep_pipeline.pipeline.store import FeatureStore
from rep_pipeline.stages.evaluate import run_evaluate
from rep_pipeline.stages.report import run_report


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def evaluated(hand_made_store, tmp_path):
    """A store and the results of one good evaluation of it."""
    store = hand_made_store(tmp_path / "s.zarr")
    cfg = EvaluateConfig(store=store, split="val", results=tmp_path / "results", n_examples=2)
    run_evaluate(cfg, progress=False)
    return cfg


def _refused(cfg, error, match):
    before = _snapshot(cfg.results) if cfg.results.exists() else None
    with pytest.raises(error, match=match):
        run_evaluate(cfg, progress=False)
    after = _snapshot(cfg.results) if cfg.results.exists() else None
    assert after == before


def test_unfinished_features_are_refused_before_anything_is_written(evaluated):
    group = zarr.open_group(str(evaluated.store / "models/m/synthetic/val"), mode="a")
    group.attrs["finished"] = False
    _refused(evaluated, StoreError, "not finished")
    _refused(evaluated.replace(results=evaluated.results.parent / "fresh"), StoreError, "not finished")
    assert not (evaluated.results.parent / "fresh").exists()


def test_evaluate_before_cluster_is_refused_before_anything_is_written(evaluated):
    shutil.rmtree(evaluated.store / "models/m/synthetic/train/codebooks")
    _refused(evaluated, StoreError, "rep-pipeline cluster")


def test_labels_not_written_are_refused(evaluated):
    FeatureStore(evaluated.store, mode="a").dataset_split("synthetic", "val").done[1] = False
    _refused(evaluated, StoreError, r"labels of chunks \[1\] are not written")


def test_labels_out_of_range_are_refused(evaluated):
    FeatureStore(evaluated.store, mode="a").dataset_split("synthetic", "val").labels[3, 0, 0] = 7
    _refused(evaluated, StoreError, "values outside 0..1 near image 2")


def test_features_found_broken_midway_leave_the_results_as_they_were(evaluated):
    """NaN features surface only while streaming, after the ground truth and other settings
    were computed: none of it reaches the results."""
    keys = FeatureStore(evaluated.store, mode="a").model_split("m", "synthetic", "val").group["keys"]
    keys[0, 3, 1, 1, 0] = np.nan
    _refused(evaluated, NonFiniteFeaturesError, r"keys layer 0 holds NaN/inf for images \[3\]")
    assert not [p for p in evaluated.results.iterdir() if p.name.startswith(".")]  # no staging left


def test_report_on_results_without_evaluations_names_what_to_run(tmp_path):
    (tmp_path / "results").mkdir()
    with pytest.raises(StoreError, match="run `rep-pipeline evaluate` first"):
        run_report(ReportConfig(results=tmp_path / "results", out=tmp_path / "report"))
    assert not (tmp_path / "report").exists()


def test_a_report_with_one_bad_comparison_draws_nothing(evaluated, tmp_path):
    from rep_pipeline.pipeline.config import Comparison
    from rep_pipeline.pipeline.errors import ConfigError

    cfg = ReportConfig(results=evaluated.results, out=tmp_path / "report",
                       comparisons=(Comparison(embedding="keys"), Comparison(embedding="keys", layer=9)))
    with pytest.raises(ConfigError, match="no evaluated layer 9"):
        run_report(cfg)
    assert not (tmp_path / "report").exists()
