"""The explain stage: ULTra explanation maps, per-image concepts and their scores (PROTOCOL.md s. 10).

It runs like ``extract``: Ray actors (``ExplainWorker``) own the model, re-read the split's
images through the same dataset adapter and geometry (the dataset's fingerprint and the
model's must equal the store's), and write the maps of every patch token and the class token
of the chosen layers into the model group (``explanations/<f>-<embedding>``, section 8.4), one
(layer, image chunk) at a time with ``done`` flags, so an interrupted run resumes. The same
actors then cluster each image's maps into concepts and segments (10.3), score them per image
(the ``per_image`` oracle, ITIoU over tau) and put tokens to the perturbation test (10.6). The
driver gathers the per-image results: ``ultra_runs``, ``ultra_oracle``, ``ultra_itiou``,
``ultra_perturbation``, and, given a train split, the ``dataset`` scoring: segment descriptors
clustered by spherical k-means with K = C, the K-cluster maps scored by section 5 into its
tables (method ``ultra_s`` | ``ultra_e``).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rep_pipeline.pipeline import metrics, runner
from rep_pipeline.pipeline.backend import get_backend
from rep_pipeline.pipeline.config import ExplainConfig, resolve_layers
from rep_pipeline.pipeline.datasets import build_dataset
from rep_pipeline.pipeline.devices import torch_device
from rep_pipeline.pipeline.errors import ConfigError, FingerprintMismatchError, StoreError
from rep_pipeline.pipeline.finite import finite_or
from rep_pipeline.pipeline.footprints import patch_labels
from rep_pipeline.pipeline.kmeans import LloydKMeans, PCAInit, l2_normalize
from rep_pipeline.pipeline.leases import Lease, leases, leases_beside
from rep_pipeline.pipeline.progress import ImageProgress
from rep_pipeline.pipeline.results import Results
from rep_pipeline.pipeline.segscore import ClusterMapScores, finish_scores
from rep_pipeline.pipeline.store import DatasetSplit, FeatureStore, ModelSplit, check_store_location, fingerprint_hash
from rep_pipeline.pipeline.upsample import scaled_upsampled
from rep_pipeline.storage_schemas import feature_store as store_layout
from rep_pipeline.storage_schemas import results as layout

SECTION5 = ("segmentation", "per_class_iou", "classwise_mi", "confusion", "matching")
METHODS = {"sum": "ultra_s", "energy": "ultra_e", "learned": "ultra_w"}
EXAMPLES = 4           # images whose maps, dendrograms and segmentations figures u1 to u3 show
EXAMPLE_TOKENS = 4     # tokens per example image in figures u1, u2
EXAMPLE_ZETAS = (0.2, 0.4, 0.6)  # figure u3's cuts
HEADLINE_TAU = 0.2


@dataclass
class ExplainResult:
    model: str
    results: str
    images: int = 0
    images_explained: int = 0
    run_id: str = ""
    lines: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> list[str]:
        return [f"explain {self.model}: {self.images} images ({self.images_explained} explained now) in "
                f"{self.seconds:.1f} s; run {self.run_id[:12]}, tables ultra_runs, ultra_oracle, ultra_itiou, "
                f"ultra_perturbation in {self.results}", *self.lines]


# -- what to explain ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Split:
    name: str
    data: DatasetSplit
    group: ModelSplit
    n_images: int


def _splits(cfg: ExplainConfig, store: FeatureStore) -> tuple[str, list[_Split]]:
    """The dataset and the (test, and train) splits: finished groups of one model's features."""
    wanted = [cfg.split] + ([cfg.train_split] if cfg.train_split else [])
    dataset = store.dataset_of(cfg.model, cfg.split, cfg.dataset)
    out = []
    for split in wanted:
        group = store.model_split(cfg.model, dataset, split)
        if not group.finished:
            raise StoreError(f"{group.path} is not finished; run the same extract command to complete it")
        group.check_embedding("tokens")  # segment descriptors and the check of z (section 10.4, 10.11)
        data = store.dataset_split(dataset, split)
        out.append(_Split(split, data, group, min(cfg.limit, data.n_images)))
    if len(out) > 1 and out[0].group.meta.weights_sha256 != out[1].group.meta.weights_sha256:
        raise StoreError(f"{out[0].group.path} and {out[1].group.path} hold features of different weights")
    return dataset, out


