"""Feature-store I/O on object storage against local disk, in the same run.

    python bench/storage.py --images 32 --rounds 3        (needs `pip install -e ".[bench]"`)

A. The pipeline's own paths, on a SeaweedFS S3 server started on 127.0.0.1 (tests/s3server.py)
and on a local folder, with ViT-B-sized chunks (16 images x 12 layers x 20 x 20 patches x 768
channels, float16, two embeddings, plus class tokens and attention arrays):

- extract write: ``ModelSplit.write_chunk`` for every image chunk, one writer, as one extractor
  actor writes (compression included: the same on both sides);
- cluster read: one ``FeatureStream.sequential`` pass over every (embedding, layer), the read
  path of the cluster stage (whole chunks, read ahead on a background thread).

Printed: MB/s of raw float16 features on each side and the ratio S3 / local (target >= 0.8).
Under them, ``ceiling``: the same stored (compressed) chunk bytes written as plain objects
(concurrent single PUTs) and as plain files, and read back likewise: what the server and the
file system alone allow, so the share the pipeline's own path reaches can be seen.

B. Why obstore: the same zarr array (the feature chunk shape and codec) written and read
through zarr's ``ObjectStore`` (obstore) and through zarr's ``FsspecStore`` (s3fs) on the same
server, in the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

LAYERS, GRID, DIM, CHUNK = 12, 20, 768, 16
EMBEDDINGS = ("keys", "tokens")


def _features(images: int, seed: int) -> np.ndarray:
    """Features with the spread of real ones (float16, unit-scale, per-channel offsets)."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0, 1, DIM).astype(np.float32)
    return (rng.normal(0, 0.5, (LAYERS, images, GRID, GRID, DIM)).astype(np.float32) + offsets).astype(np.float16)


def _new_group(where, images: int):
    from rep_pipeline.pipeline.store import FeatureStore

    store = FeatureStore(where, mode="a")
    fp = {"dataset": "synthetic", "split": "train", "n_images": images, "image_size": GRID * 16,
          "classes": ["a", "b"], "ignore_index": 255, "image_ids_sha256": "-", "options": {}}
    data = store.require_dataset_split(fp, [str(i) for i in range(images)], np.zeros((2, 3), np.uint8), CHUNK)
    model_fp = {"model": "bench", "timm_name": "-", "family": "-", "weights_source": "random", "weights_sha256": "-",
                "image_size": GRID * 16, "input_size": GRID * 16, "patch_size": 16, "grid": GRID,
                "num_prefix_tokens": 1, "embed_dim": DIM, "num_heads": 12, "depth": LAYERS,
                "mean": [0, 0, 0], "std": [1, 1, 1], "layers": list(range(LAYERS)), "embeddings": list(EMBEDDINGS),
                "rope": "before", "last_norm": "after"}
    return store.require_model_split("bench", data, model_fp)


def _write(where, images: int, chunk_data: dict) -> float:
    group = _new_group(where, images)
    t0 = time.perf_counter()
    for chunk in range(group.n_chunks):
        group.write_chunk(chunk, chunk_data, provenance={"node": "bench"})
    return time.perf_counter() - t0


def _read(where) -> float:
    from rep_pipeline.pipeline.backend import get_backend
    from rep_pipeline.pipeline.store import FeatureStore
    from rep_pipeline.pipeline.streaming import FeatureStream

    group = FeatureStore(where).model_split("bench", "synthetic", "train")
    keys = [(e, layer) for e in EMBEDDINGS for layer in range(LAYERS)]
    t0 = time.perf_counter()
    for _ in FeatureStream(group, keys, get_backend("numpy"), cache_bytes=0).sequential():
        pass
    return time.perf_counter() - t0


