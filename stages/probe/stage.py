"""The probe stage: which token type carries concepts best (PROTOCOL.md section 9).

For one model, the train split's features fit the templates and the test split's features
score them, per (embedding, layer) and per object: patches labelled by each label map of the
dataset (one category of concepts per map, A1) or class tokens with image labels (A6). Both
rules of ``templates`` run on every concept of every category. Workers (Ray actors, one per
GPU or one per node) take the (embedding, layer) sets; hyperplane templates are stored beside
the codebooks and reused by a rerun (``--force`` trains replacements and swaps them in whole).
The driver writes ``direction_probes``, ``direction_summary`` and ``direction_skipped`` and
the maps of figure d4.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from rep_pipeline.pipeline import runner
from rep_pipeline.pipeline.backend import get_backend
from rep_pipeline.pipeline.config import EMBEDDINGS, PROBE_TOKEN_TYPES, ProbeConfig, resolve_layers
from rep_pipeline.pipeline.errors import ConfigError, StoreError
from rep_pipeline.pipeline.footprints import patch_labels
from rep_pipeline.pipeline.leases import Lease, leases, leases_beside
from rep_pipeline.pipeline.progress import ImageProgress
from rep_pipeline.pipeline.results import Results
from rep_pipeline.pipeline.stage_result import SettingsResult
from rep_pipeline.pipeline.store import FeatureStore, ModelSplit, check_store_location
from rep_pipeline.storage_schemas import results as results_layout
from rep_pipeline.storage_schemas.feature_store import MODEL_FINGERPRINT_KEYS, model_path, templates_name

from . import templates
from .templates import ObjectSet

TABLES = ("direction_probes", "direction_summary", "direction_skipped")
METRICS = ("accuracy", "precision", "recall", "f1")
D4_EMBEDDINGS = {"hyperplane": "keys", "cosine": "queries"}  # [D] Sec. 4.5's choice for the masks


@dataclass(frozen=True)
class Category:
    """One label map of the dataset: its concepts and, per split, its label maps."""

    name: str
    classes: tuple[str, ...]
    train: np.ndarray  # (n, S, S) uint8 class ids, ignore_index where unlabelled
    test: np.ndarray


@dataclass
class ProbeResult(SettingsResult):
    rows: int = 0
    reused: int = 0

    STAGE, TABLES = "probe", TABLES

    def work(self) -> str:
        return (f"{self.settings} (embedding, layer) settings, {self.rows} templates evaluated ({self.reused} "
                f"hyperplane layers reused) in {self.seconds:.1f} s")


# -- what to probe --------------------------------------------------------------------------------
def _groups(cfg: ProbeConfig, store: FeatureStore) -> tuple[str, ModelSplit, ModelSplit]:
    """(dataset, train group, test group), both finished and of the same features."""
    datasets = sorted({d for m, d, s in store.model_splits() if m == cfg.model and s in (cfg.train_split, cfg.split)
                       and (cfg.dataset is None or d == cfg.dataset)})
    if not datasets:
        raise StoreError(f"{cfg.store} has no features of {cfg.model} for {cfg.train_split} or {cfg.split}; run extract")
    if len(datasets) > 1:
        raise ConfigError(f"{cfg.model} has {cfg.split} in several datasets ({', '.join(datasets)}); pass --dataset")
    dataset = datasets[0]
    groups = []
    for split in (cfg.train_split, cfg.split):
        group = store.model_split(cfg.model, dataset, split)
        if not group.finished:
            raise StoreError(f"{group.path} is not finished; run the same extract command to complete it")
        groups.append(group)
    train, test = groups
    differ = [k for k in MODEL_FINGERPRINT_KEYS if k != "dataset_fingerprint" and train.meta.get(k) != test.meta.get(k)]
    if differ:
        raise StoreError(f"{train.path} and {test.path} hold different features ({', '.join(differ)} differ); "
                         f"extract both splits with one command")
    return dataset, train, test


def _settings(cfg: ProbeConfig, group: ModelSplit) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(embeddings, layers): the requested ones, each checked to be in the store (naming the
    array and the extract option that produces it), or the defaults."""
    embeddings = cfg.embeddings or tuple(e for e in PROBE_TOKEN_TYPES if e in group.embeddings)
    if not embeddings:
        raise StoreError(f"{group.path} holds none of {', '.join(PROBE_TOKEN_TYPES)}; extract with "
                         f"--embeddings {','.join(PROBE_TOKEN_TYPES)}")
    for emb in embeddings:
        if "patch" in cfg.objects:
            group.check_embedding(emb)
        if "class_token" in cfg.objects:
            group.check_class_embedding(emb)
    layers = resolve_layers(cfg.layers, group.layers) if cfg.layers else (max(group.layers),)
    for layer in layers:
        group.layer_slot(layer)
    return embeddings, layers


