"""Real tables at default settings (issue 16): pushforward's default vs the Gaussian and zuko's NSF and MAF.

Tables: ten UCI tables from Debian's ``r-cran-mlbench`` (``scripts/fetch_tables.sh`` downloads and
extracts them, outside git; read with the ``rdata`` package) and scikit-learn's wine and diabetes.
Numeric columns only (factors such as the class label are dropped). Every table goes through the same
path as ``pushforward train --data table.csv``: a seeded 80/10/10 split, training-set standardisation,
constant columns dropped, columns on a grid dequantized (uniform noise of one grid step; the reported
NLL is then a bound on the discrete values, the same bookkeeping for every method).

Methods, each at the same CPU budget per table (``--budget`` seconds of one thread):

- ``pushforward``: the ``table`` entry's defaults (recipe ``tabular``: autoregressive splines and the
  full-covariance Gaussian, which the untrained flow equals; steps sized to the table), with
  ``max_steps`` capped to what fits the budget;
- ``gaussian``: the full-covariance Gaussian fitted to the training rows (closed form, no budget);
- ``zuko-nsf`` / ``zuko-maf``: ``zuko.flows.NSF(D)`` / ``zuko.flows.MAF(D)`` with their documented
  defaults (3 transforms, hidden (64, 64)), trained by the same loop with the same settings as
  pushforward (Adam, lr 1e-3, batch 256, warm-up and cosine, the table's L2 penalty, validation, early
  stopping, best weights restored), their steps capped to the budget.

The budget is CPU time of the worker process (one thread), so a loaded machine does not change who gets
how many steps: each trained method times 20 of its own optimizer steps and one validation pass on a
copy of its model (``time.process_time``) and gets ``max_steps = (0.9 budget - 40 validations) / step``
(at most the table's sized ``max_steps``), validating every ``max_steps // 40`` steps; the wall clock is
only a safety net (4x the budget). pushforward's CPU also pays its run directory (checkpoints, metrics).

Test NLL in nats per row in the standardised space, +- the standard error over the test rows.

Tables of fewer than ``--few`` rows (1,000) can run with ``--seeds K``: each seed its own split,
initialisation and noise; the figure is then the mean over the seeds (their test sets of 20 to 100 rows
make one split's figure move by several nats between splits).

    python bench/tables.py --data-dir DIR --budget 30 --workers 2 --seeds 3 [--tables wine,Glass] [--write]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

MLBENCH = (
    "LetterRecognition",
    "Shuttle",
    "Satellite",
    "Vehicle",
    "Sonar",
    "Ionosphere",
    "Glass",
    "BostonHousing",
    "PimaIndiansDiabetes",
    "Vowel",
)
SKLEARN = ("wine", "diabetes")
METHODS = ("pushforward", "gaussian", "zuko-nsf", "zuko-maf")
RDA_SUBDIR = "x/usr/lib/R/site-library/mlbench/data"
DEFAULT_DIR = os.environ.get("PUSHFORWARD_TABLES", str(Path.home() / ".cache" / "pushforward" / "tables"))


def _need(module: str, hint: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"bench/tables.py needs {module!r}: {hint}") from None


def load_table(name: str, data_dir: str) -> tuple[np.ndarray, list[str]]:
    """The numeric columns of one table, ``(N, D)`` float64, and their names."""
    if name in SKLEARN:
        datasets = _need("sklearn.datasets", "pip install scikit-learn (in the dev extras)")
        if name == "wine":
            bunch = datasets.load_wine()
            return np.asarray(bunch.data, float), list(bunch.feature_names)
        bunch = datasets.load_diabetes(scaled=False)
        return np.c_[bunch.data, bunch.target].astype(float), [*bunch.feature_names, "target"]
    rdata = _need("rdata", "pip install -e '.[bench]' (or pip install rdata)")
    root = Path(data_dir)
    path = next((p for p in (root / RDA_SUBDIR / f"{name}.rda", root / f"{name}.rda") if p.exists()), None)
    if path is None:
        raise SystemExit(
            f"no {name}.rda under {root}: run scripts/fetch_tables.sh {root} (apt-get download "
            "r-cran-mlbench; dpkg -x), or pass --data-dir"
        )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown encoding. Assumed ASCII."
        frame = next(iter(rdata.read_rda(str(path)).values()))
    numeric = frame.select_dtypes(include="number")
    return numeric.to_numpy(dtype=float), [str(c) for c in numeric.columns]


def _config(csv: Path, run_dir: Path, seed: int = 0):
    """The ``table`` entry's defaults for ``csv`` (``load_dataset`` fills in those sized to the table);
    ``seed`` seeds the split, the initialisation, the shuffling and the dequantization noise."""
    from pushforward.runs import train_config

    overrides = {"data": str(csv), "run_dir": str(run_dir), "progress": False, "threads": 1, "seed": seed}
    return train_config(overrides=overrides)


def _cpu_per_step(model, objective, dataset, batch_size: int, eval_batch_size: int) -> tuple[float, float]:
    """CPU seconds (this process, one thread) of one optimizer step and of one validation pass, timed on a
    throwaway copy of the model (20 steps after 3 of warm-up)."""
    import copy

    import torch

    from pushforward.objectives import Batch

    model = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = dataset.train[: min(batch_size, len(dataset.train))]
    t0 = time.process_time()
    for i in range(23):
        if i == 3:
            t0 = time.process_time()
        loss = objective.loss(model, Batch(x), torch.Generator().manual_seed(i)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    per_step = (time.process_time() - t0) / 20
    t0 = time.process_time()
    with torch.no_grad():
        for chunk in dataset.val.split(eval_batch_size):
            objective.loss(model, Batch(chunk), torch.Generator().manual_seed(0))
    return per_step, time.process_time() - t0


def _fit_budget(config, model, objective, dataset, budget: float) -> None:
    """Caps ``config.max_steps`` to what fits ``budget`` CPU seconds with 40 validations (the same rule for
    every trained method: the schedule then completes within the budget), validation every
    ``max_steps // 40`` steps; the wall clock (``max_minutes``) is only a safety net at 4x the budget."""
    per_step, per_val = _cpu_per_step(model, objective, dataset, config.batch_size, config.eval_batch_size)
    fits = int((0.9 * budget - 40 * per_val) / per_step)
    config.max_steps = max(50, min(config.max_steps, fits))
    config.val_every = max(5, min(config.val_every, config.max_steps // 40))
    config.max_minutes = 4 * budget / 60


class _Zuko:
    """A zuko flow as a model with ``log_prob(x, context)`` (what pushforward's objectives call)."""

    def __new__(cls, flow):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self, flow):
                super().__init__()
                self.flow = flow

            def log_prob(self, x, context=None):
                return self.flow().log_prob(x)

        return Wrapped(flow)


def _trained(result: dict, history) -> dict:
    """The row entries of a trained method: test NLL +- s.e. and how its training ended."""
    return {"nll": result["nll"], "stderr": result["nll_stderr"], "steps": history.step,
            "best_step": history.best_step, "stop": history.stop_reason}


def run_one(job: tuple[str, str, str, float, str, int]) -> dict:
    """Trains and scores one method on one table with one seed; returns its figures."""
    name, method, data_dir, budget, work, seed = job
    import torch

    torch.set_num_threads(1)
    import warnings

    warnings.simplefilter("ignore")
    from pushforward.data.tabular import gaussian_baseline, table_objective
    from pushforward.experiment import build_flow, load_dataset
    from pushforward.runs import eval_run, run_objective, train_run
    from pushforward.train import evaluate, fit

    table, columns = load_table(name, data_dir)
    folder = Path(work) / name
    folder.mkdir(parents=True, exist_ok=True)
    csv = folder / f"{name}.csv"
    if not csv.exists():
        tmp = csv.with_suffix(f".{method}.{seed}.{os.getpid()}.tmp")
        np.savetxt(
            tmp, table, delimiter=",", header=",".join(c.replace(",", "_") for c in columns), comments=""
        )
        os.replace(tmp, csv)
    start = time.process_time()
    row: dict = {"table": name, "method": method, "rows": int(table.shape[0]), "seed": seed}
    config = _config(csv, folder / f"{method}-{seed}", seed)
    dataset = load_dataset(config)  # fills in the settings sized to the table
    if method == "pushforward":
        model = build_flow(config, dataset)
        _fit_budget(config, model, run_objective(config, model, dataset), dataset, budget)
        history, dataset, _ = train_run(config, overwrite=True)
        row.update(_trained(eval_run(folder / f"{method}-{seed}"), history))
    else:
        objective = table_objective(config, dataset)
        if method == "gaussian":
            figures = gaussian_baseline(
                dataset.train, dataset.test, objective, config.eval_batch_size, config.seed
            )
            row.update(nll=figures["gaussian_nll"], stderr=figures["gaussian_nll_stderr"], steps=0)
        else:
            zuko = _need("zuko", "pip install -e '.[bench]' (zuko==1.6.0)")
            d = dataset.event_shape[0]
            torch.manual_seed(config.seed)
            model = _Zuko(zuko.flows.NSF(d) if method == "zuko-nsf" else zuko.flows.MAF(d))
            _fit_budget(config, model, objective, dataset, budget)  # times a copy: model stays untrained
            config.run_dir = ""
            history = fit(model, dataset.train, dataset.val, config, objective=objective)
            result = evaluate(
                model,
                dataset.test,
                config.eval_batch_size,
                seed=config.seed,
                device="cpu",
                reconstruction=False,
                objective=objective,
            )
            row.update(_trained(result, history))
    row["cpu_s"] = round(time.process_time() - start, 1)
    row["grid_columns"] = len(
        dataset.info.get("grid_columns", []) or [h for h in dataset.info.get("grid_steps", []) if h > 0]
    )
    row["dims"] = int(dataset.event_shape[0])
    row["dropped"] = dataset.info.get("dropped", [])
    return row


def _mean_se(values: list[float]) -> tuple[float, float]:
    """The mean of ``values`` and its standard error from their spread (``K >= 2``)."""
    k = len(values)
    mean = sum(values) / k
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1) / k)


