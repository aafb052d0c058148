"""Continuous normalizing flows: the bijection is the flow of an ODE, solved by torchdiffeq.

``dx/dt = v(t, x, context)`` carries data (``t = 0``) to latent (``t = 1``), and the log-determinant
of that map is the integral of the vector field's divergence along the path (the instantaneous
change of variables, Chen et al. 2018):

    log|det Df(x)| = integral_0^1 tr(dv/dx)(t, x(t)) dt.

:class:`CNF` solves the ODE for ``x`` and that integral together, with the exact divergence (the trace
of the Jacobian, from ``D`` vector-Jacobian products batched by ``torch.func.vmap``) or Hutchinson's
unbiased estimate ``eps^T (dv/dx) eps`` (one product; FFJORD, Grathwohl et al. 2019).

Time runs from data to noise, the training direction of the library (``forward`` = data -> latent):
the flow-matching path of :class:`~pushforward.objectives.FlowMatching` puts the data at ``t = 0``
and the base's noise at ``t = 1`` (Lipman et al. write the same path with time reversed).

The vector fields here take ``(t, x, context)`` and start at zero (a zero-initialised last layer), so
a new CNF is the identity: :class:`MLPVectorField` for vectors, :class:`ConvVectorField` for images.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core import Transform

__all__ = ["CNF", "DIVERGENCES", "ConvVectorField", "MLPVectorField", "exact_divergence",
           "hutchinson_divergence"]

#: How :class:`CNF` computes the divergence: the trace of the Jacobian, or Hutchinson's estimate.
DIVERGENCES = ("exact", "hutchinson")
_NOISES = ("rademacher", "gaussian")
_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
_FIXED_STEP = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams",
               "fixed_adams")
_INSTALL = ("the CNF transform solves its ODE with torchdiffeq, which is not installed: "
            "pip install torchdiffeq (or pip install 'pushforward[ode]')")


def _torchdiffeq() -> Any:
    try:
        return importlib.import_module("torchdiffeq")
    except ImportError as e:  # one line that says how to get it
        raise ImportError(_INSTALL) from e


# -- divergences ----------------------------------------------------------------------------------------
def _vjp(f: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Callable[[Tensor], tuple[Tensor, ...]]]:
    return cast(tuple[Tensor, Callable[[Tensor], tuple[Tensor, ...]]], torch.func.vjp(f, x))


def exact_divergence(f: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """``(f(x), tr(df/dx))`` per example, the trace from one batched vector-Jacobian product per dimension.

    Args:
        f: a map ``(N, *event) -> (N, *event)`` acting on each example separately.
        x: ``(N, *event)``.

    Returns:
        ``(f(x), div)`` with ``div`` of shape ``(N,)``. Differentiable (parameters and ``x``) when grad is
        enabled; works under ``torch.no_grad`` too (``torch.func`` ignores it). Costs ``D = prod(event)``
        products, batched by ``torch.func.vmap``: memory grows with ``D``.
    """
    v, vjp = _vjp(f, x)
    n, d = x.shape[0], x[0].numel()
    basis = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *x.shape[1:]).expand(d, *x.shape)
    (rows,) = torch.func.vmap(vjp)(basis)  # rows[i, k] = e_i^T J_k
    return v, rows.reshape(d, n, d).diagonal(dim1=0, dim2=2).sum(-1)


def hutchinson_divergence(f: Callable[[Tensor], Tensor], x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """``(f(x), eps^T (df/dx) eps)`` per example: Hutchinson's unbiased estimate of the divergence.

    Args:
        f: a map ``(N, *event) -> (N, *event)`` acting on each example separately.
        x: ``(N, *event)``.
        noise: ``eps`` of the shape of ``x``, with ``E[eps eps^T] = I`` (Rademacher or standard normal).

    Returns:
        ``(f(x), estimate)`` with ``estimate`` of shape ``(N,)``; ``E[estimate] = tr(df/dx)``. One product.

    References:
        Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian smoothing
        splines", 1990; Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud, "FFJORD", 2019.
    """
    v, vjp = _vjp(f, x)
    (e_j,) = vjp(noise)
    return v, (e_j * noise).flatten(1).sum(-1)


# -- the transform ----------------------------------------------------------------------------------------
class CNF(Transform):
    """A continuous normalizing flow: ``z = x(1)`` where ``dx/dt = v(t, x, context)`` and ``x(0) = x``.

    ``forward`` integrates from ``t = 0`` (data) to ``t = 1`` (latent) and returns
    ``ladj = integral_0^1 div v dt``; ``inverse`` integrates from ``t = 1`` back to ``t = 0`` and returns
    minus that integral along its own path. Both are solved by torchdiffeq, ``x`` and the integral as one
    state, so the tolerances control both; the round trip and ``forward ladj = -inverse ladj`` hold to
    the solver's tolerance, not to rounding.

    The divergence is exact (the trace of the Jacobian: ``D`` batched vector-Jacobian products, for small
    ``D``) or Hutchinson's estimate (one product with noise ``eps`` drawn once per solve from torch's
    global generator and held over the path; an unbiased estimate of the log-determinant, for large
    ``D``). ``divergence`` chooses it in training mode and ``eval_divergence`` in evaluation mode
    (default exact), so evaluation figures of a model trained with the estimate are exact unless asked.

    Args:
        vector_field: a module ``v(t, x, context) -> (N, *event)``, ``t`` a 0-dim tensor or ``(N,)``,
            ``x`` of shape ``(N, *event)`` (:class:`MLPVectorField`, :class:`ConvVectorField`).
        event_dim: number of event dimensions (1 for vectors, 3 for images).
        divergence: ``"exact"`` or ``"hutchinson"`` in training mode.
        eval_divergence: ``"exact"`` or ``"hutchinson"`` in evaluation mode.
        noise: Hutchinson's noise, ``"rademacher"`` (lower variance) or ``"gaussian"``.
        method: a torchdiffeq solver (``"dopri5"``, ``"dopri8"``, ``"bosh3"``, ``"rk4"``, ``"euler"``, ...).
        rtol: relative tolerance of an adaptive solver.
        atol: absolute tolerance of an adaptive solver.
        step_size: the step of a fixed-step solver (``rk4``, ``euler``, ``midpoint``); ``0`` for adaptive
            ones. Required by the fixed-step solvers.
        adjoint: backpropagate by the adjoint ODE (``torchdiffeq.odeint_adjoint``, memory independent of
            the number of steps) instead of through the solver's operations.

    Raises:
        ValueError: an unknown divergence, noise or solver option, or a fixed-step solver without a
            step size.
        ImportError: torchdiffeq is not installed (the message says how to install it).

    References:
        Chen, Rubanova, Bettencourt & Duvenaud, "Neural Ordinary Differential Equations", 2018;
        Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud, "FFJORD: Free-form Continuous Dynamics for
        Scalable Reversible Generative Models", 2019.
    """

    def __init__(self, vector_field: nn.Module, event_dim: int = 1, *, divergence: str = "exact",
                 eval_divergence: str = "exact", noise: str = "rademacher", method: str = "dopri5",
                 rtol: float = 1e-5, atol: float = 1e-5, step_size: float = 0.0, adjoint: bool = False):
        super().__init__()
        for what, value, allowed in (("divergence", divergence, DIVERGENCES),
                                     ("eval_divergence", eval_divergence, DIVERGENCES),
                                     ("noise", noise, _NOISES)):
            if value not in allowed:
                raise ValueError(f"CNF: {what} must be one of {allowed}, got {value!r}")
        _torchdiffeq()  # a missing torchdiffeq is an error here, not at the first solve
        if method not in _ADAPTIVE + _FIXED_STEP:
            raise ValueError(f"CNF: method must be a torchdiffeq solver "
                             f"({', '.join(_ADAPTIVE + _FIXED_STEP)}), got {method!r}")
        if method in _FIXED_STEP and not step_size > 0:
            raise ValueError(f"CNF: the fixed-step solver {method!r} needs step_size > 0, got {step_size}")
        if event_dim < 1:
            raise ValueError(f"CNF: event_dim must be >= 1, got {event_dim}")
        self.vector_field = vector_field
        self.event_dim = event_dim
        self.divergence, self.eval_divergence, self.noise = divergence, eval_divergence, noise
        self.method, self.rtol, self.atol, self.step_size = method, float(rtol), float(atol), float(step_size)
        self.adjoint = bool(adjoint)

    @property
    def context_features(self) -> int:
        """The width of the context the vector field reads (0: none)."""
        return int(getattr(self.vector_field, "context_features", 0))

    def velocity(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The vector field ``v(t, x, context)``.

        Shapes: ``t`` 0-dim or ``(N,)``, ``x`` ``(N, *event)``, ``context`` ``(N, context_features)``
        -> ``(N, *event)``.
        """
        return self.vector_field(t, x, context)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Integrates data ``x = x(0)`` to latent ``z = x(1)``.

        Args:
            x: ``(*batch, *event)``.
            context: optional ``(*batch, context_features)``.

        Returns:
            ``(z, ladj)``: ``z`` like ``x``; ``ladj = integral_0^1 div v dt`` of shape ``(*batch,)``
            (exact or Hutchinson's estimate, see the class docstring).
        """
        return self._solve(x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Integrates latent ``z = x(1)`` back to data ``x = x(0)``.

        Args:
            z: ``(*batch, *event)``.
            context: optional ``(*batch, context_features)``.

        Returns:
            ``(x, ladj)``: ``x`` like ``z``; ``ladj = -integral_0^1 div v dt`` along this path, shape
            ``(*batch,)``.
        """
        return self._solve(z, context, inverse=True)

    def _solve(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        event = x.shape[x.dim() - self.event_dim:]
        batch = x.shape[:x.dim() - self.event_dim]
        x = x.reshape(-1, *event)
        if context is not None:
            context = context.expand(*batch, context.shape[-1]).reshape(-1, context.shape[-1])
        mode = self.divergence if self.training else self.eval_divergence
        eps = self._noise(x) if mode == "hutchinson" else None
        field = self.vector_field

        def dynamics(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            def v(y: Tensor) -> Tensor:
                return field(t, y, context)

            if eps is None:
                return exact_divergence(v, state[0])
            return hutchinson_divergence(v, state[0], eps)

        ode = _torchdiffeq()
        span = torch.tensor([1.0, 0.0] if inverse else [0.0, 1.0], dtype=x.dtype, device=x.device)
        options = {"step_size": self.step_size} if self.step_size > 0 else None
        state = (x, x.new_zeros(x.shape[0]))
        kwargs: dict[str, Any] = {"rtol": self.rtol, "atol": self.atol, "method": self.method,
                                  "options": options}
        if self.adjoint:
            params: tuple[Tensor, ...] = tuple(p for p in self.parameters() if p.requires_grad)
            if context is not None and context.requires_grad:
                params = (*params, context)
            xs, integrals = ode.odeint_adjoint(dynamics, state, span, adjoint_params=params, **kwargs)
        else:
            xs, integrals = ode.odeint(dynamics, state, span, **kwargs)
        # integrating d(ladj)/dt = div v over [0, 1] gives the forward log-determinant; over [1, 0], minus
        # the integral along the inverse's path: the inverse's log-determinant
        return xs[-1].reshape(*batch, *event), integrals[-1].reshape(batch)

    def _noise(self, x: Tensor) -> Tensor:
        if self.noise == "gaussian":
            return torch.randn_like(x)
        return torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1

    def extra_repr(self) -> str:
        step = (f", step_size={self.step_size}" if self.step_size > 0
                else f", rtol={self.rtol}, atol={self.atol}")
        return (f"divergence={self.divergence!r}, eval_divergence={self.eval_divergence!r}, "
                f"method={self.method!r}{step}, adjoint={self.adjoint}")


# -- vector fields ----------------------------------------------------------------------------------------
def _time_features(t: Tensor, n: int, freqs: int, like: Tensor) -> Tensor:
    """``(n, 2 freqs)``: ``cos(pi k t)``, ``sin(pi k t)`` for ``k = 1 .. freqs`` (``t`` 0-dim or ``(n,)``)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device).reshape(-1, 1).expand(n, 1)
    k = torch.arange(1, freqs + 1, dtype=like.dtype, device=like.device) * math.pi
    return torch.cat([torch.cos(k * t), torch.sin(k * t)], dim=-1)


def _check_context(who: str, want: int, context: Tensor | None) -> None:
    if want and context is None:
        raise ValueError(f"this {who} was built for a context of {want} features; got none")


class MLPVectorField(nn.Module):
    """A vector field for vectors: an MLP of ``(x, time features, context)`` with a zero last layer.

    The time enters as ``cos(pi k t), sin(pi k t)`` for ``k = 1 .. freqs``; the activation is smooth
    (SiLU by default), so the field's Jacobian, and the divergence's gradient, are continuous.

    Args:
        features: ``D``, the size of ``x``.
        hidden: hidden layer sizes.
        context_features: size of an optional context, concatenated to the input.
        freqs: time frequencies.
        activation: activation module class.
        zero_init: zero-initialise the last layer (the CNF starts as the identity).

    Shapes: ``forward(t, x, context)``: ``t`` 0-dim or ``(N,)``, ``x`` ``(N, D)``, ``context``
    ``(N, context_features)`` -> ``(N, D)``.
    """

    def __init__(self, features: int, hidden: Sequence[int] = (64, 64), context_features: int = 0, *,
                 freqs: int = 3, activation: type[nn.Module] = nn.SiLU, zero_init: bool = True):
        super().__init__()
        sizes = [features + 2 * freqs + context_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), activation()]
        last = nn.Linear(sizes[-1], features)
        if zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.features, self.freqs, self.context_features = features, freqs, context_features

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        _check_context("MLPVectorField", self.context_features, context)
        parts = [x, _time_features(t, x.shape[0], self.freqs, x)]
        if self.context_features and context is not None:
            parts.append(context)
        return self.net(torch.cat(parts, dim=-1))


class ConvVectorField(nn.Module):
    """A vector field for images: 3x3 convolutions, the time and context added as a bias per layer.

    ``blocks + 1`` hidden convolutions of ``hidden_channels`` with SiLU; each adds a per-channel bias
    computed from the time features (``cos / sin(pi k t)``) and the context; the last convolution is
    zero-initialised (the CNF starts as the identity).

    Args:
        shape: ``(C, H, W)`` of the images.
        hidden_channels: channels of the hidden layers.
        blocks: hidden convolutions after the first.
        context_features: size of an optional context.
        freqs: time frequencies.

    Shapes: ``forward(t, x, context)``: ``t`` 0-dim or ``(N,)``, ``x`` ``(N, C, H, W)``, ``context``
    ``(N, context_features)`` -> ``(N, C, H, W)``.
    """

    def __init__(self, shape: Sequence[int], hidden_channels: int = 32, blocks: int = 2,
                 context_features: int = 0, *, freqs: int = 3):
        super().__init__()
        if len(shape) != 3:
            raise ValueError(f"ConvVectorField expects an image shape (C, H, W), got {tuple(shape)}")
        c = int(shape[0])
        self.convs = nn.ModuleList([nn.Conv2d(c if i == 0 else hidden_channels, hidden_channels, 3, padding=1)
                                    for i in range(blocks + 1)])
        self.biases = nn.ModuleList([nn.Linear(2 * freqs + context_features, hidden_channels)
                                     for _ in range(blocks + 1)])
        self.out = nn.Conv2d(hidden_channels, c, 3, padding=1, bias=False)
        nn.init.zeros_(self.out.weight)
        self.act = nn.SiLU()
        self.shape, self.freqs, self.context_features = tuple(int(s) for s in shape), freqs, context_features

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        _check_context("ConvVectorField", self.context_features, context)
        cond = _time_features(t, x.shape[0], self.freqs, x)
        if self.context_features and context is not None:
            cond = torch.cat([cond, context], dim=-1)
        h = x
        for conv, bias in zip(self.convs, self.biases, strict=True):
            h = self.act(conv(h) + bias(cond)[:, :, None, None])
        return self.out(h)
