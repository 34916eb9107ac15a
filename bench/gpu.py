"""The one GPU check (issue 31): every device path of the pipeline in one run, one table.

    bash bench/gpu.sh                 # on a machine with a CUDA GPU (fits 8 minutes on one H100)
    python bench/gpu.py --dry-run     # the same steps at the smallest sizes on the CPU (the tests)

Steps, each under its own time limit (``STEPS``), each a row or more of the table:

1. extract in bfloat16, ViT-B/16 (dino-b16) and a /14 model (dinov2-b14), every layer and every
   embedding: images/s against a bare ``forward_features`` in the same run (bench/extract.py).
2. one k-means epoch (Lloyd, K = 27 and 97 together) on CuPy and on torch, features already on
   the device; as bytes of features read per second and as a fraction of the roofline, the
   device-to-device copy bandwidth measured in the same run. A torch CUDA tensor goes to the
   torch engine as it is, and to CuPy through DLPack (no host copy: asserted).
3. evaluate's score upsampling (bench/evaluate.py), 4. the correspondence fast path
   (bench/correspond.py), both on CuPy; 5. the batched ULTra rollout on CUDA against one
   backward per token (a sample of the targets).

A step that fails prints its error in its row and the run goes on. Random weights throughout
(no network on the machine).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

BENCH = Path(__file__).resolve().parent


@dataclass
class Row:
    step: str
    item: str
    value: str
    note: str = ""


@dataclass
class Sizes:
    """Full sizes for the GPU; ``dry`` the smallest that runs every line of every step."""

    extract_models: str = "dino-b16,dinov2-b14"
    extract_images: int = 256
    extract_batch: int = 64
    kmeans_n: int = 2_000_000
    kmeans_dim: int = 768
    kmeans_batch: int = 262_144
    evaluate_args: tuple[str, ...] = ("--images", "32", "--repeats", "3")
    correspond_args: tuple[str, ...] = ("--targets", "50", "--repeats", "5")
    rollout_model: str = "vit_base_patch16_224"
    rollout_targets: int = 16

    @classmethod
    def dry(cls) -> "Sizes":
        return cls(extract_models="tiny-vit", extract_images=2, extract_batch=2, kmeans_n=4096, kmeans_dim=32,
                   kmeans_batch=1024,
                   evaluate_args=("--dim", "16", "--k", "4", "--size", "32", "--grid", "4", "--images", "1",
                                  "--repeats", "1"),
                   correspond_args=("--dim", "16", "--grid", "4", "--size", "32", "--keypoints", "2",
                                    "--targets", "2", "--repeats", "1"),
                   rollout_model="tiny-vit", rollout_targets=2)


# -- what the GPU run and the tests share -------------------------------------------------------------
def roofline_fraction(bytes_read: float, seconds: float, copy_bytes_per_s: float) -> float:
    """Achieved read bandwidth over the measured copy bandwidth (a copy reads and writes each
    byte once: its bandwidth counts both)."""
    return (bytes_read / seconds) / copy_bytes_per_s if seconds > 0 and copy_bytes_per_s > 0 else float("nan")


def format_table(rows: list[Row]) -> str:
    head = Row("step", "item", "value", "note")
    widths = [max(len(getattr(r, f)) for r in [head, *rows]) for f in ("step", "item", "value")]
    lines = []
    for r in [head, *rows]:
        lines.append(f"{r.step:<{widths[0]}}  {r.item:<{widths[1]}}  {r.value:>{widths[2]}}  {r.note}".rstrip())
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def _subprocess_rows(step: str, script: str, args: list[str], timeout: float, keep: int) -> list[Row]:
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [str(BENCH.parent / "tests"), os.environ.get("PYTHONPATH", "")])})
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    lines = [line.rstrip() for line in out.stdout.splitlines() if line.strip()][-keep:]
    return [Row(step, f"{script} {i + 1}" if i else script, "", line.strip()) for i, line in enumerate(lines)]


# -- the steps ---------------------------------------------------------------------------------------------
def step_extract(s: Sizes, device: str, timeout: float) -> list[Row]:
    dtype = "bfloat16" if device == "cuda" else "float32"
    return _subprocess_rows("1 extract", "extract.py", ["--models", s.extract_models, "--images", str(s.extract_images),
                                                       "--batch", str(s.extract_batch), "--repeats", "2",
                                                       "--device", device, "--dtype", dtype], timeout, keep=4)


def _copy_bandwidth(x, sync: Callable[[], None], repeats: int = 5) -> float:
    y = x.clone() if hasattr(x, "clone") else x.copy()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        y[...] = x
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * x.nbytes / statistics.median(times) if hasattr(x, "nbytes") else float("nan")


def _epoch(be, x, init, batch: int) -> float:
    from rep_pipeline.pipeline.kmeans import LloydKMeans

    km = LloydKMeans(be, init, x.shape[0], tol=0.0, max_iter=3)
    for p in range(2):  # the first pass warms up kernels and the sparse handles
        be.synchronize()
        t0 = time.perf_counter()
        for off in range(0, x.shape[0], batch):
            km.accumulate(x[off:min(off + batch, x.shape[0]), ...], off)
        km.update()
        be.synchronize()
    return time.perf_counter() - t0


def step_kmeans(s: Sizes, device: str, timeout: float) -> list[Row]:
    import torch

    from rep_pipeline.pipeline.backend import Backend, get_backend, gpu_available
    from rep_pipeline.pipeline.kmeans import l2_normalize

    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn((s.kmeans_n, s.kmeans_dim), device=dev, generator=g, dtype=torch.float32)
    x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
    starts = [x[torch.randperm(s.kmeans_n, generator=g, device=dev)[:k]] for k in (27, 97)]
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    copy_bw = _copy_bandwidth(x, sync)
    rows = [Row("2 k-means", "device copy bandwidth", f"{copy_bw / 1e9:.0f} GB/s", "roofline: read + write")]
    tbe = get_backend("torch") if dev.type == "cuda" else Backend("torch", get_backend("torch").xp, None, dev)
    engines = [("torch", tbe, x, starts)]
    if dev.type == "cuda" and gpu_available():
        import cupy

        cx = cupy.from_dlpack(x)  # the extract-held tensor, shared: no host copy
        assert cx.data.ptr == x.data_ptr(), "DLPack made a copy"
        engines.append(("cupy", get_backend("cupy"), cx, [cupy.from_dlpack(c) for c in starts]))
    elif dev.type != "cuda":
        np_be = get_backend("numpy")
        engines.append(("numpy", np_be, x.numpy(), [c.numpy() for c in starts]))
    for name, be, xs, init in engines:
        seconds = _epoch(be, xs, [l2_normalize(None, c) for c in init], s.kmeans_batch)
        frac = roofline_fraction(x.nbytes, seconds, copy_bw / 2)
        rows.append(Row("2 k-means", f"Lloyd epoch, {name}, K=27+97", f"{seconds * 1e3:.1f} ms",
                        f"{x.nbytes / seconds / 1e9:.0f} GB/s of features, {frac:.0%} of the copy's read rate"))
    return rows


def step_evaluate(s: Sizes, device: str, timeout: float) -> list[Row]:
    return _subprocess_rows("3 evaluate", "evaluate.py", [*s.evaluate_args, "--backend", _array_backend(device)],
                            timeout, keep=2)


def step_correspond(s: Sizes, device: str, timeout: float) -> list[Row]:
    return _subprocess_rows("4 correspond", "correspond.py", [*s.correspond_args, "--backend", _array_backend(device)],
                            timeout, keep=4)


def step_rollout(s: Sizes, device: str, timeout: float) -> list[Row]:
    import torch

    from rep_pipeline.pipeline.registry import build_model
    from rep_pipeline.stages.explain.rollout import Explainer

    lm = build_model(s.rollout_model, "random", seed=0)
    lm.model.to(device)
    layer, npt = lm.depth - 1, lm.num_prefix_tokens
    x = torch.randn((1, 3, lm.input_size, lm.input_size), device=device)
    per_token = (layer + 1) * lm.num_heads * (lm.grid ** 2 + npt) ** 2 * 4
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    ex = Explainer(lm, (layer,), memory_budget=64 * per_token)
    targets = torch.arange(npt, npt + s.rollout_targets, device=device)
    times = {}
    with torch.enable_grad():
        z, att = ex._forward(x.requires_grad_(True), keep_attention=True)
        rows_of = [a.detach()[0] for a in att]
        for name, run in (("batched", ex._rows_batched), ("per token", ex._rows_per_token)):
            run(z[layer], att, rows_of, targets[:1], None)  # warm-up
            sync()
            t0 = time.perf_counter()
            run(z[layer], att, rows_of, targets, None)
            sync()
            times[name] = (time.perf_counter() - t0) / len(targets)
    return [Row("5 ULTra rollout", f"{s.rollout_model}, last block", f"{times['batched'] * 1e3:.2f} ms/target",
                f"per token {times['per token'] * 1e3:.2f} ms/target, "
                f"speed-up {times['per token'] / times['batched']:.1f}x")]


def _array_backend(device: str) -> str:
    from rep_pipeline.pipeline.backend import gpu_available

    return "cupy" if device == "cuda" and gpu_available() else ("torch" if device == "cuda" else "numpy")


STEPS = [  # (step, seconds it may take on one H100): 8 minutes in all, with room for start-up
    (step_extract, 150),
    (step_kmeans, 90),
    (step_evaluate, 60),
    (step_correspond, 60),
    (step_rollout, 60),
]


def run(sizes: Sizes, device: str) -> list[Row]:
    rows: list[Row] = []
    for fn, limit in STEPS:
        t0 = time.perf_counter()
        try:
            rows += fn(sizes, device, limit)
        except Exception as e:  # noqa: BLE001 - one failed step must not hide the others
            rows.append(Row(fn.__name__.removeprefix("step_"), "FAILED", "", f"{type(e).__name__}: {e}"))
            traceback.print_exc(file=sys.stderr)
        spent = time.perf_counter() - t0
        if spent > limit:
            rows.append(Row(fn.__name__.removeprefix("step_"), "over its time limit", f"{spent:.0f} s", f"limit {limit} s"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="smallest sizes on the CPU (what the tests run)")
    parser.add_argument("--steps", default="", help="comma-separated step numbers to run (default all)")
    args = parser.parse_args()
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU (or --dry-run)")
    global STEPS
    if args.steps:
        keep = {int(v) for v in args.steps.split(",")}
        STEPS = [s for i, s in enumerate(STEPS, 1) if i in keep]
    sizes = Sizes.dry() if args.dry_run else Sizes()
    t0 = time.perf_counter()
    rows = run(sizes, device)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    print(f"GPU check on {name}, {time.perf_counter() - t0:.0f} s")
    print(format_table(rows))
    if any(r.item == "FAILED" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
