"""Continuous normalizing flows (issue 19): maximum likelihood through the ODE vs flow matching, against
realnvp / nsf and zuko's CNF, at equal CPU time.

* 2-D densities (moons, 8gaussians, checkerboard; data as ``bench/peers.py --quality``: seeded samples,
  20k training, a fixed validation and test set): every method trains for the same CPU budget in one
  shared loop (Adam lr 1e-3, 100 warm-up steps then cosine to 1%, clip 10, batch 256, validation every
  5% of the budget with the clock stopped, best validation weights restored). Methods: ``realnvp`` and
  ``nsf`` (pushforward's defaults, trained by NLL), ``cnf-ml`` (``models.cnf(2)``: an MLP field 3 x 64,
  SiLU, dopri5 at rtol = atol = 1e-5, exact divergence, trained by NLL through the ODE), ``cnf-fm`` and
  ``cnf-otfm`` (the same model trained by flow matching, independent or minibatch-OT coupling, no ODE in
  training), ``zuko-cnf`` (``zuko.flows.CNF(2, hidden_features=(64, 64, 64))``: its defaults, exact
  divergence, dopri5 at atol 1e-6 / rtol 1e-5, trained by NLL). Every validation and test figure is the
  exact likelihood (the CNFs' by their ODE with the exact divergence; no Hutchinson estimate anywhere).
  Reported: test NLL +- s.e. (nats) and its gap to the true entropy, optimizer steps, and the CPU cost
  of one ``log_prob`` and one ``sample`` of 1,000 points (1 thread, median of 3, the trained model).
* Training cost to the same NLL: from the validation curves (NLL vs CPU seconds of training) of
  ``cnf-ml`` and ``cnf-fm``: the target is the worse of the two best validation NLLs (an NLL both reach),
  and each method's cost is the CPU time at which it first reached it.
* real tables (those of ``bench/tables.py`` up to 1,000 rows x 60 columns; ``--data-dir``: where
  ``scripts/fetch_tables.sh`` put them): the path of ``pushforward train --data table.csv`` (seeded
  80/10/10 split, standardisation, grid columns dequantized), with ``bench/tables.py``'s budget rule
  (``max_steps`` capped to what fits the CPU budget with 40 validations) for ``pushforward`` (the table
  defaults: splines + Gaussian), ``cnf-ml`` and ``cnf-fm`` (``--recipe cnf``, ``--objective nll`` /
  ``flow-matching``; the flow-matching run validates on its own loss and is scored by the ODE), and the
  full-covariance Gaussian floor. Test NLL in nats per row, standardised space.
* digits (sklearn 8x8, 17 levels, 1437/180/180): ``models.cnf_image((1, 8, 8))`` (logit inside the flow,
  a conv field 3 x 32 channels) trained by flow matching (validated on its own loss: an ODE solve with
  the exact 64-D divergence costs minutes) and by NLL (Hutchinson's estimate in training, exact
  divergence in every NLL figure), and ``realnvp_image((1, 8, 8))`` as the ``digits`` entry builds it
  (200k parameters) by NLL, at equal CPU time; test bits/dim (uniform dequantization; a bound on the
  discrete digits).

Each (method, task) runs in its own process with one thread (``--jobs`` of them side by side); budgets
are CPU seconds of that process (``time.process_time``), so a loaded machine does not change who gets
how many steps. Results accumulate in ``--results`` (JSON lines, keyed by task and method), so tasks can
be run in separate invocations; ``--write`` renders every result there into BENCHMARKS.md.

    python bench/continuous.py --tasks moons,8gaussians,checkerboard --budget 60 --jobs 2 --write
    python bench/continuous.py --tasks digits --budget 120 --jobs 2 --write
    python bench/continuous.py --tasks wine,diabetes,Glass --data-dir DIR --budget 30 --jobs 2 --write
    python bench/continuous.py --render --write         # the section from the stored results
    python bench/continuous.py --quick --write          # seconds-long smoke run
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench.common import command_line, library_revision, machine_line, markdown_table, run_subprocesses

TOY = ("moons", "8gaussians", "checkerboard")
TABLES = ("wine", "diabetes", "Glass", "Ionosphere", "Sonar", "BostonHousing", "PimaIndiansDiabetes",
          "Vehicle", "Vowel")
TASKS = (*TOY, "digits", *TABLES)
METHODS_TABLES = ("gaussian", "pushforward", "cnf-ml", "cnf-fm")
METHODS_2D = ("realnvp", "nsf", "cnf-ml", "cnf-fm", "cnf-otfm", "zuko-cnf")
METHODS_DIGITS = ("realnvp_image", "cnf_image-ml", "cnf_image-fm")
LR, WARMUP, LR_MIN, CLIP, BATCH, VALIDATIONS = 1e-3, 100, 0.01, 10.0, 256, 20
N_TEST_2D, N_VAL_2D = 5000, 2000


@dataclass
class Result:
    task: str
    method: str
    status: str = "ok"
    message: str = ""
    budget_s: float = 0.0
    used_s: float = 0.0
    steps: int = 0
    params: int = 0
    test: float = math.nan  # nats (2-D) or bits/dim (digits)
    test_stderr: float = math.nan
    gap: float = math.nan
    log_prob_ms: float = math.nan
    sample_ms: float = math.nan
    curve: list = field(default_factory=list)  # [(cpu seconds of training, validation figure)]
    seed: int = 0


# -- data -------------------------------------------------------------------------------------------------
def _data(task: str, seed: int, quick: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]:
    from pushforward import data as pd

    if task in TOY:
        n = (2000, 300, 500) if quick else (20000, N_VAL_2D, N_TEST_2D)
        return (pd.toy_sample(task, n[0], seed=seed * 3), pd.toy_sample(task, n[1], seed=seed * 3 + 1),
                pd.toy_sample(task, n[2], seed=seed * 3 + 2), None)
    tr, va, te = (pd.load_digits(s).images for s in ("train", "val", "test"))
    if quick:
        tr, va, te = tr[:256], va[:64], te[:64]
    return tr, va, te, 17


def _dequantize(x: torch.Tensor, levels: int | None, g: torch.Generator) -> torch.Tensor:
    if levels is None:
        return x.float()
    return (x.float() + torch.rand(x.shape, generator=g)) / levels


# -- models -----------------------------------------------------------------------------------------------
class _Zuko(torch.nn.Module):
    def __init__(self, flow: torch.nn.Module):
        super().__init__()
        self.flow = flow

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow().log_prob(x)

    def sample(self, n: int) -> torch.Tensor:
        return self.flow().sample((n,))


_OBJECTIVE = {"ml": "nll", "fm": "fm", "otfm": "otfm"}


def _build(method: str, quick: bool) -> tuple[torch.nn.Module, str]:
    """``(model, objective)``: objective ``"nll"``, ``"fm"`` or ``"otfm"``."""
    from pushforward import models

    small = {"hidden": (16, 16)} if quick else {}
    if method == "realnvp":
        return models.realnvp(2, **({"layers": 2, **small} if quick else {})), "nll"
    if method == "nsf":
        return models.nsf(2, **({"layers": 2, **small} if quick else {})), "nll"
    if method.startswith("cnf-"):
        return models.cnf(2, **small), _OBJECTIVE[method.split("-")[1]]
    if method == "zuko-cnf":
        import zuko

        return _Zuko(zuko.flows.CNF(2, hidden_features=(16, 16) if quick else (64, 64, 64))), "nll"
    if method == "realnvp_image":  # the digits entry's model (200k parameters), as `pushforward train`
        from pushforward.data import lookup

        kw = {"hidden_channels": 8, "blocks": 1} if quick else dict(lookup("digits").models["realnvp_image"])
        return models.realnvp_image((1, 8, 8), **kw), "nll"
    if method.startswith("cnf_image-"):
        kw = {"hidden_channels": 8, "blocks": 1} if quick else {}
        return models.cnf_image((1, 8, 8), **kw), _OBJECTIVE[method.split("-")[1]]
    raise ValueError(f"unknown method {method!r}")


# -- one (method, task) -----------------------------------------------------------------------------------
def _lr(step: int, frac: float) -> float:
    warm = min(1.0, (step + 1) / WARMUP)
    return warm * (LR * LR_MIN + (LR - LR * LR_MIN) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@torch.no_grad()
def _nll(model: torch.nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    model.eval()
    out = torch.cat([-model.log_prob(x[i : i + batch]).double() for i in range(0, len(x), batch)])
    model.train()
    return out


def _median_ms(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append((time.process_time() - t0) * 1e3)
    return statistics.median(times)


def table_one(task: str, method: str, budget: float, data_dir: str) -> Result:
    """One method on one real table, through the CLI's training path (see the module docstring)."""
    import numpy as np

    from bench import tables as tb
    from pushforward.data.tabular import gaussian_baseline, table_objective
    from pushforward.experiment import build_flow, load_dataset
    from pushforward.objectives import select_objective
    from pushforward.runs import eval_run, run_objective, train_run

    res = Result(task, method, budget_s=budget)
    table, columns = tb.load_table(task, data_dir)
    work = Path(tempfile.mkdtemp(prefix=f"continuous_{task}_"))
    csv = work / f"{task}.csv"
    np.savetxt(csv, table, delimiter=",", header=",".join(c.replace(",", "_") for c in columns), comments="")
    config = tb._config(csv, work / method)
    if method.startswith("cnf-"):
        config.recipe, config.model = "cnf", {}
        config.objective = "flow-matching" if method == "cnf-fm" else "nll"
    dataset = load_dataset(config)
    t0 = time.process_time()
    if method == "gaussian":
        figures = gaussian_baseline(dataset.train, dataset.test, table_objective(config, dataset),
                                    config.eval_batch_size, config.seed)
        res.test, res.test_stderr = figures["gaussian_nll"], figures["gaussian_nll_stderr"]
    else:
        model = build_flow(config, dataset)
        res.params = sum(p.numel() for p in model.parameters())
        objective = select_objective(config.objective, run_objective(config, model, dataset))
        tb._fit_budget(config, model, objective, dataset, budget)
        history, _, _ = train_run(config, overwrite=True)
        result = eval_run(work / method)
        res.test, res.test_stderr, res.steps = result["nll"], result["nll_stderr"], history.step
        res.message = f"{len(table)} rows x {dataset.event_shape[0]}"
    res.used_s = time.process_time() - t0
    print(f"  {task:12s} {method:14s} steps {res.steps:7d} test {res.test:.4f} +- {res.test_stderr:.4f} "
          f"({res.used_s:.0f} CPU s incl. evaluation)", flush=True)
    return res


