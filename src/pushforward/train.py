"""The training loop over an objective: :func:`fit` and :func:`evaluate`.

``fit(model, train, val, config, objective=...)`` minimises ``objective.loss`` (a
:class:`pushforward.objectives.Objective`: the exact NLL, a dequantization bound, an ELBO, or your own)
with Adam, a linear warm-up then a cosine-decaying learning rate, and gradient-norm clipping. The
loop knows no model family: what the model is trained on, how the data are dequantized and what the
figures mean is the objective's business; ``objective=None`` takes
:func:`pushforward.objectives.default_objective` of the model and the data. The loop minimises the
mean per-example loss divided by the data's dimension.

Options of the loop that any model can use (:class:`~pushforward.config.TrainConfig`): ``clip`` (gradient-norm
clipping), ``ema`` (an exponential moving average of the weights, which validation, the best weights and
so sampling and saving use; it lives in the optimizer's state, so checkpoints carry it), ``noise``
(Gaussian noise augmentation, :class:`~pushforward.objectives.NoiseAugmentation`: trained on noisy data,
validated on clean data) and ``label_drop`` (a class-conditional model sees the null label, zeros, that
often, so classifier-free guidance can contrast with it at sampling time).

It validates every epoch (or every ``val_every`` steps) with the same objective, keeps the best
validation weights (``best.safetensors``), stops early after ``patience`` validations without
improvement, appends one metrics row per validation to ``metrics.jsonl`` / ``metrics.csv``, and writes a
resumable checkpoint (see :mod:`pushforward.checkpoint`) after every validation, on Ctrl-C or SIGTERM
(after finishing the step) and when the time budget runs out (the final validation counts inside
it). A NaN or infinite loss, gradient or validation figure stops it
(:class:`NonFiniteLossError`) without touching the last good checkpoint.

Data-dependent layers (ActNorm) that are not yet initialised are initialised from the first
training batch (:func:`pushforward.initialize`), as the objective presents it to the model, before
anything else evaluates the model; layers already initialised -- a resumed run, a loaded flow, or
your own ``pushforward.initialize`` -- are kept, so a resumed run never re-initialises.

Reproducibility: the data order of epoch ``e`` is a permutation seeded from ``(seed, e)``, and the
objective's noise for batch ``b`` comes from a generator seeded from ``(seed, e, b)``, so a resumed
run continues exactly where it stopped and ends with the same weights as an uninterrupted one.
Validation chunk ``k`` (of ``eval_batch_size`` examples) draws its noise from ``(seed, k)``, the
same at every validation. Data are a float tensor ``(N, *event_shape)`` or an
:class:`~pushforward.data.ImageData` (integer images, which the objective dequantizes); with
``config.condition = "label"`` the one-hot label is passed as ``context``: the model is ``p(x | label)``.

Several processes: under ``torchrun --nproc-per-node N -m pushforward train ...`` (see
``docs/scaling.md``) ``fit`` joins the process group (NCCL on CUDA, gloo on the CPU; see
:mod:`pushforward.distributed`) and trains with ``DistributedDataParallel``. ``batch_size`` is the
**global** batch (it must be divisible by the number of processes): every rank draws the same
permutation and the same noise for the global batch and takes its contiguous ``batch_size / N``
slice (:meth:`~pushforward.objectives.Batch.draw`), so the averaged gradient is that of the
one-process run on the same batch. Losses and validation figures are summed over the ranks, so the
decisions (early stopping, the best weights, Ctrl-C, the time budget) are the same on every rank;
rank 0 alone writes the run directory (checkpoints hold nothing rank-specific, so a run resumes under
any number of processes that divides the batch) and shows the progress bar. Noise drawn inside the
model (the variational dequantizer, a VAE) is seeded per rank, so with it the runs with 1 and N
processes are equally good but not identical. ``config.amp`` (bf16 autocast in the conditioner
networks), ``config.compile`` (``torch.compile`` of the log-density) and ``config.checkpoint_grads``
(recompute activations in the backward pass) come from :class:`pushforward.distributed.LossStep`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io as _io
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
from .config import TrainConfig, check_config, config_from_dict, context_classes
from .core import Flow
from .distributed import Distributed, LossStep
from .distributed import resolve_device as _resolve_device
from .distributed import setup as setup_distributed
from .initialization import data_dependent, initialize_layers
from .io import atomic_write, save
from .objectives import Batch, LogDensity, Objective, default_objective, model_dtype, with_noise
from .rundir import (
    FILESYSTEM_ERRNOS,
    RunInUseError,
    RunLock,
    RunWriteError,
    clear_run,
    last_checkpoint,
    write_failure,
)

__all__ = [
    "History",
    "NonFiniteLossError",
    "evaluate",
    "fit",
    "lr_at",
    "make_optimizer",
    "negative_log_likelihood",
    "resolve_device",
    "seed_from",
]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss (or gradient); no checkpoint was written for it."""


