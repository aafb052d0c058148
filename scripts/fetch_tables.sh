#!/usr/bin/env bash
# Fetches the UCI tables of bench/tables.py (issue 16) without installing R: Debian's r-cran-mlbench
# ships them as R data files; `apt-get download` fetches the package and `dpkg -x` extracts it into DIR
# (outside git). bench/tables.py reads DIR/x/usr/lib/R/site-library/mlbench/data/*.rda with the `rdata`
# package (pip install -e ".[bench]").
#
#   scripts/fetch_tables.sh [DIR]      # default: $PUSHFORWARD_TABLES or ~/.cache/pushforward/tables
set -euo pipefail
DIR="${1:-${PUSHFORWARD_TABLES:-$HOME/.cache/pushforward/tables}}"
command -v apt-get >/dev/null && command -v dpkg >/dev/null || {
    echo "fetch_tables.sh needs apt-get and dpkg (Debian/Ubuntu); elsewhere download r-cran-mlbench's .deb" \
         "by hand and extract it with: dpkg -x r-cran-mlbench_*.deb $DIR/x" >&2
    exit 1
}
mkdir -p "$DIR"
cd "$DIR"
if ! ls r-cran-mlbench_*.deb >/dev/null 2>&1; then
    apt-get download r-cran-mlbench || {
        echo "apt-get download r-cran-mlbench failed: run 'apt-get update' first (the package is in Debian/Ubuntu" \
             "universe)" >&2
        exit 1
    }
fi
dpkg -x r-cran-mlbench_*.deb x
DATA="$DIR/x/usr/lib/R/site-library/mlbench/data"
ls "$DATA"/LetterRecognition.rda >/dev/null
echo "tables in $DATA; next: python bench/tables.py --data-dir $DIR"
