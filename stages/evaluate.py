"""The evaluate stage: unsupervised segmentation of the test split and every figure of
PROTOCOL.md section 5, written as Parquet tables (and maps into a Zarr results store).

For each model and (embedding, layer), the test features are read once, chunk by chunk;
every finished codebook of that feature set scores them in one matrix product. Scores are
upsampled bilinearly (align_corners=False) to the S x S label grid and each pixel takes its
best cluster: the same as upsampling the features first (upsampling is linear, and a pixel's
norm does not change its argmax), d/K times cheaper. Counts accumulate on the backend; the
formulas (``stages.metrics``) run on the counts once the pass is over.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.backend import Backend, get_backend
from pipeline.config import EvaluateConfig
from pipeline.errors import StoreError
from pipeline.progress import ImageProgress
from pipeline.store import Codebook, FeatureStore, MapStore, ModelSplit, fingerprint_hash
from storage_schemas import tables

from . import metrics
from .cluster import check_finite


def bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) weights of 1-D bilinear resampling with align_corners=False, as
    ``torch.nn.functional.interpolate`` computes it (source positions below 0 clamp to 0)."""
    pos = np.maximum((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0.0)
    lo = np.minimum(np.floor(pos).astype(np.int64), src - 1)
    hi = np.minimum(lo + 1, src - 1)
    frac = pos - lo
    weights = np.zeros((dst, src))
    np.add.at(weights, (np.arange(dst), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(dst), hi), frac)
    return weights.astype(np.float32)


def upsample(be: Backend, grid_values: Any, size: int) -> Any:
    """(n, G, G, c) -> (n, S, S, c), bilinear, align_corners=False: two small matrix products."""
    xp = be.xp
    u = be.asarray(bilinear_matrix(grid_values.shape[1], size))
    rows = xp.einsum("yi,nijc->nyjc", u, grid_values)
    return xp.einsum("xj,nyjc->nyxc", u, rows)


def segment(be: Backend, features: Any, centroids: Any, ks: tuple[int, ...], size: int) -> list[Any]:
    """Cluster maps (n, S, S) of raw patch ``features`` (n, G, G, d) for stacked unit
    ``centroids`` (sum K, d): one per codebook, by score upsampling."""
    scores = upsample(be, features @ centroids.T, size)
    out, start = [], 0
    for k in ks:
        out.append(scores[..., start:start + k].argmax(-1).astype(be.xp.int16))
        start += k
    return out


@dataclass
class _Accumulator:
    """What the evaluation needs of one codebook, summed over the test split."""

    k: int
    n_classes: int
    size: int
    be: Backend
    confusion: Any = None
    counts: Any = None          # (S, S, k) images whose pixel p fell in cluster k
    null_counts: Any = None     # the same after per-image random cyclic shifts
    examples: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        xp = self.be.xp
        self.confusion = xp.zeros(self.k * self.n_classes, dtype=xp.int64)
        self.counts = xp.zeros((self.size, self.size, self.k), dtype=xp.int64)
        self.null_counts = xp.zeros_like(self.counts)

    def add(self, clusters: Any, labels: Any, shifts: tuple[Any, Any], ignore: int) -> None:
        xp = self.be.xp
        c = clusters.astype(xp.int64)
        keep = labels != ignore
        self.confusion += xp.bincount((c[keep] * self.n_classes + labels[keep]), minlength=self.confusion.size)
        self.counts += metrics.position_class_counts(c, self.k, xp=xp)
        self.null_counts += metrics.position_class_counts(metrics.roll_maps(c, *shifts, xp=xp), self.k, xp=xp)


def _map_counts(counts: np.ndarray, mapping: np.ndarray, n_classes: int, size: int) -> np.ndarray:
    """(S, S, k) cluster counts -> (S, S, classes) counts of the mapped classes."""
    onehot = np.zeros((len(mapping), n_classes), dtype=np.int64)
    onehot[np.arange(len(mapping)), mapping] = 1
    return (counts.reshape(size * size, -1) @ onehot).reshape(size, size, n_classes)


@dataclass
class EvaluateResult:
    results: Path
    settings: int = 0
    models: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _shifts(n_images: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 7])
    return rng.integers(0, size, n_images), rng.integers(0, size, n_images)


def _codebooks_for(store: FeatureStore, model: str, dataset: str, split: str) -> list[tuple[str, Codebook]]:
    """(train split, codebook) of every codebook of ``model`` on ``dataset`` not trained on ``split``."""
    out = []
    for m, d, s in store.model_splits():
        if (m, d) == (model, dataset) and s != split:
            group = store.model_split(m, d, s)
            out += [(s, book) for book in group.codebooks()]
    return out


