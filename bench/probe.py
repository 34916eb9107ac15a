"""The probe stage against one read pass over the same features, in the same run.

    python bench/probe.py --data-root ../shared/datasets/cocostuff-sample --model dino-b16

Extracts (once, untimed; ``--store`` keeps it between runs) the last block's five token types
(q, k, v, x1, x2) and their class tokens of a random-weight model over the COCO-Stuff sample
(train2017 -> val2017), then times, interleaved over rounds:

- read: one pass over every feature the probe reads (patch arrays of both splits, streamed
  chunk by chunk as the stages read them, and the class-token arrays);
- probe: ``run_probe`` with its defaults (both rules, both objects, every concept, k in
  {1, ..., 500}, ten trials), one worker, templates trained afresh each round (``--force``).

Prints the medians and the ratio probe / read (target: at most 3), and the same for the cosine
rule alone (``probe --rule cosine``), to show what the hyperplanes' fixed schedule costs.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def read_pass(store: Path, model: str, splits: tuple[str, str], embeddings: tuple[str, ...]) -> float:
    from rep_pipeline.pipeline.backend import get_backend
    from rep_pipeline.pipeline.store import FeatureStore
    from rep_pipeline.pipeline.streaming import FeatureStream

    t0 = time.perf_counter()
    for split in splits:
        group = FeatureStore(store).model_split(model, "cocostuff27", split)
        layer = max(group.layers)
        for _ in FeatureStream(group, [(e, layer) for e in embeddings], get_backend("numpy"), cache_bytes=0).sequential():
            pass
        for e in embeddings:
            group.read_class_features(e, layer)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--model", default="dino-b16")
    parser.add_argument("--store", default=None, help="keep the extracted store here (default: a temporary one)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="the first N images of each split (default all)")
    parser.add_argument("--shots", default=None, help="k values, comma-separated (default the probe's)")
    parser.add_argument("--trials", type=int, default=None, help="cosine trials per (concept, k) (default the probe's)")
    parser.add_argument("--address", default=None, help="as the CLI's --address (default a local Ray instance; "
                                                        "inline: the workers in this process)")
    args = parser.parse_args()

    from rep_pipeline.pipeline.config import PROBE_TOKEN_TYPES, ExtractConfig, ProbeConfig
    from rep_pipeline.pipeline.registry import build_model
    from rep_pipeline.stages.extract import run_extract
    from rep_pipeline.stages.probe import run_probe

    splits = ("train2017", "val2017")
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.store or Path(tmp) / "bench.zarr")
        last = build_model(args.model, "random").depth - 1
        run_extract(ExtractConfig(model=args.model, weights="random", store=store, dataset="cocostuff27",
                                  data_root=args.data_root, splits=splits, layers=(last,),
                                  embeddings=PROBE_TOKEN_TYPES, limit=args.limit), address=args.address, progress=False)
        sizes = {k: v for k, v in (("shots", args.shots), ("trials", args.trials)) if v is not None}
        cfg = ProbeConfig(store=store, model=args.model, train_split=splits[0], split=splits[1], workers=1,
                          results=Path(tmp) / "results", **sizes)
        run_probe(cfg, address=args.address, progress=False)  # warm-up: imports, the Ray instance, templates
        times: dict[str, list[float]] = {"read": [], "probe": [], "cosine": []}
        for _ in range(args.rounds):
            times["read"].append(read_pass(store, args.model, splits, PROBE_TOKEN_TYPES))
            t0 = time.perf_counter()
            result = run_probe(cfg.replace(force=True), address=args.address, progress=False)
            times["probe"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_probe(cfg.replace(rules=("cosine",), results=Path(tmp) / "cosine"), address=args.address,
                      progress=False)
            times["cosine"].append(time.perf_counter() - t0)
    read, probe = statistics.median(times["read"]), statistics.median(times["probe"])
    cosine = statistics.median(times["cosine"])
    print(f"{args.model} (random weights), last block, {len(PROBE_TOKEN_TYPES)} token types, COCO-Stuff sample "
          f"{splits[0]} -> {splits[1]}: {result.rows} templates evaluated per run")
    print(f"  one read pass {read:.2f} s, probe {probe:.2f} s, ratio {probe / read:.1f}x "
          f"(rounds: {', '.join(f'{p / r:.1f}x' for r, p in zip(times['read'], times['probe']))})")
    print(f"  cosine rule alone {cosine:.2f} s, ratio {cosine / read:.1f}x")


if __name__ == "__main__":
    main()
