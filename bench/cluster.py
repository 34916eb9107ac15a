"""Cluster-stage benchmarks; every ratio is against a baseline timed in the same run.

    python bench/cluster.py                      # defaults sized for a 2-core machine
    python bench/cluster.py --n 200000 --dim 768 # the issue's reference size

A. Time per Lloyd iteration on the same unit vectors and initial centroids, K = 27 and 97:
   our engine (NumPy or CuPy) vs faiss-cpu's spherical k-means and scikit-learn's KMeans
   (lloyd) and MiniBatchKMeans (one epoch of mini-batches, for scale). Target: ours no slower
   than FAISS on the CPU.
B. 48 codebooks (2 embeddings x 4 layers x 6 values of K) on a feature store on disk, read
   without the memory cache: one pass training all of them vs 48 separate passes (PCA init
   + a fixed number of Lloyd passes each). Target: one pass at least 5x faster.
On a GPU (``--backend cupy``) part A also prints the bandwidth our iteration reaches,
as bytes of features read per second, for comparison with the card's HBM bandwidth.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from rep_pipeline.pipeline.backend import get_backend
from rep_pipeline.pipeline.kmeans import LloydKMeans, l2_normalize


def planted(n: int, dim: int, k: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = l2_normalize(np, rng.standard_normal((k, dim)))
    x = centers[rng.integers(0, k, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return l2_normalize(np, x.astype(np.float32))


def ours_per_iteration(be, x, init, iters: int, batch: int) -> float:
    xd = be.asarray(x)
    trainer = LloydKMeans(be, [be.asarray(init)], len(x), tol=0.0, max_iter=iters + 1)
    times = []
    for _ in range(iters):
        be.synchronize()
        t0 = time.perf_counter()
        for off in range(0, len(x), batch):
            trainer.accumulate(xd[off:off + batch], off)
        trainer.update()
        be.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def faiss_per_iteration(x, init, iters: int) -> float | None:
    try:
        import faiss
    except ImportError:
        return None
    km = faiss.Kmeans(x.shape[1], init.shape[0], niter=iters, spherical=True, seed=0,
                      max_points_per_centroid=len(x), min_points_per_centroid=1, verbose=False)
    t0 = time.perf_counter()
    km.train(x, init_centroids=init)
    return (time.perf_counter() - t0) / iters


def sklearn_per_iteration(x, init, iters: int) -> tuple[float | None, float | None]:
    try:
        from sklearn.cluster import KMeans, MiniBatchKMeans
    except ImportError:
        return None, None
    km = KMeans(init.shape[0], init=init, n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd")
    t0 = time.perf_counter()
    km.fit(x)
    lloyd = (time.perf_counter() - t0) / max(km.n_iter_, 1)
    mb = MiniBatchKMeans(init.shape[0], init=init, n_init=1, batch_size=4096, max_iter=1, max_no_improvement=None,
                         tol=0.0, compute_labels=False)
    t0 = time.perf_counter()
    mb.fit(x)
    return lloyd, time.perf_counter() - t0


def part_a(args, be) -> None:
    x = planted(args.n, args.dim)
    print(f"A. Lloyd iteration, {args.n} x {args.dim} float32, backend={be.name}")
    print(f"   {'K':>4s} {'ours s':>8s} {'faiss s':>8s} {'ours/faiss':>10s} {'sk-lloyd s':>10s} "
          f"{'ours/sk':>8s} {'sk-minibatch epoch s':>20s}")
    for k in (27, 97):
        init = x[np.random.default_rng(k).choice(len(x), k, replace=False)].copy()
        ours = ours_per_iteration(be, x, init, args.iters, args.batch)
        fa = faiss_per_iteration(x, init, args.iters)
        sk, mb = sklearn_per_iteration(x, init, args.iters)
        fmt = lambda v: f"{v:8.3f}" if v is not None else "       -"  # noqa: E731
        ratio = lambda a, b: f"{a / b:10.2f}" if b else "         -"  # noqa: E731
        print(f"   {k:4d} {ours:8.3f} {fmt(fa)} {ratio(ours, fa)} {fmt(sk):>10s} {ratio(ours, sk)[2:]:>8s} "
              f"{fmt(mb):>20s}")
        if be.name == "cupy":
            print(f"      ours reads {x.nbytes / ours / 1e9:.0f} GB/s of features per iteration")


def part_b(args, be) -> None:
    from rep_pipeline.pipeline.config import ClusterConfig
    from rep_pipeline.stages.cluster import ClusterWorker, GroupPlan, plan_codebooks

    ks = (8, 16, 27, 48, 64, 97)
    embeddings, layers = ("keys", "tokens"), (0, 1, 2, 3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.zarr"
        _fake_store(path, args.images, args.grid, args.dim, embeddings, layers)
        cfg = ClusterConfig(store=path, model="bench", train_split="train", k=ks, methods=("lloyd",),
                            tol=0.0, max_iter=args.passes, init_batches=4, batch_images=24, host_cache_bytes=0,
                            results=Path(tmp) / "results", backend=be.name)
        plan_codebooks(cfg)  # the driver's part: every codebook group and array, before workers run
        plans = [GroupPlan(e, layer, {"lloyd": ks}) for e in embeddings for layer in layers]
        # warm-up, untimed: imports, thread pools and the page cache, for both sides alike
        ClusterWorker(cfg, "bench", "synthetic", [GroupPlan(embeddings[0], layers[0], {"lloyd": ks[:1]})]).run()
        def one_pass() -> None:
            ClusterWorker(cfg, "bench", "synthetic", plans).run()

        def separate_passes() -> None:
            for e in embeddings:
                for layer in layers:
                    for k in ks:
                        ClusterWorker(cfg, "bench", "synthetic", [GroupPlan(e, layer, {"lloyd": (k,)})]).run()

        timings: dict[str, list[float]] = {"one": [], "separate": []}
        for _ in range(args.rounds):  # interleaved, so drift on a noisy machine hits both alike
            for label, fn in (("one", one_pass), ("separate", separate_passes)):
                t0 = time.perf_counter()
                fn()
                timings[label].append(time.perf_counter() - t0)
    one, separate = statistics.median(timings["one"]), statistics.median(timings["separate"])
    n_books = len(ks) * len(embeddings) * len(layers)
    print(f"B. {n_books} codebooks, {args.images} images x {args.grid**2} patches x {args.dim}, "
          f"{args.passes} Lloyd passes each, streamed from disk, median of {args.rounds} rounds")
    print(f"   one pass {one:.2f} s, separate passes {separate:.2f} s, speed-up {separate / one:.1f}x")
    print("   rounds: " + ", ".join(f"{s / o:.1f}x" for o, s in zip(timings["one"], timings["separate"])))


def _fake_store(path: Path, images: int, grid: int, dim: int, embeddings, layers) -> None:
    """A feature store with planted-cluster features, written through the store API."""
    from rep_pipeline.pipeline.store import FeatureStore

    store = FeatureStore(path, mode="a")
    fp = {"dataset": "synthetic", "split": "train", "n_images": images, "image_size": grid * 16,
          "classes": [f"c{i}" for i in range(27)], "ignore_index": 255, "image_ids_sha256": "-", "options": {}}
    data = store.require_dataset_split(fp, [str(i) for i in range(images)], np.zeros((27, 3), np.uint8), 16)
    model_fp = {"model": "bench", "timm_name": "-", "family": "-", "weights_source": "random", "weights_sha256": "-",
                "image_size": grid * 16, "input_size": grid * 16, "patch_size": 16, "grid": grid,
                "num_prefix_tokens": 1, "embed_dim": dim, "num_heads": 1, "depth": len(layers),
                "mean": [0, 0, 0], "std": [1, 1, 1], "layers": list(layers), "embeddings": list(embeddings),
                "rope": "before", "last_norm": "after"}
    target = store.require_model_split("bench", data, model_fp)
    P = grid * grid
    for chunk in range(data.n_chunks):
        a, b = data.bounds(chunk)
        feats = planted((b - a) * len(layers) * P, dim, seed=chunk).astype(np.float16)
        arr = feats.reshape(len(layers), b - a, grid, grid, dim)
        target.write_chunk(chunk, {**{e: arr for e in embeddings},
                                   "class_tokens": np.zeros((len(layers), b - a, dim), np.float16),
                                   "attention_mi": np.zeros((len(layers), b - a, 1), np.float32),
                                   "attention_sum": np.zeros((len(layers), P, P), np.float32)})
    target.finalize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--grid", type=int, default=20)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="part B: interleaved rounds (median)")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--skip", default="", help="'a' or 'b' to skip a part")
    args = parser.parse_args()
    be = get_backend(args.backend)
    if "a" not in args.skip:
        part_a(args, be)
    if "b" not in args.skip:
        part_b(args, be)


if __name__ == "__main__":
    main()