def run_evaluate(cfg: EvaluateConfig, *, progress: bool = True) -> EvaluateResult:
    """Evaluate every finished codebook of every model on ``cfg.split``; write the tables."""
    t0 = time.perf_counter()
    be = get_backend(cfg.backend)
    store = FeatureStore(cfg.store)
    maps = MapStore(cfg.results / "maps.zarr")
    result = EvaluateResult(cfg.results)
    targets = [(m, d) for m, d, s in store.model_splits() if s == cfg.split
               and (cfg.models is None or m in cfg.models) and (cfg.dataset is None or d == cfg.dataset)]
    if not targets:
        raise StoreError(f"feature store {store.path} has no model features on split {cfg.split!r}"
                         + (f" for models {list(cfg.models)}" if cfg.models else ""))
    datasets = sorted({d for _, d in targets})
    for dataset in datasets:
        _evaluate_ground_truth(cfg, be, store, maps, dataset)
    for model, dataset in targets:
        group = store.model_split(model, dataset, cfg.split)
        if not group.finished:
            raise StoreError(f"{store.path}/{group.path} is not finished; complete the extract run first")
        books = _codebooks_for(store, model, dataset, cfg.split)
        if not books:
            raise StoreError(f"model {model!r} on {dataset} has no codebooks; run `rep-pipeline cluster` first")
        rows = _evaluate_model(cfg, be, store, maps, group, dataset, books, progress)
        _write_model_tables(cfg, rows, dataset, model)
        _write_attention(cfg, maps, group, dataset, model)
        result.settings += len(rows["segmentation"])
        result.models.append(model)
    for dataset in datasets:
        _write_summaries(cfg, dataset)
    result.seconds = time.perf_counter() - t0
    return result


def _label_batches(store: FeatureStore, dataset: str, split: str) -> Iterator[tuple[int, np.ndarray]]:
    data = store.dataset_split(dataset, split)
    for c in range(data.n_chunks):
        start, stop = data.bounds(c)
        yield start, data.labels[start:stop]


def _evaluate_ground_truth(cfg: EvaluateConfig, be: Backend, store: FeatureStore, maps: MapStore, dataset: str) -> None:
    data = store.dataset_split(dataset, cfg.split)
    fp = data.fingerprint
    S, C, ignore = fp["image_size"], len(fp["classes"]), fp["ignore_index"]
    if C == 0:
        raise StoreError(f"{dataset}/{cfg.split} has no labels to evaluate against")
    dy, dx = _shifts(data.n_images, S, cfg.seed)
    counts = np.zeros((S, S, C), dtype=np.int64)
    null = np.zeros_like(counts)
    for start, labels in _label_batches(store, dataset, cfg.split):
        if ((labels >= C) & (labels != ignore)).any():
            raise StoreError(f"{data.path}/labels holds values outside 0..{C - 1} near image {start}")
        counts += metrics.position_class_counts(labels, C, ignore)
        shifted = metrics.roll_maps(labels, dy[start:start + len(labels)], dx[start:start + len(labels)])
        null += metrics.position_class_counts(shifted, C, ignore)
    pe, pe_null = metrics.positional_effect(counts), metrics.positional_effect(null)
    palette = np.asarray(data.group.attrs["palette"], dtype=np.uint8)
    maps.write(f"{dataset}/{cfg.split}/ground_truth", counts=counts,
               aggregate=metrics.aggregate_map(counts, palette), images=data.example_images(),
               labels=data.labels[: min(cfg.n_examples, data.n_images)],
               attrs={"classes": fp["classes"], "palette": palette.tolist(), "example_ids":
                      data.image_ids()[: min(cfg.n_examples, data.n_images)]})
    dfp = fingerprint_hash(fp)
    tables.write_table(cfg.results, "ground_truth", [{
        "dataset": dataset, "split": cfg.split, "mi": pe.mi, "nmi": pe.nmi, "mi_null": pe_null.mi,
        "nmi_bias_aware": (pe.mi - pe_null.mi) / pe.entropy, "n_images": data.n_images,
        "dataset_fingerprint": dfp}], dataset=dataset, model=None, part=f"{cfg.split}")
    tables.write_table(cfg.results, "classwise_mi", [{
        "model": "_ground_truth", "dataset": dataset, "split": cfg.split, "train_split": None, "embedding": None,
        "layer": None, "k": None, "method": None, "seed": None, "source": "ground_truth", "class_id": c,
        "class_name": fp["classes"][c], "mi": float(pe.classwise_mi[c]), "store_fingerprint": dfp,
        "codebook_fingerprint": None} for c in range(C)], dataset=dataset, model="_ground_truth",
        part=f"{cfg.split}")


