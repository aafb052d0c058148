"""Scaling the training loop out and up: ``torchrun`` + DDP, bf16 autocast, ``torch.compile``, checkpointing.

:func:`pushforward.train.fit` uses two things from here:

- :func:`setup` reads the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``/``MASTER_PORT``) and, for more than one process, initialises the process group:
  NCCL when training on CUDA, gloo on the CPU. A group the caller already initialised (e.g. under
  ``torch.multiprocessing.spawn``) is used as it is. The returned :class:`Distributed` knows the
  rank, the device of this process and how to sum numbers over all processes.
- :class:`LossStep` is what the loop calls to get the per-example loss of a batch with gradients,
  ``step(fn, *args) = fn(model, *args)`` (the loop passes ``objective.loss, batch, generator``). On
  its first call it initialises data-dependent layers (ActNorm) eagerly on that batch if any are
  left (ActNorm averages its statistics over the processes, so every rank gets the same
  parameters), then builds the module that is actually run: :class:`LossModule`, wrapped in
  ``DistributedDataParallel`` when there are several processes (so the backward pass averages the
  gradients); with ``compile`` the ``model.log_prob`` that ``fn`` calls is a ``torch.compile``-d
  :class:`LogProb` module.

``amp`` runs every conditioner network under bf16 autocast and casts its outputs back to the
model's dtype. The conditioners are what the layers declare, :func:`pushforward.core.conditioners`
(each :class:`~pushforward.core.Transform` names its own in ``conditioners()``: the coupling's and
the autoregressive layer's network, whatever attribute holds it), so everything of the flow proper
-- the elementwise maps, their log-determinants, the base density and the loss -- stays in float32
and the log-determinant is exact for the parameters used. A layer that holds a network with
parameters without declaring it is named in a warning (it runs in float32).
``checkpoint_grads`` recomputes each layer of the model's outermost ``Compose`` chains (and of the
``Compose`` inside each ``FactorOut``) during the backward pass instead of storing its
activations (:func:`torch.utils.checkpoint.checkpoint`).

Both patches are applied to the model's modules as instance attributes and removed by
:meth:`LossStep.close`; they never change parameter names, so checkpoints are unaffected.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from .core import Compose, Transform, conditioners
from .objectives import LogDensity, model_dtype

__all__ = [
    "Distributed", "LogProb", "LossModule", "LossStep", "checkpoint_targets", "conditioners",
    "env_world_size", "resolve_device", "setup",
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
        raise ValueError(f"device {name!r} asked for, but torch.cuda.is_available() is False (a CPU build of "
                         "torch, or no GPU visible); use --device cpu or auto")
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

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return cast(LogDensity, self.flow).log_prob(x, context)


class _FlowView:
    """What the loss function sees as the model: ``log_prob`` is the compiled one, the rest the model's."""

    def __init__(self, flow: nn.Module, log_prob):
        self._flow, self.log_prob = flow, log_prob

    def __getattr__(self, name: str):
        return getattr(self._flow, name)


class LossModule(nn.Module):
    """``forward(fn, *args) = fn(model, *args)``: the per-example loss, computed inside ``forward``.

    Wrapped in ``DistributedDataParallel``, whose gradient averaging hooks into ``forward``; ``fn``
    (an objective's ``loss``) may use any part of the model (``log_prob``, a dequantizer, a VAE's
    ``elbo``), so every parameter it touches is synchronised. With ``compile`` the model that ``fn``
    receives has a compiled ``log_prob`` (the data handling around it stays eager).
    """

    def __init__(self, flow: nn.Module, compiled_log_prob: Callable[..., Tensor] | None = None):
        super().__init__()
        self.flow = flow
        # a plain attribute (not a submodule): the compiled module shares the flow's parameters
        view = flow if compiled_log_prob is None else _FlowView(flow, compiled_log_prob)
        object.__setattr__(self, "_view", view)

    def forward(self, fn, *args):
        return fn(self._view, *args)


def _lazy_modules(flow: nn.Module) -> list[nn.Module]:
    """Modules that still wait for a data-dependent initialisation (ActNorm)."""
    from .initialization import data_dependent

    return [m for m in data_dependent(flow) if not bool(m.initialized)]


def checkpoint_targets(model: nn.Module) -> Iterator[Transform]:
    """The layers that gradient checkpointing wraps.

    For a :class:`~pushforward.core.Transform`: each member of it if it is a ``Compose`` (else the
    transform itself), except that a ``FactorOut`` whose inner flow is a ``Compose`` is entered instead
    of wrapped. For any other module (a ``Flow``, a model holding a dequantizer): the same for each
    of its outermost transforms.
    """
    from .transforms.reshape import FactorOut

    if not isinstance(model, Transform):
        for child in model.children():
            yield from checkpoint_targets(child)
        return
    if not isinstance(model, Compose):
        yield model
        return
    for t in model.transforms:
        if isinstance(t, FactorOut) and isinstance(t.transform, Compose):
            yield from checkpoint_targets(t.transform)
        else:
            yield cast(Transform, t)


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def run(x: Tensor, context: Tensor | None = None):
        if not torch.is_grad_enabled():
            return forward(x, context)
        return checkpoint(forward, x, context, use_reentrant=False)

    return run