def _layers(cfg: ExplainConfig, group: ModelSplit) -> tuple[int, ...]:
    """The requested blocks (each captured), or the middle and the last captured one (s. 10.8)."""
    captured = group.layers
    layers = (resolve_layers(cfg.layers, captured) if cfg.layers
              else tuple(sorted({captured[(len(captured) - 1) // 2], captured[-1]})))
    for layer in layers:
        group.layer_slot(layer)
    return tuple(layers)


def _dataset(cfg: ExplainConfig, name: str, split: _Split) -> tuple[Any, list[Any]]:
    """The dataset adapter the store's split was made with, checked against its fingerprint, and
    the split's items."""
    options = split.data.meta.placement_options
    dataset = build_dataset(name, cfg.data_root, **options)
    items = dataset.items(split.name, split.data.n_images)
    found = dataset.fingerprint(split.name, items, split.data.meta.image_size)
    stored = {**split.data.fingerprint, "options": options}
    if fingerprint_hash(found) != fingerprint_hash(stored):
        differ = sorted(k for k in set(found) | set(stored) if found.get(k) != stored.get(k))
        raise FingerprintMismatchError(f"{split.data.path}: the images under --data-root {cfg.data_root} are not the "
                                       f"ones the store was extracted from ({', '.join(differ)} differ)")
    return dataset, items


def run_id(cfg: ExplainConfig, dataset: str, splits: list[_Split], layers: tuple[int, ...]) -> str:
    """The hash of everything a run's scores depend on."""
    return fingerprint_hash({"model": cfg.model, "dataset": dataset, "split": cfg.split, "embedding": cfg.embedding,
                             "f": cfg.f, "layers": list(layers), "choices": cfg.choices(),
                             "features": [s.group.fingerprint_hash for s in splits],
                             "n_images": [s.n_images for s in splits]})


# -- the workers --------------------------------------------------------------------------------------
class ExplainWorker:
    """Owns one model; explains image chunks into the store and scores them (a Ray actor)."""

    def __init__(self, cfg: ExplainConfig, dataset: str, layers: tuple[int, ...], threads: int | None = None):
        self._init_error: Exception | None = None
        try:
            self._build(cfg, dataset, layers, threads)
        except Exception as exc:  # raised by the first call, as itself
            self._init_error = exc

    def _build(self, cfg: ExplainConfig, dataset: str, layers: tuple[int, ...], threads: int | None) -> None:
        import torch

        from rep_pipeline.pipeline.model_input import ModelInput
        from rep_pipeline.pipeline.registry import build_model

        from .rollout import Explainer

        if threads:
            torch.set_num_threads(threads)
        self.cfg, self.layers = cfg, layers
        store = FeatureStore(cfg.store, mode="a")  # the maps go into it
        self.splits = {s.name: s for s in _splits(cfg, store)[1]}
        first = next(iter(self.splits.values()))
        meta = first.group.meta
        self.device = torch_device(cfg.device)
        self.loaded = build_model(meta.model, cfg.weights, meta.image_size, cfg.seed)
        self.loaded.model.to(self.device)
        self.explainer = Explainer(self.loaded, layers, cfg.embedding, cfg.f, meta.last_norm_mode, meta.rope_mode,
                                   cfg.memory_budget)
        self.input = ModelInput(self.loaded, self.device)
        self.datasets = {name: _dataset(cfg, dataset, s) for name, s in self.splits.items()}  # (adapter, items)

    def fit(self) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
        """ULTra_W (section 10.7): the ULTra_S maps of the first ``fit_images`` train images, then
        the unit vectors of every explained layer fitted on their segments."""
        from .learned import fit_projections
        from .rollout import Explainer

        if self._init_error is not None:
            raise self._init_error
        cfg, s = self.cfg, self.splits[self.cfg.train_split]
        S, G, meta = s.data.meta.image_size, s.group.meta.grid, s.group.meta
        ulta_s = Explainer(self.loaded, self.layers, cfg.embedding, "sum", meta.last_norm_mode, meta.rope_mode,
                           cfg.memory_budget)
        dataset, items = self.datasets[s.name]
        images, maps = [], {layer: [] for layer in self.layers}
        for item in items[: cfg.fit_images]:
            image, _, geometry = dataset.load_placed(item, S, cfg.max_image_pixels)
            x = self.input(image[None], geometry[None], pad=dataset.geometry == "pad")
            out = ulta_s.explain(x)
            images.append(x[0])
            for layer in self.layers:
                maps[layer].append(out[layer].maps.numpy())
        fitted, reports = {}, {}
        for layer in self.layers:
            fitted[layer], choices = fit_projections(ulta_s, images, maps[layer], layer, G, S, zeta=cfg.zeta,
                                                     k=cfg.k_img, aggregate=cfg.aggregate, seed=cfg.draw_seed)
            reports[str(layer)] = {k: choices[k] for k in ("n_images", "n_pairs", "steps", "loss_per_step")
                                   if k in choices}
        return fitted, reports

    def use_projections(self, projections: dict[int, np.ndarray]) -> None:
        """Explain with f_w and these vectors from now on."""
        self.projections = {layer: np.array(w) for layer, w in projections.items()}  # writable copies

    def fingerprint(self) -> dict[str, Any]:
        if self._init_error is not None:
            raise self._init_error
        return self.loaded.describe()

    def process(self, split: str, chunk: int) -> dict[str, Any]:
        """Explain image chunk ``chunk`` of ``split`` where not done, then score its images."""
        if self._init_error is not None:
            raise self._init_error
        s = self.splits[split]
        book = s.group.explanations(self.cfg.f, self.cfg.embedding)
        start, stop = book.bounds(chunk)
        dataset, items = self.datasets[split]
        items = items[start:stop]
        loaded = [dataset.load_placed(it, s.data.meta.image_size, self.cfg.max_image_pixels)
                  for it in items]
        images, geometry = np.stack([p[0] for p in loaded]), np.stack([p[2] for p in loaded])
        x = self.input(images, geometry, pad=dataset.geometry == "pad")
        labels = s.data.read_labels(start, stop)
        tokens = {layer: s.group.read_features("tokens", layer, start, stop).astype(np.float32) for layer in self.layers}
        explained = 0
        maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if all(book.is_done(layer, chunk) for layer in self.layers):
            maps = {layer: book.read(layer, start, stop) for layer in self.layers}
        else:
            w = getattr(self, "projections", None) if self.cfg.f == "learned" else None
            out = [self.explainer.explain(x[i:i + 1], w=w) for i in range(stop - start)]
            explained = stop - start
            for layer in self.layers:
                m = np.stack([o[layer].maps.numpy() for o in out])
                c = np.stack([o[layer].class_map.numpy() for o in out])
                if self.cfg.embedding == "tokens":
                    self._check(np.stack([o[layer].z.numpy() for o in out]), tokens[layer], split, start, layer)
                maps[layer] = (m, c)
            for layer in self.layers:
                book.write(layer, chunk, *maps[layer])
        scored = self._score(split, start, x, images, labels, tokens, maps)
        return {"split": split, "chunk": chunk, "start": start, "explained": explained, **scored}

    def _check(self, z: np.ndarray, stored: np.ndarray, split: str, start: int, layer: int) -> None:
        """The ULTra forward's tokens equal the store's to float16 tolerance (section 10.11)."""
        npt = self.loaded.num_prefix_tokens
        patch = z[:, npt:].reshape(stored.shape)
        bad = ~np.isclose(patch.astype(np.float16).astype(np.float32), stored, rtol=2e-2, atol=2e-2).all(axis=(1, 2, 3))
        if bad.any():
            first = start + int(np.flatnonzero(bad)[0])
            raise FingerprintMismatchError(f"{self.splits[split].group.path}: block {layer}'s tokens of image {first} "
                                           f"differ from the store's; are --weights and --data-root the ones it was "
                                           f"extracted with?")

    def _score(self, split: str, start: int, x: Any, images: np.ndarray, labels: np.ndarray,
               tokens: dict[int, np.ndarray], maps: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
        """Per image and layer: its segments and their descriptors, and on the test split the
        oracle's confusion, ITIoU over tau and the perturbation distances."""
        from . import concepts, perturb

        cfg, s = self.cfg, self.splits[split]
        G, S = s.group.meta.grid, s.data.meta.image_size
        C, ignore = len(s.data.meta.classes), s.data.meta.ignore_index
        test = split == cfg.split
        out: dict[str, Any] = {"layers": {}}
        for layer in self.layers:
            m, class_maps = maps[layer]
            rows: dict[str, list[Any]] = {"segments": [], "descriptors": [], "confusion": [], "itiou": [],
                                          "n_tokens": [], "perturbation": []}
            for i in range(len(m)):
                scaled = scaled_upsampled(m[i], G, S)  # M(S~_i): the concepts' and ITIoU's
                segments, _, _ = concepts.segment_image(m[i], G, S, cfg.zeta, cfg.k_img, cfg.aggregate, scaled)
                rows["segments"].append(segments)
                rows["descriptors"].append(concepts.segment_descriptors(segments, tokens[layer][i]))
                if not test:
                    continue
                rows["confusion"].append(concepts.per_image_confusion(segments, labels[i], C, ignore))
                values, n_tok = concepts.itiou_sweep(scaled, patch_labels(labels[i], G, ignore).ravel(), labels[i],
                                                     cfg.taus, ignore)
                rows["itiou"].append(values)
                rows["n_tokens"].append(n_tok)
                rng = np.random.default_rng([cfg.draw_seed, start + i, layer])
                chosen = perturb.choose_tokens(G * G, cfg.tokens_per_image, rng)
                embed = lambda batch, layer=layer: self.explainer.embed(batch)[layer]  # noqa: E731
                rows["perturbation"].append({mode: perturb.perturbation_distances(
                    embed, x[i], m[i], self.loaded.num_prefix_tokens, G, chosen, cfg.rho, mode, rng)
                    for mode in cfg.perturbations})
            out["layers"][layer] = rows
            if start < EXAMPLES and test:
                out.setdefault("examples", {})[layer] = self._examples(m, class_maps, images, labels, start, G, S)
        return out

    def _examples(self, m: np.ndarray, class_maps: np.ndarray, images: np.ndarray, labels: np.ndarray, start: int,
                  G: int, S: int) -> dict[str, np.ndarray]:
        """Figures u1 to u3 of the first images: maps of a few tokens and the class token, the
        dendrogram and the segmentations at several cuts."""
        from . import concepts

        cfg = self.cfg
        n = min(len(m), EXAMPLES - start)
        tokens = np.linspace(0, G * G - 1, EXAMPLE_TOKENS + 2)[1:-1].round().astype(np.int64)
        linkage, cuts, sigma = [], [], []
        for i in range(n):
            per_zeta = [concepts.segment_image(m[i], G, S, z, None, cfg.aggregate) for z in EXAMPLE_ZETAS]
            linkage.append(per_zeta[0][2])
            cuts.append(np.stack([seg.astype(np.uint16) for seg, _, _ in per_zeta]))
            _, clusters, _ = concepts.segment_image(m[i], G, S, cfg.zeta, cfg.k_img, cfg.aggregate)
            sigma.append(concepts.concept_maps(clusters, scaled_upsampled(m[i], G, S), cfg.aggregate))
        width = max(len(c) for c in sigma)  # the run's concept maps, padded with NaN to one count
        concept = np.full((n, width, S, S), np.nan, np.float32)
        for i, c in enumerate(sigma):
            concept[i, : len(c)] = c
        return {"images": images[:n], "labels": labels[:n], "tokens": tokens, "token_maps": m[:n][:, tokens],
                "class_maps": class_maps[:n], "linkage": np.stack(linkage), "cuts": np.stack(cuts),
                "concepts": concept}


# -- the stage ----------------------------------------------------------------------------------------
def is_done(cfg: ExplainConfig) -> bool:
    """The results hold this run (same choices, maps and features). Reads only."""
    if not cfg.store.exists() or not cfg.results.is_dir():
        return False
    try:
        store = FeatureStore(cfg.store)
        dataset, splits = _splits(cfg, store)
        rid = run_id(cfg, dataset, splits, _layers(cfg, splits[0].group))
        results = Results(cfg.results)
        if "ultra_runs" not in results.tables():
            return False
        return bool(results.rows("SELECT 1 FROM ultra_runs WHERE run_id = ?", [rid]))
    except StoreError:
        return False


def run_explain(cfg: ExplainConfig, *, address: str | None = None, progress: bool = True) -> ExplainResult:
    """Explain, segment and score; everything that needs no model is checked first."""
    t0 = time.perf_counter()
    check_store_location(cfg.store, writable=True)
    store = FeatureStore(cfg.store)
    dataset, splits = _splits(cfg, store)
    layers = _layers(cfg, splits[0].group)
    for s in splits:  # the images: same adapter, geometry and fingerprint as the store's
        _dataset(cfg, dataset, s)
    Results(cfg.results, mode="a")
    held = [Lease(leases_beside(cfg.store), f"{s.group.path}/explanations", f"{cfg.store}/{s.group.path}/explanations")
            for s in splits] + [Lease(leases_beside(cfg.results), f"explain-{cfg.model}-{cfg.split}",
                                      f"the explanations of {cfg.model} on {cfg.split} in {cfg.results}")]
    with leases(*held):
        return _explain(cfg, address, progress, dataset, layers, t0)


def _explain(cfg: ExplainConfig, address: str | None, progress: bool, dataset: str, layers: tuple[int, ...],
             t0: float) -> ExplainResult:
    store = FeatureStore(cfg.store, mode="a")
    _, splits = _splits(cfg, store)
    runner.ensure_ray(address)
    gpus = runner.cluster_gpus() if cfg.device != "cpu" else 0
    if cfg.device == "cuda" and gpus == 0:
        raise ConfigError("--device cuda: the Ray cluster has no GPU")
    chunk_images = splits[0].group.chunk_images
    tasks = [(s.name, c) for s in splits for c in range(store_layout.n_chunks(s.n_images, chunk_images))]
    n_actors = min(cfg.workers or gpus or len(runner.node_cpus()), len(tasks))
    threads = None if gpus else (cfg.threads_per_worker or runner.cpus_per_actor(n_actors))
    result = ExplainResult(cfg.model, str(cfg.results), images=sum(s.n_images for s in splits))
    parts: list[dict[str, Any]] = []
    with runner.ActorPool(ExplainWorker, [(cfg, dataset, layers, threads)] * n_actors, num_cpus=1 if gpus else threads,
                          num_gpus=1 if gpus else 0) as pool:
        for fp in pool.call_all("fingerprint"):
            meta = splits[0].group.meta
            differ = [k for k in ("model", "timm_name", "weights_sha256", "image_size", "grid", "embed_dim")
                      if json.dumps(fp.get(k)) != json.dumps(meta.get(k))]
            if differ:
                raise FingerprintMismatchError(f"{splits[0].group.path} was extracted from other weights or geometry "
                                               f"({', '.join(differ)} differ); pass the --weights it was extracted with")
        # checked: now the groups the workers write into (created once, by the driver)
        books = {s.name: s.group.require_explanations(cfg.f, cfg.embedding, layers, s.n_images,
                                                      cfg.hyperparameters()) for s in splits}
        if cfg.f == "learned":  # ULTra_W: the vectors first (fitted once, kept with the maps)
            train = books[cfg.train_split]
            if train.projections() is None:
                fitted, report = pool.call_one("fit")
                for book in books.values():
                    book.write_projections(fitted, report)
            pool.call_all("use_projections", train.projections())
        with ImageProgress(f"explain {cfg.model}", result.images, enabled=progress) as bar:
            for _, part in pool.map_unordered("process", tasks):
                parts.append(part)
                result.images_explained += int(part["explained"])
                n = books[part["split"]].bounds(part["chunk"])
                bar.advance(n[1] - n[0])
    rid = run_id(cfg, dataset, splits, layers)
    result.run_id = rid
    _write(cfg, dataset, splits, layers, parts, rid, result)
    result.seconds = time.perf_counter() - t0
    return result


def _gather(parts: list[dict[str, Any]], split: str, layer: int, key: str) -> list[Any]:
    """A per-image list of ``key`` at ``layer`` over every chunk of ``split``, in image order."""
    out: list[Any] = []
    for part in sorted((p for p in parts if p["split"] == split), key=lambda p: p["start"]):
        out += part["layers"][layer][key]
    return out


def _write(cfg: ExplainConfig, dataset: str, splits: list[_Split], layers: tuple[int, ...],
           parts: list[dict[str, Any]], rid: str, result: ExplainResult) -> None:
    test = splits[0]
    base = {"run_id": rid, "model": cfg.model, "dataset": dataset, "split": cfg.split}
    tables: dict[str, list[dict[str, Any]]] = {t: [] for t in ("ultra_oracle", "ultra_itiou", "ultra_perturbation",
                                                                *SECTION5)}
    scored: list[tuple[ClusterMapScores, dict[str, Any]]] = []  # the dataset scoring per layer
    from . import concepts, perturb

    for layer in layers:
        segments = _gather(parts, cfg.split, layer, "segments")
        confusion = np.sum(_gather(parts, cfg.split, layer, "confusion"), axis=0)
        oracle = concepts.oracle_scores(confusion)
        tables["ultra_oracle"].append({**base, "layer": layer, "miou": oracle["miou"],
                                       "pixel_accuracy": oracle["pixel_accuracy"],
                                       "mean_segments_per_image": float(np.mean([int(s.max()) + 1 for s in segments])),
                                       "n_images": len(segments)})
        itiou = np.asarray(_gather(parts, cfg.split, layer, "itiou"), dtype=np.float64)  # (image, tau)
        n_tokens = int(np.sum(_gather(parts, cfg.split, layer, "n_tokens")))
        for j, tau in enumerate(cfg.taus):
            have = np.isfinite(itiou[:, j])
            tables["ultra_itiou"].append({**base, "layer": layer, "tau": float(tau),
                                          "itiou": float(itiou[have, j].mean()) if have.any() else None,
                                          "n_images": int(have.sum()), "n_tokens": n_tokens})
        distances = _gather(parts, cfg.split, layer, "perturbation")
        for mode in cfg.perturbations:
            pos = [d[mode][0] for d in distances]
            neg = [d[mode][1] for d in distances]
            summary = perturb.summarise(pos, neg, seed=cfg.draw_seed) if cfg.tokens_per_image else {}
            tables["ultra_perturbation"].append({**base, "layer": layer, "perturbation": mode, "fraction": cfg.rho,
                                                 "tokens_per_image": min(cfg.tokens_per_image, test.group.meta.grid ** 2),
                                                 **{k: finite_or(v) for k, v in summary.items()},
                                                 "n_images": len(distances), "seed": cfg.draw_seed})
        if cfg.train_split:
            scored.append(_dataset_scores(cfg, dataset, splits, layer, parts))
    results = Results(cfg.results, mode="a")
    with results.staged_maps() as maps:
        _write_maps(maps, cfg, dataset, test, layers, parts, rid, scored, tables)
    for table, rows in tables.items():
        if rows or table.startswith("ultra_"):
            results.write_table(table, rows, dataset=dataset, model=cfg.model, part=f"{cfg.split}-ultra-{rid[:16]}")
    results.write_table("ultra_runs", [{**base, "embedding": cfg.embedding, "f": cfg.f, "layers": list(layers),
                                        "zeta": None if cfg.k_img else cfg.zeta, "k_img": cfg.k_img,
                                        "linkage": "average", "metric": "cosine", "aggregate": cfg.aggregate,
                                        "self_fill": "max_other", "order": "latest_left", "n_images": test.n_images,
                                        "store_fingerprint": test.group.fingerprint_hash}],
                        dataset=dataset, model=cfg.model, part=f"{cfg.split}-ultra-{rid[:16]}")
    best = max(tables["ultra_oracle"], key=lambda r: r["miou"])
    result.lines.append(f"  per-image oracle: best mIoU {best['miou']:.3f} at block {best['layer']}"
                        + "".join(f"; dataset scoring mIoU {r['miou']:.3f} (block {r['layer']})"
                                  for r in tables["segmentation"][:1]))


def _pad_concepts(parts: list[np.ndarray]) -> np.ndarray:
    """Concept maps of the example images from several chunks, (example, concept, S, S), NaN
    where an image has fewer concepts than the most."""
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0), (0, 0)), constant_values=np.nan)
                           for p in parts])


def _dataset_scores(cfg: ExplainConfig, dataset: str, splits: list[_Split], layer: int, parts: list[dict[str, Any]]
                    ) -> tuple[ClusterMapScores, dict[str, Any]]:
    """The ``dataset`` scoring (section 10.4): K = C spherical k-means (Lloyd, PCA initialisation)
    on the train split's segment descriptors; each test segment takes its nearest centroid and the
    K-cluster maps go through section 5 unchanged."""
    be = get_backend("numpy")
    test, train = splits
    meta = test.data.meta
    classes = list(meta.classes)
    C, ignore, S = len(classes), meta.ignore_index, meta.image_size
    train_desc = np.concatenate(_gather(parts, train.name, layer, "descriptors")).astype(np.float32)
    pca = PCAInit(be, train_desc.shape[1])
    pca.add(train_desc)
    pca.components()
    lloyd = LloydKMeans(be, [pca.centroids(C, cfg.draw_seed)], len(train_desc), tol=1e-4, max_iter=100)
    unit = l2_normalize(np, train_desc)
    while not lloyd.done:
        lloyd.accumulate(unit, 0)
        lloyd.update()
    centroids = lloyd.centroids()[0]
    acc = ClusterMapScores(C, C, S, be)
    dy, dx = metrics.random_shifts(test.n_images, S, cfg.draw_seed)
    labels = test.data.read_labels(0, test.n_images).astype(np.int64)  # one read
    examples = []
    for i, (segments, desc) in enumerate(zip(_gather(parts, cfg.split, layer, "segments"),
                                             _gather(parts, cfg.split, layer, "descriptors"))):
        cluster_of = (l2_normalize(np, desc.astype(np.float32)) @ centroids.T).argmax(1)
        clusters = cluster_of[segments.astype(np.int64)][None].astype(np.int16)
        acc.add(clusters, labels[i:i + 1], (dy[i:i + 1], dx[i:i + 1]), ignore)
        if i < store_layout.EXAMPLE_IMAGES:
            examples.append(clusters)
    acc.examples = examples
    setting = dict(model=cfg.model, dataset=dataset, split=cfg.split, train_split=train.name, embedding=cfg.embedding,
                   layer=layer, k=C, method=METHODS[cfg.f], seed=cfg.draw_seed)
    return acc, setting


def _write_maps(maps: Any, cfg: ExplainConfig, dataset: str, test: _Split, layers: tuple[int, ...],
                parts: list[dict[str, Any]], rid: str, scored: list[tuple[ClusterMapScores, dict[str, Any]]],
                tables: dict[str, list[dict[str, Any]]]) -> None:
    """Per layer: every test image's segment map, the examples of figures u1 to u3, and the
    section 5 rows and maps of the ``dataset`` scoring (written here: they need the maps store)."""
    classes = list(test.data.meta.classes)
    palette = test.data.meta.palette_array
    ids = test.data.image_ids()[: store_layout.EXAMPLE_IMAGES]
    fps = {"store_fingerprint": test.group.fingerprint_hash, "codebook_fingerprint": rid}
    for acc, setting in scored:
        finish_scores(tables, maps, acc, setting, classes, palette, test.n_images, fps, ids)
    for layer in layers:
        segments = _gather(parts, cfg.split, layer, "segments")
        dtype = np.uint8 if max(int(s.max()) for s in segments) < 256 else np.uint16
        example = {}
        for part in sorted((p for p in parts if p["split"] == cfg.split and "examples" in p), key=lambda p: p["start"]):
            for key, value in part["examples"][layer].items():
                if key == "concepts":  # a list of (n, k, S, S) of different k, padded when written
                    example.setdefault(key, []).append(value)
                    continue
                example[key] = value if key == "tokens" else (np.concatenate([example[key], value])
                                                              if key in example else value)
        maps.write(layout.ultra_maps(dataset, cfg.split, cfg.model, rid, layer),
                   attrs={"run_id": rid, "layer": layer, "tokens": example["tokens"].tolist(),
                          "zetas": list(EXAMPLE_ZETAS), "grid": test.group.meta.grid,
                          "n_prefix": test.group.meta.n_prefix, "rho": cfg.rho,
                          "tau": HEADLINE_TAU},
                   segments=np.stack(segments).astype(dtype), images=example["images"], labels=example["labels"],
                   token_maps=example["token_maps"].astype(np.float32), class_maps=example["class_maps"].astype(np.float32),
                   linkage=example["linkage"].astype(np.float64), cuts=example["cuts"],
                   concepts=_pad_concepts(example["concepts"]))


__all__ = ["ExplainResult", "ExplainWorker", "is_done", "run_explain"]