@dataclass
class History:
    """What :func:`fit` returns: one row per validation and why training stopped.

    ``stop_reason`` is ``"completed"``, ``"early_stopping"``, ``"time"`` or ``"interrupted"`` (then
    ``signal`` is the signal that asked for it: ``SIGINT``, Ctrl-C, or ``SIGTERM``).
    ``best_val_nll`` is the best validation figure of the objective (nats per example).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = ""
    step: int = 0
    best_val_nll: float | None = None
    best_step: int | None = None
    run_dir: Path | None = None
    signal: int | None = None


def seed_from(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from ``seed_from(*parts)``: what an objective draws a batch's noise from."""
    return torch.Generator().manual_seed(seed_from(*parts))


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
    """Examples as given: a float tensor ``(N, *event_shape)`` or an ``ImageData`` (integer images).

    Images stay integers (the objective dequantizes them). With ``classes > 0`` the data's labels give
    the context: one-hot vectors of ``classes`` entries.
    """

    def __init__(self, data: Any, classes: int = 0):
        from .data.images import ImageData

        self.levels: int | None = None
        if isinstance(data, ImageData):
            self.x, self.levels = torch.as_tensor(data.images), int(data.levels)
            if len(self.x) and (int(self.x.min()) < 0 or int(self.x.max()) >= self.levels):
                raise ValueError(f"images must lie in [0, {self.levels - 1}] for {self.levels} levels, found "
                                 f"[{int(self.x.min())}, {int(self.x.max())}]")
        elif isinstance(data, Tensor) and data.is_floating_point():
            self.x = data
        else:
            raise TypeError(
                "training data must be a float tensor of shape (N, *event_shape) or an ImageData "
                f"(integer images with levels), got {type(data).__name__}"
            )
        if self.x.dim() < 2 or len(self.x) == 0:
            raise ValueError(f"training data needs shape (N, *event_shape) with N > 0, "
                             f"got {tuple(self.x.shape)}")
        self.n = len(self.x)
        self.dims = math.prod(self.x.shape[1:])
        self.classes = classes
        self.labels: Tensor | None = None
        if classes:
            if not isinstance(data, ImageData):
                raise ValueError("a class-conditional model (condition = 'label') needs data with labels "
                                 "(ImageData)")
            self.labels = torch.as_tensor(data.labels).long()
            if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= classes):
                raise ValueError(f"labels must lie in [0, {classes - 1}] for {classes} classes, got "
                                 f"[{int(self.labels.min())}, {int(self.labels.max())}]")

    def fingerprint(self) -> dict[str, Any]:
        """Shape, dtype and SHA-256 of the examples (and labels): what a resumed run must train on again."""
        h = hashlib.sha256()
        for t in (self.x, self.labels):
            if t is not None:
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return {"shape": list(self.x.shape), "dtype": str(self.x.dtype), "sha256": h.hexdigest()}

    def context(self, index: Tensor | slice, dtype: torch.dtype) -> Tensor | None:
        """One-hot labels at ``index`` (``None`` for an unconditional model)."""
        if self.labels is None:
            return None
        return F.one_hot(self.labels[index], self.classes).to(dtype)

    def batch(self, index: Tensor | slice, device: torch.device, dtype: torch.dtype,
              part: slice | None = None) -> Batch:
        """The examples at ``index`` as a :class:`~pushforward.objectives.Batch` on ``device``.

        Float data are cast to ``dtype``; ``part``: this process's rows of the global batch ``index``.
        """
        x, context = self.x[index], self.context(index, dtype)
        total = len(x)
        if x.is_floating_point():
            x = x.to(dtype)
        if part is not None:
            x, context = x[part], (None if context is None else context[part])
        return Batch(x.to(device), None if context is None else context.to(device), part, total)

    def get(self, index: Tensor | slice, seed: int, dtype: torch.dtype) -> Tensor:
        """The examples at ``index`` as continuous data: images dequantized uniformly with noise seeded
        by ``seed``."""
        if self.levels is None:
            return self.x[index].to(dtype)
        from .data import dequantize

        return dequantize(self.x[index], self.levels, generator=torch.Generator().manual_seed(seed)).to(dtype)


def negative_log_likelihood(flow: nn.Module, x: Tensor, batch_size: int, device: torch.device,
                            context: Tensor | None = None) -> Tensor:
    """Per-example ``-flow.log_prob`` in nats (float64, on the CPU), in batches without gradients."""
    was_training = flow.training
    flow.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            c = None if context is None else context[i : i + batch_size].to(device)
            out.append(-cast(LogDensity, flow).log_prob(x[i : i + batch_size].to(device), c).double().cpu())
    flow.train(was_training)
    return torch.cat(out)


