"""The evaluate stage: unsupervised segmentation of the test split and every figure of
PROTOCOL.md section 5, written as Parquet tables and maps into the results folder.

For each model and (embedding, layer), the test features are streamed once, chunk by chunk;
every finished codebook of that feature set scores them in one matrix product. Scores are
upsampled bilinearly (align_corners=False) to the S x S label grid and each pixel takes its
best cluster: the same as upsampling the features first (upsampling is linear, and a pixel's
norm does not change its argmax), d/K times cheaper. Counts accumulate on the backend; the
formulas (``metrics``) run on the counts once the pass is over.

Every headline number (mIoU, pixel accuracy, NMI, bias-aware NMI, the ground truth's NMIs,
I(K,Q)) carries a 95 % bootstrap interval over the test images, from per-image
counts kept during the same pass (``bootstrap``, docs/uncertainty.md); the draws are seeded by
``cfg.seed``. The correlations carry their p-values.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rep_pipeline.pipeline.backend import Backend, get_backend, namespace
from rep_pipeline.pipeline.config import EvaluateConfig
from rep_pipeline.pipeline.errors import StoreError
from rep_pipeline.pipeline.leases import Lease, leases_beside
from rep_pipeline.pipeline.progress import ImageProgress
from rep_pipeline.pipeline.results import Results, feature_group_row
from rep_pipeline.pipeline.store import Codebook, DatasetSplit, FeatureStore, MapStore, ModelSplit, fingerprint_hash
from rep_pipeline.pipeline.finite import check_finite
from rep_pipeline.pipeline.streaming import FeatureStream
from rep_pipeline.storage_schemas import results as layout

from rep_pipeline.pipeline import bootstrap, metrics
from rep_pipeline.pipeline.segscore import ClusterMapScores, finish_scores, headline
from rep_pipeline.pipeline.upsample import upsample

TABLES = ("segmentation", "per_class_iou", "classwise_mi", "confusion", "matching", "kmeans_sensitivity")  # per model


def segment(be: Backend, features: Any, centroids: Any, ks: tuple[int, ...], size: int) -> list[Any]:
    """Cluster maps (n, S, S) of raw patch ``features`` (n, G, G, d) for stacked unit
    ``centroids`` (sum K, d): one per codebook, by score upsampling."""
    xp = namespace(features, centroids)
    scores = upsample(be, features @ centroids.T, size)
    out, start = [], 0
    for k in ks:
        out.append(xp.astype(xp.argmax(scores[..., start:start + k], axis=-1), xp.int16))
        start += k
    return out


@dataclass
class EvaluateResult:
    results: Path
    settings: int = 0
    models: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> list[str]:
        return [f"evaluated {self.settings} settings of {', '.join(self.models)} in {self.seconds:.1f} s; tables "
                f"in {self.results} (try: rep-pipeline query {self.results} \"SELECT * FROM segmentation "
                f"ORDER BY miou DESC LIMIT 5\")"]


@dataclass
class _Target:
    """One model's features on the test split, with the codebooks (and their train splits) to apply."""

    model: str
    dataset: str
    group: ModelSplit
    books: list[tuple[str, Codebook]]


def _targets(cfg: EvaluateConfig, store: FeatureStore) -> list[_Target]:
    """Every model (and dataset) to evaluate, checked: finished features, finished codebooks."""
    pairs = [(m, d) for m, d, s in store.model_splits() if s == cfg.split
             and (cfg.models is None or m in cfg.models) and (cfg.dataset is None or d == cfg.dataset)]
    if not pairs:
        raise StoreError(f"feature store {store.path} has no model features on split {cfg.split!r}"
                         + (f" for models {list(cfg.models)}" if cfg.models else ""))
    out = []
    for model, dataset in pairs:
        group = store.model_split(model, dataset, cfg.split)
        if not group.finished:
            raise StoreError(f"{store.path}/{group.path} is not finished; complete the extract run first")
        books = [(s, book) for m, d, s in store.model_splits() if (m, d) == (model, dataset) and s != cfg.split
                 for book in store.model_split(m, d, s).codebooks()]
        if not books:
            raise StoreError(f"model {model!r} on {dataset} has no codebooks; run `rep-pipeline cluster` first")
        out.append(_Target(model, dataset, group, books))
    return out


def _options(cfg: EvaluateConfig) -> dict[str, Any]:
    """The evaluate options that change what it writes, recorded with the ground-truth maps."""
    return {"seed": cfg.seed, "n_examples": cfg.n_examples, **({"draws": cfg.draws} if cfg.draws != 1000 else {})}


