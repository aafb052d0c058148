"""Beyond RealNVP: autoregressive vs coupling costs, NSF vs RealNVP, variational dequantization.

Three measurements, written to the ``beyond`` section of ``BENCHMARKS.md``:

* (a) **Throughput at D = 64** of ``maf``, ``iaf`` and the coupling ``nsf`` (5 layers, MADE / MLP
  hidden (128, 128), batch 512, no gradients): ``log_prob`` and ``sample``, all six candidates
  interleaved round by round (:func:`bench.common.interleaved`), medians with min-max. The slow
  directions take ``D`` sequential network passes per layer: MAF's sampling and IAF's density.
* (b) **Test NLL of NSF vs RealNVP at equal training time**: the 2-D densities ``moons``,
  ``8gaussians`` and ``checkerboard`` (``realnvp`` 8 layers vs ``nsf`` 5 layers, both hidden
  (128, 128)), and the 8x8 digits (the 64 pixels as a vector, logit preprocessing inside the flow,
  ``realnvp`` vs ``nsf``; the image recipe ``realnvp_image`` for reference).
* (c) **Uniform vs variational dequantization**, test bits/dim at equal training time, on digits
  (``realnvp_image``) and Fashion-MNIST (``glow``), with the default dataset settings; the
  variational figure is the bound ``E_q[-log p(y) + log q(u|x)] + D log K`` and the same model is
  also scored with uniform noise.

"Equal training time" is an equal budget of **CPU seconds of optimizer steps** on one thread:
each candidate's CPU time per step is measured on a throwaway copy first, then it trains for
``budget / per_step`` steps with :func:`pushforward.train.fit` (warm-up then cosine schedule over
exactly those steps, best validation weights restored). CPU time rather than wall time, so other
jobs on a shared machine do not shorten one candidate's budget; validations are outside the
budget. Test sets are scored with :func:`pushforward.train.evaluate` (seeded noise).

Usage::

    python bench/beyond.py            # full run (~20 min on 2 cores), writes BENCHMARKS.md
    python bench/beyond.py --quick    # seconds-long smoke run on tiny models; no write
    python bench/beyond.py --only a   # one part (a, b or c); --no-write, --json PATH
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script: make `bench.common` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench.common import (
    calibrate,
    command_line,
    interleaved,
    library_revision,
    machine_line,
    markdown_table,
    seed_everything,
    set_threads,
    write_section,
)
from pushforward import models
from pushforward.config import TrainConfig, resolve_config
from pushforward.core import Compose, Flow, Transform
from pushforward.distributions import StandardNormal
from pushforward.experiment import build_flow, load_dataset
from pushforward.train import evaluate, fit
from pushforward.transforms import Logit

SECTION = "beyond"
DENSITIES = ("moons", "8gaussians", "checkerboard")


def say(*args) -> None:
    print(*args, flush=True)


@dataclass
class Plan:
    """Sizes of one run of the script (full or quick)."""

    features: int = 64
    batch: int = 512
    hidden: tuple[int, int] = (128, 128)
    layers: int = 5
    rounds: int = 7
    round_s: float = 0.3
    toy_s: float = 40.0  # CPU seconds of optimizer steps per 2-D candidate
    digits_s: float = 80.0
    fashion_s: float = 150.0
    calib_s: float = 3.0  # CPU seconds of steps used to measure the cost of one step
    densities: tuple[str, ...] = DENSITIES
    toy: dict = dataclasses.field(default_factory=dict)  # TrainConfig overrides for the 2-D runs
    digits: dict = dataclasses.field(default_factory=dict)
    fashion: dict = dataclasses.field(default_factory=dict)
    fashion_val: int = 1000  # validation images (the budget excludes validation, but the clock does not)
    fashion_test: int = 0  # 0: the whole official test set
    validations: int = 8


def plan_for(quick: bool) -> Plan:
    if not quick:
        return Plan()
    return Plan(
        features=16, batch=64, hidden=(16, 16), layers=2, rounds=2, round_s=0.01, toy_s=0.3, digits_s=0.3,
        fashion_s=0.3, calib_s=0.1, densities=("moons",),
        toy={"n_train": 2000, "n_val": 500, "n_test": 500, "model": {"layers": 2, "hidden": [16, 16]}},
        digits={"max_train": 256, "model": {"hidden_channels": 8},
                "dequantizer": {"layers": 2, "hidden_channels": 8}},
        fashion={"max_train": 256, "model": {"hidden_channels": 8, "steps": 1},
                 "dequantizer": {"layers": 2, "hidden_channels": 8}},
        fashion_val=128, fashion_test=256, validations=2,
    )


# -- (a) throughput ---------------------------------------------------------------------------------
def part_a(plan: Plan, log: Callable[[str], None] | None) -> dict:
    d, b, hidden, layers = plan.features, plan.batch, plan.hidden, plan.layers
    seed_everything(0)
    flows = {
        "maf": models.maf(d, layers=layers, hidden=hidden),
        "iaf": models.iaf(d, layers=layers, hidden=hidden),
        "nsf (coupling)": models.nsf(d, layers=layers, hidden=hidden, bins=8),
    }
    x = torch.randn(b, d)
    candidates: dict[str, Callable[[], object]] = {}
    for name, flow in flows.items():
        flow.eval()
        with torch.no_grad():  # move off the identity so the spline/affine kernels do real work
            for p in flow.parameters():
                p.add_(0.05 * torch.randn_like(p))

        def log_prob(flow=flow):
            with torch.no_grad():
                return flow.log_prob(x)

        def sample(flow=flow):
            with torch.no_grad():
                return flow.sample(b)

        candidates[f"{name}: log_prob"] = log_prob
        candidates[f"{name}: sample"] = sample
    for fn in candidates.values():  # warm
        fn()
    steps = {name: calibrate(fn, plan.round_s, minimum=1, maximum=1000) for name, fn in candidates.items()}
    say(f"(a) {len(candidates)} candidates, {plan.rounds} rounds, calls per round: {steps}")
    stats = interleaved(candidates, rounds=plan.rounds, steps=steps, warmup=1, log=log)
    return {"stats": stats, "features": d, "batch": b, "hidden": hidden, "layers": layers}


def table_a(res: dict) -> str:
    stats, b, d = res["stats"], res["batch"], res["features"]
    passes = {"maf": ("1", f"D = {d}"), "iaf": (f"D = {d}", "1"), "nsf (coupling)": ("1", "1")}
    rows = []
    for name, (p_density, p_sample) in passes.items():
        lp, sm = stats[f"{name}: log_prob"], stats[f"{name}: sample"]
        rows.append([f"`{name}`", lp.ms(2), lp.rate(b), p_density, sm.ms(2), sm.rate(b), p_sample])
    table = markdown_table(
        ["model", "log_prob ms / batch", "log_prob rows/s", "passes per layer", "sample ms / batch",
         "sample rows/s", "passes per layer"], rows)
    maf_ratio = stats["maf: sample"].median / stats["maf: log_prob"].median
    iaf_ratio = stats["iaf: log_prob"].median / stats["iaf: sample"].median
    return table + (
        f"\n\nThe slow directions: MAF sampling costs {maf_ratio:.0f}x its density evaluation and IAF "
        f"density costs {iaf_ratio:.0f}x its sampling, because inverting a masked autoregressive layer "
        f"recovers the {d} coordinates one after the other ({d} sequential MADE passes per layer, "
        "`pushforward.transforms.Autoregressive.inverse`). The coupling NSF is one pass per layer both ways."
    )


# -- training at equal CPU time ------------------------------------------------------------------------
def cpu_per_step(flow: Flow, train, val, config: TrainConfig, calib_s: float) -> float:
    """CPU seconds per optimizer step of ``flow`` (measured on a copy; the first 3 steps are not counted)."""
    probe = copy.deepcopy(flow)
    cfg = dataclasses.replace(config, max_steps=10**7, val_every=10**9, patience=0, progress=False,
                              max_minutes=0.0, run_dir="")
    marks: list[float] = []

    def callback(step, loss, f):
        marks.append(time.process_time())
        if len(marks) > 4 and marks[-1] - marks[3] > calib_s:
            raise KeyboardInterrupt  # fit treats it like Ctrl-C and stops

    fit(probe, train, val, cfg, run_dir=None, callback=callback)
    return (marks[-1] - marks[3]) / (len(marks) - 4)


def train_equal_cpu(flow: Flow, train, val, config: TrainConfig, budget_s: float, plan: Plan) -> dict:
    per_step = cpu_per_step(flow, train, val, config, plan.calib_s)
    steps = max(10, int(budget_s / per_step))
    cfg = dataclasses.replace(
        config, max_steps=steps, val_every=max(1, steps // plan.validations), patience=0, progress=False,
        warmup_steps=max(1, min(config.warmup_steps, steps // 10)), run_dir="",
        max_minutes=max(1.0, 6 * budget_s / 60),  # a safety net only: the step count is the budget
    )
    c0, t0 = time.process_time(), time.monotonic()
    hist = fit(flow, train, val, cfg, run_dir=None)
    cpu, wall = time.process_time() - c0, time.monotonic() - t0
    say(f"    {hist.step} steps ({per_step * 1e3:.1f} ms CPU each), {cpu:.0f} s CPU / {wall:.0f} s wall "
        f"including validations, stopped: {hist.stop_reason}")
    return {"steps": hist.step, "cpu_per_step": per_step, "cpu_s": cpu, "wall_s": wall,
            "stop": hist.stop_reason, "params": sum(p.numel() for p in flow.parameters()),
            "batch_size": cfg.batch_size, "lr": cfg.lr,
            "n_train": len(train.images) if hasattr(train, "images") else len(train)}


def pm(mean: float, se: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


# -- (b) NSF vs RealNVP ----------------------------------------------------------------------------------
class _OnVectors(Transform):
    """``transform``, a transform of vectors of ``C * H * W`` features, applied to images ``(*, C, H, W)``."""

    def __init__(self, transform: Transform, shape: Sequence[int]):
        super().__init__()
        self.transform, self.shape = transform, tuple(shape)

    def forward(self, x, context=None):
        z, ladj = self.transform(x.flatten(-3), context)
        return z.unflatten(-1, self.shape), ladj

    def inverse(self, z, context=None):
        x, ladj = self.transform.inverse(z.flatten(-3), context)
        return x.unflatten(-1, self.shape), ladj


def vector_image_flow(recipe: str, shape: Sequence[int], **kwargs) -> Flow:
    """A vector recipe on flattened images, with the images' logit preprocessing (``alpha = 0.05``) inside.

    The flow takes the images as they are (integer images dequantized by the objective); its base is
    the standard normal of the image shape, the same density as the recipe's over the flattened vector.
    """
    inner = models.RECIPES[recipe](math.prod(shape), **kwargs)
    transform = Compose(Logit(0.05, event_dim=3), _OnVectors(inner.transform, shape))
    return Flow(transform, StandardNormal(tuple(shape)))


def part_b(plan: Plan, cache: dict) -> dict:
    from pushforward.data.toy import toy_entropy

    out: dict = {"toy": {}, "digits": {}}
    for density in plan.densities:
        row = {"entropy": toy_entropy(density)}
        for recipe, model in (("realnvp", {"layers": 8, "hidden": list(plan.hidden)}),
                              ("nsf", {"layers": plan.layers, "hidden": list(plan.hidden), "bins": 8})):
            overrides = {"data": density, "recipe": recipe, "threads": 1, "seed": 0, **plan.toy}
            overrides["model"] = {**model, **plan.toy.get("model", {})}
            config = resolve_config({}, overrides)
            ds = load_dataset(config)
            flow = build_flow(config, ds)
            say(f"(b) {density}: {recipe} {config.model}")
            run = train_equal_cpu(flow, ds.train, ds.val, config, plan.toy_s, plan)
            run["eval"] = evaluate(flow, ds.test, config.eval_batch_size, seed=0, reconstruction=False)
            say(f"    test NLL {pm(run['eval']['nll'], run['eval']['nll_stderr'])} nats")
            row[recipe] = run
        out["toy"][density] = row
    # digits: the 64 pixels as a vector, RealNVP vs NSF; the image RealNVP for reference
    config = resolve_config({}, {"data": "digits", "threads": 1, "seed": 0, **plan.digits})
    ds = load_dataset(config)
    train, val, test = ds.train, ds.val, ds.test
    hidden, shape = list(plan.hidden), tuple(ds.train.images.shape[1:])
    for name, build in (
        ("realnvp", lambda: vector_image_flow("realnvp", shape, layers=8, hidden=hidden)),
        ("nsf", lambda: vector_image_flow("nsf", shape, layers=plan.layers, hidden=hidden, bins=8)),
    ):
        torch.manual_seed(0)
        flow = build()
        say(f"(b) digits as 64-vectors: {name}")
        run = train_equal_cpu(flow, train, val, config, plan.digits_s, plan)
        run["eval"] = evaluate(flow, test, config.eval_batch_size, seed=0, reconstruction=False)
        say(f"    test {pm(run['eval']['bpd'], run['eval']['bpd_stderr'])} bits/dim")
        out["digits"][name] = run
    out["digits"]["realnvp_image"] = image_run("digits", "uniform", plan, cache)
    return out


def table_b(res: dict, plan: Plan) -> str:
    rows = []
    for density, row in res["toy"].items():
        h = row["entropy"]
        cells = [density, f"{h:.3f}" if h is not None else "n/a"]
        for recipe in ("realnvp", "nsf"):
            r = row[recipe]
            cells += [pm(r["eval"]["nll"], r["eval"]["nll_stderr"]), f"{r['steps']}"]
        rows.append(cells)
    toy = markdown_table(["density", "true entropy (nats, the floor)", "RealNVP test NLL (nats)",
                          "RealNVP steps", "NSF test NLL (nats)", "NSF steps"], rows)
    first = next(iter(res["toy"].values()))["nsf"]
    d = res["digits"]
    labels = {"realnvp": "`realnvp` on the 64 pixels as a vector (8 layers)",
              "nsf": f"`nsf` (coupling) on the 64 pixels as a vector ({plan.layers} layers, 8 bins)",
              "realnvp_image": "`realnvp_image` (multi-scale, ResNet conditioners; reference)"}
    rows = [[labels[k], f"{r['params']:,}", r["steps"], pm(r["eval"]["bpd"], r["eval"]["bpd_stderr"])]
            for k, r in d.items()]
    digits = markdown_table(["digits model", "parameters", "steps", "test bits/dim"], rows)
    return (
        f"2-D densities: {plan.toy_s:g} CPU-seconds of training steps each (batch {first['batch_size']}, lr "
        f"{first['lr']:g}, {first['n_train']} training points), test NLL on {first['eval']['n']} fresh "
        f"points. RealNVP: 8 affine couplings; NSF: {plan.layers} rational-quadratic spline couplings with 8 "
        f"bins; both MLP conditioners with hidden {tuple(plan.hidden)}.\n\n{toy}\n\nDigits "
        f"({d['nsf']['n_train']} training images, 17 grey levels, the fixed {d['nsf']['eval']['n']}-image "
        f"test split): {plan.digits_s:g} CPU-seconds of training steps each, batch {d['nsf']['batch_size']}, "
        "uniform dequantization; the vector flows get the same logit preprocessing (alpha 0.05) inside the "
        f"flow as the image recipes.\n\n{digits}"
    )


# -- (c) uniform vs variational dequantization ---------------------------------------------------------
def image_run(data: str, dequantization: str, plan: Plan, cache: dict) -> dict:
    key = (data, dequantization)
    if key in cache:
        return cache[key]
    extra = plan.digits if data == "digits" else plan.fashion
    config = resolve_config({}, {"data": data, "dequantization": dequantization, "threads": 1, "seed": 0,
                                 **extra})
    ds = load_dataset(config)
    val, test = ds.val, ds.test
    budget = plan.digits_s if data == "digits" else plan.fashion_s
    if data == "fashion-mnist":
        val = val.subset(torch.arange(min(plan.fashion_val, len(val))))
        if plan.fashion_test:
            test = test.subset(torch.arange(plan.fashion_test))
    flow = build_flow(config, ds)
    say(f"(c) {data}: {config.recipe} {config.model}, {dequantization} dequantization"
        + (f" {config.dequantizer}" if dequantization == "variational" else ""))
    run = train_equal_cpu(flow, ds.train, val, config, budget, plan)
    run["eval"] = evaluate(flow, test, config.eval_batch_size, seed=0, reconstruction=False)
    run["recipe"], run["model"], run["dequantizer"] = config.recipe, config.model, config.dequantizer
    run["n_train"], run["n_val"] = len(ds.train), len(val)
    e = run["eval"]
    noise = f" (uniform noise: {pm(e['uniform_bpd'], e['uniform_bpd_stderr'])})" if "uniform_bpd" in e else ""
    say(f"    test {pm(e['bpd'], e['bpd_stderr'])} bits/dim{noise}")
    cache[key] = run
    return run


def part_c(plan: Plan, cache: dict) -> dict:
    return {data: {deq: image_run(data, deq, plan, cache) for deq in ("uniform", "variational")}
            for data in ("digits", "fashion-mnist")}


def table_c(res: dict, plan: Plan) -> str:
    rows = []
    for data, runs in res.items():
        for deq, r in runs.items():
            e = r["eval"]
            model = f"`{r['recipe']}` {json.dumps(r['model'])}"
            rows.append([
                data, model, deq + (f" {json.dumps(r['dequantizer'])}" if deq == "variational" else ""),
                f"{r['params']:,}", r["steps"], pm(e["bpd"], e["bpd_stderr"]),
                pm(e["uniform_bpd"], e["uniform_bpd_stderr"]) if "uniform_bpd" in e else "(same)",
                f"{e['log_q']:.1f}" if "log_q" in e else "0",
            ])
    table = markdown_table(["data", "flow", "dequantization", "parameters", "steps",
                            "test bits/dim (bound)", "same model, uniform noise", "E_q[log q] (nats)"], rows)
    fm = res["fashion-mnist"]["uniform"]
    return (
        f"Budgets: digits {plan.digits_s:g} CPU-seconds of training steps per run (batch 64), Fashion-MNIST "
        f"{plan.fashion_s:g} (batch 64, {fm['n_train']} training images, validation on {fm['n_val']} "
        "held-out training images); the dataset defaults otherwise (the data set registry, "
        "`pushforward/data/builtin.py`), warm-up shortened to a tenth of the steps. Short budgets: these "
        "compare the two objectives early in training, not converged models. The variational run spends part "
        "of its budget on the dequantizer, so it takes fewer steps. Test bits/dim with one seeded noise "
        "sample per test image; the variational figure is the bound `(E_q[-log p(y) + log q(u|x)] + D ln K) "
        "/ (D ln 2)` (`pushforward.metrics.bits_per_dim` with nll = -log p(y) + log q), which is a valid "
        f"upper bound on the discrete code length just as the uniform one (log q = 0) is.\n\n{table}"
    )


# -- main ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run on tiny models (no write)")
    p.add_argument("--only", choices=("a", "b", "c"), action="append",
                   help="run only these parts (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    p.add_argument("--write", action="store_true", help="write BENCHMARKS.md even with --quick")
    p.add_argument("--json", help="also write the raw results to this JSON file")
    p.add_argument("--verbose", action="store_true", help="print every timing round")
    args = p.parse_args(argv)
    parts = set(args.only or ("a", "b", "c"))
    plan = plan_for(args.quick)
    set_threads(args.threads)
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    cache: dict = {}
    results: dict = {}
    texts = []
    if "a" in parts:
        results["a"] = part_a(plan, say if args.verbose else None)
        texts.append(f"### (a) Autoregressive vs coupling: throughput at D = {plan.features}\n\n"
                     f"`maf`, `iaf` and coupling `nsf`, {plan.layers} layers, hidden {plan.hidden}, batch "
                     f"{plan.batch}, no gradients; {plan.rounds} interleaved rounds, median (min-max).\n\n"
                     + table_a(results["a"]))
    if "c" in parts:  # before (b), which reuses its uniform digits run
        results["c"] = part_c(plan, cache)
    if "b" in parts:
        results["b"] = part_b(plan, cache)
        texts.append("### (b) NSF vs RealNVP at equal training time\n\n" + table_b(results["b"], plan))
    if "c" in parts:
        texts.append("### (c) Uniform vs variational dequantization\n\n" + table_c(results["c"], plan))
    elapsed = time.monotonic() - t0
    header = (
        "## Beyond RealNVP: autoregressive costs, NSF vs RealNVP, variational dequantization\n\n"
        f"Written by `{command_line(sys.argv if argv is None else ['bench/beyond.py', *argv])}` "
        f"on {time.strftime('%Y-%m-%d')} ({elapsed / 60:.1f} min); library at {library_revision()}.\n"
        f"{machine_line()}; 1-minute load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
        "end (a shared machine: timings in (a) are wall clock, interleaved).\n\n"
        "Equal training time means an equal budget of CPU seconds spent in optimizer steps on one thread "
        "(each candidate's cost per step is measured first, then it trains for that many steps with "
        "`pushforward.train.fit`, validations not counted), so other jobs on the machine do not shorten one "
        "candidate's budget. Figures are mean ± standard error over the test examples."
    )
    text = header + "\n\n" + "\n\n".join(texts)
    say("\n" + text)
    if args.json:

        def plain(o):
            if isinstance(o, dict):
                return {str(k): plain(v) for k, v in o.items()}
            if isinstance(o, (list, tuple)):
                return [plain(v) for v in o]
            if hasattr(o, "values") and hasattr(o, "median"):
                return {"values": o.values, "median": o.median}
            return o

        with open(args.json, "w") as f:
            json.dump(plain(results), f, indent=1)
    if (args.write or not args.quick) and not args.no_write:
        if args.only:
            say("not writing BENCHMARKS.md: --only gives a partial section")
        else:
            say(f"wrote {write_section(SECTION, text)}")
    ok = all(math.isfinite(v) for v in _figures(results))
    return 0 if ok else 1


def _figures(results: dict):
    for part in ("b", "c"):
        stack = [results.get(part, {})]
        while stack:
            o = stack.pop()
            if isinstance(o, dict):
                if "eval" in o and isinstance(o["eval"], dict):
                    yield o["eval"]["nll"]
                stack.extend(v for v in o.values() if isinstance(v, dict))


if __name__ == "__main__":
    sys.exit(main())