def _progress(total: int, desc: str):
    """A progress bar for a pass over data, shown only once the pass has lasted two seconds (``desc``
    "": none)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", delay=2.0, leave=False, mininterval=0.5,
                dynamic_ncols=True, disable=not desc)


def _figures(model: nn.Module, objective: Objective, data: _Data, batch_size: int, seed: int,
             device: torch.device, chunks: range | None = None, progress: str = "") -> dict[str, Tensor]:
    """Per-example figures of ``objective.evaluate`` (float64, CPU), in evaluation mode, without gradients.

    The data are cut into chunks of ``batch_size``; chunk ``k`` draws its noise from ``(seed, k)``.
    ``chunks``: which chunks to evaluate (default all); ``progress``: the label of a progress bar.
    """
    dtype = model_dtype(model)
    chunks = range(math.ceil(data.n / batch_size)) if chunks is None else chunks
    was_training = model.training
    model.eval()
    out: dict[str, list[Tensor]] = {}
    with torch.no_grad(), _progress(len(chunks), progress) as bar:
        for k in chunks:
            batch = data.batch(slice(k * batch_size, (k + 1) * batch_size), device, dtype)
            for name, value in objective.evaluate(model, batch, _generator(seed, k)).items():
                out.setdefault(name, []).append(value.detach().double().cpu())
            bar.update(1)
    model.train(was_training)
    return {name: torch.cat(values) for name, values in out.items()}


def _reconstruction_error(flow: Flow, x: Tensor, context: Tensor | None, batch_size: int,
                          device: torch.device, progress: str = "") -> float:
    """``max |f^-1(f(x)) - x|`` over ``x``, in evaluation mode."""
    err = 0.0
    flow.eval()
    with torch.no_grad(), _progress(math.ceil(len(x) / batch_size), progress) as bar:
        for i in range(0, len(x), batch_size):
            bar.update(1)
            xb = x[i : i + batch_size].to(device)
            c = flow.embed_context(None if context is None else context[i : i + batch_size].to(device))
            z, _ = flow.transform(xb, c)
            back, _ = flow.transform.inverse(z, c)
            err = max(err, float((back - xb).abs().max()))
    return err


def evaluate(model: nn.Module, data: Any, batch_size: int = 1024, seed: int = 0, device: str = "auto",
             reconstruction: bool = True, classes: int = 0, objective: Objective | None = None,
             progress: str = "") -> dict[str, Any]:
    """Test figures of ``objective``: the mean loss ``nll`` (nats) with its standard error, and more.

    ``objective=None``: :func:`pushforward.objectives.default_objective` of the model and the data
    (for a flow with a variational dequantizer the variational bound). The data are cut into chunks
    of ``batch_size``; chunk ``k`` draws its noise (dequantization, ``q(u | x)``, a VAE's samples) from
    ``(seed, k)``, so the figures are reproducible for a given ``batch_size``. The report holds:

    - ``nll`` / ``nll_stderr``: the objective's loss (for a bound, the bound);
    - ``bpd`` / ``bpd_stderr`` and ``levels`` for discrete images (:func:`pushforward.metrics.bits_per_dim`);
    - the objective's extra figures with their standard errors (``log_q``; ``recon`` and ``kl``), its
      :meth:`~pushforward.objectives.Objective.describe` entries (``dequantization``, ``bound``) and,
      for each of its ``references``, ``<name>_nll`` / ``<name>_bpd`` (the variational bound's
      ``uniform_nll``: the same model scored with uniform noise);
    - ``max_reconstruction_error = max |f^-1(f(x)) - x|`` for a :class:`~pushforward.core.Flow`
      (``reconstruction=True``), on the data dequantized uniformly with noise seeded by ``seed``.

    ``classes > 0``: the one-hot labels are the context, and the figures are the conditional
    ``-log p(x | label)``. ``progress``: the label of progress bars (on stderr) for every pass that
    lasts over two seconds.
    """
    from .metrics import mean_and_stderr

    dev = resolve_device(device) if isinstance(device, str) else device
    model.to(dev)
    d = _Data(data, classes)
    objective = objective if objective is not None else default_objective(model, data)
    objective.check(model)

    def summary(prefix: str, figures: dict[str, Tensor]) -> dict[str, Any]:
        loss = figures.pop("loss")
        mean, stderr = mean_and_stderr(loss)
        out: dict[str, Any] = {f"{prefix}nll": mean, f"{prefix}nll_stderr": stderr}
        if objective.levels is not None:
            bpd = (loss / d.dims + math.log(objective.levels)) / math.log(2)  # per example: the same formula
            out[f"{prefix}bpd"] = objective.bits_per_dim(mean, d.dims)
            out[f"{prefix}bpd_stderr"] = mean_and_stderr(bpd)[1]
        if not prefix:
            for name, values in figures.items():
                out[name], out[f"{name}_stderr"] = mean_and_stderr(values)
        return out

    out: dict[str, Any] = {"n": d.n, "dims": d.dims, "objective": objective.name}
    out.update(summary("", _figures(model, objective, d, batch_size, seed_from(seed, 2), dev,
                                    progress=progress)))
    if classes:
        out["conditional"] = f"-log p(x | label): one-hot label of {classes} classes as context"
    if objective.levels is not None:
        out["levels"] = objective.levels
    out.update(objective.describe())
    for name, reference in objective.references.items():
        out.update(summary(f"{name}_", _figures(model, reference, d, batch_size, seed_from(seed, 2), dev,
                                                progress=progress and f"{progress}: {name}")))
    out["eval_batch_size"] = batch_size  # the noise is seeded per chunk of this size
    if reconstruction and isinstance(model, Flow):
        x = d.get(slice(None), seed_from(seed, 2), model_dtype(model))
        context = d.context(slice(None), x.dtype)
        out["max_reconstruction_error"] = _reconstruction_error(model, x, context, batch_size, dev,
                                                                progress and f"{progress}: reconstruction")
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
    """A stop request: the first Ctrl-C (SIGINT) or SIGTERM -- what ``docker stop``, Kubernetes, systemd and
    SLURM pre-emption send, and what torchrun forwards to its workers -- finishes the current step, saves
    a checkpoint and stops; a second signal raises KeyboardInterrupt at once. ``signum`` is the first."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, say: Callable[[str], None], grace: float = 0.0):
        self.requested = False
        self.signum: int | None = None
        self.say = say
        self.previous: dict[int, Any] = {}
        # Under torchrun one Ctrl-C reaches a worker twice (from the terminal, then forwarded by the
        # agent): a second signal within `grace` seconds is the same request.
        self.grace, self.first = grace, 0.0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if time.monotonic() - self.first < self.grace:
                return
            raise KeyboardInterrupt
        self.requested, self.first, self.signum = True, time.monotonic(), signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.say(f"interrupt received ({name}): finishing this step and saving a checkpoint "
                 f"({name} again to abort)")

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


# -- the loop: a fixed set-up and a mutable state ----------------------------------------------------
def _zero_accum() -> dict[str, float]:
    return {"nll_sum": 0.0, "count": 0, "gnorm_sum": 0.0, "steps": 0}


@dataclass
class _Run:
    """What one call of :func:`fit` works with; fixed after :func:`_prepare`."""

    model: nn.Module
    objective: Objective
    config: TrainConfig
    dist: Distributed
    train: _Data
    val: _Data
    out: Path | None
    batch_size: int  # global
    steps_per_epoch: int
    total: int
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    dtype: torch.dtype
    fingerprint: dict[str, Any] = field(default_factory=dict)  # of the training data, recorded in checkpoints

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def stopped_without_saving(self) -> str:
        """What a stop for a non-finite figure left: only a checkpoint that exists is promised."""
        if self.out is None:
            return "; stopped (nothing is written when training in memory)"
        return f"; stopped without saving: {last_checkpoint(self.out)}"

    def bpd(self, nats: float) -> float | None:
        return self.objective.bits_per_dim(nats, self.train.dims)


@dataclass
class _State:
    """The loop's progress: what a checkpoint records (JSON), plus the best weights in memory."""

    history: History
    step: int = 0
    bad_validations: int = 0
    accum: dict[str, float] = field(default_factory=_zero_accum)
    best_weights: dict[str, Tensor] | None = None
    updating: bool = False  # inside optimizer.step(): an interrupt there leaves no consistent state to save
    last_val_step: int = -1

    def record(self, run: _Run) -> dict[str, Any]:
        """The JSON part of a checkpoint."""
        return {
            "step": self.step, "epoch": self.step // run.steps_per_epoch,
            "steps_per_epoch": run.steps_per_epoch,
            "total_steps": run.total, "bad_validations": self.bad_validations, "accum": self.accum,
            "history": self.history.rows, "best_val_nll": self.history.best_val_nll,
            "best_step": self.history.best_step, "objective": repr(run.objective), "data": run.fingerprint,
            "train_config": run.config.to_dict(),
            "scheduler": {"kind": "warmup_cosine", "lr": run.config.lr, "lr_min": run.config.lr_min,
                          "warmup_steps": run.config.warmup_steps, "total_steps": run.total,
                          "last_lr": run.optimizer.param_groups[0]["lr"]},
        }


@dataclass
class _Clock:
    """Wall time of this invocation and throughput, for the metrics rows, the progress bar and the budget."""

    start: float = field(default_factory=time.monotonic)
    since_val: list[float] = field(default_factory=lambda: [time.monotonic(), 0])  # (time, samples)
    window: list[float] = field(default_factory=lambda: [time.monotonic(), 0])
    steps: int = 0  # timed optimizer steps: all but the first (one-off costs: the optimizer, compile)
    examples: int = 0
    step_seconds: float = 0.0
    first: bool = True
    val_seconds: float | None = None  # the last validation
    val_probe: float | None = None  # a validation as timed on one chunk, before the first one
    save_seconds: float = 0.0  # the slowest checkpoint

    def count(self, samples: int, seconds: float = 0.0) -> None:
        self.since_val[1] += samples
        self.window[1] += samples
        if self.first:
            self.first = False
            return
        self.steps += 1
        self.examples += samples
        self.step_seconds += seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def final_pass(self, val_examples: int) -> float:
        """Seconds a validation and a checkpoint are expected to take: as long as the last ones, or,
        before any, the timed first chunk times the chunks (else half the training time per example,
        forward only, times the validation examples)."""
        if self.val_seconds is not None:
            return self.val_seconds + self.save_seconds
        if self.val_probe is not None:
            return self.val_probe + self.save_seconds
        return 0.5 * self.step_seconds / max(1, self.examples) * val_examples + self.save_seconds

    def out_of_time(self, budget_s: float, val_examples: int, validated: bool) -> bool:
        """Whether to stop now so that one more step would not push the final validation (unless this step
        was just validated) and checkpoint past ``budget_s``."""
        if self.steps < 2 and self.val_seconds is None:  # nothing to estimate from yet
            return self.elapsed() > budget_s
        one_step = self.step_seconds / max(1, self.steps)
        final = self.save_seconds if validated else self.final_pass(val_examples)
        return self.elapsed() + one_step + final > budget_s


def _prepare(model: nn.Module, train_data: Any, val_data: Any, config: TrainConfig,
             objective: Objective | None, run_dir: str | Path | None) -> _Run:
    """Checks everything and builds the optimizer; nothing is written yet."""
    check_config(config, recipe=False)  # every key in its range, also for a config built or changed in code
    out = Path(run_dir) if run_dir else (Path(config.run_dir) if config.run_dir else None)
    if out is not None and getattr(model, "recipe", None) is None:
        raise ValueError("writing a run directory needs a recipe-built model (model.recipe set), so "
                         "checkpoints can rebuild it; train in memory with run_dir=None and "
                         "config.run_dir = ''")
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    dist = setup_distributed(config.device)  # one process, or this rank of torchrun's group
    model.to(dist.device)
    if objective is None:
        objective = default_objective(model, train_data, config.dequantization)
    objective = with_noise(objective, config.noise)  # Gaussian noise augmentation: config.noise > 0
    objective.check(model)
    classes = context_classes(config)
    if config.label_drop > 0 and not classes:
        raise ValueError(f"label_drop = {config.label_drop} drops labels of a class-conditional model; this "
                         "run has none (train with condition = 'label', --condition label)")
    train, val = _Data(train_data, classes), _Data(val_data, classes)
    bs = min(config.batch_size, train.n)  # the global batch: split over the processes
    if bs % dist.world:
        raise ValueError(f"batch_size {bs} is the global batch size; it must be divisible by the number of "
                         f"processes ({dist.world})")
    steps_per_epoch = max(1, train.n // bs)
    total = config.max_steps if config.max_steps > 0 else config.epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    return _Run(model, objective, config, dist, train, val, out, bs, steps_per_epoch, total, params,
                make_optimizer(config, params), model_dtype(model),
                train.fingerprint() if out is not None else {})


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Adam:
    """Adam at ``config.lr`` with ``config.weight_decay`` (the table sentinel ``-1`` left unsized: none)."""
    # fused: one kernel for all parameters (on CPU 5x faster than the per-tensor loop: ~15% of a small
    # flow's training step); the same update up to rounding
    return torch.optim.Adam(params, lr=config.lr, weight_decay=max(config.weight_decay, 0.0), fused=True)


def _lock(run: _Run) -> RunLock | None:
    """Rank 0 locks the run directory before reading or writing anything there; every rank learns
    whether it could (:class:`~pushforward.rundir.RunInUseError` names the holder's PID)."""
    if run.out is None:
        return None
    lock: RunLock | None = None
    error: OSError | None = None
    if run.dist.is_main:
        try:
            run.out.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run.out).acquire()
        except RunInUseError as e:
            error = e
        except OSError as e:
            error = write_failure(e, run.out, started=False) if e.errno in FILESYSTEM_ERRNOS else e
        else:
            if lock.stale:
                print(f"note: {run.out} held a stale lock ({lock.stale}); taken over", file=sys.stderr,
                      flush=True)
    (failed,) = run.dist.any(error is not None)
    if error is not None:
        raise error
    if failed:
        raise RunInUseError(f"rank 0 could not lock {run.out}; see its message")
    return lock


def _load_state(run: _Run, resume: bool, overwrite: bool) -> _State:
    """The state to start from: ``run.out``'s checkpoint (``resume``) or a fresh one. Reads only.

    Resuming checks that the checkpoint belongs to this run (architecture, steps per epoch,
    objective, training data); a fresh start refuses a directory that holds a checkpoint unless
    ``overwrite``.
    """
    state = _State(History(run_dir=run.out))
    out = run.out
    if out is None:
        if resume:
            raise ValueError("resume needs a run_dir")
        torch.manual_seed(run.config.seed)
        return state
    has_checkpoint = (checkpoint_dir(out) / "state.json").exists()
    if resume:
        if not has_checkpoint:
            raise FileNotFoundError(f"cannot resume: no checkpoint in {out}")
        record = load_checkpoint(out, run.model, run.optimizer)
        if record["steps_per_epoch"] != run.steps_per_epoch:
            raise ValueError(f"cannot resume {out}: it ran {record['steps_per_epoch']} steps per epoch, this "
                             f"run has {run.steps_per_epoch}; keep the data and batch_size of the original "
                             "run")
        if record.get("objective", repr(run.objective)) != repr(run.objective):
            raise ValueError(f"cannot resume {out}: it was trained with {record['objective']}, this run uses "
                             f"{run.objective!r}")
        if (changed := _data_changes(record.get("data"), run.fingerprint)):
            raise ValueError(f"cannot resume {out}: its training data differ from the data given now "
                             f"({changed}); resume with the data it was trained on, or start a new run in "
                             "another directory")
        state.step, state.bad_validations = record["step"], record["bad_validations"]
        state.accum = record["accum"]
        h = state.history
        h.rows, h.best_val_nll, h.best_step = record["history"], record["best_val_nll"], record["best_step"]
        state.last_val_step = h.rows[-1]["step"] if h.rows else -1
        if (out / "best.safetensors").exists():
            from .io import load

            state.best_weights = load(out / "best.safetensors").state_dict()
    else:
        if has_checkpoint and not overwrite:
            raise FileExistsError(f"{out} already holds a checkpoint; resume it (resume=True) or start "
                                  "afresh (overwrite=True), or use another run_dir")
        torch.manual_seed(run.config.seed)
    return state


def _start(run: _Run, state: _State, resume: bool, overwrite: bool) -> None:
    """Makes ``run.out`` this run's: removes a previous run's files (``overwrite``; everything has been
    built and checked by now), stale metrics of a run that never saved, and writes ``config.json``."""
    out = run.out
    if out is not None and run.dist.is_main:
        if resume:
            _write_metrics(out, state.history.rows, None)
        else:
            if overwrite:
                clear_run(out)
            for name in ("metrics.jsonl", "metrics.csv", "best.safetensors"):
                (out / name).unlink(missing_ok=True)
        text = json.dumps({"train": run.config.to_dict(), "flow": run.model.recipe}, indent=1)
        atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(text))
    run.dist.barrier()