def _evaluate_model(cfg: EvaluateConfig, be: Backend, store: FeatureStore, maps: MapStore, group: ModelSplit,
                    dataset: str, books: list[tuple[str, Codebook]], progress: bool) -> dict[str, list[dict]]:
    xp = be.xp
    data = store.dataset_split(dataset, cfg.split)
    fp = data.fingerprint
    classes, ignore, S = fp["classes"], fp["ignore_index"], fp["image_size"]
    C = len(classes)
    palette = np.asarray(data.group.attrs["palette"], dtype=np.uint8)
    store_fp = group.fingerprint_hash
    dy, dx = _shifts(data.n_images, S, cfg.seed)
    rows: dict[str, list[dict]] = {t: [] for t in ("segmentation", "per_class_iou", "classwise_mi", "confusion",
                                                   "matching")}
    example_ids = data.image_ids()[: cfg.n_examples]
    settings = [(emb, layer) for emb in group.embeddings for layer in group.layers]
    work = [(emb, layer, [(ts, b) for ts, b in books if b.is_done(emb, layer)]) for emb, layer in settings]
    work = [w for w in work if w[2]]
    with ImageProgress(f"evaluate {group.path.split('/')[1]}", len(work) * data.n_images, enabled=progress) as bar:
        for emb, layer, todo in work:
            cents = xp.concatenate([be.asarray(b.centroids(emb, layer)) for _, b in todo])
            ks = tuple(int(b.attrs["k"]) for _, b in todo)
            accs = [_Accumulator(k, C, S, be) for k in ks]
            feats = group.features(emb)
            slot = group.layer_slot(layer)
            for start, labels in _label_batches(store, dataset, cfg.split):
                stop = start + len(labels)
                raw = feats[slot, start:stop]
                check_finite(raw, np.arange(start, stop), f"{group.path}/{emb} layer {layer}")
                x = be.float32(raw)
                lab = be.asarray(labels).astype(xp.int64)
                shifts = (be.asarray(dy[start:stop]), be.asarray(dx[start:stop]))
                for i in range(0, stop - start, cfg.images_per_step):  # bounds the (n, S, S, sum K) scores
                    part = slice(i, i + cfg.images_per_step)
                    for acc, clusters in zip(accs, segment(be, x[part], cents, ks, S)):
                        acc.add(clusters, lab[part], (shifts[0][part], shifts[1][part]), ignore)
                        if start + i < cfg.n_examples:
                            acc.examples.append(be.to_numpy(clusters)[: cfg.n_examples - start - i])
                bar.advance(stop - start)
            for (train_split, book), acc in zip(todo, accs):
                _finish(cfg, rows, maps, acc, dict(
                    model=group.path.split("/")[1], dataset=dataset, split=cfg.split, train_split=train_split,
                    embedding=emb, layer=layer, k=acc.k, method=book.attrs["method"], seed=int(book.attrs["seed"])),
                    classes, palette, data.n_images, store_fp, book.fingerprint_hash, example_ids)
    return rows


def _finish(cfg: EvaluateConfig, rows: dict[str, list[dict]], maps: MapStore, acc: _Accumulator, setting: dict,
            classes: list[str], palette: np.ndarray, n_images: int, store_fp: str, book_fp: str,
            example_ids: list[str]) -> None:
    be, C, S = acc.be, len(classes), acc.size
    confusion = be.to_numpy(acc.confusion).reshape(acc.k, C)
    mapping, hungarian = metrics.hungarian_match(confusion)
    scores = metrics.segmentation_scores(confusion, mapping)
    counts = _map_counts(be.to_numpy(acc.counts), mapping, C, S)
    pe = metrics.positional_effect(counts)
    pe_null = metrics.positional_effect(_map_counts(be.to_numpy(acc.null_counts), mapping, C, S))
    fps = {"store_fingerprint": store_fp, "codebook_fingerprint": book_fp}
    rows["segmentation"].append({**setting, "miou": scores.miou, "pixel_accuracy": scores.pixel_accuracy,
                                 "mi": pe.mi, "nmi": pe.nmi, "mi_null": pe_null.mi,
                                 "nmi_bias_aware": (pe.mi - pe_null.mi) / pe.entropy if pe.entropy else float("nan"),
                                 "n_images": n_images, **fps})
    for c in range(C):
        iou = scores.iou[c]
        rows["per_class_iou"].append({**setting, "class_id": c, "class_name": classes[c],
                                      "iou": None if np.isnan(iou) else float(iou), **fps})
        rows["classwise_mi"].append({**setting, "source": "prediction", "class_id": c, "class_name": classes[c],
                                     "mi": float(pe.classwise_mi[c]), **fps})
    nz = np.argwhere(confusion > 0)
    rows["confusion"] += [{**setting, "cluster": int(k), "class_id": int(c), "pixels": int(confusion[k, c]), **fps}
                          for k, c in nz]
    rows["matching"] += [{**setting, "cluster": k, "class_id": int(mapping[k]), "hungarian": bool(hungarian[k]),
                          **fps} for k in range(acc.k)]
    examples = mapping[np.concatenate(acc.examples)] if acc.examples else np.zeros((0, S, S), np.int64)
    path = "/".join([setting["dataset"], setting["split"], setting["model"], setting["train_split"],
                     f"{setting['method']}-k{setting['k']}-s{setting['seed']}", setting["embedding"],
                     f"layer_{setting['layer']}"])
    maps.write(path, counts=counts, aggregate=metrics.aggregate_map(counts, palette),
               examples=examples.astype(np.uint8), attrs={"example_ids": example_ids, **fps})


