"""Shared fixtures: a real local Ray instance, tiny real timm models, the shared samples, and
the builders several test files use (hand-made stores and results, a killed driver, the
documented job). Test files never import each other, nor this file: they ask for a fixture."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rep_pipeline.pipeline.registry import list_models

# one tiny, randomly initialised model per architecture path (the registry's "tiny-*" entries)
TINY_MODELS = tuple(spec.alias for spec in list_models("tiny-*"))


def pytest_collection_modifyitems(items):
    """A test on the real local Ray instance belongs to the integration tier
    (``pytest -m "not integration"`` is the fast tier); so does one on the real S3 server."""
    for item in items:
        if {"ray_local", "s3_server"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS) on 127.0.0.1 for the whole session."""
    from s3server import start

    server = start(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """The S3 server, configured the standard way (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``...
    in the environment, nothing else), and ``url(*parts)`` under a prefix of this test's own."""
    import uuid

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    prefix = f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")
    return type("S3Prefix", (), {"server": s3_server, "env": s3_server.env,
                                 "url": staticmethod(lambda *parts: s3_server.url(prefix, *parts))})()


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The real-data samples (``../shared/datasets``), found through REP_PIPELINE_DATASETS."""
    root = os.environ.get("REP_PIPELINE_DATASETS")
    if not root or not Path(root).is_dir():
        pytest.skip("REP_PIPELINE_DATASETS does not point at the shared dataset samples")
    return Path(root)


@pytest.fixture
def offline_hub(monkeypatch):
    """The hub client believes it is offline, as it would be with no network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def backend(request):
    """Every engine test runs on NumPy, and on CuPy where a GPU is present."""
    from rep_pipeline.pipeline.backend import get_backend, gpu_available

    if request.param == "cupy" and not gpu_available():
        pytest.skip("no CUDA GPU with CuPy here")
    return get_backend(request.param)


ARRAY_BACKENDS = ["numpy", pytest.param("strict", marks=pytest.mark.strict), "torch",
                  pytest.param("cupy", marks=pytest.mark.gpu)]


def make_array_backend(name):
    """A ``Backend`` by name; ``strict``: array-api-strict on its extra device ``device1``, where
    an implicit host crossing, a mixed-device operation or a non-standard call is an error."""
    from rep_pipeline.pipeline.backend import Backend, get_backend, gpu_available

    if name == "strict":
        import array_api_strict

        return Backend("strict", array_api_strict, None, array_api_strict.Device("device1"))
    if name == "cupy" and not gpu_available():
        pytest.skip("no CUDA GPU with CuPy here")
    return get_backend(name)


@pytest.fixture
def strict_backend():
    """array-api-strict on its extra device ``device1`` alone."""
    return make_array_backend("strict")


@pytest.fixture(params=ARRAY_BACKENDS)
def array_backend(request):
    """Array-API code on NumPy, array-api-strict (device1), torch, and CuPy where a GPU is present."""
    return make_array_backend(request.param)


@pytest.fixture
def hand_made_store():
    """``make(path, classes=...)``: a small finished feature store with one codebook, written
    through the store API alone (no model, no Ray)."""
    return _hand_made_store


def _hand_made_store(path, classes=("a", "b"), n=4, size=32, grid=2, dim=8):
    """A finished feature store written through the store API alone (no model, no Ray): labels
    all class 0, features of two planted directions, one Lloyd codebook of K = 2 on ``train``."""
    from rep_pipeline.pipeline.store import FeatureStore

    store = FeatureStore(path, mode="a")
    rng = np.random.default_rng(0)
    model_fp = {"model": "m", "timm_name": "-", "family": "-", "weights_source": "random:seed=0",
                "weights_sha256": "-", "image_size": size, "input_size": size, "patch_size": size // grid,
                "grid": grid, "num_prefix_tokens": 1, "embed_dim": dim, "num_heads": 1, "depth": 1,
                "mean": [0, 0, 0], "std": [1, 1, 1], "layers": [0], "embeddings": ["keys"], "rope": "before",
                "last_norm": "after"}
    for split in ("train", "val"):
        fp = {"dataset": "synthetic", "split": split, "n_images": n, "image_size": size, "classes": list(classes),
              "ignore_index": 255, "image_ids_sha256": split, "options": {}}
        data = store.require_dataset_split(fp, [f"{split}{i}" for i in range(n)], np.zeros((len(classes), 3), np.uint8), 2)
        group = store.require_model_split("m", data, model_fp)
        for chunk in range(2):
            data.write_labels(chunk, np.zeros((2, size, size), np.uint8), np.zeros((2, size, size, 3), np.uint8))
            keys = rng.standard_normal((1, 2, grid, grid, dim)).astype(np.float16)
            group.write_chunk(chunk, {"keys": keys, "class_tokens": np.zeros((1, 2, dim), np.float16),
                                      "attention_mi": np.ones((1, 2, 1), np.float32),
                                      "attention_sum": np.full((1, grid**2, grid**2), 2 / grid**2, np.float32)})
        group.finalize()
    train = store.model_split("m", "synthetic", "train")
    train.require_codebook("lloyd", 2, 0, {"tol": 0.0}).write("keys", 0, np.eye(2, dim, dtype=np.float32))
    return path


@pytest.fixture
def tiny_model(request):
    """Each tiny model of the registry in turn (a test taking it runs once per architecture path)."""
    return request.param


def pytest_generate_tests(metafunc):
    if "tiny_model" in metafunc.fixturenames:
        metafunc.parametrize("tiny_model", TINY_MODELS, indirect=True)


@pytest.fixture
def kill_a_driver_midway(ray_local):
    """``kill(store, marker)``: an extract driver of tiny-vit on ``store`` (a path or a URL),
    SIGKILLed with chunks in flight; it returns once Ray has ended the driver's actors."""
    return lambda store, marker: _kill_a_driver_midway(ray_local, store, marker)


_HANGING_DRIVER = """
import json, sys, time
from pathlib import Path
from rep_pipeline.pipeline.config import ExtractConfig
from rep_pipeline.stages.extract import run_extract

store, marker, address, options = sys.argv[1:5]
seen = []

def hang(split, chunk, stats):
    seen.append(chunk)
    if len(seen) == 2:  # stop here until killed, chunks still in flight on the actors
        Path(marker).touch()
        time.sleep(600)

cfg = ExtractConfig(model="tiny-vit", weights="random", store=store, chunk_images=2, splits=("train",),
                    dataset_options=json.loads(options))  # store: a path or an object-storage URL
run_extract(cfg, address=address, progress=False, on_chunk_done=hang)
"""


def _kill_a_driver_midway(ray_local, store, marker) -> None:
    """Run ``_HANGING_DRIVER`` on ``store`` and SIGKILL it with chunks in flight; return once
    Ray has ended its actors."""
    options = json.dumps({"sizes": {"train": 10, "val": 6}})
    driver = subprocess.Popen([sys.executable, "-c", _HANGING_DRIVER, str(store), str(marker),
                               ray_local.get_runtime_context().gcs_address, options])
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert driver.poll() is None, "the driver exited before it was killed"
            assert time.monotonic() < deadline, "the driver never got two chunks done"
            time.sleep(0.1)
    finally:
        driver.send_signal(signal.SIGKILL)  # no handler, no cleanup: as the OOM killer or a lost node
        driver.wait()
    deadline = time.monotonic() + 60  # Ray ends the dead driver's actors and frees their CPUs
    while ray_local.available_resources().get("CPU", 0) < 2:
        assert time.monotonic() < deadline, "the killed driver's actors were not ended"
        time.sleep(0.2)


@pytest.fixture
def documented_job() -> list[str]:
    """ray_cluster.yaml's `ray job submit ... -- rep-pipeline run ...` line, as argv."""
    return _documented_job()


LAUNCHER = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


def _documented_job() -> list[str]:
    """The header's `ray job submit ... -- rep-pipeline run ...` line, as argv (one line, so the
    test that runs it, tests/test_job_submit.py, runs what the file says)."""
    lines = [line[1:].strip() for line in LAUNCHER.read_text().splitlines() if line.startswith("#   ray job submit ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


@pytest.fixture(scope="session")
def planted_store():
    """``make(path, n=32, chunk=8, seed=0, version=2)``: a feature store of model ``m`` whose
    class-0 patches share a direction in ``keys`` alone (the probe stage's planted structure);
    ``make.classes``, ``make.grid``, ``make.size``, ``make.dim`` are its shape."""
    return _planted_store


@pytest.fixture(scope="session")
def probe_config():
    """``cfg(folder, **options)``: a ``ProbeConfig`` of the planted store ``folder/s.zarr``
    (model ``m``, train on ``train``, test on ``val``) into ``folder/results``."""
    return _probe_config


CLASSES = ("sky", "tree", "road")  # the planted store's classes and shape
GRID, SIZE, DIM = 8, 64, 16


def _planted_store(path, n=32, chunk=8, seed=0, version=2):
    """Patches of class 0 share a direction in ``keys`` only (``queries`` are noise alone); each
    image holds two of the three classes, so the cosine rule has images without each. With
    ``version=1``, as schema 1 wrote it: class tokens of ``tokens`` only, no ``class_embeddings``."""
    from rep_pipeline.pipeline.store import FeatureStore

    store = FeatureStore(path, mode="a")
    rng = np.random.default_rng(seed)
    direction = np.zeros(DIM, np.float32)
    direction[0] = 4.0
    model_fp = {"model": "m", "timm_name": "-", "family": "-", "weights_source": "random:seed=0",
                "weights_sha256": "-", "image_size": SIZE, "input_size": SIZE, "patch_size": SIZE // GRID,
                "grid": GRID, "num_prefix_tokens": 1, "embed_dim": DIM, "num_heads": 1, "depth": 2,
                "mean": [0, 0, 0], "std": [1, 1, 1], "layers": [0, 1], "embeddings": ["queries", "keys"],
                "rope": "before", "last_norm": "after"}
    if version == 2:
        model_fp["class_embeddings"] = ["queries", "keys"]
    for split in ("train", "val"):
        fp = {"dataset": "synthetic", "split": split, "n_images": n, "image_size": SIZE, "classes": list(CLASSES),
              "ignore_index": 255, "image_ids_sha256": split, "options": {}}
        data = store.require_dataset_split(fp, [f"{split}{i}" for i in range(n)], np.zeros((3, 3), np.uint8), chunk)
        group = store.require_model_split("m", data, model_fp)
        for c in range(n // chunk):
            pair = np.stack([rng.permutation(3)[:2] for _ in range(chunk)])              # two classes per image
            patch = pair[np.arange(chunk)[:, None], rng.integers(0, 2, (chunk, GRID * GRID))]  # (chunk, P)
            labels = np.kron(patch.reshape(chunk, GRID, GRID), np.ones((SIZE // GRID, SIZE // GRID))).astype(np.uint8)
            data.write_labels(c, labels, np.zeros((chunk, SIZE, SIZE, 3), np.uint8))
            noise = rng.standard_normal((2, 2, chunk, GRID * GRID, DIM)).astype(np.float32)
            keys = noise[0] + (patch == 0)[None, :, :, None] * direction
            arrays = {"queries": noise[1].reshape(2, chunk, GRID, GRID, DIM).astype(np.float16),
                      "keys": keys.reshape(2, chunk, GRID, GRID, DIM).astype(np.float16),
                      **({"class_queries": rng.standard_normal((2, chunk, DIM)).astype(np.float16),
                          "class_keys": rng.standard_normal((2, chunk, DIM)).astype(np.float16)} if version == 2 else
                         {"class_tokens": rng.standard_normal((2, chunk, DIM)).astype(np.float16)}),
                      "attention_mi": np.ones((2, chunk, 1), np.float32),
                      "attention_sum": np.full((2, GRID**2, GRID**2), 1 / GRID**2, np.float32)}
            group.write_chunk(c, arrays)
        group.finalize()
    if version == 1:
        import zarr

        root = zarr.open_group(str(path), mode="a")
        root.attrs["rep_pipeline"] = {**root.attrs["rep_pipeline"], "schema_version": 1}
    return path


_planted_store.classes, _planted_store.grid, _planted_store.size, _planted_store.dim = CLASSES, GRID, SIZE, DIM


def _probe_config(tmp_path, **kw):
    from rep_pipeline.pipeline.config import ProbeConfig

    kw.setdefault("shots", (1, 5, 50))  # 50: more support images than the split has, skipped
    kw.setdefault("trials", 3)
    kw.setdefault("query_images", 4)
    return ProbeConfig(store=tmp_path / "s.zarr", model="m", train_split="train", split="val",
                       results=tmp_path / "results", **kw)


@pytest.fixture(scope="session")
def hand_made_direction_results():
    """``make(path, layers)``: a results folder of direction tables alone (two models, two
    categories, both rules) and figure d4's maps, written through ``Results``."""
    return _hand_made_direction_results


_SETTING = {"dataset": "synthetic", "split": "val", "train_split": "train", "store_fingerprint": "s",
            "train_store_fingerprint": "t"}


def _summary(model, emb, layer, obj, rule, k, category, f1):
    std = None if rule == "hyperplane" else 0.02
    return {**_SETTING, "model": model, "embedding": emb, "layer": layer, "object": obj, "rule": rule, "k_shot": k,
            "category": category, "n_concepts": 3, "accuracy": f1, "accuracy_std": std, "precision": f1,
            "precision_std": std, "recall": f1, "recall_std": std, "f1": f1, "f1_std": std}


def _probe_row(model, emb, layer, category, concept, f1):
    return {**_SETTING, "model": model, "embedding": emb, "layer": layer, "object": "patch", "rule": "hyperplane",
            "k_shot": None, "trial": 0, "concept_id": concept, "concept_name": f"c{concept}", "category": category,
            "n_pos": 1, "n_neg": 1, "tp": 1, "fp": 0, "tn": 1, "fn": 0, "accuracy": f1, "precision": f1, "recall": f1,
            "f1": f1, "threshold": 0.0, "seed": 0}


def _hand_made_direction_results(path, layers):
    """Direction tables of two models (keys best for 'dino', queries for 'mae'), two categories,
    both rules, and figure d4's maps at the last block; nothing of segmentation."""
    from rep_pipeline.pipeline.results import Results
    from rep_pipeline.storage_schemas import results as layout

    results = Results(path, mode="a")
    for model, best in (("dino", "keys"), ("mae", "queries")):
        summary, probes = [], []
        for emb in ("tokens", "keys", "queries"):
            for layer in layers:
                f1 = (0.8 if emb == best else 0.5) + 0.01 * layer
                for obj in ("patch", "class_token"):
                    for rule, k in (("hyperplane", None), ("cosine", 1), ("cosine", 5)):
                        summary += [_summary(model, emb, layer, obj, rule, k, c, f1 - (k == 1) * 0.2)
                                    for c in ("all", "stuff", "things")]
                probes += [_probe_row(model, emb, layer, c, i, 0.25 * i) for c in ("stuff", "things") for i in range(3)]
        results.write_table("direction_summary", summary, dataset="synthetic", model=model, part="all")
        results.write_table("direction_probes", probes, dataset="synthetic", model=model, part="all")
        maps = results.maps()
        for category in ("stuff", "things"):
            truth = np.zeros((3, 8, 8), np.uint8)
            truth[:, :4] = 1
            maps.write(f"{layout.direction_maps('synthetic', 'val', model)}/{category}/keys-l{max(layers)}",
                       attrs={"concepts": [0, 1, 2], "names": ["c0", "c1", "c2"], "image_index": [0, 1, 2],
                              "embedding": "keys", "layer": max(layers)},
                       images=np.zeros((3, 8, 8, 3), np.uint8), truth=truth, decisions=np.eye(2, dtype=np.uint8)[None]
                       .repeat(3, 0))
    return path
