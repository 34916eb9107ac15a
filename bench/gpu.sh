#!/usr/bin/env bash
# The one GPU check of issue 31: extract (bf16), k-means on CuPy and torch, evaluate,
# correspondence and the batched ULTra rollout; one table; fits 8 minutes on one H100.
#   bash bench/gpu.sh            (needs the gpu extra: pip install -e '.[gpu,bench]')
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 480 python bench/gpu.py "$@"
