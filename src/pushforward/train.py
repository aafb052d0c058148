"""Exact maximum-likelihood training: :func:`fit` and :func:`evaluate`.

``fit`` minimises the mean negative log-likelihood per dimension with Adam, a linear warm-up then
a cosine-decaying learning rate, and gradient-norm clipping. It validates every epoch (or every
``val_every`` steps), keeps the best validation weights (``best.safetensors``), stops early after
``patience`` validations without improvement, appends one metrics row per validation to
``metrics.jsonl`` / ``metrics.csv``, and writes a resumable checkpoint (see
:mod:`pushforward.checkpoint`) after every validation, on Ctrl-C and when the time budget runs out.

Data-dependent layers (ActNorm) that are not yet initialised are initialised from the first
training batch (:func:`pushforward.initialize`) before anything else evaluates the flow; layers
already initialised -- a resumed run, a loaded flow, or your own ``pushforward.initialize`` -- are
kept, so a resumed run never re-initialises.

Reproducibility: the data order of epoch ``e`` is a permutation seeded from ``(seed, e)`` and the
dequantization noise of each batch from ``(seed, e, batch)``, so a resumed run continues exactly
where it stopped and ends with the same weights as an uninterrupted one.

Images (``ImageData``: integer pixels with ``levels`` grey levels) are dequantized afresh for each
epoch, ``y = (x + u) / levels``, and validated with noise from a fixed seed; their losses are also
reported in bits/dim (:func:`pushforward.metrics.bits_per_dim`).

With ``config.dequantization = "variational"`` the flow carries a dequantizer ``q(u | x)``
(:func:`pushforward.models.dequantized`); the loss is then the bound ``-log p(y) + log q(u | x)``
with ``u ~ q(u | x)`` (one sample per image, seeded like the uniform noise), the same optimizer
trains both, and the bits/dim formula is unchanged. With ``config.condition = "label"`` the one-hot
label is passed as ``context``: the model is ``p(x | label)``.

Several processes: under ``torchrun --nproc-per-node N -m pushforward train ...`` (see
``docs/scaling.md``) ``fit`` joins the process group (NCCL on CUDA, gloo on the CPU; see
:mod:`pushforward.distributed`) and trains with ``DistributedDataParallel``. ``batch_size`` is the
**global** batch (it must be divisible by the number of processes): every rank draws the same
permutation and the same dequantization noise for the global batch and takes its contiguous
``batch_size / N`` slice, so the averaged gradient is that of the one-process run on the same batch.
Losses and validation NLLs are summed over the ranks, so the decisions (early stopping, the
best weights, Ctrl-C, the time budget) are the same on every rank; rank 0 alone writes the run
directory (checkpoints hold nothing rank-specific, so a run resumes under any number of processes
that divides the batch) and shows the progress bar. The variational dequantizer's noise is drawn
per rank (seeded by the batch and the rank), so with it the runs with 1 and N processes are
equally good but not identical. ``config.amp`` (bf16 autocast in the conditioner networks),
``config.compile`` (``torch.compile`` of the log-density) and ``config.checkpoint_grads``
(recompute activations in the backward pass) also come from :class:`pushforward.distributed.LossStep`.
"""

from __future__ import annotations

import contextlib
import csv
import io as _io
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
from .config import TrainConfig, config_from_dict, context_classes
from .core import Flow
from .distributed import Distributed, LossStep
from .distributed import resolve_device as _resolve_device
from .distributed import setup as setup_distributed
from .initialization import data_dependent, initialize_layers
from .io import atomic_write, save

__all__ = [
    "History",
    "NonFiniteLossError",
    "evaluate",
    "fit",
    "lr_at",
    "negative_log_likelihood",
    "resolve_device",
    "variational_negative_log_likelihood",
]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss (or gradient); no checkpoint was written for it."""


@dataclass
class History:
    """What :func:`fit` returns: one row per validation and why training stopped.

    ``stop_reason`` is ``"completed"``, ``"early_stopping"``, ``"time"`` or ``"interrupted"``.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = ""
    step: int = 0
    best_val_nll: float | None = None
    best_step: int | None = None
    run_dir: Path | None = None