def train_one(task: str, method: str, budget: float, seed: int, quick: bool) -> Result:
    from pushforward.data import toy_entropy
    from pushforward.metrics import bits_per_dim, mean_and_stderr
    from pushforward.objectives import Batch, FlowMatching

    res = Result(task, method, budget_s=budget, seed=seed)
    torch.manual_seed(seed)
    try:
        model, objective = _build(method, quick)
    except ImportError as exc:
        res.status, res.message = "missing", str(exc).splitlines()[0]
        return res
    res.params = sum(p.numel() for p in model.parameters())
    train, val, test, levels = _data(task, seed, quick)
    dims = math.prod(train.shape[1:])
    g = torch.Generator().manual_seed(seed)
    x_val = _dequantize(val, levels, torch.Generator().manual_seed(seed + 1000))
    x_test = _dequantize(test, levels, torch.Generator().manual_seed(seed + 2000))
    fm = FlowMatching(coupling="ot" if objective == "otfm" else "independent")
    opt = torch.optim.Adam(model.parameters(), lr=LR)

    def score(nll: float) -> float:
        return float(bits_per_dim(nll, dims, levels)) if levels else nll

    # digits: an ODE solve through the flow-matching model's field with the exact 64-D divergence costs
    # minutes, so it validates on its own loss (held-out data, fixed noise and times) and the ODE scores
    # the test set once
    by_loss = objective != "nll" and levels is not None
    validations = 4 if quick else VALIDATIONS
    best, best_state = math.inf, None
    used, step, next_val = 0.0, 0, budget / validations
    perm, pos = torch.randperm(len(train), generator=g), 0

    def validate() -> None:
        nonlocal best, best_state
        if by_loss:
            model.eval()
            with torch.no_grad():
                v = float(fm.loss(model, Batch(x_val), torch.Generator().manual_seed(seed + 3000)).mean())
            model.train()
        else:
            v = float(_nll(model, x_val).mean())
        res.curve.append((round(used, 3), v if by_loss else score(v)))  # the loss: its own unit
        if math.isfinite(v) and v < best:
            best, best_state = v, copy.deepcopy(model.state_dict())

    while used < budget:
        if pos + BATCH > len(perm):
            perm, pos = torch.randperm(len(train), generator=g), 0
        x = _dequantize(train[perm[pos : pos + BATCH]], levels, g)
        pos += BATCH
        t0 = time.process_time()
        for group in opt.param_groups:
            group["lr"] = _lr(step, used / budget)
        if objective == "nll":
            loss = -model.log_prob(x).mean() / dims
        else:
            loss = fm.loss(model, Batch(x), g).mean() / dims
        if not torch.isfinite(loss):
            res.status, res.message = "diverged", f"non-finite loss at step {step + 1}"
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        step += 1
        used += time.process_time() - t0
        if used >= next_val:
            validate()
            next_val += budget / validations
    if not res.curve or res.curve[-1][0] != round(used, 3):
        validate()
    res.steps, res.used_s = step, used
    if best_state is None:
        res.status = "diverged"
        return res
    model.load_state_dict(best_state)
    mean, stderr = mean_and_stderr(_nll(model, x_test))
    res.test = score(mean)
    res.test_stderr = stderr / (dims * math.log(2)) if levels else stderr
    if levels is None:
        h = toy_entropy(task)
        res.gap = mean - h if h is not None else math.nan
    model.eval()
    n, repeats = (1000, 3) if levels is None else (100, 1)
    with torch.no_grad():
        res.log_prob_ms = _median_ms(lambda: model.log_prob(x_test[:n]), repeats)
        res.sample_ms = _median_ms(lambda: model.sample(n), repeats)
    print(f"  {task:12s} {method:14s} steps {step:7d} test {res.test:.4f} +- {res.test_stderr:.4f} "
          f"log_prob {res.log_prob_ms:.0f} ms sample {res.sample_ms:.0f} ms", flush=True)
    return res


