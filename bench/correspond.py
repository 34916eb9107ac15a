"""Keypoint transfer: the exact fast cosine argmax against brute-force upsampling, same data, same run.

    python bench/correspond.py            # d=768, G=20, S=320, 16 keypoints, 50 targets

The correspond stage (PROTOCOL.md 11.3) matches each source keypoint's feature f against every
valid pixel of the target's upsampled features. The fast route (``transfer.TargetFeatures``)
upsamples the G x G score maps f . F_t[a] and takes the per-pixel norms from the neighbour
Gram maps; the brute-force route (``transfer.brute_force_match``, the tests' reference)
upsamples the (D, G, G) features to (D, S, S) with torch's interpolate in float64 on the CPU
and scores every pixel. Both include everything done per target image (the fast route's
neighbour Grams and norms); the queries f are sampled once, untimed. Timed: one target with
K keypoints (median over repeats) and a pair set of T targets x K keypoints (one pass).
Prints the times, the speed-up (target: at least 10x), the largest score difference and
whether every match is identical. A pad-geometry rectangle marks each target's valid pixels.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from rep_pipeline.pipeline.backend import get_backend
from rep_pipeline.stages.correspond.transfer import TargetFeatures, brute_force_match, sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--grid", type=int, default=20)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--keypoints", type=int, default=16)
    parser.add_argument("--targets", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    be = get_backend(args.backend)
    xp, S, K = be.xp, args.size, args.keypoints
    rng = np.random.default_rng(0)
    shape = (args.targets, args.grid, args.grid, args.dim)
    sources = (rng.standard_normal(shape) + 0.3).astype(np.float16)  # as the store holds them
    targets = (rng.standard_normal(shape) + 0.3).astype(np.float16)
    valid = np.zeros((args.targets, S, S), bool)
    for v, (h, w) in zip(valid, rng.integers(S // 2, S + 1, (args.targets, 2))):
        v[:h, :w] = True
    queries = [be.to_numpy(sample(be.asarray(src), be.asarray(rng.integers(0, S, K)), be.asarray(rng.integers(0, S, K)),
                                  S, xp)) for src in sources]

    def fast(i: int) -> tuple[np.ndarray, np.ndarray]:
        index, score = TargetFeatures(be.asarray(targets[i]), S, be.asarray(valid[i]), xp).match(be.asarray(queries[i]))
        return be.to_numpy(index), be.to_numpy(score)

    def brute(i: int) -> tuple[np.ndarray, np.ndarray]:
        return brute_force_match(targets[i], queries[i], S, valid[i])

    fast(0), brute(0)  # warm-up: imports, BLAS and torch threads
    one: dict[str, list[float]] = {"fast": [], "brute": []}
    for _ in range(args.repeats):
        for name, fn in (("fast", fast), ("brute", brute)):
            t0 = time.perf_counter()
            fn(0)
            be.synchronize()
            one[name].append(time.perf_counter() - t0)
    results: dict[str, list] = {}
    pairs: dict[str, float] = {}
    for name, fn in (("fast", fast), ("brute", brute)):
        t0 = time.perf_counter()
        results[name] = [fn(i) for i in range(args.targets)]
        be.synchronize()
        pairs[name] = time.perf_counter() - t0
    index = {name: np.concatenate([r[0] for r in res]) for name, res in results.items()}
    score = {name: np.concatenate([r[1] for r in res]) for name, res in results.items()}
    t_fast, t_brute = statistics.median(one["fast"]), statistics.median(one["brute"])

    print(f"keypoint transfer, d={args.dim}, G={args.grid}, S={S}, K={K} keypoints per target, backend {be.name}; "
          f"brute force = torch interpolate float64 on the CPU + full cosine")
    print(f"{'':24}{'fast':>12}{'brute force':>14}{'speed-up':>10}")
    print(f"{'one target (ms)':24}{t_fast * 1e3:>12.1f}{t_brute * 1e3:>14.1f}{t_brute / t_fast:>9.1f}x")
    print(f"{f'{args.targets} targets x {K} (s)':24}{pairs['fast']:>12.2f}{pairs['brute']:>14.2f}"
          f"{pairs['brute'] / pairs['fast']:>9.1f}x")
    same = int((index["fast"] == index["brute"]).sum())
    print(f"max |score difference| {np.abs(score['fast'] - score['brute']).max():.2e}; "
          f"matches identical: {same}/{len(index['fast'])} ({'all' if same == len(index['fast']) else 'NOT all'})")


if __name__ == "__main__":
    main()
