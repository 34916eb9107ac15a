"""``rep-pipeline run CONFIG``: extract -> cluster -> evaluate -> report from one YAML file,
skipping what is already done. The YAML format is documented in ``configs/demo.yaml``."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from . import config
from .config import ClusterConfig, Comparison, EvaluateConfig, ExtractConfig, ReportConfig
from .errors import ConfigError

_TOP = {"title", "store", "results", "report", "dataset", "models", "extract", "cluster", "comparisons"}
_DATASET = {"name", "root", "options", "train_split", "test_split", "limit"}
_MODEL = {"model", "weights", "model_key", "seed"}
_EXTRACT = {"layers", "embeddings", "chunk_images", "image_size", "rope", "last_norm", "workers", "device"}
_CLUSTER = {"k", "methods", "steps", "lr", "batch_images", "init_batches", "tol", "max_iter", "seed", "workers"}
_COMPARISON = {"compare", "embedding", "layer", "models", "k", "method", "title"}


def _check_keys(where: str, mapping: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {', '.join(sorted(allowed))}")


@dataclass(frozen=True)
class RunConfig:
    title: str
    extracts: tuple[ExtractConfig, ...]
    clusters: tuple[ClusterConfig, ...]
    evaluate: EvaluateConfig
    report: ReportConfig

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"run config {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"run config {path} is not valid YAML: {exc}") from exc
        return cls.from_dict(raw, base=Path.cwd(), where=str(path))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], base: Path, where: str = "config") -> "RunConfig":
        _check_keys(where, raw, _TOP)
        for key in ("store", "dataset", "models"):
            if key not in raw:
                raise ConfigError(f"{where}: '{key}' is required")
        store = base / raw["store"]
        results = base / raw.get("results", Path(raw["store"]).parent / "results")
        ds = dict(raw["dataset"])
        _check_keys(f"{where}: dataset", ds, _DATASET)
        if "name" not in ds or "train_split" not in ds or "test_split" not in ds:
            raise ConfigError(f"{where}: dataset needs name, train_split and test_split")
        ex = dict(raw.get("extract") or {})
        _check_keys(f"{where}: extract", ex, _EXTRACT)
        cl = dict(raw.get("cluster") or {})
        _check_keys(f"{where}: cluster", cl, _CLUSTER)
        extracts, clusters = [], []
        for i, m in enumerate(raw["models"]):
            m = {"model": m} if isinstance(m, str) else dict(m)
            _check_keys(f"{where}: models[{i}]", m, _MODEL)
            e = ExtractConfig(
                model=m["model"], weights=m.get("weights", "pretrained"), model_key=m.get("model_key"),
                seed=m.get("seed", config.RANDOM_WEIGHTS_SEED), store=store, dataset=ds["name"],
                data_root=(base / ds["root"]) if ds.get("root") else None,
                splits=(ds["train_split"], ds["test_split"]), limit=ds.get("limit"),
                dataset_options=ds.get("options") or {}, layers=config.parse_layers(ex.get("layers")),
                embeddings=tuple(ex.get("embeddings", config.EMBEDDINGS)),
                **{k: ex[k] for k in ("chunk_images", "image_size", "rope", "last_norm", "workers", "device") if k in ex})
            extracts.append(e)
            clusters.append(ClusterConfig(
                store=store, model=e.model_key or _key(e), train_split=ds["train_split"], dataset=ds["name"],
                ks=config.parse_ks(cl["k"]) if "k" in cl else None, methods=tuple(cl.get("methods", ("online",))),
                results=results, **{k: cl[k] for k in ("steps", "lr", "batch_images", "init_batches", "tol",
                                                         "max_iter", "seed", "workers") if k in cl}))
        comps = []
        for i, c in enumerate(raw.get("comparisons") or [{}]):
            _check_keys(f"{where}: comparisons[{i}]", c, _COMPARISON)
            c = dict(c)
            if c.get("models") is not None:
                c["models"] = tuple(c["models"])
            comps.append(Comparison(**c))
        return cls(
            title=raw.get("title", Path(where).stem),
            extracts=tuple(extracts), clusters=tuple(clusters),
            evaluate=EvaluateConfig(store=store, split=ds["test_split"], results=results, dataset=ds["name"]),
            report=ReportConfig(results=results, out=base / raw.get("report", Path(results).parent / "report"),
                                comparisons=tuple(comps), dataset=ds["name"], split=ds["test_split"],
                                title=raw.get("title")),
        )


def _key(cfg: ExtractConfig) -> str:
    from stages.extract import model_key

    return model_key(cfg)


@dataclass
class RunResult:
    stages: list[tuple[str, str, str]] = field(default_factory=list)  # (stage, what, "done" | "skipped")
    report: Path | None = None
    seconds: float = 0.0


def _extract_is_done(cfg: ExtractConfig) -> bool:
    """The store already holds this model's finished features for every split, captured with
    the same model, weights source, layers and embeddings (the weights hash is checked by a
    real extract run; this shortcut avoids loading the model only to find nothing to do)."""
    from .store import FeatureStore

    if not cfg.store.exists():
        return False
    store = FeatureStore(cfg.store)
    key = _key(cfg)
    for split in cfg.splits or ():
        if (key, cfg.dataset, split) not in store.model_splits():
            return False
        attrs = store.model_split(key, cfg.dataset, split).attrs
        expected_source = {"random": f"random:seed={cfg.seed}", "pretrained": None}.get(cfg.weights)
        if not attrs.get("finished") or list(attrs["embeddings"]) != list(cfg.embeddings):
            return False
        if cfg.layers is not None and list(attrs["layers"]) != list(cfg.layers):
            return False
        if expected_source and attrs["weights_source"] != expected_source:
            return False
        if cfg.weights not in ("random", "pretrained") and attrs["weights_source"] != f"file:{Path(cfg.weights).name}":
            return False
    return True


def _evaluation_is_current(cfg: EvaluateConfig) -> bool:
    """Every finished codebook of the store already has segmentation rows with its fingerprints."""
    from .query import connect
    from .store import FeatureStore

    if not (cfg.results / "segmentation").exists():
        return False
    store = FeatureStore(cfg.store)
    groups = store.model_splits()
    wanted = set()
    for m, d, s in groups:
        if s == cfg.split or (cfg.dataset and d != cfg.dataset) or (m, d, cfg.split) not in groups:
            continue
        test_fp = store.model_split(m, d, cfg.split).fingerprint_hash
        wanted |= {(m, book.fingerprint_hash, test_fp) for book in store.model_split(m, d, s).codebooks()}
    have = set(connect(cfg.results).sql(
        f"SELECT DISTINCT model, codebook_fingerprint, store_fingerprint FROM segmentation "
        f"WHERE split = '{cfg.split}'").fetchall())
    return bool(wanted) and wanted <= have


def run_all(cfg: RunConfig, *, address: str | None = None, progress: bool = True,
            say: Callable[[str], None] = print) -> RunResult:
    """Run every stage of ``cfg`` in order; each skips work that is already done."""
    from stages.cluster import run_cluster
    from stages.evaluate import run_evaluate
    from stages.extract import run_extract
    from stages.report import run_report

    t0 = time.perf_counter()
    result = RunResult()
    for e in cfg.extracts:
        if _extract_is_done(e):
            result.stages.append(("extract", _key(e), "skipped"))
        else:
            run_extract(e, address=address, progress=progress)
            result.stages.append(("extract", _key(e), "done"))
        say(f"extract {_key(e)}: {result.stages[-1][2]}")
    for c in cfg.clusters:
        r = run_cluster(c, address=address, progress=progress)
        result.stages.append(("cluster", c.model, "done" if r.trained else "skipped"))
        say(f"cluster {c.model}: {result.stages[-1][2]} ({len(r.trained)} trained, {r.reused} reused)")
    if _evaluation_is_current(cfg.evaluate):
        result.stages.append(("evaluate", cfg.evaluate.split, "skipped"))
    else:
        run_evaluate(cfg.evaluate, progress=progress)
        result.stages.append(("evaluate", cfg.evaluate.split, "done"))
    say(f"evaluate {cfg.evaluate.split}: {result.stages[-1][2]}")
    report = run_report(cfg.report)
    result.stages.append(("report", str(report.index), "done"))
    result.report = report.index
    result.seconds = time.perf_counter() - t0
    return result