def _data_changes(recorded: dict[str, Any] | None, now: dict[str, Any]) -> str:
    """How the training data given now differ from those a checkpoint recorded ("" if they do not, or if
    the checkpoint predates the record)."""
    if not recorded or not now:
        return ""
    if recorded.get("shape") != now.get("shape"):
        return f"{recorded.get('shape')} examples then, {now.get('shape')} now"
    if recorded.get("dtype") != now.get("dtype"):
        return f"{recorded.get('dtype')} then, {now.get('dtype')} now"
    if recorded.get("sha256") != now.get("sha256"):
        return "same shape, different values (SHA-256 of the examples)"
    return ""


class _Order:
    """The global batch of each step: epoch ``e`` visits the data in a permutation seeded from
    ``(seed, e)``."""

    def __init__(self, run: _Run):
        self.run, self.epoch, self.perm = run, -1, torch.empty(0, dtype=torch.long)

    def batch(self, step: int) -> tuple[Batch, torch.Generator]:
        """This process's part of step ``step``'s batch, and the generator of its noise."""
        run = self.run
        epoch, pos = divmod(step, run.steps_per_epoch)
        if epoch != self.epoch:
            self.perm = torch.randperm(run.train.n, generator=_generator(run.config.seed, 0, epoch))
            self.epoch = epoch
        index = self.perm[pos * run.batch_size : (pos + 1) * run.batch_size]
        part = run.dist.shard(run.batch_size) if run.dist.enabled else None
        batch = run.train.batch(index, run.device, run.dtype, part)
        if run.config.label_drop > 0 and batch.context is not None:  # the null label of guidance: zeros
            g = _generator(run.config.seed, 5, epoch, pos)
            keep = batch.draw(lambda n: torch.rand(n, generator=g) >= run.config.label_drop)
            batch = batch.replace(context=batch.context * keep.to(batch.context)[:, None])
        return batch, _generator(run.config.seed, 3, epoch, pos)


