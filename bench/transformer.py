"""Transformer flows (TarFlow, Jet) against the baselines at equal CPU time (issue 18).

Every row is one ``pushforward train`` run followed by ``pushforward eval`` on the held-out test set,
through the command-line tool, run by the same machinery as ``bench/baselines.py`` (its
:func:`~bench.baselines.run_all`): a budget of **CPU time** in optimizer steps on one thread (the cost per
step measured first, the warm-up + cosine schedule spanning exactly the steps that fit, validations not
counted, the best validation weights kept), two runs side by side on the two cores.

* scikit-learn's digits (8x8, 17 levels) at 5 CPU-minutes and Fashion-MNIST (28x28, 256 levels) at 30
  CPU-minutes per model: ``tarflow`` and ``jet``, test bits/dim (the uniform-dequantization bound, the
  formula of every other recipe) +- the standard error over test images, parameters, steps;
* the baselines ``glow`` and ``realnvp_image`` at the same budgets: trained in the same run with
  ``--retrain glow`` (their default settings, side by side with the others), otherwise their rows are
  read from the ``baselines`` section of BENCHMARKS.md (written by ``bench/baselines.py``), with the
  commit and machine they came from, marked as copied;
* sampling time of the trained TarFlow, with and without the key-value cache (CPU seconds, one thread,
  median of 3), and of Jet (one pass per coupling);
* sample grids at temperatures 0.7 and 1.0 under ``bench/figures/transformer/``.

Usage::

    python bench/transformer.py                       # full run (~40 min wall, 2 cores); writes BENCHMARKS.md
    python bench/transformer.py --quick --out /tmp/t  # seconds-long smoke run; no write without --write
    python bench/transformer.py --only digits         # one group; no write
    python bench/transformer.py --out DIR --reuse --retrain glow   # keep earlier rows, train glow here
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench.common` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.baselines import Job, run_all
from bench.common import (
    BENCHMARKS,
    REPO,
    command_line,
    library_revision,
    machine_line,
    markdown_table,
    write_section,
)

SECTION = "transformer"
FIGURES = BENCHMARKS.parent / "bench" / "figures" / "transformer"

#: The configurations measured (``--set`` overrides of ``pushforward train``), per data set.
CONFIGS: dict[str, dict[str, tuple[str, ...]]] = {
    "digits": {
        "tarflow": (
            "model.patch_size=2",
            "model.channels=64",
            "model.blocks=4",
            "model.layers_per_block=2",
            "ema=0.999",
        ),
        "jet": (
            "model.patch_size=2",
            "model.channels=64",
            "model.couplings=8",
            "model.layers=1",
            "ema=0.999",
        ),
    },
    "fashion-mnist": {
        # the best of three tried at 30 CPU-minutes (test bits/dim): 4 blocks x 2 layers at lr 1e-3 3.468,
        # 8 x 1 at lr 1e-3 3.473, 8 x 1 at lr 2e-3 3.376 (this one)
        "tarflow": (
            "model.patch_size=4",
            "model.channels=64",
            "ema=0.999",
            "model.blocks=8",
            "model.layers_per_block=1",
            "lr=0.002",
        ),
        "jet": (
            "model.patch_size=4",
            "model.channels=64",
            "model.couplings=8",
            "model.layers=1",
            "ema=0.999",
        ),
    },
}


def say(*args) -> None:
    print(*args, flush=True)


def plan(quick: bool, digits_s: float, fashion_s: float, only: list[str] | None,
         retrain: list[str] | None = None) -> list[Job]:
    """The runs: tarflow and jet on each data set, plus the baselines named in ``retrain`` (``glow``,
    ``realnvp_image``) at their default settings and the same budget, trained here side by side."""
    extra = tuple(retrain or ())
    if quick:
        tiny = ("max_train=256", "model.channels=16", "model.heads=2")
        jobs = [Job("digits", "digits", r, 1.0, CONFIGS["digits"][r] + tiny) for r in ("tarflow", "jet")]
        return jobs + [Job("digits", "digits", r, 1.0, ("max_train=256",)) for r in extra]
    jobs = []
    for data, budget in (("fashion-mnist", fashion_s), ("digits", digits_s)):
        jobs += [Job(data, data, r, budget, CONFIGS[data][r]) for r in ("tarflow", "jet")]
        jobs += [Job(data, data, r, budget) for r in extra]
    return [j for j in jobs if not only or j.group in only]


# -- after training: sampling time and sample grids ------------------------------------------------------
def sampling_times(run_dir: Path, n: int, repeats: int) -> dict[str, float]:
    """CPU seconds (one thread, median of ``repeats``) to draw ``n`` samples, with and without the cache;
    ``{"n": n, "cached": s, "uncached": s}`` (no ``uncached`` for a flow without autoregressive blocks)."""
    import torch

    from pushforward.experiment import open_run
    from pushforward.transforms import Autoregressive

    torch.set_num_threads(1)
    flow = open_run(run_dir).flow
    blocks = [m for m in flow.modules() if isinstance(m, Autoregressive)]

    def cpu(use_cache: bool) -> float:
        for b in blocks:
            b.use_cache = use_cache
        times = []
        for r in range(repeats):
            torch.manual_seed(r)
            t0 = time.process_time()
            with torch.no_grad():
                flow.sample(n)
            times.append(time.process_time() - t0)
        return statistics.median(times)

    out = {"n": n, "cached": cpu(True)}
    if blocks:
        out["uncached"] = cpu(False)
        for b in blocks:
            b.use_cache = True
    return out


def figures(run_dir: Path, name: str, dest: Path = FIGURES) -> list[str]:
    """Sample grids at T = 0.7 and 1.0 of a run, copied under ``dest`` (bench/figures/transformer/; a smoke
    run passes its own folder, so it never replaces the published grids)."""
    from pushforward.runs import sample_run

    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for t in (0.7, 1.0):
        path = dest / f"{name}_T{t:g}.png"
        sample_run(run_dir, n=64, temperature=t, out=str(run_dir / path.name))
        shutil.copyfile(run_dir / path.name, path)
        inside = path.resolve().is_relative_to(BENCHMARKS.parent.resolve())
        written.append(str(path.resolve().relative_to(BENCHMARKS.parent.resolve()) if inside else path))
    return written


# -- the baselines' rows, read from their own section --------------------------------------------------------
def baseline_rows(path: Path = REPO / "BENCHMARKS.md") -> tuple[list[list[str]], str]:
    """The image rows (``glow``, ``realnvp_image``) of the ``baselines`` section and where they came from."""
    text = path.read_text() if path.exists() else ""
    m = re.search(r"<!-- BEGIN baselines -->(.*?)<!-- END baselines -->", text, re.S)
    if not m:
        return [], "no baselines section in BENCHMARKS.md"
    body = m.group(1)
    rows = []
    for line in body.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if (
            len(cells) >= 9
            and cells[0] in ("digits", "fashion-mnist")
            and cells[1].strip("`") in ("glow", "realnvp_image")
        ):
            rows.append(cells)
    source = re.search(r"library at (\w+)", body)
    machine = re.search(r"CPU: ([^;]+);", body)
    where = (
        f"commit {source.group(1) if source else '?'}, "
        f"{machine.group(1).strip() if machine else 'machine not recorded'}"
    )
    return rows, where


def step_cost_here(data: str, recipe: str, calib_s: float) -> float:
    """CPU seconds per optimizer step of a baseline's default model on this machine (one thread), measured the
    way ``bench/baselines.py`` budgets it: what a CPU-second buys here, next to what it bought there."""
    import torch

    from bench.baselines import cpu_per_step
    from pushforward.config import resolve_config

    torch.set_num_threads(1)
    return cpu_per_step(resolve_config({}, {"data": data, "recipe": recipe, "threads": 1}), calib_s)


def table(results: list[dict], baselines: list[list[str]], here: dict[tuple[str, str], float]) -> str:
    """The results table: this run's rows, then the copied ``baselines`` rows (those not retrained)."""
    rows = []
    groups = [g for g in ("fashion-mnist", "digits") if any(r["job"]["group"] == g for r in results)]
    for group in groups:
        for r in results:
            job, e = r["job"], r["eval"]
            if job["group"] != group:
                continue
            rows.append(
                [
                    job["data"],
                    f"`{job['recipe']}`",
                    "this run",
                    f"{r['params']:,}",
                    f"{job['budget_s'] / 60:.0f}",
                    f"{r['trained_steps']:,}",
                    f"{r['per_step_cpu'] * 1e3:.0f}",
                    f"{e['n']:,}",
                    f"**{e['bpd']:.3f} ± {e['bpd_stderr']:.3f}**",
                    f"{e.get('max_reconstruction_error', float('nan')):.1e}",
                ]
            )
        # baseline cells (the copied rows only): data, recipe, parameters, budget, steps, ms/step, wall,
        # examples, NLL, ...
        for b in baselines:
            if b[0] == group:
                bpd = re.sub(r"\s*bits/dim", "", b[8])
                cost = here.get((b[0], b[1].strip("`")))
                ms = b[5] + ("" if cost is None else f" (here: {cost * 1e3:.0f})")
                rows.append([b[0], b[1], "baselines section", b[2], b[3], b[4], ms, b[7], bpd, b[-1]])
    return markdown_table(
        [
            "data",
            "recipe",
            "row from",
            "parameters",
            "budget (CPU min)",
            "steps",
            "ms CPU / step",
            "test examples",
            "test bits/dim",
            "max \\|f⁻¹(f(x)) - x\\|",
        ],
        rows,
    )