def _ceiling(store_folder: Path, server) -> dict[str, dict[str, float]]:
    """Seconds to write and read the store's files as they are: plain files, and plain objects
    (all at once, one PUT or GET each)."""
    import asyncio

    import obstore
    import obstore.store

    files = [p for p in store_folder.rglob("*") if p.is_file()]
    blobs = [p.read_bytes() for p in files]
    out: dict[str, dict[str, float]] = {"local": {}, "s3": {}}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for i, blob in enumerate(blobs):
            Path(tmp, str(i)).write_bytes(blob)
        out["local"]["write"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(len(blobs)):
            Path(tmp, str(i)).read_bytes()
        out["local"]["read"] = time.perf_counter() - t0
    store = obstore.store.from_url(server.url(f"raw-{uuid.uuid4().hex}"), client_options={"allow_http": True})

    async def put_all() -> None:
        await asyncio.gather(*(obstore.put_async(store, str(i), b, use_multipart=False) for i, b in enumerate(blobs)))

    async def get_all() -> None:
        async def one(i: int) -> bytes:
            return await (await obstore.get_async(store, str(i))).bytes_async()
        await asyncio.gather(*(one(i) for i in range(len(blobs))))

    for what, fn in (("write", put_all), ("read", get_all)):
        t0 = time.perf_counter()
        asyncio.run(fn())
        out["s3"][what] = time.perf_counter() - t0
    return out


def part_a(server, images: int, rounds: int) -> None:
    from rep_pipeline.pipeline.location import as_location

    feats = _features(CHUNK, 0)
    chunk_data = {**{e: feats for e in EMBEDDINGS}, "class_tokens": feats[:, :, 0, 0],
                  "attention_mi": np.zeros((LAYERS, CHUNK, 12), np.float32),
                  "attention_sum": np.zeros((LAYERS, GRID**2, GRID**2), np.float32)}
    raw_mb = images * LAYERS * len(EMBEDDINGS) * GRID * GRID * DIM * 2 / 1e6
    times: dict[str, dict[str, list[float]]] = {s: {"write": [], "read": []} for s in ("local", "s3")}
    ceiling: dict[str, dict[str, list[float]]] = {s: {"write": [], "read": []} for s in ("local", "s3")}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):  # interleaved, fresh stores every round
            for side in ("local", "s3"):
                where = Path(tmp) / f"{r}.zarr" if side == "local" else as_location(server.url(f"bench-{uuid.uuid4().hex}.zarr"))
                times[side]["write"].append(_write(where, images, chunk_data))
                times[side]["read"].append(_read(where))
            for side, by_what in _ceiling(Path(tmp) / f"{r}.zarr", server).items():
                for what, seconds in by_what.items():
                    ceiling[side][what].append(seconds)
    print(f"A. {images} images of ViT-B-sized features ({LAYERS} layers x {GRID}x{GRID} x {DIM}, "
          f"{len(EMBEDDINGS)} embeddings, float16): {raw_mb:.0f} MB raw; median of {rounds} rounds")
    print("   path           local MB/s   S3 MB/s   S3 / local   rounds")
    for what, label in (("write", "extract write"), ("read", "cluster read")):
        local, s3 = statistics.median(times["local"][what]), statistics.median(times["s3"][what])
        per_round = ", ".join(f"{lo / s:.2f}" for lo, s in zip(times["local"][what], times["s3"][what]))
        print(f"   {label:<14} {raw_mb / local:>10.0f} {raw_mb / s3:>9.0f} {local / s3:>12.2f}   {per_round}")
        c_local, c_s3 = statistics.median(ceiling["local"][what]), statistics.median(ceiling["s3"][what])
        print(f"   {'  ceiling':<14} {raw_mb / c_local:>10.0f} {raw_mb / c_s3:>9.0f} {c_local / c_s3:>12.2f}"
              f"   (plain {'files' if what == 'write' else 'reads'} and objects of the same bytes)")


def part_b(server, rounds: int) -> None:
    import obstore.store

    from rep_pipeline.pipeline.store.zarr_io import bare_array  # the store package is the one that imports zarr

    data = _features(CHUNK, 1)
    codec = {"name": "blosc", "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}}
    stores = {
        "obstore": lambda prefix: ("obstore", obstore.store.from_url(
            server.url(prefix), client_options={"allow_http": True}), None),
        "fsspec/s3fs": lambda prefix: ("fsspec", server.url(prefix), {
            "endpoint_url": server.endpoint, "key": server.env["AWS_ACCESS_KEY_ID"],
            "secret": server.env["AWS_SECRET_ACCESS_KEY"], "asynchronous": True}),
    }
    times: dict[str, dict[str, list[float]]] = {n: {"write": [], "read": []} for n in stores}
    for _ in range(rounds):
        for name, make in stores.items():
            kind, source, options = make(f"zarr-{uuid.uuid4().hex}")
            arr = bare_array(kind, source, storage_options=options, shape=data.shape,
                             chunks=(1, CHUNK, GRID, GRID, DIM), dtype="float16", codec=codec)
            t0 = time.perf_counter()
            arr[...] = data
            times[name]["write"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            arr[...]
            times[name]["read"].append(time.perf_counter() - t0)
    mb = data.nbytes / 1e6
    print(f"B. zarr's store layer, one array of {mb:.0f} MB in {LAYERS} chunks, median of {rounds} rounds")
    for name in stores:
        w, r = statistics.median(times[name]["write"]), statistics.median(times[name]["read"])
        print(f"   {name:<12} write {mb / w:6.0f} MB/s   read {mb / r:6.0f} MB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from s3server import start

    with tempfile.TemporaryDirectory() as folder:
        server = start(Path(folder))
        os.environ.update(server.env)
        try:
            part_a(server, args.images, args.rounds)
            part_b(server, args.rounds)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