# -- orchestration and the section --------------------------------------------------------------------------
def _cost_to_same_nll(rows: dict[str, Result]) -> tuple[float, float, float] | None:
    """``(target, cpu_ml, cpu_fm)`` from the validation NLL curves of cnf-ml and cnf-fm (2-D; on digits the
    flow-matching curve is its own loss, not an NLL)."""
    ml, fmr = rows.get("cnf-ml"), rows.get("cnf-fm")
    if not ml or not fmr or not ml.curve or not fmr.curve:
        return None
    target = max(min(v for _, v in ml.curve), min(v for _, v in fmr.curve))

    def first(r: Result) -> float:
        return next(t for t, v in r.curve if v <= target)

    return target, first(ml), first(fmr)


def markdown(results: list[Result], commands: list[str]) -> str:
    rows_by_task: dict[str, dict[str, Result]] = {}
    for r in results:
        rows_by_task.setdefault(r.task, {})[r.method] = r
    out = ["## Continuous flows: maximum likelihood vs flow matching, at equal CPU time", "",
           "Written by `bench/continuous.py`; do not edit by hand. Commands:", ""]
    out += [f"    {c}" for c in commands]
    out += ["", f"Library revision {library_revision()}; {machine_line()}.", "",
            "Each method trains for the same budget of CPU seconds (one thread, `time.process_time`) in one "
            "shared loop: Adam lr 1e-3, 100 warm-up steps then cosine to 1%, gradient clip 10, batch 256, "
            f"validation every {100 // VALIDATIONS}% of the budget (clock stopped), best validation weights "
            "restored. CNFs: `models.cnf(2)` (MLP field 3 x 64, SiLU, dopri5 at rtol = atol = 1e-5) trained "
            "by NLL through the ODE (`cnf-ml`, exact divergence) or by flow matching without an ODE "
            "(`cnf-fm`: independent coupling; `cnf-otfm`: minibatch-OT coupling); zuko's "
            "`CNF(2, hidden_features=(64, 64, 64))` (exact divergence, dopri5 at atol 1e-6 / rtol 1e-5) "
            "by NLL. Every NLL figure, validation and test, is the exact likelihood by the ODE (exact "
            "divergence; no Hutchinson estimate in any figure). 2-D: 20k training samples, 2k validation, "
            f"{N_TEST_2D} test; gap = test NLL - true entropy. digits: the flow-matching model validates on "
            "its flow-matching loss (held-out images, fixed noise and times; an ODE solve through its field "
            "with the exact 64-D divergence costs minutes) and is scored once by the ODE on the test images; "
            "the ML-trained image CNF validates by the ODE like every other model. log_prob / sample: CPU "
            "ms for 1,000 points, median "
            "of 3 (digits: 100 images, one run), no grad, the trained model (an adaptive solver's cost "
            "depends on the field it learned); pushforward's `sample` runs the CNF's inverse, which "
            "integrates "
            "the exact divergence alongside the points (a Transform returns its log-determinant), while "
            "zuko's `sample` integrates the points alone. Lower is better everywhere.", ""]
    header = ["task", "method", "budget (CPU s)", "steps", "params", "test", "gap (nats)", "log_prob (ms)",
              "sample (ms)", "status"]
    table = []
    for task in (*TOY, "digits"):
        for method in (*METHODS_2D, *METHODS_DIGITS):
            r = rows_by_task.get(task, {}).get(method)
            if r is None:
                continue
            unit = "bits/dim" if task == "digits" else "nats"
            test = f"{r.test:.4f} +- {r.test_stderr:.4f} {unit}" if math.isfinite(r.test) else "-"
            gap = f"{r.gap:.4f}" if math.isfinite(r.gap) else "-"
            table.append([task, method, f"{r.budget_s:.0f}", f"{r.steps:,}", f"{r.params:,}", test, gap,
                          f"{r.log_prob_ms:.0f}" if math.isfinite(r.log_prob_ms) else "-",
                          f"{r.sample_ms:.0f}" if math.isfinite(r.sample_ms) else "-",
                          r.status + (f": {r.message}" if r.message else "")])
    out += [markdown_table(header, table), ""]
    verdict_rows, cost_rows = [], []
    for task in TASKS:
        rows = rows_by_task.get(task, {})
        fm, zk = rows.get("cnf-fm"), rows.get("zuko-cnf")
        if fm and zk and math.isfinite(fm.test) and math.isfinite(zk.test):
            diff, se = fm.test - zk.test, math.hypot(fm.test_stderr, zk.test_stderr)
            verdict = "met" if diff <= 2 * se else "missed"
            verdict_rows.append([task, f"{fm.test:.4f}", f"{zk.test:.4f}", f"{diff:+.4f} +- {se:.4f}",
                                 verdict])
        cost = _cost_to_same_nll(rows)
        if cost is not None:
            target, t_ml, t_fm = cost
            ratio = t_ml / max(t_fm, 1e-9)
            fm_row = rows.get("cnf-fm")
            # reached at the first validation: the true cost is at most that, the ratio at least this
            bound = ">= " if fm_row is not None and t_fm == fm_row.curve[0][0] else ""
            cost_rows.append([task, f"{target:.4f}", f"{t_ml:.1f}", f"{t_fm:.1f}", f"{bound}{ratio:.1f}x",
                              "met" if ratio >= 3 else "missed"])
    table_rows = []
    for task in TABLES:
        rows = rows_by_task.get(task, {})
        if not rows:
            continue
        cells = []
        for m in METHODS_TABLES:
            r = rows.get(m)
            ok = r is not None and math.isfinite(r.test)
            cells.append(f"{r.test:.3f} +- {r.test_stderr:.3f}" if ok else (r.status if r else "-"))
        fm, ml = rows.get("cnf-fm"), rows.get("cnf-ml")
        steps = f"{ml.steps:,} / {fm.steps:,}" if fm and ml else "-"
        size = next((r.message for r in rows.values() if r.message and "rows" in r.message), "")
        table_rows.append([task, size, *cells, steps, f"{next(iter(rows.values())).budget_s:.0f}"])
    if table_rows:
        out += ["Real tables: test NLL (nats per row, standardised space; a bound on grid columns' discrete "
                "values), +- s.e. over the test rows. `pushforward`: the table defaults (splines and the "
                "Gaussian, recipe `tabular`); `cnf-ml` / `cnf-fm`: `--recipe cnf` trained by NLL through "
                "the ODE / by flow matching, both scored by the ODE (exact divergence).", "",
                markdown_table(["table", "rows x D", *METHODS_TABLES, "steps ML / FM", "budget (CPU s)"],
                               table_rows), ""]
    if verdict_rows:
        out += ["Target 1: the flow-matching CNF no worse than zuko's CNF at equal CPU time (met: FM - zuko "
                "<= 2 s.e. of the difference).", "",
                markdown_table(["task", "cnf-fm test", "zuko-cnf test", "FM - zuko", "target"], verdict_rows),
                ""]
    if cost_rows:
        out += ["Target 2: flow matching at least 3x cheaper to train to the same NLL than maximum "
                "likelihood. Target NLL: the worse of the two best validation figures (both reach it); "
                "cost: CPU seconds of training when the validation curve first reached it (validation "
                f"every {100 // VALIDATIONS}% of the budget, so costs are resolved to that step; `>=`: flow "
                "matching was already there at its first validation).", "",
                markdown_table(["task", "target val NLL", "cnf-ml CPU s", "cnf-fm CPU s", "ML / FM",
                                "target"], cost_rows), ""]
    return "\n".join(out)


