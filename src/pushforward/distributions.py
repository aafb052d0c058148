"""Base densities ``p_z`` for flows. Their tensors are buffers or parameters, so they follow ``.to()``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .core import sum_event

__all__ = ["DiagonalNormal", "GaussianMixture", "StandardNormal"]

_LOG_2PI = math.log(2 * math.pi)


def _shape(shape: int | Sequence[int]) -> torch.Size:
    return torch.Size((shape,) if isinstance(shape, int) else tuple(shape))


class StandardNormal(nn.Module):
    """The standard normal ``N(0, I)`` over events of shape ``event_shape``.

    ``log_prob`` takes ``(*batch, *event_shape)`` and returns ``(*batch,)``; ``sample`` returns
    ``(*shape, *event_shape)``. The base density of every recipe.

    Args:
        event_shape: e.g. ``2`` or ``(1, 28, 28)``.

    References:
        Rezende & Mohamed, "Variational Inference with Normalizing Flows", 2015 (the base density
        ``p_z`` of a flow).
    """

    _anchor: Tensor

    def __init__(self, event_shape: int | Sequence[int]):
        super().__init__()
        self.event_shape = _shape(event_shape)
        # A zero-sized buffer carries dtype and device through .to() for sampling.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """``log N(z; 0, I)`` summed over the event; shape ``(*batch,)``."""
        nd = len(self.event_shape)
        return -0.5 * sum_event(z.square(), nd) - 0.5 * math.prod(self.event_shape) * _LOG_2PI

    def sample(self, shape: Sequence[int], context: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        """Samples ``temperature * eps`` with ``eps ~ N(0, I)``; shape ``(*shape, *event_shape)``."""
        eps = torch.randn(*shape, *self.event_shape, dtype=self._anchor.dtype, device=self._anchor.device)
        return eps * temperature

    def extra_repr(self) -> str:
        return f"event_shape={tuple(self.event_shape)}"


class DiagonalNormal(nn.Module):
    """A learned diagonal normal ``N(loc, diag(exp(log_scale))^2)``, initialised at ``N(0, I)``.

    ``loc`` and ``log_scale`` have shape ``event_shape``; ``log_prob`` maps ``(*batch, *event_shape)``
    to ``(*batch,)`` and ``sample`` returns ``(*shape, *event_shape)``, the spread scaled by
    ``temperature``. Equivalent to a standard normal base behind an elementwise affine layer.

    Args:
        event_shape: e.g. ``2`` or ``(1, 28, 28)``.
    """

    def __init__(self, event_shape: int | Sequence[int]):
        super().__init__()
        self.event_shape = _shape(event_shape)
        self.loc = nn.Parameter(torch.zeros(self.event_shape))
        self.log_scale = nn.Parameter(torch.zeros(self.event_shape))

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """``log N(z; loc, diag(scale)^2)`` summed over the event; shape ``(*batch,)``."""
        nd = len(self.event_shape)
        e = (z - self.loc) * torch.exp(-self.log_scale)
        const = 0.5 * math.prod(self.event_shape) * _LOG_2PI
        return -0.5 * sum_event(e.square(), nd) - self.log_scale.sum() - const

    def sample(self, shape: Sequence[int], context: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        eps = torch.randn(*shape, *self.event_shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + temperature * eps * self.log_scale.exp()

    def extra_repr(self) -> str:
        return f"event_shape={tuple(self.event_shape)}"


class GaussianMixture(nn.Module):
    """A learned mixture of ``components`` diagonal normals over events of shape ``event_shape``.

    Initialised with means spread by ``N(0, spread^2)``, unit scales and equal weights.
    ``temperature`` scales each component's spread around its mean. ``log_prob`` maps
    ``(*batch, *event_shape)`` to ``(*batch,)`` (a ``logsumexp`` over the components); ``sample``
    returns ``(*shape, *event_shape)``.

    Args:
        event_shape: e.g. ``2`` or ``(1, 28, 28)``.
        components: number of mixture components ``K``.
        spread: standard deviation of the initial means.
    """

    def __init__(self, event_shape: int | Sequence[int], components: int = 8, spread: float = 1.0):
        super().__init__()
        self.event_shape = _shape(event_shape)
        self.components = components
        self.logits = nn.Parameter(torch.zeros(components))
        self.loc = nn.Parameter(spread * torch.randn(components, *self.event_shape))
        self.log_scale = nn.Parameter(torch.zeros(components, *self.event_shape))

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        nd = len(self.event_shape)
        e = (z.unsqueeze(-nd - 1) - self.loc) * torch.exp(-self.log_scale)  # (*batch, K, *event)
        per = -0.5 * sum_event(e.square(), nd) - sum_event(self.log_scale, nd)
        per = per - 0.5 * math.prod(self.event_shape) * _LOG_2PI
        return torch.logsumexp(per + torch.log_softmax(self.logits, -1), dim=-1)

    def sample(self, shape: Sequence[int], context: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        n = math.prod(shape)
        k = torch.multinomial(torch.softmax(self.logits, -1), n, replacement=True)
        eps = torch.randn(n, *self.event_shape, dtype=self.loc.dtype, device=self.loc.device)
        z = self.loc[k] + temperature * eps * self.log_scale[k].exp()
        return z.reshape(*shape, *self.event_shape)

    def extra_repr(self) -> str:
        return f"event_shape={tuple(self.event_shape)}, components={self.components}"
