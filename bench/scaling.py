"""Extract on one worker node against two, in the same run.

    python bench/scaling.py --model vit_small_patch16_224 --images 48 --rounds 2

A Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head that holds no work and
worker nodes of one CPU each, every node its own raylet) runs the same extract, by a driver
in a process of its own, once with one worker node and once with two; the defaults place one
actor per node. Throughput is steady-state: images of the chunks finished after each actor's
first one (which pays for building the model), over the time since. Printed per round and as
the median; the target is two nodes >= 1.7x one node.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_DRIVER = """
import json, sys, time
from rep_pipeline.pipeline.config import ExtractConfig
from rep_pipeline.stages.extract import run_extract
store, address, model, images, nodes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
stamps = []
cfg = ExtractConfig(model=model, weights="random", store=store, chunk_images=4, splits=("val",),
                    dataset_options={"sizes": {"val": images}})
result = run_extract(cfg, address=address, progress=False,
                     on_chunk_done=lambda split, chunk, stats: stamps.append((time.perf_counter(), stats["images"])))
warm = nodes  # each actor's first chunk pays for building the model
steady = sum(n for _, n in stamps[warm:]) / (stamps[-1][0] - stamps[warm - 1][0])
print(json.dumps({"steady": steady, "overall": result.images_per_second, "per_node": result.per_node}))
"""


def one_run(nodes: int, model: str, images: int) -> dict:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", _DRIVER, str(Path(tmp) / "s.zarr"), cluster.address, model,
                                  str(images), str(nodes)], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.rounds):  # interleaved
        for nodes in (1, 2):
            got = one_run(nodes, args.model, args.images)
            rates[nodes].append(got["steady"])
            print(f"   {nodes} node(s): {got['steady']:.2f} img/s steady, {got['overall']:.2f} img/s overall, "
                  f"per node {got['per_node']}", flush=True)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"{args.model}, {args.images} images, worker nodes of 1 CPU: one node {one:.2f} img/s, two nodes "
          f"{two:.2f} img/s, speed-up {two / one:.2f}x (rounds: "
          + ", ".join(f"{b / a:.2f}x" for a, b in zip(rates[1], rates[2])) + ")")


if __name__ == "__main__":
    main()
