#!/usr/bin/env bash
# Idempotent: install the system services the labeling-app tests drive for real — PostgreSQL's server
# binaries (tests start a throwaway server with initdb/pg_ctl; no cluster needs to run) and Debian's
# Chromium (Playwright drives it; never run `playwright install`). Installs only what is missing.
#   POSTTRAIN_NO_APT=1   report what is missing and exit 1 instead of installing
set -euo pipefail

missing=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then missing+=(postgresql); fi
if ! command -v chromium >/dev/null 2>&1; then missing+=(chromium); fi

if [ "${#missing[@]}" -eq 0 ]; then
  echo "ci_services: postgresql and chromium already installed"
  exit 0
fi
if [ "${POSTTRAIN_NO_APT:-0}" = "1" ]; then
  echo "ci_services: missing ${missing[*]} (POSTTRAIN_NO_APT=1, not installing)" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "ci_services: need root or sudo to install ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
echo "ci_services: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# the postgresql package may try to start a cluster; without an init system "policy-rc.d denied" is
# expected and harmless (the tests start their own server)
$SUDO apt-get install -y -q "${missing[@]}" >/dev/null
ls /usr/lib/postgresql/*/bin/initdb >/dev/null
command -v chromium >/dev/null
echo "ci_services: done"
