"""The ``Extractor``: one model, owned by a Ray actor (or a plain object in tests and
benchmarks), turning image chunks into store chunks."""
from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timezone
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from rep_pipeline.pipeline import runner
from rep_pipeline.pipeline.config import ExtractConfig, resolve_layers
from rep_pipeline.pipeline.datasets import Item, build_dataset
from rep_pipeline.pipeline.model_input import ModelInput
from rep_pipeline.pipeline.devices import torch_device
from rep_pipeline.pipeline.errors import NonFiniteFeaturesError, RepPipelineError
from rep_pipeline.pipeline.finite import all_finite, non_finite_images
from rep_pipeline.pipeline.registry import build_model
from rep_pipeline.pipeline.store import DatasetSplit, FeatureStore, ModelSplit
from rep_pipeline.storage_schemas.feature_store import EXAMPLE_ATTENTION, n_examples

from .capture import CaptureSpec, FeatureCapture


class Extractor:
    """Owns one model; turns image chunks into store chunks."""

    def __init__(self, cfg: ExtractConfig, threads: int | None = None):
        # An error while building (no weights, bad checkpoint) is kept and raised by the first
        # call, so it reaches the driver as itself rather than as a dead actor.
        self._init_error: Exception | None = None
        try:
            self._build(cfg, threads)
        except RepPipelineError as exc:
            self._init_error = exc

    def _build(self, cfg: ExtractConfig, threads: int | None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.device = torch_device(cfg.device)
        self.loaded = build_model(cfg.model, cfg.weights, cfg.image_size, cfg.seed)
        self.loaded.model.to(self.device)
        blocks = tuple(range(self.loaded.depth))
        layers = resolve_layers(cfg.layers, blocks) if cfg.layers is not None else blocks
        self.capture = FeatureCapture(
            self.loaded, CaptureSpec(layers=layers, embeddings=cfg.embeddings, class_embeddings=cfg.kept_class_embeddings,
                                     rope=cfg.rope, last_norm=cfg.last_norm, compile_statistics=cfg.compile_statistics)
        )
        self.dataset = build_dataset(cfg.dataset, cfg.data_root, **cfg.dataset_options)
        self._items: dict[str, list[Item]] = {}
        self._groups: dict[tuple[str, str], tuple[DatasetSplit, ModelSplit]] = {}
        self._store: FeatureStore | None = None
        self._decoder = ThreadPoolExecutor(max_workers=max(1, min(4, threads or os.cpu_count() or 1)))
        self._writer = ThreadPoolExecutor(max_workers=1)
        self._pending_write: Future | None = None
        self._write_behind = self.device.type != "cpu"
        self._input = ModelInput(self.loaded, self.device)

    def fingerprint(self) -> dict[str, Any]:
        """What produced the features: model, weights hash, geometry and capture options."""
        if self._init_error is not None:
            raise self._init_error
        spec = self.capture.spec
        # example_attention only where asked for: a group without it keeps the fingerprint it had
        examples = {EXAMPLE_ATTENTION: True} if self.cfg.example_attention else {}
        return dict(self.loaded.describe(), layers=list(spec.layers), embeddings=list(spec.embeddings),
                    class_embeddings=list(spec.class_embeddings), rope=spec.rope, last_norm=spec.last_norm,
                    **examples)  # compile_statistics changes speed, not values

    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            self._store = FeatureStore(self.cfg.store, mode="a")
        return self._store

    def groups(self, model: str, split: str) -> tuple[DatasetSplit, ModelSplit]:
        """The store groups a split's chunks go to, opened once per split."""
        if (model, split) not in self._groups:
            self._groups[(model, split)] = (self.store.dataset_split(self.cfg.dataset, split),
                                            self.store.model_split(model, self.cfg.dataset, split))
        return self._groups[(model, split)]

    def items(self, split: str) -> list[Item]:
        if split not in self._items:
            self._items[split] = self.dataset.items(split, self.cfg.limit)
        return self._items[split]

    def load_batch(self, items: list[Item]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """Decode images in parallel: (B, S, S, 3) uint8, (B, S, S) uint8 labels, the further
        label maps (B, S, S) by name, and the geometry rows (B, 6)."""
        S, limit = self.cfg.image_size, self.cfg.max_image_pixels
        loaded = list(self._decoder.map(lambda it: (*self.dataset.load_placed(it, S, max_pixels=limit),
                                                    self.dataset.load_extra(it, S, max_pixels=limit)), items))
        extra = {m.name: np.stack([p[3][m.name] for p in loaded]) for m in self.dataset.label_maps()}
        return (np.stack([p[0] for p in loaded]), np.stack([p[1] for p in loaded]), extra,
                np.stack([p[2] for p in loaded]))

    def to_model_input(self, images: np.ndarray, geometry: np.ndarray | None = None) -> torch.Tensor:
        """uint8 grid images -> the model's normalised input (``pipeline.model_input``)."""
        return self._input(images, geometry, pad=self.dataset.geometry == "pad")

    def features(self, images: np.ndarray, image_ids: list[str], geometry: np.ndarray | None = None,
                 examples: int = 0) -> dict[str, np.ndarray]:
        """Captured arrays of one batch, on the host, finite-checked; with ``examples`` > 0 the
        attention rows of its first ``examples`` images too (``example_attention``)."""
        out = self.capture(self.to_model_input(images, geometry), examples=examples)
        for name, tensor in out.items():
            if name != "attention_sum" and not all_finite(tensor):
                raise NonFiniteFeaturesError(
                    f"{self.loaded.spec.alias} produced NaN/inf {name} for images "
                    f"{non_finite_images(tensor, image_ids)[:5]}"
                    + ("" if name == "attention_mi" else " (float16 overflow or a broken checkpoint)")
                )
        return {k: v.cpu().numpy() for k, v in out.items()}

    def process(self, model: str, split: str, chunk: int) -> dict[str, float]:
        """Compute image chunk ``chunk`` of ``split`` and write it (see ``write``).

        A write behind the compute finishes with the next call or ``flush``. A
        chunk counts as done only once its ``done`` flag is on disk, so a crash before that
        leaves it pending and the driver's final check schedules it again.
        """
        t0 = time.perf_counter()
        data, target = self.groups(model, split)
        start, stop = data.bounds(chunk)
        items = self.items(split)[start:stop]
        images, labels, extra, geometry = self.load_batch(items)
        t1 = time.perf_counter()
        examples = max(0, min(stop, n_examples(data.n_images)) - start) if self.cfg.example_attention else 0
        arrays = self.features(images, [it.image_id for it in items], geometry, examples)
        t2 = time.perf_counter()
        provenance = {"node": runner.node_id(), "host": socket.gethostname(), "pid": os.getpid(),
                      "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "seconds": round(t2 - t0, 3)}
        self.write(data, target, chunk, labels, arrays, images, provenance, extra, geometry)
        t3 = time.perf_counter()
        return {"images": stop - start, "load_s": t1 - t0, "compute_s": t2 - t1, "write_wait_s": t3 - t2,
                "pid": os.getpid(), "node": provenance["node"]}

    def write(self, data: DatasetSplit, target: ModelSplit, chunk: int, labels: np.ndarray,
              arrays: dict[str, np.ndarray], images: np.ndarray | None = None,
              provenance: dict[str, Any] | None = None, extra_labels: dict[str, np.ndarray] | None = None,
              geometry: np.ndarray | None = None) -> None:
        """Write one chunk: behind the next chunk's compute on a GPU, at once on a CPU.

        Waits first for (and re-raises errors of) the previous write. On a CPU the forward
        already keeps every core busy and a writer thread beside it stalls torch's parallel
        regions; on a GPU the host is idle while the device computes.
        """
        self.flush()

        def write() -> None:
            if not data.chunk_done(chunk):
                data.write_labels(chunk, labels, images, extra_labels, geometry)
            target.write_chunk(chunk, arrays, provenance)

        if self._write_behind:
            self._pending_write = self._writer.submit(write)
        else:
            write()

    def flush(self) -> None:
        """Wait until every queued write is on disk."""
        pending, self._pending_write = self._pending_write, None
        if pending is not None:
            pending.result()
