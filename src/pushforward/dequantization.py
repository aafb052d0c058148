"""Dequantization of discrete data, uniform or variational, with one exact bits/dim bound.

Discrete ``x`` in ``{0, ..., K-1}^D`` becomes continuous ``y = (x + u) / K`` with ``u`` in ``[0, 1)^D``.
For any density ``q(u | x)`` on the unit cube, Jensen's inequality gives

    -log P(x) <= E_q[ -log p_Y(y) + log q(u | x) ] + D log K,

so the bound is the flow's NLL of ``y`` plus ``log q`` (zero for uniform noise), and bits/dim is the
same formula either way (:func:`pushforward.metrics.bits_per_dim`).

References:
    Ho, Chen, Srinivas, Duan & Abbeel, "Flow++", 2019, section 3.1 (variational dequantization).
    Theis, van den Oord & Bethge, "A note on the evaluation of generative models", 2016.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .core import Compose, Transform, validation_enabled
from .distributions import StandardNormal
from .nn import ConvNet
from .transforms import AffineKernel, ChannelMask, CheckerboardMask, Coupling, Logit

__all__ = ["UniformDequantizer", "VariationalDequantizer"]


def _check_values(x: Tensor, quantization_levels: int) -> None:
    top = quantization_levels - 1
    if x.is_floating_point() or x.is_complex():
        raise TypeError(f"dequantization expects integer data in [0, {top}], got {x.dtype}")
    if validation_enabled() and x.numel() and (int(x.min()) < 0 or int(x.max()) > top):
        raise ValueError(
            f"dequantization expects integers in [0, {top}], got values in [{int(x.min())}, {int(x.max())}]"
        )


class UniformDequantizer(nn.Module):
    """Uniform dequantization: ``u ~ U[0, 1)^D``, so ``log q(u | x) = 0``.

    Maps integer data ``(B, *event)`` in ``[0, K - 1]`` to ``y = (x + u) / K`` of the same shape in
    ``[0, 1)``, plus a zero ``log q`` of shape ``(B,)``; the interface of :class:`VariationalDequantizer`.

    Args:
        quantization_levels: number of discrete values ``K`` per dimension (256 for 8-bit pixels).

    References:
        Uria, Murray & Larochelle, "RNADE", 2013; Theis, van den Oord & Bethge, "A note on the
        evaluation of generative models", 2016.
    """

    def __init__(self, quantization_levels: int):
        super().__init__()
        self.quantization_levels = quantization_levels

    def forward(self, x: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Returns ``y = (x + u) / K`` of shape ``x.shape`` and ``log q(u | x)`` of shape ``(B,)``."""
        _check_values(x, self.quantization_levels)
        u = torch.rand(x.shape, dtype=dtype, device=x.device)
        y = ((x.to(dtype) + u) / self.quantization_levels).clamp(max=1 - torch.finfo(dtype).eps)
        return y, y.new_zeros(x.shape[0])


class VariationalDequantizer(nn.Module):
    """A conditional flow ``q(u | x)`` on ``(0, 1)^{C x H x W}``, trained jointly with the model.

    ``u = sigmoid(g(eps; x))`` with ``eps ~ N(0, I)`` and ``g`` a stack of affine couplings
    (checkerboard, and channel masks when ``C >= 2``) whose ConvNet conditioners also see the
    image ``x / (K - 1) - 0.5`` as extra input channels.

    Args:
        shape: image shape ``(C, H, W)``.
        quantization_levels: number of discrete values ``K`` per dimension (256 for 8-bit pixels).
        layers: number of couplings.
        hidden_channels: conditioner width.

    References:
        Ho, Chen, Srinivas, Duan & Abbeel, "Flow++", 2019, section 3.1.
    """

    def __init__(self, shape: Sequence[int], quantization_levels: int, layers: int = 4,
                 hidden_channels: int = 32):
        super().__init__()
        c, h, w = shape
        self.quantization_levels = quantization_levels
        net = functools.partial(ConvNet, hidden_channels=hidden_channels, context_channels=c)
        ts: list[Transform] = [Logit(0.0, event_dim=3)]  # u in (0, 1) -> R, data -> latent direction
        for i in range(layers):
            use_channels = c >= 2 and i % 2 == 1
            mask = (ChannelMask(c, flip=bool(i // 2 % 2)) if use_channels
                    else CheckerboardMask(c, h, w, flip=bool(i % 4 == 2)))
            ts.append(Coupling(mask, AffineKernel(), net))
        self.transform = Compose(*ts)
        self.base = StandardNormal(tuple(shape))

    def _context(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        return x.to(dtype) / (self.quantization_levels - 1) - 0.5

    def log_q(self, u: Tensor, x: Tensor) -> Tensor:
        """``log q(u | x)`` for given noise ``u`` in ``(0, 1)``; shape ``(B,)``."""
        eps, ladj = self.transform(u, self._context(x, u.dtype))
        return self.base.log_prob(eps) + ladj

    def forward(self, x: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Samples ``u ~ q(u | x)``; returns ``y = (x + u) / K`` and ``log q(u | x)`` (shape ``(B,)``)."""
        _check_values(x, self.quantization_levels)
        context = self._context(x, dtype)
        eps = self.base.sample((x.shape[0],)).to(dtype)
        u, ladj = self.transform.inverse(eps, context)
        log_q = self.base.log_prob(eps) - ladj
        u = u.clamp(torch.finfo(dtype).tiny, 1 - torch.finfo(dtype).eps)
        return (x.to(dtype) + u) / self.quantization_levels, log_q
