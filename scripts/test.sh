#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on CPU. Extra arguments go to pytest.
# The Ray tests (marker `ray`) run in a private network namespace where loopback is the only interface,
# because Ray binds to the machine's network address whatever its options say; without root or
# `unshare` they are skipped with that reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 RAY_DEDUP_LOGS=0
if [ "$(id -u)" = 0 ] && unshare -n true 2>/dev/null; then
  rc=0
  python -m pytest -q --timeout=900 -m "not ray" "$@" || rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 5 ] || exit "$rc"        # 5: the arguments selected no such test
  rc=0
  unshare -n bash -c 'ip link set lo up && exec python -m pytest -q --timeout=900 -m ray "$@"' ray-tests "$@" || rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 5 ] || exit "$rc"
else
  exec python -m pytest -q --timeout=900 "$@"
fi