def _categories(store: FeatureStore, dataset: str, cfg: ProbeConfig) -> list[Category]:
    """Every label map of the dataset: the primary one (``labels``) and any further ones."""
    train, test = store.dataset_split(dataset, cfg.train_split), store.dataset_split(dataset, cfg.split)
    for data in (train, test):
        if data.pending_chunks():
            raise StoreError(f"{data.path}: labels of chunks {data.pending_chunks()[:5]} are not "
                             f"written; run the same extract command")
    meta = test.meta
    out = [Category(meta.category or dataset, meta.classes, train.read_labels(), test.read_labels())]
    for name, classes in test.label_maps.items():
        out.append(Category(name, tuple(classes), train.read_extra_labels(name), test.read_extra_labels(name)))
    return out


def concept_axis(cfg: ProbeConfig, categories: list[Category]) -> list[dict[str, Any]]:
    """The stored templates' concept axis: every (object, category, class) probed."""
    return [{"object": obj, "category": c.name, "id": i, "name": name}
            for obj in cfg.objects for c in categories for i, name in enumerate(c.classes)]


# -- the work of one (embedding, layer) --------------------------------------------------------------
@dataclass(frozen=True)
class Objects:
    """Which rows of a split's features are objects of one category, and their labels: the
    same for every embedding and layer, so computed once."""

    rows: np.ndarray | None  # patch objects: the labelled patches (A1); class tokens: every image
    positive: np.ndarray
    negative: np.ndarray
    image: np.ndarray
    n_images: int

    @classmethod
    def of(cls, labels: np.ndarray, n_classes: int, obj: str, grid: int, ignore: int) -> "Objects":
        n = labels.shape[0]
        if obj == "class_token":
            present, absent = templates.image_labels(labels, n_classes, ignore)
            return cls(None, present, absent, np.arange(n), n)
        patch = patch_labels(labels, grid, ignore).reshape(-1)
        keep = np.flatnonzero(patch != ignore)
        positive = patch[keep][:, None] == np.arange(n_classes)[None]
        return cls(keep, positive, ~positive, np.repeat(np.arange(n), grid * grid)[keep], n)

    def with_features(self, features: np.ndarray, be: Any) -> ObjectSet:
        """The ``ObjectSet`` of these objects' rows of ``features`` ((n, G, G, D) or (n, D))."""
        flat = features.reshape(-1, features.shape[-1])
        rows = flat if self.rows is None else flat[self.rows]
        return ObjectSet(be.asarray(rows.astype(np.float32)), self.positive, self.negative, self.image, self.n_images)


