"""Smoke tests of the benchmark scripts: each runs end to end at a tiny budget and writes its sections.

Every script runs in a subprocess at its smallest setting (``--quick``, one task, one table) with
``--write`` and ``PUSHFORWARD_BENCHMARKS`` pointing at a temporary file, so the real ``BENCHMARKS.md`` is
never touched (checked after each run). The checks are on structure, not wording: the script writes the
sections ``BENCHMARKS.md`` marks with ``<!-- BEGIN name -->`` / ``<!-- END name -->``, each with one
``##`` title and markdown tables (a header row, the separator row, data rows with as many cells as the
header, an unescaped ``|`` in a cell being an error) that hold numbers.

Peers (nflows, zuko, normflows, FrEIA) are optional: the models table of ``bench/peers.py`` has a row
for each of them in every task, measured or not; ``BENCH_HIDE_PEERS=all`` forces the not-installed path
even where they are installed, so both paths are tested on every machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "BENCHMARKS.md"
PEERS = ("nflows", "zuko", "normflows", "FrEIA")
SECTION = re.compile(r"^<!-- BEGIN (\S+) -->\n(.*?)\n<!-- END \1 -->$", re.S | re.M)
SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")
NUMBER = re.compile(r"^[-+]?\d")
CELL = re.compile(r"(?<!\\)\|")  # a cell boundary: a pipe not escaped as \|


def sections(text: str) -> dict[str, str]:
    """``{name: body}`` of the marked sections of a BENCHMARKS.md text."""
    return {m.group(1): m.group(2) for m in SECTION.finditer(text)}


def tables(text: str) -> list[list[list[str]]]:
    """The markdown tables of ``text``: lists of rows (header, separator, data), each a list of cells."""
    found, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line.strip())
        elif block:
            found.append([[c.strip() for c in CELL.split(row[1:-1])] for row in block])
            assert SEPARATOR.match(block[1]) if len(block) > 1 else False, f"not a table:\n{block[:2]}"
            block = []
    return found


def check_tables(name: str, body: str) -> list[list[list[str]]]:
    """Every table is well formed; at least one has rows, and the rows hold numbers."""
    found = tables(body)
    assert found, f"section {name} has no table"
    for header, _, *rows in found:
        for row in rows:
            assert len(row) == len(header), f"section {name}: row {row} does not match header {header}"
    cells = [cell for _, _, *rows in found for row in rows for cell in row]
    assert any(NUMBER.match(cell) for cell in cells), f"section {name}: no table holds a number"
    return found


def run_script(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
               timeout: int = 300) -> tuple[str, dict[str, str]]:
    """Runs ``python bench/<script> args`` writing to a temporary BENCHMARKS.md: ``(output, sections)``."""
    target = tmp_path / "BENCHMARKS.md"
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "PUSHFORWARD_BENCHMARKS": str(target),
                "OMP_NUM_THREADS": "1", **(env or {})}
    before = BENCHMARKS.read_bytes()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=full_env, check=False)
    out = proc.stdout + proc.stderr
    assert BENCHMARKS.read_bytes() == before, f"{args[0]} wrote the real BENCHMARKS.md"
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{out[-4000:]}"
    assert target.exists(), f"{args[0]} wrote no section:\n{out[-2000:]}"
    return out, sections(target.read_text())


def check_sections(written: dict[str, str], expected: set[str]) -> None:
    assert set(written) == expected, f"sections written: {sorted(written)}, expected {sorted(expected)}"
    assert expected <= set(sections(BENCHMARKS.read_text())), "BENCHMARKS.md has no such sections"
    for name, body in written.items():
        assert len(re.findall(r"^## ", body, re.M)) == 1, f"section {name} needs exactly one '## ' title"
        check_tables(name, body)


#: script -> its arguments at a tiny budget (``--write`` is added), the sections it writes
SCRIPTS = {
    "core_overhead": (["bench/core_overhead.py", "--quick", "--rounds", "1", "--no-diagnostic", "--backend",
                       "eager"], {"core_overhead"}),
    "beyond": (["bench/beyond.py", "--quick"], {"beyond"}),
    "transformer": (["bench/transformer.py", "--quick", "--out", "{tmp}/runs"], {"transformer"}),
    "variational": (["bench/variational.py", "--quick"], {"variational"}),
    "neural": (["bench/neural.py", "--quick"], {"neural"}),
    "flow_vs_vae": (["bench/flow_vs_vae.py", "--quick", "--out", "{tmp}/runs"], {"flow_vs_vae"}),
    "ddp_throughput": (["bench/ddp_throughput.py", "--quick", "--tasks", "moons realnvp"],
                       {"ddp-throughput"}),
    "baselines": (["bench/baselines.py", "--quick", "--only", "toy", "--out", "{tmp}/runs"], {"baselines"}),
    "tables": (["bench/tables.py", "--tables", "wine", "--methods", "gaussian", "--workers", "1"],
               {"tables"}),
    "continuous": (["bench/continuous.py", "--quick", "--tasks", "moons", "--methods",
                    "realnvp,cnf-ml,cnf-fm", "--budget", "1", "--jobs", "1"], {"continuous"}),
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_script_writes_its_sections(script, tmp_path):
    args, expected = SCRIPTS[script]
    _, written = run_script(tmp_path, *(a.replace("{tmp}", str(tmp_path)) for a in args), "--write")
    check_sections(written, expected)


def _table(body: str, *columns: str) -> list[list[str]]:
    """The data rows of the tables of ``body`` whose header starts with ``columns``."""
    return [row for t in tables(body) if tuple(t[0][:len(columns)]) == columns for row in t[2:]]


def test_peers_speed(tmp_path):
    """A vector and an image task: every peer has a row for each task, measured or not."""
    _, written = run_script(tmp_path, "bench/peers.py", "--quick", "--write", "--tasks", "T2", "TIMG",
                            "--no-profile")
    check_sections(written, {"peers_speed"})
    models = _table(written["peers_speed"], "task", "candidate")
    for task in ("T2", "TIMG"):
        assert {"pushforward eager", *PEERS} <= {row[1] for row in models if row[0] == task}
    measured = {row[1] for row in _table(written["peers_speed"], "threads", "candidate")}
    assert {"pushforward eager", "pushforward compiled"} <= measured


def test_peers_quality(tmp_path):
    """One task, two seeds: a row per seed, and the mean over them."""
    _, written = run_script(tmp_path, "bench/peers.py", "--quick", "--write", "--quality-only",
                            "--quality-tasks", "moons", "--libraries", "pushforward", "--budget-scale",
                            "0.01", "--quality-seeds", "2")
    check_sections(written, {"peers_quality"})
    runs, means, *_ = tables(written["peers_quality"])
    assert [row[3] for row in runs[2:]] == ["0", "1"], "a row per seed"
    assert [row[2] for row in means[2:]] == ["2"], "the mean over the two seeds"


def test_peers_without_peers(tmp_path):
    """With the peers hidden, pushforward is still measured and each peer is a row without figures."""
    _, written = run_script(tmp_path, "bench/peers.py", "--quick", "--write", "--tasks", "T2", "--no-profile",
                            "--no-compile", env={"BENCH_HIDE_PEERS": "all"})
    check_sections(written, {"peers_speed"})
    models = {row[1]: row for row in _table(written["peers_speed"], "task", "candidate")}
    assert set(PEERS) <= set(models)
    for lib in PEERS:
        assert not any(NUMBER.match(c) for c in models[lib][2:]), f"{lib} is hidden but has figures"
    measured = {row[1]: row for row in _table(written["peers_speed"], "threads", "candidate")}
    assert not set(PEERS) & set(measured)
    assert NUMBER.match(measured["pushforward eager"][2])