def sampling_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        job = r["job"]
        for s in r.get("sampling", []):
            uncached = f"{s['uncached']:.2f}" if "uncached" in s else "- (one pass per layer)"
            speedup = f"{s['uncached'] / s['cached']:.1f}x" if "uncached" in s else "-"
            rows.append([job["data"], f"`{job['recipe']}`", s["n"], f"{s['cached']:.2f}", uncached, speedup])
    return markdown_table(
        ["data", "recipe", "samples", "CPU s, cached", "CPU s, without the cache", "speed-up"], rows
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (no write without --write)")
    p.add_argument(
        "--only",
        choices=("digits", "fashion-mnist"),
        action="append",
        help="run only these groups (repeatable; no write)",
    )
    p.add_argument("--digits-s", type=float, default=300.0, help="CPU seconds per digits model (default 300)")
    p.add_argument(
        "--fashion-s", type=float, default=1800.0, help="CPU seconds per Fashion-MNIST model (1800)"
    )
    p.add_argument("--workers", type=int, default=2, help="runs side by side, one thread each (default 2)")
    p.add_argument("--out", default="runs/transformer", help="run directories (default runs/transformer)")
    p.add_argument(
        "--calib-s", type=float, default=5.0, help="CPU seconds of steps that measure a step's cost"
    )
    p.add_argument("--validations", type=int, default=5, help="validations per run (default 5)")
    p.add_argument(
        "--samples",
        type=int,
        nargs="+",
        default=[16, 64],
        help="sample counts of the sampling times (default 16 64)",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the results of earlier invocations for the same jobs (out/NAME.json)",
    )
    p.add_argument("--retrain", action="append", choices=("glow", "realnvp_image"), default=[],
                   help="also train this baseline here, at its defaults and the same budget, instead of "
                   "copying its row from the baselines section (repeatable)")
    p.add_argument("--write", action="store_true", help="write BENCHMARKS.md even with --quick or --only")
    args = p.parse_args(argv)
    out = Path(args.out)
    jobs = plan(args.quick, args.digits_s, args.fashion_s, args.only, args.retrain)
    t0 = time.monotonic()
    calib = min(args.calib_s, 0.5) if args.quick else args.calib_s
    results = run_all(jobs, out, args.workers, calib, 2 if args.quick else args.validations, args.reuse)
    samples = [2] if args.quick else args.samples
    for r in results:
        run_dir = out / f"{r['job']['data']}-{r['job']['recipe']}"
        r["sampling"] = [sampling_times(run_dir, n, 1 if args.quick else 3) for n in samples]
        r["figures"] = figures(run_dir, f"{r['job']['data']}-{r['job']['recipe']}",
                               out / "figures" if args.quick else FIGURES)
        say(f"{run_dir.name}: {r['eval']['bpd']:.4f} bits/dim, sampling {r['sampling']}")
    elapsed = time.monotonic() - t0
    baselines, where = baseline_rows()
    groups = {r["job"]["group"] for r in results}
    trained = {(r["job"]["group"], r["job"]["recipe"]) for r in results}
    baselines = [b for b in baselines if (b[0], b[1].strip("`")) not in trained]
    here = {(b[0], b[1].strip("`")): step_cost_here(b[0], b[1].strip("`"), calib)
            for b in baselines if b[0] in groups}
    copied = sorted({f"`{b[1].strip('`')}` ({b[0]})" for b in baselines if b[0] in groups})
    retrained = sorted({f"`{r}` ({g})" for g, r in trained if r in ("glow", "realnvp_image")})
    cmd = command_line(sys.argv if argv is None else ["bench/transformer.py", *argv])
    grids = "\n".join(f"![{Path(f).stem}]({f})" for r in results for f in r["figures"])
    text = (
        "## Transformer flows: TarFlow and Jet at the baselines' CPU budgets (issue 18)\n\n"
        f"Written by `{cmd}` on {time.strftime('%Y-%m-%d')} ({elapsed / 60:.0f} min wall); library at "
        f"{library_revision()}.\n{machine_line()}; each run on 1 thread, {args.workers} side by side.\n\n"
        "Each new row trains through `pushforward train` for a budget of **CPU time** in optimizer steps on "
        "one thread, with the machinery of `bench/baselines.py` (cost per step measured first, warm-up + "
        "cosine over exactly the steps that fit, validations not counted, best validation weights kept; for "
        "`tarflow` and `jet` the weights' moving average, `ema=0.999`, is what is validated and kept), "
        "then `pushforward eval` scores the test set. Test bits/dim is the uniform-dequantization bound "
        "of every recipe, (NLL + D log K) / (D log 2), mean ± standard error over the test images. "
        + (f"Baselines trained in this run, at their default settings and the same budget (`--retrain`): "
           f"{', '.join(retrained)}. " if retrained else "")
        + (f"**Rows copied, not retrained**: {', '.join(copied)}, from the `baselines` section below "
           f"({where}), trained at the same CPU budgets by `bench/baselines.py`. A CPU-second is not the "
           "same on both machines: the `ms CPU / step` column of each row was measured where it ran, and "
           "for the copied rows also on this machine (`here`, the same measurement), which says how many "
           "more steps the same budget would buy them here." if copied else "")
        + "\n\n"
        + table(results, baselines, here)
        + "\n\nSampling (the trained models, one thread, median of 3): TarFlow's inverse is sequential over "
        "the patches of each block; with the key-value cache each step runs one token through the "
        "Transformer, without it the whole sequence. Jet inverts each coupling in one pass.\n\n"
        + sampling_table(results)
        + "\n\nConfigurations (`--set` of `pushforward train`): "
        + "; ".join(
            f"{r['job']['data']} `{r['job']['recipe']}`: `{' '.join(r['job']['sets'])}`" for r in results
        )
        + ".\n\nThe exact commands:\n\n```bash\n"
        + "\n".join(f"{r['command']}\n{r['eval_command']}" for r in results)
        + "\n```\n\nSamples (T = 0.7 and 1.0):\n\n"
        + grids
        + "\n"
    )
    say("\n" + text)
    (out / "transformer.json").write_text(json.dumps(results, indent=1))
    if (args.quick or args.only) and not args.write:
        say("not writing BENCHMARKS.md (--quick or --only)")
    else:
        say(f"wrote {write_section(SECTION, text)}")
    return 0 if all(math.isfinite(r["eval"]["bpd"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
