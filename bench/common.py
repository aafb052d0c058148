"""Shared helpers for the benchmark scripts in ``bench/``.

* :func:`interleaved` times several candidates round-robin (every round runs every candidate once,
  in a rotating order), so slow drifts of a noisy, shared machine hit all candidates alike.
* :class:`Stats` holds the per-round figures: median with min-max.
* :func:`machine_line` says where the figures come from (CPU model, core count, torch, threads).
* :func:`run_subprocesses` runs jobs as subprocesses, a few at a time (training runs side by side).
* :func:`write_section` replaces one marked section of ``BENCHMARKS.md`` atomically, so every
  figure there is written by a script and never typed by hand. ``PUSHFORWARD_BENCHMARKS=path``
  sends every script's sections (and figures) to another file instead (the smoke tests do).
"""

from __future__ import annotations

import gc
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "BENCHMARKS",
    "REPO",
    "Stats",
    "calibrate",
    "command_line",
    "cpu_model",
    "interleaved",
    "library_revision",
    "machine_line",
    "markdown_table",
    "run_subprocesses",
    "seed_everything",
    "set_threads",
    "timed",
    "write_section",
]

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = Path(os.environ.get("PUSHFORWARD_BENCHMARKS") or REPO / "BENCHMARKS.md")


@dataclass
class Stats:
    """Per-round values (seconds per call) of one candidate."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def ms(self, digits: int = 2) -> str:
        """``median (min-max)`` in milliseconds."""
        return f"{self.median * 1e3:.{digits}f} ({self.min * 1e3:.{digits}f}-{self.max * 1e3:.{digits}f})"

    def rate(self, items: int, digits: int = 0) -> str:
        """Items per second from the median, with the range from the slowest and fastest rounds."""
        fast, slow = items / self.min, items / self.max
        return f"{items / self.median:,.{digits}f} ({slow:,.{digits}f}-{fast:,.{digits}f})"


def interleaved(
    candidates: dict[str, Callable[[], object]],
    rounds: int,
    steps: int | dict[str, int],
    warmup: int = 2,
    sync: Callable[[], None] | None = None,
    log: Callable[[str], None] | None = None,
    cpu: dict[str, Stats] | None = None,
) -> dict[str, Stats]:
    """Times ``candidates`` round-robin and returns seconds per call of each, per round.

    Every candidate is first called ``warmup`` times. Then, ``rounds`` times, each candidate runs
    ``steps`` calls back to back (the order rotates from round to round) and the mean time per call
    of that chunk is one value of its :class:`Stats`. ``sync`` (e.g. ``torch.cuda.synchronize``) is
    called before reading the clock. If ``cpu`` is a dict, it receives the same figures measured with
    the process CPU clock (:func:`time.process_time`, all threads); wall time well above CPU time on
    one thread means the process was waiting (descheduled by other jobs, or blocked). The garbage
    collector is run once and then paused while timing (as :mod:`timeit` does): a full collection
    costs a large fraction of a second once torch's compiler is loaded, far more than a step.
    """
    names = list(candidates)
    per = {n: steps[n] if isinstance(steps, dict) else steps for n in names}
    sync = sync or (lambda: None)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    sync()
    out = {n: Stats() for n in names}
    if cpu is not None:
        cpu.update({n: Stats() for n in names})
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                fn, n = candidates[name], per[name]
                sync()
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(n):
                    fn()
                sync()
                t1, c1 = time.perf_counter(), time.process_time()
                out[name].values.append((t1 - t0) / n)
                if cpu is not None:
                    cpu[name].values.append((c1 - c0) / n)
            if log is not None:
                log(
                    f"  round {r + 1}/{rounds}: "
                    + ", ".join(f"{n} {out[n].values[-1] * 1e3:.2f} ms" for n in names)
                )
    finally:
        if enabled:
            gc.enable()
    return out


def calibrate(fn: Callable[[], object], target_s: float, minimum: int = 2, maximum: int = 10_000) -> int:
    """How many calls of ``fn`` (already warm) take about ``target_s`` seconds."""
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = max(1, min(maximum, int(0.2 / max(one, 1e-9))))
    for _ in range(n):
        fn()
    one = (time.perf_counter() - t0) / n
    return max(minimum, min(maximum, round(target_s / max(one, 1e-9))))


def run_subprocesses(
    items: Sequence[object],
    command: Callable[[object], list[str]],
    workers: int,
    on_exit: Callable[[object, int, str], None],
    *,
    on_start: Callable[[object], None] | None = None,
    capture: bool = False,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    poll_s: float = 0.1,
) -> None:
    """Runs ``command(item)`` for every item as a subprocess, at most ``workers`` at a time, in order.

    ``on_exit(item, returncode, output)`` is called as each process ends (``output``: its stdout and
    stderr when ``capture``, else ``""``: the process then prints to this one's terminal). If a
    callback raises, the processes still running are terminated and the exception propagates.
    """
    pending, running = list(items), []
    try:
        while pending or running:
            while pending and len(running) < workers:
                item = pending.pop(0)
                if on_start is not None:
                    on_start(item)
                out = subprocess.PIPE if capture else None
                proc = subprocess.Popen(command(item), stdout=out,
                                        stderr=subprocess.STDOUT if capture else None, text=True, env=env,
                                        cwd=cwd)
                running.append((item, proc))
            time.sleep(poll_s)
            for entry in list(running):
                item, proc = entry
                if proc.poll() is None:
                    continue
                running.remove(entry)
                on_exit(item, proc.returncode, proc.stdout.read() if capture and proc.stdout else "")
    finally:
        for _, proc in running:
            proc.terminate()


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """``(fn(), seconds)`` -- e.g. the first call of a compiled function, which compiles it."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a dependency, but the helpers don't need it
        pass


def set_threads(threads: int) -> int:
    """Sets torch's intra-op threads explicitly and returns the value in effect."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        if m:
            return " ".join(m.group(1).split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_line() -> str:
    """One line: CPU model and cores, OS, Python, torch, intra-op threads (and the GPU if any)."""
    parts = [
        f"CPU: {cpu_model()} ({os.cpu_count()} logical cores visible)",
        f"{platform.system()} {platform.release()}",
        f"Python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"threads {torch.get_num_threads()}",
    ]
    if torch.cuda.is_available():
        parts.append(f"GPU: {torch.cuda.get_device_name()}")
    return "; ".join(parts)


def library_revision(paths: Sequence[str] = ("src",)) -> str:
    """The git commit measured, e.g. ``0dbd28d`` or ``0dbd28d + uncommitted changes in src``."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", *paths)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return rev + (f" + uncommitted changes in {', '.join(paths)}" if dirty else "")


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that was run, with the script path relative to the repository when possible."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    try:
        argv[0] = str(script.relative_to(REPO))
    except ValueError:
        pass
    return "python " + shlex.join(argv)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; a ``|`` inside a cell is escaped (``\\|``) unless it already is."""

    def cell(c: object) -> str:
        return re.sub(r"(?<!\\)\|", r"\\|", str(c))

    lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def write_section(
    name: str, content: str, path: Path | str = BENCHMARKS, title: str = "# Benchmarks"
) -> Path:
    """Replaces the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in ``path``.

    Creates the file (with ``title``) or appends the section when missing. The new file is written
    to a temporary file in the same folder and moved into place with :func:`os.replace`, so readers
    never see a half-written file.
    """
    path = Path(path)
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{content.strip()}\n{end}"
    text = path.read_text() if path.exists() else f"{title}\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
