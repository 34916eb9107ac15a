"""Shared fixtures: a real local Ray instance, tiny real timm models, the shared samples."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from rep_pipeline.pipeline.registry import list_models

# one tiny, randomly initialised model per architecture path (the registry's "tiny-*" entries)
TINY_MODELS = tuple(spec.alias for spec in list_models("tiny-*"))


def pytest_collection_modifyitems(items):
    """A test on the real local Ray instance belongs to the integration tier
    (``pytest -m "not integration"`` is the fast tier)."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


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
