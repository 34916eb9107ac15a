"""``rep-pipeline run CONFIG``: every stage from one YAML file, skipping what is already done.

The YAML format is documented in ``configs/demo.yaml``. Its sections hold stage options by
their names in ``pipeline/config.py`` (``extract:`` any ``ExtractConfig`` option, ``cluster:``
any ``ClusterConfig`` option, ...), except those the run sets itself from the top-level keys:
the store, results and report paths, the dataset and its splits, and each model's entry. The
whole file is validated before any work starts: every key, every value, every model named in
``comparisons``, and every path that must exist; errors name the file and the key.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, get_args

import yaml
from pydantic import Field

from rep_pipeline.pipeline.config import (ClusterConfig, Comparison, CorrespondConfig, Embedding, EvaluateConfig,
                                          ExplainConfig, ExtractConfig, Options, ProbeConfig, ReportConfig)
from rep_pipeline.pipeline.datasets import DATASETS, build_dataset
from rep_pipeline.pipeline.errors import ConfigError, RepPipelineError
from rep_pipeline.pipeline.location import as_location, is_url
from rep_pipeline.pipeline.registry import get_spec, stand_in, store_key
from rep_pipeline.pipeline.store import fingerprint_hash
from rep_pipeline.stages import STAGES
from rep_pipeline.storage_schemas.results import RUN_CONFIG, beside, default_results

# run-level keys -> the stage options they fill
DATASET_KEYS = {"name": "dataset", "root": "data_root", "options": "dataset_options", "limit": "limit"}
MODEL_KEYS = ("model", "weights", "model_key", "seed")
MODEL_OVERRIDES = ("last_norm", "layers")  # extract options a models entry may set for itself (12.1: before/after)
SET_BY_RUN = {
    "extract": {"store", "dataset", "data_root", "dataset_options", "limit", "splits", "storage_options", *MODEL_KEYS},
    "cluster": {"store", "model", "train_split", "dataset", "results", "storage_options"},
    "evaluate": {"store", "split", "results", "dataset", "storage_options"},
    "probe": {"store", "model", "train_split", "split", "results", "dataset", "storage_options"},
    "correspond": {"store", "model", "split", "results", "storage_options"},
    "explain": {"store", "model", "split", "train_split", "dataset", "data_root", "weights", "seed", "results",
                "storage_options"},
}


class _Dataset(Options):
    """The dataset section: its splits, and the extract options of ``DATASET_KEYS`` under
    shorter names (validated by ``ExtractConfig``, where they are declared)."""

    name: Any
    root: Any = None
    options: Any = None
    limit: Any = None
    train_split: str = Field(description="Split the codebooks are fitted on.")
    test_split: str = Field(description="Split they are evaluated on.")


class _KeypointDataset(Options):
    """The correspond section's dataset: a keypoint dataset, extracted for every model too."""

    name: Any
    root: Any = None
    options: Any = None
    limit: Any = None
    split: str = Field(description="Split whose keypoint pairs are transferred.")


class _Sensitivity(Options):
    """The k-means sensitivity study (PROTOCOL.md 12.2): one model's codebooks at one (embedding,
    layer, K) retrained with other PCA initialisations and batch sizes, several seeds each.
    The first value of each list is the baseline (the run's own cluster settings where they
    agree); every other value is varied one at a time."""

    model: str = Field(description="A model of the run (its store key).")
    embedding: str = Field("tokens", description="Embedding (A33: tokens).")
    layer: Any = Field("best", description="'best' (highest mIoU at this K, online) or a block number.")
    k: int | None = Field(None, ge=2, description="K; default the run's first.")
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    batch_images: list[int] = Field([24, 32, 48], min_length=1, description="Images per batch.")
    init_intervals: list[int] = Field([1, 2, 4], min_length=1,
                                      description="PCA from every n-th of the first init_batches x n batches.")


class _RunFile(Options):
    """The top level of a run config (the stage sections are checked against the stages)."""

    title: str | None = None
    store: str
    results: str | None = None
    report: str | None = None
    storage_options: dict[str, Any] = {}
    dataset: _Dataset
    models: list[Any] = Field(min_length=1)
    extract: dict[str, Any] = {}
    cluster: dict[str, Any] = {}
    evaluate: dict[str, Any] = {}
    probe: dict[str, Any] | None = None  # direction probes of every model, when present
    correspond: dict[str, Any] | None = None  # keypoint transfer of every model on its own dataset, when present
    explain: dict[str, Any] | None = None  # ULTra maps, concepts and scores of every model, when present
    sensitivity: _Sensitivity | None = None  # the k-means sensitivity study (12.2), when present
    comparisons: list[dict[str, Any]] = [{}]
    figure: str | None = None  # the paper figure a preset reproduces (configs/paper/)


