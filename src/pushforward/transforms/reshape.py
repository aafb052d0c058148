"""Reshaping transforms (volume preserving: ``log|det| = 0``): squeeze and factor-out for multi-scale image
flows, patchify for Transformer flows over patch sequences."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Transform, shape_checks_enabled

__all__ = ["FactorOut", "Patchify", "Squeeze", "Unpatchify", "Unsqueeze"]


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


def patchify(x: Tensor, patch: int) -> Tensor:
    """``(*, C, H, W) -> (*, (H/p)(W/p), C p^2)``: patches in raster order, each flattened channel-major."""
    *batch, c, h, w = x.shape
    x = x.reshape(*batch, c, h // patch, patch, w // patch, patch)
    x = x.movedim(-5, -1)  # (*, H/p, p, W/p, p, C)
    x = x.transpose(-4, -3)  # (*, H/p, W/p, p, p, C)
    return x.reshape(*batch, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(x: Tensor, patch: int, shape: tuple[int, int, int]) -> Tensor:
    """The inverse of :func:`patchify`: ``(*, N, P) -> (*, C, H, W)`` for the image ``shape = (C, H, W)``."""
    c, h, w = shape
    *batch, _, _ = x.shape
    x = x.reshape(*batch, h // patch, w // patch, patch, patch, c)
    x = x.transpose(-4, -3)  # (*, H/p, p, W/p, p, C)
    return x.movedim(-1, -5).reshape(*batch, c, h, w)


class Patchify(Transform):
    """Cuts images ``(*, C, H, W)`` into ``N = (H/p)(W/p)`` patch tokens of ``P = C p^2`` features each.

    Patches come in raster order (row by row), each flattened as ``(row, column, channel)`` within the
    patch. A permutation of the pixels, so ``log|det| = 0``. :class:`Unpatchify` is the inverse.

    Args:
        shape: the image shape ``(C, H, W)``.
        patch: the patch size ``p`` (dividing ``H`` and ``W``).

    Raises:
        ValueError: If ``patch`` does not divide the height and width, or an input has another shape.

    References:
        Dosovitskiy et al., "An Image is Worth 16x16 Words", 2021 (patch tokens).
        Zhai et al., "Normalizing Flows are Capable Generative Models", 2025 (TarFlow).
    """

    def __init__(self, shape: tuple[int, int, int] | list[int], patch: int):
        super().__init__()
        shape_ = tuple(int(s) for s in shape)
        if len(shape_) != 3 or min(shape_) < 1:
            raise ValueError(f"Patchify expects an image shape (C, H, W), got {tuple(shape)}")
        c, h, w = shape_
        if patch < 1 or h % patch or w % patch:
            raise ValueError(f"Patchify(patch={patch}) needs a patch size that divides the height and width, "
                             f"got an image of {h}x{w}")
        self.shape, self.patch = shape_, patch
        self.tokens, self.features = (h // patch) * (w // patch), c * patch * patch

    def _check(self, x: Tensor, shape: tuple[int, ...], who: str) -> None:
        if shape_checks_enabled() and tuple(x.shape[x.dim() - len(shape):]) != shape:
            raise ValueError(f"{who} expects inputs of shape (*, {', '.join(map(str, shape))}), "
                             f"got {tuple(x.shape)}")

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(*, C, H, W) -> (*, N, P)``; ``ladj`` zeros of shape ``(*,)``."""
        self._check(x, self.shape, "Patchify")
        return patchify(x, self.patch), x.new_zeros(x.shape[:-3])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(*, N, P) -> (*, C, H, W)``; ``ladj`` zeros of shape ``(*,)``."""
        self._check(z, (self.tokens, self.features), "Patchify.inverse")
        return unpatchify(z, self.patch, self.shape), z.new_zeros(z.shape[:-2])

    def extra_repr(self) -> str:
        return f"shape={self.shape}, patch={self.patch}, tokens={self.tokens}, features={self.features}"


class Unpatchify(Transform):
    """Patch tokens ``(*, N, P)`` back to images ``(*, C, H, W)``: :class:`Patchify` run backwards.

    Args:
        shape: the image shape ``(C, H, W)``.
        patch: the patch size ``p``.

    References:
        Zhai et al., "Normalizing Flows are Capable Generative Models", 2025 (TarFlow).
    """

    def __init__(self, shape: tuple[int, int, int] | list[int], patch: int):
        super().__init__()
        self.patchify = Patchify(shape, patch)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.patchify.inverse(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.patchify(z, context)
