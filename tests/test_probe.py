"""The probe stage (PROTOCOL.md section 9) end to end: a store with planted structure, the
tables against their raw counts, reruns and workers, stored templates, version-1 stores, and
the whole path from a tiny model on the synthetic scenes."""
from __future__ import annotations

import numpy as np
import pytest

from rep_pipeline.pipeline.config import ExtractConfig, ProbeConfig
from rep_pipeline.pipeline.errors import StoreError
from rep_pipeline.pipeline.results import Results
from rep_pipeline.pipeline.store import FeatureStore
from rep_pipeline.stages.extract import run_extract
from rep_pipeline.stages.probe import is_done, run_probe

@pytest.fixture(scope="module")
def planted(tmp_path_factory, ray_local, planted_store, probe_config):
    tmp = tmp_path_factory.mktemp("planted")
    planted_store(tmp / "s.zarr")
    cfg = probe_config(tmp, layers=(1,))
    result = run_probe(cfg, progress=False)
    return tmp, cfg, result


def test_the_planted_token_type_ranks_first_by_a_clear_margin(planted):
    tmp, cfg, result = planted
    rows = Results(cfg.results).rows(
        "SELECT embedding, rule, object, accuracy, f1 FROM direction_probes WHERE concept_id = 0 AND object = 'patch' "
        "AND (rule = 'hyperplane' OR k_shot = 5)")
    by = {(r["embedding"], r["rule"]): r for r in rows if r["rule"] == "hyperplane"}
    assert by[("keys", "hyperplane")]["accuracy"] > 0.95
    assert by[("keys", "hyperplane")]["accuracy"] - by[("queries", "hyperplane")]["accuracy"] > 0.3
    cosine = [r for r in rows if r["rule"] == "cosine"]
    mean = {e: np.mean([r["accuracy"] for r in cosine if r["embedding"] == e]) for e in ("keys", "queries")}
    assert mean["keys"] - mean["queries"] > 0.2


def test_balanced_metrics_and_summaries_equal_references_from_the_raw_counts(planted):
    _, cfg, _ = planted
    results = Results(cfg.results)
    for r in results.rows("SELECT * FROM direction_probes"):
        tpr, tnr = r["tp"] / r["n_pos"], r["tn"] / r["n_neg"]
        fpr = r["fp"] / r["n_neg"]
        precision = tpr / (tpr + fpr) if tpr + fpr else 0.0
        f1 = 2 * precision * tpr / (precision + tpr) if precision + tpr else 0.0
        assert r["tp"] + r["fn"] == r["n_pos"] and r["tn"] + r["fp"] == r["n_neg"]
        np.testing.assert_allclose([r["accuracy"], r["precision"], r["recall"], r["f1"]],
                                   [(tpr + tnr) / 2, precision, tpr, f1], atol=1e-12)
    summary = results.rows("SELECT * FROM direction_summary WHERE rule = 'cosine' AND category = 'all' "
                           "AND embedding = 'keys' AND object = 'patch' AND k_shot = 5")[0]
    trials = results.rows("SELECT trial, avg(f1) AS f1 FROM direction_probes WHERE rule = 'cosine' AND "
                          "embedding = 'keys' AND object = 'patch' AND k_shot = 5 GROUP BY trial ORDER BY trial")
    per_trial = [t["f1"] for t in trials]
    assert summary["f1"] == pytest.approx(np.mean(per_trial)) and summary["f1_std"] == pytest.approx(np.std(per_trial))
    assert summary["n_concepts"] == 3
    hyper = results.rows("SELECT * FROM direction_summary WHERE rule = 'hyperplane' AND category = 'all'")
    assert hyper and all(r["f1_std"] is None for r in hyper)


def test_a_rerun_reuses_the_templates_and_gives_identical_tables_with_two_workers(planted, tmp_path, planted_store,
                                                                                      probe_config):
    tmp, cfg, _ = planted
    assert is_done(cfg)
    first = Results(cfg.results).rows("SELECT * FROM direction_probes ORDER BY ALL")
    again = run_probe(cfg.replace(workers=2), progress=False)
    assert again.reused == 2  # both embeddings' layer: templates read back, not trained
    assert Results(cfg.results).rows("SELECT * FROM direction_probes ORDER BY ALL") == first
    planted_store(tmp_path / "s.zarr")  # the same store built afresh: trained from scratch on two workers
    fresh = probe_config(tmp_path, layers=(1,), workers=2)
    run_probe(fresh, progress=False)
    assert Results(fresh.results).rows("SELECT * FROM direction_probes ORDER BY ALL") == first


def test_force_retrains_and_swaps_the_templates_in_whole(planted):
    _, cfg, _ = planted
    group = FeatureStore(cfg.store).model_split("m", "synthetic", "train")
    before = group.templates(cfg.seed).read("keys", 1)
    run_probe(cfg.replace(force=True), progress=False)
    group = FeatureStore(cfg.store).model_split("m", "synthetic", "train")
    assert group.templates_names() == ["hyperplane-s0"]
    after = group.templates(cfg.seed).read("keys", 1)
    np.testing.assert_array_equal(after[0], before[0])  # the same seed trains the same templates


def test_skipped_concepts_are_listed_with_their_reason(planted):
    _, cfg, _ = planted
    skipped = Results(cfg.results).rows("SELECT * FROM direction_skipped")
    assert skipped and all(r["reason"] for r in skipped)
    assert {(r["rule"], r["k_shot"]) for r in skipped} == {("cosine", 50)}
    assert not Results(cfg.results).rows("SELECT * FROM direction_probes WHERE k_shot = 50")


