"""The stages, one room (subpackage) each, in pipeline order.

Every room exposes ``run_<name>(cfg, *, address=None, progress=True) -> result`` (the result
has ``summary()`` lines) and ``is_done(cfg) -> bool``, which answers from what the stage
itself writes, reading only. ``STAGES`` lists them with their config class: the CLI builds
one command per entry, its flags from the config's fields; ``rep-pipeline run`` asks each
entry to run or skip. A room is imported when its stage is first used, so the CLI answers
``--help`` and option errors without loading torch or Ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from types import ModuleType
from typing import Any

from rep_pipeline.pipeline.config import (ClusterConfig, CorrespondConfig, EvaluateConfig, ExplainConfig, ExtractConfig,
                                          Options,
                                          ProbeConfig, ReportConfig)


@dataclass(frozen=True)
class Stage:
    name: str
    config: type[Options]
    help: str

    def room(self) -> ModuleType:
        return import_module(f"{__name__}.{self.name}")

    def run(self, cfg: Options, **kwargs: Any) -> Any:
        return getattr(self.room(), f"run_{self.name}")(cfg, **kwargs)

    def is_done(self, cfg: Options) -> bool:
        return bool(self.room().is_done(cfg))


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("extract", ExtractConfig, "Capture q, k, v, tokens, class tokens and attention statistics into a "
                                    "feature store."),
    Stage("cluster", ClusterConfig, "Fit cosine k-means codebooks for every (layer, embedding, K, method) in one "
                                    "pass."),
    Stage("evaluate", EvaluateConfig, "Segment the test split with every finished codebook; write Parquet tables "
                                      "and maps."),
    Stage("probe", ProbeConfig, "Fit hyperplane and cosine templates per token type and score them on the test "
                                "split (direction probes)."),
    Stage("correspond", CorrespondConfig, "Transfer keypoints between images by nearest upsampled features; write "
                                          "PCK per layer and embedding (zero-shot correspondence)."),
    Stage("explain", ExplainConfig, "ULTra: explanation maps of latent tokens, per-image concepts and segments, "
                                    "their scores and the perturbation test."),
    Stage("report", ReportConfig, "Draw the visual protocol and write a self-contained index.html."),
)}

__all__ = ["STAGES", "Stage"]