def seed_from(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if available, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    return _resolve_device(name)


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine to ``lr * lr_min``."""
    warmup = config.warmup_steps
    if step < warmup:
        return config.lr * (step + 1) / warmup
    floor = config.lr * config.lr_min
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# -- data ----------------------------------------------------------------------------------------
class _Data:
    """Continuous vectors (a float tensor) or quantized images (``.images`` uint8 and ``.levels``).

    With ``classes > 0`` the data's ``.labels`` give the context: one-hot vectors of ``classes`` entries.
    """

    def __init__(self, data: Any, classes: int = 0):
        if hasattr(data, "images") and hasattr(data, "levels"):
            self.images: Tensor | None = torch.as_tensor(data.images)
            self.levels: int | None = int(data.levels)
            self.x = None
            tensor = self.images
        elif isinstance(data, Tensor) and data.is_floating_point():
            self.images, self.levels, self.x = None, None, data
            tensor = data
        else:
            raise TypeError(
                "training data must be a float tensor of shape (N, *event_shape) or an ImageData "
                f"(integer images with levels), got {type(data).__name__}"
            )
        if tensor.dim() < 2 or len(tensor) == 0:
            raise ValueError(f"training data needs shape (N, *event_shape) with N > 0, got {tuple(tensor.shape)}")
        self.n = len(tensor)
        self.event_shape = tuple(tensor.shape[1:])
        self.dims = math.prod(self.event_shape)
        self.classes = classes
        self.labels: Tensor | None = None
        if classes:
            if getattr(data, "labels", None) is None:
                raise ValueError("a class-conditional model (condition = 'label') needs data with labels (ImageData)")
            self.labels = torch.as_tensor(data.labels).long()
            if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= classes):
                raise ValueError(f"labels must lie in [0, {classes - 1}] for {classes} classes, got "
                                 f"[{int(self.labels.min())}, {int(self.labels.max())}]")

    def get(self, index: Tensor | slice, seed: int, dtype: torch.dtype) -> Tensor:
        """The examples at ``index``; images are dequantized with noise seeded by ``seed``."""
        if self.images is None:
            return self.x[index].to(dtype)
        from .data import dequantize

        g = torch.Generator().manual_seed(seed)
        return dequantize(self.images[index], self.levels, generator=g).to(dtype)

    def fixed(self, seed: int, dtype: torch.dtype) -> Tensor:
        return self.get(slice(None), seed, dtype)

    def context(self, index: Tensor | slice, dtype: torch.dtype) -> Tensor | None:
        """One-hot labels at ``index`` (``None`` for an unconditional model)."""
        if self.labels is None:
            return None
        return F.one_hot(self.labels[index], self.classes).to(dtype)

    def inputs(self, flow: Flow, index: Tensor, seed: int, dtype: torch.dtype, device: torch.device,
               variational: bool, shard: slice | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """What the flow sees of the batch ``index``: ``(y, context, log q(u | x))``, on ``device``.

        ``y`` is the (dequantized) data; ``log_q`` is ``None`` without a variational dequantizer.
        The noise is seeded by ``seed``. ``shard``: this process's part of the global batch
        ``index``. The uniform noise is drawn for the whole global batch and then sliced, so the
        shards together are the one-process batch; the variational noise is drawn for the shard
        only, seeded by ``(seed, shard.start)``.
        """
        context = self.context(index, dtype)
        if context is not None and shard is not None:
            context = context[shard]
        context = None if context is None else context.to(device)
        if variational:
            if shard is not None:
                index, seed = index[shard], seed_from(seed, shard.start)
            with _seeded(seed, device):
                y, log_q = flow.dequantizer(self.images[index].to(device), dtype)
            return y, context, log_q
        x = self.get(index, seed, dtype)
        if shard is not None:
            x = x[shard]
        return x.to(device), context, None

    def nll(self, flow: Flow, index: Tensor, seed: int, dtype: torch.dtype, device: torch.device,
            variational: bool, shard: slice | None = None) -> Tensor:
        """Per-example training loss in nats (with gradients) of the batch of :meth:`inputs`:
        ``-log p(y | c)``, plus ``log q(u | x)`` with the flow's variational dequantizer."""
        y, context, log_q = self.inputs(flow, index, seed, dtype, device, variational, shard)
        nll = -flow.log_prob(y, context)
        return nll if log_q is None else nll + log_q

    def bits_per_dim(self, nll: float) -> float | None:
        if self.levels is None:
            return None
        from .metrics import bits_per_dim

        return float(bits_per_dim(nll, self.dims, self.levels))


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """A block whose torch random numbers (CPU and ``device``) come from ``seed``; the global streams are untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def negative_log_likelihood(flow: Flow, x: Tensor, batch_size: int, device: torch.device,
                            context: Tensor | None = None) -> Tensor:
    """Per-example NLL in nats (float64, on the CPU), evaluated in batches without gradients."""
    was_training = flow.training
    flow.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            c = None if context is None else context[i : i + batch_size].to(device)
            out.append(-flow.log_prob(x[i : i + batch_size].to(device), c).double().cpu())
    flow.train(was_training)
    return torch.cat(out)


def variational_negative_log_likelihood(flow: Flow, images: Tensor, batch_size: int, device: torch.device,
                                        seed: int, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(-log p(y | c), log q(u | x))`` per example (float64, CPU) with ``u ~ q(u | x)`` from ``flow.dequantizer``.

    One noise sample per image; batch ``i`` draws it with the seed ``seed_from(seed, i)``, so the
    figures are reproducible for a given ``batch_size``. Their sum is the per-example bound on
    ``-log P(x) - D log K`` (:mod:`pushforward.dequantization`).
    """
    was_training = flow.training
    flow.eval()
    dtype = flow.dtype
    nll, log_q = [], []
    with torch.no_grad():
        for b, i in enumerate(range(0, len(images), batch_size)):
            c = None if context is None else context[i : i + batch_size].to(device)
            with _seeded(seed_from(seed, b), device):
                y, lq = flow.dequantizer(images[i : i + batch_size].to(device), dtype)
            nll.append(-flow.log_prob(y, c).double().cpu())
            log_q.append(lq.double().cpu())
    flow.train(was_training)
    return torch.cat(nll), torch.cat(log_q)


def _sharded_mean_nll(flow: Flow, x: Tensor, context: Tensor | None, batch_size: int, device: torch.device,
                      dist: Distributed) -> float:
    """Mean NLL of ``x``, each process evaluating its part; the same figure on every rank."""
    if not dist.enabled:
        return float(negative_log_likelihood(flow, x, batch_size, device, context).mean())
    part = dist.split(len(x))
    xs, cs = x[part], (None if context is None else context[part])
    if len(xs):
        total = negative_log_likelihood(flow, xs, batch_size, device, cs).sum()
    else:  # fewer examples than processes
        total = torch.zeros((), dtype=torch.float64)
    return float(dist.all_sum(total)) / len(x)


def evaluate(flow: Flow, data: Any, batch_size: int = 1024, seed: int = 0, device: str = "auto",
             reconstruction: bool = True, classes: int = 0) -> dict[str, Any]:
    """Test NLL (nats) with its standard error, bits/dim for images, and the reconstruction error.

    Images are dequantized once with noise seeded by ``seed``. A flow with a variational dequantizer
    (``flow.dequantizer``) is scored by the bound: ``nll`` / ``bpd`` are the mean of
    ``-log p(y) + log q(u | x)`` with one ``u ~ q(u | x)`` per image (seeded; see
    :func:`variational_negative_log_likelihood`), and ``uniform_nll`` / ``uniform_bpd`` score the
    same model with uniform noise, for reference. ``classes > 0``: the one-hot labels are the
    context, and the figures are the conditional ``-log p(x | label)``. ``max_reconstruction_error``
    is ``max |f^-1(f(x)) - x|`` over the whole set.
    """
    from .metrics import mean_and_stderr

    dev = resolve_device(device) if isinstance(device, str) else device
    flow.to(dev)
    d = _Data(data, classes)
    dtype = flow.dtype
    x = d.fixed(seed_from(seed, 2), dtype)
    context = d.context(slice(None), dtype)
    variational = d.images is not None and getattr(flow, "dequantizer", None) is not None
    uniform = negative_log_likelihood(flow, x, batch_size, dev, context)
    log_q = None
    if variational:
        nll_y, log_q = variational_negative_log_likelihood(flow, d.images, batch_size, dev, seed_from(seed, 4), context)
        nll = nll_y + log_q
    else:
        nll = uniform
    mean, stderr = mean_and_stderr(nll)
    out: dict[str, Any] = {"n": d.n, "dims": d.dims, "nll": float(mean), "nll_stderr": float(stderr)}
    if classes:
        out["conditional"] = f"-log p(x | label): one-hot label of {classes} classes as context"
    if d.levels is not None:

        def bpd_of(values: Tensor) -> tuple[float, float]:
            bpd = (values / d.dims + math.log(d.levels)) / math.log(2)  # per example, same formula as bits_per_dim
            return float(d.bits_per_dim(float(values.mean()))), float(mean_and_stderr(bpd)[1])

        out["bpd"], out["bpd_stderr"] = bpd_of(nll)
        out["levels"] = d.levels
        out["dequantization"] = "variational" if variational else "uniform"
        if variational:
            out["log_q"], out["log_q_stderr"] = (float(v) for v in mean_and_stderr(log_q))
            out["uniform_nll"], out["uniform_nll_stderr"] = (float(v) for v in mean_and_stderr(uniform))
            out["uniform_bpd"], out["uniform_bpd_stderr"] = bpd_of(uniform)
            out["eval_batch_size"] = batch_size  # the variational noise is seeded per batch
    if hasattr(flow, "elbo"):  # a VAE (pushforward.vae): log_prob is a bound, so "nll" is the bound's negative
        out["bound"] = "negative ELBO" if flow.k == 1 else f"negative IWAE (k={flow.k})"
    if reconstruction and hasattr(flow, "transform"):  # a VAE has no bijection to invert
        err = 0.0
        flow.eval()
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                xb = x[i : i + batch_size].to(dev)
                c = None if context is None else context[i : i + batch_size].to(dev)
                z, _ = flow.transform(xb, flow.embed_context(c))
                back, _ = flow.transform.inverse(z, flow.embed_context(c))
                err = max(err, float((back - xb).abs().max()))
        out["max_reconstruction_error"] = err
    out["finite"] = all(math.isfinite(v) for v in out.values() if isinstance(v, float))
    return out


# -- run-directory files ----------------------------------------------------------------------------
def _write_metrics(run_dir: Path, rows: list[dict], append: dict | None) -> None:
    if append is not None:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(append) + "\n")
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(run_dir / "metrics.jsonl", lambda tmp: Path(tmp).write_text(text))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run_dir / "metrics.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))


