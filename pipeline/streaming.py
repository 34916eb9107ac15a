"""What the stages share over features: streams of patch vectors.

``FeatureStream`` reads image chunks of several (embedding, layer) arrays of one model group,
on a read-ahead thread, or keeps them in host (and GPU) memory when they fit; the cluster and
evaluate stages read features through it, a cached stream checked once for NaN/inf
(``pipeline/finite.py``).
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

import numpy as np

from .backend import Backend, host_float32
from .config import READ_AHEAD_BATCHES, SHUFFLE_WINDOW_CHUNKS
from .finite import check_finite
from .store import ModelSplit
from ..storage_schemas.feature_store import chunk_bounds

FeatureKey = tuple[str, int]  # (embedding, block number)


class FeatureStream:
    """Batches of patch vectors of several (embedding, layer) arrays of one model group.

    Reads whole image chunks, on a background thread, ``READ_AHEAD_BATCHES`` ahead. When every
    requested slice fits ``cache_bytes`` they are read once and kept in host memory (and on
    the GPU too when it has room), so the many passes of training never touch the disk again.
    """

    def __init__(self, group: ModelSplit, keys: list[FeatureKey], be: Backend, cache_bytes: int):
        self.group, self.keys, self.be = group, keys, be
        attrs = group.attrs
        self.n_images, self.chunk = group.n_images, group.chunk_images
        self.patches, self.dim = attrs["grid"] ** 2, attrs["embed_dim"]
        self.n_chunks = group.n_chunks
        vectors = self.n_images * self.patches * self.dim * len(keys)
        self._cache: dict[FeatureKey, Any] | None = None
        if vectors * 2 <= cache_bytes:
            # float32 when that fits too: the conversion then happens once, not every step
            widen = host_float32 if vectors * 4 <= cache_bytes else np.asarray
            self._cache = {key: widen(self._read(key, 0, self.n_images)) for key in keys}
            for key, data in self._cache.items():
                check_finite(data, np.arange(self.n_images), f"{group.path}/{key[0]} layer {key[1]}")
            free = be.free_bytes()
            if free is not None and vectors * 8 < free:  # resident on the GPU, with room to work
                self._cache = {key: be.asarray(v) for key, v in self._cache.items()}

    @property
    def checked(self) -> bool:
        """True when every vector was checked for NaN/inf once, at load."""
        return self._cache is not None

    def _read(self, key: FeatureKey, start: int, stop: int) -> np.ndarray:
        emb, layer = key
        return self.group.read_features(emb, layer, start, stop).reshape(stop - start, self.patches, self.dim)

    def _images(self, key: FeatureKey, index: np.ndarray) -> Any:
        """Images ``index`` of one slice, in that order: from the cache, or from the store
        as runs of whole chunks in store order."""
        if self._cache is not None:
            cached = self._cache[key]
            return cached[self.be.asarray(index) if self.be.name != "numpy" else index]  # index to the cache's device
        order = np.argsort(index, kind="stable")
        data = np.concatenate([self._read(key, a, b + 1) for a, b in _runs(index[order])])
        return data if np.array_equal(order, np.arange(len(index))) else data[np.argsort(order)]

    def _produce(self, windows: Iterator[np.ndarray]) -> Iterator[tuple[np.ndarray, dict[FeatureKey, Any]]]:
        for index in windows:
            if self._cache is not None:
                yield index, {key: self._images(key, index) for key in self.keys}
                continue
            # from the store: every key's runs of chunks fetched together (concurrent requests)
            order = np.argsort(index, kind="stable")
            runs = _runs(index[order])
            parts = self.group.read_many([(e, layer, a, b + 1) for e, layer in self.keys for a, b in runs])
            arrays = {}
            for i, key in enumerate(self.keys):
                data = np.concatenate(parts[i * len(runs):(i + 1) * len(runs)]).reshape(len(index), self.patches,
                                                                                        self.dim)
                arrays[key] = data if np.array_equal(order, np.arange(len(index))) else data[np.argsort(order)]
            yield index, arrays

    def _read_ahead(self, windows: Iterator[np.ndarray]) -> Iterator[tuple[np.ndarray, dict[FeatureKey, Any]]]:
        if self._cache is not None:
            yield from self._produce(windows)
            return
        q: queue.Queue = queue.Queue(maxsize=READ_AHEAD_BATCHES)
        stop = threading.Event()

        def work() -> None:
            try:
                for item in self._produce(windows):
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(None)
            except BaseException as exc:  # reaches the consumer, which re-raises it
                q.put(exc)

        thread = threading.Thread(target=work, daemon=True, name="feature-read-ahead")
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    def _shuffled_windows(self, seed: int) -> Iterator[np.ndarray]:
        """Endless windows of image indices: chunk order shuffled every epoch, images
        shuffled within windows of ``SHUFFLE_WINDOW_CHUNKS`` chunks (seeded)."""
        chunk_rng, image_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
        while True:
            order = chunk_rng.permutation(self.n_chunks)
            for w in range(0, len(order), SHUFFLE_WINDOW_CHUNKS):
                index = np.concatenate([self._chunk_images(c) for c in np.sort(order[w:w + SHUFFLE_WINDOW_CHUNKS])])
                yield index[image_rng.permutation(len(index))]

    def shuffled(self, batch_images: int, seed: int) -> Iterator[tuple[np.ndarray, dict[FeatureKey, Any]]]:
        """Endless batches of ``batch_images`` shuffled images (see ``_shuffled_windows``).

        From the cache each batch is gathered directly; from the store each window is read as
        whole chunks in store order on the read-ahead thread, then put in shuffled order."""
        if self._cache is not None:
            carry = np.empty(0, dtype=np.int64)
            for window in self._shuffled_windows(seed):
                pending = np.concatenate([carry, window])
                full = len(pending) // batch_images * batch_images
                for start in range(0, full, batch_images):
                    index = pending[start:start + batch_images]
                    yield index, {key: self._images(key, index) for key in self.keys}
                carry = pending[full:]
            return
        # batches are views of a window; only one that straddles two windows is copied together
        carry: list[tuple[np.ndarray, dict[FeatureKey, Any]]] = []
        for window, arrays in self._read_ahead(self._shuffled_windows(seed)):
            start = 0
            if carry:
                need = batch_images - sum(len(i) for i, _ in carry)
                carry.append((window[:need], {k: v[:need] for k, v in arrays.items()}))
                if len(window) < need:
                    continue
                start = need
                yield (np.concatenate([i for i, _ in carry]),
                       {k: np.concatenate([a[k] for _, a in carry]) for k in arrays})
                carry = []
            while len(window) - start >= batch_images:
                stop = start + batch_images
                yield window[start:stop], {k: v[start:stop] for k, v in arrays.items()}
                start = stop
            if start < len(window):
                carry = [(window[start:], {k: v[start:] for k, v in arrays.items()})]

    def sequential(self) -> Iterator[tuple[np.ndarray, dict[FeatureKey, Any]]]:
        """One pass in store order, one chunk at a time."""
        yield from self._read_ahead(self._chunk_images(c) for c in range(self.n_chunks))

    def _chunk_images(self, chunk: int) -> np.ndarray:
        return np.arange(*chunk_bounds(int(chunk), self.chunk, self.n_images))


def _runs(index: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs [(first, last), ...] of a sorted index."""
    if len(index) == 0:
        return []
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    return [(int(r[0]), int(r[-1])) for r in np.split(index, breaks)]