class ProbeWorker:
    """Probes its (embedding, layer) settings; owns its store handles (a Ray actor)."""

    def __init__(self, cfg: ProbeConfig, dataset: str, settings: list[tuple[str, int]], replacing: bool,
                 mask_embedding: str):
        self.cfg, self.dataset, self.settings, self.replacing = cfg, dataset, settings, replacing
        self.mask_embedding = mask_embedding  # figure d4's hyperplanes: one embedding for every worker
        self.done = 0

    def progress(self) -> int:
        return self.done

    def run(self) -> dict[str, list[dict]]:
        cfg = self.cfg
        be = get_backend(cfg.backend)
        device = "cuda" if be.name == "cupy" else "cpu"
        store = FeatureStore(cfg.store, mode="a")
        train, test = (store.model_split(cfg.model, self.dataset, s) for s in (cfg.train_split, cfg.split))
        categories = _categories(store, self.dataset, cfg)
        concepts = concept_axis(cfg, categories)
        index = {(c["object"], c["category"], c["id"]): i for i, c in enumerate(concepts)}
        book = train.templates(cfg.seed, replacement=self.replacing) if "hyperplane" in cfg.rules else None
        examples = len(store.dataset_split(self.dataset, cfg.split).example_images())
        out: dict[str, list[dict]] = {"rows": [], "skipped": [], "masks": [], "cosine_masks": []}
        grid, ignore = train.meta.grid, store.dataset_split(self.dataset, cfg.split).meta.ignore_index
        objects = {(obj, cat.name, split): Objects.of(getattr(cat, split), len(cat.classes), obj, grid, ignore)
                   for obj in cfg.objects for cat in categories for split in ("train", "test")}
        # figure d4: the example image where each concept covers the largest area (-1: none)
        shown = {cat.name: _largest_area(cat.test[:examples], len(cat.classes)) for cat in categories}
        # the settings in groups read together, each group's hyperplanes trained as one problem
        groups = {g[0]: g for g in _setting_groups(self.settings, train.n_images * (grid * grid + 1)
                                                              * train.meta.embed_dim * 4)}
        for emb, layer in self.settings:
            if (emb, layer) in groups:
                sets, trained = self._read_and_train(groups[emb, layer], train, test, categories, objects, book, be,
                                                     device)
            weights = np.zeros((len(concepts), train.meta.embed_dim), np.float32)
            bias = np.full(len(concepts), np.nan, np.float32)
            reuse = book is not None and book.is_done(emb, layer)
            if reuse:
                weights, bias = book.read(emb, layer)
            seed = _seed(cfg, emb, layer)
            for obj in cfg.objects:
                feats, pairs = sets.pop((emb, layer, obj))
                for cat in categories:
                    tr, te = pairs[cat.name]
                    ids = list(range(len(cat.classes)))
                    where = {"embedding": emb, "layer": layer, "object": obj, "category": cat.name}
                    if "hyperplane" in cfg.rules:
                        slots = [index[(obj, cat.name, c)] for c in ids]
                        if reuse:
                            stored = {c: (weights[slot], float(bias[slot])) for c, slot in zip(ids, slots)}
                            rows, skipped = templates.evaluate_hyperplanes(tr, te, stored, ids, seed)
                        else:
                            rows, fitted, skipped = trained.pop((emb, layer, obj, cat.name))
                            for c, (w, b) in fitted.items():
                                weights[index[(obj, cat.name, c)]], bias[index[(obj, cat.name, c)]] = w, b
                        out["rows"] += [dict(r, rule="hyperplane", **where) for r in rows]
                        out["skipped"] += [dict(r, rule="hyperplane", **where) for r in skipped]
                    if "cosine" in cfg.rules:
                        rows, skipped = templates.cosine_probe(be, tr, te, ids, cfg.shots, cfg.trials,
                                                               cfg.query_images, cfg.seed)
                        out["rows"] += [dict(r, rule="cosine", **where) for r in rows]
                        out["skipped"] += [dict(r, rule="cosine", **where) for r in skipped]
                    if obj == "patch" and "hyperplane" in cfg.rules and emb == self.mask_embedding:
                        slots = np.asarray([index[(obj, cat.name, c)] for c in ids])
                        out["masks"].append(_hyperplane_masks(shown[cat.name], weights[slots], bias[slots],
                                                              feats["test"], grid, where))
                    if obj == "patch" and "cosine" in cfg.rules and emb == D4_EMBEDDINGS["cosine"]:
                        out["cosine_masks"].append(self._cosine_masks(shown[cat.name], tr, feats["test"], grid, where))
            if book is not None and not reuse:
                book.write(emb, layer, weights, bias)
            self.done += 1
        return out

    def _read_and_train(self, group: list[tuple[str, int]], train: ModelSplit, test: ModelSplit,
                        categories: list[Category], objects: dict, book: Any, be: Any,
                        device: str) -> tuple[dict, dict]:
        """The features of ``group``'s settings, {(embedding, layer, object): (features of both
        splits, {category: (train, test ObjectSet)})}, and the hyperplanes of its settings that
        have no stored templates, {(embedding, layer, object, category): (rows, templates,
        skipped)}, trained together (``templates.hyperplane_probes``)."""
        cfg = self.cfg
        sets = {}
        for emb, layer in group:
            for obj in cfg.objects:
                feats = {s: (g.read_features(emb, layer, 0, g.n_images) if obj == "patch"
                             else g.read_class_features(emb, layer))
                         for s, g in (("train", train), ("test", test))}
                sets[emb, layer, obj] = feats, {cat.name: tuple(objects[(obj, cat.name, split)].with_features(
                    feats[split], be) for split in ("train", "test")) for cat in categories}
        if "hyperplane" not in cfg.rules:
            return sets, {}
        keys = [(emb, layer, obj, cat) for emb, layer in group if not (book is not None and book.is_done(emb, layer))
                for obj in cfg.objects for cat in categories]
        fits = templates.hyperplane_probes([(*sets[emb, layer, obj][1][cat.name], list(range(len(cat.classes))),
                                             _seed(cfg, emb, layer)) for emb, layer, obj, cat in keys], device)
        return sets, {(emb, layer, obj, cat.name): fit for (emb, layer, obj, cat), fit in zip(keys, fits)}

    def _cosine_masks(self, shown: np.ndarray, tr: ObjectSet, test_feats: np.ndarray, grid: int,
                      where: dict) -> dict[str, Any]:
        """Figure d4's cosine column: per concept, the patch decisions of its cosine template
        (trial 0 at the largest k its train images allow) on the image ``shown`` names."""
        have = np.array([np.unique(tr.image[tr.positive[:, c]]).size for c in range(len(shown))])
        decisions = {}
        for c in np.flatnonzero(shown >= 0):
            ks = [k for k in self.cfg.shots if k <= have[c]]
            if ks:
                a, t = templates.cosine_template(tr, int(c), max(ks), self.cfg.seed)
                z = test_feats[shown[c]].reshape(grid * grid, -1).astype(np.float32)
                cos = z @ a / (np.linalg.norm(z, axis=1) * np.linalg.norm(a) + 1e-30)
                decisions[int(c)] = (cos >= t).reshape(grid, grid)
        return {**where, "decisions": decisions}


