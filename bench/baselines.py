"""The project's public baselines: the default models trained with the CLI for a fixed CPU budget.

Every row is one ``pushforward train`` run followed by ``pushforward eval`` on the held-out test set,
through the command-line tool itself (:func:`pushforward.cli.main`), so each figure comes with the
exact command that reproduces it:

* the 2-D densities (8 of them, the dataset's default ``realnvp``; test NLL in nats and the gap to the
  true entropy of the data, the best any model can reach);
* scikit-learn's 8x8 digits (17 grey levels, 180 test images): the default ``glow`` and
  ``realnvp_image``, test bits/dim;
* Fashion-MNIST (28x28, 256 levels, the official 10,000 test images): the default ``glow`` and
  ``realnvp_image``, test bits/dim.

**The budget is CPU time, not wall time.** Each run gets ``budget`` CPU seconds of optimizer steps on
one thread: its CPU cost per step is measured first on a throwaway copy of the model, then it trains
for ``budget / per_step`` steps (the warm-up + cosine schedule spans exactly those steps, so the
learning rate reaches its end; the best validation weights are kept). Validations are outside the
budget. Two runs go side by side on the machine's two cores, so a 30-minute Fashion-MNIST budget means
30 minutes of one core per model. CPU time rather than wall time, so other jobs on a shared machine do
not shorten a run.

Usage::

    python bench/baselines.py                 # full run (~45 min wall on 2 cores), writes BENCHMARKS.md
    python bench/baselines.py --quick         # seconds-long smoke run on tiny budgets; no write
    python bench/baselines.py --only digits   # one group (toy, digits, fashion-mnist); no write
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench.common` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (
    REPO,
    command_line,
    library_revision,
    machine_line,
    markdown_table,
    run_subprocesses,
    write_section,
)

SECTION = "baselines"
TOY = ("moons", "circles", "8gaussians", "checkerboard", "2spirals", "pinwheel", "rings", "swissroll")


def say(*args) -> None:
    print(*args, flush=True)


@dataclass
class Job:
    """One training run: which data, recipe and CPU budget, and its extra ``--set`` overrides."""

    group: str
    data: str
    recipe: str
    budget_s: float
    sets: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.data}-{self.recipe}"


def plan(quick: bool, toy_s: float, digits_s: float, fashion_s: float) -> list[Job]:
    if quick:
        tiny_img = ("max_train=256", "model.hidden_channels=8")
        return [
            Job(
                "toy",
                "moons",
                "realnvp",
                1.0,
                ("n_train=2000", "n_val=500", "n_test=500", "model.hidden=[16,16]"),
            ),
            Job("digits", "digits", "glow", 1.0, tiny_img + ("model.steps=1",)),
            Job("fashion-mnist", "fashion-mnist", "realnvp_image", 1.0, tiny_img + ("max_train=128",)),
        ]
    jobs = [Job("fashion-mnist", "fashion-mnist", r, fashion_s) for r in ("glow", "realnvp_image")]
    jobs += [Job("digits", "digits", r, digits_s) for r in ("glow", "realnvp_image")]
    jobs += [Job("toy", d, "realnvp", toy_s) for d in TOY]
    return jobs


# -- one job (run in its own process: `--job`) ----------------------------------------------------------
def cpu_per_step(config, calib_s: float) -> float:
    """CPU seconds per optimizer step of the model ``config`` builds (:func:`bench.beyond.cpu_per_step`)."""
    from bench.beyond import cpu_per_step as measure
    from pushforward.experiment import build_flow, load_dataset

    ds = load_dataset(config)
    return measure(build_flow(config, ds), ds.train, ds.val, config, calib_s)


def run_job(job: Job, out: Path, calib_s: float, validations: int) -> dict:
    import torch

    from pushforward.cli import main as cli
    from pushforward.config import parse_overrides, resolve_config

    torch.set_num_threads(1)
    run_dir = out / job.name
    base = ["--data", job.data, "--recipe", job.recipe, "--set", "threads=1"]
    for s in job.sets:
        base += ["--set", s]
    config = resolve_config(
        {}, {"data": job.data, "recipe": job.recipe, "threads": 1, **parse_overrides(list(job.sets))}
    )
    per_step = cpu_per_step(config, calib_s)
    steps = max(20, int(job.budget_s / per_step))
    warmup = max(1, min(config.warmup_steps, steps // 10))
    argv = [
        "train",
        *base,
        "--run-dir",
        str(run_dir),
        "--overwrite",
        "--no-progress",
        "--max-steps",
        str(steps),
        "--set",
        f"warmup_steps={warmup}",
        "--set",
        "patience=0",
        "--set",
        f"val_every={max(1, steps // validations)}",
    ]
    say(f"[{job.name}] {per_step * 1e3:.1f} ms CPU per step -> {steps} steps for {job.budget_s:.0f} CPU s")
    c0, t0 = time.process_time(), time.monotonic()
    rc = cli(argv)
    cpu, wall = time.process_time() - c0, time.monotonic() - t0
    if rc != 0:
        raise SystemExit(f"[{job.name}] pushforward train failed with exit status {rc}")
    rc = cli(["eval", str(run_dir)])
    if rc != 0:
        raise SystemExit(f"[{job.name}] pushforward eval failed with exit status {rc}")
    result = json.loads((run_dir / "eval.json").read_text())
    history = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    trained = max((h.get("step", 0) for h in history), default=0)
    params = _params(run_dir)
    if job.group != "toy":
        from pushforward.runs import sample_run

        sample_run(run_dir, n=64, temperature=0.7, out=str(run_dir / "samples_T0.7.png"))
    return {
        "job": _plain(job),
        "finished": time.strftime("%Y-%m-%d %H:%M"),
        "per_step_cpu": per_step,
        "steps": steps,
        "trained_steps": trained,
        "train_cpu_s": cpu,
        "train_wall_s": wall,
        "params": params,
        "eval": result,
        "command": "pushforward " + shlex.join(argv),
        "revision": library_revision(),
        "eval_command": f"pushforward eval {run_dir}",
    }


def _params(run_dir: Path) -> int:
    from pushforward.experiment import open_run

    return sum(p.numel() for p in open_run(run_dir).flow.parameters())


# -- the driver --------------------------------------------------------------------------------------
def _plain(job: Job) -> dict:
    return {**job.__dict__, "sets": list(job.sets)}


def run_all(
    jobs: list[Job], out: Path, workers: int, calib_s: float, validations: int, reuse: bool = False
) -> list[dict]:
    """Runs the jobs as subprocesses, ``workers`` at a time (longest budgets first).

    With ``reuse``, a job whose result file from an earlier invocation exists (same data, recipe,
    budget and overrides) is not run again.
    """
    out.mkdir(parents=True, exist_ok=True)
    pending = sorted(jobs, key=lambda j: -j.budget_s)
    results: dict[str, dict] = {}
    if reuse:  # results of an earlier invocation for the very same job are kept
        for job in list(pending):
            path = out / f"{job.name}.json"
            if path.exists() and json.loads(path.read_text())["job"] == _plain(job):
                results[job.name] = json.loads(path.read_text())
                results[job.name]["reused"] = True
                results[job.name].setdefault(
                    "finished", time.strftime("%Y-%m-%d %H:%M", time.gmtime(path.stat().st_mtime))
                )
                pending.remove(job)
                say(f"reuse {path}")
    def command(job: Job) -> list[str]:
        return [
            sys.executable,
            str(Path(__file__).resolve()),
            "--job",
            json.dumps(job.__dict__),
            "--out",
            str(out),
            "--calib-s",
            str(calib_s),
            "--validations",
            str(validations),
            "--result",
            str(out / f"{job.name}.json"),
        ]

    def finished(job: Job, returncode: int, _output: str) -> None:
        if returncode != 0:
            raise SystemExit(f"{job.name} failed (exit status {returncode})")
        results[job.name] = json.loads((out / f"{job.name}.json").read_text())
        say(f"done {job.name}")

    run_subprocesses(pending, command, workers, finished, cwd=REPO,
                     env={**os.environ, "OMP_NUM_THREADS": "1"},
                     on_start=lambda job: say(f"start {job.name} ({job.budget_s:.0f} CPU s)"), poll_s=1.0)
    return [results[j.name] for j in jobs]


def table(results: list[dict]) -> str:
    from pushforward.data.toy import toy_entropy

    rows = []
    for r in results:
        job, e = r["job"], r["eval"]
        if job["group"] == "toy":
            h = toy_entropy(job["data"])
            metric = f"{e['nll']:.3f} ± {e['nll_stderr']:.3f} nats"
            extra = f"{e['nll'] - h:+.3f} (entropy {h:.3f})" if h is not None else "-"
        else:
            metric = f"**{e['bpd']:.3f} ± {e['bpd_stderr']:.3f}** bits/dim"
            extra = "-"
        rows.append(
            [
                job["data"],
                f"`{job['recipe']}`",
                f"{r['params']:,}",
                f"{job['budget_s'] / 60:.0f}",
                f"{r['trained_steps']:,}",
                f"{r['per_step_cpu'] * 1e3:.0f}",
                f"{r['train_wall_s'] / 60:.1f}",
                f"{e['n']:,}",
                metric,
                extra,
                f"{e.get('max_reconstruction_error', float('nan')):.1e}",
            ]
        )
    return markdown_table(
        [
            "data",
            "recipe",
            "parameters",
            "budget (CPU min)",
            "steps",
            "ms CPU / step",
            "wall min",
            "test examples",
            "test NLL",
            "gap to the data's entropy",
            "max \\|f⁻¹(f(x)) - x\\|",
        ],
        rows,
    )


def _provenance(results: list[dict]) -> str:
    reused = [
        f"{r['job']['data']} `{r['job']['recipe']}` (finished {r.get('finished', '?')})"
        for r in results
        if r.get("reused")
    ]
    if not reused:
        return "All runs were made by this invocation."
    return (
        "Results kept from an earlier invocation of the script for the same job (`--reuse`): "
        + ", ".join(reused)
        + "."
    )


def commands(results: list[dict]) -> str:
    lines = ["```bash"]
    for r in results:
        lines += [r["command"], r["eval_command"]]
    return "\n".join(lines + ["```"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (no write without --write)")
    p.add_argument(
        "--only",
        choices=("toy", "digits", "fashion-mnist"),
        action="append",
        help="run only these groups (repeatable; no write)",
    )
    p.add_argument("--toy-s", type=float, default=60.0, help="CPU seconds per 2-D density (default 60)")
    p.add_argument("--digits-s", type=float, default=300.0, help="CPU seconds per digits model (default 300)")
    p.add_argument(
        "--fashion-s", type=float, default=1800.0, help="CPU seconds per Fashion-MNIST model (1800)"
    )
    p.add_argument("--workers", type=int, default=2, help="runs side by side, one thread each (default 2)")
    p.add_argument("--out", default="runs/baselines", help="run directories (default runs/baselines)")
    p.add_argument(
        "--calib-s", type=float, default=5.0, help="CPU seconds of steps that measure a step's cost"
    )
    p.add_argument("--validations", type=int, default=10, help="validations per run")
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="NAME",
        help="leave out a job, e.g. fashion-mnist-glow (repeatable; no write)",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the results of earlier invocations for the same jobs (out/NAME.json)",
    )
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--write", action="store_true",
                   help="write BENCHMARKS.md even with --quick, --only or --skip (the section lists the jobs "
                   "left out by --skip)")
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.job:  # a worker process
        job = Job(**{**json.loads(args.job), "sets": tuple(json.loads(args.job)["sets"])})
        result = run_job(job, out, args.calib_s, args.validations)
        Path(args.result).write_text(json.dumps(result, indent=1))
        return 0
    jobs = plan(args.quick, args.toy_s, args.digits_s, args.fashion_s)
    if args.only:
        jobs = [j for j in jobs if j.group in args.only]
    skipped = [j for j in jobs if j.name in args.skip]
    jobs = [j for j in jobs if j.name not in args.skip]
    calib = min(args.calib_s, 0.5) if args.quick else args.calib_s
    t0, load0 = time.monotonic(), os.getloadavg()[0]
    results = run_all(jobs, out, args.workers, calib, 2 if args.quick else args.validations, args.reuse)
    elapsed = time.monotonic() - t0
    cmd = command_line(sys.argv if argv is None else ["bench/baselines.py", *argv])
    text = (
        "## Baselines: the default models after a fixed CPU budget\n\n"
        f"Written by `{cmd}` on {time.strftime('%Y-%m-%d')} ({elapsed / 60:.0f} min wall); library at "
        f"{library_revision()}.\n{machine_line()}; each run on 1 thread, {args.workers} side by side; "
        + (f"1-minute load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.\n\n"
           if not any(r.get("reused") for r in results) else
           "the runs kept from earlier invocations (`--reuse`) may have shared the machine with other jobs: "
           "their CPU-time budgets do not depend on that, their wall times do.\n\n")
        + "Each run trains through `pushforward train` for a budget of **CPU time** spent in optimizer steps "
          "on one thread (its cost per step is measured first, the warm-up + cosine schedule spans exactly "
          "the steps that fit, validations are not counted, the best validation weights are kept), then "
          "`pushforward eval` scores the held-out test set: mean ± standard error over test examples. "
          "Images: uniform dequantization, bits/dim = (NLL of the dequantized data + D log K) / (D log 2), "
          "the discrete code-length bound; digits have K = 17 grey levels (180 test images), Fashion-MNIST K "
          "= 256 (the official 10,000 test images). The last column is the largest reconstruction error over "
          "the test set. Fashion-MNIST has no published flow bits/dim yet: these are the first public ones "
          "we know of.\n\n"
        + table(results)
        + "\n\n"
        + _provenance(results)
        + "".join(f" Not run by this invocation (`--skip`): {j.data} `{j.recipe}`." for j in skipped)
        + "\n\nThe exact commands (the step counts are what the budget bought on this machine):\n\n"
        + commands(results)
    )
    say("\n" + text)
    (out / "baselines.json").write_text(json.dumps(results, indent=1))
    if args.no_write or ((args.quick or args.only or args.skip) and not args.write):
        say("not writing BENCHMARKS.md (--quick, --only, --skip or --no-write)")
    else:
        say(f"wrote {write_section(SECTION, text)}")
    ok = all(math.isfinite(r["eval"].get("bpd", r["eval"]["nll"])) for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