class _FirstBatch(nn.Module):
    """``forward(...) = objective.loss(model, batch, generator)``: the model run on the batch as the
    objective presents it, which is what :func:`~pushforward.initialization.initialize_layers` runs."""

    def __init__(self, model: nn.Module, objective: Objective, batch: Batch, generator: torch.Generator):
        super().__init__()
        self.model, self.objective, self.batch, self.generator = model, objective, batch, generator

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.objective.loss(self.model, self.batch, self.generator)


def _initialise(run: _Run, state: _State, order: _Order) -> None:
    """Initialises the data-dependent layers not yet initialised (ActNorm) from this step's training batch."""
    pending = [m for m in data_dependent(run.model) if not bool(m.initialized)]
    if pending:
        batch, generator = order.batch(state.step)
        first = _FirstBatch(run.model, run.objective, batch, generator)
        initialize_layers(first, batch.x, batch.context, pending)


def _optimizer_step(run: _Run, state: _State, loss_step: LossStep, batch: Batch,
                    generator: torch.Generator) -> float:
    """One update on ``batch``; returns the global batch's mean loss per example."""
    losses = loss_step(run.objective.loss, batch, generator)
    batch_loss = float(run.dist.all_sum(losses.detach().sum())) / batch.size  # global batch, every rank
    epoch = state.step // run.steps_per_epoch
    if not math.isfinite(batch_loss):
        raise NonFiniteLossError(
            f"non-finite training loss ({batch_loss / run.train.dims}) at step {state.step + 1} "
            f"(epoch {epoch})"
            f"{run.stopped_without_saving()}; try a lower lr or a smaller clip"
        )
    run.optimizer.zero_grad(set_to_none=True)
    (losses.mean() / run.train.dims).backward()
    if run.config.clip > 0:
        gnorm = torch.nn.utils.clip_grad_norm_(run.params, run.config.clip)
    else:
        norms = [p.grad.norm() for p in run.params if p.grad is not None]
        gnorm = torch.linalg.vector_norm(torch.stack(norms))
    if not bool(torch.isfinite(gnorm)):
        raise NonFiniteLossError(
            f"non-finite gradient norm at step {state.step + 1} (epoch {epoch}){run.stopped_without_saving()}"
        )
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(state.step, run.config, run.total)
    state.updating = True
    run.optimizer.step()
    _update_average(run, state.step)
    state.step += 1
    state.updating = False
    acc = state.accum
    acc["nll_sum"] += batch_loss * batch.size
    acc["count"] += batch.size
    acc["gnorm_sum"] += float(gnorm)
    acc["steps"] += 1
    return batch_loss