def _load(path: Path) -> dict[tuple[str, str], Result]:
    found: dict[tuple[str, str], Result] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = Result(**json.loads(line))
                found[(r.task, r.method)] = r
    return found


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TOY), help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--methods", default="", help="comma-separated (default: all for each task)")
    p.add_argument("--budget", type=float, default=0.0,
                   help="CPU seconds per method (default 60; digits 120)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny models, data and budgets (a smoke run)")
    p.add_argument("--results", default="", help="JSON lines of results to merge into (default: bench/"
                   "figures/continuous.jsonl; --quick: a temporary file)")
    p.add_argument("--write", action="store_true", help="write the continuous section of BENCHMARKS.md")
    p.add_argument("--render", action="store_true", help="train nothing: render the stored results")
    p.add_argument("--data-dir", default=os.environ.get("PUSHFORWARD_TABLES", str(Path.home() / ".cache" /
                                                                           "pushforward" / "tables")),
                   help="where scripts/fetch_tables.sh put the mlbench tables")
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        task, method, budget, seed, out = a.worker
        torch.set_num_threads(1)
        import warnings

        warnings.filterwarnings("ignore")
        if task in TABLES:
            res = table_one(task, method, float(budget), a.data_dir)
        else:
            res = train_one(task, method, float(budget), int(seed), a.quick)
        Path(out).write_text(json.dumps(asdict(res)))
        return
    tasks = [] if a.render else [t for t in a.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        p.error(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
    units = []
    for task in tasks:
        methods = METHODS_DIGITS if task == "digits" else METHODS_TABLES if task in TABLES else METHODS_2D
        chosen = [m for m in a.methods.split(",") if m] or list(methods)
        bad = sorted(set(chosen) - set(methods))
        if bad:
            p.error(f"unknown methods {bad} for {task}; known: {', '.join(methods)}")
        budget = a.budget or (2.0 if a.quick else 120.0 if task == "digits" else 30.0 if task in TABLES
                              else 60.0)
        units += [(task, m, budget) for m in chosen]
    tmp = tempfile.mkdtemp(prefix="bench_continuous_")
    results_path = Path(a.results) if a.results else (
        Path(tmp) / "results.jsonl" if a.quick else Path(__file__).parent / "figures" / "continuous.jsonl")
    store = _load(results_path)
    script = os.path.abspath(__file__)

    def out_path(unit) -> str:
        return os.path.join(tmp, f"{unit[0]}-{unit[1]}.json")

    def command(unit) -> list[str]:
        return [sys.executable, script, "--worker", unit[0], unit[1], str(unit[2]), str(a.seed),
                out_path(unit), "--data-dir", a.data_dir] + (["--quick"] if a.quick else [])

    def finished(unit, code: int, text: str) -> None:
        print(text.rstrip(), flush=True)
        if code == 0 and os.path.exists(out_path(unit)):
            r = Result(**json.loads(Path(out_path(unit)).read_text()))
        else:
            r = Result(unit[0], unit[1], "error", " | ".join(text.strip().splitlines()[-2:])[-200:],
                       budget_s=unit[2])
        store[(r.task, r.method)] = r

    run_subprocesses(units, command, a.jobs, finished, capture=True, poll_s=0.05,
                     on_start=lambda u: print(f"start {u[1]} on {u[0]} ({u[2]:.0f} CPU s)", flush=True))
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in store.values()))
    commands = sorted({*_commands(results_path), *([] if a.render else [command_line()])})
    _commands(results_path, commands)
    text = markdown(list(store.values()), commands)
    print(text)
    if a.write:
        from bench.common import write_section

        write_section("continuous", text)


def _commands(results: Path, update: list[str] | None = None) -> list[str]:
    """The commands that produced the results in ``results`` (kept next to it)."""
    path = results.with_suffix(".commands")
    if update is not None:
        path.write_text("\n".join(update) + "\n")
        return update
    return path.read_text().splitlines() if path.exists() else []


if __name__ == "__main__":
    main()