def test_a_store_without_an_array_names_it_and_the_extract_option(tmp_path, hand_made_store):
    hand_made_store(tmp_path / "s.zarr")  # keys and the class token of tokens only (as version 1)
    cfg = ProbeConfig(store=tmp_path / "s.zarr", model="m", train_split="train", split="val",
                      embeddings=("keys", "mid_tokens"), objects=("patch",))
    with pytest.raises(StoreError, match="no array 'mid_tokens'.*--embeddings"):
        run_probe(cfg, progress=False)
    with pytest.raises(StoreError, match="no array 'class_keys'.*--class-embeddings"):
        run_probe(cfg.replace(embeddings=("keys",), objects=("class_token",)), progress=False)
    assert not (tmp_path / "results").exists()


def test_the_whole_path_from_a_tiny_model_on_the_synthetic_scenes(ray_local, tmp_path):
    extract = ExtractConfig(model="tiny-vit", weights="random", store=tmp_path / "s.zarr", chunk_images=8,
                            layers=(2, 3), dataset_options={"sizes": {"train": 24, "val": 16}})
    run_extract(extract, progress=False)
    cfg = ProbeConfig(store=extract.store, model="tiny-vit", train_split="train", split="val", shots=(1, 5),
                      trials=2, query_images=4)
    result = run_probe(cfg, progress=False)
    assert result.settings == 5 and is_done(cfg)  # five token types of the last captured block
    summary = Results(cfg.results).rows("SELECT DISTINCT embedding, layer, object, rule FROM direction_summary")
    assert {(r["embedding"], r["layer"]) for r in summary} == {
        (e, 3) for e in ("queries", "keys", "values", "mid_tokens", "tokens")}
    assert {r["object"] for r in summary} == {"patch", "class_token"}


def test_a_version_1_store_stays_readable_by_every_stage(ray_local, tmp_path, planted_store, probe_config):
    from rep_pipeline.pipeline.config import ClusterConfig, EvaluateConfig
    from rep_pipeline.pipeline.store import check_store, validate_store
    from rep_pipeline.stages.cluster import run_cluster
    from rep_pipeline.stages.evaluate import run_evaluate

    planted_store(tmp_path / "s.zarr", version=1)
    assert validate_store(tmp_path / "s.zarr") == [] and FeatureStore(tmp_path / "s.zarr").schema_version == 1
    assert check_store(tmp_path / "s.zarr").problems == []
    run_cluster(ClusterConfig(store=tmp_path / "s.zarr", model="m", train_split="train", k=(3,), methods=("lloyd",),
                              init_batches=2, batch_images=8, embeddings=("keys",)), progress=False)
    run_evaluate(EvaluateConfig(store=tmp_path / "s.zarr", split="val"), progress=False)
    probe = probe_config(tmp_path, objects=("patch",), rules=("cosine",), shots=(1,), trials=2)
    run_probe(probe, progress=False)
    assert Results(probe.results).rows("SELECT DISTINCT embedding FROM direction_summary ORDER BY 1") == [
        {"embedding": "keys"}, {"embedding": "queries"}]
    with pytest.raises(StoreError, match="no array 'class_queries'.*--class-embeddings"):
        run_probe(probe.replace(objects=("class_token",)), progress=False)


def test_pascal_part_objects_and_parts_are_two_categories_of_one_run(ray_local, tmp_path, shared_datasets):
    extract = ExtractConfig(model="tiny-vit", weights="random", store=tmp_path / "s.zarr", chunk_images=9,
                            layers=(3,), dataset="pascalpart", data_root=shared_datasets / "pascalpart-sample")
    run_extract(extract, progress=False)
    data = FeatureStore(extract.store).dataset_split("pascalpart", "train")
    assert list(data.label_maps) == ["pascalpart-parts"] and data.extra_labels("pascalpart-parts")[:].max() > 0
    cfg = ProbeConfig(store=extract.store, model="tiny-vit", train_split="train", split="val", objects=("patch",),
                      rules=("hyperplane",), embeddings=("keys", "tokens"))
    run_probe(cfg, progress=False)
    results = Results(cfg.results)
    seen = {r["category"] for r in results.rows("SELECT category FROM direction_probes UNION ALL "
                                                "SELECT category FROM direction_skipped")}
    assert seen == {"pascalpart-objects", "pascalpart-parts"}
    names = {r["concept_name"] for r in results.rows("SELECT concept_name FROM direction_probes WHERE "
                                                     "category = 'pascalpart-parts' UNION ALL SELECT concept_name "
                                                     "FROM direction_skipped WHERE category = 'pascalpart-parts'")}
    assert "person:head" in names


def test_the_masks_of_figure_d4_hold_both_rules(planted, planted_store):
    _, cfg, _ = planted
    maps = Results(cfg.results).maps()
    from rep_pipeline.storage_schemas.results import direction_masks

    path = direction_masks("synthetic", "val", "m", "synthetic", "keys", 1)
    attrs = maps.attrs(path)
    assert attrs["cosine_embedding"] == "queries" and 1 <= len(attrs["concepts"]) <= 3
    hyper, cosine = maps.read(path, "decisions"), maps.read(path, "cosine_decisions")
    assert hyper.shape == cosine.shape == (len(attrs["concepts"]), planted_store.grid, planted_store.grid)
    assert maps.read(path, "truth").shape == (len(attrs["concepts"]), planted_store.size, planted_store.size)
