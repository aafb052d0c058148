"""Neural autoregressive flows on the 2-D densities at equal CPU time: pushforward's ``naf`` and ``unaf``
against its ``nsf`` and ``realnvp`` and against zuko's NAF and UNAF.

Every candidate trains in the shared loop of ``bench/peer_quality.py`` (``train_one``: Adam, lr 1e-3 with
warm-up and cosine decay over the budget, clipping at 10, batch 512, validation every 10% of the budget
with the clock stopped, best validation weights restored), one process with one thread per (candidate,
density), the budget in CPU seconds of that process (``time.process_time``). Scored once on the test
split (nats, mean +- s.e. over the test points); the NAF target compares pushforward's NAF with zuko's
on the same test points (paired difference +- its s.e.).

Also measured after training: the CPU time to draw 2,000 samples (NAF and UNAF invert by bisection; zuko
too), and, for ``unaf``, the quadrature error of its test log-densities (64 Clenshaw-Curtis nodes, the
default, against 512 on the same weights): its log-determinant is exact, its forward value is a quadrature.

    python bench/neural.py                 # 60 CPU-s per run, 3 densities, 6 candidates; writes BENCHMARKS.md
    python bench/neural.py --quick         # smoke test: tiny data, models and budgets; no write
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench.common import (
    command_line,
    library_revision,
    machine_line,
    markdown_table,
    run_subprocesses,
    write_section,
)
from bench.peer_models import Built, Missing, available, version

SECTION = "neural"
TASKS = ("moons", "8gaussians", "checkerboard")
CANDIDATES = ("naf", "unaf", "nsf", "realnvp", "zuko NAF", "zuko UNAF")
BUDGET_S = 60.0
SAMPLES = 2000


def _models(quick: bool) -> dict[str, dict]:
    """Each candidate's arguments (recipe defaults for pushforward, library defaults for zuko)."""
    if quick:
        small = {"layers": 2, "hidden": [16, 16]}
        zuko = {"transforms": 2, "hidden_features": [16, 16]}
        return {"naf": {**small, "units": 4}, "unaf": {**small, "units": 4, "nodes": 16}, "nsf": {**small},
                "realnvp": {**small}, "zuko NAF": zuko, "zuko UNAF": zuko}
    return {"naf": {}, "unaf": {}, "nsf": {}, "realnvp": {}, "zuko NAF": {}, "zuko UNAF": {}}


def build_candidate(name: str, spec, seed: int = 0, quick: bool = False) -> Built:
    """The candidate ``name`` for 2-D data, as a :class:`bench.peer_models.Built` for ``train_one``."""
    torch.manual_seed(seed)
    kwargs = _models(quick)[name]
    if name.startswith("zuko"):
        if not available("zuko"):
            raise Missing("zuko")
        import zuko

        cls = zuko.flows.NAF if name == "zuko NAF" else zuko.flows.UNAF
        flow = cls(spec.features, **kwargs)
        return Built(name, flow, lambda x: flow().log_prob(x), lambda n: flow().sample((n,)))
    from pushforward import models

    pf = getattr(models, name)(spec.features, **kwargs)
    return Built(name, pf, pf.log_prob, pf.sample, flow=pf)


def describe(quick: bool) -> str:
    """One line per candidate: what it is, at the arguments used."""
    from pushforward import models

    out = []
    for name, kwargs in _models(quick).items():
        if name.startswith("zuko"):
            args = (", ".join(f"{k}={v}" for k, v in kwargs.items())
                    or "defaults: 3 transforms, signal 16, MADE 64-64")
            out.append(f"`{name}` (zuko {version('zuko')}; {args})")
        else:
            full = models.RECIPES[name](2, **kwargs).recipe["kwargs"]
            shown = {k: v for k, v in full.items() if k not in ("features", "context_features")}
            out.append(f"`{name}` {shown}")
    return "; ".join(out)


# ------------------------------------------------------------------------------------------------
# One (candidate, density) run, in its own process
# ------------------------------------------------------------------------------------------------
def _log_prob(log_prob, x: torch.Tensor, batch: int = 2000) -> torch.Tensor:
    return torch.cat([log_prob(x[i: i + batch]).double() for i in range(0, len(x), batch)])