def _autocast(forward, device_type: str, dtype: torch.dtype):
    """``forward`` run under autocast.

    Its floating outputs are cast back to the dtype of its first floating input.
    """

    @functools.wraps(forward)
    def run(*args, **kwargs):
        like = next((a.dtype for a in args if isinstance(a, Tensor) and a.is_floating_point()), None)
        with torch.autocast(device_type, dtype=dtype):
            out = forward(*args, **kwargs)
        if like is None:
            return out
        if isinstance(out, tuple):
            return tuple(o.to(like) if isinstance(o, Tensor) and o.is_floating_point() else o for o in out)
        return out.to(like) if isinstance(out, Tensor) and out.is_floating_point() else out

    return run


def undeclared_networks(model: nn.Module) -> list[str]:
    """Modules with parameters held by a transform that neither are transforms nor are declared by it as
    conditioners (:meth:`~pushforward.core.Transform.conditioners`): under ``amp`` they stay in float32."""
    declared = {id(net) for net in conditioners(model)}
    found = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, Transform) or id(child) in declared:
                continue
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                visit(f"{prefix}{name}.", child)
            elif any(True for _ in child.parameters()):
                found.append(f"{prefix}{name}")

    for name, m in model.named_modules():
        if isinstance(m, Transform):
            visit(f"{name}." if name else "", m)
    return found


class LossStep:
    """Computes the per-example loss ``fn(model, *args)`` through DDP / autocast / compile / checkpointing.

    Args:
        flow: the model (already on its device): a flow, or any module ``fn`` can score.
        dist: from :func:`setup`.
        amp: bf16 autocast in the conditioner networks (CUDA, or CPU; not MPS).
        compile: ``torch.compile`` the model's ``log_prob`` (after the eager ActNorm initialisation).
        checkpoint_grads: recompute layer activations in the backward pass.

    ``step(fn, *args)`` returns ``fn(model, *args)``; on the first call it initialises ActNorm on
    those arguments if any is left (under ``no_grad``), applies the patches and builds the wrapped module.
    """

    def __init__(self, flow: nn.Module, dist: Distributed, *, amp: bool = False, compile: bool = False,
                 checkpoint_grads: bool = False):
        self.flow, self.dist = flow, dist
        self.amp, self.compile, self.checkpoint_grads = amp, compile, checkpoint_grads
        self.module: nn.Module | None = None
        self._patched: list[nn.Module] = []
        if amp:
            device_type = dist.device.type
            if device_type not in ("cuda", "cpu"):
                raise ValueError(f"amp (bf16 autocast) is supported on cuda and cpu, not {device_type}")
            if model_dtype(flow) != torch.float32:
                raise ValueError(f"amp needs a float32 model, this one is {model_dtype(flow)}")

    def _patch(self, module: nn.Module, wrap) -> None:
        module.forward = wrap(module.forward)
        self._patched.append(module)

    def _build(self, fn, args) -> nn.Module:
        if _lazy_modules(self.flow):
            # Data-dependent init on the first batch, eagerly and before DDP / compile. With several
            # processes ActNorm averages its statistics over them: the init of the global batch. A
            # generator among the arguments is rewound, so the step then draws the same noise.
            states = [(a, a.get_state()) for a in args if isinstance(a, torch.Generator)]
            with torch.no_grad():
                fn(self.flow, *args)
            for g, state in states:
                g.set_state(state)
        if self.amp:
            if missed := undeclared_networks(self.flow):
                warnings.warn(f"amp: {', '.join(missed)} hold(s) parameters but no layer declares it as a "
                              "conditioner (Transform.conditioners()), so it runs in float32", stacklevel=3)
            for net in conditioners(self.flow):
                self._patch(net, lambda f: _autocast(f, self.dist.device.type, torch.bfloat16))
        if self.checkpoint_grads:
            for t in checkpoint_targets(self.flow):
                self._patch(t, _checkpointed)
        compiled = torch.compile(LogProb(self.flow)) if self.compile else None
        module: nn.Module = LossModule(self.flow, compiled)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # device_ids=None: the inputs are already where they belong (DDP would move index
            # tensors to the GPU). Buffers (masks, permutations, ActNorm flags) are constant and
            # identical on every rank, so they are not broadcast before each forward.
            quiet = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters  # torch >= 2.13
            no_buffer_sync: dict[str, Any] = {"forward_sync_buffers" if quiet else "broadcast_buffers": False}
            module = DDP(module, device_ids=None, **no_buffer_sync)
        return module

    def __call__(self, fn, *args) -> Tensor:
        if self.module is None:
            self.module = self._build(fn, args)
        return self.module(fn, *args)

    def close(self) -> None:
        """Removes the autocast / checkpointing patches from the model's modules."""
        for m in self._patched:
            m.__dict__.pop("forward", None)
        self._patched.clear()
        self.module = None