def is_done(cfg: EvaluateConfig) -> bool:
    """Every codebook of every model on the test split already has segmentation rows with its
    codebook and features fingerprints, evaluated with these options. Reads only."""
    if not cfg.store.exists() or not cfg.results.is_dir():
        return False
    try:
        targets = _targets(cfg, FeatureStore(cfg.store))
        return bool(targets) and not _stale(cfg, targets, Results(cfg.results))
    except StoreError:
        return False


def _stale(cfg: EvaluateConfig, targets: list[_Target], results: Results) -> list[_Target]:
    """The targets whose codebooks are not all evaluated on these features with these options
    (all of them when the options changed): the models an evaluation must (re)do."""
    try:
        tables = results.tables()
    except StoreError:
        return targets
    if "segmentation" not in tables:
        return targets
    have = {tuple(r.values()) for table in ("segmentation", "kmeans_sensitivity") if table in tables
            for r in results.rows(f"SELECT DISTINCT model, codebook_fingerprint, store_fingerprint FROM {table}",
                                  split=cfg.split)}
    maps = results.maps()
    try:
        if any(maps.ground_truth(layout.ground_truth_maps(d, cfg.split)).evaluation != _options(cfg)
               for d in {t.dataset for t in targets}):
            return targets
    except StoreError:
        return targets
    return [t for t in targets
            if not {(t.model, book.fingerprint_hash, t.group.fingerprint_hash) for _, book in t.books} <= have]


def run_evaluate(cfg: EvaluateConfig, *, address: str | None = None, progress: bool = True) -> EvaluateResult:
    """Evaluate every finished codebook of every model on ``cfg.split``; write the tables. A
    model whose codebooks are all evaluated already (same features, same options) keeps its
    rows; the summaries (best layers, correlations) are redrawn over all of them.

    Runs in this process on the backend (``address`` is accepted for the common stage
    signature; evaluation reads each feature once and needs no Ray workers)."""
    t0 = time.perf_counter()
    be = get_backend(cfg.backend)
    store = FeatureStore(cfg.store)
    targets = _targets(cfg, store)
    if cfg.results.is_dir():
        targets = _stale(cfg, targets, Results(cfg.results)) or targets  # nothing stale: evaluate again
    datasets = sorted({t.dataset for t in targets})
    for dataset in datasets:
        _check_labels(store.dataset_split(dataset, cfg.split))
    with Lease(leases_beside(cfg.results), f"evaluate-{cfg.split}", f"the evaluation of {cfg.split} in {cfg.results}"):
        results = Results(cfg.results, mode="a")
        result = EvaluateResult(cfg.results)
        parts: list[tuple[str, list[dict], str, str | None]] = []  # (table, rows, dataset, model)
        with results.staged_maps() as maps:  # maps land in the results only if every setting succeeds
            for dataset in datasets:
                parts += _evaluate_ground_truth(cfg, maps, store.dataset_split(dataset, cfg.split))
            for t in targets:
                rows = _evaluate_model(cfg, be, maps, store.dataset_split(t.dataset, cfg.split), t, progress)
                parts += [(table, rows[table], t.dataset, t.model) for table in TABLES]
                parts.append(_attention_intervals(cfg, t, _attention(cfg, maps, t)))
                parts.append(("feature_groups", [feature_group_row(t.model, t.dataset, cfg.split, t.group)], t.dataset,
                              t.model))
                result.settings += len(rows["segmentation"])
                result.models.append(t.model)
        for table, rows, dataset, model in parts:  # after the maps: a table row never points at a missing map
            if table == "kmeans_sensitivity" and not rows and not (
                    results.path / layout.part_file(table, dataset, model, cfg.split)).exists():
                continue  # a model outside the study gets no empty part
            results.write_table(table, rows, dataset=dataset, model=model, part=cfg.split)
        for dataset in datasets:
            _write_summaries(cfg, results, dataset)
        result.seconds = time.perf_counter() - t0
        return result


def _check_labels(data: DatasetSplit) -> None:
    """Every label chunk is written and every value is a class or ignore: checked before
    anything is computed or written."""
    classes, _, ignore, _ = _classes(data)
    if not classes:
        raise StoreError(f"{data.path} has no labels to evaluate against")
    pending = data.pending_chunks()
    if pending:
        raise StoreError(f"{data.path}: the labels of chunks {pending[:10]} are not "
                         f"written; complete the extract run first")
    for c in range(data.n_chunks):
        start, stop = data.bounds(c)
        labels = data.read_labels(start, stop)
        if ((labels >= len(classes)) & (labels != ignore)).any():
            raise StoreError(f"{data.path}/labels holds values outside 0..{len(classes) - 1} near image {start}")


