"""The extract stage's driver: checks the request, creates or reopens the store groups, hands
the chunks that are not done yet to a pool of ``Extractor`` actors (``extractor.py``) and
finalises each split when all of its chunks are in. Everything that needs no model (options,
paths, weights files, the dataset's listing, the store, the leases) is checked here before
torch, the model or Ray is loaded.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from rep_pipeline.pipeline import config, runner
from rep_pipeline.pipeline.config import ExtractConfig
from rep_pipeline.pipeline.datasets import Item, SegmentationDataset, build_dataset
from rep_pipeline.pipeline.errors import ConfigError, DataRootError, FingerprintMismatchError, StoreError
from rep_pipeline.pipeline.leases import LEASE_TTL_S, Lease, leases, leases_beside
from rep_pipeline.pipeline.progress import ImageProgress
from rep_pipeline.pipeline.registry import check_weights, get_spec, store_key, weights_identity
from rep_pipeline.pipeline.store import FeatureStore, check_store_location, fingerprint_hash
from rep_pipeline.storage_schemas.feature_store import chunk_bounds, dataset_path, model_path


def request(cfg: ExtractConfig, dataset: SegmentationDataset, split: str, items: list[Item]) -> dict[str, Any]:
    """What a finished model group must answer to count as this request's output: model,
    weights identity (a file's content hash), geometry, capture options (``example_attention``
    included), limit, chunk size and the dataset split's fingerprint. Cheap: no model is built."""
    spec = get_spec(cfg.model)
    return {"model": spec.alias, "timm_name": spec.timm_name,
            "weights": weights_identity(spec, cfg.weights, cfg.seed), "image_size": cfg.image_size,
            "layers": "all" if cfg.layers is None else list(cfg.layers), "embeddings": list(cfg.embeddings),
            "class_embeddings": list(cfg.kept_class_embeddings), "rope": cfg.rope, "last_norm": cfg.last_norm, "limit": cfg.limit, "chunk_images": cfg.chunk_images,
            "dataset_fingerprint": fingerprint_hash(dataset.fingerprint(split, items, cfg.image_size)),
            # only where asked for, so that the requests recorded before the option existed still match
            **({"example_attention": True} if cfg.example_attention else {})}


def is_done(cfg: ExtractConfig) -> bool:
    """The store holds this request's finished features for every split (``request``). Reads
    only; builds no model."""
    if not cfg.store.exists():
        return False
    try:
        store = FeatureStore(cfg.store)
    except StoreError:
        return False
    key = store_key(cfg.model, cfg.model_key)
    dataset = build_dataset(cfg.dataset, cfg.data_root, **cfg.dataset_options)
    for split in cfg.splits or dataset.splits():
        if (key, cfg.dataset, split) not in store.model_splits():
            return False
        group = store.model_split(key, cfg.dataset, split)
        wanted = fingerprint_hash(request(cfg, dataset, split, dataset.items(split, cfg.limit)))
        if not group.finished or group.request_sha256 != wanted:
            return False
    return True


@dataclass
class SplitReport:
    split: str
    n_images: int
    chunks: int
    chunks_computed: int


@dataclass
class ExtractResult:
    store: str
    model: str
    dataset: str
    splits: list[SplitReport] = field(default_factory=list)
    seconds: float = 0.0
    images_computed: int = 0
    per_node: dict[str, int] = field(default_factory=dict)  # images computed on each Ray node (id prefix)

    @property
    def images_per_second(self) -> float:
        return self.images_computed / self.seconds if self.seconds else 0.0

    def summary(self) -> list[str]:
        return [*(f"{self.model} / {self.dataset}/{s.split}: {s.n_images} images, {s.chunks_computed} of "
                  f"{s.chunks} chunks computed now" for s in self.splits),
                f"wrote {self.images_computed} images in {self.seconds:.1f} s "
                f"({self.images_per_second:.1f} img/s) to {self.store}",
                *([f"  node {n}: {c} images ({c / self.seconds:.1f} img/s)" for n, c in sorted(self.per_node.items())]
                  if len(self.per_node) > 1 and self.seconds else [])]


def _check_files(dataset: SegmentationDataset, split: str, items: list[Item]) -> None:
    """Every listed file exists: one listing per folder, not a request per file (on object
    storage a HEAD per image of a 49k-image split would take longer than extracting it)."""
    by_folder: dict[Any, list[Any]] = {}
    for path in (p for it in items for p in (it.image_path, it.label_path) if p is not None):
        by_folder.setdefault(path.parent, []).append(path)
    missing = []
    for folder, paths in by_folder.items():
        present = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        missing += [p for p in paths if p.name not in present]
    if missing:
        shown = ", ".join(str(p) for p in missing[:5])
        raise DataRootError(f"{dataset.name}/{split}: {len(missing)} listed files do not exist: {shown}")


def _pool_shape(cfg: ExtractConfig) -> tuple[int, float, float, int | None]:
    """(actors, CPUs per actor, GPUs per actor, torch threads per actor)."""
    gpus = runner.cluster_gpus() if cfg.device != "cpu" else 0
    if cfg.device == "cuda" and gpus == 0:
        raise ConfigError("--device cuda: the Ray cluster has no GPU")
    if gpus:
        return cfg.workers or gpus, 1, 1, None
    workers = cfg.workers or len(runner.node_cpus())
    threads = cfg.threads_per_worker or runner.cpus_per_actor(workers)
    return workers, threads, 0, threads