@dataclass(frozen=True)
class SensitivityStudy:
    """The codebooks of PROTOCOL.md 12.2 for one model: trained after the main evaluation (a
    'best' layer is read from it), then scored by evaluate into table ``kmeans_sensitivity``.
    Every (setting, seed) but the main codebook's own is a variant codebook beside it, named
    with a short hash of the hyperparameters it changes."""

    base: ClusterConfig
    evaluate: EvaluateConfig
    embedding: str
    layer: int | str
    k: int
    seeds: tuple[int, ...]
    batch_images: tuple[int, ...]
    init_intervals: tuple[int, ...]

    @property
    def model(self) -> str:
        return self.base.model

    def settings(self) -> list[dict[str, int]]:
        """The baseline, then each other batch size, then each other PCA interval."""
        b0, n0 = self.batch_images[0], self.init_intervals[0]
        return ([{"batch_images": b0, "init_interval": n0}] + [{"batch_images": b, "init_interval": n0}
                                                               for b in self.batch_images[1:]]
                + [{"batch_images": b0, "init_interval": n} for n in self.init_intervals[1:]])

    def resolve_layer(self) -> int | None:
        """The block studied: the configured one, or the best (mIoU) of the main codebook at
        this K; None while the main evaluation has not run."""
        if isinstance(self.layer, int):
            return self.layer
        from rep_pipeline.pipeline.results import Results
        try:
            rows = Results(self.evaluate.results).rows(
                "SELECT best_layer FROM best_layers WHERE model = ? AND embedding = ? AND k = ? AND method = 'online' "
                "AND seed = ? AND train_split = ?",
                [self.model, self.embedding, self.k, self.base.seed, self.base.train_split], dataset=self.base.dataset,
                split=self.evaluate.split)
        except RepPipelineError:
            return None
        return int(rows[0]["best_layer"]) if rows else None

    def clusters(self, layer: int) -> list[ClusterConfig]:
        out = []
        for setting in self.settings():
            changes = {key: v for key, v in setting.items() if v != getattr(self.base, key)}
            for seed in self.seeds:
                if not changes and seed == self.base.seed:
                    continue  # the main codebook itself
                out.append(self.base.replace(**setting, seed=seed, k=(self.k,), methods=("online",),
                                             layers=(layer,), embeddings=(self.embedding,),
                                             variant=fingerprint_hash(changes)[:8]))
        return out

    def is_done(self, _cfg: Any = None) -> bool:
        layer = self.resolve_layer()
        return (layer is not None and all(STAGES["cluster"].is_done(c) for c in self.clusters(layer))
                and STAGES["evaluate"].is_done(self.evaluate))

    def run(self, _cfg: Any = None, *, address: str | None = None, progress: bool = True) -> Any:
        layer = self.resolve_layer()
        if layer is None:
            raise ConfigError(f"sensitivity: no evaluated {self.embedding} codebook of {self.model} with k={self.k} "
                              f"(online, seed {self.base.seed}) to take the best layer from")
        for cluster in self.clusters(layer):
            STAGES["cluster"].run(cluster, address=address, progress=progress)
        return STAGES["evaluate"].run(self.evaluate, address=address, progress=progress)


