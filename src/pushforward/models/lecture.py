"""The lecture's recipes: NICE, RealNVP (vectors and images), Glow, MAF, IAF, NSF, and variational
dequantization around any image flow.

Every recipe records its name and arguments in ``flow.recipe`` so that :func:`~pushforward.recipes.build` (and
:func:`pushforward.io.load`) can rebuild the same architecture without unpickling code. Recipes pass
``context_features`` to the structures (:class:`~pushforward.transforms.Coupling`,
:class:`~pushforward.transforms.Autoregressive`), which hand it to the conditioner factories.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from ..core import Compose, Flow, Inverse, Transform
from ..distributions import StandardNormal
from ..nn import MADE, MLP, ConvNet, ResNet
from ..recipes import build, recipe
from ..transforms import (
    ActNorm,
    AdditiveKernel,
    AffineKernel,
    AlternatingMask,
    Autoregressive,
    ChannelMask,
    CheckerboardMask,
    Coupling,
    ElementwiseAffine,
    FactorOut,
    HalfMask,
    InvertibleConv1x1,
    Logit,
    Reverse,
    SplineKernel,
    Squeeze,
    Unsqueeze,
)

__all__ = ["dequantized", "glow", "iaf", "maf", "nice", "nsf", "realnvp", "realnvp_image"]

_VECTOR_MASKS = {"half": HalfMask, "alternating": AlternatingMask}


def _vector_mask(name: str):
    if name not in _VECTOR_MASKS:
        raise ValueError(f"mask must be one of {sorted(_VECTOR_MASKS)}, got {name!r}")
    return _VECTOR_MASKS[name]


def _couplings(features, layers, kernel, hidden, mask, context_features) -> list[Transform]:
    mask_cls = _vector_mask(mask)
    net = functools.partial(MLP, hidden=tuple(hidden))
    return [Coupling(mask_cls(features, flip=bool(i % 2)), kernel, net, context_features)
            for i in range(layers)]


@recipe
def nice(features: int, layers: int = 4, hidden: Sequence[int] = (256, 256), mask: str = "alternating",
         context_features: int = 0) -> Flow:
    """NICE: additive couplings with alternating masks, then a diagonal scaling layer.

    References:
        Dinh, Krueger & Bengio, "NICE: Non-linear Independent Components Estimation", 2015.
    """
    layers_ = _couplings(features, layers, AdditiveKernel(), hidden, mask, context_features)
    return Flow(Compose(*layers_, ElementwiseAffine(features, shift=False)), StandardNormal(features))


@recipe
def realnvp(features: int, layers: int = 8, hidden: Sequence[int] = (128, 128), mask: str = "alternating",
            scale_bound: float = 3.0, context_features: int = 0) -> Flow:
    """RealNVP for vectors: affine couplings whose masks alternate from layer to layer.

    ``scale_bound`` bounds each coupling's log-scale (:class:`~pushforward.transforms.AffineKernel`).

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2017.
    """
    layers_ = _couplings(features, layers, AffineKernel(scale_bound), hidden, mask, context_features)
    return Flow(Compose(*layers_), StandardNormal(features))


def _check_image_shape(shape: Sequence[int], squeezes: int, who: str) -> tuple[int, int, int]:
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{who} expects an image shape (C, H, W), got {tuple(shape)}")
    c, h, w = shape
    k = 2**squeezes
    if h % k or w % k:
        raise ValueError(
            f"{who} squeezes {squeezes} time(s), so height and width must be divisible by {k}; got {h}x{w}"
        )
    return c, h, w


def _preprocess(alpha: float | None) -> list[Transform]:
    return [] if alpha is None else [Logit(alpha, event_dim=3)]


@recipe
def realnvp_image(shape: Sequence[int], levels: int = 2, hidden_channels: int = 64, blocks: int = 2,
                  alpha: float | None = 0.05, scale_bound: float = 3.0, context_features: int = 0) -> Flow:
    """RealNVP's multi-scale image model for data in ``[0, 1]`` (dequantized pixels).

    Each scale but the last: 3 checkerboard couplings, squeeze, 3 channel couplings, factor out
    half the channels. The last scale: 4 checkerboard couplings. Conditioners are ResNets.
    ``levels`` counts the scales, ``alpha`` adds the logit preprocessing inside the flow (``None``:
    data already real-valued) and ``scale_bound`` bounds the couplings' log-scales.

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2017, section 4.1.
    """
    c, h, w = _check_image_shape(shape, levels - 1, "realnvp_image")
    net = functools.partial(ResNet, hidden_channels=hidden_channels, blocks=blocks)
    kernel = AffineKernel(scale_bound)

    def scale(c: int, h: int, w: int, level: int) -> list[Transform]:
        last = level == levels - 1
        ts: list[Transform] = [
            Coupling(CheckerboardMask(c, h, w, flip=bool(i % 2)), kernel, net, context_features)
            for i in range(4 if last else 3)
        ]
        if last:
            return ts
        c, h, w = 4 * c, h // 2, w // 2
        ts.append(Squeeze())
        ts += [Coupling(ChannelMask(c, flip=bool(i % 2)), kernel, net, context_features) for i in range(3)]
        kept = c - c // 2
        ts += [FactorOut(c, Compose(*scale(kept, h, w, level + 1))), Unsqueeze()]
        return ts

    return Flow(Compose(*_preprocess(alpha), *scale(c, h, w, 0)), StandardNormal(shape))


@recipe
def glow(shape: Sequence[int], levels: int = 2, steps: int = 4, hidden_channels: int = 64,
         alpha: float | None = 0.05, scale_bound: float = 3.0, split_prior: bool = True,
         context_features: int = 0) -> Flow:
    """Glow: per level, squeeze then ``steps`` x (ActNorm, invertible 1x1 conv, affine coupling),
    then factor out half the channels (all levels but the last).

    ``levels`` counts the scales (``L`` in the paper), ``steps`` the steps per level (``K``) and
    ``scale_bound`` bounds the couplings' log-scales. ``split_prior`` learns Glow's prior
    ``p(z2 | z1) = N(mu(z1), sigma(z1))`` on each factored-out half. With one latent tensor this is
    exactly an affine coupling whose transformed half is the factored-out one:
    ``e2 = (z2 - mu(z1)) / sigma(z1)`` is then standard normal.

    References:
        Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """
    c, _, _ = _check_image_shape(shape, levels, "glow")
    net = functools.partial(ConvNet, hidden_channels=hidden_channels)
    kernel = AffineKernel(scale_bound)

    def coupling(c: int) -> Coupling:
        return Coupling(ChannelMask(c), kernel, net, context_features)

    def level(c: int, level_: int) -> list[Transform]:
        c = 4 * c
        ts: list[Transform] = [Squeeze()]
        for _ in range(steps):
            ts += [ActNorm(c, event_dim=3), InvertibleConv1x1(c), coupling(c)]
        if level_ < levels - 1:
            kept = c - c // 2
            if split_prior:
                ts.append(coupling(c))  # conditions on kept, transforms factored
            ts.append(FactorOut(c, Compose(*level(kept, level_ + 1))))
        ts.append(Unsqueeze())
        return ts

    return Flow(Compose(*_preprocess(alpha), *level(c, 0)), StandardNormal(shape))


def _autoregressive(features, layers, kernel, hidden, context_features, inverse: bool) -> list[Transform]:
    ts: list[Transform] = []
    for i in range(layers):
        if i:
            ts.append(Reverse(features))  # each layer sees the previous one's order reversed
        t = Autoregressive(features, kernel, functools.partial(MADE, hidden=tuple(hidden)), context_features)
        ts.append(Inverse(t) if inverse else t)
    return ts


@recipe
def maf(features: int, layers: int = 5, hidden: Sequence[int] = (128, 128), scale_bound: float = 3.0,
        context_features: int = 0) -> Flow:
    """Masked autoregressive flow: affine MADE layers; density in one pass, sampling in ``D`` passes.

    ``scale_bound`` bounds the log-scales (:class:`~pushforward.transforms.AffineKernel`).

    References:
        Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density Estimation", 2017.
    """
    ts = _autoregressive(features, layers, AffineKernel(scale_bound), hidden, context_features, inverse=False)
    return Flow(Compose(*ts), StandardNormal(features))


@recipe
def iaf(features: int, layers: int = 5, hidden: Sequence[int] = (128, 128), scale_bound: float = 3.0,
        context_features: int = 0) -> Flow:
    """Inverse autoregressive flow: MAF's layers inverted; sampling in one pass, density in ``D`` passes.

    ``scale_bound`` bounds the log-scales (:class:`~pushforward.transforms.AffineKernel`).

    References:
        Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow", 2016.
    """
    ts = _autoregressive(features, layers, AffineKernel(scale_bound), hidden, context_features, inverse=True)
    return Flow(Compose(*ts), StandardNormal(features))


@recipe
def nsf(features: int, layers: int = 5, hidden: Sequence[int] = (128, 128), bins: int = 8,
        tail_bound: float = 5.0, autoregressive: bool = False, mask: str = "alternating",
        context_features: int = 0) -> Flow:
    """Neural spline flow: rational-quadratic spline couplings (or autoregressive layers).

    Each spline has ``bins`` bins on ``[-tail_bound, tail_bound]`` and is the identity outside
    (:class:`~pushforward.transforms.SplineKernel`). Coupling layers alternate their masks;
    autoregressive layers reverse the order between layers.

    References:
        Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", 2019.
    """
    kernel = SplineKernel(bins, tail_bound)
    if autoregressive:
        ts = _autoregressive(features, layers, kernel, hidden, context_features, inverse=False)
    else:
        ts = _couplings(features, layers, kernel, hidden, mask, context_features)
    return Flow(Compose(*ts), StandardNormal(features))


@recipe
def dequantized(flow: dict, quantization_levels: int, layers: int = 4, hidden_channels: int = 32) -> Flow:
    """The image flow ``flow`` (a ``flow.recipe`` dict) with a variational dequantizer attached.

    ``quantization_levels`` is the number of discrete values per pixel (256 for 8-bit images, 17 for
    sklearn's digits), not the multi-scale ``levels`` some image recipes take.

    The returned flow is the one :func:`build` makes from ``flow``, with a
    :class:`~pushforward.dequantization.VariationalDequantizer` ``q(u | x)`` of ``layers`` couplings
    as the submodule ``flow.dequantizer``: its weights live in the flow's ``state_dict`` and its
    parameters in ``flow.parameters()``, so one optimizer trains both and one file saves both.
    ``flow.log_prob`` is unchanged (the density of dequantized ``y``); the training objective and
    the reported bound are ``-log p(y) + log q(u | x)`` with ``(y, log q) = flow.dequantizer(x)``.

    References:
        Ho, Chen, Srinivas, Duan & Abbeel, "Flow++", 2019, section 3.1.
    """
    from ..dequantization import VariationalDequantizer

    model = build(flow)
    if len(model.event_shape) != 3:
        raise ValueError(f"variational dequantization needs an image flow (C, H, W), got event shape "
                         f"{tuple(model.event_shape)}")
    model.dequantizer = VariationalDequantizer(tuple(model.event_shape), quantization_levels, layers,
                                               hidden_channels)
    return model
