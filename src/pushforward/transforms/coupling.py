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

import torch
from torch import Tensor, nn

from ..core import Transform, shape_checks_enabled, sum_event
from ..protocols import ConditionerFactory, Kernel

__all__ = [
    "AdditiveKernel",
    "AffineKernel",
    "AlternatingMask",
    "ChannelMask",
    "CheckerboardMask",
    "Coupling",
    "HalfMask",
    "IndexMask",
    "Mask",
]


# --------------------------------------------------------------------------------------------
# Masks: how the input is split into (conditioning, transformed) parts.
# --------------------------------------------------------------------------------------------
class Mask(nn.Module):
    """Splits an input into the conditioner's input and the kernel's input, and merges back.

    Attributes:
        event_dim: 1 for vectors ``(*, D)``, 2 for sequences of tokens ``(*, N, P)``, 3 for images
            ``(*, C, H, W)``.
        in_features: size of the conditioner input's first event dim.
        out_features: size of the transformed part's first event dim.
    """

    event_dim: int
    in_features: int
    out_features: int

    @property
    def split_dim(self) -> int:
        """The dimension, counted from the end, that the two parts (and the kernel's parameter blocks) lie
        along: the features of vectors and of a sequence's tokens (1), the channels of images (3)."""
        return 1 if self.event_dim == 2 else self.event_dim

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Splits ``x`` into the conditioning and the transformed part.

        Args:
            x: input of shape ``(*batch, *event)``.

        Returns:
            ``(x_a, x_b)``: the conditioner's input, with ``in_features`` on the first event dim,
            and the kernel's input, with ``out_features`` there; both keep ``x``'s other dims.
        """
        raise NotImplementedError

    def merge(self, x_a: Tensor, y_b: Tensor) -> Tensor:
        """Inverse of :meth:`split`: puts the conditioning part and the transformed part back together.

        Args:
            x_a: the conditioning part, as returned by :meth:`split`.
            y_b: the (transformed) second part, of the shape of :meth:`split`'s ``x_b``.

        Returns:
            A tensor of the input's shape ``(*batch, *event)``.
        """
        raise NotImplementedError

    def restrict(self, params: Tensor) -> Tensor:
        """Zeroes the kernel parameters where the kernel must act as the identity (default: nowhere).

        Args:
            params: the conditioner's output, ``kernel.params`` blocks of ``x_b``'s size along the
                first event dim.

        Returns:
            ``params`` (same shape), zero where the kernel must leave its input unchanged.
        """
        return params


class IndexMask(Mask):
    """Splits the first event dimension (features or channels) by index.

    Contiguous halves are split with slices (views, no copy); other index sets with ``index_select``
    (no boolean indexing, so it compiles without graph breaks).

    Args:
        features: size of the split dimension.
        cond: indices that condition (``x_a``); the rest are transformed.
        event_dim: 1 for vectors, 2 for sequences ``(*, N, P)`` (splits each token's features, as Jet
            does), 3 for images (splits channels).
    """

    cond_index: Tensor  # the three index buffers exist only when neither part comes first
    trans_index: Tensor
    merge_index: Tensor

    def __init__(self, features: int, cond: list[int], event_dim: int = 1):
        super().__init__()
        cond = sorted({int(i) for i in cond})
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
        identity = list(range(features))
        self._first = "cond" if order == identity else "trans" if trans + cond == identity else None
        if self._first is None:
            self.register_buffer("cond_index", torch.tensor(cond))
            self.register_buffer("trans_index", torch.tensor(trans))
            self.register_buffer("merge_index", torch.argsort(torch.tensor(order)))

    def _check(self, x: Tensor) -> None:
        if shape_checks_enabled() and x.shape[-self.split_dim] != self.features:
            raise ValueError(
                f"{type(self).__name__} splits {self.features} features on dim -{self.split_dim}, "
                f"got a tensor of shape {tuple(x.shape)}"
            )

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Splits the first event dim of ``x`` into the indices ``cond`` and the rest.

        Contiguous parts come back as views (``Tensor.split``), others as copies (``index_select``).

        Args:
            x: input of shape ``(*batch, features)`` (``event_dim=1``) or
                ``(*batch, features, H, W)`` (``event_dim=3``).

        Returns:
            ``(x_a, x_b)`` with ``len(cond)`` and ``features - len(cond)`` entries on that dim, each
            in increasing index order.

        Raises:
            ValueError: If the split dimension of ``x`` does not have size ``features``.
        """
        self._check(x)
        dim = x.dim() - self.split_dim
        # one split node: its backward is a single cat (two narrows would each pad with zeros)
        if self._first == "cond":
            x_a, x_b = x.split([self.in_features, self.out_features], dim)
            return x_a, x_b
        if self._first == "trans":
            x_b, x_a = x.split([self.out_features, self.in_features], dim)
            return x_a, x_b
        return x.index_select(dim, self.cond_index), x.index_select(dim, self.trans_index)

    def merge(self, x_a: Tensor, y_b: Tensor) -> Tensor:
        """Concatenates the two parts and puts every index back in its place.

        Args:
            x_a: the conditioning part, ``len(cond)`` entries on the split dim.
            y_b: the transformed part, ``features - len(cond)`` entries on the split dim.

        Returns:
            A tensor of shape ``(*batch, features)`` or ``(*batch, features, H, W)``.
        """
        dim = x_a.dim() - self.split_dim
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

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2017.
    """

    def __init__(self, features: int, flip: bool = False, event_dim: int = 1):
        half = features - features // 2
        cond = list(range(half, features)) if flip else list(range(half))
        super().__init__(features, cond, event_dim)


class AlternatingMask(IndexMask):
    """Even indices condition odd ones (``flip=True``: odd condition even); vectors.

    References:
        Dinh, Krueger & Bengio, "NICE: Non-linear Independent Components Estimation", 2015.
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2017.
    """

    def __init__(self, features: int, flip: bool = False):
        super().__init__(features, list(range(int(flip), features, 2)))


class ChannelMask(HalfMask):
    """Half of the channels of ``(*, C, H, W)`` condition the other half (RealNVP, Glow).

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2017.
    """

    def __init__(self, channels: int, flip: bool = False):
        super().__init__(channels, flip, event_dim=3)


class CheckerboardMask(Mask):
    """Spatial checkerboard on ``(*, C, H, W)``: black pixels condition white ones (RealNVP).

    The conditioner sees ``x * m`` at full resolution; its outputs are zeroed on the
    conditioning pixels, where the kernel is then exactly the identity.

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2017.
    """

    event_dim = 3
    mask: Tensor
    complement: Tensor

    def __init__(self, channels: int, height: int, width: int, flip: bool = False):
        super().__init__()
        self.channels, self.height, self.width, self.flip = channels, height, width, flip
        self.in_features = self.out_features = channels
        ij = torch.arange(height)[:, None] + torch.arange(width)[None, :]
        m = ((ij + int(flip)) % 2 == 0).float()[None]  # (1, H, W), 1 = conditioning
        self.register_buffer("mask", m)
        self.register_buffer("complement", 1 - m)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Masks ``x`` for the conditioner; the kernel sees all of ``x``.

        Args:
            x: images of shape ``(*batch, C, H, W)``.

        Returns:
            ``(x * mask, x)``, both of shape ``(*batch, C, H, W)``; the mask is 1 on the
            conditioning pixels and 0 elsewhere.

        Raises:
            ValueError: If ``x`` does not end in ``(C, H, W)``.
        """
        if tuple(x.shape[-3:]) != (self.channels, self.height, self.width):
            raise ValueError(
                f"CheckerboardMask expects images of shape (*, {self.channels}, {self.height}, "
                f"{self.width}), got {tuple(x.shape)}"
            )
        return x * self.mask, x

    def merge(self, x_a: Tensor, y_b: Tensor) -> Tensor:
        """Takes the conditioning pixels from ``x_a`` and the others from ``y_b``.

        Args:
            x_a: the masked input ``x * mask``, shape ``(*batch, C, H, W)``.
            y_b: the kernel's output, shape ``(*batch, C, H, W)``.

        Returns:
            ``x_a + y_b * (1 - mask)``, shape ``(*batch, C, H, W)``.
        """
        # x_a = x * m exactly, so the conditioning pixels are returned bit for bit
        return x_a + y_b * self.complement

    def restrict(self, params: Tensor) -> Tensor:
        """Zeroes the kernel parameters on the conditioning pixels (the kernel is the identity there).

        Args:
            params: the conditioner's output, shape ``(*batch, kernel.params * C, H, W)``.

        Returns:
            ``params * (1 - mask)``, same shape.
        """
        return params * self.complement

    def extra_repr(self) -> str:
        return f"channels={self.channels}, height={self.height}, width={self.width}, flip={self.flip}"


