#!/usr/bin/env bash
# Builds the documentation site into site/: sets up .venv with the docs extras, makes sure the
# Fashion-MNIST files that tutorial 4 trains on are present, then runs every tutorial through
# `mkdocs build --strict` (a failing example, a broken link or a docstring warning fails the build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh docs

fmnist=/usr/share/datasets/fashion-mnist
if ! ls "$fmnist"/train-images-idx3-ubyte* >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "docs: Fashion-MNIST is missing; installing the Debian package dataset-fashion-mnist"
        apt-get install -y dataset-fashion-mnist || { apt-get update && apt-get install -y dataset-fashion-mnist; }
    else
        echo "docs: the tutorials need Fashion-MNIST in $fmnist; install it with" >&2
        echo "      sudo apt-get install -y dataset-fashion-mnist" >&2
        exit 1
    fi
fi

export NO_MKDOCS_2_WARNING=1
start=$(date +%s)
.venv/bin/mkdocs build --strict --site-dir site
echo "docs: built site/ in $(( $(date +%s) - start )) s (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