def _worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", nargs=6, metavar=("NAME", "TASK", "BUDGET", "SEED", "OUT", "CLOCK"))
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    name, task, budget, seed, out, clock = a.worker
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    from bench.peer_quality import load_data, train_one

    kept: dict = {}

    def builder(lib, spec, seed=0):
        kept["built"] = build_candidate(lib, spec, seed, a.quick)
        return kept["built"]

    res = train_one(name, task, float(budget), int(seed), a.quick, clock, builder=builder)
    extra: dict = {"sample_ms": math.nan, "quadrature": math.nan}
    if res.status == "ok":
        built = kept["built"]
        x_test = load_data(task, int(seed), a.quick).test
        with torch.no_grad():
            nll = -_log_prob(built.log_prob, x_test)
            n = SAMPLES // 10 if a.quick else SAMPLES
            t0 = time.process_time()
            built.sample(n)
            extra["sample_ms"] = (time.process_time() - t0) * 1e6 / n  # per 1,000 samples
            if name == "unaf":  # the same weights with a 512-node quadrature
                from pushforward import models

                record = built.flow.recipe
                fine = models.unaf(**{**record["kwargs"], "nodes": 512})
                fine.load_state_dict(built.flow.state_dict())
                ref = _log_prob(fine.log_prob, x_test)
                extra["quadrature"] = float((ref + nll).abs().max())
        torch.save(nll, out + ".nll.pt")
    with open(out, "w") as f:
        json.dump({**asdict(res), **extra}, f)
    return 0


# ------------------------------------------------------------------------------------------------
# Orchestration and the tables
# ------------------------------------------------------------------------------------------------
def run_all(tasks, candidates, budget_s: float, seed: int, quick: bool, jobs: int, log=print) -> dict:
    units = [(task, name) for task in tasks for name in candidates]
    tmp = tempfile.mkdtemp(prefix="neural_bench_")
    results: dict = {}

    def path(unit) -> str:
        return os.path.join(tmp, f"{unit[0]}-{unit[1].replace(' ', '_')}.json")

    def command(unit) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), "--worker", unit[1], unit[0], str(budget_s),
                str(seed), path(unit), "cpu"] + (["--quick"] if quick else [])

    def finished(unit, code: int, text: str) -> None:
        if code == 0 and os.path.exists(path(unit)):
            with open(path(unit)) as f:
                r = json.load(f)
            nll = path(unit) + ".nll.pt"
            r["nll"] = torch.load(nll) if os.path.exists(nll) else None
            log(f"  {unit[1]:10s} {unit[0]:13s} {r['status']:8s} steps {r['steps']:6d} test "
                f"{r['test']:.4f} +- {r['test_stderr']:.4f} (sampling {r['sample_ms']:.1f} ms per 1,000)")
        else:
            r = {"status": "error", "message": " | ".join(text.strip().splitlines()[-3:])[-300:]}
            log(f"  {unit[1]} on {unit[0]}: ERROR {r['message']}")
        results[unit] = r

    run_subprocesses(units, command, jobs, finished, capture=True, poll_s=0.05)
    return results


def _cell(r: dict) -> str:
    if r.get("status") != "ok":
        return r.get("status", "error")
    return f"{r['test']:.4f} ± {r['test_stderr']:.4f} ({r['steps']})"


def target_rows(results: dict, tasks) -> list[list[str]]:
    """NAF vs zuko NAF per density: the paired difference of test NLL on the same points."""
    rows = []
    for task in tasks:
        a, b = results.get((task, "naf"), {}), results.get((task, "zuko NAF"), {})
        if a.get("nll") is None or b.get("nll") is None:
            rows.append([task, "n/a", "n/a", "not measured"])
            continue
        d = a["nll"] - b["nll"]
        mean, se = float(d.mean()), float(d.std() / math.sqrt(len(d)))
        met = mean <= 2 * se  # beats it, or within two standard errors (matches)
        verdict = "beats" if mean < -2 * se else "matches" if met else "worse"
        rows.append([task, f"{mean:+.4f} ± {se:.4f}", verdict, "met" if met else "MISSED"])
    return rows


