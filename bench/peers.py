"""pushforward side by side with nflows, zuko, normflows and FrEIA: the same models, timed together.

Speed half (always): for each task (see :mod:`bench.peer_models`: T2, T64, TIMG, SPLINE) every library
builds the same model; in one process, with the candidates interleaved round-robin over several
rounds (:func:`bench.common.interleaved`), it times

* a training step: ``log_prob``, mean NLL, backward, Adam (lr 1e-4, every candidate alike);
* ``log_prob`` without grad and ``sample`` (batch as in training);
* the peak memory of one training step: the most bytes held through torch's CPU allocator during the
  step above what was held when it started (``torch.profiler`` with ``profile_memory=True``; the
  parameters, Adam state and data held before the step are not counted, gradients and activations are).

Candidates: *limit* (the conditioner networks alone, plain ``nn.Sequential`` modules of the task's sizes
run on inputs of the shapes they see inside the flow - images in channels-last layout, the fastest for
oneDNN convolutions -, no flow bookkeeping), *limit + input grads*
(diagnostic: inside a flow backward must also reach every conditioner's input), *pushforward eager*,
*pushforward compiled* (``torch.compile(flow.log_prob, fullgraph=True, dynamic=False)``; sampling:
``torch.compile(flow.sample, ...)``), and each installed peer, eager, as shipped. Libraries that are
not installed, or cannot build a model, are listed as such.

Quality half (``--quality``): see :mod:`bench.peer_quality`.

Usage::

    python bench/peers.py                       # speed half, 1 and 2 threads (~20 min on 2 busy cores)
    python bench/peers.py --quick               # seconds-long smoke run on tiny models (CI); no write
    python bench/peers.py --quality-only --jobs 2            # quality half, one seed (~25 min)
    python bench/peers.py --quality-only --jobs 2 --quality-seeds 3   # three seeds, verdicts on the means
    python bench/peers.py --quick --quality --budget-scale 0.02 --no-write
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

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
from bench.peer_models import (
    LIBRARIES,
    PEERS,
    Missing,
    TaskSpec,
    Unsupported,
    available,
    build,
    limit_networks,
    task_specs,
    version,
)

LIMIT, LIMIT_G, EAGER, COMPILED = "limit", "limit + input grads", "pushforward eager", "pushforward compiled"
# SPLINE task only: the T64 model, interleaved with the spline one
AFFINE = "pushforward eager, affine kernel"
KINDS = ("train", "log_prob", "sample")
TARGETS = {  # see the issue
    "eager_vs_limit": 1.05,
    "compiled_speedup": {"T2": 1.5, "TIMG": 1.5, "T64": 1.15},
    "throughput_compiled": 1.5,
    "throughput_eager": 1.0,
    "spline_vs_affine": 2.0,
}


# ------------------------------------------------------------------------------------------------
# Candidates
# ------------------------------------------------------------------------------------------------
@dataclass
class TaskRun:
    spec: TaskSpec
    params: dict[str, int] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # library -> reason
    compile_s: dict[str, float] = field(default_factory=dict)
    # threads -> kind -> candidate -> Stats, on the wall clock and on the process CPU clock
    stats: dict[int, dict[str, dict[str, Stats]]] = field(default_factory=dict)
    cpu: dict[int, dict[str, dict[str, Stats]]] = field(default_factory=dict)
    peak_mb: dict[str, float] = field(default_factory=dict)  # forward + backward of a training step
    peak_sample_mb: dict[str, float] = field(default_factory=dict)  # sampling a batch (no grad)
    fns: dict[str, dict[str, Callable]] = field(default_factory=dict)  # kind -> candidate -> fn


def _adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for p in params if p.requires_grad], lr=1e-4)


def _train_step(log_prob, opt, x) -> tuple[Callable[[], None], Callable[[], None]]:
    """A training step, and the same without the optimizer step (for the memory pass)."""

    def forward_backward():
        opt.zero_grad(set_to_none=True)
        loss = -log_prob(x).mean()
        loss.backward()

    def step():
        forward_backward()
        opt.step()

    return step, forward_backward


def _no_grad(fn) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn()

    return run


def _limit_fns(spec: TaskSpec) -> tuple[dict[str, Callable], int]:
    nets, shapes = limit_networks(spec)
    g = torch.Generator().manual_seed(1)
    # images in channels-last layout: oneDNN's convolutions are fastest on it (pushforward's ConvNet uses it),
    # so the limit stays a lower bound on the cost of the networks
    inputs = [torch.randn(s, generator=g) for s in shapes]
    inputs = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in inputs]
    inputs_g = [x.clone().requires_grad_(True) for x in inputs]
    nets_g = copy.deepcopy(nets)
    opt, opt_g = _adam(nets.parameters()), _adam(nets_g.parameters())

    def loss(ns, xs):
        out = ns[0](xs[0]).mean()
        for n, x in zip(ns[1:], xs[1:]):
            out = out + n(x).mean()
        return out

    def forward_backward():
        opt.zero_grad(set_to_none=True)
        loss(nets, inputs).backward()

    def step():
        forward_backward()
        opt.step()

    def step_g():
        opt_g.zero_grad(set_to_none=True)
        for x in inputs_g:
            x.grad = None
        loss(nets_g, inputs_g).backward()
        opt_g.step()

    def forward():
        with torch.no_grad():
            for n, x in zip(nets, inputs):
                n(x)

    fns = {"train": step, "train_g": step_g, "forward": forward, "memory": forward_backward}
    return fns, sum(p.numel() for p in nets.parameters())


def prepare(spec: TaskSpec, args, log) -> TaskRun:
    run = TaskRun(spec)
    x = spec.data(spec.batch)
    n = spec.batch
    fns: dict[str, dict[str, Callable]] = {k: {} for k in (*KINDS, "memory")}
    lim, run.params[LIMIT] = _limit_fns(spec)
    fns["memory"][LIMIT] = lim["memory"]
    fns["train"][LIMIT] = lim["train"]
    fns["log_prob"][LIMIT] = fns["sample"][LIMIT] = lim["forward"]
    if not args.no_diagnostic:
        fns["train"][LIMIT_G] = lim["train_g"]
    for lib in args.libraries:
        try:
            b = build(lib, spec, seed=args.seed)
        except Missing:
            run.skipped[lib] = "not installed"
            continue
        except Unsupported as exc:
            run.skipped[lib] = str(exc)
            continue
        with torch.no_grad():
            b.log_prob(x)  # data-dependent initialisation (ActNorm) before any copy
        name = EAGER if lib == "pushforward" else lib
        run.params[name], run.notes[name] = b.n_params, b.notes
        fns["train"][name], fns["memory"][name] = _train_step(b.log_prob, _adam(b.module.parameters()), x)
        fns["log_prob"][name] = _no_grad(lambda b=b: b.log_prob(x))
        fns["sample"][name] = _no_grad(lambda b=b: b.sample(n))
        if lib == "pushforward" and not args.no_compile:
            comp = copy.deepcopy(b.flow)
            lp = torch.compile(comp.log_prob, fullgraph=True, dynamic=False, backend=args.backend)
            sm = torch.compile(comp.sample, fullgraph=True, dynamic=False, backend=args.backend)
            fns["train"][COMPILED], fns["memory"][COMPILED] = _train_step(lp, _adam(comp.parameters()), x)
            fns["log_prob"][COMPILED] = _no_grad(lambda lp=lp: lp(x))
            fns["sample"][COMPILED] = _no_grad(lambda sm=sm: sm(n))
            run.params[COMPILED], run.notes[COMPILED] = run.params[EAGER], b.notes
            for kind in KINDS:
                _, run.compile_s[kind] = timed(fns[kind][COMPILED])
                log(f"   compiled {kind}: first call {run.compile_s[kind]:.1f} s")
    if spec.kernel == "spline" and "pushforward" in args.libraries:
        import dataclasses

        affine = build("pushforward", dataclasses.replace(spec, kernel="affine"), seed=args.seed)
        fns["train"][AFFINE], _ = _train_step(affine.log_prob, _adam(affine.module.parameters()), x)
    order = [LIMIT, LIMIT_G, EAGER, COMPILED, AFFINE, *PEERS]
    run.fns = {k: {c: v[c] for c in order if c in v} for k, v in fns.items()}
    return run


def measure(run: TaskRun, threads: int, args, log) -> None:
    out, cpu = {}, {}
    for kind in KINDS:
        fns = run.fns[kind]
        for fn in fns.values():
            fn()
        target = run.spec.round_s * (1.0 if kind == "train" else 0.5)
        steps = {c: args.steps or calibrate(fn, target, minimum=1) for c, fn in fns.items()}
        cpu[kind] = {}
        out[kind] = interleaved(fns, rounds=args.rounds, steps=steps, warmup=args.warmup,
                                log=log if args.verbose else None, cpu=cpu[kind])
        log(f"   {kind:8s} " + ", ".join(f"{c} {s.median * 1e3:.2f} ms" for c, s in out[kind].items()))
    run.stats[threads], run.cpu[threads] = out, cpu


def contention(runs: dict[str, TaskRun]) -> str:
    """Median over all candidates and rounds of wall time / (process CPU time / threads), per thread count."""
    import statistics

    parts = []
    for threads in sorted({t for r in runs.values() for t in r.stats}):
        q = [w / max(c / threads, 1e-12) for r in runs.values() if threads in r.stats
             for kind in KINDS for cand, st in r.stats[threads][kind].items()
             for w, c in zip(st.values, r.cpu[threads][kind][cand].values)]
        if q:
            parts.append(f"{threads} thread(s): {statistics.median(q):.2f}")
    return ", ".join(parts)


def peak_memory(fn: Callable[[], None]) -> float:
    """Peak MiB allocated through torch's CPU allocator during one call and live at the same time.

    ``torch.profiler(profile_memory=True)`` reports, with every allocation and free, a running total
    that the allocator keeps across profiling sessions (blocks allocated while profiling and freed after
    it stay counted), so the total at the session's start is subtracted. Frees of blocks allocated
    before the session are not reported: the figure counts what the call allocates (activations,
    gradients, temporaries) and frees again, not what it releases of earlier allocations.
    """
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0.0
    events.sort(key=lambda e: e["ts"])
    start = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return max(0, *(e["args"]["Total Allocated"] - start for e in events)) / 2**20


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _ratio(num: Stats, den: Stats) -> tuple[float, float, float]:
    per = [a / b for a, b in zip(num.values, den.values)]
    return num.median / den.median, min(per), max(per)


def _fastest_peer(stats: dict[str, Stats]) -> str | None:
    peers = [c for c in stats if c in PEERS]
    return min(peers, key=lambda c: stats[c].median) if peers else None


def _fmt_ratio(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.2f}x ({r[1]:.2f}-{r[2]:.2f})"


def results_table(run: TaskRun) -> str:
    rows = []
    n = run.spec.batch
    for threads, kinds in run.stats.items():
        for cand in kinds["train"]:
            row = [str(threads), cand]
            for kind in KINDS:
                st = kinds[kind].get(cand)
                if st is None:
                    row += ["", ""]
                    continue
                fp = _fastest_peer(kinds[kind])
                if fp and cand != fp:
                    vs_peer = _fmt_ratio(_ratio(kinds[kind][fp], st))
                else:
                    vs_peer = "fastest peer" if fp else "-"
                vs_lim = _fmt_ratio(_ratio(st, kinds[kind][LIMIT]))
                main = st.ms() if kind == "train" else st.rate(n)
                row += [main, f"{vs_peer}; {vs_lim}"]
            rows.append(row)
    return markdown_table(
        ["threads", "candidate", "train step ms", "speed-up vs fastest peer; cost vs limit",
         "log_prob samples/s", "speed-up; cost", "sample samples/s", "speed-up; cost"], rows)


def models_table(runs: list[TaskRun]) -> str:
    rows = []
    for run in runs:
        ref = run.params.get(EAGER)
        for cand, p in run.params.items():
            if cand in (COMPILED, LIMIT_G):
                continue
            d = f"{100 * (p - ref) / ref:+.1f}%" if ref else ""
            rows.append([run.spec.name, cand, f"{p:,}", d, "; ".join(run.notes.get(cand, []))])
        for lib, why in run.skipped.items():
            rows.append([run.spec.name, lib, "-", "-", f"**not measured**: {why}"])
    return markdown_table(["task", "candidate", "trainable parameters", "vs pushforward", "differences"],
                          rows)


def memory_table(runs: list[TaskRun]) -> str:
    rows = []
    for run in runs:
        cols = []
        for table in (run.peak_mb, run.peak_sample_mb):
            peers = [v for c, v in table.items() if c in PEERS]
            cols.append((table, min(peers) if peers else None, table.get(LIMIT)))
        for cand in run.peak_mb:
            row = [run.spec.name, cand]
            for table, low, lim in cols:
                mb = table.get(cand)
                if mb is None:
                    row += ["", ""]
                    continue
                vs_low, vs_lim = (f"{mb / low:.2f}x" if low else "-"), (f"{mb / lim:.2f}x" if lim else "-")
                row += [f"{mb:.2f}", f"{vs_low}; {vs_lim}"]
            rows.append(row)
    return markdown_table(["task", "candidate", "forward + backward: peak MiB", "vs lowest peer; vs limit",
                           "sampling: peak MiB", "vs lowest peer; vs limit"], rows)


def evaluate_targets(runs: dict[str, TaskRun]) -> list[list[str]]:
    rows = []

    def add(task, threads, what, value, ok):
        rows.append([task, str(threads), what, value, "PASS" if ok else "MISS"])

    for name, run in runs.items():
        for threads, kinds in run.stats.items():
            tr = kinds["train"]
            if name in ("T2", "T64", "TIMG") and EAGER in tr:
                r = _ratio(tr[EAGER], tr[LIMIT])
                add(name, threads, f"eager step <= {TARGETS['eager_vs_limit']}x limit", _fmt_ratio(r),
                    r[0] <= TARGETS["eager_vs_limit"])
            fp = _fastest_peer(tr)
            if name in TARGETS["compiled_speedup"] and COMPILED in tr and fp:
                t = TARGETS["compiled_speedup"][name]
                r = _ratio(tr[fp], tr[COMPILED])
                add(name, threads, f"compiled step >= {t}x faster than fastest peer ({fp})", _fmt_ratio(r),
                    r[0] >= t)
            for kind in ("log_prob", "sample"):
                st = kinds[kind]
                fp = _fastest_peer(st)
                if not fp:
                    continue
                if COMPILED in st:
                    r = _ratio(st[fp], st[COMPILED])
                    t = TARGETS["throughput_compiled"]
                    add(name, threads, f"{kind} compiled >= {t}x fastest peer ({fp})", _fmt_ratio(r),
                        r[0] >= t)
                if EAGER in st:
                    r = _ratio(st[fp], st[EAGER])
                    add(name, threads, f"{kind} eager >= fastest peer ({fp})", _fmt_ratio(r), r[0] >= 1.0)
        for what, table in (("training forward + backward", run.peak_mb), ("sampling", run.peak_sample_mb)):
            peers = {c: v for c, v in table.items() if c in PEERS}
            if not peers:
                continue
            low = min(peers, key=peers.get)
            for cand in (EAGER, COMPILED):
                if cand in table:
                    add(name, 1, f"{cand}: peak memory of {what} <= lowest peer ({low})",
                        f"{table[cand]:.2f} vs {peers[low]:.2f} MiB", table[cand] <= peers[low])
    if "SPLINE" in runs:
        t = TARGETS["spline_vs_affine"]
        for threads, kinds in runs["SPLINE"].stats.items():
            tr = kinds["train"]
            if EAGER in tr and AFFINE in tr:  # interleaved in the same rounds
                r = _ratio(tr[EAGER], tr[AFFINE])
                add("SPLINE", threads, f"eager: spline step <= {t}x affine step (same sizes, interleaved)",
                    _fmt_ratio(r), r[0] <= t)
            a = runs.get("T64")
            if a and threads in a.stats and COMPILED in tr and COMPILED in a.stats[threads]["train"]:
                q = tr[COMPILED].median / a.stats[threads]["train"][COMPILED].median  # not interleaved
                add("SPLINE", threads,
                    f"compiled: spline step <= {t}x affine (T64) step (medians of separate runs)",
                    f"{q:.2f}x", q <= t)
    return rows


def _op_times(fn: Callable[[], None], steps: int) -> tuple[dict[str, tuple[float, float]], str]:
    """Self CPU microseconds and calls per step of each op over ``steps`` profiled calls; the top table."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    avg = prof.key_averages()
    return ({e.key: (e.self_cpu_time_total / steps, e.count / steps) for e in avg},
            avg.table(sort_by="self_cpu_time_total", row_limit=15))


