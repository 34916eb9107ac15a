"""The cluster stage: fit cosine k-means codebooks on the feature store.

All requested (layer, embedding, K, method) codebooks of a worker train in one pass over the
store: each image chunk is read once (on a read-ahead thread) and feeds every codebook that
needs it; codebooks of one (layer, embedding) share one matrix product per batch. Several
workers (Ray actors, one per GPU or a chosen number on the CPU) split the (layer, embedding)
groups between them. A codebook is written, and marked done, only once fully trained.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from threadpoolctl import threadpool_limits

from rep_pipeline.pipeline import runner
from rep_pipeline.pipeline.backend import get_backend
from rep_pipeline.pipeline.config import ClusterConfig, resolve_layers
from rep_pipeline.pipeline.errors import ConfigError, StoreError
from rep_pipeline.pipeline.leases import Lease, leases_beside
from rep_pipeline.pipeline.progress import ImageProgress
from rep_pipeline.pipeline.results import Results
from rep_pipeline.pipeline.store import FeatureStore, ModelSplit, check_store_location
from rep_pipeline.pipeline.finite import check_finite
from rep_pipeline.pipeline.streaming import FeatureKey, FeatureStream
from rep_pipeline.storage_schemas.feature_store import model_path
from rep_pipeline.storage_schemas.results import curve_part

from rep_pipeline.pipeline.kmeans import LloydKMeans, OnlineKMeans, PCAInit, l2_normalize


@dataclass(frozen=True)
class GroupPlan:
    """The codebooks one (embedding, layer) feature set trains: K values per method."""

    embedding: str
    layer: int
    ks: dict[str, tuple[int, ...]]   # method -> Ks still to train

    @property
    def key(self) -> FeatureKey:
        return (self.embedding, self.layer)

    @property
    def cost(self) -> int:
        return sum(sum(k) for k in self.ks.values())


class ClusterWorker:
    """Trains the codebooks of some (embedding, layer) groups in one pass; Ray actor or plain."""

    def __init__(self, cfg: ClusterConfig, model: str, dataset: str, plans: list[GroupPlan],
                 threads: int | None = None):
        self.cfg, self.model, self.dataset, self.plans = cfg, model, dataset, plans
        self.be = get_backend(cfg.backend)
        self._progress = 0
        # On the CPU the (embedding, layer) groups of a batch are independent: one thread each
        # keeps every core busy where NumPy runs single-threaded (casts, argmax, sparse sums).
        # A GPU runs them one after another on its stream.
        threads = threads or os.cpu_count() or 1
        self._threads = 1 if self.be.name == "cupy" else max(1, min(threads, len(plans)))
        self._executor: ThreadPoolExecutor | None = None

    @contextlib.contextmanager
    def _parallel(self) -> Iterator[None]:
        """Threads over groups, each with a single-threaded BLAS (threads inside threads would
        oversubscribe the cores)."""
        if self._threads < 2:
            yield
            return
        with ThreadPoolExecutor(self._threads, thread_name_prefix="codebooks") as pool, \
                threadpool_limits(1, user_api="blas"):
            self._executor = pool
            try:
                yield
            finally:
                self._executor = None

    def _each(self, fn: Callable[[FeatureKey], Any], keys: list[FeatureKey]) -> list[Any]:
        """``fn`` of every key, on the worker's threads; results in order."""
        if self._executor is None or len(keys) < 2:
            return [fn(key) for key in keys]
        return list(self._executor.map(fn, keys))

    @property
    def threads(self) -> int:
        """Threads the (embedding, layer) groups are trained on (1 on a GPU)."""
        return self._threads

    def progress(self) -> int:
        return self._progress

    def total_work(self) -> int:
        cfg = self.cfg
        methods = {m for p in self.plans for m, ks in p.ks.items() if ks}
        return cfg.init_batches + (cfg.steps if "online" in methods else 0) + (cfg.max_iter if "lloyd" in methods else 0)

    def _vectors(self, raw: Any, image_index: np.ndarray, key: FeatureKey, group: ModelSplit,
                 checked: bool) -> Any:
        """(images, P, D) -> float32 (images*P, D) on the backend, finite-checked."""
        x = self.be.float32(raw)
        if not checked:
            check_finite(x, image_index, f"{group.path}/{key[0]} layer {key[1]}", self.be)
        return x.reshape(-1, x.shape[-1])

    def run(self) -> list[dict[str, Any]]:
        """Train every planned codebook; write centroids, done flags and training curves."""
        with self._parallel():
            return self._train()

    def _train(self) -> list[dict[str, Any]]:
        cfg, be, xp = self.cfg, self.be, self.be.xp
        group = FeatureStore(cfg.store).model_split(self.model, self.dataset, cfg.train_split)
        keys = [p.key for p in self.plans]
        stream = FeatureStream(group, keys, be, cfg.host_cache_bytes)

        def vectors(key: FeatureKey, index: np.ndarray, arrays: dict[FeatureKey, Any]) -> Any:
            return self._vectors(arrays[key], index, key, group, stream.checked)

        pca = {k: PCAInit(be, stream.dim) for k in keys}
        init = itertools.islice(stream.shuffled(cfg.batch_images, cfg.seed), 0,
                                cfg.init_batches * cfg.init_interval, cfg.init_interval)  # 12.2: every n-th batch
        for index, arrays in init:
            self._each(lambda key: pca[key].add(vectors(key, index, arrays)), keys)
            self._progress += 1
        self._each(lambda key: pca[key].components(), keys)  # the eigendecompositions
        curves: list[dict[str, Any]] = []
        finished: list[tuple[GroupPlan, str, int, Any]] = []
        online = {p.key: (p, OnlineKMeans(be, [pca[p.key].centroids(k, cfg.seed) for k in p.ks["online"]], cfg.lr))
                  for p in self.plans if p.ks.get("online")}
        if online:
            losses: list[tuple[int, FeatureKey, Any]] = []
            for step, (index, arrays) in enumerate(stream.shuffled(cfg.batch_images, cfg.seed), start=1):
                step_losses = self._each(
                    lambda key: online[key][1].step(l2_normalize(xp, vectors(key, index, arrays))), list(online))
                if step % cfg.log_every == 0 or step == 1 or step == cfg.steps:
                    losses += [(step, key, loss) for key, loss in zip(online, step_losses)]
                self._progress += 1
                if step == cfg.steps:
                    break
            for step, key, loss in losses:
                plan = online[key][0]
                for k, value in zip(plan.ks["online"], be.to_numpy(loss).tolist()):
                    curves.append(self._row(plan, "online", k, step, value, None))
            for plan, trainer in online.values():
                finished += [(plan, "online", k, c) for k, c in zip(plan.ks["online"], trainer.centroids())]
        lloyd = {p.key: (p, LloydKMeans(be, [pca[p.key].centroids(k, cfg.seed) for k in p.ks["lloyd"]],
                                        stream.n_images * stream.patches, cfg.tol, cfg.max_iter))
                 for p in self.plans if p.ks.get("lloyd")}
        while lloyd and not all(t.done for _, t in lloyd.values()):
            offset = 0
            for index, arrays in stream.sequential():
                self._each(lambda key: lloyd[key][1].accumulate(l2_normalize(xp, vectors(key, index, arrays)), offset),
                           [key for key, (_, trainer) in lloyd.items() if not trainer.done])
                offset += len(index) * stream.patches
            for key, (plan, trainer) in lloyd.items():
                if trainer.done:
                    continue
                passes = list(trainer.iterations)  # before update() counts this pass
                for k, done_passes, stats in zip(plan.ks["lloyd"], passes, trainer.update()):
                    if stats is not None:
                        curves.append(self._row(plan, "lloyd", k, done_passes + 1, -stats[0], stats[1]))
            self._progress += 1
        for plan, trainer in lloyd.values():
            finished += [(plan, "lloyd", k, c) for k, c in zip(plan.ks["lloyd"], trainer.centroids())]

        store = FeatureStore(cfg.store, mode="a")
        target = store.model_split(self.model, self.dataset, cfg.train_split)
        results = Results(cfg.results, mode="a")
        books = {}
        for plan, method, k, centroids in finished:
            book = books.setdefault((method, k), target.codebook(method, k, cfg.seed, cfg.variant,
                                                                 replacement=cfg.force))
            rows = [r for r in curves if (r["embedding"], r["layer"], r["method"], r["k"]) ==
                    (plan.embedding, plan.layer, method, k)]
            for r in rows:
                r["codebook_fingerprint"], r["store_fingerprint"] = book.fingerprint_hash, target.fingerprint_hash
            results.write_table("training_curves", rows, dataset=self.dataset, model=self.model,
                                part=curve_part(cfg.train_split, method, k, cfg.seed, plan.embedding, plan.layer,
                                                cfg.variant))
            book.write(plan.embedding, plan.layer, be.to_numpy(centroids))  # last: marks it done
        node = runner.node_id()
        return [{"embedding": p.embedding, "layer": p.layer, "method": m, "k": k, "node": node}
                for p, m, k, _ in finished]

    def _row(self, plan: GroupPlan, method: str, k: int, step: int, loss: float, changed: float | None) -> dict:
        return {"model": self.model, "dataset": self.dataset, "split": self.cfg.train_split,
                "embedding": plan.embedding, "layer": plan.layer, "k": k, "method": method,
                "seed": self.cfg.seed, "step": step, "loss": float(loss), "changed_fraction": changed,
                "store_fingerprint": "", "codebook_fingerprint": ""}