def pooled(rows: list[dict]) -> list[dict]:
    """One row per (table, method). One seed: its test NLL +- the s.e. over its test rows. Several seeds
    (each its own split, initialisation and noise): the mean over the seeds +- the s.e. of that mean from
    the seeds' spread (which holds the test rows' noise, the split's and the training's), and the mean
    steps."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["table"], r["method"]), []).append(r)
    out = []
    for runs in groups.values():
        runs = sorted(runs, key=lambda r: r.get("seed", 0))
        k = len(runs)
        nll, stderr = _mean_se([r["nll"] for r in runs]) if k > 1 else (runs[0]["nll"], runs[0]["stderr"])
        out.append({**runs[0], "nll": nll, "stderr": stderr, "seeds": k,
                    "steps": round(sum(r["steps"] for r in runs) / k),
                    "per_seed": [r["nll"] for r in runs]})
    return out


def _difference(a: dict, b: dict) -> tuple[float, float]:
    """``a - b`` in test NLL and its s.e.: paired over the seeds when both ran several (the same splits),
    else from the two rows' s.e."""
    if a["seeds"] > 1 and len(a["per_seed"]) == len(b["per_seed"]):
        return _mean_se([x - y for x, y in zip(a["per_seed"], b["per_seed"], strict=True)])
    return a["nll"] - b["nll"], math.hypot(a["stderr"], b["stderr"])