def _classes(data: DatasetSplit) -> tuple[list[str], np.ndarray, int, int]:
    """(class names, palette, ignore index, S) of a dataset split."""
    meta = data.meta
    return list(meta.classes), meta.palette_array, meta.ignore_index, meta.image_size


def _evaluate_ground_truth(cfg: EvaluateConfig, maps: MapStore, data: DatasetSplit
                           ) -> list[tuple[str, list[dict], str, str | None]]:
    """The ground truth's positional effect: maps written, table parts returned."""
    classes, palette, ignore, S = _classes(data)
    C = len(classes)
    dy, dx = metrics.random_shifts(data.n_images, S, cfg.seed)
    counts = np.zeros((S, S, C), dtype=np.int64)
    null = np.zeros_like(counts)
    cell, n_cells = bootstrap.pooled_cells(S)
    small = bootstrap.small_count_dtype(S)
    pooled: list[np.ndarray] = []
    pooled_null: list[np.ndarray] = []
    for c in range(data.n_chunks):
        start, stop = data.bounds(c)
        labels = data.read_labels(start, stop)
        shifted = metrics.roll_maps(labels, dy[start:stop], dx[start:stop])
        counts += metrics.position_class_counts(labels, C, ignore)
        null += metrics.position_class_counts(shifted, C, ignore)
        pooled.append(bootstrap.pooled_counts(labels, C, cell, n_cells, ignore).astype(small))
        pooled_null.append(bootstrap.pooled_counts(shifted, C, cell, n_cells, ignore).astype(small))
    scores = metrics.positional_scores(counts, null)
    ci = _truth_intervals(cfg, np.concatenate(pooled), np.concatenate(pooled_null), scores)
    n_ex = min(cfg.n_examples, data.n_images)
    maps.write(layout.ground_truth_maps(data.dataset, cfg.split), counts=counts,
               aggregate=metrics.aggregate_map(counts, palette), images=data.example_images(),
               labels=data.read_labels(0, n_ex),
               attrs={"classes": classes, "palette": palette.tolist(), "example_ids": data.image_ids()[:n_ex],
                      "evaluation": _options(cfg)})
    dfp = fingerprint_hash(data.fingerprint)
    truth = [{"dataset": data.dataset, "split": cfg.split, "mi": scores.mi, "nmi": scores.nmi, **ci["nmi"],
              "mi_null": scores.mi_null, "nmi_bias_aware": scores.nmi_bias_aware, **ci["nmi_bias_aware"],
              "n_images": data.n_images, "dataset_fingerprint": dfp}]
    classwise = [{"model": layout.GROUND_TRUTH_MODEL, "dataset": data.dataset, "split": cfg.split,
                  "train_split": None, "embedding": None, "layer": None, "k": None, "method": None, "seed": None,
                  "source": "ground_truth", "class_id": c, "class_name": classes[c],
                  "mi": float(scores.classwise_mi[c]), "store_fingerprint": dfp, "codebook_fingerprint": None}
                 for c in range(C)]
    return [("ground_truth", truth, data.dataset, None),
            ("classwise_mi", classwise, data.dataset, layout.GROUND_TRUTH_MODEL)]


def _truth_intervals(cfg: EvaluateConfig, pooled: np.ndarray, pooled_null: np.ndarray,
                     scores: metrics.PositionalScores) -> dict[str, dict[str, float | None]]:
    """The ground truth's NMI and bias-aware NMI intervals: the same draws as the predictions'
    (docs/uncertainty.md), on the label maps' pooled per-image counts (no matching)."""
    if not len(pooled) or cfg.draws == 0:
        return {m: {f"{m}_lo": None, f"{m}_hi": None} for m in ("nmi", "nmi_bias_aware")}
    found = bootstrap.positional_intervals(get_backend("numpy"), bootstrap.draw_weights(len(pooled), cfg.seed,
                                                                                        cfg.draws), pooled,
                                           pooled_null, scores.nmi, scores.nmi_bias_aware)
    return {m: {f"{m}_lo": bootstrap.finite_or_none(lo), f"{m}_hi": bootstrap.finite_or_none(hi)}
            for m, (lo, hi) in found.items()}


