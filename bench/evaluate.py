"""Score upsampling vs upsample-then-assign, on the same data, in the same run.

    python bench/evaluate.py                 # d=768, K=27, S=320, 8 images, 20x20 patches

The evaluate stage upsamples the K patch scores f . c_k to S x S and takes the argmax; the
textbook route upsamples the d-dimensional features first, normalises every pixel and scores
it. Both are timed on the same backend; prints how often they agree (they are the same
computation up to rounding) and the speed ratio. Target: at least 10x.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from rep_pipeline.pipeline.backend import get_backend, namespace
from rep_pipeline.pipeline.upsample import upsample
from rep_pipeline.stages.evaluate import segment
from rep_pipeline.pipeline.kmeans import l2_normalize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=27)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--grid", type=int, default=20)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    be, xp = get_backend(args.backend), get_backend(args.backend).xp
    rng = np.random.default_rng(0)
    feats = be.asarray(rng.standard_normal((args.images, args.grid, args.grid, args.dim)).astype(np.float32) + 0.3)
    cents = be.asarray(l2_normalize(np, rng.standard_normal((args.k, args.dim)).astype(np.float32)))

    def fast():
        out = [segment(be, feats[i:i + 1], cents, (args.k,), args.size)[0] for i in range(args.images)]
        be.synchronize()
        return out

    def slow():  # one image at a time: the (S, S, d) upsampled features are large
        out = []
        for i in range(args.images):
            pixels = upsample(be, feats[i:i + 1], args.size)
            ns = namespace(pixels)
            out.append(ns.astype(ns.argmax(l2_normalize(ns, pixels) @ cents.T, axis=-1), ns.int16))
        be.synchronize()
        return out

    times = {"score upsampling": [], "upsample then assign": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("score upsampling", fast), ("upsample then assign", slow)):
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    a = np.concatenate([be.to_numpy(m) for m in results["score upsampling"]])
    b = np.concatenate([be.to_numpy(m) for m in results["upsample then assign"]])
    t_fast, t_slow = statistics.median(times["score upsampling"]), statistics.median(times["upsample then assign"])
    print(f"backend={be.name} d={args.dim} K={args.k} S={args.size} grid={args.grid} images={args.images}")
    print(f"score upsampling      {t_fast:8.3f} s  ({args.images / t_fast:7.1f} img/s)")
    print(f"upsample then assign  {t_slow:8.3f} s  ({args.images / t_slow:7.1f} img/s)")
    print(f"speed-up {t_slow / t_fast:.1f}x; pixels assigned alike: {np.mean(a == b) * 100:.4f} %")


if __name__ == "__main__":
    main()
