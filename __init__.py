"""rep-pipeline: how self-supervised Vision Transformers organise their embeddings.

The import root. Its subpackages are the folders beside this file (pyproject's package-dir
installs them under ``rep_pipeline``): ``cli`` -> ``stages`` -> ``pipeline`` ->
``storage_schemas``; docs/architecture.md is the map. The public entry points below are
loaded on first use, so ``import rep_pipeline`` stays cheap (no torch, no Ray).
"""
from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("rep-pipeline")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+source"

_PUBLIC = {
    "run_extract": "stages.extract", "run_cluster": "stages.cluster", "run_evaluate": "stages.evaluate",
    "run_report": "stages.report", "run_all": "cli.run", "RunConfig": "cli.run",
    "ExtractConfig": "pipeline.config", "ClusterConfig": "pipeline.config", "EvaluateConfig": "pipeline.config",
    "ReportConfig": "pipeline.config", "Comparison": "pipeline.config",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'rep_pipeline' has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_PUBLIC[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