def _profile(run: TaskRun, steps: int, log) -> tuple[str, str, str]:
    pf, table = _op_times(run.fns["train"][EAGER], steps)
    pb, _ = _op_times(run.fns["train"][LIMIT], steps)
    log(f"\n== Profile {run.spec.name}: pushforward eager training step (top ops by self CPU)\n{table}")
    tf, tb = sum(v[0] for v in pf.values()), sum(v[0] for v in pb.values())
    rows = []
    for op in set(pf) | set(pb):
        fu, fc = pf.get(op, (0.0, 0.0))
        bu, bc = pb.get(op, (0.0, 0.0))
        rows.append((fu - bu, op, fu, bu, fc, bc))
    rows.sort(reverse=True)
    top = sorted(pf.items(), key=lambda kv: -kv[1][0])[:10]
    head = (f"torch.profiler, {steps} eager training steps, 1 thread; self CPU per step (the profiler "
            f"inflates small ops): pushforward {tf:.0f} us, limit {tb:.0f} us.")
    top_table = markdown_table(["op (pushforward, top self CPU)", "us/step", "calls/step"],
                               [[f"`{op}`", f"{u:.0f}", f"{c:g}"] for op, (u, c) in top])
    diff_table = markdown_table(
        ["op", "pushforward us/step", "limit us/step", "excess us/step", "calls/step pf / limit"],
        [[f"`{op}`", f"{fu:.0f}", f"{bu:.0f}", f"{d:+.0f}", f"{fc:g} / {bc:g}"]
         for d, op, fu, bu, fc, bc in rows[:10]])
    log(diff_table)
    return head, top_table, diff_table