class _Interrupt:
    """First Ctrl-C: finish the current step, save, stop. Second Ctrl-C: KeyboardInterrupt at once."""

    def __init__(self, say: Callable[[str], None], grace: float = 0.0):
        self.requested = False
        self.say = say
        self.previous = None
        # Under torchrun one Ctrl-C reaches a worker twice (from the terminal, then forwarded by the
        # agent): a second SIGINT within `grace` seconds is the same request.
        self.grace, self.first = grace, 0.0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if time.monotonic() - self.first < self.grace:
                return
            raise KeyboardInterrupt
        self.requested, self.first = True, time.monotonic()
        self.say("interrupt received: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


# -- the loop --------------------------------------------------------------------------------------
def fit(flow: Flow, train_data: Any, val_data: Any, config: TrainConfig | dict, *,
        run_dir: str | Path | None = None, resume: bool = False,
        callback: Callable[[int, float, Flow], None] | None = None) -> History:
    """Trains ``flow`` by exact maximum likelihood; see the module docstring.

    Args:
        flow: a recipe-built flow (``flow.recipe`` set, so checkpoints can record it).
        train_data: the training set: a float tensor ``(N, *event_shape)`` or an
            :class:`~pushforward.data.ImageData` (integer images, dequantized afresh every epoch).
        val_data: the validation set, of the same kind as ``train_data``.
        config: a :class:`~pushforward.config.TrainConfig` (or a dict of its fields).
        run_dir: where files go; default ``config.run_dir``; ``""``/``None`` with an empty
            ``config.run_dir``: nothing is written (no checkpoints, no resume).
        resume: continue from ``run_dir/checkpoint`` (same data and batch size required).
        callback: ``callback(step, loss, flow)`` after every optimizer step; raising
            ``KeyboardInterrupt`` there acts like Ctrl-C.

    Data-dependent layers not yet initialised are initialised from the first training batch
    (see the module docstring); to initialise from another batch, call :func:`pushforward.initialize` first.

    Returns:
        The :class:`History`. ``flow`` holds the best validation weights if ``config.restore_best``.

    Raises:
        NonFiniteLossError: a NaN/Inf loss or gradient; the message names the step. No checkpoint
            is written for it, so the last good one stays untouched.
    """
    config = config_from_dict(config) if isinstance(config, dict) else config
    from tqdm.auto import tqdm

    out = Path(run_dir) if run_dir else (Path(config.run_dir) if config.run_dir else None)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    dist = setup_distributed(config.device)  # one process, or this rank of torchrun's group
    device = dist.device
    flow.to(device)
    dtype = flow.dtype
    classes = context_classes(config)
    train, val = _Data(train_data, classes), _Data(val_data, classes)
    variational = config.dequantization == "variational"
    if variational and (train.images is None or getattr(flow, "dequantizer", None) is None):
        raise ValueError(
            "dequantization = 'variational' needs image data and a flow with a dequantizer "
            "(pushforward.models.dequantized; pushforward.experiment.build_flow builds it from the config)"
        )
    if not variational and getattr(flow, "dequantizer", None) is not None:
        raise ValueError("this flow carries a variational dequantizer: train it with dequantization = 'variational'")
    bs = min(config.batch_size, train.n)  # the global batch: split over the processes
    if bs % dist.world:
        raise ValueError(f"batch_size {bs} is the global batch size; it must be divisible by the number of "
                         f"processes ({dist.world})")
    steps_per_epoch = max(1, train.n // bs)
    total = config.max_steps if config.max_steps > 0 else config.epochs * steps_per_epoch
    params = [p for p in flow.parameters() if p.requires_grad]
    # fused: one kernel for all parameters (on CPU 5x faster than the per-tensor loop: ~15% of a small
    # flow's training step); the same update up to rounding
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    x_val = val.fixed(seed_from(config.seed, 1), dtype)
    c_val = val.context(slice(None), dtype)

    hist = History(run_dir=out)
    step, bad, best_state = 0, 0, None
    acc = {"nll_sum": 0.0, "count": 0, "gnorm_sum": 0.0, "steps": 0}
    if out is not None:
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
        has_ckpt = (checkpoint_dir(out) / "state.json").exists()
        if resume:
            if not has_ckpt:
                raise FileNotFoundError(f"cannot resume: no checkpoint in {out}")
            record = load_checkpoint(out, flow, optimizer)
            if record["steps_per_epoch"] != steps_per_epoch:
                raise ValueError(
                    f"cannot resume {out}: it ran {record['steps_per_epoch']} steps per epoch, this run "
                    f"has {steps_per_epoch}; keep the data and batch_size of the original run"
                )
            step, bad, acc = record["step"], record["bad_validations"], record["accum"]
            hist.rows, hist.best_val_nll, hist.best_step = record["history"], record["best_val_nll"], record["best_step"]
            if dist.is_main:
                _write_metrics(out, hist.rows, None)
            if (out / "best.safetensors").exists():
                from .io import load

                best_state = load(out / "best.safetensors").state_dict()
        else:
            if has_ckpt:
                raise FileExistsError(
                    f"{out} already holds a checkpoint; resume it (resume=True, --resume) or use another run_dir"
                )
            for name in ("metrics.jsonl", "metrics.csv", "best.safetensors"):
                if dist.is_main:
                    (out / name).unlink(missing_ok=True)
        text = json.dumps({"train": config.to_dict(), "flow": flow.recipe}, indent=1)
        if dist.is_main:
            atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(text))
    elif resume:
        raise ValueError("resume needs a run_dir")
    if not resume:
        torch.manual_seed(config.seed)

    def state() -> dict[str, Any]:
        return {
            "step": step, "epoch": step // steps_per_epoch, "steps_per_epoch": steps_per_epoch,
            "total_steps": total, "bad_validations": bad, "accum": acc, "history": hist.rows,
            "best_val_nll": hist.best_val_nll, "best_step": hist.best_step, "train_config": config.to_dict(),
            "scheduler": {"kind": "warmup_cosine", "lr": config.lr, "lr_min": config.lr_min,
                          "warmup_steps": config.warmup_steps, "total_steps": total,
                          "last_lr": optimizer.param_groups[0]["lr"]},
        }

    def checkpoint() -> None:
        if out is not None and dist.is_main:
            save_checkpoint(out, flow, optimizer, state())

    def validate() -> dict[str, Any]:
        nonlocal bad, best_state, acc
        log_q = None
        if variational:  # the bound, with one seeded u ~ q(u | x) per image (every rank: the whole set)
            nll_y, log_q = variational_negative_log_likelihood(
                flow, val.images, config.eval_batch_size, device, seed_from(config.seed, 1), c_val)
            nll = float((nll_y + log_q).mean())
        else:
            nll = _sharded_mean_nll(flow, x_val, c_val, config.eval_batch_size, device, dist)
        if not math.isfinite(nll):
            raise NonFiniteLossError(
                f"validation NLL is {nll} after step {step}; stopped without saving"
                + (f" (the last good checkpoint in {out} is untouched)" if out else "")
            )
        row: dict[str, Any] = {"step": step, "epoch": round(step / steps_per_epoch, 4)}
        row["train_nll"] = acc["nll_sum"] / max(1, acc["count"])
        row["val_nll"] = nll
        if val.levels is not None:
            row["train_bpd"] = train.bits_per_dim(row["train_nll"])
            row["val_bpd"] = val.bits_per_dim(nll)
        if log_q is not None:
            row["val_log_q"] = float(log_q.mean())
        row["lr"] = optimizer.param_groups[0]["lr"]
        row["grad_norm"] = acc["gnorm_sum"] / max(1, acc["steps"])
        row["elapsed_s"] = round(time.monotonic() - t0, 3)
        row["samples_per_s"] = round(since_val[1] / max(1e-9, time.monotonic() - since_val[0]), 1)
        improved = hist.best_val_nll is None or nll < hist.best_val_nll
        row["best"] = improved
        if improved:
            hist.best_val_nll, hist.best_step, bad = nll, step, 0
            best_state = {k: v.detach().clone().cpu() for k, v in flow.state_dict().items()}
            if out is not None and dist.is_main:
                save(flow, out / "best.safetensors")
        else:
            bad += 1
        hist.rows.append(row)
        acc = {"nll_sum": 0.0, "count": 0, "gnorm_sum": 0.0, "steps": 0}
        if out is not None and dist.is_main:
            _write_metrics(out, hist.rows, row)
        return row

    # Data-dependent layers (ActNorm) are initialised explicitly from the first training batch, before
    # anything evaluates the flow. Layers already initialised (a resumed run, a loaded flow, or
    # pushforward.initialize called by the user) keep their parameters: resuming is exact.
    flow.train()
    pending = [m for m in data_dependent(flow) if not bool(m.initialized)]
    if pending:
        epoch, pos = divmod(step, steps_per_epoch)
        g = torch.Generator().manual_seed(seed_from(config.seed, 0, epoch))
        idx = torch.randperm(train.n, generator=g)[pos * bs : (pos + 1) * bs]
        with torch.no_grad():
            y, c, _ = train.inputs(flow, idx, seed_from(config.seed, 3, epoch, pos), dtype, device, variational,
                                   dist.shard(bs) if dist.enabled else None)
        initialize_layers(flow, y, c, pending)
        del y, c

    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, disable=not (config.progress and dist.is_main),
               mininterval=0.5, desc=f"train {config.data}", leave=True)
    say = bar.write if dist.is_main else (lambda msg: None)
    step_fn = LossStep(flow, dist, amp=config.amp, compile=config.compile, checkpoint_grads=config.checkpoint_grads)
    t0 = time.monotonic()
    since_val = [t0, 0]  # throughput since the last validation (this invocation only)
    perm, perm_epoch, updating, last_val_step = None, -1, False, (hist.rows[-1]["step"] if hist.rows else -1)
    window = [time.monotonic(), 0]
    reason = ""
    flow.train()
    try:
        with _Interrupt(say, grace=2.0 if dist.enabled else 0.0) as interrupt:
            while True:
                if step >= total:
                    reason = "completed"
                    break
                epoch, pos = divmod(step, steps_per_epoch)
                if perm_epoch != epoch:
                    g = torch.Generator().manual_seed(seed_from(config.seed, 0, epoch))
                    perm, perm_epoch = torch.randperm(train.n, generator=g), epoch
                idx = perm[pos * bs : (pos + 1) * bs]
                # this rank's share of the global batch (DDP averages the gradients over the ranks)
                nll = step_fn(train.nll, idx, seed_from(config.seed, 3, epoch, pos), dtype, device, variational,
                              dist.shard(bs) if dist.enabled else None)
                loss = nll.mean() / train.dims
                batch_nll = float(dist.all_sum(nll.detach().sum())) / len(idx)  # global batch, every rank
                if not math.isfinite(batch_nll):
                    raise NonFiniteLossError(
                        f"non-finite training loss ({batch_nll / train.dims}) at step {step + 1} (epoch {epoch}); "
                        "stopped without saving" + (f", the last good checkpoint in {out} is untouched" if out else "")
                        + "; try a lower lr or a smaller clip"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip > 0:
                    gnorm = torch.nn.utils.clip_grad_norm_(params, config.clip)
                else:
                    gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
                if not bool(torch.isfinite(gnorm)):
                    raise NonFiniteLossError(
                        f"non-finite gradient norm at step {step + 1} (epoch {epoch}); stopped without saving"
                        + (f", the last good checkpoint in {out} is untouched" if out else "")
                    )
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, config, total)
                updating = True
                optimizer.step()
                step += 1
                updating = False
                acc["nll_sum"] += batch_nll * len(idx)
                acc["count"] += len(idx)
                acc["gnorm_sum"] += float(gnorm)
                acc["steps"] += 1
                window[1] += len(idx)
                since_val[1] += len(idx)
                bar.update(1)
                if step % 10 == 0 or step == total:
                    now = time.monotonic()
                    post = {"nll": f"{batch_nll:.3f}"}
                    if train.levels is not None:
                        post["bpd"] = f"{train.bits_per_dim(batch_nll):.3f}"
                    post["samples/s"] = f"{window[1] / max(1e-9, now - window[0]):.0f}"
                    if hist.best_val_nll is not None:
                        best = val.bits_per_dim(hist.best_val_nll) if val.levels else hist.best_val_nll
                        post["best_val"] = f"{best:.3f}"
                    bar.set_postfix(post, refresh=False)
                    window[:] = [now, 0]
                if callback is not None:
                    try:
                        callback(step, batch_nll / train.dims, flow)
                    except KeyboardInterrupt:
                        if not dist.enabled:
                            raise
                        interrupt.requested = True  # stop all ranks together, after this step
                end_epoch = step % steps_per_epoch == 0
                due = step % config.val_every == 0 if config.val_every > 0 else end_epoch
                if due or step == total:
                    row = validate()
                    last_val_step = step
                    since_val[:] = [time.monotonic(), 0]
                    checkpoint()
                    msg = f"step {step}: val NLL {row['val_nll']:.4f}"
                    if "val_bpd" in row:
                        msg += f" ({row['val_bpd']:.4f} bits/dim)"
                    say(msg + (" *" if row["best"] else ""))
                    if config.patience > 0 and bad >= config.patience:
                        reason = "early_stopping"
                        break
                out_of_time = config.max_minutes > 0 and time.monotonic() - t0 > 60 * config.max_minutes
                # any rank's Ctrl-C or clock stops every rank at this same step
                interrupt.requested, out_of_time = dist.any(interrupt.requested, out_of_time)
                if interrupt.requested:
                    raise KeyboardInterrupt
                if out_of_time:
                    if last_val_step != step:
                        validate()
                        last_val_step = step
                    checkpoint()
                    reason = "time"
                    break
    except KeyboardInterrupt:
        reason = "interrupted"
        if updating:
            say(f"interrupted inside an optimizer step; no checkpoint written at step {step}")
        else:
            checkpoint()
    finally:
        bar.close()
        step_fn.close()
    hist.stop_reason, hist.step = reason, step
    if config.restore_best and best_state is not None:
        flow.load_state_dict({k: v.to(device) for k, v in best_state.items()})
    flow.eval()
    dist.close()  # waits for rank 0's last checkpoint; ends a process group that fit started
    return hist
