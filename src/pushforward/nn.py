"""Conditioner networks. Each takes the factory arguments ``(in_features, out_features, context_features)``
first (:class:`~pushforward.protocols.ConditionerFactory`), its options by keyword, and has a
zero-initialised last layer, so a layer built on it starts as the identity.

Bind options with ``functools.partial``, e.g. ``partial(MLP, hidden=(256, 256))``; the structure
(:class:`~pushforward.transforms.Coupling`, :class:`~pushforward.transforms.Autoregressive`) passes the
three widths.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

__all__ = ["MADE", "MLP", "ConvNet", "ResNet"]

_Layer = TypeVar("_Layer", nn.Linear, nn.Conv2d)


def _zero(layer: _Layer) -> _Layer:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _fresh_input_activation(activation: type[nn.Module]) -> nn.Module:
    """The activation for a layer whose input is a fresh linear/conv output used nowhere else.

    ReLU then runs in place: its backward needs only its output, and linear and convolution layers
    save their inputs, not their outputs, so autograd is unaffected; the hidden activation is not
    allocated twice (lower peak memory, most of all when sampling without gradients).
    """
    act = activation()
    if type(act) is nn.ReLU:
        act.inplace = True
    return act


class MLP(nn.Sequential):
    """A multilayer perceptron ``(*, in_features) -> (*, out_features)``.

    Args:
        in_features: input size.
        out_features: output size.
        context_features: size of an optional context, concatenated to the input.
        hidden: hidden layer sizes.
        activation: activation module class.
        zero_init: zero-initialise the last layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        context_features: int = 0,
        *,
        hidden: Sequence[int] = (128, 128),
        activation: type[nn.Module] = nn.ReLU,
        zero_init: bool = True,
    ):
        sizes = [in_features + context_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), _fresh_input_activation(activation)]
        last = nn.Linear(sizes[-1], out_features)
        layers.append(_zero(last) if zero_init else last)
        super().__init__(*layers)
        self.context_features = context_features

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.context_features:
            if context is None:
                raise ValueError(f"this MLP was built for a context of {self.context_features} features; "
                                 "got none")
            x = torch.cat([x, context.expand(*x.shape[:-1], context.shape[-1])], dim=-1)
        for layer in self:
            x = layer(x)
        return x


class _ContextBias(nn.Module):
    """Adds a per-channel bias computed from the context (FiLM-style shift)."""

    def __init__(self, context_features: int, channels: int):
        super().__init__()
        self.linear = nn.Linear(context_features, channels)

    def forward(self, h: Tensor, context: Tensor) -> Tensor:
        return h + self.linear(context)[..., :, None, None]


class ConvNet(nn.Module):
    """Glow's conditioner: ``conv3x3 -> act -> conv1x1 -> act -> conv3x3`` (last one zero-initialised).

    A batch ``(B, C, H, W)`` is computed in channels-last layout (oneDNN's convolutions are 20-25%
    faster on it on CPU); the output has the same values, in that layout.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        context_features: size of an optional context vector, added as a per-channel bias.
        hidden_channels: width of the hidden layers.
        activation: activation module class.
        context_channels: channels of an optional context *image* ``(*, Cc, H, W)`` of the input's
            size, concatenated to the input (e.g. the pixels a dequantizer conditions on).

    References:
        Kingma & Dhariwal, "Glow", 2018, section 3.3.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        context_features: int = 0,
        *,
        hidden_channels: int = 64,
        activation: type[nn.Module] = nn.ReLU,
        context_channels: int = 0,
    ):
        super().__init__()
        if context_features and context_channels:
            raise ValueError("ConvNet takes a context vector or a context image, not both")
        self.context_channels = context_channels
        self.conv1 = nn.Conv2d(in_channels + context_channels, hidden_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden_channels, hidden_channels, 1)
        self.conv3 = _zero(nn.Conv2d(hidden_channels, out_channels, 3, padding=1))
        self.act = _fresh_input_activation(activation)  # applied to conv outputs only
        self.context = _ContextBias(context_features, hidden_channels) if context_features else None
        self.context_features = context_features  # the width read (pushforward.core.context_features)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.context_channels:
            if context is None:
                raise ValueError(f"this ConvNet was built for a {self.context_channels}-channel context "
                                 "image; got none")
            x = torch.cat([x, context], dim=-3)
        h = self.conv1(_channels_last(x))
        if self.context is not None:
            if context is None:
                raise ValueError("this ConvNet was built for a context; got none")
            h = self.context(h, context)
        h = self.conv2(self.act(h))
        return self.conv3(self.act(h))


def _channels_last(x: Tensor) -> Tensor:
    """A batch of images in channels-last layout (same values): oneDNN's convolutions run faster on it."""
    if x.dim() != 4 or torch._C._are_functorch_transforms_active():  # vmap has no memory formats
        return x
    return x.contiguous(memory_format=torch.channels_last)


