"""Flows versus VAEs: the lecture's comparison on 2-D densities, sklearn digits and Fashion-MNIST.

For each data set this runs ``pushforward compare`` (:func:`pushforward.compare.compare`): a flow
(the data set's default recipe) and a VAE (:mod:`pushforward.vae`) whose width is chosen to match
the flow's parameter count, both trained for the same number of optimizer steps on the same split,
then scored on the same test examples with the same dequantization noise: the flow's exact NLL,
the VAE's negative ELBO and its importance-weighted estimates ``-IWAE_k`` for k = 1, 10, 100, 1000
(upper bounds on the VAE's NLL that tighten with k), the paired gap, training time and sampling
speed. One row uses ``--match time`` (equal wall-clock minutes, default sizes) instead.

The figures (``samples.png``, ``bound.png`` per data set) are copied to ``bench/figures/flow_vs_vae/``
and linked from the ``flow_vs_vae`` section of ``BENCHMARKS.md``, which this script writes with
:func:`bench.common.write_section` (every figure there comes from this script).

Usage::

    python bench/flow_vs_vae.py            # full run (~20 min on 2 cores), writes BENCHMARKS.md
    python bench/flow_vs_vae.py --quick    # seconds-long smoke run on tiny models; no write
    python bench/flow_vs_vae.py --only digits --no-write
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field

if __package__ in (None, ""):  # run as a script: make `bench.common` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench.common import (
    BENCHMARKS,
    REPO,
    command_line,
    library_revision,
    machine_line,
    markdown_table,
    write_section,
)

SECTION = "flow_vs_vae"
FIGURES = BENCHMARKS.parent / "bench" / "figures" / "flow_vs_vae"  # linked relative to BENCHMARKS.md


@dataclass
class Case:
    """One ``pushforward compare`` invocation."""

    name: str
    data: str
    match: str = "params"
    max_steps: int = 0
    minutes: float = 0.0
    ks: tuple[int, ...] = (1, 10, 100, 1000)
    eval_n: int = 500
    sets: list[str] = field(default_factory=list)
    flow_sets: list[str] = field(default_factory=list)
    vae_sets: list[str] = field(default_factory=list)

    def argv(self, run_dir: str) -> list[str]:
        out = ["compare", "--data", self.data, "--run-dir", run_dir, "--match", self.match]
        if self.max_steps:
            out += ["--max-steps", str(self.max_steps)]
        if self.minutes:
            out += ["--minutes", f"{self.minutes:g}"]
        out += ["--ks", ",".join(map(str, self.ks)), "--eval-n", str(self.eval_n)]
        flags = (("--set", self.sets), ("--flow-set", self.flow_sets), ("--vae-set", self.vae_sets))
        for flag, values in flags:
            for v in values:
                out += [flag, v]
        return out


def cases(quick: bool) -> list[Case]:
    if quick:
        tiny = ["n_train=600", "n_val=200", "n_test=300", "batch_size=100", "warmup_steps=5", "val_every=15"]
        return [
            Case("moons (quick)", "moons", max_steps=30, ks=(1, 10, 100), eval_n=150, sets=tiny,
                 flow_sets=["model.layers=2", "model.hidden=[16,16]"]),
            Case("digits (quick)", "digits", max_steps=10, ks=(1, 10), eval_n=40,
                 sets=["max_train=128", "batch_size=32", "warmup_steps=2"],
                 flow_sets=["model.hidden_channels=8"]),
        ]
    # Budgets sized for ~20 minutes on 2 shared CPU cores (validation every tenth of the run). IWAE with
    # k = 1000 costs 1000 decoder passes per example, and a convolutional decoder pass on 28x28 images is
    # milliseconds on a CPU, so the image rows score fewer test examples (all k on the same examples).
    return [
        Case("moons", "moons", max_steps=700, eval_n=600),
        Case("checkerboard", "checkerboard", max_steps=700, eval_n=600),
        Case("digits", "digits", max_steps=800, eval_n=60),
        Case("digits, equal wall-clock", "digits", match="time", minutes=0.75, eval_n=60),
        Case("fashion-mnist", "fashion-mnist", max_steps=250, eval_n=16,
             sets=["eval_batch_size=250", "val_every=250"]),
    ]


def run_case(case: Case, root: str, log) -> dict:
    from pushforward.cli import main as cli_main

    run_dir = os.path.join(root, _slug(case.name))
    argv = case.argv(run_dir) + ["--overwrite", "--no-progress"]
    log(f"\n=== {case.name}: pushforward {shlex.join(argv)}")
    t0 = time.monotonic()
    code = cli_main(argv)
    if code != 0:
        raise RuntimeError(f"pushforward compare failed for {case.name} (exit {code})")
    with open(os.path.join(run_dir, "compare.json")) as f:
        result = json.load(f)
    result["case"] = case.name
    result["wall_s"] = time.monotonic() - t0
    result["reproduce"] = "pushforward " + shlex.join(case.argv(f"runs/compare/{os.path.basename(run_dir)}"))
    return result


def _cell(entry: dict, unit: str) -> str:
    if unit == "bits/dim":
        return f"{entry['bpd']:.3f} ± {entry['bpd_stderr']:.3f}"
    return f"{entry['nats']:.3f} ± {entry['nats_stderr']:.3f}"


def tables(results: list[dict]) -> tuple[str, str]:
    ks = sorted({k for r in results for k in r["ks"]})
    head = ["data", "match", "unit", "flow NLL (exact)", "VAE -ELBO", *[f"VAE -IWAE k={k}" for k in ks],
            "VAE -IWAE (largest k) minus flow, paired"]
    rows = []
    for r in results:
        unit = "bits/dim" if r["levels"] else "nats"
        s = r["scores"]
        kmax = max(r["ks"])
        gap = s["gaps"][f"neg_iwae_{kmax} - flow_nll"]
        rows.append([r["case"], r["match"], unit, _cell(s["flow_nll"], unit), _cell(s["neg_elbo"], unit),
                     *[_cell(s[f"neg_iwae_{k}"], unit) if f"neg_iwae_{k}" in s else "-" for k in ks],
                     _cell(gap, unit)])
    scores = markdown_table(head, rows)
    head2 = ["data", "flow (params)", "VAE (params)", "steps flow / VAE", "train s flow / VAE",
             "samples/s flow / VAE", "ELBO: recon, KL (nats)", "IWAE_kmax - ELBO (nats)", "test examples"]
    rows2 = []
    for r in results:
        f, v, s = r["flow"], r["vae"], r["scores"]
        kmax = max(r["ks"])
        g = s["gaps"][f"iwae_{kmax} - elbo"]
        rows2.append([
            r["case"], f"`{f['recipe']}` ({f['parameters']:,})",
            f"{v['arch']}, latent {v['latent']} ({v['parameters']:,})",
            f"{f.get('steps', '-')} / {v.get('steps', '-')}",
            f"{f.get('train_seconds', float('nan')):.0f} / {v.get('train_seconds', float('nan')):.0f}",
            f"{f['samples_per_s']:,.0f} / {v['samples_per_s']:,.0f}",
            f"{s['recon']['nats']:.2f}, {s['kl']['nats']:.2f}", f"{g['nats']:.3f} ± {g['nats_stderr']:.3f}",
            r["n_eval"],
        ])
    return scores, markdown_table(head2, rows2)


def report(results: list[dict], command: str, revision: str, elapsed: float,
           load: tuple[float, float]) -> str:
    scores, costs = tables(results)
    lines = [
        "## Flows versus VAEs (`bench/flow_vs_vae.py`)",
        "",
        (f"`{command}` — {machine_line()}; library git {revision}; total {elapsed / 60:.1f} min, "
         f"load average {load[0]:.1f} at the start and {load[1]:.1f} at the end (the machine is shared: "
         "wall-clock times and speeds are noisy)."),
        "",
        ("Each row is one `pushforward compare` run: a flow (the data set's default recipe) and a VAE "
         "(`pushforward.vae`: Gaussian encoder; Gaussian decoder for 2-D points, a Gaussian in the flows' "
         "logit space with the logit's log-determinant counted for dequantized images, so both models are "
         "scored in nats of the same `y`, and in bits/dim of the same discrete images). `params` rows: the "
         "VAE's width is matched to the flow's parameter count and both train for the same number of steps; "
         "the `time` row: default sizes, equal wall-clock minutes. All numbers are means ± standard error "
         "over the same test examples with the same dequantization noise. The flow's NLL is exact; the VAE's "
         "`-ELBO` and `-IWAE_k` are upper bounds on its NLL that tighten with k (IWAE_1 has the ELBO's "
         "expectation)."),
        "",
        scores,
        "",
        costs,
        "",
        "Commands (each reproduces one row; `--overwrite` to rerun into an existing directory):",
        "",
    ]
    lines += [f"- {r['case']}: `{r['reproduce']}`" for r in results]
    lines += ["", "Figures (samples side by side; the bound tightening with k):", ""]
    for r in results:
        slug = _slug(r["case"])
        lines.append(f"- {r['case']}: [samples](bench/figures/flow_vs_vae/{slug}_samples.png), "
                     f"[bound](bench/figures/flow_vs_vae/{slug}_bound.png)")
    return "\n".join(lines)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_").replace("__", "_")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run on tiny models (no write)")
    p.add_argument("--only", action="append",
                   help="run only the cases whose name starts with this (repeatable)")
    p.add_argument("--out", default=None, help="run directories (default runs/bench/flow_vs_vae[_quick])")
    p.add_argument("--no-write", dest="no_write", action="store_true", help="do not write BENCHMARKS.md")
    p.add_argument("--write", action="store_true", help="write BENCHMARKS.md even with --quick")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    write = (args.write or not args.quick) and not args.no_write and not args.only
    root = args.out or str(REPO / "runs" / "bench" / ("flow_vs_vae_quick" if args.quick else "flow_vs_vae"))
    command = command_line([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"$ {command}\n{machine_line()}")
    revision = library_revision()
    start, load0 = time.monotonic(), os.getloadavg()[0]
    torch.manual_seed(0)
    selected = [c for c in cases(args.quick) if not args.only or any(c.name.startswith(o) for o in args.only)]
    results = [run_case(c, root, log) for c in selected]
    elapsed, load1 = time.monotonic() - start, os.getloadavg()[0]
    scores, costs = tables(results)
    log("\n" + scores + "\n\n" + costs + f"\n\ntotal {elapsed / 60:.1f} min")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if write:
        FIGURES.mkdir(parents=True, exist_ok=True)
        for r in results:
            for name in ("samples", "bound"):
                shutil.copyfile(os.path.join(os.path.dirname(r["files"][f"{name}.png"]), f"{name}.png"),
                                FIGURES / f"{_slug(r['case'])}_{name}.png")
        path = write_section(SECTION, report(results, command, revision, elapsed, (load0, load1)))
        log(f"wrote section {SECTION!r} of {path} and figures in {FIGURES}")
    finite = all(math.isfinite(r["scores"][k]["nats"]) for r in results for k in ("flow_nll", "neg_elbo"))
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
