#!/usr/bin/env bash
# Idempotent setup on a fresh Debian machine with Python 3.11: system packages (PostgreSQL,
# Chromium for the browser tests), a virtual environment in .venv with the CPU build of torch,
# and posttrain installed in editable mode. Re-running skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${POSTTRAIN_EXTRAS:-test}"

# system services for the labeling-app tests (PostgreSQL, Chromium); the demo skips this
[ "${POSTTRAIN_NO_APT:-0}" = "1" ] || bash scripts/ci_services.sh

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=".venv/.posttrain-$EXTRAS-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  # the CPU wheel first: an open torch requirement would pull a multi-GB CUDA build
  python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
  pip install -q -e ".[$EXTRAS]"
  touch "$stamp"
fi
