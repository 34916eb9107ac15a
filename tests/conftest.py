"""Shared fixtures: a real local Ray instance, tiny real timm models, the shared samples."""
from __future__ import annotations

import os
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
