"""The contract: transforms, their composition, and the flow they define.

A :class:`Transform` is a bijective ``nn.Module``. Its ``forward`` maps **data to latent** (the
direction used for training and density evaluation) and its ``inverse`` maps latent to data. Both
return ``(y, ladj)`` where ``ladj`` is the log absolute determinant of the Jacobian of the map that
was applied, already summed over the event dimensions, so ``ladj.shape`` is the batch shape.

A :class:`Flow` pairs a transform ``f`` with a base density ``p_z`` and evaluates the change of
variables formula ``log p(x) = log p_z(f(x)) + log|det Df(x)|``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

__all__ = ["Transform", "Inverse", "Compose", "Flow", "FlowDistribution", "sum_event", "set_validation",
           "validation_enabled"]

_VALIDATION = True


def set_validation(enabled: bool) -> None:
    """Switches every input check of pushforward on or off (flows, domains of pointwise transforms).

    Checks cost a host synchronisation per call; they are skipped under ``torch.compile`` anyway.
    """
    global _VALIDATION
    _VALIDATION = bool(enabled)


def validation_enabled() -> bool:
    """Whether input checks run now (enabled, and not tracing under ``torch.compile``)."""
    return _VALIDATION and not torch.compiler.is_compiling()


def sum_event(x: Tensor, event_dim: int) -> Tensor:
    """Sums ``x`` over its ``event_dim`` trailing dimensions.

    This turns elementwise log-derivatives into a log-determinant per event, which is how every
    transform reduces its ``ladj`` to the batch shape.

    Args:
        x: a tensor of shape ``(*batch, *event)`` with ``len(event) == event_dim``.
        event_dim: number of trailing (event) dimensions to sum over; ``0`` returns ``x`` itself.

    Returns:
        A tensor of shape ``(*batch,)``, i.e. ``x.shape[:x.dim() - event_dim]``.
    """
    if event_dim == 0:
        return x
    if event_dim == 1:
        return x.sum(-1)
    return x.sum(dim=tuple(range(-event_dim, 0)))


class Transform(nn.Module):
    """A bijection with a tractable log-determinant.

    Subclasses implement :meth:`forward` (data -> latent) and :meth:`inverse` (latent -> data).
    Each returns ``(y, ladj)`` with ``ladj`` of shape ``x.shape[:-event_dim]``. ``context`` is an
    optional conditioning tensor of shape ``(*batch, context_features)``; transforms that do not
    use it ignore it.
    """

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Maps data to latent: ``z = f(x)``.

        Args:
            x: data of shape ``(*batch, *event)``.
            context: optional conditioning tensor of shape ``(*batch, context_features)``.

        Returns:
            ``(z, ladj)``: ``z`` of the same shape as ``x``, and ``ladj = log|det Df(x)|``
            summed over the event dimensions, of shape ``(*batch,)`` (``x.shape[:-event_dim]``).
        """
        raise NotImplementedError

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Maps latent to data: ``x = f^{-1}(z)``.

        Args:
            z: latent of shape ``(*batch, *event)``.
            context: optional conditioning tensor of shape ``(*batch, context_features)``.

        Returns:
            ``(x, ladj)``: ``x`` of the same shape as ``z``, and ``ladj = log|det Df^{-1}(z)|``
            (``= -log|det Df(x)|``) summed over the event dimensions, of shape ``(*batch,)``.
        """
        raise NotImplementedError

    @property
    def inv(self) -> Transform:
        """The inverse transform, as a module sharing this one's parameters."""
        return Inverse(self)


class Inverse(Transform):
    """Swaps the two directions of ``transform`` (sharing its parameters).

    Example: ``Inverse(Logit())`` is the sigmoid, with the log-determinants exchanged.
    """

    def __init__(self, transform: Transform):
        super().__init__()
        self.transform = transform

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Applies the wrapped transform's :meth:`~Transform.inverse`.

        Args:
            x: input of shape ``(*batch, *event)``.
            context: optional conditioning tensor of shape ``(*batch, context_features)``.

        Returns:
            ``(y, ladj)`` as returned by ``transform.inverse(x, context)``; ``ladj`` has shape
            ``(*batch,)``.
        """
        return self.transform.inverse(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Applies the wrapped transform's :meth:`~Transform.forward`.

        Args:
            z: input of shape ``(*batch, *event)``.
            context: optional conditioning tensor of shape ``(*batch, context_features)``.

        Returns:
            ``(x, ladj)`` as returned by ``transform(z, context)``; ``ladj`` has shape ``(*batch,)``.
        """
        return self.transform(z, context)

    @property
    def inv(self) -> Transform:
        return self.transform