class _Block(nn.Module):
    def __init__(self, channels: int, activation: type[nn.Module]):
        super().__init__()
        self.net = nn.Sequential(
            activation(), nn.Conv2d(channels, channels, 3, padding=1),
            activation(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, h: Tensor) -> Tensor:
        return h + self.net(h)


class ResNet(nn.Module):
    """A convolutional residual network.

    ``conv3x3 -> blocks x (act, conv3x3, act, conv3x3, +) -> act -> conv3x3``.

    The last convolution is zero-initialised. No batch normalisation, so train and eval modes agree.
    Like :class:`ConvNet`, a batch is computed in channels-last layout.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        context_features: size of an optional context vector, added as a per-channel bias.
        hidden_channels: width of the residual blocks.
        blocks: number of residual blocks.
        activation: activation module class.

    References:
        He et al., "Deep Residual Learning", 2016; used as RealNVP's conditioner (Dinh et al., 2017).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        context_features: int = 0,
        *,
        hidden_channels: int = 64,
        blocks: int = 2,
        activation: type[nn.Module] = nn.ReLU,
    ):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.blocks = nn.Sequential(*[_Block(hidden_channels, activation) for _ in range(blocks)])
        self.act = activation()
        self.head = _zero(nn.Conv2d(hidden_channels, out_channels, 3, padding=1))
        self.context = _ContextBias(context_features, hidden_channels) if context_features else None
        self.context_features = context_features  # the width read (pushforward.core.context_features)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.stem(_channels_last(x))
        if self.context is not None:
            if context is None:
                raise ValueError("this ResNet was built for a context; got none")
            h = self.context(h, context)
        return self.head(self.act(self.blocks(h)))


class _MaskedLinear(nn.Linear):
    mask: Tensor

    def __init__(self, in_features: int, out_features: int, mask: Tensor):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder: output block ``j`` of feature ``i`` depends only on inputs ``< i``.

    Maps ``(*, D)`` to ``(*, P * D)`` laid out as ``P = out_features // in_features`` blocks of
    ``D`` (the layout every kernel reads): the default conditioner of
    :class:`~pushforward.transforms.Autoregressive`. The last layer is zero-initialised.

    Degrees: input ``i`` has degree ``i`` (1-based), a hidden unit of degree ``k`` sees the inputs
    of degree ``<= k`` and output ``i`` the hidden units of degree ``< i``. The context, if any,
    has degree 0: it reaches every hidden unit, and with a context the hidden degrees start at 0,
    so units that see the context alone feed the first output too (without them ``z_1`` could not
    depend on the context). Without hidden layers the context feeds every output directly.

    Args:
        in_features: ``D``.
        out_features: ``P * D``, a multiple of ``D`` (``P``: the kernel's ``params``).
        context_features: size of an optional context.
        hidden: hidden layer sizes (each at least ``D - 1``, or ``D`` with a context, for full
            connectivity).
        activation: activation module class.

    Raises:
        ValueError: If ``out_features`` is not a positive multiple of ``in_features``.

    References:
        Germain, Gregor, Murray & Larochelle, "MADE: Masked Autoencoder for Distribution Estimation", 2015.
    """

    def __init__(self, in_features: int, out_features: int, context_features: int = 0, *,
                 hidden: Sequence[int] = (128, 128), activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        if in_features < 1 or out_features < in_features or out_features % in_features:
            raise ValueError("MADE maps D features to P blocks of D outputs: out_features must be a "
                             f"positive multiple of in_features, got {in_features} -> {out_features}")
        features, params = in_features, out_features // in_features
        self.features, self.params, self.context_features = features, params, context_features
        degrees = [torch.arange(1, features + 1)]
        for h in hidden:
            if context_features:  # degrees 0..D-1, degree 0 seeing the context alone
                degrees.append(torch.arange(h) % features)
            else:  # degrees 1..D-1
                degrees.append(torch.arange(h) % max(features - 1, 1) + 1)
        layers: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise(degrees):
            mask = (d_out[:, None] >= d_in[None, :]).float()
            layers += [_MaskedLinear(len(d_in), len(d_out), mask), activation()]
        out_degrees = torch.arange(1, features + 1).repeat(params)
        last_mask = (out_degrees[:, None] > degrees[-1][None, :]).float()
        last = _MaskedLinear(len(degrees[-1]), features * params, last_mask)
        layers.append(_zero(last))
        self.net = nn.Sequential(*layers)
        # the context enters the first layer's pre-activation, unmasked (degree 0 is allowed everywhere);
        # without hidden layers that is the output, so it starts at zero like the last layer
        if not context_features:
            self.context = None
        elif hidden:
            self.context = nn.Linear(context_features, hidden[0])
        else:
            self.context = _zero(nn.Linear(context_features, features * params))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.context is None:
            return self.net(x)
        if context is None:
            raise ValueError(f"this MADE was built for a context of {self.context_features} features; "
                             "got none")
        h = self.net[0](x) + self.context(context)
        return self.net[1:](h)
