"""Autoregressive structure: ``z_i = kernel(x_i; h(x_<i))`` with ``h`` an autoregressive conditioner.

The Jacobian is triangular, so ``log|det|`` is the kernel's alone. ``forward`` (data -> latent,
density evaluation) is one network pass: this is MAF. ``inverse`` (sampling) must recover
``x_1, ..., x_D`` in order: ``D`` network passes. ``Inverse(Autoregressive(...))`` swaps the
costs: one-pass sampling, ``D``-pass density, which is IAF.

The order runs over the features of a vector ``(*, D)`` (MADE, the default conditioner) or over the
tokens of a sequence ``(*, N, P)``, e.g. image patches (a causal Transformer, as in TarFlow).

References:
    Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density Estimation", 2017.
    Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow", 2016.
    Zhai et al., "Normalizing Flows are Capable Generative Models", 2025 (TarFlow: over patches).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast, runtime_checkable

import torch
from torch import Tensor, nn

from ..core import Transform, shape_checks_enabled, sum_event
from ..nn import MADE
from ..protocols import ConditionerFactory, Kernel
from .coupling import check_kernel

__all__ = ["Autoregressive", "IncrementalConditioner"]


@runtime_checkable
class IncrementalConditioner(Protocol):
    """A sequence conditioner that decodes token by token (e.g. :class:`~pushforward.nn.CausalTransformer`).

    ``new_cache()`` returns an empty cache; ``net(previous_token, context, cache=cache)`` with
    ``previous_token`` of shape ``(*, 1, P)`` returns the parameters of the next token ``(*, 1, out)`` and
    records in ``cache`` what later tokens need (the first call's token is ignored). The outputs must
    equal, up to rounding, those of the full pass ``net(x, context)`` at the same positions.
    """

    def new_cache(self) -> object: ...


class Autoregressive(Transform):
    """An autoregressive transform of vectors ``(*, D)`` or of sequences ``(*, N, P)``.

    The conditioner is built as ``conditioner(in_features, kernel.params * in_features,
    context_features)`` with ``in_features = D`` (vectors) or ``P`` (sequences), and called as
    ``net(x)`` or ``net(x, context)``. Its contract:

    - **output layout**: ``(*, params * D)`` for vectors, ``(*, N, params * P)`` for sequences:
      ``kernel.params`` blocks of the input's size along the last dimension;
    - **autoregressive in the order**: the parameters of feature ``i`` (of every feature of token
      ``n``) depend only on features ``< i`` (on tokens ``< n``), never on themselves or later ones;
      the first ones depend on nothing but the context (MADE: biases and the context; TarFlow: a
      learned start token). The context may reach every output;
    - **identity start**: a zero-initialised last layer.

    Nothing checks the second point at run time (it would cost a Jacobian): a conditioner that
    breaks it gives a wrong ``ladj`` and an inverse that does not invert. ``tests/`` checks it for
    the built-in ones through the Jacobian's zero pattern.

    Args:
        shape: the event shape: ``D`` (or ``(D,)``) for vectors, ordered over the features;
            ``(N, P)`` for sequences of ``N`` tokens of ``P`` features, ordered over the tokens.
        kernel: an elementwise :class:`~pushforward.protocols.Kernel` (``AffineKernel()``,
            ``SplineKernel()``, ...).
        conditioner: a :class:`~pushforward.protocols.ConditionerFactory` that builds an autoregressive
            network (above); default: :class:`~pushforward.nn.MADE` with hidden sizes ``(128, 128)``
            (vectors only), e.g. ``functools.partial(MADE, hidden=(64, 64))`` for others.
        context_features: width of an optional context vector, passed to the factory.
        use_cache: for sequences whose conditioner is an :class:`IncrementalConditioner`, invert token by
            token through its key-value cache (each step one token's work) instead of ``N`` full passes;
            the same result up to rounding. An attribute, so it can be switched for a comparison.

    ``forward`` (MAF direction, density) costs one conditioner pass; ``inverse`` (sampling) costs
    ``D`` (or ``N``) passes. Both return ``(y, ladj)`` with ``y`` of the input's shape and ``ladj``
    of shape ``(*,)``.

    Raises:
        ValueError: If ``shape`` is neither ``D`` nor ``(N, P)``, or a sequence has no conditioner.
        TypeError: If ``kernel`` is not a kernel instance.

    References:
        Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density Estimation", 2017.
    """

    def __init__(self, shape: int | Sequence[int], kernel: Kernel,
                 conditioner: ConditionerFactory | None = None, context_features: int = 0,
                 use_cache: bool = True):
        super().__init__()
        check_kernel(kernel, "Autoregressive")
        shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        if len(shape) not in (1, 2) or min(shape) < 1:
            raise ValueError(f"Autoregressive models vectors (D,) or sequences (N, P); got event shape "
                             f"{shape}")
        if conditioner is None:
            if len(shape) == 2:
                raise ValueError("an Autoregressive transform of sequences (N, P) needs a conditioner "
                                 "factory that is autoregressive over the tokens (e.g. a causal "
                                 "Transformer); MADE orders features")
            conditioner = MADE
        self.shape = torch.Size(shape)
        self.event_dim = len(shape)
        self.kernel = kernel
        self.context_features = context_features
        self.net = conditioner(shape[-1], kernel.params * shape[-1], context_features)
        self.use_cache = use_cache

    @property
    def steps(self) -> int:
        """Conditioner passes of the inverse: ``D`` for vectors, ``N`` for sequences."""
        return self.shape[0]

    def _params(self, x: Tensor, context: Tensor | None) -> Tensor:
        if shape_checks_enabled() and tuple(x.shape[x.dim() - self.event_dim:]) != tuple(self.shape):
            raise ValueError(f"Autoregressive over events of shape {tuple(self.shape)} got a tensor of shape "
                             f"{tuple(x.shape)}")
        return self.net(x) if context is None else self.net(x, context)

    def _ladj(self, logd: Tensor | None, x: Tensor) -> Tensor:
        if logd is None:
            return x.new_zeros(x.shape[: x.dim() - self.event_dim])
        return sum_event(logd, self.event_dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``z_i = kernel(x_i; h(x_<i, context))`` in one conditioner pass (data -> latent).

        Args:
            x: data of shape ``(*batch, D)`` or ``(*batch, N, P)``.
            context: optional conditioning tensor of shape ``(*batch, context_features)``.

        Returns:
            ``(z, ladj)``: ``z`` of ``x``'s shape and ``log|det Df(x)|`` of shape ``(*batch,)``.
        """
        z, logd = self.kernel.forward(x, self._params(x, context), -1)
        return z, self._ladj(logd, x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Recovers ``x`` in :attr:`steps` conditioner passes (latent -> data).

        After pass ``i`` the entries (tokens) ``0..i`` are exact, since each depends only on earlier ones.
        With a key-value cache (``use_cache`` and an :class:`IncrementalConditioner`) pass ``n`` reads one
        token, the one recovered before it, instead of the whole sequence.

        Args:
            z: latent of shape ``(*batch, D)`` or ``(*batch, N, P)``.
            context: optional conditioning tensor of shape ``(*batch, context_features)``.

        Returns:
            ``(x, ladj)``: ``x`` of ``z``'s shape and ``log|det Df^{-1}(z)|`` of shape ``(*batch,)``.
        """
        if self.event_dim == 2 and self.use_cache and isinstance(self.net, IncrementalConditioner):
            return self._inverse_cached(z, context)
        x = z.new_zeros(z.shape)
        logd = None
        for _ in range(self.steps):
            x, logd = self.kernel.inverse(z, self._params(x, context), -1)
        return x, self._ladj(logd, z)

    def _inverse_cached(self, z: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if shape_checks_enabled() and tuple(z.shape[z.dim() - 2:]) != tuple(self.shape):
            raise ValueError(f"Autoregressive over events of shape {tuple(self.shape)} got a tensor of shape "
                             f"{tuple(z.shape)}")
        cache = cast(IncrementalConditioner, self.net).new_cache()
        token = z.new_zeros(*z.shape[:-2], 1, z.shape[-1])  # ignored: the start token comes first
        tokens, logds = [], []
        for n in range(self.steps):
            if context is None:
                params = self.net(token, cache=cache)
            else:
                params = self.net(token, context, cache=cache)
            token, logd = self.kernel.inverse(z[..., n : n + 1, :], params, -1)
            tokens.append(token)
            if logd is not None:
                logds.append(logd)
        x = torch.cat(tokens, dim=-2)
        return x, self._ladj(torch.cat(logds, dim=-2) if logds else None, z)

    def conditioners(self) -> list[nn.Module]:
        """``[self.net]``: the conditioner network."""
        return [self.net]

    def extra_repr(self) -> str:
        shape = self.shape[0] if self.event_dim == 1 else tuple(self.shape)
        ctx = f", context_features={self.context_features}" if self.context_features else ""
        cache = "" if self.use_cache else ", use_cache=False"
        return f"shape={shape}, kernel={self.kernel!r}{ctx}{cache}"
