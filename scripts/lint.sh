#!/usr/bin/env bash
# Static checks: ruff (rules and line length in pyproject.toml [tool.ruff]) over src, tests and bench, then
# mypy over the package ([tool.mypy]). Uses .venv (scripts/setup.sh dev installs ruff and mypy); set
# LINT_SETUP=1 to (re)install the dev extras first, as .ci/run does on a clean clone.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${LINT_SETUP:-0}" = 1 ] || [ ! -x .venv/bin/ruff ] || [ ! -x .venv/bin/mypy ]; then
    bash scripts/setup.sh dev
fi
status=0
echo "lint: ruff $(.venv/bin/ruff --version | cut -d' ' -f2)"
.venv/bin/ruff check src tests bench || status=1
echo "lint: mypy $(.venv/bin/mypy --version | cut -d' ' -f2)"
.venv/bin/mypy src/pushforward || status=1
exit $status
