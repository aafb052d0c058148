#!/usr/bin/env bash
# Creates .venv and installs pushforward with the extras named in $1 (default: train).
# PUSHFORWARD_SKIP_SETUP=1 keeps an existing .venv as it is (the README test).
# torch is installed first, pinned to the CPU build that these machines carry on disk; GPU users set
# TORCH_SPEC, e.g.  TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train}"
if [[ -n "${PUSHFORWARD_SKIP_SETUP:-}" && -x .venv/bin/pushforward ]]; then
  # the test suite runs the README's commands in a fresh copy whose .venv is the developer's
  echo "PUSHFORWARD_SKIP_SETUP is set: using the existing .venv"
  exit 0
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
.venv/bin/python -m pip install -q -e ".[${extras}]"
