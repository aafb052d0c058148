"""Recipes of the transformer family: flows whose conditioners are Transformers over image patches.

* :func:`tarflow`: TarFlow, a stack of affine autoregressive blocks over the patch sequence, each
  conditioned by a causal Transformer, the patch order reversed between blocks;
* :func:`jet`: Jet, affine couplings that split every patch token's features in two, each conditioned by
  a Vision Transformer, without multi-scale.

Both take a class label (or any vector) as ``context``: its learned embedding is added to every token.
Sampling with classifier-free guidance: :func:`pushforward.nn.classifier_free_guidance`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ..core import Compose, Flow, Transform
from ..distributions import StandardNormal
from ..nn import CausalTransformer, ViT
from ..recipes import recipe
from ..transforms import (
    AffineKernel,
    Autoregressive,
    Coupling,
    IndexMask,
    Logit,
    Patchify,
    Reverse,
    Unpatchify,
)

__all__ = ["jet", "tarflow"]


def _image(shape: Sequence[int], patch_size: int, who: str) -> tuple[int, int, int]:
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{who} expects an image shape (C, H, W), got {tuple(shape)}")
    c, h, w = (int(s) for s in shape)
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise ValueError(f"{who}: patch_size={patch_size} must divide the height and width, got {h}x{w}")
    return c, h, w


def _preprocess(logit: bool, alpha: float) -> list[Transform]:
    return [Logit(alpha, event_dim=3)] if logit else []


@recipe
def tarflow(shape: Sequence[int], patch_size: int = 4, channels: int = 64, blocks: int = 8,
            layers_per_block: int = 1, heads: int = 4, logit: bool = True, alpha: float = 0.05,
            scale_bound: float = 3.0, context_features: int = 0) -> Flow:
    """TarFlow: affine autoregressive blocks over patch tokens, each conditioned by a causal Transformer.

    The image ``(C, H, W)`` in ``[0, 1]`` (dequantized pixels) goes through the logit with ``alpha``
    (``logit=False``: none, e.g. for data with Gaussian noise added, which leaves ``[0, 1]``), is cut
    into ``N`` patches of ``P = C p^2`` features (:class:`~pushforward.transforms.Patchify`), and each
    of ``blocks`` blocks maps token ``n`` by ``z_n = x_n exp(s_n) + t_n`` with ``(s_n, t_n)`` from a causal
    Transformer (:class:`~pushforward.nn.CausalTransformer`: ``layers_per_block`` layers of width
    ``channels``, ``heads`` heads) that reads the tokens before ``n``; the first token reads a learned
    start token and the context. The token order is reversed between blocks. The latent is unpatchified
    back to ``(C, H, W)``; the base is a standard normal. Density: one pass per block; sampling: ``N``
    steps per block, each one token's work through the key-value cache.

    ``scale_bound`` bounds the log-scales (:class:`~pushforward.transforms.AffineKernel`);
    ``context_features``: width of the context (the number of classes for a one-hot label). The
    defaults are the best configuration measured on Fashion-MNIST at 30 CPU-minutes (452k
    parameters at 28x28), trained there with ``lr=2e-3`` and ``ema=0.999``: 3.376 bits/dim, against 3.468
    for 4 blocks of 2 layers and 3.473 for these defaults at ``lr=1e-3`` (BENCHMARKS.md); in a short
    trial at equal CPU time width 64 led width 128. The paper's models are far larger.

    References:
        Zhai et al., "Normalizing Flows are Capable Generative Models", ICML 2025 (TarFlow).
    """
    c, h, w = _image(shape, patch_size, "tarflow")
    patch = Patchify((c, h, w), patch_size)
    seq = (patch.tokens, patch.features)
    net = functools.partial(CausalTransformer, tokens=patch.tokens, width=channels, layers=layers_per_block,
                            heads=heads)
    ts: list[Transform] = [*_preprocess(logit, alpha), patch]
    for i in range(blocks):
        if i:
            ts.append(Reverse(patch.tokens, event_dim=2))
        ts.append(Autoregressive(seq, AffineKernel(scale_bound), net, context_features))
    ts.append(Unpatchify((c, h, w), patch_size))
    return Flow(Compose(*ts), StandardNormal((c, h, w)))


def _jet_split(features: int, seed: int) -> list[int]:
    """A fixed random half of a token's features (seeded, so a rebuilt flow splits the same way)."""
    order = torch.randperm(features, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[: features - features // 2]


@recipe
def jet(shape: Sequence[int], patch_size: int = 4, channels: int = 64, couplings: int = 8, layers: int = 1,
        heads: int = 4, logit: bool = True, alpha: float = 0.05, scale_bound: float = 3.0,
        context_features: int = 0) -> Flow:
    """Jet: affine couplings over patch tokens, each conditioned by a Vision Transformer; no multi-scale.

    The image (logit with ``alpha`` unless ``logit=False``, as in :func:`tarflow`) is cut into ``N``
    patches of ``P = C p^2`` features. Each of ``couplings`` layers splits every token's features into
    two halves, a fixed random choice per layer (seeded by the layer's index), and transforms one half by
    ``x_b exp(s) + t`` with ``(s, t)`` from a ViT (:class:`~pushforward.nn.ViT`: ``layers`` layers of width
    ``channels``, ``heads`` heads) reading the other half of every token and the context. The coupling
    structure is :class:`~pushforward.transforms.Coupling` with an
    :class:`~pushforward.transforms.IndexMask` over the tokens' features (``event_dim=2``). Density and
    sampling: one pass per coupling.

    References:
        Kolesnikov, Susano Pinto & Tschannen, "Jet: A Modern Transformer-Based Normalizing Flow", 2025.
    """
    c, h, w = _image(shape, patch_size, "jet")
    patch = Patchify((c, h, w), patch_size)
    if patch.features < 2:
        raise ValueError(f"jet splits each patch's features in two; patches of {patch.features} feature(s) "
                         "cannot be split: use a larger patch_size")
    net = functools.partial(ViT, tokens=patch.tokens, width=channels, layers=layers, heads=heads)
    ts: list[Transform] = [*_preprocess(logit, alpha), patch]
    for i in range(couplings):
        mask = IndexMask(patch.features, _jet_split(patch.features, i), event_dim=2)
        ts.append(Coupling(mask, AffineKernel(scale_bound), net, context_features))
    ts.append(Unpatchify((c, h, w), patch_size))
    return Flow(Compose(*ts), StandardNormal((c, h, w)))