@contextlib.contextmanager
def _keep_finished_writes(pool: runner.ActorPool) -> Iterator[None]:
    """On an error or Ctrl-C, let the actors finish the writes they have queued, so that
    every chunk already computed is kept; then let the error through."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            pool.call_all("flush")
        raise


def run_extract(cfg: ExtractConfig, *, address: str | None = None, progress: bool = True,
                on_chunk_done: Callable[[str, int, dict[str, float]], None] | None = None) -> ExtractResult:
    """Extract ``cfg`` into its store; resumes whatever an earlier run left unfinished.
    Everything that needs no model is checked before Ray starts or anything is written."""
    check_store_location(cfg.store, writable=True)
    if cfg.store.exists():
        FeatureStore(cfg.store)  # refuses, naming the file, a store that does not parse or is not ours
    check_weights(cfg.model, cfg.weights)
    dataset = build_dataset(cfg.dataset, cfg.data_root, **cfg.dataset_options)
    splits = cfg.splits or dataset.splits()
    split_items = {s: dataset.items(s, cfg.limit) for s in splits}  # raises on empty/unknown
    for split, items in split_items.items():
        _check_files(dataset, split, items)
    pairs = {s: dataset.keypoint_pairs(s, items) for s, items in split_items.items()}  # parsed and checked now

    key = store_key(cfg.model, cfg.model_key)
    held = [Lease(leases_beside(cfg.store), model_path(key, cfg.dataset, s), f"{cfg.store}/{model_path(key, cfg.dataset, s)}")
            for s in splits]
    with leases(*held):  # one writer per model group: a second run is refused, naming the first
        return _extract(cfg, key, dataset, split_items, pairs, address, progress, on_chunk_done)


def _extract(cfg: ExtractConfig, key: str, dataset: SegmentationDataset, split_items: dict[str, list[Item]],
             pairs: dict[str, list[dict[str, Any]] | None], address: str | None, progress: bool,
             on_chunk_done: Callable[[str, int, dict[str, float]], None] | None) -> ExtractResult:
    from .extractor import Extractor  # torch, timm and the capture: loaded once the checks have passed

    runner.ensure_ray(address)
    n_actors, cpus, gpus, threads = _pool_shape(cfg)
    result = ExtractResult(store=str(cfg.store), model=key, dataset=cfg.dataset)
    t0 = time.perf_counter()
    with runner.ActorPool(Extractor, [(cfg, threads)] * n_actors, num_cpus=cpus, num_gpus=gpus) as pool:
        fingerprints = pool.call_all("fingerprint")
        if any(fp != fingerprints[0] for fp in fingerprints[1:]):
            raise FingerprintMismatchError(f"the extractors of {key} loaded different weights or geometry; "
                                           f"is the weights file changing? {fingerprints}")
        store = FeatureStore(cfg.store, mode="a")
        for split, items in split_items.items():  # every split checked before any group is created
            store.check_request(key, dataset.fingerprint(split, items, cfg.image_size), cfg.chunk_images,
                                fingerprints[0])
        tasks, targets = [], {}
        for split, items in split_items.items():
            # models extracted side by side share the dataset split: its creation is one writer's
            with Lease(leases_beside(cfg.store), dataset_path(cfg.dataset, split), f"{cfg.store}/{split}",
                       wait=LEASE_TTL_S):
                data = store.require_dataset_split(
                    dataset.fingerprint(split, items, cfg.image_size), [it.image_id for it in items],
                    dataset.palette, cfg.chunk_images)
                if pairs[split] is not None and not data.has_keypoint_pairs():
                    data.write_keypoint_pairs(pairs[split])
            targets[split] = store.require_model_split(key, data, fingerprints[0])
            pending = targets[split].pending_chunks()
            tasks += [(key, split, c) for c in pending]
            result.splits.append(SplitReport(split, len(items), data.n_chunks, len(pending)))
        total = sum(stop - start for _, s, c in tasks
                    for start, stop in [chunk_bounds(c, cfg.chunk_images, len(split_items[s]))])
        with ImageProgress(f"extract {key}", total, enabled=progress) as bar, _keep_finished_writes(pool):
            for attempt in range(1 + config.ACTOR_MAX_TASK_RETRIES):
                for (_, split, chunk), stats in pool.map_unordered("process", tasks):
                    bar.advance(int(stats["images"]))
                    result.images_computed += int(stats["images"])
                    node = str(stats.get("node") or "local")[:8]
                    result.per_node[node] = result.per_node.get(node, 0) + int(stats["images"])
                    if len(result.per_node) > 1:  # on a cluster: images/s of each node
                        elapsed = max(time.perf_counter() - t0, 1e-9)
                        bar.describe(f"extract {key} [" + ", ".join(
                            f"{n} {c / elapsed:.1f} img/s" for n, c in sorted(result.per_node.items())) + "]")
                    if on_chunk_done is not None:
                        on_chunk_done(split, chunk, stats)
                pool.call_all("flush", skip_lost=True)  # a lost actor's writes are redone below
                # the store, not the task results, says what is done: a write lost with a
                # crashed actor after its task returned shows up here and is scheduled again
                tasks = [(key, split, c) for split, target in targets.items() for c in target.pending_chunks()]
                if not tasks:
                    break
            else:
                raise StoreError(f"{cfg.store}: chunks {tasks[:5]} still pending after {attempt + 1} attempts")
    for split, target in targets.items():
        target.finalize()
        target.record_request(request(cfg, dataset, split, split_items[split]))
    result.seconds = time.perf_counter() - t0
    return result