@dataclass(frozen=True)
class RunConfig:
    """The validated stage configs of one run, in the order they run."""

    title: str
    extracts: tuple[ExtractConfig, ...]
    clusters: tuple[ClusterConfig, ...]
    evaluate: EvaluateConfig
    report: ReportConfig
    probes: tuple[ProbeConfig, ...] = ()
    keypoint_extracts: tuple[ExtractConfig, ...] = ()  # the models on the correspond section's dataset
    corresponds: tuple[CorrespondConfig, ...] = ()
    explains: tuple[ExplainConfig, ...] = ()
    sensitivity: SensitivityStudy | None = None
    text: str = ""  # the config as run (overrides applied), kept beside the results

    @classmethod
    def from_yaml(cls, path: str | Path, storage_options: Mapping[str, Any] | None = None,
                  overrides: "Overrides | None" = None) -> "RunConfig":
        """The run config of a one-document file (``load_runs`` reads several)."""
        runs = load_runs(path, storage_options, overrides)
        if len(runs) != 1:
            raise ConfigError(f"run config {path} holds {len(runs)} runs; read it with load_runs")
        return runs[0]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], base: Path, where: str = "config",
                  storage_options: Mapping[str, Any] | None = None) -> "RunConfig":
        top: _RunFile = _RunFile.parse(raw, where)  # type: ignore[assignment]
        for section in ("extract", "cluster", "evaluate"):
            if not isinstance(getattr(top, section), Mapping):
                raise ConfigError(f"{where}: {section}: expected a mapping of options")
        located = lambda p: p if is_url(p) else base / p  # noqa: E731  (URLs as they are, paths from the file's base)
        store = located(top.store)
        results = located(top.results or str(default_results(top.store)))
        report_out = located(top.report or str(beside(results, "report")))
        storage = {"storage_options": {**top.storage_options, **dict(storage_options or {})}}
        ds = top.dataset
        for section in ("extract", "cluster", "evaluate", "probe", "correspond", "explain"):
            owned = sorted(SET_BY_RUN[section] & set(getattr(top, section) or {}))
            if owned:
                raise ConfigError(f"{where}: {section}.{owned[0]}: set by the run itself (from the top-level keys); "
                                  f"remove it here")
        data = {DATASET_KEYS[k]: v for k, v in ds.model_dump().items() if k in DATASET_KEYS and v is not None}
        if "data_root" in data:
            data["data_root"] = located(str(data["data_root"]))
        extracts, clusters, keypoint_extracts = [], [], []
        for i, entry in enumerate(top.models):
            entry = {"model": entry} if isinstance(entry, str) else entry
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{where}: models.{i}: expected a model name or a mapping, got {entry!r}")
            unknown = sorted(set(entry) - set(MODEL_KEYS) - set(MODEL_OVERRIDES))
            if unknown:
                raise ConfigError(f"{where}: models.{i}.{unknown[0]}: unknown key; allowed: "
                                  f"{', '.join(MODEL_KEYS + MODEL_OVERRIDES)}")
            e = ExtractConfig.parse({**top.extract, **data, **entry, "store": store, **storage,
                                     "splits": (ds.train_split, ds.test_split)}, f"{where}: models.{i} / extract")
            extracts.append(e)
            if top.correspond is not None:  # the same features of the keypoint dataset
                kp = _keypoint_dataset(top.correspond, where)
                kp_data = {DATASET_KEYS[k]: v for k, v in kp.model_dump().items() if k in DATASET_KEYS and v is not None}
                if "data_root" in kp_data:
                    kp_data["data_root"] = located(str(kp_data["data_root"]))
                keypoint_extracts.append(ExtractConfig.parse(
                    {**top.extract, **kp_data, **entry, "store": store, **storage, "splits": (kp.split,)},
                    f"{where}: models.{i} / correspond.dataset"))
            clusters.append(ClusterConfig.parse({**top.cluster, **storage, "store": store,
                                                 "model": _store_key(e, where, i),
                                                 "train_split": ds.train_split, "dataset": ds.name,
                                                 "results": results}, f"{where}: cluster"))
        evaluate = EvaluateConfig.parse({**top.evaluate, **storage, "store": store, "split": ds.test_split, "results": results,
                                         "dataset": ds.name}, f"{where}: evaluate")
        probes = tuple(ProbeConfig.parse({**top.probe, **storage, "store": store, "model": c.model,
                                          "train_split": ds.train_split, "split": ds.test_split, "dataset": ds.name,
                                          "results": results}, f"{where}: probe")
                       for c in clusters) if top.probe is not None else ()
        corresponds = ()
        if top.correspond is not None:
            kp = _keypoint_dataset(top.correspond, where)
            options = {k: v for k, v in top.correspond.items() if k != "dataset"}
            corresponds = tuple(CorrespondConfig.parse({**options, **storage, "store": store, "model": c.model,
                                                        "split": kp.split, "dataset": kp.name, "results": results},
                                                       f"{where}: correspond") for c in clusters)
        explains = tuple(ExplainConfig.parse({**top.explain, **storage, "store": store, "model": c.model,
                                              "split": ds.test_split, "train_split": ds.train_split,
                                              "dataset": ds.name, "results": results, "weights": e.weights,
                                              "seed": e.seed, **({"data_root": e.data_root} if e.data_root else {})},
                                             f"{where}: explain")
                         for e, c in zip(extracts, clusters)) if top.explain is not None else ()
        sensitivity = None
        if top.sensitivity is not None:
            st = top.sensitivity
            base = next((c for c in clusters if c.model == st.model), None)
            if base is None:
                raise ConfigError(f"{where}: sensitivity.model: {st.model!r} is not a model of this run "
                                  f"(models: {', '.join(c.model for c in clusters)})")
            if st.layer != "best" and not isinstance(st.layer, int):
                raise ConfigError(f"{where}: sensitivity.layer: 'best' or a block number, got {st.layer!r}")
            if st.embedding not in get_args(Embedding):
                raise ConfigError(f"{where}: sensitivity.embedding: unknown embedding {st.embedding!r}")
            k = st.k or (base.k[0] if base.k else None)
            if k is None:
                raise ConfigError(f"{where}: sensitivity.k: required when cluster.k is not set")
            for key, values in (("batch_images", st.batch_images), ("init_intervals", st.init_intervals)):
                if min(values) < 1 or len(set(values)) != len(values):
                    raise ConfigError(f"{where}: sensitivity.{key}: distinct positive integers, got {values}")
            sensitivity = SensitivityStudy(base, evaluate, st.embedding, st.layer, k, tuple(st.seeds),
                                           tuple(st.batch_images), tuple(st.init_intervals))
        comparisons = tuple(Comparison.parse(c, f"{where}: comparisons.{i}") for i, c in enumerate(top.comparisons))
        report = ReportConfig.parse({"results": results, "out": report_out, **storage,
                                     "comparisons": comparisons, "dataset": ds.name, "split": ds.test_split,
                                     "models": [c.model for c in clusters],  # a shared results folder: the run's
                                     "title": f"{top.title or Path(where).stem} ({top.figure})" if top.figure
                                     else top.title}, where)
        cfg = cls(title=top.title or Path(where).stem, extracts=tuple(extracts), clusters=tuple(clusters),
                  evaluate=evaluate, report=report, probes=probes, keypoint_extracts=tuple(keypoint_extracts),
                  corresponds=corresponds, explains=explains, sensitivity=sensitivity,
                  text=yaml.safe_dump(dict(raw), sort_keys=False))
        cfg.check(where)
        return cfg

    def check(self, where: str) -> None:
        """What can be known before any work: every comparison names a model of the run, the
        dataset exists and its root does, every weights file does."""
        keys = [c.model for c in self.clusters]
        for i, comp in enumerate(self.report.comparisons):
            for model in comp.models or ():
                if model not in keys:
                    raise ConfigError(f"{where}: comparisons.{i}.models: {model!r} is not a model of this run "
                                      f"(models: {', '.join(keys)})")
        for i, e in enumerate(self.extracts + self.keypoint_extracts):
            if e.dataset not in DATASETS:
                raise ConfigError(f"{where}: dataset.name: unknown dataset {e.dataset!r}; available: "
                                  f"{', '.join(sorted(DATASETS))}")
            if e.data_root is not None and not e.data_root.is_dir():
                raise ConfigError(f"{where}: dataset.root: {e.data_root} is not a directory")
            try:
                dataset = build_dataset(e.dataset, e.data_root, **e.dataset_options)
            except ConfigError as exc:
                raise ConfigError(f"{where}: dataset.options: {exc}") from None
            if dataset.needs_root and e.data_root is None:
                raise ConfigError(f"{where}: dataset.root: {e.dataset} needs one ({dataset.root_layout})")
            if e.weights not in ("pretrained", "random") and not Path(e.weights).is_file():
                raise ConfigError(f"{where}: models.{i}.weights: file {e.weights} does not exist")
        if len(set(keys)) != len(keys):
            raise ConfigError(f"{where}: models: two entries write the same store group ({', '.join(keys)}); "
                              f"give one a model_key")

    def plan(self) -> list[tuple[str, str, Options]]:
        """(stage name, what it works on, its config) in the order they run."""
        return [*(("extract", c.model, e) for e, c in zip(self.extracts, self.clusters)),
                *(("extract", f"{c.model} on {e.dataset}", e) for e, c in zip(self.keypoint_extracts, self.clusters)),
                *(("cluster", c.model, c) for c in self.clusters),
                ("evaluate", self.evaluate.split, self.evaluate),
                *((("sensitivity", self.sensitivity.model, self.sensitivity),) if self.sensitivity else ()),
                *(("probe", p.model, p) for p in self.probes),
                *(("correspond", c.model, c) for c in self.corresponds),
                *(("explain", x.model, x) for x in self.explains),
                ("report", str(self.report.out), self.report)]