# --------------------------------------------------------------------------------------------
# Kernels: elementwise bijections y = k(x; params), identity at params = 0.
# The conditioner output holds `params` blocks of the transformed size along the split dim.
# --------------------------------------------------------------------------------------------
class AdditiveKernel:
    """``y = x + t`` (NICE): volume preserving, ``log|det| = 0``.

    References:
        Dinh, Krueger & Bengio, "NICE: Non-linear Independent Components Estimation", 2015.
    """

    params = 1

    def forward(self, x: Tensor, params: Tensor, dim: int) -> tuple[Tensor, Tensor | None]:
        """``y = x + t``.

        Args:
            x: the transformed part ``x_b``, any shape.
            params: the shift ``t``, of ``x``'s shape (``params = 1`` block along ``dim``).
            dim: the split dimension (unused: there is a single block).

        Returns:
            ``(y, None)``: ``y`` of ``x``'s shape; ``None`` stands for all-zero log-derivatives.
        """
        return x + params, None

    def inverse(self, y: Tensor, params: Tensor, dim: int) -> tuple[Tensor, Tensor | None]:
        """``x = y - t``.

        Args:
            y: the transformed part, any shape.
            params: the shift ``t``, of ``y``'s shape.
            dim: the split dimension (unused).

        Returns:
            ``(x, None)``: ``x`` of ``y``'s shape; ``None`` stands for all-zero log-derivatives.
        """
        return y - params, None

    def __repr__(self) -> str:
        return "AdditiveKernel()"