def speed_report(args, command, revision, load, elapsed, runs: dict[str, TaskRun], targets, profiles) -> str:
    parts = [
        "## Peers: speed (pushforward vs nflows, zuko, normflows, FrEIA)",
        "",
        "Written by `bench/peers.py`; do not edit by hand. Command:",
        "",
        f"    {command}",
        "",
        f"Library: git {revision}. Machine: {machine_line()}. Load average (1 min) {load[0]:.2f} at start, "
        f"{load[1]:.2f} at end (shared machine). Total run time {elapsed:.0f} s. Versions: "
        + ", ".join(f"{lib} {version(lib)}" for lib in LIBRARIES) + f". Compile backend {args.backend}"
        + (", inductor `cpp.dynamic_threads=True` (one compiled program serves every thread count)"
           if args.dynamic_threads else "") + ".",
        "",
        (f"Candidates interleaved round-robin, {args.rounds} rounds after {args.warmup} warm-up calls; each "
         "round runs each candidate for about the same time (calls calibrated per candidate); medians with "
         "the min-max over rounds. *Speed-up vs fastest peer* = the fastest peer's median time / this "
         "candidate's (above 1: faster than every peer), with the range of the per-round ratios; *cost vs "
         "limit* = this candidate's time / the limit's (the conditioner networks alone: for training their "
         "forward, backward and Adam step; for log_prob and sampling their forward without grad; image "
         "inputs in channels-last layout, the fastest for these convolutions). Peers run eager, as shipped. "
         "Adam lr 1e-4 everywhere; batch as in training for every figure."),
        "",
        (f"Wall time / (process CPU time / threads), median over every timed chunk: {contention(runs)} (1.00 "
         "on an idle machine; above 1: the process waited for a core, which other jobs held, or its threads "
         "waited for each other)."),
        "",
        "### Models",
        "",
        "\n".join(f"* {name}: {run.spec.describe()}" for name, run in runs.items()),
        "",
        models_table(list(runs.values())),
        "",
    ]
    for name, run in runs.items():
        parts += [f"### {name}", "", results_table(run), ""]
        if run.compile_s:
            parts += ["Compile (first call) of pushforward compiled: "
                      + ", ".join(f"{k} {v:.1f} s" for k, v in run.compile_s.items()) + ".", ""]
    parts += [
        "### Peak memory",
        "",
        ("1 thread, `torch.profiler` with `profile_memory=True`, one call per candidate after a warm-up "
         "call: the most bytes allocated through torch's CPU allocator during the call and live at the same "
         "time (activations, gradients, temporaries; not the parameters, Adam state and data held before). "
         "*forward + backward*: a training step without the optimizer step (Adam's step is the same code for "
         "every library and, at these sizes, would set the peak for all of them alike); *sampling*: one "
         "batch, no grad."),
        "",
        memory_table(list(runs.values())),
        "",
        "### Targets",
        "",
        markdown_table(["task", "threads", "target", "measured (per-round range)", "result"], targets),
        "",
        ("Verdicts are on the ratio of the medians; a per-round range that straddles the target means the "
         "verdict lies within this machine's noise."),
    ]
    for name, (head, top, diff) in profiles.items():
        parts += ["", f"### Where pushforward's eager training step goes: {name}", "", head, "", top, "",
                  "Largest excess over the limit:", "", diff]
    return "\n".join(parts)


