"""A flow must cost little more than its conditioner networks.

Measures, in one process and with all candidates interleaved round by round:

* Task A: one training step (log_prob, mean NLL, backward, Adam) of
  ``realnvp(features=2, layers=8, hidden=(128, 128))`` on a batch of 512 ``torch.randn`` points;
* Task B: the same for ``glow(shape=(1, 28, 28), levels=2, steps=4, hidden_channels=64)`` on a
  batch of 64 ``torch.rand`` images.

Candidates per task:

* ``bare networks``: deep copies of the flow's conditioner networks, each run alone on a tensor of the
  size it sees inside the flow (recorded with forward pre-hooks), loss = sum of the mean of each
  output, backward, Adam. The cost of the networks without any flow bookkeeping.
* ``bare networks, compiled``: the same loss under ``torch.compile(fullgraph=True)`` (reference).
* ``pushforward eager``: the flow as shipped (``validate=True``, the default).
* ``pushforward compiled``: ``torch.compile(flow.log_prob, fullgraph=True)`` inside the same step.
* ``pushforward eager, validate=False`` (diagnostic): the flow's input checks switched off.
* ``bare networks, inputs require grad`` (diagnostic): inside a flow every conditioner input but the
  first depends on parameters, so backward also computes the gradient with respect to each network's
  input; this candidate adds exactly that to the bare networks (cost of the chain rule through the
  flow, as opposed to bookkeeping).

Targets: eager <= 1.10x bare networks; compiled < 1.00x bare (eager) networks. Also measured: log_prob
throughput without grad and sampling throughput, eager and compiled, and the compile times (cold:
by default the inductor cache is a fresh temporary folder). When eager misses its target, or meets it
in only some rounds, the eager steps are profiled with ``torch.profiler`` and the ops the flow calls
more often than the bare networks are listed with their self-CPU time.

Usage::

    python bench/core_overhead.py                # full run, writes BENCHMARKS.md
    python bench/core_overhead.py --quick        # seconds-long smoke run on tiny models (CI); no write
    python bench/core_overhead.py --rounds 9 --threads 1 --no-write

The full run takes about 6 minutes with ``--threads 1`` on a quiet 2-core machine, over half of it
compiling. On a 2-core machine shared with other jobs prefer ``--threads 1``: with 2 intra-op threads
a step stalls whenever another process holds one of the cores (steps 10-60x slower were observed).
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

if __package__ in (None, ""):  # run as a script: make `bench.common` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import nn

from bench.common import (
    Stats,
    calibrate,
    command_line,
    interleaved,
    library_revision,
    machine_line,
    markdown_table,
    seed_everything,
    set_threads,
    timed,
    write_section,
)
from pushforward import models
from pushforward.transforms import Coupling

SECTION = "core_overhead"
EAGER_TARGET = 1.10  # pushforward eager / bare networks (eager)
COMPILED_TARGET = 1.00  # pushforward compiled / bare networks (eager), strictly below

BARE, BARE_C, EAGER, COMPILED, NOVAL, BARE_G = (
    "bare networks",
    "bare networks, compiled",
    "pushforward eager",
    "pushforward compiled",
    "pushforward eager, validate=False (diagnostic)",
    "bare networks, inputs require grad (diagnostic)",
)
ORDER = (BARE, BARE_G, BARE_C, EAGER, NOVAL, COMPILED)


@dataclass
class TaskSpec:
    name: str
    recipe: str
    build: Callable[[], nn.Module]
    batch: int
    data: Callable[[int], torch.Tensor]
    round_s: float  # target seconds per candidate per round


def task_specs(quick: bool) -> list[TaskSpec]:
    if quick:
        return [
            TaskSpec(
                "A: realnvp (quick)",
                "realnvp(features=2, layers=2, hidden=(16, 16))",
                lambda: models.realnvp(features=2, layers=2, hidden=(16, 16)),
                64,
                lambda b: torch.randn(b, 2),
                0.01,
            ),
            TaskSpec(
                "B: glow (quick)",
                "glow(shape=(1, 8, 8), levels=2, steps=1, hidden_channels=8)",
                lambda: models.glow(shape=(1, 8, 8), levels=2, steps=1, hidden_channels=8),
                8,
                lambda b: torch.rand(b, 1, 8, 8),
                0.01,
            ),
        ]
    return [
        TaskSpec(
            "A: realnvp",
            "realnvp(features=2, layers=8, hidden=(128, 128))",
            lambda: models.realnvp(features=2, layers=8, hidden=(128, 128)),
            512,
            lambda b: torch.randn(b, 2),
            0.4,
        ),
        TaskSpec(
            "B: glow",
            "glow(shape=(1, 28, 28), levels=2, steps=4, hidden_channels=64)",
            lambda: models.glow(shape=(1, 28, 28), levels=2, steps=4, hidden_channels=64),
            64,
            lambda b: torch.rand(b, 1, 28, 28),
            0.6,
        ),
    ]


# ------------------------------------------------------------------------------------------------
# Candidates
# ------------------------------------------------------------------------------------------------
class BareNets(nn.Module):
    """The conditioner networks alone: ``loss = sum_i mean(net_i(x_i))``."""

    def __init__(self, nets: list[nn.Module]):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        loss = self.nets[0](inputs[0]).mean()
        for net, x in zip(self.nets[1:], inputs[1:]):
            loss = loss + net(x).mean()
        return loss


def conditioner_inputs(flow: nn.Module, x: torch.Tensor) -> tuple[list[nn.Module], list[torch.Size]]:
    """The conditioner networks of ``flow`` and the input shape each sees in one ``log_prob(x)``.

    This forward also initialises the flow's ActNorm layers (data-dependent init).
    """
    nets = [m.net for m in flow.modules() if isinstance(m, Coupling)]
    shapes: dict[int, torch.Size] = {}

    def hook(i):
        def record(module, args):
            shapes.setdefault(i, args[0].shape)

        return record

    handles = [net.register_forward_pre_hook(hook(i)) for i, net in enumerate(nets)]
    try:
        with torch.no_grad():
            flow.log_prob(x)
    finally:
        for h in handles:
            h.remove()
    if len(shapes) != len(nets):
        raise RuntimeError(f"only {len(shapes)} of {len(nets)} conditioners ran in log_prob")
    return nets, [shapes[i] for i in range(len(nets))]


def adam(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(module.parameters(), lr=1e-4)  # the same settings for every candidate


def flow_step(log_prob: Callable, opt: torch.optim.Optimizer, x: torch.Tensor) -> Callable[[], None]:
    def step():
        opt.zero_grad(set_to_none=True)
        loss = -log_prob(x).mean()
        loss.backward()
        opt.step()

    return step


def bare_step(
    loss_fn: Callable, opt: torch.optim.Optimizer, inputs: list[torch.Tensor]
) -> Callable[[], None]:
    def step():
        opt.zero_grad(set_to_none=True)
        for x in inputs:
            x.grad = None
        loss = loss_fn(inputs)
        loss.backward()
        opt.step()

    return step


def compile_fn(fn: Callable, backend: str) -> Callable:
    # dynamic=False: this process compiles Flow.log_prob for several models and batch sizes; without it
    # dynamo's automatic-dynamic recompilation would turn later graphs into dynamic-shape ones.
    return torch.compile(fn, fullgraph=True, backend=backend, dynamic=False)


@dataclass
class TaskResult:
    spec: TaskSpec
    steps: int
    stats: dict[str, Stats]
    compile_s: dict[str, float]
    shapes: list[torch.Size]
    n_params: dict[str, tuple[int, int]]  # candidate -> (tensors, elements)
    eager_fns: dict[str, Callable[[], None]] = field(default_factory=dict)


def run_training(spec: TaskSpec, args, log) -> TaskResult:
    seed_everything(args.seed)
    flow = spec.build()
    x = spec.data(spec.batch)
    nets, shapes = conditioner_inputs(flow, x)  # also initialises ActNorm
    log(f"\n== Task {spec.name}: {spec.recipe}, batch {spec.batch}")
    log(
        f"   {len(nets)} conditioners; input shapes: " + ", ".join(str(tuple(s)) for s in sorted(set(shapes)))
    )
    inputs = [torch.randn(s) for s in shapes]

    inputs_g = [x.clone().requires_grad_(True) for x in inputs]
    bare = BareNets([copy.deepcopy(n) for n in nets])
    bare_c, bare_g = copy.deepcopy(bare), copy.deepcopy(bare)
    eager, comp, noval = copy.deepcopy(flow), copy.deepcopy(flow), copy.deepcopy(flow)
    noval.validate = False

    opts = {
        name: adam(m)
        for name, m in [
            (BARE, bare),
            (BARE_C, bare_c),
            (EAGER, eager),
            (COMPILED, comp),
            (NOVAL, noval),
            (BARE_G, bare_g),
        ]
    }
    n_params = {
        name: (len(o.param_groups[0]["params"]), sum(p.numel() for p in o.param_groups[0]["params"]))
        for name, o in opts.items()
    }
    fns = {
        BARE: bare_step(bare, opts[BARE], inputs),
        BARE_C: bare_step(compile_fn(bare_c, args.backend), opts[BARE_C], inputs),
        EAGER: flow_step(eager.log_prob, opts[EAGER], x),
        COMPILED: flow_step(compile_fn(comp.log_prob, args.backend), opts[COMPILED], x),
        NOVAL: flow_step(noval.log_prob, opts[NOVAL], x),
        BARE_G: bare_step(bare_g, opts[BARE_G], inputs_g),
    }
    log(
        "   parameters optimised: "
        + ", ".join(f"{name} {n_params[name][0]} tensors / {n_params[name][1]:,}" for name in (BARE, EAGER))
    )
    if args.no_diagnostic:
        del fns[NOVAL], fns[BARE_G]
    fns = {name: fns[name] for name in ORDER if name in fns}

    compile_s = {}
    for name in (BARE_C, COMPILED):
        _, compile_s[name] = timed(fns[name])  # first call: trace, compile forward and backward, run
        log(f"   compile {name}: {compile_s[name]:.1f} s (first training step, forward + backward)")

    for fn in fns.values():  # warm up before calibrating
        fn()
    steps = args.steps or calibrate(fns[BARE], spec.round_s)
    log(f"   {args.rounds} rounds x {steps} steps per candidate (after {args.warmup} warm-up steps)")
    cpu: dict[str, Stats] = {}
    stats = interleaved(
        fns, rounds=args.rounds, steps=steps, warmup=args.warmup, log=log if args.verbose else None, cpu=cpu
    )
    if args.clock == "cpu":
        stats = cpu
    return TaskResult(
        spec, steps, stats, compile_s, shapes, n_params, eager_fns={BARE: fns[BARE], EAGER: fns[EAGER]}
    )


@dataclass
class ThroughputResult:
    spec: TaskSpec
    steps: dict[str, int]
    stats: dict[str, Stats]
    compile_s: dict[str, float]


def run_throughput(spec: TaskSpec, args, log) -> ThroughputResult:
    seed_everything(args.seed)
    flow = spec.build()
    x = spec.data(spec.batch)
    with torch.no_grad():
        flow.log_prob(x)  # ActNorm init
    eager, comp = copy.deepcopy(flow), copy.deepcopy(flow)
    lp_c = compile_fn(comp.log_prob, args.backend)
    sample_c = compile_fn(comp.sample, args.backend)
    n = spec.batch

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()

        return run

    fns = {
        "log_prob eager": no_grad(lambda: eager.log_prob(x)),
        "log_prob compiled": no_grad(lambda: lp_c(x)),
        "sample eager": no_grad(lambda: eager.sample(n)),
        "sample compiled": no_grad(lambda: sample_c(n)),
    }
    log(f"\n== Throughput {spec.name}: batch {n}, no grad")
    compile_s = {}
    for name in ("log_prob compiled", "sample compiled"):
        _, compile_s[name] = timed(fns[name])
        log(f"   compile {name}: {compile_s[name]:.1f} s")
    for fn in fns.values():
        fn()
    steps = {name: args.steps or calibrate(fn, spec.round_s / 4) for name, fn in fns.items()}
    cpu: dict[str, Stats] = {}
    stats = interleaved(
        fns, rounds=args.rounds, steps=steps, warmup=args.warmup, log=log if args.verbose else None, cpu=cpu
    )
    if args.clock == "cpu":
        stats = cpu
    return ThroughputResult(spec, steps, stats, compile_s)


# ------------------------------------------------------------------------------------------------
# Profile
# ------------------------------------------------------------------------------------------------
@dataclass
class Profile:
    steps: int
    table: str
    per_op: dict[str, tuple[float, float]]  # op -> (self CPU us per step, calls per step)
    total_us: float


def profile_step(fn: Callable[[], None], steps: int, rows: int) -> Profile:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=rows)
    per_op = {e.key: (e.self_cpu_time_total / steps, e.count / steps) for e in averages}
    return Profile(steps, table, per_op, sum(v[0] for v in per_op.values()))


def profile_diff(
    flow: Profile, bare: Profile, rows: int
) -> tuple[list[tuple[str, float, float, float, float]], float]:
    """Where the flow's extra self-CPU time goes.

    Returns ``(rows, same)``: ``rows`` are ``(op, flow us/step, bare us/step, flow calls/step, bare
    calls/step)`` for the ops the flow calls more often than the bare networks (largest excess first);
    ``same`` is the summed difference over ops called equally often in both (the same work: noise and
    cache effects, not overhead).
    """
    out, same = [], 0.0
    for k in set(flow.per_op) | set(bare.per_op):
        fu, fc = flow.per_op.get(k, (0.0, 0.0))
        bu, bc = bare.per_op.get(k, (0.0, 0.0))
        if fc > bc:
            out.append((k, fu, bu, fc, bc))
        else:
            same += fu - bu
    out.sort(key=lambda r: r[1] - r[2], reverse=True)
    return out[:rows], same


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def ratio_range(num: Stats, den: Stats) -> tuple[float, float, float]:
    """Ratio of medians, and the min-max of the per-round ratios (rounds are interleaved)."""
    per_round = [a / b for a, b in zip(num.values, den.values)]
    return num.median / den.median, min(per_round), max(per_round)


def training_tables(results: list[TaskResult]) -> tuple[str, str, list[bool], list[bool]]:
    """The step table, the targets table, each target's verdict and whether it held in every round."""
    rows, targets, oks, robust = [], [], [], []
    for r in results:
        s = r.stats
        for name in ORDER:
            if name not in s:
                continue
            q, lo, hi = ratio_range(s[name], s[BARE])
            rows.append([r.spec.name, name, s[name].ms(), f"{q:.2f}x ({lo:.2f}-{hi:.2f})"])
        for name, label, _bound, holds in (
            (
                EAGER,
                f"eager / bare networks <= {EAGER_TARGET:.2f}x",
                EAGER_TARGET,
                lambda v: v <= EAGER_TARGET,
            ),
            (
                COMPILED,
                f"compiled / bare networks (eager) < {COMPILED_TARGET:.2f}x",
                COMPILED_TARGET,
                lambda v: v < COMPILED_TARGET,
            ),
        ):
            q, lo, hi = ratio_range(s[name], s[BARE])
            per_round = [a / b for a, b in zip(s[name].values, s[BARE].values)]
            k, n = sum(holds(v) for v in per_round), len(per_round)
            ok = holds(q)
            oks.append(ok)
            robust.append(k in (0, n))
            targets.append([r.spec.name, label, f"{q:.2f}x ({lo:.2f}-{hi:.2f})", f"{k}/{n}", verdict(ok)])
    t1 = markdown_table(
        ["task", "candidate", "ms/step median (min-max)", "vs bare networks (per-round range)"], rows
    )
    t2 = markdown_table(
        ["task", "target", "measured (per-round range)", "rounds meeting it", "result (on the medians)"],
        targets,
    )
    return t1, t2, oks, robust