def report(results: dict, tasks, candidates, budget_s: float, quick: bool, command: str, elapsed: float,
           load: tuple[float, float]) -> str:
    from pushforward.data import toy_entropy

    rows = []
    for task in tasks:
        h = toy_entropy(task)
        rows.append([task, f"{h:.3f}" if h is not None else "n/a",
                     *[_cell(results.get((task, c), {})) for c in candidates]])
    main = markdown_table(["density", "true entropy", *[f"{c} test NLL (steps)" for c in candidates]], rows)
    extra_rows = []
    for c in candidates:
        rs = [results.get((t, c), {}) for t in tasks]
        ok = [r for r in rs if r.get("status") == "ok"]
        params = ok[0]["params"] if ok else "n/a"
        sample = f"{sum(r['sample_ms'] for r in ok) / len(ok):.1f}" if ok else "n/a"
        quad = "exact" if c != "zuko UNAF" else "not measured"
        if c == "unaf" and ok:
            quad = f"{max(r['quadrature'] for r in ok):.1e}"
        extra_rows.append([c, params, sample, quad])
    nodes = _models(quick)["unaf"].get("nodes", 64)
    extra = markdown_table(["candidate", "parameters", "sampling (CPU ms per 1,000 samples, mean)",
                            f"max \\|Δ log p\\| on the test points from the forward value's quadrature "
                            f"({nodes} vs 512 nodes)"], extra_rows)
    target = markdown_table(["density", "NAF − zuko NAF test NLL (paired, nats)", "verdict", "target"],
                            target_rows(results, tasks))
    return (
        "## Neural autoregressive flows on the 2-D densities\n\n"
        f"Written by `{command}` on {time.strftime('%Y-%m-%d')} ({elapsed / 60:.1f} min); library at "
        f"{library_revision()}. {machine_line()}; 1-minute load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end.\n\n"
        f"{budget_s:g} CPU-seconds of training steps per candidate and density (`time.process_time` of its "
        "own one-thread process; validation passes are not counted), in `bench/peer_quality.py`'s shared "
        "loop (Adam, lr 1e-3, warm-up and cosine decay, clipping at 10, batch "
        f"{64 if quick else 512}, best validation weights). Test NLL in nats, mean ± s.e. over "
        f"{'2,000' if quick else '20,000'} test points, with the optimizer steps taken in brackets. "
        f"Candidates: {describe(quick)}. pushforward's `naf` and `unaf` and zuko's NAF and UNAF all sample "
        "by bisection; pushforward's `unaf` computes its forward value by quadrature (exact log-determinant; "
        "the error of the value is in the second table), `naf`'s forward value and log-determinant are "
        f"closed forms.\n\n{main}\n\n{extra}\n\nTarget: pushforward's NAF matches or beats zuko's NAF at "
        "equal CPU time on every density (difference ≤ 2 s.e.).\n\n" + target
    )


def main(argv: list[str] | None = None) -> int:
    if argv is None and "--worker" in sys.argv:
        return _worker(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny data, models and budgets; no write unless --write")
    p.add_argument("--budget", type=float, help=f"CPU seconds per run (default {BUDGET_S:g}; quick 1)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, help="densities (default: all; quick: moons)")
    p.add_argument("--candidates", nargs="+", choices=CANDIDATES, help="default: all (no write unless all)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    budget = args.budget or (1.0 if args.quick else BUDGET_S)
    tasks = args.tasks or (("moons",) if args.quick else TASKS)
    candidates = args.candidates or CANDIDATES
    t0, load0 = time.monotonic(), os.getloadavg()[0]
    results = run_all(tasks, candidates, budget, args.seed, args.quick, args.jobs)
    command = command_line(sys.argv if argv is None else ["bench/neural.py", *argv])
    text = report(results, tasks, candidates, budget, args.quick, command, time.monotonic() - t0,
                  (load0, os.getloadavg()[0]))
    print("\n" + text)
    if (args.write or not args.quick) and not args.no_write:
        if args.candidates and set(args.candidates) != set(CANDIDATES):
            print("not writing BENCHMARKS.md: --candidates gives a partial section")
        else:
            print(f"wrote {write_section(SECTION, text)}")
    # a peer that is not installed is "unsupported", reported as such, not a failure
    return 0 if all(r.get("status") in ("ok", "unsupported") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
