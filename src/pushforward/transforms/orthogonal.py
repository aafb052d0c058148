"""Orthogonal linear layers: products of Householder reflections.

A Householder reflection ``H_v = I - 2 v v^T / |v|^2`` is orthogonal and symmetric (its own inverse)
with determinant ``-1``; a product of ``K`` of them is orthogonal, so ``log|det| = 0`` and the inverse
is the transpose. Any orthogonal ``D x D`` matrix is a product of at most ``D`` reflections.

References:
    Householder, "Unitary Triangularization of a Nonsymmetric Matrix", 1958.
    Tomczak & Welling, "Improving Variational Auto-Encoders using Householder Flow", 2016.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core import Transform, shape_checks_enabled

__all__ = ["Householder"]


class Householder(Transform):
    """``z = Q x`` with ``Q = H_{v_K} ... H_{v_1}`` a product of ``K`` Householder reflections.

    ``Q`` is rebuilt from the vectors ``v_k`` on every call (``K`` rank-one updates of a ``D x D``
    matrix, nothing cached), then applied as one matrix product; the inverse applies ``Q^T``.
    Volume preserving: ``ladj = 0``. The vectors start random (a reflection by the zero vector is
    undefined; its norm is floored, which makes it the identity); the layer reads no context.

    Args:
        features: the event size ``D``; inputs are ``(*, D)``.
        reflections: the number ``K`` of reflections (default ``D``: every orthogonal matrix of
            determinant ``(-1)**D`` is reachable).

    Raises:
        ValueError: If ``features < 1`` or ``reflections < 1``.

    References:
        Tomczak & Welling, "Improving Variational Auto-Encoders using Householder Flow", 2016.
    """

    def __init__(self, features: int, reflections: int | None = None):
        super().__init__()
        reflections = features if reflections is None else reflections
        if features < 1 or reflections < 1:
            raise ValueError(f"Householder needs features >= 1 and reflections >= 1, got {features} and "
                             f"{reflections}")
        self.features, self.reflections = features, reflections
        self.vectors = nn.Parameter(torch.randn(reflections, features))

    def matrix(self) -> Tensor:
        """The orthogonal matrix ``Q = H_{v_K} ... H_{v_1}``, shape ``(D, D)``."""
        q = torch.eye(self.features, dtype=self.vectors.dtype, device=self.vectors.device)
        units = self.vectors / self.vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        for u in units:  # Q <- H_u Q = Q - 2 u (u^T Q)
            q = q - 2 * torch.outer(u, u @ q)
        return q

    def _check(self, x: Tensor) -> None:
        if shape_checks_enabled() and (x.dim() < 1 or x.shape[-1] != self.features):
            raise ValueError(f"Householder over {self.features} features got a tensor of shape "
                             f"{tuple(x.shape)}")

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``z = Q x`` (data -> latent).

        Args:
            x: data of shape ``(*batch, D)``.
            context: ignored.

        Returns:
            ``(z, ladj)``: ``z`` of shape ``(*batch, D)`` and zeros of shape ``(*batch,)``.

        Raises:
            ValueError: If ``x`` does not end in ``D`` features.
        """
        self._check(x)
        return x @ self.matrix().T, x.new_zeros(x.shape[:-1])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x = Q^T z`` (latent -> data).

        Args:
            z: latent of shape ``(*batch, D)``.
            context: ignored.

        Returns:
            ``(x, ladj)``: ``x`` of shape ``(*batch, D)`` and zeros of shape ``(*batch,)``.

        Raises:
            ValueError: If ``z`` does not end in ``D`` features.
        """
        self._check(z)
        return z @ self.matrix(), z.new_zeros(z.shape[:-1])

    def extra_repr(self) -> str:
        return f"features={self.features}, reflections={self.reflections}"
