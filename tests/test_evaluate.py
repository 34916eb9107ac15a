"""The evaluate stage: segmentation exactness, an independent recomputation of the tables,
the README's queries, and the real COCO-Stuff sample end to end."""
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rep_pipeline.pipeline import metrics
from rep_pipeline.pipeline.config import ClusterConfig, EvaluateConfig, ExtractConfig
from rep_pipeline.pipeline.errors import QueryError, StoreError
from rep_pipeline.pipeline.results import Results
from rep_pipeline.pipeline.store import FeatureStore
from rep_pipeline.stages.cluster import run_cluster
from rep_pipeline.stages.evaluate import is_done, run_evaluate, segment
from rep_pipeline.stages.extract import run_extract
from rep_pipeline.storage_schemas import results as layout

INTERVALS = {"segmentation": ("miou", "pixel_accuracy", "nmi", "nmi_bias_aware"),
             "ground_truth": ("nmi", "nmi_bias_aware"), "attention_mi": ("mean",), "best_layers": ("miou", "nmi")}


def run_query(results, sql):
    return Results(results).query(sql)


def test_score_upsampling_equals_upsampling_features_first(array_backend):
    backend = array_backend
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2, 6, 6, 32)).astype(np.float32) + 0.5
    cents = rng.standard_normal((9, 32)).astype(np.float32)
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    (fast,) = segment(backend, backend.asarray(feats), backend.asarray(cents), (9,), 40)
    up = torch.nn.functional.interpolate(torch.from_numpy(feats).permute(0, 3, 1, 2), size=40, mode="bilinear",
                                         align_corners=False).permute(0, 2, 3, 1).double().numpy()
    cos = (up / np.linalg.norm(up, axis=-1, keepdims=True)) @ cents.T.astype(np.float64)
    slow = cos.argmax(-1)
    agree = backend.to_numpy(fast) == slow
    top2 = np.sort(cos, -1)[..., -2:]
    assert agree.mean() > 0.999 and (top2[..., 1] - top2[..., 0])[~agree].max(initial=0) < 1e-5


