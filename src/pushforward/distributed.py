"""Scaling the training loop out and up: ``torchrun`` + DDP, bf16 autocast, ``torch.compile``, checkpointing.

:func:`pushforward.train.fit` uses two things from here:

- :func:`setup` reads the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``/``MASTER_PORT``) and, for more than one process, initialises the process group:
  NCCL when training on CUDA, gloo on the CPU. A group the caller already initialised (e.g. under
  ``torch.multiprocessing.spawn``) is used as it is. The returned :class:`Distributed` knows the
  rank, the device of this process and how to sum numbers over all processes.
- :class:`LossStep` is what the loop calls to get the per-example loss of a batch with gradients,
  ``step(fn, *args) = fn(flow, *args)``. On its first call it initialises data-dependent layers
  (ActNorm) eagerly on that batch (ActNorm averages its statistics over the processes, so every
  rank gets the same parameters), then builds the module that is actually run: ``Objective(flow)``,
  wrapped in ``DistributedDataParallel`` when there are several processes (so the backward pass
  averages the gradients); with ``compile`` the ``flow.log_prob`` that ``fn`` calls is a
  ``torch.compile``-d :class:`LogProb` module. ``amp`` runs the conditioner networks (the ``net`` of every coupling
  and autoregressive layer) under bf16 autocast and casts their outputs back to the flow's dtype, so
  everything of the flow proper -- the elementwise maps, their log-determinants, the base density
  and the loss -- stays in float32 and the log-determinant is exact for the parameters used.
  ``checkpoint_grads`` recomputes each layer of the flow's top-level ``Compose`` (and of the
  ``Compose`` inside each ``FactorOut``) during the backward pass instead of storing its
  activations (:func:`torch.utils.checkpoint.checkpoint`).

Both patches are applied to the flow's modules as instance attributes and removed by
:meth:`LossStep.close`; they never change parameter names, so checkpoints are unaffected.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .core import Compose, Flow, Transform

__all__ = [
    "Distributed", "LogProb", "LossStep", "Objective", "checkpoint_targets", "conditioners", "env_world_size",
    "resolve_device", "setup",
]


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _dist():
    return torch.distributed if torch.distributed.is_available() else None


@dataclass
class Distributed:
    """Where this process stands: ``rank`` of ``world`` processes, its ``device``.

    With ``world == 1`` every method is a no-op, so the training loop has a single code path.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, logs and the progress bar."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of a batch of ``n`` (``n`` divisible by ``world``)."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def split(self, n: int) -> slice:
        """This rank's contiguous part of ``n`` items split as evenly as possible (any ``n``, maybe empty)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def all_sum(self, t: Tensor) -> Tensor:
        """The sum of ``t`` (float64) over all processes, identical on every rank."""
        t = t.detach().to(torch.float64)
        if not self.enabled:
            return t
        t = t.to(self.device if self.backend == "nccl" else "cpu").clone()
        torch.distributed.all_reduce(t)
        return t

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag set on at least one rank (so every rank takes the same decision)."""
        if not self.enabled:
            return tuple(bool(f) for f in flags)
        total = self.all_sum(torch.tensor([float(bool(f)) for f in flags]))
        return tuple(bool(v > 0) for v in total.tolist())

    def barrier(self) -> None:
        if self.enabled:
            if self.backend == "nccl":
                torch.distributed.barrier(device_ids=[self.device.index or 0])
            else:
                torch.distributed.barrier()

    def close(self) -> None:
        """Waits for every rank, then destroys the process group if :func:`setup` created it."""
        self.barrier()
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False