def _sized_description() -> str:
    """What ``sized_defaults`` chooses for a small, a middle-sized and a large table, read from it (so
    the text cannot drift from the code)."""
    from pushforward.data.tabular import sized_defaults

    parts = []
    for label, rows in (("500 training rows", 500), ("5,000", 5_000), ("50,000", 50_000)):
        s = sized_defaults(rows, 10)
        m = s["model"]
        parts.append(f"{label}: {m['layers']} spline layers of hidden width {m['hidden'][0]}, the Gaussian "
                     f"layer at the {'latent' if m['gaussian_at'] == 'end' else 'data'} end, L2 penalty "
                     f"{s['weight_decay']:g}")
    return "; ".join(parts)


def markdown(rows: list[dict], command: str) -> str:
    """The BENCHMARKS.md section: one line per table, NLL +- s.e. per method (pooled over seeds), and the
    targets."""
    rows = pooled(rows)
    by = {(r["table"], r["method"]): r for r in rows}
    tables = list(dict.fromkeys(r["table"] for r in rows))
    lines = [
        "## Real tables at default settings (issue 16)",
        "",
        f"Command: {command}",
        "",
        "Test NLL, nats per row in the standardised space (training mean and std), +- the standard error "
        "over the test rows; lower is better. Tables with grid columns (`grid`) report the bound on their "
        "discrete values (uniform noise of one grid step, log-volume counted), the same for every method. "
        "The same seeded 80/10/10 split for every method and the same CPU budget per trained method (one "
        "thread). Where a table ran with several seeds (`seeds`: each seed its own split, initialisation "
        "and noise; every method sees the same splits), the figure is the mean over the seeds +- the s.e. "
        "of that mean from the seeds' spread, and the differences are paired over the seeds (mean +- s.e. "
        "of the per-seed differences). A win is decided on the means; `(< 1 s.e.)` marks a difference "
        "smaller than its s.e.",
        "",
        "| table | rows x D | grid | seeds | " + " | ".join(METHODS) + " | pf - gauss | pf - best zuko |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in METHODS) + " | --- | --- |",
    ]
    met = {"floor": 0, "big": [0, 0], "zuko": [0, 0]}
    close = 0
    for t in tables:
        cells = []
        for m in METHODS:
            r = by.get((t, m))
            cells.append(f"{r['nll']:.3f} +- {r['stderr']:.3f}" if r else "-")
        pf, ga = by.get((t, "pushforward")), by.get((t, "gaussian"))
        zs = [
            by[(t, m)] for m in ("zuko-nsf", "zuko-maf") if (t, m) in by and math.isfinite(by[(t, m)]["nll"])
        ]
        zb = min(zs, key=lambda r: r["nll"]) if zs else None
        any_row = pf or ga
        d_g = "{:+.3f} +- {:.3f}".format(*_difference(pf, ga)) if pf and ga else "-"
        d_z = "-"
        if pf and zb:
            diff, se = _difference(pf, zb)
            d_z = f"{diff:+.3f} +- {se:.3f}" + (" (< 1 s.e.)" if abs(diff) < se else "")
            close += abs(diff) < se
        if pf and ga:
            met["floor"] += pf["nll"] <= ga["nll"] + pf["stderr"]
            if pf["rows"] >= 1000:
                met["big"][0] += pf["nll"] < ga["nll"]
                met["big"][1] += 1
        if pf and zb:
            met["zuko"][0] += pf["nll"] < zb["nll"]
            met["zuko"][1] += 1
        shape = f"{any_row['rows']} x {any_row['dims']}" if any_row else "-"
        grid = str(any_row["grid_columns"]) if any_row else "-"
        k = max((by[(t, m)]["seeds"] for m in METHODS if (t, m) in by), default=1)
        lines.append(f"| {t} | {shape} | {grid} | {k} | " + " | ".join(cells) + f" | {d_g} | {d_z} |")
    n = len(tables)
    floor_ok, big_ok = met["floor"] == n, met["big"][0] == met["big"][1]
    need = math.ceil(0.75 * met["zuko"][1])
    lines += [
        "",
        f"Targets: {'met' if floor_ok else 'missed'}, never worse than the Gaussian by more than one s.e. "
        f"({met['floor']}/{n}); {'met' if big_ok else 'missed'}, better than the Gaussian on every table "
        f"with >= 1,000 rows ({met['big'][0]}/{met['big'][1]}); "
        f"{'met' if met['zuko'][0] >= need else 'missed'}, better than zuko's better model on at least 3 "
        f"of every 4 tables ({met['zuko'][0]}/{met['zuko'][1]}, {need} needed; on {close} of the "
        f"{met['zuko'][1]} tables the difference is smaller than its s.e., so that count would move "
        "between runs); the NLL is a bound on the discrete values of every table with grid columns.",
        "",
        "The budget is CPU seconds of each worker process (`time.process_time`): every trained method "
        "times 20 of its own optimizer steps and one validation pass, then gets `max_steps = (0.9 x "
        "budget - 40 validations) / step` steps, capped at the table's sized `max_steps`; the wall clock "
        "is only a safety net, at 4x the budget. A step's CPU time grows when other processes share the "
        "cores (caches, memory bandwidth), so the step counts move between runs on a shared machine: "
        "LetterRecognition's went from 1,266 to 704 between two runs. zuko's NSF and MAF are trained by the "
        "same loop with the same settings as pushforward, the table's L2 penalty included. "
        "pushforward's model is the `table` entry's default, `tabular`, sized by the number of training "
        f"rows (`pushforward.data.tabular.sized_defaults`): {_sized_description()}; the conditioners "
        "read soft-clipped inputs (`4 tanh(x / 4)`) and the Gaussian layer starts at the Ledoit-Wolf "
        "shrunk covariance, so the untrained flow is that Gaussian; the starting weights are a candidate "
        "for the best ones (`val_at_start`). The `gaussian` column is the maximum-likelihood Gaussian, "
        "without shrinkage.",
    ]
    steps = ", ".join(f"{r['table']} {r['steps']}" for r in rows if r["method"] == "pushforward")
    lines += ["", f"pushforward's optimizer steps within the budget (mean over seeds): {steps}."]
    spread = [f"{t}: " + "; ".join(f"{m} " + ", ".join(f"{v:.2f}" for v in by[(t, m)]["per_seed"])
                                   for m in METHODS if (t, m) in by and m != "gaussian")
              for t in tables if max(by[(t, m)]["seeds"] for m in METHODS if (t, m) in by) > 1]
    if spread:
        lines += ["", "Per seed (test NLL of each seed's split, seeds 0, 1, ...): " + ". ".join(spread) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default=DEFAULT_DIR, help="where scripts/fetch_tables.sh extracted mlbench"
    )
    parser.add_argument("--tables", default=",".join(MLBENCH + SKLEARN))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budget", type=float, default=30.0, help="CPU seconds per trained method and table")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=1,
                        help="seeds (each its own split, initialisation and noise) for the tables of fewer "
                        "than --few rows, whose test sets of 20 to 100 rows make one split's figure noisy")
    parser.add_argument("--few", type=int, default=1000, help="row count below which --seeds applies")
    parser.add_argument("--out", default="", help="write the rows as JSON lines here")
    parser.add_argument("--write", action="store_true", help="replace the tables section of BENCHMARKS.md")
    parser.add_argument("--rows", default="", help="train nothing: render the JSON lines of an earlier --out")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.common import library_revision, write_section

    if args.rows:
        rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]
        text = markdown(rows, Path(args.rows).with_suffix(".command").read_text().strip())
        print(text)
        if args.write:
            write_section("tables", text)
        return
    tables, methods = args.tables.split(","), args.methods.split(",")
    unknown = sorted(set(tables) - set(MLBENCH + SKLEARN)) + sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown table(s)/method(s): {', '.join(unknown)}")
    if "zuko-nsf" in methods or "zuko-maf" in methods:
        _need("zuko", "pip install -e '.[bench]' (zuko==1.6.0)")
    # read every table once up front: missing data fails before anything trains, and sizes pick the seeds
    sizes = {t: len(load_table(t, args.data_dir)[0]) for t in tables}
    rows = []
    with tempfile.TemporaryDirectory(prefix="pf-tables-") as work:
        jobs = [(t, m, args.data_dir, args.budget, work, seed) for t in tables
                for seed in range(args.seeds if sizes[t] < args.few else 1) for m in methods]
        with ProcessPoolExecutor(args.workers) as pool:
            for row in pool.map(run_one, jobs):
                print(json.dumps(row), flush=True)
                rows.append(row)
                if args.out:
                    with open(args.out, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
    command = "python " + " ".join(["bench/tables.py", *(argv if argv is not None else sys.argv[1:])])
    command = f"`{command}` (library at {library_revision()}, {time.strftime('%Y-%m-%d')})"
    if args.out:  # what --rows renders the rows with
        Path(args.out).with_suffix(".command").write_text(command + "\n")
    text = markdown(rows, command)
    print(text)
    if args.write:
        write_section("tables", text)


if __name__ == "__main__":
    main()
