#!/usr/bin/env bash
# Sets up .venv with the development extras and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/python -m pytest -n 2 "$@"