def resolve_device(name: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """``auto``: CUDA if available, else the CPU (MPS only when asked for by name).

    Under several processes ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK`` (one GPU per process).
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch.cuda.is_available() is False (a CPU build of torch, "
                         "or no GPU visible); use --device cpu or auto")
    if name == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("device 'mps' asked for, but torch.backends.mps.is_available() is False")
        if distributed:
            raise ValueError("several processes (torchrun) on 'mps' are not supported; use one process")
    if name == "cuda" and distributed:
        return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps ({e})") from None


def setup(device: str = "auto") -> Distributed:
    """The process group for this run: joins the one ``torchrun`` describes, or uses an existing one.

    Without ``torchrun`` (``WORLD_SIZE`` unset or 1) and without an initialised group this is a
    single process and nothing is initialised. The backend is NCCL for CUDA devices, gloo otherwise.
    """
    dist = _dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if dist is not None and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        dev = resolve_device(device, local_rank, world > 1)
        return Distributed(rank, world, local_rank, dev, dist.get_backend(), owns_group=False)
    world = env_world_size()
    if world <= 1:
        return Distributed(device=resolve_device(device))
    if dist is None:
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} is set but {', '.join(missing)} is not; launch with torchrun")
    dev = resolve_device(device, local_rank, True)
    backend = "nccl" if dev.type == "cuda" and dist.is_nccl_available() else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, **kwargs)
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend, owns_group=True)


# -- the module the training step runs -------------------------------------------------------------
class LogProb(nn.Module):
    """``forward(x, context) = flow.log_prob(x, context)``: the unit that ``torch.compile`` compiles.

    ``Flow.forward`` returns a ``Distribution``, so compiling (or wrapping in DDP) needs a module whose
    ``forward`` is the log-density. It holds ``flow`` as a submodule, sharing its parameters.
    """

    def __init__(self, flow: Flow):
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.flow.log_prob(x, context)


class _FlowView:
    """What the loss function sees as the flow: ``log_prob`` is the compiled one, the rest the flow's."""

    def __init__(self, flow: Flow, log_prob):
        self._flow, self.log_prob = flow, log_prob

    def __getattr__(self, name: str):
        return getattr(self._flow, name)


class Objective(nn.Module):
    """``forward(fn, *args) = fn(flow, *args)``: the per-example loss, computed inside ``forward``.

    Wrapped in ``DistributedDataParallel``, whose gradient averaging hooks into ``forward``; ``fn``
    (e.g. the training data's ``nll``) may use ``flow.log_prob`` and ``flow.dequantizer``, so every
    parameter it touches is synchronised. With ``compile`` the ``flow`` that ``fn`` receives has a
    compiled ``log_prob`` (the data handling around it stays eager).
    """

    def __init__(self, flow: Flow, compiled_log_prob: nn.Module | None = None):
        super().__init__()
        self.flow = flow
        # a plain attribute (not a submodule): the compiled module shares the flow's parameters
        object.__setattr__(self, "_view", flow if compiled_log_prob is None else _FlowView(flow, compiled_log_prob))

    def forward(self, fn, *args):
        return fn(self._view, *args)


def _lazy_modules(flow: nn.Module) -> list[nn.Module]:
    """Modules that still wait for a data-dependent initialisation (ActNorm)."""
    return [m for m in flow.modules() if getattr(m, "_initialized", True) is False]


def checkpoint_targets(transform: Transform) -> Iterator[Transform]:
    """The layers that gradient checkpointing wraps: each member of the top-level ``Compose``,
    except that a ``FactorOut`` whose inner flow is a ``Compose`` is entered instead of wrapped."""
    from .transforms.reshape import FactorOut

    if not isinstance(transform, Compose):
        yield transform
        return
    for t in transform.transforms:
        if isinstance(t, FactorOut) and isinstance(t.transform, Compose):
            yield from checkpoint_targets(t.transform)
        else:
            yield t


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def run(x: Tensor, context: Tensor | None = None):
        if not torch.is_grad_enabled():
            return forward(x, context)
        return checkpoint(forward, x, context, use_reentrant=False)

    return run


def _autocast(forward, device_type: str, dtype: torch.dtype):
    @functools.wraps(forward)
    def run(x: Tensor, *args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            out = forward(x, *args, **kwargs)
        return out.to(x.dtype)

    return run


def conditioners(flow: nn.Module) -> list[nn.Module]:
    """The conditioner networks: the ``net`` of every coupling and autoregressive layer."""
    return [m.net for m in flow.modules() if isinstance(m, Transform) and isinstance(getattr(m, "net", None), nn.Module)]


class LossStep:
    """Computes the per-example training loss ``fn(flow, *args)`` through DDP / autocast / compile / checkpointing.

    Args:
        flow: the flow (already on its device).
        dist: from :func:`setup`.
        amp: bf16 autocast in the conditioner networks (CUDA, or CPU; not MPS).
        compile: ``torch.compile`` the flow's ``log_prob`` (after the eager ActNorm initialisation).
        checkpoint_grads: recompute layer activations in the backward pass.

    ``step(fn, *args)`` returns ``fn(flow, *args)``; on the first call it initialises ActNorm on
    those arguments (under ``no_grad``), applies the patches and builds the wrapped module.
    """

    def __init__(self, flow: Flow, dist: Distributed, *, amp: bool = False, compile: bool = False,
                 checkpoint_grads: bool = False):
        self.flow, self.dist = flow, dist
        self.amp, self.compile, self.checkpoint_grads = amp, compile, checkpoint_grads
        self.module: nn.Module | None = None
        self._patched: list[nn.Module] = []
        if amp:
            device_type = dist.device.type
            if device_type not in ("cuda", "cpu"):
                raise ValueError(f"amp (bf16 autocast) is supported on cuda and cpu, not {device_type}")
            if flow.dtype != torch.float32:
                raise ValueError(f"amp needs a float32 flow, this one is {flow.dtype}")

    def _build(self, fn, args) -> nn.Module:
        if _lazy_modules(self.flow):
            # Data-dependent init on the first batch, eagerly and before DDP / compile. With several
            # processes ActNorm averages its statistics over them: the init of the global batch.
            with torch.no_grad():
                fn(self.flow, *args)
        if self.amp:
            for net in conditioners(self.flow):
                net.forward = _autocast(net.forward, self.dist.device.type, torch.bfloat16)
                self._patched.append(net)
        if self.checkpoint_grads:
            for t in checkpoint_targets(self.flow.transform):
                t.forward = _checkpointed(t.forward)
                self._patched.append(t)
        compiled = torch.compile(LogProb(self.flow)) if self.compile else None
        module: nn.Module = Objective(self.flow, compiled)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # device_ids=None: the inputs are already where they belong (DDP would move index
            # tensors to the GPU). Buffers (masks, permutations, ActNorm flags) are constant and
            # identical on every rank, so they are not broadcast before each forward.
            quiet = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters  # torch >= 2.13
            module = DDP(module, device_ids=None, **{"forward_sync_buffers" if quiet else "broadcast_buffers": False})
        return module

    def __call__(self, fn, *args) -> Tensor:
        if self.module is None:
            self.module = self._build(fn, args)
        return self.module(fn, *args)

    def close(self) -> None:
        """Removes the autocast / checkpointing patches from the flow's modules."""
        for m in self._patched:
            m.__dict__.pop("forward", None)
        self._patched.clear()
        self.module = None
