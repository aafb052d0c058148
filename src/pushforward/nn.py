"""Conditioner networks. Each takes the factory arguments ``(in_features, out_features, context_features)``
first (:class:`~pushforward.protocols.ConditionerFactory`), its options by keyword, and has a
zero-initialised last layer, so a layer built on it starts as the identity.

Bind options with ``functools.partial``, e.g. ``partial(MLP, hidden=(256, 256))``; the structure
(:class:`~pushforward.transforms.Coupling`, :class:`~pushforward.transforms.Autoregressive`) passes the
three widths.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

__all__ = ["MADE", "MLP", "CausalTransformer", "ConvNet", "KVCache", "ResNet", "ViT",
           "classifier_free_guidance"]

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


# --------------------------------------------------------------------------------------------
# Transformers over token sequences (image patches): TarFlow's causal conditioner and Jet's ViT.
# --------------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of the tokens a :class:`CausalTransformer` has seen, for decoding token by token.

    Made by :meth:`CausalTransformer.new_cache` for one sequential inverse and dropped after it (nothing
    is kept between calls, so nothing can go stale). ``length`` counts the tokens seen; ``layers[i]``
    holds layer ``i``'s keys and values, each ``(B, heads, length, width / heads)``.
    """

    def __init__(self) -> None:
        self.length = 0
        self.layers: list[list[Tensor]] = []

    def layer(self, i: int) -> list[Tensor]:
        while len(self.layers) <= i:
            self.layers.append([])
        return self.layers[i]


class _Attention(nn.Module):
    """Multi-head self-attention through :func:`torch.nn.functional.scaled_dot_product_attention`."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        if width % heads:
            raise ValueError(f"the width {width} must be divisible by the number of heads {heads}")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, h: Tensor, cache: list[Tensor] | None = None) -> Tensor:
        b, n, w = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:  # the new token attends to every token seen before and to itself
            if cache:
                k, v = torch.cat([cache[0], k], dim=-2), torch.cat([cache[1], v], dim=-2)
            cache[:] = [k, v]
            a = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(a.transpose(1, 2).reshape(b, n, w))


class _TransformerBlock(nn.Module):
    """A pre-norm Transformer block: ``h + attention(LN(h))``, then ``h + MLP(LN(h))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, causal: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = _Attention(width, heads, causal)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, h: Tensor, cache: list[Tensor] | None = None) -> Tensor:
        h = h + self.attention(self.norm1(h), cache)
        return h + self.mlp(self.norm2(h))


def _flat_context(context: Tensor, batch: torch.Size) -> Tensor:
    """The context broadcast to the batch shape and flattened to ``(B, context_features)``."""
    return context.expand(*batch, context.shape[-1]).reshape(-1, context.shape[-1])


