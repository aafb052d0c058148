"""The ``pushforward`` command line: ``train``, ``eval``, ``sample``, ``plot`` and ``demo``.

A thin layer over :func:`pushforward.train.fit`, :func:`pushforward.train.evaluate` and
:mod:`pushforward.plot`; run ``pushforward <command> --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from .runtime import tune_allocator

__all__ = ["main"]


def _print(*args) -> None:
    """Prints on one process only: rank 0 under ``torchrun`` (``RANK`` unset: a single process)."""
    import os

    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(*args, flush=True)


# -- train -------------------------------------------------------------------------------------------
def _overrides(args) -> dict:
    from .config import parse_overrides

    values = parse_overrides(args.set)
    for flag, key in (("data", "data"), ("run_dir", "run_dir"), ("max_minutes", "max_minutes"),
                      ("epochs", "epochs"), ("max_steps", "max_steps"), ("seed", "seed"), ("device", "device"),
                      ("recipe", "recipe"), ("condition", "condition"), ("dequantization", "dequantization")):
        value = getattr(args, flag, None)
        if value is not None:
            values[key] = value
    if getattr(args, "no_progress", False):
        values["progress"] = False
    for flag in ("amp", "compile", "checkpoint_grads"):
        if getattr(args, flag, False):
            values[flag] = True
    return values


def _train_config(args):
    from .checkpoint import read_state
    from .config import _merge, config_from_dict, load_toml, resolve_config

    overrides = _overrides(args)
    if args.resume:
        run_dir = overrides.get("run_dir") or (load_toml(args.config).get("run_dir") if args.config else None)
        if not run_dir:
            raise ValueError("--resume needs the run directory: --run-dir DIR")
        values = _merge(read_state(run_dir)["train_config"], overrides)
        values["run_dir"] = str(run_dir)
        return config_from_dict(values)
    config = resolve_config(load_toml(args.config) if args.config else {}, overrides)
    if not config.run_dir:
        config.run_dir = str(config.resolved_run_dir)
    return config


def _clear_run(run_dir: Path) -> None:
    """Removes the files a previous run wrote (and nothing else)."""
    for name in ("checkpoint", ".checkpoint-old"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("best.safetensors", "metrics.jsonl", "metrics.csv", "config.json", "eval.json"):
        (run_dir / name).unlink(missing_ok=True)


def train_run(config, resume: bool = False, overwrite: bool = False, callback=None):
    """Loads the data, builds the flow and calls :func:`~pushforward.train.fit`; returns ``(history, dataset, flow)``."""
    from .distributed import setup
    from .experiment import build_flow, load_dataset
    from .train import fit

    dist = setup(config.device)  # under torchrun: join the process group (fit uses it)
    if overwrite and not resume:
        if dist.is_main:
            _clear_run(Path(config.run_dir))
        dist.barrier()
    dataset = load_dataset(config)
    flow = build_flow(config, dataset)
    n_params = sum(p.numel() for p in flow.parameters())
    _print(f"training {config.recipe} ({n_params:,} parameters) on {dataset.name}: "
           f"{_n(dataset.train)} train / {_n(dataset.val)} val / {_n(dataset.test)} test examples -> {config.run_dir}")
    history = fit(flow, dataset.train, dataset.val, config, resume=resume, callback=callback)
    dist.close()
    return history, dataset, flow


def _n(data) -> int:
    from .experiment import n_examples

    return n_examples(data)


def cmd_train(args) -> int:
    from .train import NonFiniteLossError

    config = _train_config(args)
    try:
        history, _, _ = train_run(config, resume=args.resume, overwrite=args.overwrite)
    except NonFiniteLossError as e:
        _print(f"training stopped: {e}")
        return 1
    run_dir = Path(config.run_dir)
    best = history.best_val_nll
    _print(f"stopped ({history.stop_reason}) at step {history.step}; best validation NLL "
           f"{best:.4f} nats at step {history.best_step}" if best is not None else
           f"stopped ({history.stop_reason}) at step {history.step} before any validation")
    if history.stop_reason == "interrupted":
        _print(f"checkpoint saved in {run_dir / 'checkpoint'}; continue with: "
               f"pushforward train --resume --run-dir {run_dir}")
        return 130
    _print(f"results in {run_dir}; next: pushforward eval {run_dir}")
    return 0


# -- eval ----------------------------------------------------------------------------------------------
def eval_run(path, split: str = "test", batch_size: int | None = None, checkpoint: bool = False) -> dict:
    """Evaluates a run (best weights) on a split and writes ``eval.json`` into the run directory.

    The result's ``"path"`` is where ``eval.json`` was written.
    """
    import math

    from .config import context_classes
    from .experiment import load_dataset, open_run
    from .io import atomic_write
    from .train import evaluate

    run = open_run(path, checkpoint=checkpoint)
    dataset = load_dataset(run.config)
    data = {"test": dataset.test, "val": dataset.val, "train": dataset.train}[split]
    result = evaluate(run.flow, data, batch_size or run.config.eval_batch_size, seed=run.config.seed,
                      device=run.config.device, classes=context_classes(run.config))
    result = {"data": dataset.name, "split": split, "weights": str(run.weights), **result}
    if dataset.info.get("standardised"):
        # x_std = (x - mean) / std has log|det| = -sum(log std), so log p(x) = log p(x_std) - sum(log std)
        log_det = float(sum(math.log(s) for s in dataset.info["std"]))
        result["space"] = "standardised"
        result["nll_original"] = result["nll"] + log_det
        result["nll_original_stderr"] = result["nll_stderr"]
        result["sum_log_std"] = log_det
        result["note"] = ("nll / nll_stderr: nats per row in the standardised space (training-set mean and std), "
                          "as the MAF/NSF papers report; nll_original: nats per row in the table's own units, "
                          "nll + sum(log std) (the log-likelihood minus the standardisation's log-determinant)")
    text = json.dumps(result, indent=1)
    atomic_write(run.run_dir / "eval.json", lambda tmp: Path(tmp).write_text(text))
    return {**result, "path": str(run.run_dir / "eval.json")}


def _describe(result: dict) -> str:
    lines = [f"{result['split']} set of {result['data']}: {result['n']} examples, {result['dims']} dims"]
    if "conditional" in result:
        lines.append(f"  conditional: {result['conditional']}")
    space = " (standardised space)" if result.get("space") == "standardised" else ""
    bound = " (variational bound: -log p(y) + log q(u|x))" if result.get("dequantization") == "variational" else ""
    if result.get("bound"):  # a VAE (pushforward.vae)
        bound += f" ({result['bound']}: an upper bound on the VAE's NLL; see pushforward compare for IWAE)"
    lines.append(f"  NLL          {result['nll']:.4f} +- {result['nll_stderr']:.4f} nats{space}{bound}")
    if "nll_original" in result:
        lines.append(f"  NLL          {result['nll_original']:.4f} +- {result['nll_original_stderr']:.4f} nats "
                     f"(original units: + sum(log std) = {result['sum_log_std']:+.4f})")
    if "bpd" in result:
        lines.append(f"  bits/dim     {result['bpd']:.4f} +- {result['bpd_stderr']:.4f}  ({result['levels']} levels, "
                     f"{result['dequantization']} dequantization)")
    if "uniform_bpd" in result:
        lines.append(f"  bits/dim     {result['uniform_bpd']:.4f} +- {result['uniform_bpd_stderr']:.4f}  "
                     f"(same model, uniform dequantization, for reference; E_q[log q] = {result['log_q']:.4f} nats)")
    if "max_reconstruction_error" in result:
        lines.append(f"  max |f^-1(f(x)) - x| = {result['max_reconstruction_error']:.3g}")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    result = eval_run(args.run, args.split, args.batch_size, args.checkpoint)
    _print(_describe(result))
    _print(f"wrote {result['path']}")
    return 0 if result["finite"] else 1


# -- sample --------------------------------------------------------------------------------------------
def _one_hot(labels: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels.long(), classes).to(dtype)


def sample_run(path, n: int = 64, temperature: float = 1.0, out: str | None = None, interpolate: bool = False,
               seed: int = 0, label: int | None = None) -> list[Path]:
    """Writes samples of a run: an image grid, or data/samples/density panels for 2-D data.

    A class-conditional run samples ``p(x | label)``: ``n`` samples of ``label``, or, without a
    label, a grid with one row per class (``max(1, n // classes)`` samples each).
    """
    from . import plot
    from .config import context_classes
    from .experiment import load_dataset, open_run, quantize

    run = open_run(path)
    dataset = load_dataset(run.config)
    flow = run.flow
    classes = context_classes(run.config)
    if label is not None and not classes:
        raise ValueError(f"--label needs a class-conditional run (train with --condition label); {path} is not one")
    if label is not None and not 0 <= label < classes:
        raise ValueError(f"--label must lie in [0, {classes - 1}], got {label}")
    torch.manual_seed(seed)
    written: list[Path] = []
    suffix = "" if temperature == 1.0 else f"_T{temperature:g}"
    if dataset.is_image:
        nrow, what = None, f"{n} samples"
        with torch.no_grad():
            if not classes:
                y = flow.sample(n, temperature=temperature)
            elif label is not None:
                y = flow.sample(n, context=_one_hot(torch.tensor(label), classes, flow.dtype), temperature=temperature)
                what, suffix = f"{n} samples of class {label}", f"{suffix}_label{label}"
            else:  # (per_class, classes, C, H, W) -> one row per class
                nrow = max(1, n // classes)
                context = _one_hot(torch.arange(classes), classes, flow.dtype)
                y = flow.sample(nrow, context=context, temperature=temperature).transpose(0, 1).flatten(0, 1)
                what = f"one row per class 0..{classes - 1}, {nrow} samples each"
        target = Path(out) if out else run.run_dir / f"samples{suffix}.png"
        written.append(plot.save_image_grid(target, quantize(y, dataset.levels), nrow=nrow,
                                            title=f"{dataset.name}: {what}, T={temperature:g}"))
        if interpolate:
            written.append(_interpolation(run, dataset, Path(out).with_name(Path(out).stem + "_interpolation.png")
                                          if out else run.run_dir / "interpolation.png"))
        return written
    with torch.no_grad():
        x = flow.sample(n, temperature=temperature)
    if dataset.event_shape == (2,):
        target = Path(out) if out else run.run_dir / f"samples{suffix}.png"
        written.append(plot.plot_2d(target, x, flow=flow, data=dataset.test[:n],
                                    title=f"{dataset.name}: data, samples (T={temperature:g}) and density"))
        return written
    target = Path(out) if out else run.run_dir / f"samples{suffix}.png"
    written.append(plot.plot_2d(target, x[:, :2], data=dataset.test[:n, :2],
                                title=f"{dataset.name}: first two of {x.shape[1]} dims (standardised)"))
    csv_path = target.with_suffix(".csv")
    info = dataset.info
    if info.get("standardised"):
        x = x * torch.tensor(info["std"]) + torch.tensor(info["mean"])
    header = ",".join(info.get("columns", [f"x{i}" for i in range(x.shape[1])]))
    import numpy as np

    np.savetxt(csv_path, x.numpy(), delimiter=",", header=header, comments="")
    written.append(csv_path)
    return written


def _interpolation(run, dataset, target: Path, pairs: int = 4, steps: int = 9) -> Path:
    """Decodes points on straight lines between the latents of test images."""
    from . import plot
    from .config import context_classes
    from .data import dequantize
    from .experiment import quantize

    flow = run.flow
    k = min(2 * pairs, len(dataset.test.images))
    g = torch.Generator().manual_seed(run.config.seed)
    y = dequantize(dataset.test.images[:k], dataset.levels, generator=g).to(flow.dtype)
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
    images = quantize(torch.cat(rows), dataset.levels)
    return plot.save_image_grid(target, images, nrow=steps, title="latent interpolation between test images")


def cmd_sample(args) -> int:
    for path in sample_run(args.run, args.n, args.temperature, args.out, args.interpolate, args.seed, args.label):
        _print(f"wrote {path}")
    return 0


# -- plot ------------------------------------------------------------------------------------------------
def plot_run(path, out: str | None = None) -> Path:
    from .plot import plot_curves

    run_dir = Path(path)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return plot_curves(Path(out) if out else run_dir / "curves.png", rows, title=f"training curves: {run_dir.name}")


def cmd_plot(args) -> int:
    _print(f"wrote {plot_run(args.run, args.out)}")
    return 0


# -- demo --------------------------------------------------------------------------------------------------
def calibrate_steps(config, minutes: float, trial_steps: int = 15) -> int:
    """How many optimizer steps of ``config`` fit in ``minutes`` (timed on a throwaway copy of the model)."""
    from .experiment import build_flow, load_dataset
    from .train import _Data, seed_from

    if config.threads > 0:
        torch.set_num_threads(config.threads)
    ds = load_dataset(config)
    flow = build_flow(config, ds)
    data = _Data(ds.train)
    opt = torch.optim.Adam(flow.parameters(), lr=config.lr)
    bs = min(config.batch_size, data.n)
    idx = torch.arange(bs)
    start = None
    for i in range(trial_steps + 3):
        if i == 3:
            start = time.monotonic()
        x = data.get(idx, seed_from(i), flow.dtype)
        loss = -flow.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    per_step = (time.monotonic() - start) / trial_steps
    per_step *= 1.05  # validation and checkpoints
    return max(50, int(60 * minutes / per_step))


def demo(out: str | Path = "runs/demo", minutes: float = 3.0, density: str = "moons",
         images: str = "digits") -> dict:
    """Trains, evaluates, samples and plots a 2-D density then an image model; returns the results."""
    from .config import resolve_config

    out = Path(out)
    results = {}
    plan = [(density, 0.4 * minutes), (images, 0.6 * minutes)] if images else [(density, minutes)]
    for data, budget in plan:
        run_dir = out / data
        _clear_run(run_dir)
        config = resolve_config({}, {"data": data, "run_dir": str(run_dir)})
        config.max_steps = calibrate_steps(config, budget * 0.9)
        config.max_minutes = budget
        config.patience = 0
        config.val_every = max(1, config.max_steps // 20)
        _print(f"\n== {data}: about {budget:.1f} min, {config.max_steps} steps ({config.recipe})")
        history, dataset, _ = train_run(config)
        result = eval_run(run_dir)
        _print(_describe(result))
        files = sample_run(run_dir, n=1000 if dataset.event_shape == (2,) else 64)
        if dataset.is_image:
            files += sample_run(run_dir, n=64, temperature=0.7, interpolate=True)
        files.append(plot_run(run_dir))
        results[data] = {"eval": result, "stop_reason": history.stop_reason, "steps": history.step,
                         "files": [str(f) for f in files]}
        if dataset.kind == "toy":
            from .data.toy import toy_entropy

            h = toy_entropy(data)
            if h is not None:
                results[data]["true_entropy"] = h
                _print(f"  (the true density's entropy, the best achievable NLL: {h:.4f} nats)")
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    _print(f"\n== demo results in {out}")
    for data, r in results.items():
        e = r["eval"]
        score = f"{e['bpd']:.4f} bits/dim" if "bpd" in e else f"{e['nll']:.4f} nats"
        _print(f"  {data}: test {score} after {r['steps']} steps")
        for f in r["files"]:
            _print(f"    {f}")
    return results


def cmd_demo(args) -> int:
    results = demo(args.out, args.minutes, args.density, args.images)
    return 0 if all(r["eval"]["finite"] for r in results.values()) else 1


# -- parser --------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pushforward", description="Train, evaluate and sample normalizing flows.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a flow (exact maximum likelihood)",
                       description="Train a flow by exact maximum likelihood. Several processes (DDP): "
                                   "torchrun --nproc-per-node N -m pushforward train ... (batch_size is the global "
                                   "batch; see docs/scaling.md).")
    t.add_argument("--config", help="TOML file with TrainConfig keys ([model] table: recipe kwargs)")
    t.add_argument("--data", help="moons|8gaussians|checkerboard|...|digits|fashion-mnist|path/to/table.csv")
    t.add_argument("--run-dir", dest="run_dir", help="run directory (default runs/<data>)")
    t.add_argument("--resume", action="store_true", help="continue the checkpoint in --run-dir")
    t.add_argument("--overwrite", action="store_true", help="delete a previous run's files in --run-dir first")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    t.add_argument("--max-minutes", dest="max_minutes", type=float, help="wall-clock budget")
    t.add_argument("--epochs", type=int)
    t.add_argument("--max-steps", dest="max_steps", type=int)
    t.add_argument("--recipe", help="nice|realnvp|realnvp_image|glow|...")
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="auto|cpu|cuda|cuda:N|mps (auto: cuda if available, else cpu; "
                   "under torchrun auto/cuda mean cuda:LOCAL_RANK)")
    t.add_argument("--amp", action="store_true",
                   help="bf16 autocast in the conditioner networks (log-dets and loss stay float32); for GPUs")
    t.add_argument("--compile", action="store_true", help="train through torch.compile (after ActNorm's eager init)")
    t.add_argument("--checkpoint-grads", dest="checkpoint_grads", action="store_true",
                   help="gradient checkpointing: recompute each layer in the backward pass (less memory)")
    t.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    t.add_argument("--condition", choices=("label",),
                   help="label: a class-conditional image model p(x | label), the one-hot label as context")
    t.add_argument("--dequantization", choices=("uniform", "variational"),
                   help="images: uniform noise (default) or a variational dequantizer q(u | x) trained jointly "
                        "(--set dequantizer.layers=4 --set dequantizer.hidden_channels=32)")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="test NLL / bits-per-dim and reconstruction error; writes eval.json")
    e.add_argument("run", help="run directory, checkpoint directory or .safetensors file")
    e.add_argument("--split", default="test", choices=("test", "val", "train"))
    e.add_argument("--batch-size", dest="batch_size", type=int)
    e.add_argument("--checkpoint", action="store_true", help="use the last checkpoint instead of the best weights")
    e.set_defaults(fn=cmd_eval)

    s = sub.add_parser("sample", help="image grid, or 2-D samples and density map, as PNG")
    s.add_argument("run")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--out", help="PNG path (default RUN/samples.png)")
    s.add_argument("--interpolate", action="store_true", help="also a latent interpolation between test images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--label", type=int,
                   help="class-conditional runs: sample this class (default: one row per class)")
    s.set_defaults(fn=cmd_sample)

    c = sub.add_parser("plot", help="training curves to PNG")
    c.add_argument("run")
    c.add_argument("--out")
    c.set_defaults(fn=cmd_plot)

    d = sub.add_parser("demo", help="train, evaluate and plot a 2-D density and a digits model end to end")
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    d.add_argument("--minutes", type=float, default=3.0, help="total training time")
    d.add_argument("--density", default="moons", help="2-D toy density")
    d.add_argument("--images", default="digits", help="image data set ('' to skip)")
    d.set_defaults(fn=cmd_demo)

    from .compare import add_parser as add_compare_parser

    add_compare_parser(sub)  # pushforward compare: flow vs VAE (pushforward.compare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    tune_allocator()  # reuse freed memory instead of page-faulting fresh pages every step (see runtime.py)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"pushforward {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        _print("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