class AffineKernel:
    """``y = x * exp(s) + t`` (RealNVP, Glow) with a bounded log-scale ``s = c * tanh(raw / c)``.

    The bound ``c`` keeps early training stable; ``log|dy/dx| = s`` exactly (never ``log(exp(s))``).

    Args:
        scale_bound: the bound ``c`` on the absolute log-scale ``|s|``.

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2017.
        Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    params = 2

    def __init__(self, scale_bound: float = 3.0):
        if not scale_bound > 0:
            raise ValueError(f"AffineKernel needs scale_bound > 0, got {scale_bound}")
        self.scale_bound = scale_bound

    def _scale_shift(self, params: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        raw, shift = params.chunk(2, dim)
        return torch.tanh(raw * (1 / self.scale_bound)) * self.scale_bound, shift

    def forward(self, x: Tensor, params: Tensor, dim: int) -> tuple[Tensor, Tensor | None]:
        """``y = x * exp(s) + t``.

        Args:
            x: the transformed part ``x_b``, e.g. ``(*batch, D_b)`` or ``(*batch, C_b, H, W)``.
            params: two blocks of ``x``'s size along ``dim``, raw log-scale then shift
                (``(*batch, 2 * D_b)`` or ``(*batch, 2 * C_b, H, W)``).
            dim: the dimension along which the blocks are stacked (negative, e.g. ``-1`` or ``-3``).

        Returns:
            ``(y, s)``: ``y`` and the elementwise ``log|dy/dx| = s``, both of ``x``'s shape.
        """
        s, t = self._scale_shift(params, dim)
        return torch.addcmul(t, x, s.exp()), s

    def inverse(self, y: Tensor, params: Tensor, dim: int) -> tuple[Tensor, Tensor | None]:
        """``x = (y - t) * exp(-s)``.

        Args:
            y: the transformed part, of the shape of :meth:`forward`'s ``x``.
            params: two blocks of ``y``'s size along ``dim`` (as in :meth:`forward`).
            dim: the dimension along which the blocks are stacked.

        Returns:
            ``(x, -s)``: ``x`` and the elementwise ``log|dx/dy| = -s``, both of ``y``'s shape.
        """
        s, t = self._scale_shift(params, dim)
        neg_s = -s
        return (y - t) * neg_s.exp(), neg_s

    def __repr__(self) -> str:
        return f"AffineKernel(scale_bound={self.scale_bound})"


def check_kernel(kernel: object, who: str) -> None:
    """Raises ``TypeError`` unless ``kernel`` has what :class:`~pushforward.protocols.Kernel` names."""
    if not isinstance(kernel, Kernel) or isinstance(kernel, type):
        raise TypeError(f"{who} needs a kernel instance with an integer `params` and methods forward/inverse"
                        f"(x, params, dim) -> (y, logd) (e.g. AffineKernel()); got {kernel!r}")


class Coupling(Transform):
    """One coupling layer: ``mask`` x ``kernel`` x ``conditioner``.

    The conditioner is built as ``conditioner(mask.in_features, kernel.params * mask.out_features,
    context_features)`` and called as ``net(x_a)`` or ``net(x_a, context)``; it may depend on ``x_a``
    and the context in any way. Its output holds ``kernel.params`` blocks of ``x_b``'s size along the
    split dimension (features, or channels of ``(*, C, H, W)``).

    Args:
        mask: a :class:`Mask` (e.g. ``HalfMask(D)``, ``ChannelMask(C)``, ``CheckerboardMask(C, H, W)``).
        kernel: an elementwise :class:`~pushforward.protocols.Kernel` (``AdditiveKernel()``,
            ``AffineKernel()``, ``SplineKernel()``, ...).
        conditioner: a :class:`~pushforward.protocols.ConditionerFactory` ``(in_features,
            out_features, context_features) -> nn.Module`` (e.g. ``functools.partial(MLP,
            hidden=(128, 128))``). Zero-initialise its last layer so the layer starts as the
            identity (the conditioners of :mod:`pushforward.nn` do).
        context_features: width of the context vector the conditioner reads (0: none).

    Raises:
        TypeError: If ``kernel`` is not a kernel instance.

    References:
        Dinh, Krueger & Bengio, "NICE: Non-linear Independent Components Estimation", 2015.
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2017.
    """

    def __init__(self, mask: Mask, kernel: Kernel, conditioner: ConditionerFactory,
                 context_features: int = 0):
        super().__init__()
        check_kernel(kernel, "Coupling")
        if type(mask).restrict is not Mask.restrict and not getattr(kernel, "identity_at_zero", True):
            raise ValueError(f"{type(mask).__name__} leaves its conditioning part to a kernel that is the "
                             f"identity at zero parameters; {kernel!r} is not (e.g. "
                             "DeepSigmoidalKernel(identity_init=True) is)")
        self.mask = mask
        self.kernel = kernel
        self.context_features = context_features
        self.net = conditioner(mask.in_features, mask.out_features * kernel.params, context_features)

    def _transform_part(self, x_a: Tensor, x_b: Tensor, context: Tensor | None,
                        inverse: bool) -> tuple[Tensor, Tensor | None]:
        """The transformed part and the kernel's elementwise log-derivatives (``None``: all zero)."""
        params = self._params(x_a, context)
        dim = -self.mask.split_dim
        return self.kernel.inverse(x_b, params, dim) if inverse else self.kernel.forward(x_b, params, dim)

    def _params(self, x_a: Tensor, context: Tensor | None) -> Tensor:
        p = self.net(x_a) if context is None else self.net(x_a, context)
        return self.mask.restrict(p)

    def _ladj(self, logd: Tensor | None, x: Tensor) -> Tensor:
        if logd is None:
            return x.new_zeros(x.shape[: x.dim() - self.mask.event_dim])
        return sum_event(logd, self.mask.event_dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``z_a = x_a``, ``z_b = kernel(x_b; conditioner(x_a, context))`` (data -> latent).

        Args:
            x: data of shape ``(*batch, *event)`` (``(*batch, D)`` or ``(*batch, C, H, W)``).
            context: optional conditioning tensor of shape ``(*batch, context_features)``, passed
                to the conditioner.

        Returns:
            ``(z, ladj)``: ``z`` of ``x``'s shape and the kernel's log-derivatives summed over the
            event, of shape ``(*batch,)`` (zeros for volume-preserving kernels).
        """
        x_a, x_b = self.mask.split(x)
        y_b, logd = self._transform_part(x_a, x_b, context, inverse=False)
        return self.mask.merge(x_a, y_b), self._ladj(logd, x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x_a = z_a``, ``x_b = kernel^{-1}(z_b; conditioner(z_a, context))`` (latent -> data).

        One conditioner pass, since ``z_a = x_a``.

        Args:
            z: latent of shape ``(*batch, *event)``.
            context: optional conditioning tensor of shape ``(*batch, context_features)``.

        Returns:
            ``(x, ladj)``: ``x`` of ``z``'s shape and ``log|det|`` of the inverse map, of shape
            ``(*batch,)``.
        """
        z_a, z_b = self.mask.split(z)
        x_b, logd = self._transform_part(z_a, z_b, context, inverse=True)
        return self.mask.merge(z_a, x_b), self._ladj(logd, z)

    def conditioners(self) -> list[nn.Module]:
        """``[self.net]``: the conditioner network."""
        return [self.net]

    def extra_repr(self) -> str:
        ctx = f", context_features={self.context_features}" if self.context_features else ""
        return f"kernel={self.kernel!r}{ctx}"