def throughput_table(results: list[ThroughputResult]) -> str:
    rows = []
    for r in results:
        n = r.spec.batch
        for name, st in r.stats.items():
            rows.append([r.spec.name, name, n, st.ms(3), st.rate(n)])
    return markdown_table(
        ["model", "what", "batch", "ms/call median (min-max)", "samples/s median (range)"], rows
    )


def compile_table(train: list[TaskResult], thr: list[ThroughputResult]) -> str:
    rows = []
    for r in train:
        for name, s in r.compile_s.items():
            rows.append([r.spec.name, f"{name}: training step (forward + backward)", f"{s:.1f}"])
    for r in thr:
        for name, s in r.compile_s.items():
            rows.append([r.spec.name, f"{name} (no grad)", f"{s:.1f}"])
    return markdown_table(["model", "compiled function", "seconds (first call)"], rows)


def diff_table(diff) -> str:
    rows = [
        [f"`{op}`", f"{fu:.0f}", f"{bu:.0f}", f"{fu - bu:+.0f}", f"{fc:g} / {bc:g}"]
        for op, fu, bu, fc, bc in diff
    ]
    return markdown_table(
        ["op", "flow us/step", "bare us/step", "excess us/step", "calls/step flow / bare"], rows
    )


def report(args, command, revision, load0, load1, elapsed, train, tables, profiles) -> str:
    """The markdown section for BENCHMARKS.md."""
    t1, t2, t3, t4 = tables
    steps = ", ".join(f"{r.spec.name}: {r.steps}" for r in train)
    warm = f"{args.warmup} warm-up step{'s' if args.warmup != 1 else ''}"
    parts = [
        "## Core overhead: a flow must cost little more than its conditioner networks",
        "",
        "Written by `bench/core_overhead.py`; do not edit by hand. Command:",
        "",
        f"    {command}",
        "",
        (
            f"Library: git {revision}. Machine: {machine_line()}. Load average (1 min) {load0:.2f} at start, "
            f"{load1:.2f} at end (a shared machine: other jobs ran meanwhile). Compile backend: "
            f"{args.backend}, inductor cache: {args.cache}. Total run time {elapsed:.0f} s."
        ),
        "",
        (
            f"Candidates interleaved round-robin: {args.rounds} rounds, each running every candidate for the "
            f"same number of steps ({steps}) after {warm}; median over rounds with min-max. Clock: "
            + ("**process CPU time** (`time.process_time`; on one thread it excludes the time the process "
               "waited for a core held by other jobs, so the ratios are steadier on a shared machine). "
               if args.clock == "cpu" else "wall time (`time.perf_counter`). ")
            + "Ratios: ratio of the medians, with the range of the per-round ratios in brackets. *bare "
              "networks* = deep copies of the flow's conditioner networks run alone on inputs of the sizes "
              "they see inside the flow, loss = sum of the output means, backward, the same Adam (lr=1e-4). "
              "The flows train on `-log_prob(x).mean()`; *compiled* = `torch.compile(flow.log_prob, "
              "fullgraph=True, dynamic=False)` (the optimizer step is eager in every candidate). "
              "Diagnostics: *validate=False* switches off the flow's input checks; *inputs require grad* "
              "adds to the bare networks the gradient with respect to their inputs, which a flow must "
              "compute (each conditioner input but the first depends on parameters)."
        ),
        "",
        "### Training step",
        "",
        t1,
        "",
        "Parameters optimised (tensors / elements): "
        + "; ".join(
            f"{r.spec.name}: bare networks {r.n_params[BARE][0]} / {r.n_params[BARE][1]:,}, "
            f"flow {r.n_params[EAGER][0]} / {r.n_params[EAGER][1]:,}"
            for r in train
        )
        + ".",
        "",
        "### Targets",
        "",
        t2,
        "",
        (
            "Each verdict is on the ratio of the medians; *rounds meeting it* counts the interleaved rounds "
            "whose own ratio meets the target. Anything but all or none of the rounds means the verdict lies "
            "within the noise of this machine."
        ),
        "",
        "### Throughput without grad (batch as in training)",
        "",
        t3,
        "",
        "### Compile times (first call: tracing, code generation and that call)",
        "",
        t4,
    ]
    for r, pf, pb, diff, same in profiles:
        parts += [
            "",
            f"### Where the eager overhead goes: {r.spec.name}",
            "",
            (
                f"torch.profiler over {pf.steps} eager steps of each; self CPU per step (the profiler "
                f"inflates small ops). Total: flow {pf.total_us:.0f} us, bare networks {pb.total_us:.0f} us; "
                f"ops called equally often in both differ by {same:+.0f} us in total (the same work: noise "
                "and cache effects). Ops the flow calls more often, largest excess first:"
            ),
            "",
            diff_table(diff[:10]),
        ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="seconds-long smoke run on tiny models; does not write"
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7; quick: 2)")
    p.add_argument(
        "--steps", type=int, default=None, help="calls per candidate per round (default: calibrated)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="warm-up calls per candidate (default 2; quick: 1)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time by wall clock (default) or by process CPU time (steadier on a busy machine; "
                        "meaningful for --threads 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--backend",
        default=None,
        help="torch.compile backend (default inductor; quick: aot_eager, which traces forward and "
        "backward but skips code generation)",
    )
    p.add_argument(
        "--cache",
        choices=("fresh", "shared"),
        default="fresh",
        help="inductor cache: 'fresh' (default) compiles into an empty temporary cache, so compile "
        "times are cold-start times; 'shared' uses the user's cache (warm on reruns)",
    )
    p.add_argument("--profile-steps", type=int, default=None, help="steps per profile (default 5; quick: 1)")
    p.add_argument("--no-diagnostic", action="store_true", help="skip the diagnostic candidates")
    p.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    p.add_argument("--write", action="store_true", help="write BENCHMARKS.md even with --quick")
    p.add_argument("--verbose", action="store_true", help="print every round")
    args = p.parse_args(argv)
    args.argv = argv
    args.rounds = args.rounds or (2 if args.quick else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.backend = args.backend or ("aot_eager" if args.quick else "inductor")
    args.profile_steps = args.profile_steps or (1 if args.quick else 5)
    if args.quick and args.steps is None:
        args.steps = 2
    write = (args.write or not args.quick) and not args.no_write

    def log(msg: str) -> None:
        print(msg, flush=True)

    threads = set_threads(args.threads)
    fresh_cache = None
    if args.cache == "fresh":
        fresh_cache = tempfile.mkdtemp(prefix="pushforward_bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh_cache
    try:
        return _run(args, threads, write, log)
    finally:
        if fresh_cache is not None:
            shutil.rmtree(fresh_cache, ignore_errors=True)


def _run(args, threads: int, write: bool, log) -> int:
    start, load0 = time.perf_counter(), os.getloadavg()
    command = command_line([sys.argv[0], *(sys.argv[1:] if args.argv is None else args.argv)])
    log(f"$ {command}")
    log(machine_line())
    revision = library_revision()
    log(f"library: git {revision}")
    log(
        f"load average at start: {load0[0]:.2f} (1 min), threads {threads}, compile backend {args.backend}, "
        f"inductor cache {args.cache}"
    )
    if load0[0] > (os.cpu_count() or 1):
        log(
            f"WARNING: load average {load0[0]:.2f} exceeds the {os.cpu_count()} cores: other jobs compete "
            "for the CPU, figures will be noisy (ratios are fairer than absolute times: candidates are "
            "interleaved)"
            + (
                "; with several threads per process, intra-op thread pools stall badly (try --threads 1)"
                if threads > 1
                else ""
            )
        )

    specs = task_specs(args.quick)
    train = [run_training(spec, args, log) for spec in specs]
    thr = [run_throughput(spec, args, log) for spec in specs]

    t1, t2, oks, robust = training_tables(train)
    t3, t4 = throughput_table(thr), compile_table(train, thr)
    log("\nTraining step (log_prob, mean NLL, backward, Adam lr=1e-4):\n" + t1)
    log("\nTargets:\n" + t2)
    log("\nThroughput (no grad):\n" + t3)
    log("\nCompile times:\n" + t4)

    profiles = []
    for r, ok, sure in zip(train, oks[0::2], robust[0::2]):
        if (
            ok and sure and not args.quick
        ):  # profile when eager misses, or meets the target only in some rounds
            continue
        k = max(1, args.profile_steps if "realnvp" in r.spec.name else (args.profile_steps + 1) // 2)
        pf = profile_step(r.eager_fns[EAGER], k, rows=15)
        pb = profile_step(r.eager_fns[BARE], k, rows=15)
        diff, same = profile_diff(pf, pb, rows=12)
        log(f"\n== Profile {r.spec.name}, pushforward eager step ({k} steps; top ops by self CPU):\n"
            f"{pf.table}")
        log(f"== Profile {r.spec.name}, bare networks step:\n{pb.table}")
        log(f"== Where the excess goes ({r.spec.name}; per step, profiler on, so small ops look costlier):")
        log(
            f"   total self CPU: flow {pf.total_us:.0f} us, bare {pb.total_us:.0f} us "
            f"(excess {pf.total_us - pb.total_us:+.0f} us)"
        )
        log("   ops the flow calls more often than the bare networks:")
        log(diff_table(diff))
        log(f"   ops called equally often differ by {same:+.0f} us/step in total (noise, cache effects)")
        profiles.append((r, pf, pb, diff, same))

    elapsed, load1 = time.perf_counter() - start, os.getloadavg()
    log(f"\ntotal time {elapsed:.0f} s; load average at end: {load1[0]:.2f}")

    if write:
        text = report(args, command, revision, load0[0], load1[0], elapsed, train, (t1, t2, t3, t4), profiles)
        path = write_section(SECTION, text)
        log(f"wrote section {SECTION!r} of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
