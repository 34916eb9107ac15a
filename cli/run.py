"""``rep-pipeline run CONFIG``: every stage from one YAML file, skipping what is already done.

The YAML format is documented in ``configs/demo.yaml``. Its sections hold stage options by
their names in ``pipeline/config.py`` (``extract:`` any ``ExtractConfig`` option, ``cluster:``
any ``ClusterConfig`` option, ...), except those the run sets itself from the top-level keys
(the fields marked ``from_run``: the store, results and report paths, the dataset and its
splits, and each model's entry; ``SET_BY_RUN``). The whole file is validated before any work
starts: every key, every value, every model named in ``comparisons``, and every path that must
exist; errors name the file and the key path as written there (``cluster.k``,
``models[1].weights``), and an unknown key the allowed ones and the closest.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml
from pydantic import Field

from rep_pipeline.pipeline.config import (DATASET_KEYS, ClusterConfig, Comparison, CorrespondConfig, EvaluateConfig,
                                          ExplainConfig, ExtractConfig, KeypointDataset, Options, ProbeConfig,
                                          ReportConfig, RunDataset, SensitivityConfig, unknown_key)
from rep_pipeline.pipeline.datasets import DATASETS, build_dataset
from rep_pipeline.pipeline.errors import ConfigError, RepPipelineError
from rep_pipeline.pipeline.location import as_location, is_url
from rep_pipeline.pipeline.registry import get_spec, stand_in, store_key
from rep_pipeline.pipeline.store import fingerprint_hash
from rep_pipeline.pipeline.yaml_files import load_documents
from rep_pipeline.stages import STAGES
from rep_pipeline.storage_schemas.results import RUN_CONFIG, beside, default_results

MODEL_KEYS = ("model", "weights", "model_key", "seed")  # what a models entry sets (extract options)
MODEL_OVERRIDES = ("last_norm", "layers")  # extract options a models entry may set for itself (12.1: before/after)
SECTIONS = ("extract", "cluster", "evaluate", "probe", "correspond", "explain")  # a stage's options each
# the options of each stage the run fills in itself (the fields marked ``from_run``), not its section
SET_BY_RUN = {name: STAGES[name].config.set_by_run() for name in SECTIONS}
OWN_KEYS = {"correspond": ("dataset",)}  # keys of a section that are no option of its stage: the keypoint dataset


class _RunFile(Options):
    """The top level of a run config (the stage sections are checked against the stages)."""

    title: str | None = None
    store: str
    results: str | None = None
    report: str | None = None
    storage_options: dict[str, Any] = {}
    dataset: dict[str, Any]  # RunDataset
    models: list[Any] = Field(min_length=1)
    extract: dict[str, Any] = {}
    cluster: dict[str, Any] = {}
    evaluate: dict[str, Any] = {}
    probe: dict[str, Any] | None = None  # direction probes of every model, when present
    correspond: dict[str, Any] | None = None  # keypoint transfer of every model on its own dataset, when present
    explain: dict[str, Any] | None = None  # ULTra maps, concepts and scores of every model, when present
    sensitivity: dict[str, Any] | None = None  # SensitivityConfig: the k-means sensitivity study (12.2), when present
    comparisons: list[dict[str, Any]] = [{}]
    figure: str | None = None  # the paper figure a preset reproduces (configs/paper/)
    address: str | None = None  # where the workers run (as --address, which wins): a Ray address, or inline


def _check_section(name: str, section: Mapping[str, Any], where: str) -> None:
    """A stage section names only options of its stage, and none the run fills in itself."""
    config = STAGES[name].config
    own = OWN_KEYS.get(name, ())
    allowed = [*(set(config.model_fields) - SET_BY_RUN[name]), *own]
    lines = [f"{name}.{key}: set by the run itself (from the top-level keys); remove it here"
             if key in SET_BY_RUN[name] else f"{name}.{key}: {unknown_key(key, allowed)}"
             for key in section if key not in allowed]
    if lines:
        raise ConfigError(f"{where}: " + (lines[0] if len(lines) == 1 else "invalid options\n  " + "\n  ".join(lines)))


def _in(section: str) -> Callable[[str], str]:
    """Names a key of ``section`` as the run config writes it: ``cluster.k``."""
    return lambda key: f"{section}.{key}"


@dataclass(frozen=True)
class SensitivityStudy:
    """The codebooks of PROTOCOL.md 12.2 for one model: trained after the main evaluation (a
    'best' layer is read from it), then scored by evaluate into table ``kmeans_sensitivity``.
    Every (setting, seed) but the main codebook's own is a variant codebook beside it, named
    with a short hash of the hyperparameters it changes."""

    options: SensitivityConfig
    base: ClusterConfig
    evaluate: EvaluateConfig
    k: int  # options.k, or the run's first

    @property
    def model(self) -> str:
        return self.base.model

    @property
    def embedding(self) -> str:
        return self.options.embedding

    @property
    def layer(self) -> int | str:
        return self.options.layer

    def settings(self) -> list[dict[str, int]]:
        """The baseline, then each other batch size, then each other PCA interval."""
        return self.options.settings()

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
            for seed in self.options.seeds:
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
    address: str | None = None  # the config's own `address:` (--address wins)

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
        for section in SECTIONS:
            if getattr(top, section) is not None:
                _check_section(section, getattr(top, section), where)
        located = lambda p: p if is_url(p) else base / p  # noqa: E731  (URLs as they are, paths from the file's base)
        store = located(top.store)
        results = located(top.results or str(default_results(top.store)))
        report_out = located(top.report or str(beside(results, "report")))
        storage = {"storage_options": {**top.storage_options, **dict(storage_options or {})}}
        ds = RunDataset.parse(top.dataset, where, _in("dataset"))

        def dataset_options(section: Options, path: str) -> tuple[dict[str, Any], dict[str, str]]:
            """A dataset section's extract options, and where each came from."""
            given = {k: v for k, v in section.model_dump().items() if k in DATASET_KEYS and v is not None}
            if "root" in given:
                given["root"] = located(str(given["root"]))
            return ({DATASET_KEYS[k]: v for k, v in given.items()},
                    {DATASET_KEYS[k]: f"{path}.{k}" for k in given})

        data, data_keys = dataset_options(ds, "dataset")
        extracts, clusters, keypoint_extracts = [], [], []
        kp = _keypoint_dataset(top.correspond, where) if top.correspond is not None else None
        for i, entry in enumerate(top.models):
            entry = {"model": entry} if isinstance(entry, str) else entry
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{where}: models[{i}]: expected a model name or a mapping, got {entry!r}")
            unknown = [k for k in entry if k not in MODEL_KEYS + MODEL_OVERRIDES]
            if unknown:
                raise ConfigError(f"{where}: models[{i}].{unknown[0]}: {unknown_key(unknown[0], MODEL_KEYS + MODEL_OVERRIDES)}")
            origin = {**{k: f"extract.{k}" for k in top.extract}, **data_keys,
                      **{k: f"models[{i}].{k}" for k in entry}}
            e = ExtractConfig.parse({**top.extract, **data, **entry, "store": store, **storage,
                                     "splits": (ds.train_split, ds.test_split)}, where,
                                    lambda k, origin=origin: origin.get(k, f"extract.{k}"))
            extracts.append(e)
            if kp is not None:  # the same features of the keypoint dataset
                kp_data, kp_keys = dataset_options(kp, "correspond.dataset")
                kp_origin = {**origin, **kp_keys}
                keypoint_extracts.append(ExtractConfig.parse(
                    {**top.extract, **kp_data, **entry, "store": store, **storage, "splits": (kp.split,)}, where,
                    lambda k, origin=kp_origin: origin.get(k, f"extract.{k}")))
            clusters.append(ClusterConfig.parse({**top.cluster, **storage, "store": store,
                                                 "model": _store_key(e, where, i),
                                                 "train_split": ds.train_split, "dataset": ds.name,
                                                 "results": results}, where, _in("cluster")))
        evaluate = EvaluateConfig.parse({**top.evaluate, **storage, "store": store, "split": ds.test_split,
                                         "results": results, "dataset": ds.name}, where, _in("evaluate"))
        probes = tuple(ProbeConfig.parse({**top.probe, **storage, "store": store, "model": c.model,
                                          "train_split": ds.train_split, "split": ds.test_split, "dataset": ds.name,
                                          "results": results}, where, _in("probe"))
                       for c in clusters) if top.probe is not None else ()
        corresponds = ()
        if top.correspond is not None and kp is not None:
            options = {k: v for k, v in top.correspond.items() if k not in OWN_KEYS["correspond"]}
            corresponds = tuple(CorrespondConfig.parse({**options, **storage, "store": store, "model": c.model,
                                                        "split": kp.split, "dataset": kp.name, "results": results},
                                                       where, _in("correspond")) for c in clusters)
        explains = tuple(ExplainConfig.parse({**top.explain, **storage, "store": store, "model": c.model,
                                              "split": ds.test_split, "train_split": ds.train_split,
                                              "dataset": ds.name, "results": results, "weights": e.weights,
                                              "seed": e.seed, **({"data_root": e.data_root} if e.data_root else {})},
                                             where, _in("explain"))
                         for e, c in zip(extracts, clusters)) if top.explain is not None else ()
        sensitivity = None
        if top.sensitivity is not None:
            st: SensitivityConfig = SensitivityConfig.parse(top.sensitivity, where, _in("sensitivity"))  # type: ignore
            base_cluster = next((c for c in clusters if c.model == st.model), None)
            if base_cluster is None:
                raise ConfigError(f"{where}: sensitivity.model: {st.model!r} is not a model of this run "
                                  f"(models: {', '.join(c.model for c in clusters)})")
            k = st.k or (base_cluster.k[0] if base_cluster.k else None)
            if k is None:
                raise ConfigError(f"{where}: sensitivity.k: required when cluster.k is not set")
            sensitivity = SensitivityStudy(st, base_cluster, evaluate, k)
        comparisons = tuple(Comparison.parse(c, where, lambda k, i=i: f"comparisons[{i}].{k}")
                            for i, c in enumerate(top.comparisons))
        report = ReportConfig.parse({"results": results, "out": report_out, **storage,
                                     "comparisons": comparisons, "dataset": ds.name, "split": ds.test_split,
                                     "models": [c.model for c in clusters],  # a shared results folder: the run's
                                     "title": f"{top.title or Path(where).stem} ({top.figure})" if top.figure
                                     else top.title}, where)
        cfg = cls(address=top.address, title=top.title or Path(where).stem, extracts=tuple(extracts), clusters=tuple(clusters),
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
                    raise ConfigError(f"{where}: comparisons[{i}].models: {model!r} is not a model of this run "
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
                raise ConfigError(f"{where}: models[{i}].weights: file {e.weights} does not exist")
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
                    raise ConfigError(f"{where}: models[{i}]: no model")
                try:
                    key = store_key(entry["model"], entry.get("model_key"))
                    entry["model"] = stand_in(entry["model"])
                except RepPipelineError as exc:
                    raise ConfigError(f"{where}: models[{i}].model: {exc}") from None
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
    docs = [d for d in load_documents(path) if d is not None] or [{}]
    runs = []
    for i, raw in enumerate(docs):
        where = str(path) if len(docs) == 1 else f"{path} (document {i + 1})"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"run config {where} must be a mapping of keys, not {type(raw).__name__}")
        if overrides is not None:
            raw = overrides.apply(raw, where)
        runs.append(RunConfig.from_dict(raw, base=Path.cwd(), where=where, storage_options=storage_options))
    return runs


def _keypoint_dataset(section: Mapping[str, Any], where: str) -> Any:
    if not isinstance(section.get("dataset"), Mapping):
        raise ConfigError(f"{where}: correspond.dataset: required, a mapping with name and split (e.g. "
                          f"{{name: spair71k, root: data/SPair-71k, split: test}})")
    return KeypointDataset.parse(section["dataset"], where, _in("correspond.dataset"))


def _store_key(e: ExtractConfig, where: str, i: int) -> str:
    try:
        get_spec(e.model)
    except RepPipelineError as exc:
        raise ConfigError(f"{where}: models[{i}].model: {exc}") from None
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
    address = address if address is not None else cfg.address
    for name, label, stage_cfg in cfg.plan():
        stage = stage_cfg if name == "sensitivity" else STAGES[name]
        if name == "report" and cfg.text:
            results = as_location(cfg.evaluate.results, cfg.report.storage_options)
            kept = results / RUN_CONFIG
            if results.exists() and not (kept.is_file() and kept.read_bytes() == cfg.text.encode()):
                kept.write_bytes(cfg.text.encode())  # unchanged: left as it is (the report's fingerprint reads it)
        started = time.perf_counter()
        if stage.is_done(stage_cfg):
            result.stages.append((name, label, "skipped"))
            if name == "report":  # the page drawn from these very results is there
                result.report = stage_cfg.out / "index.html"
        else:
            out = stage.run(stage_cfg, address=address, progress=progress)
            result.stages.append((name, label, "done"))
            if name == "report":
                result.report = out.index
        say(f"{name} {label}: {result.stages[-1][2]} ({time.perf_counter() - started:.1f} s)")
    result.seconds = time.perf_counter() - t0
    return result
