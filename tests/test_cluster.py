"""The cluster stage on real stores, a real local Ray instance and real Parquet files."""
import shutil

import duckdb
import numpy as np
import pytest

from rep_pipeline.pipeline.config import ClusterConfig, ExtractConfig
from rep_pipeline.pipeline.errors import ConfigError, FingerprintMismatchError, NonFiniteFeaturesError, StoreError
from rep_pipeline.pipeline.backend import get_backend
from rep_pipeline.pipeline.store import FeatureStore, validate_store
from rep_pipeline.pipeline.streaming import FeatureStream
from rep_pipeline.stages.cluster import ClusterWorker, is_done, plan_codebooks, run_cluster
from rep_pipeline.stages.extract import run_extract

FAST = dict(steps=30, init_batches=3, batch_images=4, log_every=10, max_iter=20)


@pytest.fixture(scope="module")
def extracted(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    cfg = ExtractConfig(model="tiny-vit", weights="random", store=root / "base.zarr", layers=(1, 3),
                        embeddings=("keys", "tokens"), chunk_images=4,
                        dataset_options={"sizes": {"train": 12, "val": 4}})
    run_extract(cfg, progress=False)
    return root / "base.zarr"


@pytest.fixture
def store(extracted, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(extracted, path)
    return path


def _cfg(store, **kw):
    return ClusterConfig(store=store, model="tiny-vit", train_split="train", **{**FAST, **kw})


def test_trains_every_codebook_writes_centroids_and_curves(store):
    cfg = _cfg(store, k=(3, 5), methods=("online", "lloyd"))
    result = run_cluster(cfg, progress=False)
    assert len(result.trained) == 2 * 2 * 2 * 2 and result.reused == 0  # emb x layer x K x method
    group = FeatureStore(store).model_split("tiny-vit", "synthetic", "train")
    assert group.codebook_names() == ["lloyd-k3-s0", "lloyd-k5-s0", "online-k3-s0", "online-k5-s0"]
    book = group.codebook("online", 5, 0)
    cents = book.centroids("keys", 3)
    assert cents.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(cents, axis=1), 1.0, atol=1e-5)
    assert validate_store(store) == []
    curves = duckdb.sql(f"""
        SELECT method, k, embedding, layer, count(*) AS n, min(step) AS first, max(step) AS last,
               arg_min(loss, step) AS loss0, arg_max(loss, step) AS loss1, any_value(codebook_fingerprint) AS fp
        FROM read_parquet('{cfg.results}/training_curves/**/*.parquet', hive_partitioning=true)
        GROUP BY ALL ORDER BY ALL""").fetchall()
    assert len(curves) == 16
    for method, k, emb, layer, n, first, last, loss0, loss1, fp in curves:
        assert first == 1 and fp
        if method == "online":
            assert (n, last) == (4, 30)  # steps 1, 10, 20, 30
        assert loss1 <= loss0 + 1e-6, (method, k, emb, layer)


def test_finished_codebooks_are_reused_and_force_retrains(store):
    cfg = _cfg(store, k=(3,), embeddings=("keys",))
    assert not is_done(cfg)
    first = run_cluster(cfg, progress=False)
    assert is_done(cfg) and not is_done(cfg.replace(force=True)) and not is_done(cfg.replace(lr=1e-2))
    assert not is_done(cfg.replace(k=(3, 4))) and not is_done(cfg.replace(embeddings=("keys", "tokens")))
    before = FeatureStore(store).model_split("tiny-vit", "synthetic", "train").codebook("online", 3, 0).centroids("keys", 1)
    again = run_cluster(cfg, progress=False)
    assert len(first.trained) == 2 and (len(again.trained), again.reused) == (0, 2)
    forced = run_cluster(_cfg(store, k=(3,), embeddings=("keys",), force=True), progress=False)
    assert len(forced.trained) == 2
    after = FeatureStore(store).model_split("tiny-vit", "synthetic", "train").codebook("online", 3, 0).centroids("keys", 1)
    np.testing.assert_array_equal(before, after)  # seeded: the retrained codebook is the same
    with pytest.raises(FingerprintMismatchError, match="hyperparameters"):
        run_cluster(_cfg(store, k=(3,), embeddings=("keys",), lr=1e-2), progress=False)


def test_interrupted_run_writes_nothing_half_trained_and_resumes(store):
    def interrupt(done):
        if done > 0:
            raise KeyboardInterrupt

    cfg = _cfg(store, k=(4,), steps=1500)  # long enough for the driver's first progress poll
    with pytest.raises(KeyboardInterrupt):
        run_cluster(cfg, progress=False, on_progress=interrupt)
    book = FeatureStore(store).model_split("tiny-vit", "synthetic", "train").codebook("online", 4, 0)
    assert not any(book.is_done(e, l) for e in ("keys", "tokens") for l in (1, 3))
    result = run_cluster(cfg, progress=False)
    assert len(result.trained) == 4 and all(book.is_done(e, l) for e in ("keys", "tokens") for l in (1, 3))


def test_streaming_from_disk_equals_training_from_the_memory_cache(store):
    plan_cfg = _cfg(store, k=(3, 4), methods=("online", "lloyd"))
    dataset, plans, _ = plan_codebooks(plan_cfg)
    cached = ClusterWorker(plan_cfg, "tiny-vit", dataset, plans)
    group = FeatureStore(store).model_split("tiny-vit", "synthetic", "train")
    be = get_backend("numpy")
    keys = [p.key for p in plans]
    from_disk = FeatureStream(group, keys, be, cache_bytes=0)
    in_memory = FeatureStream(group, keys, be, cache_bytes=2**30)
    assert not from_disk.checked and in_memory.checked  # the cache is checked for NaN/inf once, at load
    for batch in (4, 5):  # 5: batches that straddle two read windows
        for (i1, a1), (i2, a2), _ in zip(from_disk.shuffled(batch, 0), in_memory.shuffled(batch, 0), range(7)):
            assert len(i1) == batch
            np.testing.assert_array_equal(i1, i2)
            for key in keys:
                np.testing.assert_array_equal(a1[key], a2[key])
    seen = np.concatenate([i for (i, _), _ in zip(from_disk.shuffled(4, 0), range(3))])
    assert sorted(seen.tolist()) == list(range(12))  # an epoch visits every image once
    trained = cached.run()
    assert len(trained) == 16


def test_groups_trained_on_threads_equal_one_thread(store, tmp_path):
    """The worker's threads (one per (embedding, layer) group, one BLAS thread each) change
    the speed, not the codebooks."""
    other = tmp_path / "other.zarr"
    shutil.copytree(store, other)
    books = []
    for path, threads in ((store, 1), (other, 2)):
        cfg = _cfg(path, k=(3, 5), methods=("online", "lloyd"), results=path.parent / f"results-{threads}")
        dataset, plans, _ = plan_codebooks(cfg)
        worker = ClusterWorker(cfg, "tiny-vit", dataset, plans, threads=threads)
        assert worker.threads == threads
        worker.run()
        books.append(FeatureStore(path).model_split("tiny-vit", "synthetic", "train"))
    for method in ("online", "lloyd"):
        for k in (3, 5):
            for emb in ("keys", "tokens"):
                for layer in (1, 3):
                    np.testing.assert_allclose(books[1].codebook(method, k, 0).centroids(emb, layer),
                                               books[0].codebook(method, k, 0).centroids(emb, layer), atol=1e-5)


def test_bad_requests_get_clear_errors(store):
    with pytest.raises(ConfigError, match="larger than the 4800 patch vectors"):
        run_cluster(_cfg(store, k=(5000,)), progress=False)
    with pytest.raises(StoreError, match="no features of model 'tiny-vit' on split 'test'"):
        run_cluster(ClusterConfig(store=store, model="tiny-vit", train_split="test"), progress=False)
    with pytest.raises(StoreError, match=r"captured layers: \[1, 3\]"):
        run_cluster(_cfg(store, layers=(2,)), progress=False)
    with pytest.raises(StoreError, match="captured: keys, tokens"):
        run_cluster(_cfg(store, embeddings=("values",)), progress=False)


def test_non_finite_features_are_named(store):
    group = FeatureStore(store, mode="a").model_split("tiny-vit", "synthetic", "train")
    group.group["keys"][1, 6, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteFeaturesError, match=r"keys layer 3 .*\[6\]"):
        run_cluster(_cfg(store, k=(3,), embeddings=("keys",), layers=(3,)), progress=False)


def test_unfinished_extract_is_refused(store):
    group = FeatureStore(store, mode="a").model_split("tiny-vit", "synthetic", "train")
    group.group.attrs["finished"] = False
    with pytest.raises(StoreError, match="not finished"):
        run_cluster(_cfg(store, k=(3,)), progress=False)


def test_cli_cluster(store):
    from typer.testing import CliRunner

    from rep_pipeline.cli.app import app

    res = CliRunner().invoke(app, ["cluster", "--store", str(store), "--model", "tiny-vit", "--train-split", "train",
                                   "--k", "3,4", "--method", "lloyd", "--layers", "3", "--embeddings", "tokens",
                                   "--init-batches", "2", "--batch-images", "4", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "trained 2 codebooks" in res.output
    bad = CliRunner().invoke(app, ["cluster", "--store", str(store), "--model", "nope", "--train-split", "train"])
    assert bad.exit_code == 2 and "no features of model 'nope'" in bad.output


def test_an_interrupted_force_keeps_the_finished_codebooks(store):
    """``--force`` trains replacements beside the finished codebooks; Ctrl-C before they are
    complete leaves the old ones finished and readable, and a later run swaps them in."""
    cfg = _cfg(store, k=(3,), embeddings=("keys",))
    run_cluster(cfg, progress=False)
    group = FeatureStore(store).model_split("tiny-vit", "synthetic", "train")
    before = {layer: group.codebook("online", 3, 0).centroids("keys", layer) for layer in (1, 3)}

    def interrupt(done):
        if done > 0:
            raise KeyboardInterrupt

    forced = cfg.replace(force=True, steps=1500)
    with pytest.raises(KeyboardInterrupt):
        run_cluster(forced, progress=False, on_progress=interrupt)
    group = FeatureStore(store).model_split("tiny-vit", "synthetic", "train")
    assert group.codebook_names() == ["online-k3-s0"] and is_done(cfg)
    for layer in (1, 3):
        np.testing.assert_array_equal(group.codebook("online", 3, 0).centroids("keys", layer), before[layer])
    assert validate_store(store) == []
    result = run_cluster(forced, progress=False)
    assert len(result.trained) == 2
    group = FeatureStore(store).model_split("tiny-vit", "synthetic", "train")
    book = group.codebook("online", 3, 0)
    assert book.attrs["hyperparameters"]["steps"] == 1500 and all(book.is_done("keys", layer) for layer in (1, 3))
    assert sorted(p.name for p in (store / "models/tiny-vit/synthetic/train/codebooks").iterdir()) == [
        "online-k3-s0", "zarr.json"]


def test_force_on_some_embeddings_keeps_the_others(store):
    cfg = _cfg(store, k=(3,), methods=("lloyd",))
    run_cluster(cfg, progress=False)
    book = FeatureStore(store).model_split("tiny-vit", "synthetic", "train").codebook("lloyd", 3, 0)
    tokens = {layer: book.centroids("tokens", layer) for layer in (1, 3)}
    run_cluster(cfg.replace(force=True, embeddings=("keys",), layers=(3,)), progress=False)
    book = FeatureStore(store).model_split("tiny-vit", "synthetic", "train").codebook("lloyd", 3, 0)
    assert all(book.is_done(e, layer) for e in ("keys", "tokens") for layer in (1, 3))
    for layer in (1, 3):
        np.testing.assert_array_equal(book.centroids("tokens", layer), tokens[layer])
    assert is_done(cfg)
