"""Masked autoregressive structure: ``z_i = kernel(x_i; h(x_<i))`` with ``h`` a MADE.

The Jacobian is triangular, so ``log|det|`` is the kernel's alone. ``forward`` (data -> latent,
density evaluation) is one network pass: this is MAF. ``inverse`` (sampling) must recover
``x_1, ..., x_D`` in order: ``D`` network passes. ``Inverse(Autoregressive(...))`` swaps the
costs: one-pass sampling, ``D``-pass density, which is IAF.

References:
    Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density Estimation", 2017.
    Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow", 2016.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..core import Transform
from ..nn import MADE

__all__ = ["Autoregressive"]


class Autoregressive(Transform):
    """An autoregressive transform of ``(*, features)`` vectors.

    Args:
        features: ``D``.
        kernel (AffineKernel | SplineKernel): an elementwise kernel (``AffineKernel()``,
            ``SplineKernel()``, ...); the MADE outputs ``kernel.params`` parameters per feature.
        hidden: MADE hidden sizes.
        context_features: size of an optional context.

    ``forward`` (MAF direction, density) costs one MADE pass; ``inverse`` (sampling) costs
    ``features`` passes. Both return ``(y, ladj)`` with ``y`` of shape ``(*, features)`` and
    ``ladj`` of shape ``(*,)``.

    References:
        Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density Estimation", 2017.
    """

    def __init__(self, features: int, kernel, hidden: Sequence[int] = (128, 128), context_features: int = 0):
        super().__init__()
        self.features = features
        self.kernel = kernel
        self.net = MADE(features, kernel.params, hidden, context_features=context_features)

    def _params(self, x: Tensor, context: Tensor | None) -> Tensor:
        return self.net(x) if context is None else self.net(x, context)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z, logd = self.kernel.forward(x, self._params(x, context), -1)
        return z, x.new_zeros(x.shape[:-1]) if logd is None else logd.sum(-1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # After pass i, entries 0..i are exact (each depends only on earlier ones).
        x = z.new_zeros(z.shape)
        logd = None
        for _ in range(self.features):
            x, logd = self.kernel.inverse(z, self._params(x, context), -1)
        return x, z.new_zeros(z.shape[:-1]) if logd is None else logd.sum(-1)

    def extra_repr(self) -> str:
        return f"features={self.features}, kernel={self.kernel!r}"
