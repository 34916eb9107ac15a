"""The correspond stage: zero-shot keypoint transfer and PCK (PROTOCOL.md section 11).

For one model group of a keypoint split (``keypoint_pairs.parquet`` beside its images), every
(pair, keypoint) is transferred for every requested (embedding, layer): the source keypoint's
upsampled feature against the target's upsampled features, cosine argmax inside the image
(``transfer``), mapped back to original pixels by the split's geometry. Workers (Ray actors)
take the (embedding, layer) settings; the driver scores them (``pck``) and writes
``correspondence``, ``correspondence_by_category``, ``correspondence_best``, optionally
``correspondence_matches``, the ``feature_groups`` row and figure c3's heatmaps. Every PCK
carries its 95 % bootstrap interval over the test pairs (``pck``, docs/uncertainty.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from rep_pipeline.pipeline import runner
from rep_pipeline.pipeline.backend import get_backend, namespace, to_device
from rep_pipeline.pipeline.config import CORRESPONDENCE_EMBEDDINGS, CorrespondConfig, resolve_layers
from rep_pipeline.pipeline.datasets.geometry import inside, to_grid, to_original
from rep_pipeline.pipeline.errors import StoreError
from rep_pipeline.pipeline.leases import Lease, leases, leases_beside
from rep_pipeline.pipeline.progress import ImageProgress
from rep_pipeline.pipeline.results import Results, feature_group_row
from rep_pipeline.pipeline.stage_result import SettingsResult
from rep_pipeline.pipeline.store import DatasetSplit, FeatureStore, ModelSplit, check_store_location, fingerprint_hash
from rep_pipeline.storage_schemas import results as results_layout

from . import pck, transfer

TABLES = ("correspondence", "correspondence_by_category", "correspondence_matches")
HEATMAP_ALPHA = 0.10  # the circle of figure c3 (the headline alpha)


@dataclass
class CorrespondResult(SettingsResult):
    pairs: int = 0
    keypoints: int = 0
    best: str = ""

    STAGE, TABLES = "correspond", ("correspondence", "correspondence_by_category", "correspondence_best")

    def work(self) -> str:
        return f"{self.keypoints} keypoints of {self.pairs} pairs over {super().work()}{self.best}"


@dataclass(frozen=True)
class Keypoints:
    """The split's keypoint pairs as columns, with image indices and grid positions."""

    pair_id: np.ndarray
    category: np.ndarray
    kp_id: np.ndarray
    src: np.ndarray          # image index of the source
    trg: np.ndarray          # image index of the target
    src_row: np.ndarray      # source keypoint's nearest grid pixel (A28)
    src_col: np.ndarray
    gt_x: np.ndarray         # target keypoint, original pixels
    gt_y: np.ndarray
    threshold: np.ndarray    # max(w_bb, h_bb) of the target box
    fingerprint: str         # hash of the pairs (every column but the split's own stamp)
    geometry: np.ndarray     # (image, 6) of the split: grid <-> original pixels
    size: int                # S

    @classmethod
    def of(cls, data: DatasetSplit) -> "Keypoints":
        table = data.keypoint_pairs()
        if table.num_rows == 0:
            raise StoreError(f"{data.path}: keypoint_pairs.parquet holds no pairs")
        col = lambda name: table.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
        index = {image_id: i for i, image_id in enumerate(data.image_ids())}
        src = np.array([index[i] for i in col("src_image_id")])
        trg = np.array([index[i] for i in col("trg_image_id")])
        geometry, size = data.geometry(), data.meta.image_size
        if not geometry[np.union1d(src, trg), 0].all():
            raise StoreError(f"{data.path}/geometry: rows of keypoint images are not written; run the same extract "
                             f"command to complete the split")
        u, v = to_grid(col("src_x"), col("src_y"), geometry[src])
        # nearest grid pixel, kept inside the image's part of the grid
        lo_u, lo_v = np.maximum(geometry[src, 4], 0), np.maximum(geometry[src, 5], 0)
        hi_u = np.minimum(geometry[src, 4] + geometry[src, 2], size) - 1
        hi_v = np.minimum(geometry[src, 5] + geometry[src, 3], size) - 1
        bbox = np.stack([col(f"trg_bbox_{c}") for c in ("x1", "y1", "x2", "y2")], axis=1)
        return cls(col("pair_id").astype(str), col("category").astype(str), col("kp_id").astype(np.int64), src, trg,
                   np.clip(np.floor(v + 0.5), lo_v, hi_v).astype(np.int64),
                   np.clip(np.floor(u + 0.5), lo_u, hi_u).astype(np.int64),
                   col("trg_x").astype(np.float64), col("trg_y").astype(np.float64), pck.thresholds(bbox),
                   fingerprint_hash({"pairs": table.drop(["dataset_fingerprint"]).to_pydict()}), geometry, size)