HYPERPLANE_BATCH_BYTES = 1 << 30  # train features of the settings whose hyperplanes train as one problem


def _setting_groups(settings: list[tuple[str, int]], per_setting: int,
                    budget: int = HYPERPLANE_BATCH_BYTES) -> list[list[tuple[str, int]]]:
    """The worker's settings in consecutive groups of at most ``budget`` bytes of train
    features (``per_setting`` each; at least one setting a group): a group's features are
    read together and its hyperplanes trained as one batched problem."""
    n = max(1, budget // max(per_setting, 1))
    return [settings[i:i + n] for i in range(0, len(settings), n)]


def _seed(cfg: ProbeConfig, emb: str, layer: int) -> int:
    """The hyperplanes' seed of one (embedding, layer) (A9: per concept, embedding, layer)."""
    return int(np.random.default_rng([cfg.seed, EMBEDDINGS.index(emb), layer]).integers(2**31))


def _largest_area(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Per class, the image (of ``labels`` (n, S, S)) where it covers the most pixels; -1 where
    it covers none."""
    areas = np.zeros((len(labels) + 1, n_classes), np.int64)  # a row of zeros: argmax 0 where none covers it
    for i, image in enumerate(labels):
        areas[i + 1] = np.bincount(image.ravel(), minlength=256)[:n_classes]
    return areas.argmax(0) - 1


def _hyperplane_masks(shown: np.ndarray, weights: np.ndarray, bias: np.ndarray, test_feats: np.ndarray, grid: int,
                      where: dict) -> dict[str, Any]:
    """Figure d4's hyperplane column: for each concept with a trained template, its patch
    decisions on the image ``shown`` names (the driver keeps five spanning the F1 range)."""
    concepts = [int(c) for c in np.flatnonzero((shown >= 0) & np.isfinite(bias))]
    z = test_feats[shown[concepts]].reshape(len(concepts), grid * grid, -1).astype(np.float32)
    said = np.einsum("npd,nd->np", z, weights[concepts]) - bias[concepts, None] >= 0
    return {**where, "concepts": concepts, "images": [int(shown[c]) for c in concepts],
            "decisions": list(said.reshape(len(concepts), grid, grid))}


# -- tables ---------------------------------------------------------------------------------------
def _table_rows(cfg: ProbeConfig, dataset: str, categories: list[Category], out: dict[str, list[dict]],
                fingerprints: tuple[str, str]) -> dict[str, list[dict]]:
    names = {c.name: c.classes for c in categories}
    setting = {"model": cfg.model, "dataset": dataset, "split": cfg.split, "train_split": cfg.train_split}
    fp = {"store_fingerprint": fingerprints[1], "train_store_fingerprint": fingerprints[0]}
    probes = [{**setting, "embedding": r["embedding"], "layer": r["layer"], "object": r["object"], "rule": r["rule"],
               "k_shot": r["k_shot"], "trial": r["trial"], "concept_id": r["concept"],
               "concept_name": names[r["category"]][r["concept"]], "category": r["category"],
               **{k: r[k] for k in ("n_pos", "n_neg", "tp", "fp", "tn", "fn", *METRICS, "threshold", "seed")}, **fp}
              for r in out["rows"]]
    skipped = [{**setting, "embedding": r["embedding"], "layer": r["layer"], "object": r["object"], "rule": r["rule"],
                "k_shot": r["k_shot"], "concept_id": r["concept"], "concept_name": names[r["category"]][r["concept"]],
                "category": r["category"], "reason": r["reason"]} for r in out["skipped"]]
    return {"direction_probes": probes, "direction_summary": summarise(probes, setting, fp),
            "direction_skipped": skipped}


def summarise(probes: list[dict], setting: dict[str, Any], fp: dict[str, str]) -> list[dict]:
    """Per setting (and category, or "all"): the mean over concepts of each metric; for the
    cosine rule per trial, then the mean and standard deviation over trials (section 9.4)."""
    groups: dict[tuple, list[dict]] = {}
    for r in probes:
        key = (r["embedding"], r["layer"], r["object"], r["rule"], r["k_shot"])
        for category in ("all", r["category"]):
            groups.setdefault((*key, category), []).append(r)
    out = []
    for (emb, layer, obj, rule, k, category), rows in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        by_trial: dict[int, list[dict]] = {}
        for r in rows:
            by_trial.setdefault(r["trial"], []).append(r)
        row = {**setting, "embedding": emb, "layer": layer, "object": obj, "rule": rule, "k_shot": k,
               "category": category, "n_concepts": len({(r["category"], r["concept_id"]) for r in rows}), **fp}
        for m in METRICS:
            per_trial = [float(np.mean([r[m] for r in trial])) for _, trial in sorted(by_trial.items())]
            row[m] = float(np.mean(per_trial))
            row[f"{m}_std"] = statistics.pstdev(per_trial) if rule == "cosine" else None
        out.append(row)
    return out


# -- the stage --------------------------------------------------------------------------------------
def is_done(cfg: ProbeConfig) -> bool:
    """The results hold summaries of every requested (embedding, layer, object, rule) for these
    features, and the probe's options match the ones recorded with its masks. Reads only."""
    if cfg.force or not cfg.store.exists() or not cfg.results.is_dir():
        return False
    try:
        store = FeatureStore(cfg.store)
        dataset, train, test = _groups(cfg, store)
        embeddings, layers = _settings(cfg, train)
        results = Results(cfg.results)
        if "direction_summary" not in results.tables():
            return False
        recorded = results.maps().run_record(results_layout.direction_maps(dataset, cfg.split, cfg.model))
    except StoreError:
        return False
    wanted = {(e, layer, o, r) for e in embeddings for layer in layers for o in cfg.objects for r in cfg.rules}
    return recorded.record("probe") == _record(cfg, train, test) and wanted <= recorded.done()


def _record(cfg: ProbeConfig, train: ModelSplit, test: ModelSplit) -> dict[str, Any]:
    """What the probes of a run depend on besides their settings: options and features."""
    return {"train_split": cfg.train_split, "shots": list(cfg.shots), "trials": cfg.trials,
            "query_images": cfg.query_images, "seed": cfg.seed, "hyperparameters": cfg.hyperparameters(),
            "store_fingerprint": test.fingerprint_hash, "train_store_fingerprint": train.fingerprint_hash}


def _split_settings(settings: list[tuple[str, int]], n: int) -> list[list[tuple[str, int]]]:
    return [b for b in (settings[i::n] for i in range(n)) if b]


def run_probe(cfg: ProbeConfig, *, address: str | None = None, progress: bool = True) -> ProbeResult:
    """Fit and score every requested template; write the tables (and the templates)."""
    t0 = time.perf_counter()
    check_store_location(cfg.store, writable=True)
    store = FeatureStore(cfg.store)
    dataset, train, test = _groups(cfg, store)
    embeddings, layers = _settings(cfg, train)
    categories = _categories(store, dataset, cfg)
    Results(cfg.results, mode="a")  # a results folder of another version is refused before any work
    held = [Lease(leases_beside(cfg.results), f"probe-{cfg.split}", f"the probes of {cfg.split} in {cfg.results}"),
            Lease(leases_beside(cfg.store), f"{model_path(cfg.model, dataset, cfg.train_split)}/templates",
                  f"{cfg.store}/{model_path(cfg.model, dataset, cfg.train_split)}/templates")]
    with leases(*held):
        return _probe(cfg, address, progress, dataset, embeddings, layers, categories, t0)


def _probe(cfg: ProbeConfig, address: str | None, progress: bool, dataset: str, embeddings: tuple[str, ...],
           layers: tuple[int, ...], categories: list[Category], t0: float) -> ProbeResult:
    store = FeatureStore(cfg.store, mode="a")
    train = store.model_split(cfg.model, dataset, cfg.train_split)
    test = store.model_split(cfg.model, dataset, cfg.split)
    result = ProbeResult(cfg.model, str(cfg.results))
    settings = [(e, layer) for e in embeddings for layer in layers]
    replacing = False
    if "hyperplane" in cfg.rules:
        replacing = cfg.force and templates_name(cfg.seed) in train.templates_names()
        book = train.require_templates(cfg.seed, concept_axis(cfg, categories), cfg.hyperparameters(), embeddings,
                                       force=replacing)
        result.reused = sum(book.is_done(e, layer) for e, layer in settings)
    runner.ensure_ray(address)
    gpus = runner.cluster_gpus() if cfg.backend != "numpy" else 0
    n_workers = min(cfg.workers or gpus or len(runner.node_cpus()), len(settings))
    cpus = 1 if gpus else runner.cpus_per_actor(n_workers)
    mask_embedding = D4_EMBEDDINGS["hyperplane"] if D4_EMBEDDINGS["hyperplane"] in embeddings else embeddings[0]
    pool = runner.ActorPool(ProbeWorker, [(cfg, dataset, b, replacing, mask_embedding)
                                          for b in _split_settings(settings, n_workers)],
                            num_cpus=cpus, num_gpus=1 if gpus else 0, max_concurrency=2)
    out: dict[str, list[dict]] = {"rows": [], "skipped": [], "masks": [], "cosine_masks": []}
    with pool, ImageProgress(f"probe {cfg.model}", len(settings), unit="setting", enabled=progress) as bar:
        for part in pool.run_all("run", poll=bar.update):
            for key in out:
                out[key] += part[key]
        bar.update(len(settings))
    if replacing:  # every replacement layer is complete: swap them in
        train.replace_templates(cfg.seed)
    tables = _table_rows(cfg, dataset, categories, out, (train.fingerprint_hash, test.fingerprint_hash))
    results = Results(cfg.results, mode="a")
    record = _record(cfg, train, test)
    done = [[e, layer, o, r] for e, layer in settings for o in cfg.objects for r in cfg.rules]
    try:  # the settings of an earlier run with the same options and features stay done
        before = results.maps().run_record(results_layout.direction_maps(dataset, cfg.split, cfg.model))
        if before.record("probe") == record:
            done += [list(s) for s in before.settings or () if list(s) not in done]
    except StoreError:
        pass
    with results.staged_maps() as maps:
        _write_masks(maps, cfg, dataset, categories, out["masks"], out["cosine_masks"], tables["direction_probes"])
        maps.write(results_layout.direction_maps(dataset, cfg.split, cfg.model),
                   attrs={"probe": record, "settings": done})
    for table in TABLES:
        for emb, layer in settings:
            rows = [r for r in tables[table] if r["embedding"] == emb and r["layer"] == layer]
            results.write_table(table, rows, dataset=dataset, model=cfg.model,
                                part=f"{cfg.train_split}-{cfg.split}-{emb}-l{layer}")
    result.settings, result.rows = len(settings), len(tables["direction_probes"])
    result.seconds = time.perf_counter() - t0
    return result


def _write_masks(maps: Any, cfg: ProbeConfig, dataset: str, categories: list[Category], masks: list[dict],
                 cosine: list[dict], probes: list[dict]) -> None:
    """Figure d4's inputs: per (category, embedding, layer), five concepts spanning the
    hyperplane F1 range (Fig. 15), each on its test image, ground truth and patch decisions
    of the hyperplane template and, where queries were probed with the cosine rule, of the
    queries' cosine template ([D] Sec. 4.5)."""
    cosine_of = {(m["category"], m["layer"]): m["decisions"] for m in cosine}
    images = FeatureStore(cfg.store).dataset_split(dataset, cfg.split).example_images()
    by_name = {c.name: c for c in categories}
    for m in masks:
        f1 = {r["concept_id"]: r["f1"] for r in probes if r["rule"] == "hyperplane" and r["object"] == "patch"
              and (r["embedding"], r["layer"], r["category"]) == (m["embedding"], m["layer"], m["category"])}
        ranked = sorted((c for c in m["concepts"] if c in f1), key=lambda c: f1[c])
        if not ranked:
            continue
        picks = list(dict.fromkeys(ranked[int(round(i))] for i in np.linspace(0, len(ranked) - 1, min(5, len(ranked)))))
        at = [m["concepts"].index(c) for c in picks]
        m = {**m, "concepts": picks, "images": [m["images"][i] for i in at], "decisions": [m["decisions"][i] for i in at]}
        cat = by_name[m["category"]]
        idx = np.asarray(m["images"])
        cos = cosine_of.get((m["category"], m["layer"]), {})
        extra = {}
        if all(c in cos for c in m["concepts"]):
            extra["cosine_decisions"] = np.stack([cos[c] for c in m["concepts"]]).astype(np.uint8)
        maps.write(results_layout.direction_masks(dataset, cfg.split, cfg.model, m["category"], m["embedding"],
                                                  m["layer"]),
                   attrs={"concepts": [int(c) for c in m["concepts"]], "names": [cat.classes[c] for c in m["concepts"]],
                          "image_index": idx.tolist(), "embedding": m["embedding"], "layer": int(m["layer"]),
                          "cosine_embedding": D4_EMBEDDINGS["cosine"] if extra else None},
                   truth=np.stack([cat.test[i] == c for i, c in zip(idx, m["concepts"])]).astype(np.uint8),
                   decisions=np.stack(m["decisions"]).astype(np.uint8),
                   images=images[idx], **extra)
