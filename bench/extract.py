"""Extract path vs bare forward, on the same batches, in the same run.

    python bench/extract.py --models tiny-vit,dino-b16 --images 32

For each model: images/s of ``model.forward_features`` alone (the baseline) and of the full
extract path (capture of q/k/v/tokens/class tokens/attention statistics for every layer,
host copy, finite check, compression and the Zarr write), on the same decoded batches, with
decode excluded from both. Prints the ratio, the median over rounds of each round's ratio,
and its range over the rounds (single rounds stray on a shared machine); the target is
<= 1.25 on the CPU. Weights are random (no network here); the cost does not depend on their
values. ``--device cuda --dtype bfloat16`` runs it on a GPU.

Two more columns split the cost, each as a fraction of the same bare forward: ``capture``,
the one tapped forward pass with the statistics, finite check and host copy, no write; and
``write``, the store write of already captured arrays alone (compression and file system).
``write`` is a floor: what the stored bytes cost on this machine, whatever the capture does.
Under it, ``files``: the same chunk files' bytes (as zarr stored them, compressed) written
into fresh files with plain ``open``/``write``, what the file system alone takes for them.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rep_pipeline.pipeline.config import ExtractConfig
from rep_pipeline.pipeline.datasets import build_dataset
from rep_pipeline.pipeline.store import FeatureStore
from rep_pipeline.stages.extract import Extractor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_model(name: str, n_images: int, batch: int, repeats: int, device: str, dtype: str,
                compile_statistics: bool = False) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ExtractConfig(model=name, weights="random", store=Path(tmp) / "b.zarr", chunk_images=batch,
                            device=device, dataset_options={"sizes": {"val": n_images}},
                            compile_statistics=compile_statistics)
        ex = Extractor(cfg)
        if dtype != "float32":
            ex.loaded.model.to(getattr(torch, dtype))
        dataset = build_dataset("synthetic", **cfg.dataset_options)
        items = dataset.items("val")

        def new_store(path: Path):
            """A fresh store, as a real run writes: every chunk a new file (rewriting the same
            files each round would time the file system freeing the old ones as well)."""
            store = FeatureStore(path, mode="a")
            data = store.require_dataset_split(dataset.fingerprint("val", items, cfg.image_size),
                                               [i.image_id for i in items], dataset.palette, batch)
            return data, store.require_model_split(name, data, ex.fingerprint())

        batches = [ex.load_batch(items[s:s + batch])[:2] for s in range(0, n_images, batch)]
        model, cast = ex.loaded.model, getattr(torch, dtype)

        def bare(_) -> None:
            with torch.inference_mode():
                for images, _ in batches:
                    model.forward_features(ex.to_model_input(images).to(cast))
            _sync(ex.device)

        def arrays_of(chunk: int, images) -> dict:
            ids = [i.image_id for i in items[chunk * batch:(chunk + 1) * batch]]
            return ex.features(images, ids) if dtype == "float32" else _features_cast(ex, images, ids, cast)

        def full(store) -> None:
            data, target = store
            for chunk, (images, labels) in enumerate(batches):
                ex.write(data, target, chunk, labels, arrays_of(chunk, images), images)  # as Extractor.process does
            ex.flush()

        captured: list[dict] = []

        def capture(_) -> None:
            captured[:] = [arrays_of(chunk, images) for chunk, (images, _) in enumerate(batches)]

        def write(store) -> None:
            for chunk, arrays in enumerate(captured):
                store[1].write_chunk(chunk, arrays)

        stored_files: list[bytes] = []  # every chunk file of the model group, from the first write

        def files(path: Path) -> None:
            path.mkdir()
            for i, blob in enumerate(stored_files):
                with open(path / f"c.{i}", "wb") as f:
                    f.write(blob)

        runs = {"bare": bare, "extract": full, "capture": capture, "write": write, "files": files}
        timings: dict[str, list[float]] = {label: [] for label in runs}
        writes = ("extract", "write")
        for i in range(repeats + 1):  # a warm-up round (allocator, thread pools), then interleaved
            for label, fn in runs.items():  # rounds, so drift on a noisy machine hits all alike
                path = Path(tmp) / f"{label}{i}.zarr"
                store = new_store(path) if label in writes else None
                t0 = time.perf_counter()
                fn(path if label == "files" else store)
                timings[label].append(time.perf_counter() - t0)
                if label == "write":
                    mb = store[1].sizes()["bytes_stored"] / n_images / 2**20
                    if not stored_files:
                        group_dir = path / store[1].path
                        stored_files[:] = [f.read_bytes() for f in sorted(group_dir.rglob("c.*"))]
                if path.exists():
                    shutil.rmtree(path)
        timings = {label: t[1:] for label, t in timings.items()}
        # each ratio against the bare forward of the same round, then the median over rounds
        per_round = {label: [t / b for t, b in zip(timings[label], timings["bare"])] for label in runs}
        ratio = {label: statistics.median(r) for label, r in per_round.items()}
        bare_s, full_s = statistics.median(timings["bare"]), statistics.median(timings["extract"])
        return {"bare_img_s": n_images / bare_s, "extract_img_s": n_images / full_s, "ratio": ratio["extract"],
                "ratio_range": (min(per_round["extract"]), max(per_round["extract"])),
                "capture": ratio["capture"], "write": ratio["write"], "files": ratio["files"],
                "stored_mb_per_image": mb}


def _features_cast(ex: Extractor, images, ids, cast):
    x = ex.to_model_input(images).to(cast)
    out = ex.capture(x)
    return {k: v.float().cpu().numpy() if k in ("attention_mi", "attention_sum") else v.cpu().numpy()
            for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-vit,tiny-dinov3,dino-b16")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile-statistics", action="store_true",
                        help="fuse the attention statistics with torch.compile (compiled during warm-up)")
    args = parser.parse_args()
    print(f"device={args.device} dtype={args.dtype} images={args.images} batch={args.batch} "
          f"threads={torch.get_num_threads()} compile_statistics={args.compile_statistics}")
    print(f"{'model':18s} {'bare img/s':>11s} {'extract img/s':>14s} {'ratio':>7s} {'rounds':>11s} {'capture':>8s} "
          f"{'write':>6s} {'files':>6s} {'MB/img stored':>14s}")
    for name in args.models.split(","):
        r = bench_model(name, args.images, args.batch, args.repeats, args.device, args.dtype,
                        args.compile_statistics)
        rounds = "%.2f-%.2f" % r["ratio_range"]
        print(f"{name:18s} {r['bare_img_s']:11.2f} {r['extract_img_s']:14.2f} {r['ratio']:7.2f} {rounds:>11s} "
              f"{r['capture']:8.2f} {r['write']:6.2f} {r['files']:6.2f} {r['stored_mb_per_image']:14.2f}", flush=True)


if __name__ == "__main__":
    main()
