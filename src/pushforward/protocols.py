"""The three interfaces a layer is built from, as typing protocols.

A layer is *structure x kernel x conditioner* (:class:`~pushforward.transforms.Coupling`,
:class:`~pushforward.transforms.Autoregressive`), and a :class:`~pushforward.core.Flow` is a transform
over a base density. Anything with these methods and attributes plugs in; nothing needs to inherit
from a pushforward class. The protocols are ``runtime_checkable``: the structures and ``Flow`` check
that what they are given has the right *names* (``isinstance`` cannot check signatures), so a
mistake is a ``TypeError`` at construction rather than an ``AttributeError`` on the first batch.

- :class:`Kernel`: an elementwise bijection ``y = k(x; params)`` with ``params`` parameters per element.
- :class:`ConditionerFactory`: ``(in_features, out_features, context_features) -> nn.Module``; the
  structure, which knows all three widths, calls it.
- :class:`BaseDistribution`: the base density ``p_z`` of a flow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["BaseDistribution", "ConditionerFactory", "Kernel"]


@runtime_checkable
class Kernel(Protocol):
    """An elementwise bijection ``y = k(x; p)``, the identity at ``p = 0``.

    The conditioner's output holds ``params`` blocks of the transformed part's size stacked along
    ``dim`` (e.g. ``(*batch, params * D_b)`` for vectors, ``(*batch, params * C_b, H, W)`` for images,
    ``(*batch, N, params * P)`` for sequences). ``forward`` and ``inverse`` return the result and the
    elementwise ``log|dy/dx|`` of the map applied, of ``x``'s shape, or ``None`` when it is zero
    everywhere (volume preserving kernels); the structure sums it over the event.

    Attributes:
        params: parameters per transformed element.

    Examples: :class:`~pushforward.transforms.AdditiveKernel`, :class:`~pushforward.transforms.AffineKernel`,
    :class:`~pushforward.transforms.SplineKernel`.
    """

    params: int

    def forward(self, x: Tensor, params: Tensor, dim: int) -> tuple[Tensor, Tensor | None]:
        """``(y, log|dy/dx|)`` of ``x``'s shape; ``params`` holds ``self.params`` blocks along ``dim``."""
        ...

    def inverse(self, y: Tensor, params: Tensor, dim: int) -> tuple[Tensor, Tensor | None]:
        """``(x, log|dx/dy|)`` of ``y``'s shape, with the same ``params`` as :meth:`forward`."""
        ...


class ConditionerFactory(Protocol):
    """Builds a conditioner network; the structure calls it with all three widths, positionally.

    ``factory(in_features, out_features, context_features)`` returns an ``nn.Module`` called as
    ``net(x)`` or ``net(x, context)`` (``context`` of shape ``(*batch, context_features)``) that
    returns the kernel's parameters, ``out_features`` along the structure's feature (or channel)
    axis. Start it as the identity layer: zero-initialise its last layer (every network of
    :mod:`pushforward.nn` does). Options are bound with ``functools.partial``, e.g.
    ``partial(MLP, hidden=(256, 256))``; the networks of :mod:`pushforward.nn` take the three widths
    as their first three arguments. What the output must depend on is the structure's part of the
    contract (:class:`~pushforward.transforms.Coupling`, :class:`~pushforward.transforms.Autoregressive`).
    """

    def __call__(self, in_features: int, out_features: int, context_features: int, /) -> nn.Module: ...


@runtime_checkable
class BaseDistribution(Protocol):
    """The base density ``p_z`` of a :class:`~pushforward.core.Flow`.

    Make it an ``nn.Module`` whose tensors are buffers or parameters, so it follows ``.to()`` and is
    saved with the flow (:mod:`pushforward.distributions`).

    Attributes:
        event_shape: the shape of one latent, e.g. ``(2,)`` or ``(1, 28, 28)``.
    """

    event_shape: torch.Size

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p_z(z | context)`` of ``z`` of shape ``(*batch, *event_shape)``; shape ``(*batch,)``."""
        ...

    def sample(self, shape: Sequence[int], context: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        """Latents of shape ``(*shape, *event_shape)``, the spread scaled by ``temperature``."""
        ...
