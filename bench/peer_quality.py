"""Quality half of ``bench/peers.py``: every library trains the same model on the same data, with the
same optimiser and the same time budget, in one shared training loop; models are selected on a
validation split and scored once on the test split.

* 2-D densities (moons, 8gaussians, checkerboard; the T2 model): test NLL in nats and its gap to the
  true entropy (``pushforward.data.toy_entropy``), i.e. the KL divergence ``KL(p || q)`` estimated on
  test samples.
* digits (the T64 model on dequantized 8x8 digits, 17 levels, centred): test bits/dim.
* Fashion-MNIST (the TIMG model, 1x28x28, 256 levels, centred): test bits/dim on the 10k test images.

Data are dequantized ``(x + u) / levels`` and centred (``- 0.5``; Jacobian 1, so bits/dim is the
plain formula of :func:`pushforward.metrics.bits_per_dim`). Training batches get fresh noise; the
validation and test sets fixed noise.

The loop (identical for every library): Adam (lr 1e-3, betas (0.9, 0.999)), a linear warm-up over 100
steps then a cosine decay to 1% of lr over the budget (by elapsed budget), gradient-norm clipping at
10, validation every 10% of the budget (the clock is stopped meanwhile), best validation weights
restored at the end. A non-finite loss stops the run (recorded) and keeps the best weights so far.

Each (library, task) runs in its own process with one thread (``--jobs`` of them side by side). The
budget is measured on the process CPU clock by default (``--clock cpu``): with one thread this equals
wall-clock time on an idle core, and other jobs on a shared machine do not eat into it. ``--clock
wall`` uses wall-clock time instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench.common import run_subprocesses
from bench.peer_models import Missing, Unsupported, available, build, task_specs

QUALITY_TASKS = ("moons", "8gaussians", "checkerboard", "digits", "fashion-mnist")
BUDGET_S = {"moons": 60.0, "8gaussians": 60.0, "checkerboard": 60.0, "digits": 120.0, "fashion-mnist": 300.0}
MODEL = {"moons": "T2", "8gaussians": "T2", "checkerboard": "T2", "digits": "T64", "fashion-mnist": "TIMG"}
LR, WARMUP, LR_MIN, CLIP, VAL_FRACTION = 1e-3, 100, 0.01, 10.0, 0.1
FMNIST_VAL = 2000  # validation images carved off the training set (split_off seed 0)


@dataclass
class QualityResult:
    library: str
    task: str
    status: str  # "ok", "diverged", "unsupported", "missing", "no data", "error"
    message: str = ""
    steps: int = 0
    budget_s: float = 0.0
    used_s: float = 0.0
    wall_s: float = 0.0
    best_step: int = 0
    val: float = math.nan  # best validation NLL (nats) or bits/dim
    test: float = math.nan  # test NLL (nats, 2-D) or bits/dim (images)
    test_stderr: float = math.nan
    gap: float = math.nan  # 2-D: test NLL - true entropy (nats)
    params: int = 0
    seed: int = 0


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
@dataclass
class Data:
    train: torch.Tensor  # float vectors, or integer images
    val: torch.Tensor
    test: torch.Tensor
    levels: int | None  # None: continuous data
    flatten: bool  # images fed as vectors (digits in the T64 model)

    def prepare(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.levels is None:
            return x
        y = (x.float() + torch.rand(x.shape, generator=generator)) / self.levels - 0.5
        return y.flatten(1) if self.flatten else y

    @property
    def dims(self) -> int:
        return math.prod(self.train.shape[1:])


def load_data(task: str, seed: int, quick: bool) -> Data:
    from pushforward import data as pd

    if task in ("moons", "8gaussians", "checkerboard"):
        n = (2000, 500, 2000) if quick else (20000, 5000, 20000)
        return Data(pd.toy_sample(task, n[0], seed=seed * 3 + 0),
                    pd.toy_sample(task, n[1], seed=seed * 3 + 1),
                    pd.toy_sample(task, n[2], seed=seed * 3 + 2), None, False)
    if task == "digits":
        tr, va, te = (pd.load_digits(s) for s in ("train", "val", "test"))
        if quick:  # the quick T64 model is 8-D: the first row of each digit
            return Data(tr.images[:, :, 0], va.images[:, :, 0], te.images[:, :, 0], 17, True)
        return Data(tr.images, va.images, te.images, 17, True)
    train = pd.load_fashion_mnist("train")
    test = pd.load_fashion_mnist("test")
    rest, val = pd.split_off(train, FMNIST_VAL, seed=0)
    tr, va, te = rest.images, val.images, test.images
    if quick:  # the quick TIMG model is 1x8x8: a centre crop, few images
        tr, va, te = tr[:2000, :, 10:18, 10:18], va[:500, :, 10:18, 10:18], te[:1000, :, 10:18, 10:18]
    return Data(tr, va, te, 256, False)


# ------------------------------------------------------------------------------------------------
# The shared loop
# ------------------------------------------------------------------------------------------------
def _lr(step: int, frac: float) -> float:
    warm = min(1.0, (step + 1) / WARMUP)
    return warm * (LR * LR_MIN + (LR - LR * LR_MIN) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@torch.no_grad()
def _nll(log_prob, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([-log_prob(x[i : i + batch]).double() for i in range(0, len(x), batch)])


def train_one(lib: str, task: str, budget_s: float, seed: int, quick: bool, clock: str,
              log=print, builder=None) -> QualityResult:
    """Trains ``lib``'s model of ``task`` in the shared loop; ``builder(lib, spec, seed=seed)`` replaces
    :func:`bench.peer_models.build` for other scripts' candidates (``bench/neural.py``)."""
    from pushforward.data import toy_entropy
    from pushforward.metrics import bits_per_dim, mean_and_stderr

    res = QualityResult(lib, task, "ok", budget_s=budget_s, seed=seed)
    if builder is None and not available(lib):
        res.status, res.message = "missing", f"{lib} not installed"
        return res
    try:
        data = load_data(task, seed, quick)
    except (FileNotFoundError, ImportError) as exc:
        res.status, res.message = "no data", str(exc).split("\n")[0]
        return res
    spec = task_specs(quick)[MODEL[task]]
    try:
        built = (builder or build)(lib, spec, seed=seed)
    except (Unsupported, Missing) as exc:
        res.status, res.message = "unsupported", str(exc)
        return res
    res.params = built.n_params
    params = [p for p in built.module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LR)
    g = torch.Generator().manual_seed(seed)
    g_val, g_test = torch.Generator().manual_seed(seed + 1000), torch.Generator().manual_seed(seed + 2000)
    x_val, x_test = data.prepare(data.val, g_val), data.prepare(data.test, g_test)
    batch, eval_batch = spec.batch, 500 if spec.kind == "image" else 2000
    dims = data.dims

    def score(nll_mean: float) -> float:
        return float(bits_per_dim(nll_mean, dims, data.levels)) if data.levels else nll_mean

    now = time.process_time if clock == "cpu" else time.perf_counter
    used, step, next_val = 0.0, 0, VAL_FRACTION * budget_s
    best, best_state, perm, pos = math.inf, None, torch.randperm(len(data.train), generator=g), 0
    wall0 = time.perf_counter()

    def validate() -> None:
        nonlocal best, best_state
        v = float(_nll(built.log_prob, x_val, eval_batch).mean())
        if math.isfinite(v) and v < best:
            best, best_state = v, copy.deepcopy(built.module.state_dict())
            res.best_step = step

    while used < budget_s:
        if pos + batch > len(perm):
            perm, pos = torch.randperm(len(data.train), generator=g), 0
        x = data.prepare(data.train[perm[pos : pos + batch]], g)
        pos += batch
        t0 = now()
        for group in opt.param_groups:
            group["lr"] = _lr(step, used / budget_s)
        loss = -built.log_prob(x).mean() / dims
        if not torch.isfinite(loss):
            res.status, res.message = "diverged", f"non-finite loss at step {step + 1}"
            used += now() - t0
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, CLIP)
        if not torch.isfinite(gn):
            res.status, res.message = "diverged", f"non-finite gradient at step {step + 1}"
            used += now() - t0
            break
        opt.step()
        step += 1
        used += now() - t0
        if used >= next_val:
            validate()
            next_val += VAL_FRACTION * budget_s
    if res.status == "ok":
        validate()
    res.steps, res.used_s, res.wall_s = step, used, time.perf_counter() - wall0
    if best_state is None:
        res.status = "diverged"
        res.message = (res.message + "; " if res.message else "") + "no finite validation score"
        return res
    built.module.load_state_dict(best_state)
    nll = _nll(built.log_prob, x_test, eval_batch)
    mean, stderr = mean_and_stderr(nll)
    res.val = score(best / 1.0)
    if data.levels:
        res.test, res.test_stderr = score(mean), stderr / (dims * math.log(2))
    else:
        res.test, res.test_stderr = mean, stderr
        h = toy_entropy(task)
        if h is not None:
            res.gap = mean - h
    gap = f", gap {res.gap:.4f} nats" if math.isfinite(res.gap) else ""
    log(f"  {lib:11s} {task:13s} seed {seed} {res.status:8s} steps {step:6d}, best val {res.val:.4f} at step "
        f"{res.best_step}, test {res.test:.4f} +- {res.test_stderr:.4f}{gap}")
    return res