def _update_average(run: _Run, step: int) -> None:
    """The exponential moving average of the weights (``config.ema``), after optimizer step ``step``.

    The average of a parameter lives in the optimizer's state of that parameter (key ``"ema"``), so
    checkpoints save it and a resumed run continues it exactly. The decay is
    ``min(ema, (1 + t) / (10 + t))``: early averages forget the initialisation quickly. A parameter that
    Adam has not updated yet has none.
    """
    decay = run.config.ema
    if decay <= 0:
        return
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for p in run.params:
            s = run.optimizer.state.get(p)
            if not s or "step" not in s:
                continue
            if "ema" in s:
                s["ema"].lerp_(p.detach(), 1 - d)
            else:
                s["ema"] = p.detach().clone()


@contextlib.contextmanager
def _averaged(run: _Run) -> Iterator[None]:
    """A block in which the model holds the averaged weights (``config.ema``); then the live ones again."""
    pairs = [(p, s["ema"]) for p in run.params
             if run.config.ema > 0 and "ema" in (s := run.optimizer.state.get(p, {}))]
    live = [p.detach().clone() for p, _ in pairs]
    with torch.no_grad():
        for p, average in pairs:
            p.copy_(average)
    try:
        yield
    finally:
        with torch.no_grad():
            for (p, _), w in zip(pairs, live):
                p.copy_(w)


def _time_validation(run: _Run) -> float:
    """Seconds this process's part of a validation should take, from one chunk timed now. The chunk's
    figures are thrown away and the random states restored, so the run goes on exactly as without it."""
    size = run.config.eval_batch_size
    mine = run.dist.split(math.ceil(run.val.n / size))
    states = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    t0 = time.monotonic()
    _figures(run.model, run.objective, run.val, size, seed_from(run.config.seed, 1), run.device, range(1))
    seconds = (time.monotonic() - t0) * max(1, mine.stop - mine.start)
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state_all(states[1])
    return seconds


