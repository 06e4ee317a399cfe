#!/usr/bin/env bash
# Set up (idempotent) and run the demo: the whole pipeline on the built-in task.
set -euo pipefail
cd "$(dirname "$0")/.."
POSTTRAIN_NO_APT=1 bash scripts/setup.sh
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec posttrain demo "$@"