class Compose(Transform):
    """The composition ``f = f_n o ... o f_1`` applied in the order given (data -> latent).

    The only place that loops over layers and sums their log-determinants:
    ``log|det Df(x)| = sum_i log|det Df_i(y_{i-1})|`` (lecture: function composition).

    Every layer is called through ``nn.Module.__call__`` (forward) or its ``inverse``, one by one,
    and nothing about the layers is cached: replacing or appending a layer, hooks,
    ``torch.nn.utils.parametrize``, weight or spectral norm and ``.to()`` all take effect at once.
    """

    def __init__(self, *transforms: Transform):
        super().__init__()
        if len(transforms) == 1 and isinstance(transforms[0], Sequence):
            transforms = tuple(transforms[0])
        for i, t in enumerate(transforms):
            if not isinstance(t, Transform):
                raise TypeError(f"Compose expects Transform modules, got {type(t).__name__} at position {i}")
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Applies the layers in order (data -> latent), summing their log-determinants.

        Args:
            x: data of shape ``(*batch, *event)``.
            context: optional conditioning tensor of shape ``(*batch, context_features)``, passed
                to every layer.

        Returns:
            ``(z, ladj)`` with ``ladj = sum_i log|det Df_i|`` of shape ``(*batch,)``.

        Raises:
            ValueError: If the composition holds no transforms.
        """
        ladj = None
        for t in self.transforms:
            x, l = t(x, context)
            ladj = l if ladj is None else ladj + l
        return x, self._total(ladj)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Applies the layers' inverses in reverse order (latent -> data), summing their log-determinants.

        Args:
            z: latent of shape ``(*batch, *event)``.
            context: optional conditioning tensor of shape ``(*batch, context_features)``.

        Returns:
            ``(x, ladj)`` with ``ladj = log|det Df^{-1}(z)|`` of shape ``(*batch,)``.

        Raises:
            ValueError: If the composition holds no transforms.
        """
        ladj = None
        for t in reversed(self.transforms):
            z, l = t.inverse(z, context)
            ladj = l if ladj is None else ladj + l
        return z, self._total(ladj)

    @staticmethod
    def _total(ladj: Tensor | None) -> Tensor:
        if ladj is None:
            raise ValueError("Compose() of no transforms has no batch shape; add at least one transform")
        return ladj

    def __len__(self) -> int:
        return len(self.transforms)

    def __getitem__(self, i: int) -> Transform:
        return self.transforms[i]


