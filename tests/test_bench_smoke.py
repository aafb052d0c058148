"""Smoke tests of the benchmark scripts: their ``--quick`` modes run end to end (in a subprocess).

Peers (nflows, zuko, normflows, FrEIA) are optional: without them ``bench/peers.py`` must still measure
pushforward and list each missing library; ``BENCH_HIDE_PEERS=all`` forces that path even where they
are installed, so both paths are tested on every machine.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEERS = ("nflows", "zuko", "normflows", "FrEIA")


def run(*args: str, env: dict[str, str] | None = None, timeout: int = 900) -> str:
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=full_env, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def _check_pushforward_rows(out: str, tasks: tuple[str, ...]) -> None:
    for task in tasks:
        assert f"### {task}" in out, f"no results table for {task}"
    assert "| pushforward eager |" in out and "| pushforward compiled |" in out
    assert "eager step <= 1.05x limit" in out  # the targets table has pushforward's verdicts
    assert "### Peak memory" in out


def test_peers_quick_with_installed_peers():
    out = run("bench/peers.py", "--quick", "--no-write")
    _check_pushforward_rows(out, ("T2", "T64", "TIMG", "SPLINE"))
    for lib in PEERS:
        if importlib.util.find_spec(lib) is None:
            assert f"| {lib} | - | - | **not measured**: not installed" in out, f"missing {lib} not listed"
        else:
            assert f"| 1 | {lib} |" in out, f"installed {lib} has no result row"
    # libraries that cannot build a model say so instead of silently dropping the row
    if importlib.util.find_spec("zuko") is not None:
        assert "| TIMG | zuko | - | - | **not measured**: zuko 1.6 has no image" in out
    if importlib.util.find_spec("FrEIA") is not None:
        assert "| SPLINE | FrEIA | - | - | **not measured**: FrEIA 0.2 has no spline couplings" in out


def test_peers_quick_without_peers():
    out = run("bench/peers.py", "--quick", "--no-write", "--tasks", "T2", "TIMG", "--no-profile",
              env={"BENCH_HIDE_PEERS": "all"})
    _check_pushforward_rows(out, ("T2", "TIMG"))
    for lib in PEERS:
        assert f"| T2 | {lib} | - | - | **not measured**: not installed" in out


def test_peers_quality_smoke():
    out = run("bench/peers.py", "--quick", "--quality-only", "--quality-tasks", "moons", "--libraries",
              "pushforward", "--budget-scale", "0.01", "--quality-seeds", "2", "--no-write")
    assert "| moons | T2 | pushforward | 0 | ok |" in out and "| moons | T2 | pushforward | 1 | ok |" in out
    assert "| moons | pushforward | 2 |" in out  # the mean over the two seeds


def test_core_overhead_quick():
    out = run("bench/core_overhead.py", "--quick", "--no-write")
    assert "Targets" in out


def test_baselines_quick_toy(tmp_path):
    """bench/baselines.py trains through the CLI for a CPU budget and reports the commands it ran."""
    out = run("bench/baselines.py", "--quick", "--only", "toy", "--out", str(tmp_path))
    assert "| moons | `realnvp` |" in out
    assert "pushforward train --data moons --recipe realnvp" in out and "--max-steps" in out
    assert "not writing BENCHMARKS.md" in out
    assert (tmp_path / "moons-realnvp" / "eval.json").exists()