def _validation_figures(run: _Run) -> dict[str, float]:
    """Mean validation figures of the objective, each process evaluating its chunks; the same on every rank.

    A pass longer than two seconds shows a progress bar (rank 0, ``config.progress``)."""
    size = run.config.eval_batch_size
    n_chunks = math.ceil(run.val.n / size)
    mine = run.dist.split(n_chunks)
    # a process without a chunk evaluates the first one and counts it zero times, so that every process
    # knows the names of the figures and takes part in the sum
    chunks, weight = (range(mine.start, mine.stop), 1.0) if mine.stop > mine.start else (range(1), 0.0)
    label = "validation" if run.config.progress and run.dist.is_main else ""
    figures = _figures(run.model, run.objective, run.val, size, seed_from(run.config.seed, 1), run.device,
                       chunks, progress=label)
    sums = run.dist.all_sum(torch.stack([v.sum() * weight for v in figures.values()]))
    return {name: float(s) / run.val.n for name, s in zip(figures, sums)}


def _validate(run: _Run, state: _State, clock: _Clock) -> dict[str, Any]:
    """Validates, appends the metrics row, keeps the best weights and counts validations without
    improvement."""
    with _averaged(run):
        figures = _validation_figures(run)
    nll = figures.pop("loss")
    if not math.isfinite(nll):
        raise NonFiniteLossError(f"validation NLL is {nll} after step {state.step}"
                                 f"{run.stopped_without_saving()}")
    acc, h = state.accum, state.history
    row: dict[str, Any] = {"step": state.step, "epoch": round(state.step / run.steps_per_epoch, 4)}
    row["train_nll"] = acc["nll_sum"] / max(1, acc["count"])
    row["val_nll"] = nll
    if run.objective.levels is not None:
        row["train_bpd"], row["val_bpd"] = run.bpd(row["train_nll"]), run.bpd(nll)
    row.update({f"val_{name}": value for name, value in figures.items()})
    row["lr"] = run.optimizer.param_groups[0]["lr"]
    row["grad_norm"] = acc["gnorm_sum"] / max(1, acc["steps"])
    row["elapsed_s"] = round(clock.elapsed(), 3)
    row["samples_per_s"] = round(clock.since_val[1] / max(1e-9, time.monotonic() - clock.since_val[0]), 1)
    row["best"] = h.best_val_nll is None or nll < h.best_val_nll
    if row["best"]:
        h.best_val_nll, h.best_step, state.bad_validations = nll, state.step, 0
        with _averaged(run):  # the best weights are the averaged ones when config.ema > 0
            state.best_weights = {k: v.detach().clone().cpu() for k, v in run.model.state_dict().items()}
            if run.out is not None and run.dist.is_main:
                save(cast(Flow, run.model), run.out / "best.safetensors")  # a recipe-built model (_prepare)
    else:
        state.bad_validations += 1
    h.rows.append(row)
    state.accum = _zero_accum()
    state.last_val_step = state.step
    clock.since_val[:] = [time.monotonic(), 0]
    if run.out is not None and run.dist.is_main:
        _write_metrics(run.out, h.rows, row)
    return row


def _checkpoint(run: _Run, state: _State) -> None:
    if run.out is not None and run.dist.is_main:
        save_checkpoint(run.out, run.model, run.optimizer, state.record(run))


def _show(run: _Run, state: _State, clock: _Clock, bar, batch_loss: float) -> None:
    """The progress bar's figures, every 10 steps."""
    if state.step % 10 and state.step != run.total:
        return
    now = time.monotonic()
    post = {"nll": f"{batch_loss:.3f}"}
    if run.objective.levels is not None:
        post["bpd"] = f"{run.bpd(batch_loss):.3f}"
    post["samples/s"] = f"{clock.window[1] / max(1e-9, now - clock.window[0]):.0f}"
    best = state.history.best_val_nll
    if best is not None:
        post["best_val"] = f"{run.bpd(best) if run.objective.levels is not None else best:.3f}"
    bar.set_postfix(post, refresh=False)
    clock.window[:] = [now, 0]


def _loop(run: _Run, state: _State, order: _Order, loss_step: LossStep, bar, say: Callable[[str], None],
          interrupt: _Interrupt, callback: Callable[[int, float, nn.Module], None] | None) -> str:
    """Steps until the step budget, early stopping, the clock or an interrupt ends training; returns why."""
    clock = _Clock()
    config = run.config

    def validate_and_save() -> dict[str, Any]:
        t0 = time.monotonic()
        row = _validate(run, state, clock)
        t1 = time.monotonic()
        _checkpoint(run, state)
        clock.val_seconds, clock.save_seconds = t1 - t0, max(clock.save_seconds, time.monotonic() - t1)
        bpd = f" ({row['val_bpd']:.4f} bits/dim)" if "val_bpd" in row else ""
        unit = run.objective.unit  # a likelihood in nats, or another objective's own loss (flow matching)
        what = "NLL" if unit == "nats" else f"{run.objective.name} loss ({unit})"
        say(f"step {state.step}: val {what} {row['val_nll']:.4f}{bpd}" + (" *" if row["best"] else ""))
        return row

    if config.val_at_start and state.step == 0 and state.last_val_step < 0:
        validate_and_save()  # the starting weights are a candidate for the best ones
    while state.step < run.total:
        batch, generator = order.batch(state.step)
        t0 = time.monotonic()
        batch_loss = _optimizer_step(run, state, loss_step, batch, generator)
        clock.count(batch.size, time.monotonic() - t0)
        bar.update(1)
        _show(run, state, clock, bar, batch_loss)
        if callback is not None:
            try:
                callback(state.step, batch_loss / run.train.dims, run.model)
            except KeyboardInterrupt:
                if not run.dist.enabled:
                    raise
                interrupt.requested = True  # stop all ranks together, after this step
        due = (state.step % config.val_every == 0 if config.val_every > 0
               else state.step % run.steps_per_epoch == 0)
        if due or state.step == run.total:
            validate_and_save()
            if config.patience > 0 and state.bad_validations >= config.patience:
                return "early_stopping"
        # the final validation and checkpoint count inside the budget: stop when they would not fit
        if config.max_minutes > 0 and clock.val_seconds is None and clock.val_probe is None:
            clock.val_probe = _time_validation(run)
        just_validated = state.last_val_step == state.step
        out_of_time = (config.max_minutes > 0 and state.step < run.total
                       and clock.out_of_time(60 * config.max_minutes, run.val.n, just_validated))
        # any rank's Ctrl-C or clock stops every rank at this same step
        # (a signal handled while the ranks compare notes sets `requested` for the next step: the result
        # must not overwrite it, or that signal is lost)
        stop, out_of_time = run.dist.any(interrupt.requested, out_of_time)
        if stop:
            raise KeyboardInterrupt
        if out_of_time:
            left = 60 * config.max_minutes - clock.elapsed()
            if state.last_val_step != state.step:
                say(f"time budget: {max(0.0, left):.1f} s left at step {state.step}; validating "
                    f"{run.val.n} examples and saving (about {clock.final_pass(run.val.n):.1f} s) to end "
                    "within --max-minutes")
                validate_and_save()  # (a step validated just now was saved with it)
            return "time"
    return "completed"


