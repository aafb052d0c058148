"""Reshaping transforms for multi-scale image flows (volume preserving: ``log|det| = 0``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Transform, shape_checks_enabled

__all__ = ["FactorOut", "Squeeze", "Unsqueeze"]


def _zeros(x: Tensor) -> Tensor:
    return x.new_zeros(x.shape[:-3])


def _check_image(x: Tensor, who: str) -> None:
    if x.dim() < 4:
        raise ValueError(f"{who} expects images of shape (B, C, H, W), got shape {tuple(x.shape)}")


def squeeze(x: Tensor, factor: int = 2) -> Tensor:
    """Space-to-depth: ``(B, C, H, W) -> (B, C f^2, H/f, W/f)``."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // factor, factor, w // factor, factor)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, c * factor * factor, h // factor, w // factor)


def unsqueeze(x: Tensor, factor: int = 2) -> Tensor:
    """Depth-to-space, the inverse of :func:`squeeze`."""
    b, c, h, w = x.shape
    x = x.reshape(b, c // (factor * factor), factor, factor, h, w)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, c // (factor * factor), h * factor, w * factor)


class Squeeze(Transform):
    """Trades spatial resolution for channels: each ``f x f`` block becomes ``f^2`` channels.

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2017, section 3.6.
    """

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_image(x, "Squeeze")
        h, w = x.shape[-2:]
        if shape_checks_enabled() and (h % self.factor or w % self.factor):
            raise ValueError(
                f"Squeeze(factor={self.factor}) needs height and width divisible by {self.factor}, "
                f"got an image of {h}x{w}"
            )
        return squeeze(x, self.factor), _zeros(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_image(z, "Squeeze.inverse")
        if shape_checks_enabled() and z.shape[-3] % (self.factor**2):
            raise ValueError(f"Squeeze.inverse needs channels divisible by {self.factor ** 2}, "
                             f"got {z.shape[-3]}")
        return unsqueeze(z, self.factor), _zeros(z)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class Unsqueeze(Transform):
    """Depth-to-space, :class:`Squeeze` run backwards (returns a multi-scale latent to image shape).

    ``(*, C f^2, H, W) -> (*, C, H f, W f)``; ``log|det| = 0``.

    Args:
        factor: the block size ``f``.

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2017, section 3.6.
    """

    def __init__(self, factor: int = 2):
        super().__init__()
        self.squeeze = Squeeze(factor)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.squeeze.inverse(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.squeeze(z, context)


class FactorOut(Transform):
    """Multi-scale factor-out that keeps one latent tensor.

    The first ``channels - factored`` channels go on through ``transform`` (the deeper scales);
    the remaining ``factored`` channels are final latents and pass unchanged. The outputs are
    concatenated back, so the latent keeps the input's shape and the flow has one latent tensor
    and one base density.

    Args:
        channels: channels of the input ``(*, C, H, W)``.
        transform: the flow applied to the kept channels.
        factored: how many channels to factor out (default: half, rounded down).

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2017, section 3.6.
    """

    def __init__(self, channels: int, transform: Transform, factored: int | None = None):
        super().__init__()
        factored = channels // 2 if factored is None else factored
        if not 0 < factored < channels:
            raise ValueError(
                f"FactorOut must keep and factor out at least one channel each; got {channels} channel(s) "
                f"and factored={factored}"
            )
        self.channels, self.factored = channels, factored
        self.transform = transform

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_image(x, "FactorOut")
        if x.shape[-3] != self.channels:
            raise ValueError(f"FactorOut expects {self.channels} channels, got shape {tuple(x.shape)}")
        kept = self.channels - self.factored
        return x[..., :kept, :, :], x[..., kept:, :, :]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x1, x2 = self._split(x)
        z1, ladj = self.transform(x1, context)
        return torch.cat([z1, x2], dim=-3), ladj

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z1, z2 = self._split(z)
        x1, ladj = self.transform.inverse(z1, context)
        return torch.cat([x1, z2], dim=-3), ladj

    def extra_repr(self) -> str:
        return f"channels={self.channels}, factored={self.factored}"