class Flow(nn.Module):
    """A normalizing flow: the pushforward of ``base`` through the inverse of ``transform``.

    Args:
        transform: maps data ``x`` of shape ``(*batch, *event_shape)`` to latents of the same
            shape as the base's events.
        base: the base density ``p_z`` (see :mod:`pushforward.distributions`).
        embedding: optional module applied once to ``context`` before any transform sees it.
        validate: check inputs (shape, dtype, finiteness) with clear errors; skipped under
            ``torch.compile`` and when :func:`set_validation` switched all checks off.

    ``flow(context)`` returns a genuine :class:`torch.distributions.Distribution`.

    References:
        Rezende & Mohamed, "Variational Inference with Normalizing Flows", 2015.
    """

    def __init__(
        self,
        transform: Transform,
        base: nn.Module,
        embedding: nn.Module | None = None,
        validate: bool = True,
    ):
        super().__init__()
        self.transform = transform
        self.base = base
        self.embedding = embedding
        self.validate = validate
        #: Recipe name and arguments, set by :mod:`pushforward.models` so a flow can be rebuilt.
        self.config: dict | None = None

    @property
    def event_shape(self) -> torch.Size:
        return self.base.event_shape

    # -- helpers -----------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        for b in self.buffers():
            if b.is_floating_point():
                return b.dtype
        return torch.get_default_dtype()

    def _check(self, x: Tensor, context: Tensor | None, what: str) -> None:
        shape = tuple(self.event_shape)
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} expects a torch.Tensor of event shape {shape}, got {type(x).__name__}")
        if tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
            raise ValueError(
                f"{what} expects a tensor of shape (*batch, {', '.join(map(str, shape))}), "
                f"got shape {tuple(x.shape)}"
            )
        dtype = self._dtype()
        if x.dtype != dtype:
            raise TypeError(
                f"{what} expects a {dtype} tensor (the flow's dtype), got {x.dtype}"
                + ("; dequantize integer data first (pushforward.data.dequantize)" if not x.is_floating_point() else "")
            )
        if not bool(torch.isfinite(x).all()):
            bad = (~torch.isfinite(x)).sum().item()
            raise ValueError(f"{what} got {bad} non-finite value(s) (NaN or Inf) in its input")
        if context is not None and context.dtype != dtype:
            raise TypeError(f"context must be {dtype} like the flow, got {context.dtype}")

    def _context(self, context: Tensor | None) -> Tensor | None:
        if context is not None and self.embedding is not None:
            context = self.embedding(context)
        return context

    def _flatten(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor | None, torch.Size]:
        """Flattens batch dims to one, broadcasting ``context`` against them."""
        nd = len(self.event_shape)
        batch = x.shape[: x.dim() - nd]
        if context is not None:
            cbatch = context.shape[:-1]
            batch = torch.broadcast_shapes(batch, cbatch)
            x = x.expand(*batch, *self.event_shape)
            context = context.expand(*batch, context.shape[-1]).reshape(-1, context.shape[-1])
        return x.reshape(-1, *self.event_shape), context, batch

    # -- the model ---------------------------------------------------------------------------
    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(x) = log p_z(f(x)) + log|det Df(x)|``; shape ``(*batch,)``."""
        if self.validate and validation_enabled():
            self._check(x, context, "log_prob")
        context = self._context(context)
        x, context, batch = self._flatten(x, context)
        z, ladj = self.transform(x, context)
        return (self.base.log_prob(z, context) + ladj).reshape(batch)

    def _sample_shape(self, shape: int | Sequence[int], context: Tensor | None) -> torch.Size:
        shape = torch.Size((shape,) if isinstance(shape, int) else tuple(shape))
        if context is not None:
            shape = shape + context.shape[:-1]
        return shape

    def _sample(self, shape, context, temperature, with_log_prob: bool):
        context = self._context(context)
        shape = self._sample_shape(shape, context)
        n = math.prod(shape)
        if context is not None:
            context = context.expand(*shape, context.shape[-1]).reshape(n, context.shape[-1])
        z = self.base.sample((n,), context, temperature=temperature)
        x, ladj = self.transform.inverse(z, context)
        x = x.reshape(*shape, *self.event_shape)
        if not with_log_prob:
            return x
        return x, (self.base.log_prob(z, context) - ladj).reshape(shape)

    def sample(
        self, shape: int | Sequence[int] = (), context: Tensor | None = None, temperature: float = 1.0
    ) -> Tensor:
        """Draws samples of shape ``(*shape, *context_batch, *event_shape)``.

        ``temperature`` scales the base's spread (0 gives the base mode pushed through the flow).
        """
        return self._sample(shape, context, temperature, with_log_prob=False)

    def rsample(self, shape: int | Sequence[int] = (), context: Tensor | None = None, temperature: float = 1.0):
        """Same as :meth:`sample`; samples are differentiable with respect to the parameters."""
        return self.sample(shape, context, temperature)

    def sample_and_log_prob(
        self, shape: int | Sequence[int] = (), context: Tensor | None = None, temperature: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """Samples and their model log-density in one inverse pass.

        The log-density is the model's (temperature 1) density at the returned samples.
        """
        return self._sample(shape, context, temperature, with_log_prob=True)

    def forward(self, context: Tensor | None = None) -> FlowDistribution:
        """Returns the distribution ``p(x | context)`` as a :class:`torch.distributions.Distribution`."""
        return FlowDistribution(self, context)

    def extra_repr(self) -> str:
        return f"event_shape={tuple(self.event_shape)}"


class FlowDistribution(Distribution):
    """A :class:`torch.distributions.Distribution` view of a :class:`Flow` at a given context."""

    has_rsample = True
    arg_constraints: dict = {}

    def __init__(self, flow: Flow, context: Tensor | None = None):
        self.flow = flow
        self.context = context
        batch = context.shape[:-1] if context is not None else torch.Size()
        super().__init__(batch_shape=batch, event_shape=flow.event_shape, validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        """The flow's log-density at ``value`` given this distribution's context (:meth:`Flow.log_prob`).

        Args:
            value: data of shape ``(*batch, *event_shape)``, broadcastable against the context's batch.

        Returns:
            ``log p(value | context)`` of shape ``(*batch,)``.
        """
        return self.flow.log_prob(value, self.context)

    def rsample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> Tensor:
        """Reparameterised samples (:meth:`Flow.sample` at temperature 1), differentiable in the parameters.

        Args:
            sample_shape: leading shape of the draws.

        Returns:
            Samples of shape ``(*sample_shape, *batch_shape, *event_shape)``.
        """
        return self.flow.sample(sample_shape, self.context)

    def sample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> Tensor:
        """Same as :meth:`rsample`, under ``torch.no_grad()`` (no autograd graph is kept).

        Args:
            sample_shape: leading shape of the draws.

        Returns:
            Samples of shape ``(*sample_shape, *batch_shape, *event_shape)``.
        """
        with torch.no_grad():
            return self.rsample(sample_shape)

    def rsample_and_log_prob(self, sample_shape=torch.Size()) -> tuple[Tensor, Tensor]:
        """Reparameterised samples and their log-density in one pass (:meth:`Flow.sample_and_log_prob`).

        Args:
            sample_shape (torch.Size | Sequence[int]): leading shape of the draws.

        Returns:
            ``(x, log_prob)``: samples of shape ``(*sample_shape, *batch_shape, *event_shape)`` and
            their log-density of shape ``(*sample_shape, *batch_shape)``.
        """
        return self.flow.sample_and_log_prob(sample_shape, self.context)

    @property
    def support(self):
        return torch.distributions.constraints.real

    def __repr__(self) -> str:
        return f"FlowDistribution(batch_shape={tuple(self.batch_shape)}, event_shape={tuple(self.event_shape)})"