@dataclass(frozen=True)
class Overrides:
    """What the command line changes in a run config before it is validated: ``--set
    section.key=value`` (value read as YAML), ``--data-root NAME=PATH`` (the root of dataset
    NAME wherever the file names it, the correspond section's dataset included) and
    ``--stand-in tiny`` (every model replaced by a tiny randomly initialised model of its
    architecture path, under its own store key: a preset's whole run in minutes, without weights)."""

    values: tuple[tuple[str, Any], ...] = ()
    data_roots: tuple[tuple[str, str], ...] = ()
    stand_in: str | None = None

    def apply(self, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
        out = copy.deepcopy(dict(raw))
        for key, value in self.values:
            node, parts = out, key.split(".")
            for depth, part in enumerate(parts[:-1]):
                if node.get(part) is None:
                    if depth or part not in ("extract", "cluster", "evaluate"):  # never turn a stage on
                        raise ConfigError(f"{where}: --set {key}: the config has no {'.'.join(parts[:depth + 1])}")
                    node[part] = {}
                if not isinstance(node[part], dict):
                    raise ConfigError(f"{where}: --set {key}: {part} is not a section")
                node = node[part]
            node[parts[-1]] = value
        for name, root in self.data_roots:
            for section in (out.get("dataset"), (out.get("correspond") or {}).get("dataset")):
                if isinstance(section, dict) and section.get("name") == name:
                    section["root"] = root
        if self.stand_in is not None:
            models = []
            for i, entry in enumerate(out.get("models") or []):
                entry = {"model": entry} if isinstance(entry, str) else dict(entry)
                if "model" not in entry:
                    raise ConfigError(f"{where}: models.{i}: no model")
                try:
                    key = store_key(entry["model"], entry.get("model_key"))
                    entry["model"] = stand_in(entry["model"])
                except RepPipelineError as exc:
                    raise ConfigError(f"{where}: models.{i}.model: {exc}") from None
                entry.update(model_key=key, weights="random")
                models.append(entry)
            out["models"] = models  # comparisons and the sensitivity study name store keys, which stay
        return out


STAND_INS = ("tiny",)


def load_runs(path: str | Path, storage_options: Mapping[str, Any] | None = None,
              overrides: Overrides | None = None) -> list[RunConfig]:
    """Every run of a config file: one per YAML document (a preset may hold several, e.g. one
    per dataset), each validated before any runs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"run config {path} does not exist")
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None] or [{}]
    except yaml.YAMLError as exc:
        raise ConfigError(f"run config {path} is not valid YAML: {exc}") from exc
    runs = []
    for i, raw in enumerate(docs):
        where = str(path) if len(docs) == 1 else f"{path} (document {i + 1})"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"run config {where} must be a mapping of keys, not {type(raw).__name__}")
        if overrides is not None:
            raw = overrides.apply(raw, where)
        runs.append(RunConfig.from_dict(raw, base=Path.cwd(), where=where, storage_options=storage_options))
    return runs


def _keypoint_dataset(section: Mapping[str, Any], where: str) -> _KeypointDataset:
    if not isinstance(section.get("dataset"), Mapping):
        raise ConfigError(f"{where}: correspond.dataset: required, a mapping with name and split (e.g. "
                          f"{{name: spair71k, root: data/SPair-71k, split: test}})")
    return _KeypointDataset.parse(section["dataset"], f"{where}: correspond.dataset")  # type: ignore[return-value]


def _store_key(e: ExtractConfig, where: str, i: int) -> str:
    try:
        get_spec(e.model)
    except RepPipelineError as exc:
        raise ConfigError(f"{where}: models.{i}.model: {exc}") from None
    return store_key(e.model, e.model_key)


@dataclass
class RunResult:
    stages: list[tuple[str, str, str]] = field(default_factory=list)  # (stage, what, "done" | "skipped")
    report: Path | None = None
    seconds: float = 0.0


def run_all(cfg: RunConfig, *, address: str | None = None, progress: bool = True,
            say: Callable[[str], None] = print) -> RunResult:
    """Run every stage of ``cfg`` in order; a stage whose ``is_done`` holds is skipped. The
    config as run is kept beside the results (``run_config.yaml``; the report shows it)."""
    t0 = time.perf_counter()
    result = RunResult()
    for name, label, stage_cfg in cfg.plan():
        stage = stage_cfg if name == "sensitivity" else STAGES[name]
        if name == "report" and cfg.text:
            results = as_location(cfg.evaluate.results, cfg.report.storage_options)
            if results.exists():
                (results / RUN_CONFIG).write_bytes(cfg.text.encode())
        started = time.perf_counter()
        if stage.is_done(stage_cfg):
            result.stages.append((name, label, "skipped"))
        else:
            out = stage.run(stage_cfg, address=address, progress=progress)
            result.stages.append((name, label, "done"))
            if name == "report":
                result.report = out.index
        say(f"{name} {label}: {result.stages[-1][2]} ({time.perf_counter() - started:.1f} s)")
    result.seconds = time.perf_counter() - t0
    return result
