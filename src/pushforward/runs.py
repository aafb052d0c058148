"""Runs: a run directory per training run, and what the command line does with one.

:func:`train_run` loads the data, builds the flow and trains it into ``config.run_dir``;
:func:`eval_run`, :func:`sample_run` and :func:`plot_run` reopen a run and write ``eval.json``, pictures
or curves into it; :func:`demo` chains them. :mod:`pushforward.cli` is a thin argparse layer over these
functions and :mod:`pushforward.compare` builds on them; nothing here parses arguments.

A run directory holds ``config.json``, ``metrics.jsonl`` / ``metrics.csv``, ``best.safetensors``, the
resumable ``checkpoint/`` and what the commands add (``eval.json``, ``samples.png``, ``curves.png``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import plot
from .checkpoint import JSON_FILE, checkpoint_dir, read_state
from .config import (
    TrainConfig,
    check_config,
    config_from_dict,
    context_classes,
    dataset_entry,
    default_run_dir,
    load_toml,
    merge,
    resolve_config,
    resume_changes,
)
from .core import Flow
from .data import dequantize
from .distributed import setup
from .experiment import Dataset, Run, build_flow, load_dataset, n_examples, open_run, quantize, test_budget
from .io import atomic_write
from .nn import classifier_free_guidance
from .objectives import Batch, Objective, default_objective, denoise, select_objective
from .rundir import RUN_DIRS, RUN_FILES, clear_run, last_checkpoint
from .train import History, evaluate, fit, seed_from

__all__ = [
    "DEMO_STEPS",
    "RUN_DIRS",
    "RUN_FILES",
    "calibrate_steps",
    "clear_run",
    "demo",
    "describe_eval",
    "eval_run",
    "evaluate_run",
    "last_checkpoint",
    "plot_run",
    "run_objective",
    "sample_run",
    "say",
    "train_config",
    "train_run",
    "write_eval",
]

def say(*args) -> None:
    """Prints on one process only: rank 0 under ``torchrun`` (``RANK`` unset: a single process)."""
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(*args, flush=True)


# -- train -------------------------------------------------------------------------------------------
def train_config(config_file: str | None = None, overrides: dict | None = None,
                 resume: bool = False) -> TrainConfig:
    """The configuration of a training run: a TOML file and overrides over the data set's defaults.

    The run directory is ``run_dir`` if given, else :func:`~pushforward.config.default_run_dir`
    (``runs/<data>``). With ``resume`` the configuration is the one recorded in that directory's
    checkpoint, with the file's and the overrides' values on top (a longer ``max_steps``, another
    ``max_minutes``); a value that would change what the run trains on or what it trains
    (:data:`~pushforward.config.FIXED_ON_RESUME`: the data, the recipe and model, the seed, the
    splits, the batch size) is an error.
    """
    file_values = load_toml(config_file) if config_file else {}
    if budget := test_budget():  # the README's commands in the test suite: a few steps each
        overrides = {**(overrides or {}), "max_steps": budget, "val_every": max(1, budget // 2),
                     "max_minutes": 0}
    user = merge(file_values, dict(overrides or {}))
    if not resume:
        config = resolve_config(file_values, overrides)
        if not config.run_dir:
            config.run_dir = str(default_run_dir(config))
        return config
    if user.get("run_dir"):
        run_dir = Path(str(user["run_dir"]))
    elif user.get("data"):
        run_dir = default_run_dir(resolve_config(file_values, overrides))
    else:
        raise ValueError("--resume needs the run to continue: --run-dir DIR, or --data NAME for its "
                         "default directory runs/NAME")
    if not (checkpoint_dir(run_dir) / JSON_FILE).exists():
        raise FileNotFoundError(f"cannot resume: {run_dir} holds no checkpoint (start the run with "
                                f"`pushforward train --run-dir {run_dir} ...` first)")
    recorded = config_from_dict(read_state(run_dir)["train_config"])
    config = check_config(config_from_dict(merge(recorded.to_dict(), {**user, "run_dir": str(run_dir)})))
    changes = resume_changes(recorded, config)
    if changes:
        raise ValueError(f"cannot resume {run_dir} with {'; '.join(changes)}: a resumed run keeps its data, "
                         "model, seed, splits and batch size; start a new run in another --run-dir instead")
    return config


def run_objective(config: TrainConfig, model: torch.nn.Module, dataset: Dataset) -> Objective:
    """What a run trains and is scored with: :func:`~pushforward.objectives.default_objective` of the
    model, its training data and ``config.dequantization`` (a VAE's ELBO, a dequantization bound for
    images, else the exact NLL; tables: the bound on their grid columns,
    :func:`~pushforward.data.tabular.table_objective`)."""
    if dataset.kind == "table":
        from .data.tabular import table_objective

        return table_objective(config, dataset, default_objective(model, dataset.train, "uniform"))
    return default_objective(model, dataset.train, config.dequantization)


def train_run(config: TrainConfig, resume: bool = False, overwrite: bool = False,
              callback=None) -> tuple[History, Dataset, torch.nn.Module]:
    """Loads the data, builds the flow and trains it (:func:`~pushforward.train.fit`).

    Returns ``(history, dataset, flow)``.

    Validate, then act: the data are loaded and the model built and checked before anything in
    ``config.run_dir`` changes; ``overwrite`` removes a previous run's files only then, under the run
    directory's lock (:class:`~pushforward.rundir.RunLock`). Without ``resume`` or ``overwrite`` a
    directory that holds a run is an error that says how to continue it.
    """
    run_dir = Path(config.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"--run-dir {run_dir} is a file, not a directory")
    if not resume and not overwrite and (checkpoint_dir(run_dir) / JSON_FILE).exists():
        step = read_state(run_dir).get("step")
        raise FileExistsError(
            f"{run_dir} already holds a run (trained to step {step}); continue it with "
            f"`pushforward train --resume --run-dir {run_dir}`, start it afresh with --overwrite, "
            "or choose another --run-dir")
    dist = setup(config.device)  # under torchrun: join the process group (fit uses it)
    dataset = load_dataset(config)
    flow = build_flow(config, dataset)
    objective = run_objective(config, flow, dataset)
    if dataset.kind == "table" and not resume:  # the Gaussian layer starts at the whole training set's fit
        from .data.tabular import initialize_from_table

        initialize_from_table(flow, dataset.train, objective, seed_from(config.seed, 4))
    objective = select_objective(config.objective, objective)  # flow matching: trained without the ODE
    for note in dataset.info.get("notes", ()):
        say(note)
    n_params = sum(p.numel() for p in flow.parameters())
    say(f"training {config.recipe} ({n_params:,} parameters) on {dataset.name}: "
        f"{n_examples(dataset.train)} train / {n_examples(dataset.val)} val / "
        f"{n_examples(dataset.test)} test examples -> {config.run_dir}")
    history = fit(flow, dataset.train, dataset.val, config, objective=objective, resume=resume,
                  overwrite=overwrite and not resume, callback=callback)
    dist.close()
    return history, dataset, flow


# -- eval ----------------------------------------------------------------------------------------------
def eval_run(path: str | Path, split: str = "test", batch_size: int | None = None,
             checkpoint: bool = False, progress: bool = False) -> dict:
    """Evaluates a run (best weights) on a split and writes ``eval.json`` into the run directory
    (:func:`evaluate_run`, then :func:`write_eval`).

    The result's ``"path"`` is where ``eval.json`` was written.
    """
    result = evaluate_run(path, split, batch_size, checkpoint, progress)
    write_eval(result)
    return result


def write_eval(result: dict) -> Path:
    """Writes a result of :func:`evaluate_run` to its ``"path"`` (the run's ``eval.json``), atomically."""
    target = Path(result["path"])
    text = json.dumps({k: v for k, v in result.items() if k != "path"}, indent=1)
    atomic_write(target, lambda tmp: Path(tmp).write_text(text))
    return target


def evaluate_run(path: str | Path, split: str = "test", batch_size: int | None = None,
                 checkpoint: bool = False, progress: bool = False) -> dict:
    """Evaluates a run (best weights; ``checkpoint``: the last checkpoint) on a split; writes nothing.

    The result's ``"path"`` is where :func:`write_eval` puts it (``RUN/eval.json``); ``progress`` shows
    a progress bar for passes that take more than a few seconds.
    """
    run = open_run(path, checkpoint=checkpoint)
    dataset = load_dataset(run.config)
    data = {"test": dataset.test, "val": dataset.val, "train": dataset.train}[split]
    objective = run_objective(run.config, run.flow, dataset)
    result = evaluate(run.flow, data, batch_size or run.config.eval_batch_size, seed=run.config.seed,
                      device=run.config.device, classes=context_classes(run.config), objective=objective,
                      progress=f"eval {dataset.name} ({split})" if progress else "")
    result = {"data": dataset.name, "split": split, "weights": str(run.weights), **result}
    if dataset.kind == "table":  # the floor: the training rows' full-covariance Gaussian, same objective
        from .data.tabular import gaussian_baseline

        size = batch_size or run.config.eval_batch_size
        result.update(gaussian_baseline(dataset.train, data, objective, size, seed_from(run.config.seed, 4)))
    if dataset.info.get("standardised"):
        # x_std = (x - mean) / std has log|det| = -sum(log std), so log p(x) = log p(x_std) - sum(log std);
        # a dequantized grid column's bound is a code length of its discrete values, the same in any units
        grid = dataset.info.get("grid_steps") if result.get("grid_columns") else None
        log_det = float(sum(math.log(s) for j, s in enumerate(dataset.info["std"])
                            if not (grid and grid[j] > 0)))
        result["space"] = "standardised"
        result["nll_original"] = result["nll"] + log_det
        result["nll_original_stderr"] = result["nll_stderr"]
        result["sum_log_std"] = log_det
        result["note"] = ("nll / nll_stderr: nats per row in the standardised space (training-set mean and "
                          "std), as the MAF/NSF papers report; nll_original: nats per row in the table's own "
                          "units, nll + sum(log std) (the log-likelihood minus the standardisation's "
                          "log-determinant)")
    return {**result, "path": str(run.run_dir / "eval.json")}


def describe_eval(result: dict) -> str:
    """The text ``pushforward eval`` prints for a result of :func:`eval_run`."""
    lines = [f"{result['split']} set of {result['data']}: {result['n']} examples, {result['dims']} dims"]
    if "conditional" in result:
        lines.append(f"  conditional: {result['conditional']}")
    space = " (standardised space)" if result.get("space") == "standardised" else ""
    variational = result.get("dequantization") == "variational"
    bound = " (variational bound: -log p(y) + log q(u|x))" if variational else ""
    if result.get("bound"):  # a VAE (pushforward.vae)
        bound += f" ({result['bound']}: an upper bound on the VAE's NLL; see pushforward compare for IWAE)"
    if result.get("grid_columns"):
        bound += (f" (a bound on the discrete values of {len(result['grid_columns'])} grid column(s), "
                  f"uniform noise of one grid step)")
    lines.append(f"  NLL          {result['nll']:.4f} +- {result['nll_stderr']:.4f} nats{space}{bound}")
    if "gaussian_nll" in result:
        lines.append(f"  Gaussian     {result['gaussian_nll']:.4f} +- {result['gaussian_nll_stderr']:.4f} "
                     f"nats{space} (full-covariance Gaussian of the training rows, same objective: "
                     "the floor)")
    if "nll_original" in result:
        lines.append(f"  NLL          {result['nll_original']:.4f} +- {result['nll_original_stderr']:.4f} "
                     "nats "
                     f"(original units: + sum(log std) = {result['sum_log_std']:+.4f})")
    if "bpd" in result:
        lines.append(f"  bits/dim     {result['bpd']:.4f} +- {result['bpd_stderr']:.4f}  "
                     f"({result['levels']} levels, {result['dequantization']} dequantization)")
    if "uniform_bpd" in result:
        lines.append(f"  bits/dim     {result['uniform_bpd']:.4f} +- {result['uniform_bpd_stderr']:.4f}  "
                     "(same model, uniform dequantization, for reference; "
                     f"E_q[log q] = {result['log_q']:.4f} nats)")
    if "max_reconstruction_error" in result:
        lines.append(f"  max |f^-1(f(x)) - x| = {result['max_reconstruction_error']:.3g}")
    return "\n".join(lines)


# -- sample --------------------------------------------------------------------------------------------
def _one_hot(labels: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels.long(), classes).to(dtype)


def sample_run(path: str | Path, n: int = 64, temperature: float = 1.0, out: str | None = None,
               interpolate: bool = False, seed: int = 0, label: int | None = None,
               guidance: float = 0.0) -> list[Path]:
    """Writes samples of a run: an image grid, or data/samples/density panels for 2-D data.

    A class-conditional run samples ``p(x | label)``: ``n`` samples of ``label``, or, without a
    label, a grid with one row per class (``max(1, n // classes)`` samples each), with classifier-free
    guidance of weight ``guidance`` (:func:`pushforward.nn.classifier_free_guidance`; Transformer flows).
    A run trained with ``noise`` has its image samples denoised by one step along the model's score
    (:func:`pushforward.objectives.denoise`). Samples of a table also go to a CSV file in the table's
    own units.
    """
    run = open_run(path)
    dataset = load_dataset(run.config)
    flow = run.flow
    classes = context_classes(run.config)
    if label is not None and not classes:
        raise ValueError(f"--label needs a class-conditional run (train with --condition label); "
                         f"{path} is not one")
    if label is not None and not 0 <= label < classes:
        raise ValueError(f"--label must lie in [0, {classes - 1}], got {label}")
    if guidance and not classes:
        raise ValueError(f"--guidance needs a class-conditional run (train with --condition label); {path} "
                         "is not one")
    torch.manual_seed(seed)
    written: list[Path] = []
    suffix = "" if temperature == 1.0 else f"_T{temperature:g}"
    if guidance:
        suffix += f"_cfg{guidance:g}"
    if dataset.is_image:
        nrow, what = None, f"{n} samples"
        noise = run.config.noise
        with torch.no_grad(), classifier_free_guidance(flow, guidance):
            if not classes:
                y = _draw(flow, n, None, temperature, noise)
            elif label is not None:
                context = _one_hot(torch.tensor(label), classes, flow.dtype)
                y = _draw(flow, n, context, temperature, noise)
                what, suffix = f"{n} samples of class {label}", f"{suffix}_label{label}"
            else:  # (per_class, classes, C, H, W) -> one row per class
                nrow = max(1, n // classes)
                context = _one_hot(torch.arange(classes), classes, flow.dtype)
                y = _draw(flow, nrow, context, temperature, noise).transpose(0, 1).flatten(0, 1)
                what = f"one row per class 0..{classes - 1}, {nrow} samples each"
        target = Path(out) if out else run.run_dir / f"samples{suffix}.png"
        written.append(plot.save_image_grid(target, quantize(y, int(dataset.levels or 0)), nrow=nrow,
                                            title=f"{dataset.name}: {what}, T={temperature:g}"))
        if interpolate:
            where = Path(out).with_name(Path(out).stem + "_interpolation.png") if out else None
            written.append(_interpolation(run, dataset, where or run.run_dir / "interpolation.png"))
        return written
    with torch.no_grad():
        x = flow.sample(n, temperature=temperature)
    target = Path(out) if out else run.run_dir / f"samples{suffix}.png"
    if dataset.event_shape == (2,):
        written.append(plot.plot_2d(target, x, log_prob=flow.log_prob, dtype=flow.dtype,
                                    data=dataset.test[:n],
                                    title=f"{dataset.name}: data, samples (T={temperature:g}) and density"))
        return written
    written.append(plot.plot_2d(target, x[:, :2], data=dataset.test[:n, :2],
                                title=f"{dataset.name}: first two of {x.shape[1]} dims (standardised)"))
    csv_path = target.with_suffix(".csv")
    info = dataset.info
    if info.get("standardised"):
        x = x * torch.tensor(info["std"]) + torch.tensor(info["mean"])
    header = ",".join(info.get("columns", [f"x{i}" for i in range(x.shape[1])]))
    np.savetxt(csv_path, x.numpy(), delimiter=",", header=header, comments="")
    written.append(csv_path)
    return written


def _draw(flow: Flow, n: int, context: torch.Tensor | None, temperature: float, noise: float) -> torch.Tensor:
    """``flow.sample(n, context, temperature)``, denoised by one step along the model's score for a run
    trained with Gaussian noise (``noise > 0``, :func:`pushforward.objectives.denoise`)."""
    y = flow.sample(n, context=context, temperature=temperature)
    if not noise:
        return y
    event = flow.event_shape
    c = None if context is None else context.expand(*y.shape[: y.dim() - len(event)], context.shape[-1])
    flat = denoise(flow, y.reshape(-1, *event), noise, None if c is None else c.reshape(-1, c.shape[-1]))
    return flat.reshape(y.shape)


def _interpolation(run: Run, dataset: Dataset, target: Path, pairs: int = 4, steps: int = 9) -> Path:
    """Decodes points on straight lines between the latents of test images."""
    flow = run.flow
    k = min(2 * pairs, len(dataset.test.images))
    g = torch.Generator().manual_seed(run.config.seed)
    y = dequantize(dataset.test.images[:k], int(dataset.levels or 0), generator=g).to(flow.dtype)
    classes = context_classes(run.config)
    # a conditional model: each image is encoded with its own label; the path interpolates the labels too
    c = _one_hot(dataset.test.labels[:k], classes, flow.dtype) if classes else None
    with torch.no_grad():
        z, _ = flow.transform(y, flow.embed_context(c))
        rows = []
        for i in range(0, k - 1, 2):
            t = torch.linspace(0, 1, steps, dtype=z.dtype).view(-1, *([1] * (z.dim() - 1)))
            path = (1 - t) * z[i] + t * z[i + 1]
            cp = None if c is None else (1 - t.view(-1, 1)) * c[i] + t.view(-1, 1) * c[i + 1]
            rows.append(flow.transform.inverse(path, flow.embed_context(cp))[0])
    images = quantize(torch.cat(rows), int(dataset.levels or 0))
    return plot.save_image_grid(target, images, nrow=steps, title="latent interpolation between test images")


# -- plot ------------------------------------------------------------------------------------------------
def plot_run(path: str | Path, out: str | None = None) -> Path:
    """Draws a run's training and validation curves from ``metrics.jsonl`` (default ``RUN/curves.png``)."""
    run_dir = Path(path)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return plot.plot_curves(Path(out) if out else run_dir / "curves.png", rows,
                            title=f"training curves: {run_dir.name}")


# -- demo --------------------------------------------------------------------------------------------------
def calibrate_steps(config: TrainConfig, minutes: float, trial_steps: int = 15) -> int:
    """How many optimizer steps of ``config`` fit in ``minutes``, timed on a throwaway copy of the model
    minimising the run's objective (:func:`run_objective`) on its first training batch."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    ds = load_dataset(config)
    model = build_flow(config, ds)
    objective = select_objective(config.objective, run_objective(config, model, ds))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    bs = min(config.batch_size, n_examples(ds.train))
    x = ds.train.images[:bs] if ds.is_image else ds.train[:bs].to(model.dtype)  # the objective dequantizes
    classes = context_classes(config)
    context = _one_hot(ds.train.labels[:bs], classes, model.dtype) if classes else None
    batch = Batch(x, context)
    start = time.monotonic()
    for i in range(trial_steps + 3):
        if i == 3:
            start = time.monotonic()
        loss = objective.loss(model, batch, torch.Generator().manual_seed(seed_from(i))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    per_step = (time.monotonic() - start) / trial_steps
    per_step *= 1.05  # validation and checkpoints
    return max(50, int(60 * minutes / per_step))


#: The demo's training length, in optimizer steps, per kind of data: fixed, so that its result does not
#: depend on the machine's speed (about 3 minutes in all on 2 CPU cores of this project's machine).
DEMO_STEPS = {"toy2d": 6000, "image": 3000}


def demo(out: str | Path = "runs/demo", density: str = "moons", images: str = "digits",
         density_steps: int = DEMO_STEPS["toy2d"], image_steps: int = DEMO_STEPS["image"],
         max_minutes: float = 0.0) -> dict:
    """Trains, evaluates, samples and plots a 2-D density then an image model; returns the results.

    Each model trains for a fixed number of steps (:data:`DEMO_STEPS`), so the figures are the same on
    a fast and a slow machine; the time it took is reported. ``max_minutes`` caps each training (then
    the result depends on the machine, and the summary says so).
    """
    out = Path(out)
    results: dict[str, dict[str, Any]] = {}
    start = time.monotonic()
    plan = [(density, density_steps)] + ([(images, image_steps)] if images else [])
    for data, steps in plan:
        run_dir = out / data
        config = resolve_config({}, {"data": data, "run_dir": str(run_dir), "patience": 0,
                                     "max_steps": test_budget() or steps, "max_minutes": max_minutes})
        config.val_every = max(1, config.max_steps // 20)
        say(f"\n== {data}: {config.max_steps} steps ({config.recipe})")
        t0 = time.monotonic()
        history, dataset, _ = train_run(config, overwrite=True)
        seconds = time.monotonic() - t0
        if history.stop_reason == "time":
            say(f"  note: --max-minutes stopped {data} at step {history.step} of {config.max_steps}: this "
                "result depends on the machine's speed")
        result = eval_run(run_dir)
        say(describe_eval(result))
        files = sample_run(run_dir, n=1000 if dataset.event_shape == (2,) else 64)
        if dataset.is_image:
            files += sample_run(run_dir, n=64, temperature=0.7, interpolate=True)
        files.append(plot_run(run_dir))
        results[data] = {"eval": result, "stop_reason": history.stop_reason, "steps": history.step,
                         "train_seconds": round(seconds, 1), "files": [str(f) for f in files]}
        entropy = dataset_entry(config).entropy
        h = entropy() if entropy is not None else None
        if h is not None:
            results[data]["true_entropy"] = h
            say(f"  (the true density's entropy, the best achievable NLL: {h:.4f} nats)")
    total = time.monotonic() - start
    (out / "summary.json").write_text(json.dumps({**results, "wall_seconds": round(total, 1)}, indent=1))
    say(f"\n== demo results in {out} ({total / 60:.1f} min)")
    for data, r in results.items():
        e = r["eval"]
        score = f"{e['bpd']:.4f} bits/dim" if "bpd" in e else f"{e['nll']:.4f} nats"
        say(f"  {data}: test {score} after {r['steps']} steps ({r['train_seconds']:.0f} s of training)")
        for f in r["files"]:
            say(f"    {f}")
    return results