@dataclass
class ClusterResult:
    model: str
    dataset: str
    trained: list[dict[str, Any]] = field(default_factory=list)
    reused: int = 0
    seconds: float = 0.0
    results: str = ""

    def summary(self) -> list[str]:
        return [f"{self.model} / {self.dataset}: trained {len(self.trained)} codebooks, reused {self.reused} "
                f"finished ones, in {self.seconds:.1f} s; training curves in {self.results}/training_curves"]


def _resolve(cfg: ClusterConfig, store: FeatureStore) -> tuple[str, ModelSplit]:
    """The dataset and finished model group the codebooks train on; clear errors otherwise."""
    candidates = [d for m, d, s in store.model_splits() if m == cfg.model and s == cfg.train_split]
    if cfg.dataset is not None:
        candidates = [d for d in candidates if d == cfg.dataset]
    if not candidates:
        have = ", ".join("/".join(t) for t in store.model_splits()) or "none"
        raise StoreError(f"feature store {store.path} has no features of model {cfg.model!r} on split "
                         f"{cfg.train_split!r}{' of ' + cfg.dataset if cfg.dataset else ''} (has: {have})")
    if len(candidates) > 1:
        raise ConfigError(f"model {cfg.model!r} has split {cfg.train_split!r} in several datasets "
                          f"({', '.join(candidates)}); choose one with --dataset")
    group = store.model_split(cfg.model, candidates[0], cfg.train_split)
    if not group.finished:
        raise StoreError(f"{store.path}/{group.path} is not finished ({len(group.pending_chunks())} chunks pending); "
                         f"complete it with the same extract command first")
    return candidates[0], group