def _write_model_tables(cfg: EvaluateConfig, rows: dict[str, list[dict]], dataset: str, model: str) -> None:
    for table, table_rows in rows.items():
        tables.write_table(cfg.results, table, table_rows, dataset=dataset, model=model, part=cfg.split)


def _write_attention(cfg: EvaluateConfig, maps: MapStore, group: ModelSplit, dataset: str, model: str) -> None:
    maps.write(f"{dataset}/{cfg.split}/{model}/attention", attention=group.attention_map(),
               attrs={"layers": list(group.layers), "grid": group.attrs["grid"]})
    mi = group.array("attention_mi")[:]  # (layer, image, head)
    rows = [{"model": model, "dataset": dataset, "split": cfg.split, "layer": layer, "head": h,
             "mean": float(mi[i, :, h].mean()), "std": float(mi[i, :, h].std()), "n_images": mi.shape[1],
             "store_fingerprint": group.fingerprint_hash}
            for i, layer in enumerate(group.layers) for h in range(mi.shape[2])]
    tables.write_table(cfg.results, "attention_mi", rows, dataset=dataset, model=model, part=cfg.split)


def _write_summaries(cfg: EvaluateConfig, dataset: str) -> None:
    """Best layers and correlations over every model in the results folder for this split."""
    import duckdb

    seg = f"read_parquet('{cfg.results}/segmentation/dataset={dataset}/**/*.parquet', union_by_name=true)"
    att = f"read_parquet('{cfg.results}/attention_mi/dataset={dataset}/**/*.parquet', union_by_name=true)"
    con = duckdb.connect()
    best = con.sql(f"""
        SELECT model, dataset, split, train_split, embedding, k, method, seed,
               arg_max(layer, miou)::SMALLINT AS best_layer, max(miou) AS miou, arg_max(nmi, miou) AS nmi,
               count(*)::SMALLINT AS n_layers
        FROM {seg} WHERE split = '{cfg.split}' GROUP BY ALL ORDER BY ALL""").fetch_arrow_table()
    tables.write_table(cfg.results, "best_layers", best.to_pylist(), dataset=dataset, model=None, part=cfg.split)
    corr = []
    points = con.sql(f"""
        SELECT s.k, s.method, s.embedding, s.nmi, s.miou, a.kq
        FROM {seg} s LEFT JOIN (SELECT model, layer, avg(mean) AS kq FROM {att} WHERE split = '{cfg.split}'
                                GROUP BY ALL) a USING (model, layer)
        WHERE s.split = '{cfg.split}'""").fetchall()
    for k, method in sorted({(p[0], p[1]) for p in points}):
        group = [p for p in points if (p[0], p[1]) == (k, method)]
        nmi = np.array([p[3] for p in group], dtype=float)
        with np.errstate(divide="ignore"):
            log_miou = np.log(np.array([p[4] for p in group], dtype=float))
        rho, n = metrics.spearman(nmi, log_miou)
        corr.append({"dataset": dataset, "split": cfg.split, "k": k, "method": method, "name": "nmi_vs_log_miou",
                     "rho": None if np.isnan(rho) else rho, "n_pairs": n})
        kq = [p for p in group if p[2] in ("keys", "queries") and p[5] is not None]
        rho, n = metrics.spearman([p[3] for p in kq], [p[5] for p in kq])
        corr.append({"dataset": dataset, "split": cfg.split, "k": k, "method": method,
                     "name": "kq_nmi_vs_attention_mi", "rho": None if np.isnan(rho) else rho, "n_pairs": n})
    tables.write_table(cfg.results, "correlations", corr, dataset=dataset, model=None, part=cfg.split)
