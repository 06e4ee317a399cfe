#!/usr/bin/env bash
# The GPU check (docs/gpu.md): quick SFT, DPO, GRPO and PPO on CUDA with the tiny model and the
# Qwen2.5-0.5B shape (random weights, built offline), bf16 autocast; one JSON line per run (tokens/s or
# pairs/s, peak GPU memory, MFU), the last line all of them. Needs only torch, transformers, accelerate
# and peft (a bare GPU image, no internet): these commands import none of posttrain's other dependencies,
# and posttrain runs from this checkout without being installed. Extra arguments go to gpu_check.py
# (e.g. --models tiny --quick; --device cpu runs the same path on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, transformers, accelerate, peft" || {
  echo "gpu_check: needs torch, transformers, accelerate and peft in this Python" >&2; exit 2; }
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false POSTTRAIN_CACHE="${POSTTRAIN_CACHE:-$PWD/.cache/gpu-check}"
exec timeout "${GPU_CHECK_TIMEOUT:-480}" python scripts/gpu_check.py "$@"