# -- the work of one (embedding, layer) ----------------------------------------------------------
class CorrespondWorker:
    """Transfers every keypoint for its (embedding, layer) settings (a Ray actor)."""

    def __init__(self, cfg: CorrespondConfig, dataset: str, settings: list[tuple[str, int]], examples: list[int]):
        self.cfg, self.dataset, self.settings, self.examples = cfg, dataset, settings, examples
        self.done = 0

    def progress(self) -> int:
        return self.done

    def run(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        be = get_backend(cfg.backend)
        store = FeatureStore(cfg.store)
        group = store.model_split(cfg.model, self.dataset, cfg.split)
        data = store.dataset_split(self.dataset, cfg.split)
        kp = Keypoints.of(data)
        out = []
        for emb, layer in self.settings:
            features = group.read_features(emb, layer, 0, group.n_images)
            pred, score, maps = transfer_all(be, features, kp, self.examples)
            out.append({"embedding": emb, "layer": layer, "pred": pred, "score": score, "maps": maps})
            self.done += 1
        return out


def transfer_all(be: Any, features: np.ndarray, kp: Keypoints, examples: list[int]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every keypoint row: the predicted target grid pixel (flat, row-major), its cosine,
    and the cosine maps (len(examples), S, S) of the rows ``examples``. One target image at a
    time: its neighbour Grams once, every keypoint that lands on it at once."""
    xp, geometry, size = be.xp, kp.geometry, kp.size
    pred = np.zeros(len(kp.src), np.int64)
    score = np.zeros(len(kp.src), np.float64)
    maps = np.full((len(examples), size, size), np.nan, np.float32)
    example_slot = {row: j for j, row in enumerate(examples)}
    order = np.argsort(kp.trg, kind="stable")
    bounds = np.flatnonzero(np.diff(kp.trg[order])) + 1
    for rows in np.split(order, bounds):
        t = int(kp.trg[rows[0]])
        by_source = _by_source(kp.src, rows)
        parts = [transfer.sample(be.asarray(features[s]), be.asarray(kp.src_row[sel]), be.asarray(kp.src_col[sel]),
                                 size) for s, sel in by_source]
        queries = namespace(*parts).concat(parts)
        rows = np.concatenate([sel for _, sel in by_source])
        target = transfer.TargetFeatures(be.asarray(features[t]), size, be.asarray(inside(geometry[t], size)), xp)
        idx, best = target.match(queries)
        pred[rows], score[rows] = be.to_numpy(idx), be.to_numpy(best)
        shown = [i for i, r in enumerate(rows) if int(r) in example_slot]
        if shown:
            picked = namespace(queries).take(queries, to_device(np.asarray(shown), queries), axis=0)  # host rows
            cos = be.to_numpy(target.cosine_maps(picked))
            for i, m in zip(shown, cos):
                maps[example_slot[int(rows[i])]] = m
    return pred, score, maps


def _by_source(src: np.ndarray, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``rows`` grouped by their source image, in order of first appearance."""
    sources, first = np.unique(src[rows], return_index=True)
    return [(int(s), rows[src[rows] == s]) for s in sources[np.argsort(first)]]


# -- what to transfer ------------------------------------------------------------------------------
def _group(cfg: CorrespondConfig, store: FeatureStore) -> tuple[str, ModelSplit, DatasetSplit]:
    dataset = store.dataset_of(cfg.model, cfg.split, cfg.dataset)
    group = store.model_split(cfg.model, dataset, cfg.split)
    if not group.finished:
        raise StoreError(f"{group.path} is not finished; run the same extract command to complete it")
    return dataset, group, store.dataset_split(dataset, cfg.split)  # its pairs: Keypoints.of


def _settings(cfg: CorrespondConfig, group: ModelSplit) -> tuple[tuple[str, ...], tuple[int, ...]]:
    embeddings = cfg.embeddings or tuple(e for e in CORRESPONDENCE_EMBEDDINGS if e in group.embeddings)
    if not embeddings:
        raise StoreError(f"{group.path} holds none of {', '.join(CORRESPONDENCE_EMBEDDINGS)}; extract with "
                         f"--embeddings {','.join(CORRESPONDENCE_EMBEDDINGS)}")
    for emb in embeddings:
        group.check_embedding(emb)
    layers = resolve_layers(cfg.layers, group.layers) if cfg.layers else group.layers
    for layer in layers:
        group.layer_slot(layer)
    return embeddings, tuple(layers)


def _examples(kp: Keypoints, n_stored: int, wanted: int) -> list[int]:
    """Rows of figure c3: the first keypoint of the first ``wanted`` pairs whose two images are
    among the split's stored example images."""
    chosen, seen = [], set()
    for row in np.flatnonzero((kp.src < n_stored) & (kp.trg < n_stored)):
        if kp.pair_id[row] not in seen and len(chosen) < wanted:
            seen.add(kp.pair_id[row])
            chosen.append(int(row))
    return chosen


def _record(cfg: CorrespondConfig, group: ModelSplit, pairs_fp: str) -> dict[str, Any]:
    """What a run's rows depend on besides their settings."""
    return {"alphas": list(cfg.alphas), "keep_matches": cfg.keep_matches, "examples": cfg.examples,
            "store_fingerprint": group.fingerprint_hash, "pairs_fingerprint": pairs_fp}


def is_done(cfg: CorrespondConfig) -> bool:
    """The results hold every requested (embedding, layer) for these features, pairs and
    options (recorded with the heatmaps). Reads only."""
    if not cfg.store.exists() or not cfg.results.is_dir():
        return False
    try:
        store = FeatureStore(cfg.store)
        dataset, group, data = _group(cfg, store)
        embeddings, layers = _settings(cfg, group)
        recorded = Results(cfg.results).maps().run_record(results_layout.correspondence_maps(dataset, cfg.split,
                                                                                             cfg.model))
    except StoreError:
        return False
    wanted = {(e, layer) for e in embeddings for layer in layers}
    return (recorded.record("correspond") == _record(cfg, group, Keypoints.of(data).fingerprint)
            and wanted <= recorded.done())


def run_correspond(cfg: CorrespondConfig, *, address: str | None = None, progress: bool = True) -> CorrespondResult:
    """Transfer every keypoint for every requested (embedding, layer); write the tables."""
    t0 = time.perf_counter()
    check_store_location(cfg.store)
    store = FeatureStore(cfg.store)
    dataset, group, data = _group(cfg, store)
    embeddings, layers = _settings(cfg, group)
    kp = Keypoints.of(data)
    Results(cfg.results, mode="a")  # a results folder of another version is refused before any work
    lease = Lease(leases_beside(cfg.results), f"correspond-{cfg.model}-{cfg.split}",
                  f"the correspondence of {cfg.model} on {cfg.split} in {cfg.results}")
    with leases(lease):
        return _correspond(cfg, address, progress, dataset, group, data, kp, embeddings, layers, t0)


def _correspond(cfg: CorrespondConfig, address: str | None, progress: bool, dataset: str, group: ModelSplit,
                data: DatasetSplit, kp: Keypoints, embeddings: tuple[str, ...], layers: tuple[int, ...],
                t0: float) -> CorrespondResult:
    settings = [(e, layer) for e in embeddings for layer in layers]
    examples = _examples(kp, len(data.example_images()), cfg.examples)
    runner.ensure_ray(address)
    gpus = runner.cluster_gpus() if cfg.backend != "numpy" else 0
    n_workers = min(cfg.workers or gpus or len(runner.node_cpus()), len(settings))
    cpus = 1 if gpus else runner.cpus_per_actor(n_workers)
    parts = [settings[i::n_workers] for i in range(n_workers)]
    out: list[dict[str, Any]] = []
    with runner.ActorPool(CorrespondWorker, [(cfg, dataset, p, examples) for p in parts if p], num_cpus=cpus,
                          num_gpus=1 if gpus else 0, max_concurrency=2) as pool, \
            ImageProgress(f"correspond {cfg.model}", len(settings), unit="setting", enabled=progress) as bar:
        for part in pool.run_all("run", poll=bar.update):
            out += part
        bar.update(len(settings))
    pairs_fp = kp.fingerprint
    tables = _tables(cfg, dataset, group, data, kp, out, pairs_fp)
    results = Results(cfg.results, mode="a")
    for table in TABLES:
        if table == "correspondence_matches" and not cfg.keep_matches:
            continue
        for emb, layer in settings:
            rows = [r for r in tables[table] if r["embedding"] == emb and r["layer"] == layer]
            results.write_table(table, rows, dataset=dataset, model=cfg.model, part=f"{cfg.split}-{emb}-l{layer}")
    results.write_table("feature_groups", [feature_group_row(cfg.model, dataset, cfg.split, group)], dataset=dataset,
                        model=cfg.model, part=cfg.split)
    best = _best(results, cfg, dataset, group, pairs_fp)
    _write_heatmaps(results, cfg, dataset, group, data, kp, out, examples, best, settings)
    result = CorrespondResult(cfg.model, str(cfg.results), settings=len(settings), pairs=len(np.unique(kp.pair_id)),
                              keypoints=len(kp.src))
    top = [b for b in best if b["model_best"] and abs(b["alpha"] - HEATMAP_ALPHA) < 1e-9]
    if top:
        result.best = f"; best PCK@0.1 {top[0]['pck_point']:.3f} ({top[0]['embedding']}, block {top[0]['best_layer']})"
    result.seconds = time.perf_counter() - t0
    return result


def _tables(cfg: CorrespondConfig, dataset: str, group: ModelSplit, data: DatasetSplit, kp: Keypoints,
            out: list[dict[str, Any]], pairs_fp: str) -> dict[str, list[dict[str, Any]]]:
    geometry, size = kp.geometry, kp.size
    meta = group.meta
    run = {"image_size": size, "geometry": data.geometry_mode, "last_norm": meta.last_norm_mode,
           "rope": meta.rope_mode, "store_fingerprint": group.fingerprint_hash, "pairs_fingerprint": pairs_fp}
    base = {"model": cfg.model, "dataset": dataset, "split": cfg.split}
    tables: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
    categories = sorted(set(kp.category))
    for o in out:
        rows, cols = np.divmod(o["pred"], size)
        pred_x, pred_y = to_original(cols, rows, geometry[kp.trg])
        err = pck.errors(pred_x, pred_y, kp.gt_x, kp.gt_y)
        setting = {**base, "embedding": o["embedding"], "layer": int(o["layer"])}
        for alpha in cfg.alphas:
            tables["correspondence"].append({**setting, "alpha": float(alpha),
                                             **pck.pck(err, kp.threshold, kp.pair_id, alpha), **run})
            for cat in categories:
                sel = kp.category == cat
                tables["correspondence_by_category"].append(
                    {**setting, "alpha": float(alpha), "category": cat,
                     **pck.pck(err[sel], kp.threshold[sel], kp.pair_id[sel], alpha), **run})
        if cfg.keep_matches:
            tables["correspondence_matches"] += [
                {**setting, "pair_id": p, "kp_id": int(k), "category": c, "pred_x": float(px), "pred_y": float(py),
                 "gt_x": float(gx), "gt_y": float(gy), "error": float(e), "threshold": float(t), "score": float(s)}
                for p, k, c, px, py, gx, gy, e, t, s in zip(kp.pair_id, kp.kp_id, kp.category, pred_x, pred_y,
                                                            kp.gt_x, kp.gt_y, err, kp.threshold, o["score"])]
    return tables


def _best(results: Results, cfg: CorrespondConfig, dataset: str, group: ModelSplit, pairs_fp: str) -> list[dict]:
    """``correspondence_best`` over every layer the results hold for these features and pairs
    (this run's and earlier runs'), rewritten whole."""
    rows = results.rows("SELECT embedding, layer, alpha, pck_point, pck_point_lo, pck_point_hi FROM correspondence "
                        "WHERE model = ? AND split = ? AND store_fingerprint = ? AND pairs_fingerprint = ?",
                        [cfg.model, cfg.split, group.fingerprint_hash, pairs_fp], dataset=dataset)
    best = [{"model": cfg.model, "dataset": dataset, "split": cfg.split, **b,
             "store_fingerprint": group.fingerprint_hash} for b in pck.best_layers(rows)]
    results.write_table("correspondence_best", best, dataset=dataset, model=cfg.model, part=cfg.split)
    return best


def _write_heatmaps(results: Results, cfg: CorrespondConfig, dataset: str, group: ModelSplit, data: DatasetSplit,
                    kp: Keypoints, out: list[dict[str, Any]], examples: list[int], best: list[dict],
                    settings: list[tuple[str, int]]) -> None:
    """Figure c3's inputs: per example keypoint and embedding, the source and target images,
    the target's cosine map at every layer, and where the keypoint and predictions lie."""
    geometry, size = kp.geometry, kp.size
    images = data.example_images()
    record = _record(cfg, group, kp.fingerprint)
    maps_path = results_layout.correspondence_maps(dataset, cfg.split, cfg.model)
    done = [[e, layer] for e, layer in settings]
    try:  # the settings of an earlier run with the same options, features and pairs stay done
        before = results.maps().run_record(maps_path)
        if before.record("correspond") == record:
            done += [list(s) for s in before.settings or () if list(s) not in done]
    except StoreError:
        pass
    best_of = {b["embedding"]: b["best_layer"] for b in best if abs(b["alpha"] - HEATMAP_ALPHA) < 1e-9}
    with results.staged_maps() as maps:
        for emb in sorted({o["embedding"] for o in out}):
            mine = sorted((o for o in out if o["embedding"] == emb), key=lambda o: o["layer"])
            for j, row in enumerate(examples):
                t = kp.trg[row]
                gu, gv = to_grid(kp.gt_x[row], kp.gt_y[row], geometry[t])
                scale = geometry[t, 2] / geometry[t, 0]
                maps.write(results_layout.correspondence_example(dataset, cfg.split, cfg.model, emb, j),
                           attrs={"pair_id": str(kp.pair_id[row]), "kp_id": int(kp.kp_id[row]),
                                  "category": str(kp.category[row]), "embedding": emb,
                                  "layers": [int(o["layer"]) for o in mine],
                                  "source_point": [int(kp.src_row[row]), int(kp.src_col[row])],
                                  "target_point": [float(gv), float(gu)],
                                  "predictions": [[int(o["pred"][row] // size), int(o["pred"][row] % size)]
                                                  for o in mine],
                                  "alpha": HEATMAP_ALPHA, "radius": float(HEATMAP_ALPHA * kp.threshold[row] * scale),
                                  "best_layer": best_of.get(emb)},
                           source=images[kp.src[row]], target=images[t],
                           cosine=np.stack([o["maps"][j] for o in mine]).astype(np.float16))
        maps.write(maps_path, attrs={"correspond": record, "settings": done})
