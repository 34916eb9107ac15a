"""ULTra maps: the batched backward against one backward per token, same image, same run.

    python bench/explain.py            # vit_small_patch16_224 (random weights), S = 224, last block

Explains the target tokens (the class token and the P patch tokens) of one image at the last block
(f_s, tokens after the final norm) from one forward, with:

- per token: one plain backward of F_i = f(z_i) per target (``explain(batched=False)``'s loop, the
  reference of PROTOCOL.md 10.2);
- batched: chunks of T targets per ``torch.autograd.grad(..., is_grads_batched=True)`` (T set
  through the memory budget by the 10.8 formula), for each T of ``--chunks``.

The machine may be shared, so the paths are interleaved finely: the targets are cut into pieces of
max(T) tokens and every path runs on a piece before the next piece starts; a path's time is the one
forward plus the sum over the pieces (median over ``--repeats`` rounds; process CPU time beside).
``--targets K`` times the first K targets only and extrapolates every path linearly to all of them
(said so in the output). Prints the speed-up per T (target: at least 5x), the largest relative
difference of the rows of R over the patch columns (max |a - b| / max |b|; must be below 1e-4), and
the peak memory of one chunk of T targets against T (l + 1) H N^2 x 4 bytes. Memory is measured in
a fresh process per T: the rise of the resident set's high-water mark (VmHWM, reset through
/proc/self/clear_refs) above the resident set before the chunk, with glibc's mmap threshold fixed
at 64 KiB so that freed tensors leave the resident set.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _setup(model: str, size: int, seed: int):
    import torch

    from rep_pipeline.pipeline.registry import build_model

    lm = build_model(model, "random", image_size=size, seed=seed)
    x = torch.randn((1, 3, lm.input_size, lm.input_size), generator=torch.Generator().manual_seed(seed))
    return lm, x


def _per_token_bytes(lm, layer: int) -> int:
    n = lm.grid**2 + lm.num_prefix_tokens
    return (layer + 1) * lm.num_heads * n**2 * 4


def _status_kib(*keys: str) -> list[int]:
    text = open("/proc/self/status").read()
    return [int(text.split(f"{k}:")[1].split()[0]) for k in keys]


def measure_chunk_memory(model: str, size: int, seed: int, T: int) -> dict:
    """Peak resident memory of one batched chunk of T targets (run in a fresh process)."""
    import torch

    from rep_pipeline.stages.explain.rollout import Explainer

    lm, x = _setup(model, size, seed)
    layer = lm.depth - 1
    ex = Explainer(lm, (layer,), memory_budget=T * _per_token_bytes(lm, layer))
    targets = torch.arange(lm.num_prefix_tokens, lm.num_prefix_tokens + T)
    with torch.enable_grad():
        z, attentions = ex._forward(x.requires_grad_(True), keep_attention=True)
        rows = [a.detach()[0] for a in attentions]
        ex._rows_batched(z[layer], attentions, rows, targets[:1], None)  # warm-up: lazy inits
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        (before,) = _status_kib("VmRSS")
        ex._rows_batched(z[layer], attentions, rows, targets, None)
        (peak,) = _status_kib("VmHWM")
    return {"T": T, "peak_bytes": (peak - before) * 1024, "formula_bytes": T * _per_token_bytes(lm, layer)}


def _memory_in_fresh_process(args: argparse.Namespace, T: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--model", args.model, "--size", str(args.size), "--seed", str(args.seed),
           "--threads", str(args.threads), "--memory-of", str(T)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--size", type=int, default=224, help="S")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunks", default="4,16,64", help="targets per batched backward, comma-separated")
    parser.add_argument("--targets", type=int, default=0,
                        help="time this many targets only and extrapolate to all (0: all)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--memory-of", type=int, default=0, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.memory_of:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(measure_chunk_memory(args.model, args.size, args.seed, args.memory_of)))
        return

    import torch

    from rep_pipeline.stages.explain.rollout import Explainer

    if args.threads:
        torch.set_num_threads(args.threads)
    lm, x = _setup(args.model, args.size, args.seed)
    layer, P, npt = lm.depth - 1, lm.grid**2, lm.num_prefix_tokens
    N, all_targets = P + npt, P + 1
    chunks = [int(c) for c in args.chunks.split(",")]
    per_token = _per_token_bytes(lm, layer)
    targets = torch.cat((torch.zeros(1, dtype=torch.long), torch.arange(npt, N)))
    if 0 < args.targets < all_targets:
        targets = targets[: args.targets]
    scale = all_targets / len(targets)
    explainers = {T: Explainer(lm, (layer,), memory_budget=T * per_token) for T in chunks}
    reference = explainers[chunks[0]]
    load_before = os.getloadavg()

    with torch.enable_grad():
        t0, c0 = time.perf_counter(), time.process_time()
        z, att = reference._forward(x.detach().requires_grad_(True), keep_attention=True)
        forward_s, forward_cpu = time.perf_counter() - t0, time.process_time() - c0
        z, rows_of = z[layer], [a.detach()[0] for a in att]
        paths = {"per token": lambda idx: reference._rows_per_token(z, att, rows_of, idx, None)}
        paths.update({T: lambda idx, ex=ex: ex._rows_batched(z, att, rows_of, idx, None)
                      for T, ex in explainers.items()})
        for run in paths.values():  # warm-up: thread pools, lazy inits
            run(targets[:2])
        wall: dict[object, list[float]] = {k: [] for k in paths}
        cpu: dict[object, list[float]] = {k: [] for k in paths}
        rows: dict[object, list[torch.Tensor]] = {}
        for r in range(args.repeats):
            for k in paths:
                wall[k].append(0.0)
                cpu[k].append(0.0)
            for piece in targets.split(max(chunks)):
                for k, run in paths.items():
                    t, c = time.perf_counter(), time.process_time()
                    out = run(piece)
                    wall[k][r] += time.perf_counter() - t
                    cpu[k][r] += time.process_time() - c
                    if r == 0:
                        rows.setdefault(k, []).append(out[:, npt:])
    rows = {k: torch.cat(v) for k, v in rows.items()}
    total = {k: forward_s + statistics.median(v) * scale for k, v in wall.items()}
    total_cpu = {k: forward_cpu + statistics.median(v) * scale for k, v in cpu.items()}

    print(f"{args.model} (random weights), S = {args.size} (input {lm.input_size}), N = {N} tokens "
          f"({npt} prefix), H = {lm.num_heads}, last block l = {layer}, f = sum, {all_targets} targets, "
          f"{torch.get_num_threads()} threads; one forward ({forward_s:.2f} s) + the targets, median of "
          f"{args.repeats} interleaved rounds; load average {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    if scale != 1:
        print(f"  timed on {len(targets)} of {all_targets} targets; every path's time extrapolated x{scale:.2f}")
    print(f"  {'path':<22} {'wall s':>8} {'cpu s':>8} {'speed-up':>9} {'max rel diff':>13}"
          f" {'chunk peak MB':>14} {'formula MB':>11}")
    ref = total["per token"]
    print(f"  {'one backward per token':<22} {ref:8.2f} {total_cpu['per token']:8.2f} {'1.00x':>9} {'-':>13} "
          f"{'-':>14} {'-':>11}")
    for T in chunks:
        diff = _relative(rows[T], rows["per token"])
        mem = _memory_in_fresh_process(args, T)
        print(f"  {f'batched, T = {T}':<22} {total[T]:8.2f} {total_cpu[T]:8.2f} {ref / total[T]:8.2f}x "
              f"{diff:13.1e} {mem['peak_bytes'] / 1e6:14.1f} {mem['formula_bytes'] / 1e6:11.1f}")
    rounds = "; ".join(", ".join(f"T={T} {wall['per token'][r] / wall[T][r]:.2f}x" for T in chunks)
                       for r in range(args.repeats))
    print(f"  speed-up of the backward passes alone, per round (wall): {rounds}")
    # input gradients of qkv, proj, fc1, fc2: (3 + 1 + 4 + 4) D^2 per token row and block (MLP ratio 4)
    gflop = 2 * (layer + 1) * N * 12 * lm.embed_dim**2 / 1e9
    backward = {k: statistics.median(v) / len(targets) for k, v in wall.items()}
    print(f"  one backward: ~{gflop:.3g} GFLOP in the linear layers alone; "
          + ", ".join(f"{'per token' if k == 'per token' else f'T = {k}'} {backward[k] * 1e3:.0f} ms/target "
                      f"({gflop / backward[k]:.0f} GFLOP/s)" for k in backward))


if __name__ == "__main__":
    main()