def _evaluate_model(cfg: EvaluateConfig, be: Backend, maps: MapStore, data: DatasetSplit, t: _Target,
                    progress: bool) -> dict[str, list[dict]]:
    classes, palette, ignore, S = _classes(data)
    C = len(classes)
    group = t.group
    dy, dx = metrics.random_shifts(data.n_images, S, cfg.seed)
    rows: dict[str, list[dict]] = {table: [] for table in TABLES}
    example_ids = data.image_ids()[: cfg.n_examples]
    G = group.meta.grid
    work = [(emb, layer, [(ts, b) for ts, b in t.books if b.is_done(emb, layer)])
            for emb in group.embeddings for layer in group.layers]
    work = [w for w in work if w[2]]
    with ImageProgress(f"evaluate {t.model}", len(work) * data.n_images, enabled=progress) as bar:
        for emb, layer, todo in work:
            parts = [be.asarray(b.centroids(emb, layer)) for _, b in todo]
            xp = namespace(*parts)
            cents = xp.concat(parts)
            ks = tuple(b.meta.k for _, b in todo)
            accs = [ClusterMapScores(k, C, S, be, seed=cfg.seed, draws=cfg.draws) for k in ks]
            stream = FeatureStream(group, [(emb, layer)], be, cache_bytes=0)
            for index, arrays in stream.sequential():
                start, stop = int(index[0]), int(index[-1]) + 1
                raw = arrays[(emb, layer)]
                check_finite(raw, index, f"{group.path}/{emb} layer {layer}")
                x = xp.reshape(be.float32(raw), (stop - start, G, G, -1))
                lab = xp.astype(be.asarray(data.read_labels(start, stop)), xp.int64)
                shifts = (be.asarray(dy[start:stop]), be.asarray(dx[start:stop]))
                for i in range(0, stop - start, cfg.images_per_step):  # bounds the (n, S, S, sum K) scores
                    part = slice(i, min(i + cfg.images_per_step, stop - start))
                    for acc, clusters in zip(accs, segment(be, x[part, ...], cents, ks, S)):
                        acc.add(clusters, lab[part, ...], (shifts[0][part], shifts[1][part]), ignore)
                        if start + i < cfg.n_examples:
                            acc.examples.append(be.to_numpy(clusters)[: cfg.n_examples - start - i])
                bar.advance(stop - start)
            studied = {(ts, b.meta.method, b.meta.k) for ts, b in todo if b.variant}
            for (train_split, book), acc in zip(todo, accs):
                setting = dict(model=t.model, dataset=t.dataset, split=cfg.split, train_split=train_split,
                               embedding=emb, layer=layer, k=acc.k, method=book.meta.method,
                               seed=book.meta.seed)
                fps = {"store_fingerprint": group.fingerprint_hash, "codebook_fingerprint": book.fingerprint_hash}
                if (train_split, setting["method"], acc.k) in studied:  # the k-means sensitivity study (12.2)
                    rows["kmeans_sensitivity"].append(_sensitivity_row(acc, setting, book, data.n_images, fps))
                if not book.variant:  # a variant is scored for the study alone
                    finish_scores(rows, maps, acc, setting, classes, palette, data.n_images, fps, example_ids)
    return rows


def _sensitivity_row(acc: ClusterMapScores, setting: dict, book: Codebook, n_images: int,
                     fps: dict[str, str]) -> dict:
    """A ``kmeans_sensitivity`` row: one codebook of the study (a variant, or the main one it
    varies) scored as section 5 scores every codebook."""
    h = headline(acc)
    hp = book.meta.hyperparameters
    return {**{k: setting[k] for k in ("model", "dataset", "split", "train_split", "embedding", "layer", "k", "seed")},
            "batch_images": int(hp["batch_images"]), "pca_batches": int(hp["init_batches"]),
            "pca_interval": int(hp.get("init_interval", 1)), "codebook": book.name, "miou": h.scores.miou,
            "miou_lo": h.intervals["miou_lo"], "miou_hi": h.intervals["miou_hi"],
            "pixel_accuracy": h.scores.pixel_accuracy, "nmi": h.positional.nmi, "n_images": n_images, **fps}