@pytest.fixture(scope="module")
def evaluated(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    store = root / "s.zarr"
    run_extract(ExtractConfig(model="tiny-dinov2-reg", weights="random", store=store, layers=(1, 3),
                              embeddings=("keys", "tokens"), chunk_images=4,
                              dataset_options={"sizes": {"train": 16, "val": 6}}), progress=False)
    run_cluster(ClusterConfig(store=store, model="tiny-dinov2-reg", train_split="train", k=(6, 9),
                              methods=("lloyd",), init_batches=2, batch_images=4), progress=False)
    cfg = EvaluateConfig(store=store, split="val", results=root / "results", n_examples=3)
    return cfg, run_evaluate(cfg, progress=False)


def test_tables_equal_an_independent_recomputation(evaluated):
    cfg, result = evaluated
    assert result.settings == 2 * 2 * 2 and result.models == ["tiny-dinov2-reg"]
    store = FeatureStore(cfg.store)
    group = store.model_split("tiny-dinov2-reg", "synthetic", "val")
    labels = store.dataset_split("synthetic", "val").labels[:]
    cents = store.model_split("tiny-dinov2-reg", "synthetic", "train").codebook("lloyd", 9, 0).centroids("tokens", 3)
    feats = torch.from_numpy(group.features("tokens")[1].astype(np.float32)).permute(0, 3, 1, 2)
    up = F.interpolate(feats, size=320, mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    clusters = (up @ cents.T).argmax(-1)                           # cos argmax: the norm does not matter
    conf = metrics.confusion_matrix(clusters, labels, 9, 6, 255)
    mapping = metrics.hungarian_match(conf)[0]
    scores = metrics.segmentation_scores(conf, mapping)
    pe = metrics.positional_effect(metrics.position_class_counts(mapping[clusters], 6, 255))
    row = run_query(cfg.results, "SELECT miou, pixel_accuracy, mi, nmi, n_images FROM segmentation "
                                 "WHERE embedding = 'tokens' AND layer = 3 AND k = 9").fetchall()
    assert len(row) == 1
    miou, acc, mi, nmi, n = row[0]
    assert n == 6 and miou == pytest.approx(scores.miou, abs=2e-3) and acc == pytest.approx(scores.pixel_accuracy, abs=2e-3)
    assert mi == pytest.approx(pe.mi, abs=2e-3) and nmi == pytest.approx(pe.nmi, abs=2e-3)
    pixels = run_query(cfg.results, "SELECT sum(pixels) FROM confusion WHERE embedding = 'tokens' AND layer = 3 "
                                    "AND k = 9").fetchall()[0][0]
    assert pixels == int((labels != 255).sum())
    assert run_query(cfg.results, "SELECT count(*), sum(hungarian::INT) FROM matching WHERE k = 9 AND layer = 3 "
                                  "AND embedding = 'tokens'").fetchall()[0] == (9, 6)
    maps = Results(cfg.results).maps()
    path = "synthetic/val/tiny-dinov2-reg/train/lloyd-k9-s0/tokens/layer_3"
    examples = maps.read(path, "examples")
    assert examples.shape == (3, 320, 320)
    assert (np.mean(examples == mapping[clusters[:3]]) > 0.999)
    raw = maps.read(path, "clusters")  # the raw cluster ids beside the matched classes (12.3)
    assert raw.dtype == np.uint8 and np.mean(raw == clusters[:3]) > 0.999
    assert maps.read(path, "counts").sum() == 6 * 320 * 320
    gt = maps.read("synthetic/val/ground_truth", "aggregate")
    assert gt.shape == (320, 320, 3) and gt.dtype == np.uint8


def test_every_row_carries_fingerprints_and_ground_truth_is_reported(evaluated):
    cfg, _ = evaluated
    for table in ("segmentation", "per_class_iou", "confusion", "matching"):
        empty = run_query(cfg.results, f"SELECT count(*) FROM {table} WHERE store_fingerprint = '' "
                                       f"OR codebook_fingerprint IS NULL").fetchall()[0][0]
        assert empty == 0, table
    gt = run_query(cfg.results, "SELECT mi, nmi, nmi_bias_aware, n_images FROM ground_truth").fetchall()
    assert len(gt) == 1 and gt[0][3] == 6 and 0 < gt[0][2] < gt[0][1] <= 1  # layout-biased scenes
    sources = run_query(cfg.results, "SELECT source, count(*) FROM classwise_mi GROUP BY 1 ORDER BY 1").fetchall()
    assert sources == [("ground_truth", 6), ("prediction", 8 * 6)]
    heads = run_query(cfg.results, "SELECT count(*), min(n_images) FROM attention_mi").fetchall()[0]
    assert heads == (2 * 4, 6)
    best = run_query(cfg.results, "SELECT count(*) FROM best_layers").fetchall()[0][0]
    assert best == 2 * 2  # embedding x K


def test_every_headline_number_has_an_interval_that_holds_it(evaluated):
    """The 95 % bootstrap intervals (docs/uncertainty.md): present, ordered, around the estimate
    (the plug-in NMI's draws carry a larger bias than the estimate, so only ordered), and the
    correlations carry n and a p-value."""
    cfg, _ = evaluated
    results = Results(cfg.results)
    for table, measures in INTERVALS.items():
        rows = results.rows(f"SELECT * FROM {table}")
        assert rows, table
        for row in rows:
            for m in measures:
                lo, hi = row[f"{m}_lo"], row[f"{m}_hi"]
                assert lo is not None and hi is not None and lo <= hi, (table, m, row)
                if m != "nmi":
                    assert lo - 1e-12 <= row[m] <= hi + 1e-12, (table, m, row)
    corr = results.rows("SELECT rho, p_value, n_pairs FROM correlations WHERE rho IS NOT NULL")
    assert corr and all(0 <= r["p_value"] <= 1 and r["n_pairs"] >= 3 for r in corr)
    assert not results.rows("SELECT * FROM correlations WHERE (rho IS NULL) <> (p_value IS NULL)")


def test_intervals_are_deterministic_given_the_seed_and_narrow_with_more_images(evaluated):
    """The segmentation intervals of one real setting: the same draws give the same interval,
    another seed another; the same images four times over (24 images) give narrower ones."""
    from rep_pipeline.pipeline.backend import get_backend
    from rep_pipeline.pipeline.segscore import ClusterMapScores, score_intervals

    cfg, _ = evaluated
    store = FeatureStore(cfg.store)
    group = store.model_split("tiny-dinov2-reg", "synthetic", "val")
    labels = store.dataset_split("synthetic", "val").labels[:].astype(np.int64)
    cents = store.model_split("tiny-dinov2-reg", "synthetic", "train").codebook("lloyd", 6, 0).centroids("tokens", 3)
    be = get_backend("numpy")
    (clusters,) = segment(be, group.features("tokens")[1].astype(np.float32), cents, (6,), 320)

    def intervals(copies, seed):
        acc = ClusterMapScores(6, 6, 320, be, seed=seed)
        for _ in range(copies):
            dy, dx = metrics.random_shifts(len(labels), 320, 0)
            acc.add(clusters, labels, (dy, dx), 255)
        conf = acc.confusion
        mapping = metrics.hungarian_match(conf)[0]
        onehot = np.eye(6, dtype=np.int64)[mapping]
        pos = metrics.positional_scores(acc.counts @ onehot, acc.null_counts @ onehot)
        return score_intervals(acc, mapping, metrics.segmentation_scores(conf, mapping), pos)

    once = intervals(1, 0)
    row = Results(cfg.results).rows("SELECT * FROM segmentation WHERE embedding = 'tokens' AND layer = 3 AND k = 6")[0]
    assert once == pytest.approx({key: row[key] for key in once})  # what the stage wrote, seed cfg.seed = 0
    assert intervals(1, 0) == once and intervals(1, 1) != once
    more = intervals(4, 0)
    for m in ("miou", "pixel_accuracy", "nmi_bias_aware"):
        assert more[f"{m}_hi"] - more[f"{m}_lo"] < once[f"{m}_hi"] - once[f"{m}_lo"], m


def test_readme_queries_run(evaluated):
    from pathlib import Path

    cfg, _ = evaluated
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- queries -->")[1].split("<!-- /queries -->")[0].split("```sql")[1].split("```")[0]
    queries = [q.strip() for q in block.split(";") if q.strip()]
    assert len(queries) == 6
    for sql in queries:
        assert run_query(cfg.results, sql).fetchall(), sql


def test_query_is_read_only_and_errors_are_clear(evaluated, tmp_path):
    cfg, _ = evaluated
    with pytest.raises(QueryError, match="refused"):
        run_query(cfg.results, "COPY (SELECT 1) TO 'x.csv'")
    with pytest.raises(StoreError, match="does not exist"):
        run_query(tmp_path / "nothing", "SELECT 1")
    with pytest.raises(QueryError, match=r"(?s)nope.*tables: .*segmentation"):  # binding
        run_query(cfg.results, "SELECT nope FROM segmentation")
    with pytest.raises(QueryError, match="syntax"):  # parsing
        run_query(cfg.results, "SELEC miou FROM segmentation")
    with pytest.raises(QueryError, match="Could not convert"):  # only when the rows are computed
        Results(cfg.results).fetch_rows("SELECT embedding::INTEGER FROM segmentation", 5)
    with pytest.raises(StoreError, match="no model features on split 'test'"):
        run_evaluate(EvaluateConfig(store=cfg.store, split="test", results=tmp_path), progress=False)


def test_evaluate_without_codebooks_says_to_cluster_first(evaluated, tmp_path):
    cfg, _ = evaluated
    store = tmp_path / "bare.zarr"
    shutil.copytree(cfg.store, store)
    shutil.rmtree(store / "models/tiny-dinov2-reg/synthetic/train/codebooks")
    with pytest.raises(StoreError, match="rep-pipeline cluster"):
        run_evaluate(EvaluateConfig(store=store, split="val", results=tmp_path / "r"), progress=False)


def test_cli_evaluate_and_query(evaluated, tmp_path):
    from typer.testing import CliRunner

    from rep_pipeline.cli.app import app

    cfg, _ = evaluated
    res = CliRunner().invoke(app, ["evaluate", "--store", str(cfg.store), "--split", "val", "--results",
                                   str(tmp_path / "r"), "--no-progress"])
    assert res.exit_code == 0, res.output
    out = CliRunner().invoke(app, ["query", str(tmp_path / "r"), "SELECT count(*) * 1000 + 7 AS n FROM segmentation"])
    assert out.exit_code == 0 and "8007" in out.output, out.output  # 8 settings
    columns = "embedding, layer, k, miou_lo, miou_hi, nmi_lo, nmi_hi, nmi_bias_aware_lo, nmi_bias_aware_hi"
    again = Results(tmp_path / "r").rows(f"SELECT {columns} FROM segmentation ORDER BY ALL")
    assert again == Results(cfg.results).rows(f"SELECT {columns} FROM segmentation ORDER BY ALL")  # same seed


def test_is_done_once_every_codebook_has_rows(evaluated, tmp_path):
    cfg, _ = evaluated
    assert is_done(cfg)
    assert not is_done(cfg.replace(results=tmp_path / "empty"))
    assert not is_done(cfg.replace(seed=1)) and not is_done(cfg.replace(n_examples=2))
    store = tmp_path / "more.zarr"
    shutil.copytree(cfg.store, store)
    results = tmp_path / "results"
    shutil.copytree(cfg.results, results)
    moved = cfg.replace(store=store, results=results)
    assert is_done(moved)
    run_cluster(ClusterConfig(store=store, model="tiny-dinov2-reg", train_split="train", k=(4,),
                              methods=("lloyd",), init_batches=2, batch_images=4, layers=(3,),
                              embeddings=("keys",)), progress=False)
    assert not is_done(moved)  # a new codebook has no rows yet
    run_evaluate(moved, progress=False)
    assert is_done(moved)


@pytest.mark.realdata
def test_cocostuff_sample_end_to_end(ray_local, shared_datasets, tmp_path):
    store = tmp_path / "coco.zarr"
    run_extract(ExtractConfig(model="tiny-vit", weights="random", store=store, dataset="cocostuff27",
                              data_root=shared_datasets / "cocostuff-sample", limit=16, layers=(3,),
                              embeddings=("tokens",), chunk_images=8), progress=False)
    run_cluster(ClusterConfig(store=store, model="tiny-vit", train_split="train2017", methods=("lloyd",),
                              init_batches=2, batch_images=8), progress=False)
    cfg = EvaluateConfig(store=store, split="val2017", results=tmp_path / "results")
    result = run_evaluate(cfg, progress=False)
    assert result.settings == 1
    row = run_query(cfg.results, "SELECT k, miou, pixel_accuracy, nmi, n_images FROM segmentation").fetchall()[0]
    assert row[0] == 27 and 0 < row[1] <= 1 and 0 < row[2] <= 1 and row[4] == 16
    seg = Results(cfg.results).rows("SELECT * FROM segmentation")[0]
    truth = Results(cfg.results).rows("SELECT * FROM ground_truth")[0]
    for r, measures in ((seg, ("miou", "pixel_accuracy", "nmi_bias_aware")), (truth, ("nmi_bias_aware",))):
        for m in measures:  # real photos: each interval holds its estimate
            assert r[f"{m}_lo"] <= r[m] <= r[f"{m}_hi"], (m, r)
    per_class = run_query(cfg.results, "SELECT count(*) FROM per_class_iou").fetchall()[0][0]
    assert per_class == 27


def test_a_test_split_of_a_single_class_gives_nan_nmi_not_an_error(hand_made_store, tmp_path):
    store = hand_made_store(tmp_path / "one.zarr", classes=["only"])
    cfg = EvaluateConfig(store=store, split="val", results=tmp_path / "r", n_examples=2)
    result = run_evaluate(cfg, progress=False)
    assert result.settings == 1
    results = Results(cfg.results)
    gt = results.rows("SELECT mi, nmi, nmi_bias_aware FROM ground_truth")[0]
    assert gt["mi"] == pytest.approx(0.0, abs=1e-12) and np.isnan(gt["nmi"]) and np.isnan(gt["nmi_bias_aware"])
    seg = results.rows("SELECT miou, pixel_accuracy, nmi, nmi_bias_aware FROM segmentation")[0]
    assert seg["pixel_accuracy"] == pytest.approx(1.0) and np.isnan(seg["nmi"]) and np.isnan(seg["nmi_bias_aware"])
    assert is_done(cfg)
