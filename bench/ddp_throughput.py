"""Training throughput with 1 and 2 processes (``torchrun`` + DDP on gloo), one thread per process.

Each measurement is a fresh ``torchrun --standalone --nproc-per-node N`` launch of this script in
``--worker`` mode, which runs the real training loop (:func:`pushforward.train.fit`, the dataset's
default recipe and global batch size) and times ``--steps`` optimizer steps after ``--warmup`` steps
with a callback (no validation or checkpoint falls inside the window; every step includes DDP's
gradient all-reduce and the loop's two small all-reduces). The candidates are

* ``1 process x 1 thread`` (launched by torchrun too, so ``WORLD_SIZE=1``: the plain loop),
* ``2 processes x 1 thread`` (DDP, the same global batch split in two),
* with ``--with-threads``, also ``1 process x 2 threads`` (the other way to use two cores),

run round-robin (the order rotates every round) and reported as the median samples/s over the
rounds, with the slowest and fastest round. The 1-minute load average before each round is
recorded, because a busy machine starves the 2-process run first.

Usage::

    python bench/ddp_throughput.py                 # 5 rounds (~10 min on 2 idle cores), writes BENCHMARKS.md
    python bench/ddp_throughput.py --quick         # 1 round of a few steps, no write (smoke test)
    python bench/ddp_throughput.py --tasks "moons realnvp"   # one task; --write, --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench.common` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: task -> (data set, recipe, steps timed, warm-up steps); recipe and batch size are the data set's defaults
TASKS = {
    "moons realnvp": ("moons", "realnvp", 100, 10),
    "digits realnvp_image": ("digits", "realnvp_image", 50, 10),
}
#: candidate -> (processes, threads per process)
CANDIDATES = {
    "1 process x 1 thread": (1, 1),
    "2 processes x 1 thread": (2, 1),
}
THREADS_CANDIDATE = {"1 process x 2 threads": (1, 2)}


# -- worker (one torchrun rank) -------------------------------------------------------------------------
def worker(args) -> None:
    import torch

    from pushforward.config import resolve_config
    from pushforward.experiment import build_flow, load_dataset
    from pushforward.train import fit

    total = args.warmup + args.steps
    config = resolve_config({}, {"data": args.data, "recipe": args.recipe, "threads": args.threads,
                                 "max_steps": total, "val_every": total, "patience": 0, "progress": False,
                                 "run_dir": "", "restore_best": False, "device": "cpu"})
    dataset = load_dataset(config)
    flow = build_flow(config, dataset)
    marks: dict[int, tuple[float, float]] = {}

    def clock(step, loss, flow):
        if step in (args.warmup, total):
            marks[step] = (time.perf_counter(), time.process_time())

    fit(flow, dataset.train, dataset.val, config, callback=clock)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps({
            "seconds": marks[total][0] - marks[args.warmup][0],
            "cpu_seconds": marks[total][1] - marks[args.warmup][1],
            "steps": args.steps, "batch_size": config.batch_size,
            "world": int(os.environ.get("WORLD_SIZE", "1")), "threads": torch.get_num_threads(),
        }))


# -- driver ---------------------------------------------------------------------------------------------
TEARDOWN_ABORT = "terminate called without an active exception"


def launch(task: str, processes: int, threads: int, steps: int, warmup: int) -> dict:
    data, recipe, _, _ = TASKS[task]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(processes), os.path.abspath(__file__), "--worker", "--data", data, "--recipe", recipe,
               "--threads", str(threads), "--steps", str(steps), "--warmup", str(warmup), "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        for _ in range(2):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            # a rank can abort in Gloo's teardown after its work is done ("terminate called without an
            # active exception", pytorch/pytorch#179291): rare; that one failure is run once more
            if done.returncode == 0 or TEARDOWN_ABORT not in done.stderr + done.stdout:
                break
            print(f"  {task}: a rank aborted in Gloo's teardown; running it once more", flush=True)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                               f"{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=0, help="timed steps per run (default: per task)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps first (default: per task)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="1 round of 10 steps; prints, does not write")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS),
                   help="tasks to time (default: all; fewer: does not write)")
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md")
    p.add_argument("--write", action="store_true", help="write BENCHMARKS.md even with --quick or --tasks")
    p.add_argument("--with-threads", action="store_true", help="also time 1 process x 2 threads")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.with_threads:
        CANDIDATES.update(THREADS_CANDIDATE)

    from bench.common import (
        Stats,
        command_line,
        library_revision,
        machine_line,
        markdown_table,
        write_section,
    )

    partial = args.quick or set(args.tasks) != set(TASKS)
    write = not args.no_write and (args.write or not partial)
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 10, 3
    tasks = {t: TASKS[t] for t in args.tasks}
    stats = {(t, c): Stats() for t in tasks for c in CANDIDATES}
    busy = {(t, c): Stats() for t in tasks for c in CANDIDATES}  # rank 0's CPU time / wall time
    batch, loads = {}, []
    names = list(CANDIDATES)
    t_start = time.monotonic()
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for task, (_, _, steps, warmup) in tasks.items():
            k = r % len(names)
            for cand in names[k:] + names[:k]:
                processes, threads = CANDIDATES[cand]
                res = launch(task, processes, threads, args.steps or steps, args.warmup or warmup)
                samples = res["steps"] * res["batch_size"]
                stats[task, cand].values.append(res["seconds"] / samples)  # seconds per sample
                busy[task, cand].values.append(res["cpu_seconds"] / res["seconds"])
                batch[task] = res["batch_size"]
                print(f"round {r + 1}/{args.rounds} {task:22s} {cand:24s} "
                      f"{samples / res['seconds']:9,.0f} samples/s (load {os.getloadavg()[0]:.1f})",
                      flush=True)
    minutes = (time.monotonic() - t_start) / 60

    two, one = "2 processes x 1 thread", "1 process x 1 thread"
    rows = []
    for task in tasks:
        speedup = stats[task, one].median / stats[task, two].median
        rows.append([task, batch[task], *(stats[task, c].rate(1) for c in CANDIDATES), f"{speedup:.2f}x"])
    headers = ["task (dataset default recipe)", "global batch", *(f"{c} (samples/s)" for c in CANDIDATES),
               "2 processes / 1 process"]
    busy_rows = [[task, *(f"{busy[task, c].median:.2f}" for c in CANDIDATES)] for task in tasks]
    share = min(busy[task, one].median for task in tasks)
    caution = "" if share >= 0.8 else (
        f"**Caution:** in the one-process runs rank 0 got only {share:.2f} of a core (CPU time per wall "
        "second): other jobs were using this machine, so these figures measure two processes competing with "
        "them, not the speed-up on two idle cores. Rerun `python bench/ddp_throughput.py` on an idle machine "
        "for that.")
    text = "\n".join([
        "## Data-parallel training: 1 vs 2 processes (torchrun + DDP, gloo)",
        "",
        "Samples per second of the real training loop (`pushforward.train.fit`: forward, backward, DDP's",
        "gradient all-reduce, clipping, Adam), median over rounds (slowest-fastest round in brackets). The",
        "global batch is the data set's default and is the same for every candidate: with 2 processes each",
        "computes half of it. Every run is a fresh `torchrun --standalone` launch; the candidates alternate",
        f"round by round. {args.rounds} rounds, {minutes:.0f} min in all.",
        "",
        *([caution, ""] if caution else []),
        markdown_table(headers, rows),
        "",
        "CPU time of rank 0's process per second of wall time in the timed window (median; 1 thread",
        "busy all the time = 1.00; 2 threads up to 2.00). Below 1 with 2 processes: waiting for the other",
        "rank in the all-reduce, or for a core held by another job.",
        "",
        markdown_table(["task", *CANDIDATES], busy_rows),
        "",
        (f"1-minute load average at the start of each round: {', '.join(f'{v:.1f}' for v in loads)} "
         f"(on {os.cpu_count()} logical cores; other jobs share this machine, so a load above the core "
         "count means the processes were competing for CPU time)."),
        "",
        f"- Machine: {machine_line()}",
        f"- Library: {library_revision()}",
        f"- Command: `{command_line()}`",
        ("- Reproduce one figure by hand: `OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 "
         "-m pushforward train --data moons --set threads=1` (the progress bar shows samples/s)."),
    ])
    print("\n" + text)
    if write:
        print(f"wrote {write_section('ddp-throughput', text)}")


if __name__ == "__main__":
    main()
