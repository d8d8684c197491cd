#!/usr/bin/env bash
# One-shot GPU check: `bash bench/gpu_check.sh [OUT_DIR]` on a machine with one NVIDIA GPU and the project's
# requirements installed (pip install -e .); no network. SD v1.4 512 px fp16 and SDXL 1024 px bf16 with random
# weights (bench/configs): a short stage through the real trainer each, torch.compile and SDPA vs math attention
# on one sampling call. Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (default: gpu_check_out), at most
# 8 minutes. See bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check_out}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 480 python bench/gpu_check.py --out "$out" "${@:2}"
cat "$out/gpu_check.md"