def _attention(cfg: EvaluateConfig, maps: MapStore, t: _Target) -> tuple[str, list[dict], str, str | None]:
    """The model's mean attention map written (with the example images' own attention rows,
    where the features hold them: PROTOCOL.md 12.5); its I(K,Q) table part returned."""
    group = t.group
    attrs: dict[str, Any] = {"layers": list(group.layers), "grid": group.meta.grid}
    arrays = {"attention": group.attention_map()}
    if group.has_example_attention:
        arrays["example_attention"], attrs["example_ids"] = group.example_attention()
    maps.write(layout.attention_maps(t.dataset, cfg.split, t.model), attrs=attrs, **arrays)
    mi = group.attention_mi()  # (layer, image, head)
    rows = [{"model": t.model, "dataset": t.dataset, "split": cfg.split, "layer": layer, "head": h,
             "mean": float(mi[i, :, h].mean()), "std": float(mi[i, :, h].std()), "n_images": mi.shape[1],
             "store_fingerprint": group.fingerprint_hash}
            for i, layer in enumerate(group.layers) for h in range(mi.shape[2])]
    return "attention_mi", rows, t.dataset, t.model


def _attention_intervals(cfg: EvaluateConfig, t: _Target, part: tuple[str, list[dict], str, str | None]
                         ) -> tuple[str, list[dict], str, str | None]:
    """``_attention``'s I(K,Q) rows with ``mean_lo`` / ``mean_hi``: the 95 % bootstrap interval
    of the mean over images, per (layer, head), from the per-image values (seed ``cfg.seed``)."""
    table, rows, dataset, model = part
    group = t.group
    mi = group.attention_mi()  # (layer, image, head)
    if cfg.draws == 0:
        lo = hi = np.full(mi.shape[::2], np.nan)
    else:
        lo, hi = bootstrap.mean_interval(mi, cfg.seed, axis=1, draws=cfg.draws)  # (layer, head)
    slot = {layer: i for i, layer in enumerate(group.layers)}
    for row in rows:
        i, h = slot[row["layer"]], row["head"]
        row["mean_lo"], row["mean_hi"] = bootstrap.finite_or_none(lo[i, h]), bootstrap.finite_or_none(hi[i, h])
    return table, rows, dataset, model


def _write_summaries(cfg: EvaluateConfig, results: Results, dataset: str) -> None:
    """Best layers and correlations over every model in the results folder for this split."""
    selection = {"dataset": dataset, "split": cfg.split}
    best = results.rows("""
        WITH g AS (
            SELECT model, dataset, split, train_split, embedding, k, method, seed,
                   arg_max({'layer': layer, 'miou_lo': miou_lo, 'miou_hi': miou_hi, 'nmi': nmi, 'nmi_lo': nmi_lo,
                            'nmi_hi': nmi_hi}, miou) AS b,
                   max(miou) AS miou, count(*) AS n_layers
            FROM segmentation GROUP BY ALL)
        SELECT model, dataset, split, train_split, embedding, k, method, seed, b.layer::SMALLINT AS best_layer, miou,
               b.miou_lo, b.miou_hi, b.nmi, b.nmi_lo, b.nmi_hi, n_layers::SMALLINT AS n_layers
        FROM g ORDER BY ALL""", **selection)
    results.write_table("best_layers", best, dataset=dataset, model=None, part=cfg.split)
    points = results.rows("""
        SELECT s.k, s.method, s.embedding, s.nmi, s.miou, a.kq
        FROM segmentation s LEFT JOIN (SELECT model, layer, avg(mean) AS kq FROM attention_mi GROUP BY ALL) a
        USING (model, layer)""", **selection)
    corr = []
    for k, method in sorted({(p["k"], p["method"]) for p in points}):
        group = [p for p in points if (p["k"], p["method"]) == (k, method)]
        with np.errstate(divide="ignore"):
            log_miou = np.log(np.array([p["miou"] for p in group], dtype=float))
        kq = [p for p in group if p["embedding"] in ("keys", "queries") and p["kq"] is not None]
        for name, (x, y) in {"nmi_vs_log_miou": ([p["nmi"] for p in group], log_miou),
                             "kq_nmi_vs_attention_mi": ([p["nmi"] for p in kq], [p["kq"] for p in kq])}.items():
            rho, n, p = metrics.spearman(x, y)
            corr.append({"dataset": dataset, "split": cfg.split, "k": k, "method": method, "name": name,
                         "rho": bootstrap.finite_or_none(rho), "p_value": bootstrap.finite_or_none(p), "n_pairs": n})
    results.write_table("correlations", corr, dataset=dataset, model=None, part=cfg.split)
