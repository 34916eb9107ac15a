"""Which compressor for the feature arrays? Ratio and speed on real captured features.

    python bench/codecs.py --model vit_base_patch16_224
    python bench/codecs.py --array attention_sum

Captures keys of three layers for 8 synthetic images (random weights: no network here; the
float16 bit statistics of activations are what matters) and times each candidate codec; with
``--array attention_sum``, the float32 head-averaged attention of the same layers instead.
The choices recorded in ``storage_schemas/feature_store.py`` (FEATURE_CODEC, ATTENTION_CODEC)
come from this. ``zstd0`` is what zarr uses when an array names no codec.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from numcodecs import LZ4, Blosc, Zstd

from rep_pipeline.pipeline.datasets import build_dataset
from rep_pipeline.pipeline.registry import build_model
from rep_pipeline.stages.extract.capture import CaptureSpec, FeatureCapture

CANDIDATES = {
    "blosc-lz4-bitshuffle": Blosc("lz4", 5, Blosc.BITSHUFFLE),
    "blosc-lz4-shuffle": Blosc("lz4", 5, Blosc.SHUFFLE),
    "blosc-zstd1-bitshuffle": Blosc("zstd", 1, Blosc.BITSHUFFLE),
    "blosc-zstd3-shuffle": Blosc("zstd", 3, Blosc.SHUFFLE),
    "zstd0": Zstd(0),
    "zstd3": Zstd(3),
    "lz4": LZ4(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--embedding", default="keys")
    parser.add_argument("--array", default="features", choices=["features", "attention_sum"])
    args = parser.parse_args()
    lm = build_model(args.model, "random")
    ds = build_dataset("synthetic")
    images = np.stack([ds.load(i, 320)[0] for i in ds.items("train")[:8]])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=lm.input_size, mode="bilinear", align_corners=False)
    x = (x - torch.tensor(lm.mean).view(3, 1, 1)) / torch.tensor(lm.std).view(3, 1, 1)
    spec = CaptureSpec(layers=(0, lm.depth // 2, lm.depth - 1), embeddings=(args.embedding,))
    name = args.embedding if args.array == "features" else args.array
    data = FeatureCapture(lm, spec)(x)[name].numpy()
    print(f"{args.model} {name} {data.shape} {data.dtype}, {data.nbytes / 2**20:.1f} MiB")
    print(f"{'codec':24s} {'ratio':>6s} {'encode MB/s':>12s} {'decode MB/s':>12s}")
    for name, codec in CANDIDATES.items():
        t0 = time.perf_counter()
        encoded = codec.encode(data)
        t1 = time.perf_counter()
        codec.decode(encoded)
        t2 = time.perf_counter()
        print(f"{name:24s} {data.nbytes / len(encoded):6.3f} {data.nbytes / (t1 - t0) / 1e6:12.0f} "
              f"{data.nbytes / (t2 - t1) / 1e6:12.0f}")


if __name__ == "__main__":
    main()
