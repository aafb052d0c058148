"""Variational inference with planar, radial, Sylvester, residual and RealNVP flows; residual flows in 2-D.

Two measurements, written to the ``variational`` section of ``BENCHMARKS.md``:

* (a) **Reverse-KL variational inference** on two unnormalised 2-D targets defined here with their true
  log-normaliser ``log Z``: a *banana* (``x1 ~ N(0, 2^2)``, ``x2 | x1 ~ N(x1^2 / 4 - 1, 1)``,
  ``Z = 4 pi``) and *Neal's funnel* (``v ~ N(0, 3^2)``, ``x | v ~ N(0, e^v)``, ``Z = 6 pi``). Each flow
  ``q`` is trained for an equal budget of **CPU seconds** (``time.process_time``, one thread) by Adam on
  the reverse KL ``E_q[log q(x) - log p~(x)]`` with reparameterised samples
  (:meth:`~pushforward.core.Flow.sample_and_log_prob`, batch 256). Then, in evaluation mode (exact
  log-determinants everywhere, residual flows included), from fresh samples: the **KL estimate**
  ``KL(q || p) = E_q[log q - log p~] + log Z`` (mean +- s.e.), and the **error of the importance-sampled
  log-normaliser** ``log Z_hat - log Z`` with ``Z_hat = mean(p~(x) / q(x))`` (+- its delta-method s.e.).
  Each figure is the mean over seeds; the s.e. pools the seeds' sampling errors.
* (b) **Residual flows on the 2-D densities** against NSF and RealNVP at equal CPU time (test NLL +-
  s.e.): the training of :mod:`bench.beyond` (b) (:func:`bench.beyond.train_equal_cpu`, the library's
  ``fit``), the residual flow trained with its Russian-roulette log-determinant and scored with the exact one.

Usage::

    python bench/variational.py               # full run (~12 min of CPU), writes BENCHMARKS.md
    python bench/variational.py --quick       # seconds-long smoke run; no write
    python bench/variational.py --only a      # one part; --no-write, --json PATH
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script: make `bench.common` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import Tensor

from bench import beyond
from bench.common import (
    command_line,
    library_revision,
    machine_line,
    markdown_table,
    seed_everything,
    set_threads,
    write_section,
)
from pushforward import InvertibilityWarning, models
from pushforward.config import resolve_config
from pushforward.core import Flow
from pushforward.experiment import build_flow, load_dataset
from pushforward.train import evaluate

SECTION = "variational"


def say(*args) -> None:
    print(*args, flush=True)


# -- the targets ---------------------------------------------------------------------------------------
def banana(x: Tensor) -> Tensor:
    """Unnormalised log-density: ``x1 ~ N(0, 4)``, ``x2 | x1 ~ N(x1^2 / 4 - 1, 1)``; ``Z = 2 pi * 2 * 1``."""
    x1, x2 = x[..., 0], x[..., 1]
    return -x1.square() / 8 - (x2 - x1.square() / 4 + 1).square() / 2


def funnel(x: Tensor) -> Tensor:
    """Neal's funnel, unnormalised: ``v ~ N(0, 9)``, ``x | v ~ N(0, e^v)``;
    ``Z = int e^{-v^2/18} sqrt(2 pi e^v) e^{-v/2} dv = sqrt(2 pi) sqrt(18 pi) = 6 pi``."""
    v, y = x[..., 0], x[..., 1]
    return -v.square() / 18 - y.square() * torch.exp(-v) / 2 - v / 2


TARGETS: dict[str, tuple[Callable[[Tensor], Tensor], float]] = {
    "banana": (banana, math.log(4 * math.pi)),
    "funnel": (funnel, math.log(6 * math.pi)),
}


@dataclass
class Plan:
    vi_s: float = 12.0  # CPU seconds of reverse-KL steps per flow, target and seed
    seeds: int = 3
    batch: int = 256
    lr: float = 1e-3
    eval_samples: int = 20_000
    layers: int = 32  # planar and radial
    sylvester_layers: int = 8
    blocks: int = 4  # residual
    coupling_layers: int = 8  # realnvp
    hidden: tuple[int, ...] = (64, 64)
    toy: beyond.Plan = dataclasses.field(default_factory=lambda: beyond.Plan(toy_s=25.0))
    densities: tuple[str, ...] = beyond.DENSITIES
    residual_blocks: int = 8


def plan_for(quick: bool) -> Plan:
    if not quick:
        return Plan()
    toy = beyond.plan_for(True)
    return Plan(vi_s=0.3, seeds=1, batch=32, eval_samples=500, layers=2, sylvester_layers=2, blocks=2,
                coupling_layers=2, hidden=(8,), toy=toy, densities=("moons",), residual_blocks=2)


def vi_flows(plan: Plan) -> dict[str, Callable[[], Flow]]:
    h = list(plan.hidden)
    return {
        "planar": lambda: models.planar(2, layers=plan.layers),
        "radial": lambda: models.radial(2, layers=plan.layers),
        "sylvester": lambda: models.sylvester(2, layers=plan.sylvester_layers),
        "residual": lambda: models.residual(2, blocks=plan.blocks, hidden=h, variational=True),
        "realnvp": lambda: models.realnvp(2, layers=plan.coupling_layers, hidden=h),
    }


DESCRIPTIONS = {
    "planar": "`planar`: {layers} planar layers (explicit sampling)",
    "radial": "`radial`: {layers} radial layers (explicit sampling)",
    "sylvester": "`sylvester`: {sylvester_layers} triangular Sylvester layers (T-SNF, explicit sampling)",
    "residual": "`residual`, `variational=True`: {blocks} residual blocks, hidden {hidden}; trained with the "
                "Russian-roulette log-det, scored with the exact one",
    "realnvp": "`realnvp`: {coupling_layers} affine couplings, hidden {hidden}",
}


# -- (a) variational inference ---------------------------------------------------------------------------
def train_reverse_kl(flow: Flow, log_p: Callable[[Tensor], Tensor], plan: Plan) -> dict:
    flow.train()
    flow.validate = False  # the invertibility check costs a pass the other way: off in training, for all
    opt = torch.optim.Adam(flow.parameters(), lr=plan.lr)
    steps, c0, t0, losses = 0, time.process_time(), time.monotonic(), []
    while time.process_time() - c0 < plan.vi_s:
        x, log_q = flow.sample_and_log_prob(plan.batch)
        loss = (log_q - log_p(x)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        losses.append(float(loss.detach()))
    return {"steps": steps, "cpu_s": time.process_time() - c0, "wall_s": time.monotonic() - t0,
            "last_loss": sum(losses[-50:]) / max(1, len(losses[-50:]))}


def score(flow: Flow, log_p: Callable[[Tensor], Tensor], log_z: float, n: int) -> dict:
    """KL estimate and importance-sampled log Z, in evaluation mode (exact log-densities), in float64."""
    flow.eval()
    flow.validate = True
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InvertibilityWarning)
        x, log_q = flow.sample_and_log_prob(n)
    x, log_q = x.double(), log_q.double()
    log_w = log_p(x) - log_q
    finite = torch.isfinite(log_w)
    kl_terms = -log_w[finite] + log_z
    log_z_hat = float(torch.logsumexp(log_w[finite], 0) - math.log(int(finite.sum())))
    w = torch.exp(log_w[finite] - log_w[finite].max())
    se_log_z = float(w.std() / (w.mean() * math.sqrt(len(w))))
    return {"kl": float(kl_terms.mean()), "kl_se": float(kl_terms.std() / math.sqrt(len(kl_terms))),
            "log_z_error": log_z_hat - log_z, "log_z_se": se_log_z, "nonfinite": int((~finite).sum()),
            "invertibility_warnings": sum(issubclass(c.category, InvertibilityWarning) for c in caught)}


def part_a(plan: Plan) -> dict:
    out: dict = {}
    for target, (log_p, log_z) in TARGETS.items():
        for name, build in vi_flows(plan).items():
            runs = []
            for seed in range(plan.seeds):
                seed_everything(seed)
                flow = build()
                run = train_reverse_kl(flow, log_p, plan)
                run.update(score(flow, log_p, log_z, plan.eval_samples))
                say(f"(a) {target} {name} seed {seed}: {run['steps']} steps, KL {run['kl']:.4f} ± "
                    f"{run['kl_se']:.4f}, log Z error {run['log_z_error']:+.4f} ± {run['log_z_se']:.4f}")
                runs.append(run)
            out.setdefault(target, {})[name] = runs
    return out


def _mean_se(runs: list[dict], key: str, se_key: str) -> tuple[float, float]:
    k = len(runs)
    return (sum(r[key] for r in runs) / k, math.sqrt(sum(r[se_key] ** 2 for r in runs)) / k)


def table_a(res: dict, plan: Plan) -> str:
    rows = []
    for target, by_flow in res.items():
        for name, runs in by_flow.items():
            kl, kl_se = _mean_se(runs, "kl", "kl_se")
            err, err_se = _mean_se(runs, "log_z_error", "log_z_se")
            seeds = ", ".join(f"{r['kl']:.3f}" for r in runs)
            steps = round(sum(r["steps"] for r in runs) / len(runs))
            warned = sum(r["invertibility_warnings"] + r["nonfinite"] for r in runs)
            rows.append([target, name, steps, f"{kl:.4f} ± {kl_se:.4f}", seeds, f"{err:+.4f} ± {err_se:.4f}",
                         warned])
    table = markdown_table(["target", "flow", "steps (mean)", "KL(q ‖ p) (nats)", "KL per seed",
                            "log Z_hat − log Z (nats)", "warnings / non-finite"], rows)
    fields = {**dataclasses.asdict(plan), "hidden": tuple(plan.hidden)}
    models_ = "; ".join(d.format(**fields) for d in DESCRIPTIONS.values())
    return (
        f"{plan.vi_s:g} CPU-seconds of reverse-KL training per flow, target and seed (Adam, lr "
        f"{plan.lr:g}, {plan.batch} samples per step, one thread), {plan.seeds} seeds; scored on "
        f"{plan.eval_samples:,} fresh samples in evaluation mode (exact log-determinants for every flow). "
        "The figures are means over the seeds, ± the pooled Monte Carlo standard error (the spread between "
        "seeds is in the per-seed column). A KL of 0 and a log Z error of 0 are perfect; reverse KL is "
        "mode-seeking, so the importance-sampled log Z tends to be low where q misses mass (the funnel's "
        "neck). Both targets are one coupling away from a Gaussian (the banana: `x2 = z2 + x1^2 / 4 - 1`, "
        "an additive coupling; the funnel: `x = e^(v/2) z`, an affine one), which favours `realnvp` by "
        f"construction. Flows: {models_}.\n\n{table}"
    )


# -- (b) residual flows on the 2-D densities ---------------------------------------------------------------
def part_b(plan: Plan) -> dict:
    from pushforward.data.toy import toy_entropy

    out: dict = {}
    hidden = list(plan.toy.hidden)
    residual = {"blocks": plan.residual_blocks, "hidden": hidden}
    candidates = (  # label, recipe, recipe arguments
        ("residual (roulette)", "residual", {**residual, "train_logdet": "roulette"}),
        ("residual (exact)", "residual", {**residual, "train_logdet": "exact"}),
        ("nsf", "nsf", {"layers": plan.toy.layers, "hidden": hidden, "bins": 8}),
        ("realnvp", "realnvp", {"layers": 8, "hidden": hidden}),
    )
    for density in plan.densities:
        row: dict = {"entropy": toy_entropy(density)}
        for label, recipe, model in candidates:
            overrides = {"data": density, "recipe": recipe, "threads": 1, "seed": 0, **plan.toy.toy}
            extra = {k: v for k, v in plan.toy.toy.get("model", {}).items() if k in model}
            overrides["model"] = {**model, **extra}
            config = resolve_config({}, overrides)
            ds = load_dataset(config)
            flow = build_flow(config, ds)
            say(f"(b) {density}: {label} {config.model}")
            run = beyond.train_equal_cpu(flow, ds.train, ds.val, config, plan.toy.toy_s, plan.toy)
            run["eval"] = evaluate(flow, ds.test, config.eval_batch_size, seed=0, reconstruction=False)
            run["model"] = f"`{recipe}` " + ", ".join(f"{k}={v}" for k, v in config.model.items())
            say(f"    test NLL {beyond.pm(run['eval']['nll'], run['eval']['nll_stderr'])} nats")
            row[label] = run
        out[density] = row
    return out


def table_b(res: dict, plan: Plan) -> str:
    rows = []
    for density, row in res.items():
        h = row["entropy"]
        for label, r in row.items():
            if label == "entropy":
                continue
            rows.append([density, f"{h:.3f}" if h is not None else "n/a", label, f"{r['params']:,}",
                         f"{r['cpu_per_step'] * 1e3:.1f}", r["steps"],
                         beyond.pm(r["eval"]["nll"], r["eval"]["nll_stderr"])])
    table = markdown_table(["density", "true entropy (nats)", "model", "parameters", "CPU ms / step", "steps",
                            "test NLL (nats)"], rows)
    first = next(iter(res.values()))
    nsf = first["nsf"]
    models_ = "; ".join(f"{label}: {r['model']}" for label, r in first.items() if label != "entropy")
    return (
        f"{plan.toy.toy_s:g} CPU-seconds of training steps each (batch {nsf['batch_size']}, lr "
        f"{nsf['lr']:g}, {nsf['n_train']} training points; `pushforward.train.fit` as in `bench/beyond.py` "
        f"(b)); test NLL (nats, mean ± s.e. over {nsf['eval']['n']} fresh points). The residual flows train "
        "with the Russian-roulette estimate of the log-determinant (the recipe's default, "
        "`train_logdet=\"roulette\"`) or the exact one (`\"exact\"`, cheaper in 2-D: two Jacobian rows), and "
        "both are scored with the exact one (evaluation mode). Every residual step also pays the exact "
        "spectral norms of its weights. "
        f"Models: {models_}.\n\n{table}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets (smoke test); no write unless --write")
    p.add_argument("--only", nargs="+", choices=("a", "b"), help="run only these parts (no write)")
    p.add_argument("--vi-seconds", type=float, help="CPU seconds per flow, target and seed in (a)")
    p.add_argument("--seeds", type=int, help="seeds in (a)")
    p.add_argument("--toy-seconds", type=float, help="CPU seconds per candidate in (b)")
    p.add_argument("--write", action="store_true")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--json", help="also dump the raw results here")
    args = p.parse_args(argv)
    plan = plan_for(args.quick)
    if args.vi_seconds:
        plan.vi_s = args.vi_seconds
    if args.seeds:
        plan.seeds = args.seeds
    if args.toy_seconds:
        plan.toy.toy_s = args.toy_seconds
    parts = set(args.only or ("a", "b"))
    set_threads(1)
    t0, load0 = time.monotonic(), os.getloadavg()[0]
    results: dict = {}
    texts = []
    if "a" in parts:
        results["a"] = part_a(plan)
        texts.append("### (a) Variational inference by reverse KL at equal CPU time\n\n"
                     + table_a(results["a"], plan))
    if "b" in parts:
        results["b"] = part_b(plan)
        texts.append("### (b) Residual flows on the 2-D densities at equal CPU time\n\n"
                     + table_b(results["b"], plan))
    elapsed = time.monotonic() - t0
    header = (
        "## Variational-inference flows and residual flows\n\n"
        f"Written by `{command_line(sys.argv if argv is None else ['bench/variational.py', *argv])}` on "
        f"{time.strftime('%Y-%m-%d')} ({elapsed / 60:.1f} min); library at {library_revision()}.\n"
        f"{machine_line()}; 1-minute load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
        "end. Budgets are CPU seconds (`time.process_time`) on one thread, so other jobs on a shared machine "
        "do not shorten one candidate's budget."
    )
    text = header + "\n\n" + "\n\n".join(texts)
    say("\n" + text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if (args.write or not args.quick) and not args.no_write:
        if args.only:
            say("not writing BENCHMARKS.md: --only gives a partial section")
        else:
            say(f"wrote {write_section(SECTION, text)}")
    figures = [r["kl"] for t in results.get("a", {}).values() for runs in t.values() for r in runs]
    figures += [r["eval"]["nll"] for row in results.get("b", {}).values() for k, r in row.items()
                if k != "entropy"]
    return 0 if all(math.isfinite(v) for v in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