def _requested(cfg: ClusterConfig, store: FeatureStore) -> tuple[str, ModelSplit, tuple[str, ...], tuple[int, ...],
                                                                    tuple[int, ...]]:
    """(dataset, group, embeddings, layers, Ks) that ``cfg`` asks for, checked against the store."""
    dataset, group = _resolve(cfg, store)
    layers = resolve_layers(cfg.layers, group.layers) if cfg.layers is not None else group.layers
    for layer in layers:
        group.layer_slot(layer)  # raises, naming the captured layers
    embeddings = cfg.embeddings or group.embeddings
    for emb in embeddings:
        group.check_embedding(emb)  # raises, naming the captured embeddings
    n_classes = len(store.dataset_split(dataset, cfg.train_split).meta.classes)
    ks = cfg.k or ((n_classes,) if n_classes >= 2 else None)
    if ks is None:
        raise ConfigError(f"{dataset} has no class list to take K from; pass --k")
    n_vectors = group.n_images * group.meta.grid ** 2
    if max(ks) > n_vectors:
        raise ConfigError(f"K={max(ks)} is larger than the {n_vectors} patch vectors of "
                          f"{group.path} ({group.n_images} images)")
    return dataset, group, tuple(embeddings), tuple(layers), tuple(ks)


def is_done(cfg: ClusterConfig) -> bool:
    """Every requested codebook exists, trained with these hyperparameters on these features,
    and is finished for every requested (embedding, layer). Reads only."""
    if cfg.force or not cfg.store.exists():
        return False
    try:
        _, group, embeddings, layers, ks = _requested(cfg, FeatureStore(cfg.store))
    except StoreError:
        return False
    for method in cfg.methods:
        for k in ks:
            book = group.trained_codebook(method, k, cfg.seed, cfg.hyperparameters(method), cfg.variant)
            if book is None or not all(book.is_done(e, layer) for e in embeddings for layer in layers):
                return False
    return True