def _seed_mean(rs: list) -> tuple[float, float, float, int]:
    """Mean test score over seeds, its standard error (across seeds; one seed: the test-set one), mean gap."""
    tests = [r.test for r in rs]
    mean = statistics.fmean(tests)
    se = statistics.stdev(tests) / math.sqrt(len(tests)) if len(tests) > 1 else rs[0].test_stderr
    gap = statistics.fmean(r.gap for r in rs)
    return mean, se, gap, len(tests)


def quality_report(args, command, revision, results, elapsed) -> str:
    from bench.peer_quality import BUDGET_S, CLIP, FMNIST_VAL, LR, MODEL, VAL_FRACTION, WARMUP

    rows, summary, verdicts = [], [], []
    by_task: dict[str, list] = {}
    for r in results:
        by_task.setdefault(r.task, []).append(r)
    for task, rs in by_task.items():
        image = task in ("digits", "fashion-mnist")
        unit = "bits/dim" if image else "nats"
        for r in rs:
            if r.status in ("ok", "diverged") and math.isfinite(r.test):
                test = f"{r.test:.4f} +- {r.test_stderr:.4f}"
                gap = "" if image else f"{r.gap:.4f}"
                val = f"{r.val:.4f}"
            else:
                test = gap = val = "-"
            status = r.status + (f": {r.message}" if r.message else "")
            rows.append([task, f"{MODEL[task]}", r.library, r.seed, status,
                         f"{r.steps:,}", f"{r.used_s:.0f}", val, test, gap, unit])
        ok: dict[str, tuple] = {}
        for lib in dict.fromkeys(r.library for r in rs):
            runs = [r for r in rs if r.library == lib]
            if all(math.isfinite(r.test) for r in runs):  # a library that failed on any seed is not averaged
                ok[lib] = _seed_mean(runs)
                summary.append([task, lib, ok[lib][3], f"{ok[lib][0]:.4f} +- {ok[lib][1]:.4f}",
                                "" if image else f"{ok[lib][2]:.4f}", unit])
        peers = {k: v for k, v in ok.items() if k != "pushforward"}
        if "pushforward" in ok and peers:
            best = min(peers, key=lambda k: peers[k][0])
            pf, pb = ok["pushforward"], peers[best]
            noise = 2 * math.hypot(pf[1], pb[1])
            sure = ("" if abs(pf[0] - pb[0]) > noise
                    else f" (difference within 2 standard errors, {noise:.4f})")
            verdicts.append([task, "better than the best peer", f"{pf[0]:.4f} vs {best} {pb[0]:.4f} {unit}",
                             ("PASS" if pf[0] < pb[0] else "MISS") + sure])
            if not image:
                best_gap = min(peers, key=lambda k: peers[k][2])
                peer_gap = peers[best_gap][2]
                verdicts.append([task, "gap to the entropy <= half the best peer's",
                                 f"{pf[2]:.4f} vs {best_gap} {peer_gap:.4f} nats (half: {peer_gap / 2:.4f})",
                                 "PASS" if pf[2] <= peer_gap / 2 else "MISS"])
    seeds = sorted({r.seed for r in results})
    clock = ("process CPU clock (1 thread: wall-clock time on an idle core)" if args.clock == "cpu"
             else "wall clock")
    parts = [
        "## Peers: quality (same model, data, optimiser and time budget)",
        "",
        "Written by `bench/peers.py --quality`; do not edit by hand. Command:",
        "",
        f"    {command}",
        "",
        f"Library: git {revision}. Machine: {machine_line()}. Versions: "
        + ", ".join(f"{lib} {version(lib)}" for lib in LIBRARIES) + f". Total run time {elapsed:.0f} s.",
        "",
        (f"Budgets (x {args.budget_scale:g}): "
         + ", ".join(f"{t} {BUDGET_S[t] * args.budget_scale:.0f} s" for t in args.quality_tasks)
         + f", measured on the {clock}; {args.jobs} job(s) side by side, 1 thread each. One shared loop for "
           f"every library: Adam lr {LR:g}, linear warm-up {WARMUP} steps then cosine to 1% over the budget, "
           f"gradient-norm clip {CLIP:g}, validation every {VAL_FRACTION:.0%} of the budget (clock stopped), "
           f"best validation weights restored, then one test evaluation. Seeds {', '.join(map(str, seeds))}: "
           "for each, the same seed, data split and data order for every library (the seed draws the 2-D "
           "samples, the initialisation, the batches and the dequantization noise). 2-D: 20k training, 5k "
           "validation and 20k test samples; *gap* = test NLL - true entropy (nats) = KL(data || model) "
           "estimate. digits: sklearn's 1437/180/180 split, 17 levels; Fashion-MNIST: "
           f"{60 - FMNIST_VAL // 1000}k/{FMNIST_VAL // 1000}k (split_off seed 0) and the 10k test images; "
           "both dequantized and centred. Lower is better everywhere."
         + (" QUICK MODE: tiny models, few samples, crops; smoke test only." if args.quick else "")),
        "",
        markdown_table(["task", "model", "library", "seed", "status", "steps", "budget used s", "best val",
                        "test (+- s.e. over test examples)", "gap to entropy", "unit"], rows),
        "",
        "### Mean over seeds",
        "",
        ("Test score averaged over the seeds, +- its standard error across seeds (with one seed: over the "
         "test examples); that error includes what the initialisation and the batch order change, which the "
         "test-set error alone does not."),
        "",
        markdown_table(["task", "library", "seeds", "test", "gap to entropy", "unit"], summary),
        "",
        "### Targets",
        "",
        markdown_table(["task", "target", "pushforward vs best peer (mean over seeds)", "result"], verdicts),
    ]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    from bench.peer_quality import QUALITY_TASKS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="seconds-long smoke run on tiny models; does not write")
    p.add_argument("--tasks", nargs="+", default=["T2", "T64", "TIMG", "SPLINE"],
                   choices=["T2", "T64", "TIMG", "SPLINE"])
    p.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=list(LIBRARIES))
    p.add_argument("--threads", nargs="+", type=int, default=None,
                   help="thread counts (default 1 2; quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; quick 2)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up calls per candidate (default 2; quick 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="calls per candidate per round (default: calibrated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None,
                   help="torch.compile backend (default inductor; quick: eager, which only checks that "
                        "dynamo traces the whole flow)")
    p.add_argument("--no-compile", action="store_true", help="skip pushforward compiled")
    p.add_argument("--no-diagnostic", action="store_true", help="skip the 'limit + input grads' candidate")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--no-profile", action="store_true",
                   help="skip profiling pushforward where a target is missed")
    p.add_argument("--quality", action="store_true", help="also run the quality half")
    p.add_argument("--quality-only", action="store_true", help="run only the quality half")
    p.add_argument("--quality-tasks", nargs="+", default=list(QUALITY_TASKS), choices=list(QUALITY_TASKS))
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiply every quality budget (smoke runs)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="quality budget clock (default cpu)")
    p.add_argument("--jobs", type=int, default=1, help="quality runs side by side (1 thread each)")
    p.add_argument("--quality-seeds", type=_positive_int, default=1,
                   help="train every library with this many seeds (--seed, --seed + 1, ...); the verdicts "
                        "use the means")
    p.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    p.add_argument("--write", action="store_true", help="write BENCHMARKS.md even with --quick")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--at-commit", default=None, metavar="REV",
                   help="measure pushforward as committed at REV (e.g. HEAD): its src/ is exported to a "
                        "temporary folder that shadows the working tree, so edits in progress are not "
                        "measured")
    args = p.parse_args(argv)
    if args.at_commit and not os.environ.get("PEERS_AT_COMMIT"):
        return _reexec_at_commit(args.at_commit, sys.argv[1:] if argv is None else argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.threads = args.threads or ([1] if args.quick else [1, 2])
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.backend = args.backend or ("eager" if args.quick else "inductor")
    if args.quick and args.steps is None:
        args.steps = 2
    args.dynamic_threads = args.backend == "inductor" and len(set(args.threads)) > 1
    write = (args.write or not args.quick) and not args.no_write
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    def log(msg: str) -> None:
        print(msg, flush=True)

    command = command_line([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    revision = _revision()
    log(f"$ {command}\n{machine_line()}\nlibrary: git {revision}")
    for lib in LIBRARIES:
        missing = "" if available(lib) else " (skipped: install with pip install -e '.[bench]')"
        log(f"  {lib}: {version(lib)}{missing}")

    if not args.quality_only:
        speed(args, command, revision, write, log)
    if args.quality or args.quality_only:
        from bench.peer_quality import run_quality

        t0 = time.perf_counter()
        log(f"\n== Quality: tasks {', '.join(args.quality_tasks)}, budget scale {args.budget_scale:g}, "
            f"{args.jobs} job(s)")
        seeds = [args.seed + i for i in range(args.quality_seeds)]
        results = run_quality(args.quality_tasks, args.libraries, args.budget_scale, seeds, args.quick,
                              args.clock, args.jobs, log)
        text = quality_report(args, command, revision, results, time.perf_counter() - t0)
        log("\n" + text)
        if write:
            log(f"wrote section 'peers_quality' of {write_section('peers_quality', text)}")
    return 0


def _reexec_at_commit(rev: str, argv: list[str]) -> int:
    """Re-runs this script with ``src/`` of commit ``rev`` (a clean export) first on the import path."""
    import subprocess

    from bench.common import REPO

    full = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    tmp = tempfile.mkdtemp(prefix=f"pushforward_{full}_")
    archive = subprocess.run(["git", "archive", full, "src"], cwd=REPO, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
    path = os.pathsep.join([os.path.join(tmp, "src"), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PEERS_AT_COMMIT": full, "PYTHONPATH": path}
    try:
        return subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env=env,
                              check=False).returncode
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _revision() -> str:
    """The library measured: a commit exported by ``--at-commit``, or the working tree's state."""
    import pushforward

    at = os.environ.get("PEERS_AT_COMMIT")
    if at:
        return f"{at} (clean export of the commit, imported from {os.path.dirname(pushforward.__file__)})"
    import hashlib
    from pathlib import Path

    rev = library_revision()
    if "uncommitted" in rev:  # name the exact sources measured
        h = hashlib.sha256()
        for f in sorted(Path(pushforward.__file__).parent.rglob("*.py")):
            h.update(f.read_bytes())
        rev += f" (sha256 of src/pushforward/**/*.py at start: {h.hexdigest()[:12]})"
    return rev


def speed(args, command, revision, write, log) -> None:
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    if args.dynamic_threads:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.dynamic_threads = True
    set_threads(max(args.threads))
    # Flow.log_prob / Flow.sample are one code object compiled for every task: allow the recompilations
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    specs = task_specs(args.quick)
    runs: dict[str, TaskRun] = {}
    for name in args.tasks:
        spec = specs[name]
        seed_everything(args.seed)
        torch._dynamo.reset()  # earlier tasks' compiled code is not needed again
        log(f"\n== {name}: {spec.describe()}")
        run = prepare(spec, args, log)
        log("   parameters: " + ", ".join(f"{c} {p:,}" for c, p in run.params.items()))
        for lib, why in run.skipped.items():
            log(f"   skipped {lib}: {why}")
        for threads in args.threads:
            log(f"  threads {set_threads(threads)}")
            measure(run, threads, args, log)
        if not args.no_memory:
            set_threads(1)
            for cand, fn in run.fns["memory"].items():
                run.peak_mb[cand] = peak_memory(fn)
            for cand, fn in run.fns["sample"].items():
                run.peak_sample_mb[cand] = peak_memory(fn)
            log("   peak MiB, forward + backward: "
                + ", ".join(f"{c} {v:.2f}" for c, v in run.peak_mb.items()))
            log("   peak MiB, sampling: " + ", ".join(f"{c} {v:.2f}" for c, v in run.peak_sample_mb.items()))
        runs[name] = run
    targets = evaluate_targets(runs)
    log("\n" + markdown_table(["task", "threads", "target", "measured", "result"], targets))
    profiles = {}
    if not args.no_profile:
        set_threads(1)
        for name, run in runs.items():
            missed = any(r[0] == name and r[2].startswith("eager step") and r[4] == "MISS" for r in targets)
            if missed or (args.quick and EAGER in run.fns["train"]):
                profiles[name] = _profile(run, 1 if args.quick else 5, log)
    elapsed, load1 = time.perf_counter() - start, os.getloadavg()[0]
    text = speed_report(args, command, revision, (load0, load1), elapsed, runs, targets, profiles)
    log("\n" + text)
    if write:
        log(f"wrote section 'peers_speed' of {write_section('peers_speed', text)}")


if __name__ == "__main__":
    sys.exit(main())