class _TokenTransformer(nn.Module):
    """What the causal Transformer and the ViT share: token embedding, learned positions, the context as
    a learned embedding added to every token, pre-norm blocks and a zero-initialised head; and
    classifier-free guidance (:func:`classifier_free_guidance`)."""

    def __init__(self, in_features: int, out_features: int, context_features: int, tokens: int, width: int,
                 layers: int, heads: int, mlp_ratio: int, causal: bool):
        super().__init__()
        if tokens < 1 or layers < 1:
            raise ValueError("a Transformer conditioner needs tokens >= 1 and layers >= 1, got "
                             f"tokens={tokens}, "
                             f"layers={layers}")
        self.tokens, self.width = tokens, width
        self.embed = nn.Linear(in_features, width)
        self.position = nn.Parameter(torch.randn(tokens, width) * 0.02)
        self.context = nn.Linear(context_features, width) if context_features else None
        self.context_features = context_features
        self.blocks = nn.ModuleList(_TransformerBlock(width, heads, mlp_ratio, causal) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = _zero(nn.Linear(width, out_features))
        #: classifier-free guidance weight ``w``: a setting of the model, read at every call (0: none)
        self.guidance = 0.0

    def _context(self, h: Tensor, context: Tensor | None) -> Tensor:
        if self.context is None:
            return h
        if context is None:
            raise ValueError(f"this {type(self).__name__} was built for a context of {self.context_features} "
                             "features; got none")
        return h + self.context(context.reshape(-1, context.shape[-1]))[:, None, :]

    def _guided(self, run, x: Tensor, context: Tensor | None) -> Tensor:
        """``run(x, context)``, or with guidance ``(1 + w) run(x, c) - w run(x, 0)`` (batch doubled)."""
        if not self.guidance or context is None:
            return run(x, context)
        w = self.guidance
        both = run(torch.cat([x, x]), torch.cat([context, torch.zeros_like(context)]))
        cond, uncond = both.chunk(2)
        return (1 + w) * cond - w * uncond

    def _trunk(self, h: Tensor, cache: KVCache | None = None) -> Tensor:
        for i, block in enumerate(self.blocks):
            h = block(h, None if cache is None else cache.layer(i))
        return self.head(self.norm(h))


class CausalTransformer(_TokenTransformer):
    """TarFlow's conditioner: a causal Transformer over a sequence ``(*, N, P) -> (*, N, out_features)``.

    Output token ``n`` depends on input tokens ``< n`` only: the input is shifted right by one, a
    learned start token in front, and attention is causal (``scaled_dot_product_attention(is_causal=True)``),
    so the first token's parameters depend on the start token and the context alone. The context (e.g.
    a one-hot class label) enters as a learned embedding added to every token.

    Decoding token by token (:meth:`~pushforward.transforms.Autoregressive.inverse`):
    ``net(previous_token, context, cache=net.new_cache())`` returns the parameters of the next token
    ``(*, 1, out_features)`` and appends each layer's keys and values to the cache, so step ``n`` costs one
    token's work instead of a pass over ``n`` tokens; the first call's token is ignored (the start token
    takes its place).

    Args:
        in_features: features per token ``P``.
        out_features: outputs per token (``kernel.params * P``).
        context_features: width of an optional context vector.
        tokens: the sequence length ``N`` (learned positions).
        width: the model width.
        layers: Transformer blocks.
        heads: attention heads (dividing ``width``).
        mlp_ratio: hidden width of the blocks' MLPs, as a multiple of ``width``.

    Raises:
        ValueError: If ``width`` is not divisible by ``heads``, or a context is missing or a sequence is
            too long.

    References:
        Zhai et al., "Normalizing Flows are Capable Generative Models", 2025 (TarFlow).
        Vaswani et al., "Attention Is All You Need", 2017.
    """

    def __init__(self, in_features: int, out_features: int, context_features: int = 0, *, tokens: int,
                 width: int = 128, layers: int = 2, heads: int = 4, mlp_ratio: int = 4):
        super().__init__(in_features, out_features, context_features, tokens, width, layers, heads, mlp_ratio,
                         causal=True)
        self.start = nn.Parameter(torch.randn(width) * 0.02)

    def new_cache(self) -> KVCache:
        """An empty key-value cache for one token-by-token pass."""
        return KVCache()

    def forward(self, x: Tensor, context: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        batch = x.shape[:-2]

        def run(x: Tensor, context: Tensor | None) -> Tensor:
            if cache is None:
                n = x.shape[-2]
                if n > self.tokens:
                    raise ValueError(f"this CausalTransformer has positions for {self.tokens} tokens, "
                                     f"got {n}")
                start = self.start.expand(len(x), 1, self.width).to(x.dtype)
                h = torch.cat([start, self.embed(x[:, :-1])], 1)
                h = h + self.position[:n]
            else:
                n = cache.length
                if n >= self.tokens:
                    raise ValueError(f"this CausalTransformer has positions for {self.tokens} tokens; "
                                     "the cache "
                                     "has seen them all")
                h = self.start.expand(len(x), 1, self.width).to(x.dtype) if n == 0 else self.embed(x)
                h = h + self.position[n]
            out = self._trunk(self._context(h, context), cache)
            if cache is not None:
                cache.length += 1
            return out

        flat = x.reshape(-1, *x.shape[-2:])
        c = None if context is None else _flat_context(context, batch)
        return self._guided(run, flat, c).reshape(*batch, *flat.shape[1:-1], -1)


class ViT(_TokenTransformer):
    """Jet's conditioner: a Vision Transformer over tokens ``(*, N, P) -> (*, N, out_features)``.

    Every output token attends to every input token (no mask); the context enters as a learned
    embedding added to every token; the head is zero-initialised.

    Args:
        in_features: features per token.
        out_features: outputs per token.
        context_features: width of an optional context vector.
        tokens: the sequence length ``N`` (learned positions).
        width: the model width.
        layers: Transformer blocks.
        heads: attention heads (dividing ``width``).
        mlp_ratio: hidden width of the blocks' MLPs, as a multiple of ``width``.

    References:
        Dosovitskiy et al., "An Image is Worth 16x16 Words", 2021 (ViT).
        Kolesnikov et al., "Jet: A Modern Transformer-Based Normalizing Flow", 2025.
    """

    def __init__(self, in_features: int, out_features: int, context_features: int = 0, *, tokens: int,
                 width: int = 128, layers: int = 2, heads: int = 4, mlp_ratio: int = 4):
        super().__init__(in_features, out_features, context_features, tokens, width, layers, heads, mlp_ratio,
                         causal=False)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        batch = x.shape[:-2]

        def run(x: Tensor, context: Tensor | None) -> Tensor:
            if x.shape[-2] != self.tokens:
                raise ValueError(f"this ViT was built for {self.tokens} tokens, got {x.shape[-2]}")
            return self._trunk(self._context(self.embed(x) + self.position, context))

        flat = x.reshape(-1, *x.shape[-2:])
        c = None if context is None else _flat_context(context, batch)
        return self._guided(run, flat, c).reshape(*batch, *flat.shape[1:-1], -1)


@contextlib.contextmanager
def classifier_free_guidance(model: nn.Module, weight: float) -> Iterator[None]:
    """Classifier-free guidance inside the block: every Transformer conditioner of ``model`` computes
    ``(1 + w) h(x, c) - w h(x, 0)`` from the conditional output and the one at the null context (zeros,
    what training with ``label_drop`` shows for a dropped label), and the old setting is restored after.

    The guided conditioner is still autoregressive (TarFlow) or still reads only the conditioning part
    (Jet), so the guided model is itself a flow: sampling and ``log_prob`` agree under it. Its density is
    not the trained ``p(x | c)`` but a sharper one; the bits/dim a run reports are always without guidance.

    Args:
        model: a flow (or any module) holding :class:`CausalTransformer` / :class:`ViT` conditioners.
        weight: ``w >= 0`` (0: no guidance).

    Raises:
        ValueError: If ``weight`` is negative or ``model`` holds no conditioner that can be guided.

    References:
        Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022; Zhai et al., 2025 (TarFlow), section 2.5.
    """
    if not weight >= 0:
        raise ValueError(f"the guidance weight must be >= 0, got {weight}")
    nets = [m for m in model.modules() if isinstance(m, _TokenTransformer) and m.context is not None]
    if weight and not nets:
        raise ValueError("classifier-free guidance needs a class-conditional model with Transformer "
                         "conditioners (tarflow or jet with context_features > 0)")
    before = [m.guidance for m in nets]
    try:
        for m in nets:
            m.guidance = float(weight)
        yield
    finally:
        for m, g in zip(nets, before):
            m.guidance = g