def fit(model: nn.Module, train_data: Any, val_data: Any, config: TrainConfig | dict, *,
        objective: Objective | None = None, run_dir: str | Path | None = None, resume: bool = False,
        overwrite: bool = False, callback: Callable[[int, float, nn.Module], None] | None = None) -> History:
    """Trains ``model`` by minimising ``objective``; see the module docstring.

    Args:
        model: the model; to write a run directory, a recipe-built one (``model.recipe`` set, so
            checkpoints can rebuild it). Any ``nn.Module`` that ``objective`` can score trains in memory.
        train_data: the training set: a float tensor ``(N, *event_shape)`` or an
            :class:`~pushforward.data.ImageData` (integer images).
        val_data: the validation set, of the same kind as ``train_data``.
        config: a :class:`~pushforward.config.TrainConfig` (or a dict of its fields).
        objective: what to minimise (:mod:`pushforward.objectives`); ``None``:
            ``default_objective(model, train_data, config.dequantization)``.
        run_dir: where files go; default ``config.run_dir``; ``""``/``None`` with an empty
            ``config.run_dir``: nothing is written (no checkpoints, no resume).
        resume: continue from ``run_dir/checkpoint`` (same data, batch size and objective required).
        overwrite: start afresh in a ``run_dir`` that holds a previous run: its files are removed
            once the data, the model and the checkpoint state have been checked, just before the
            first write (without it such a directory is an error).
        callback: ``callback(step, loss, model)`` after every optimizer step (``loss``: the batch's
            mean loss per dimension); raising ``KeyboardInterrupt`` there acts like Ctrl-C.

    Data-dependent layers not yet initialised are initialised from the first training batch
    (see the module docstring); to initialise from another batch, call :func:`pushforward.initialize` first.

    Returns:
        The :class:`History`. ``model`` holds the best validation weights if ``config.restore_best``.

    Raises:
        NonFiniteLossError: a NaN/Inf loss or gradient; the message names the step. No checkpoint
            is written for it, so the last good one stays untouched.
        RunInUseError: another process is training into ``run_dir`` (the message names its PID).
        RunWriteError: ``run_dir`` could not be written (a full disk, a read-only file system); the
            message names the file and the last intact checkpoint.
    """
    config = config_from_dict(config) if isinstance(config, dict) else config
    run = _prepare(model, train_data, val_data, config, objective, run_dir)
    lock = _lock(run)
    try:
        return _fit(run, resume, overwrite, callback)
    except OSError as e:  # a full disk, a read-only file system: name the file and what is intact
        if run.out is None or isinstance(e, RunWriteError) or e.errno not in FILESYSTEM_ERRNOS:
            raise
        raise write_failure(e, run.out) from e
    finally:
        if lock is not None:
            lock.release()


def _fit(run: _Run, resume: bool, overwrite: bool, callback: Callable[[int, float, nn.Module], None] | None
         ) -> History:
    """:func:`fit` once the run is prepared and its directory locked: validate, then act."""
    from tqdm.auto import tqdm

    config, model = run.config, run.model
    state = _load_state(run, resume, overwrite)
    order = _Order(run)
    model.train()
    _initialise(run, state, order)
    _start(run, state, resume, overwrite)  # the first write: everything above has been built and checked
    bar = tqdm(total=run.total, initial=state.step, unit="step", dynamic_ncols=True, mininterval=0.5,
               disable=not (config.progress and run.dist.is_main), desc=f"train {config.data}", leave=True)
    say = bar.write if run.dist.is_main else (lambda msg: None)
    loss_step = LossStep(model, run.dist, amp=config.amp, compile=config.compile,
                         checkpoint_grads=config.checkpoint_grads)
    interrupt = _Interrupt(say, grace=2.0 if run.dist.enabled else 0.0)
    try:
        with interrupt:
            reason = _loop(run, state, order, loss_step, bar, say, interrupt, callback)
    except KeyboardInterrupt:
        reason = "interrupted"
        state.history.signal = int(interrupt.signum or signal.SIGINT)
        if state.updating:
            say(f"interrupted inside an optimizer step; no checkpoint written at step {state.step}")
        else:
            _checkpoint(run, state)
    finally:
        bar.close()
        loss_step.close()
    state.history.stop_reason, state.history.step = reason, state.step
    if config.restore_best and state.best_weights is not None:
        model.load_state_dict({k: v.to(run.device) for k, v in state.best_weights.items()})
    model.eval()
    run.dist.close()  # waits for rank 0's last checkpoint; ends a process group that fit started
    return state.history
