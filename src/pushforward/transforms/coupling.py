"""Coupling flows: a layer is *structure (mask) x kernel x conditioner*.

A mask splits the input into a conditioning part ``x_a`` and a transformed part ``x_b``. A
conditioner network reads ``x_a`` (and the context) and outputs the kernel's parameters; the
kernel, an elementwise bijection, transforms ``x_b``:

    z_a = x_a,   z_b = kernel(x_b; conditioner(x_a)),   log|det| = sum log|kernel'(x_b)|.

The Jacobian is block triangular, so the log-determinant is the kernel's alone and the inverse
costs one conditioner pass (lecture: coupling flows).

References:
    Dinh, Krueger & Bengio, "NICE", 2015 (additive kernel).
    Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2017 (affine kernel, masks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..core import Transform, sum_event

__all__ = [
    "Mask",
    "IndexMask",
    "HalfMask",
    "AlternatingMask",
    "ChannelMask",
    "CheckerboardMask",
    "AdditiveKernel",
    "AffineKernel",
    "Coupling",
]


# --------------------------------------------------------------------------------------------
# Masks: how the input is split into (conditioning, transformed) parts.
# --------------------------------------------------------------------------------------------
class Mask(nn.Module):
    """Splits an input into the conditioner's input and the kernel's input, and merges back.

    Attributes:
        event_dim: 1 for vectors ``(*, D)``, 3 for images ``(*, C, H, W)``.
        in_features: size of the conditioner input's first event dim.
        out_features: size of the transformed part's first event dim.
    """

    event_dim: int
    in_features: int
    out_features: int

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def merge(self, x_a: Tensor, y_b: Tensor) -> Tensor:
        raise NotImplementedError

    def restrict(self, params: Tensor) -> Tensor:
        """Zeroes the kernel parameters where the kernel must act as the identity (default: nowhere)."""
        return params


class IndexMask(Mask):
    """Splits the first event dimension (features or channels) by index.

    Contiguous halves are split with slices (views, no copy); other index sets with ``index_select``
    (no boolean indexing, so it compiles without graph breaks).

    Args:
        features: size of the split dimension.
        cond: indices that condition (``x_a``); the rest are transformed.
        event_dim: 1 for vectors, 3 for images (splits channels).
    """

    def __init__(self, features: int, cond: list[int], event_dim: int = 1):
        super().__init__()
        cond = sorted(set(int(i) for i in cond))
        trans = [i for i in range(features) if i not in cond]
        if not cond or not trans or cond[0] < 0 or cond[-1] >= features:
            what = "channels" if event_dim == 3 else "features"
            raise ValueError(
                f"{type(self).__name__} must split {features} {what} into two non-empty parts; "
                f"got conditioning indices {cond}" + (" (needs at least 2)" if features < 2 else "")
            )
        self.features, self.event_dim = features, event_dim
        self.in_features, self.out_features = len(cond), len(trans)
        self.cond, self.trans = tuple(cond), tuple(trans)
        order = cond + trans
        self._first = "cond" if order == list(range(features)) else "trans" if trans + cond == list(range(features)) else None
        if self._first is None:
            self.register_buffer("cond_index", torch.tensor(cond))
            self.register_buffer("trans_index", torch.tensor(trans))
            self.register_buffer("merge_index", torch.argsort(torch.tensor(order)))

    def _check(self, x: Tensor) -> None:
        if x.shape[-self.event_dim] != self.features:
            raise ValueError(
                f"{type(self).__name__} splits {self.features} features on dim -{self.event_dim}, "
                f"got a tensor of shape {tuple(x.shape)}"
            )

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        dim = x.dim() - self.event_dim
        # one split node: its backward is a single cat (two narrows would each pad with zeros)
        if self._first == "cond":
            x_a, x_b = x.split([self.in_features, self.out_features], dim)
            return x_a, x_b
        if self._first == "trans":
            x_b, x_a = x.split([self.out_features, self.in_features], dim)
            return x_a, x_b
        return x.index_select(dim, self.cond_index), x.index_select(dim, self.trans_index)

    def merge(self, x_a: Tensor, y_b: Tensor) -> Tensor:
        dim = x_a.dim() - self.event_dim
        if self._first == "cond":
            return torch.cat([x_a, y_b], dim)
        if self._first == "trans":
            return torch.cat([y_b, x_a], dim)
        return torch.cat([x_a, y_b], dim).index_select(dim, self.merge_index)

    def extra_repr(self) -> str:
        return f"features={self.features}, conditioning={self.in_features}, event_dim={self.event_dim}"


class HalfMask(IndexMask):
    """The first half (rounded up) conditions the rest (``flip=True``: the other way round).

    The rounding matches :class:`~pushforward.transforms.FactorOut`, which keeps the first half.
    """

    def __init__(self, features: int, flip: bool = False, event_dim: int = 1):
        half = features - features // 2
        cond = list(range(half, features)) if flip else list(range(half))
        super().__init__(features, cond, event_dim)


class AlternatingMask(IndexMask):
    """Even indices condition odd ones (``flip=True``: odd condition even); vectors."""

    def __init__(self, features: int, flip: bool = False):
        super().__init__(features, list(range(int(flip), features, 2)))


class ChannelMask(HalfMask):
    """Half of the channels of ``(*, C, H, W)`` condition the other half (RealNVP, Glow)."""

    def __init__(self, channels: int, flip: bool = False):
        super().__init__(channels, flip, event_dim=3)


class CheckerboardMask(Mask):
    """Spatial checkerboard on ``(*, C, H, W)``: black pixels condition white ones (RealNVP).

    The conditioner sees ``x * m`` at full resolution; its outputs are zeroed on the
    conditioning pixels, where the kernel is then exactly the identity.
    """

    event_dim = 3

    def __init__(self, channels: int, height: int, width: int, flip: bool = False):
        super().__init__()
        self.channels, self.height, self.width, self.flip = channels, height, width, flip
        self.in_features = self.out_features = channels
        ij = torch.arange(height)[:, None] + torch.arange(width)[None, :]
        m = ((ij + int(flip)) % 2 == 0).float()[None]  # (1, H, W), 1 = conditioning
        self.register_buffer("mask", m)
        self.register_buffer("complement", 1 - m)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if tuple(x.shape[-3:]) != (self.channels, self.height, self.width):
            raise ValueError(
                f"CheckerboardMask expects images of shape (*, {self.channels}, {self.height}, {self.width}), "
                f"got {tuple(x.shape)}"
            )
        return x * self.mask, x

    def merge(self, x_a: Tensor, y_b: Tensor) -> Tensor:
        # x_a = x * m exactly, so the conditioning pixels are returned bit for bit
        return x_a + y_b * self.complement

    def restrict(self, params: Tensor) -> Tensor:
        return params * self.complement

    def extra_repr(self) -> str:
        return f"channels={self.channels}, height={self.height}, width={self.width}, flip={self.flip}"


# --------------------------------------------------------------------------------------------
# Kernels: elementwise bijections y = k(x; params), identity at params = 0.
# The conditioner output holds `params` blocks of the transformed size along the split dim.
# --------------------------------------------------------------------------------------------
class AdditiveKernel:
    """``y = x + t`` (NICE): volume preserving, ``log|det| = 0``."""

    params = 1

    def forward(self, x: Tensor, params: Tensor, dim: int) -> tuple[Tensor, Tensor | None]:
        return x + params, None

    def inverse(self, y: Tensor, params: Tensor, dim: int) -> tuple[Tensor, Tensor | None]:
        return y - params, None

    def __repr__(self) -> str:
        return "AdditiveKernel()"


class AffineKernel:
    """``y = x * exp(s) + t`` (RealNVP, Glow) with a bounded log-scale ``s = c * tanh(raw / c)``.

    The bound ``c`` keeps early training stable; ``log|dy/dx| = s`` exactly (never ``log(exp(s))``).
    """

    params = 2

    def __init__(self, bound: float = 3.0):
        self.bound = bound

    def _scale_shift(self, params: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        raw, shift = params.chunk(2, dim)
        return torch.tanh(raw * (1 / self.bound)) * self.bound, shift

    def forward(self, x: Tensor, params: Tensor, dim: int) -> tuple[Tensor, Tensor | None]:
        s, t = self._scale_shift(params, dim)
        return torch.addcmul(t, x, s.exp()), s

    def inverse(self, y: Tensor, params: Tensor, dim: int) -> tuple[Tensor, Tensor | None]:
        s, t = self._scale_shift(params, dim)
        return (y - t) * torch.exp(-s), -s

    def __repr__(self) -> str:
        return f"AffineKernel(bound={self.bound})"


Conditioner = Callable[[int, int], nn.Module]


class Coupling(Transform):
    """One coupling layer: ``mask`` x ``kernel`` x ``conditioner``.

    Args:
        mask: a :class:`Mask` (e.g. ``HalfMask(D)``, ``ChannelMask(C)``, ``CheckerboardMask(C, H, W)``).
        kernel: an elementwise kernel (``AdditiveKernel()``, ``AffineKernel()``, ...).
        conditioner: a factory ``(in_features, out_features) -> nn.Module`` (e.g.
            ``functools.partial(MLP, hidden=(128, 128))``); the module is called as ``net(x_a)``
            or ``net(x_a, context)``. Zero-initialise its last layer so the layer starts as the
            identity (the conditioners of :mod:`pushforward.nn` do).
    """

    def __init__(self, mask: Mask, kernel, conditioner: Conditioner):
        super().__init__()
        self.mask = mask
        self.kernel = kernel
        self.net = conditioner(mask.in_features, mask.out_features * kernel.params)
        if isinstance(mask, IndexMask):  # lets Compose chain consecutive couplings over the same halves
            self.partition = (mask.cond, mask.trans, mask.event_dim)

    # -- the parts protocol of Compose's chains (see Transform.partition) ---------------------------
    def split_parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_a, x_b)``: the conditioning and the transformed part."""
        return self.mask.split(x)

    def merge_parts(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        return self.mask.merge(x_a, x_b)

    def transform_part(self, x_a: Tensor, x_b: Tensor, context: Tensor | None = None,
                       inverse: bool = False) -> tuple[Tensor, Tensor | None]:
        """The transformed part and the kernel's elementwise log-derivatives (``None``: all zero)."""
        params = self._params(x_a, context)
        dim = -self.mask.event_dim
        return self.kernel.inverse(x_b, params, dim) if inverse else self.kernel.forward(x_b, params, dim)

    def _params(self, x_a: Tensor, context: Tensor | None) -> Tensor:
        p = self.net(x_a) if context is None else self.net(x_a, context)
        return self.mask.restrict(p)

    def _ladj(self, logd: Tensor | None, x: Tensor) -> Tensor:
        if logd is None:
            return x.new_zeros(x.shape[: x.dim() - self.mask.event_dim])
        return sum_event(logd, self.mask.event_dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x_a, x_b = self.mask.split(x)
        y_b, logd = self.transform_part(x_a, x_b, context)
        return self.mask.merge(x_a, y_b), self._ladj(logd, x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z_a, z_b = self.mask.split(z)
        x_b, logd = self.transform_part(z_a, z_b, context, inverse=True)
        return self.mask.merge(z_a, x_b), self._ladj(logd, z)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}"