def plan_codebooks(cfg: ClusterConfig) -> tuple[str, list[GroupPlan], int]:
    """(dataset, the groups still to train, how many requested codebooks are already done).
    Creates the codebook groups (emptied first with ``force``)."""
    store = FeatureStore(cfg.store, mode="a")
    dataset, group, embeddings, layers, ks = _requested(cfg, store)
    if not cfg.force:  # every codebook checked before any is created
        for m in cfg.methods:
            for k in ks:
                group.check_codebook(m, k, cfg.seed, cfg.hyperparameters(m), cfg.variant)
    books = {(m, k): group.require_codebook(m, k, cfg.seed, cfg.hyperparameters(m), force=cfg.force,
                                            variant=cfg.variant)
             for m in cfg.methods for k in ks}
    for book in books.values():  # every array made here, before workers write layers into them side by side
        for emb in embeddings:
            book.require(emb)
    plans, reused = [], 0
    for emb in embeddings:
        for layer in layers:
            todo = {m: tuple(k for k in ks if not books[(m, k)].is_done(emb, layer)) for m in cfg.methods}
            reused += sum(len(ks) - len(v) for v in todo.values())
            if any(todo.values()):
                plans.append(GroupPlan(emb, layer, todo))
    return dataset, plans, reused


def _split_plans(plans: list[GroupPlan], n: int) -> list[list[GroupPlan]]:
    """Balance groups over ``n`` workers by cost (largest first onto the least loaded)."""
    loads = [(0, i, []) for i in range(n)]
    for plan in sorted(plans, key=lambda p: -p.cost):
        load, i, bucket = min(loads)
        bucket.append(plan)
        loads[i] = (load + plan.cost, i, bucket)
    return [bucket for _, _, bucket in sorted(loads, key=lambda t: t[1]) if bucket]


def run_cluster(cfg: ClusterConfig, *, address: str | None = None, progress: bool = True,
                on_progress: Callable[[int], None] | None = None) -> ClusterResult:
    """Train every requested codebook that is not already finished (all of them with force)."""
    t0 = time.perf_counter()
    check_store_location(cfg.store, writable=True)
    Results(cfg.results, mode="a")  # refuses a results folder of another version before training
    codebooks = f"{model_path(cfg.model, _resolve(cfg, FeatureStore(cfg.store))[0], cfg.train_split)}/codebooks"
    with Lease(leases_beside(cfg.store), codebooks, f"{cfg.store}/{codebooks}"):  # one trainer at a time
        return _cluster(cfg, address, progress, on_progress, t0)


def _cluster(cfg: ClusterConfig, address: str | None, progress: bool, on_progress: Callable[[int], None] | None,
             t0: float) -> ClusterResult:
    dataset, plans, reused = plan_codebooks(cfg)
    result = ClusterResult(cfg.model, dataset, reused=reused, results=str(cfg.results))
    if not plans:
        result.seconds = time.perf_counter() - t0
        return result
    runner.ensure_ray(address)
    gpus = runner.cluster_gpus() if cfg.backend != "numpy" else 0
    n_workers = min(cfg.workers or gpus or len(runner.node_cpus()), len(plans))
    cpus = 1 if gpus else runner.cpus_per_actor(n_workers)
    buckets = _split_plans(plans, n_workers)
    pool = runner.ActorPool(ClusterWorker, [(cfg, cfg.model, dataset, b, cpus) for b in buckets],
                            num_cpus=cpus, num_gpus=1 if gpus else 0, max_concurrency=2)
    with pool:
        total = sum(pool.call_all("total_work"))
        with ImageProgress(f"cluster {cfg.model}", total, unit="step", enabled=progress) as bar:
            def poll(done: int) -> None:
                bar.update(done)
                if on_progress is not None:
                    on_progress(done)

            for trained in pool.run_all("run", poll=poll):
                result.trained += trained
            bar.update(total)  # Lloyd may converge before its max_iter budget
    if cfg.force:  # every replacement is complete: swap them in
        group = FeatureStore(cfg.store, mode="a").model_split(cfg.model, dataset, cfg.train_split)
        for method, k in sorted({(t["method"], t["k"]) for t in result.trained}):
            group.replace_codebook(method, k, cfg.seed, cfg.variant)
    result.seconds = time.perf_counter() - t0
    return result
