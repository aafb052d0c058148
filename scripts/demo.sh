#!/usr/bin/env bash
# Sets up .venv and runs the main job: train, evaluate and sample a flow on built-in data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh train
.venv/bin/pushforward demo "$@"