# ------------------------------------------------------------------------------------------------
# Orchestration: one process per (library, task), ``jobs`` at a time
# ------------------------------------------------------------------------------------------------
def run_quality(tasks, libraries, budget_scale: float, seeds: Sequence[int], quick: bool, clock: str,
                jobs: int, log=print) -> list[QualityResult]:
    """Trains every library on every task once per seed, ``jobs`` worker processes at a time."""
    # longest budgets first, so that parallel jobs finish together
    units = sorted(((task, lib, seed) for task in tasks for lib in libraries for seed in seeds),
                   key=lambda u: -BUDGET_S[u[0]])
    results: dict[tuple[str, str, int], QualityResult] = {}
    tmp = tempfile.mkdtemp(prefix="peers_quality_")
    script = os.path.abspath(__file__)

    def out_path(unit: tuple[str, str, int]) -> str:
        return os.path.join(tmp, "{}-{}-{}.json".format(*unit))

    def command(unit: tuple[str, str, int]) -> list[str]:
        task, lib, seed = unit
        budget = BUDGET_S[task] * budget_scale
        return [sys.executable, script, "--worker", lib, task, str(budget), str(seed), out_path(unit),
                clock] + (["--quick"] if quick else [])

    def finished(unit: tuple[str, str, int], returncode: int, text: str) -> None:
        out = out_path(unit)
        if returncode == 0 and os.path.exists(out):
            with open(out) as f:
                results[unit] = QualityResult(**json.load(f))
            for line in text.splitlines():
                if line.startswith("  "):
                    log(line)
        else:
            tail = " | ".join(text.strip().splitlines()[-3:])
            results[unit] = QualityResult(unit[1], unit[0], "error",
                                          f"worker exited {returncode}: {tail[-300:]}", seed=unit[2])
            log(f"  {unit[1]} on {unit[0]} (seed {unit[2]}): ERROR {results[unit].message}")

    def started(unit: tuple[str, str, int]) -> None:
        log(f"  start {unit[1]} on {unit[0]}, seed {unit[2]} "
            f"(budget {BUDGET_S[unit[0]] * budget_scale:.1f} s {clock} time)")

    run_subprocesses(units, command, jobs, finished, on_start=started, capture=True, poll_s=0.05)
    return [results[(t, lib, seed)] for t in tasks for lib in libraries for seed in seeds]


def _worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", nargs=6, metavar=("LIB", "TASK", "BUDGET", "SEED", "OUT", "CLOCK"))
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    lib, task, budget, seed, out, clock = a.worker
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    res = train_one(lib, task, float(budget), int(seed), a.quick, clock)
    with open(out, "w") as f:
        json.dump(asdict(res), f)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
