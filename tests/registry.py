"""One registry of every transform, vector- and image-shaped, with and without context.

Each case builds a transform in float64, initialises data-dependent layers on a batch and then
perturbs every parameter, so zero-initialised layers are not trivially the identity.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import registry_continuous
import registry_neural
import registry_transformer
import registry_variational
import torch
from registry_types import Case
from torch import nn

from pushforward import Compose, Inverse, models
from pushforward.nn import MADE, MLP, ConvNet, ResNet
from pushforward.transforms import (
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
    LeakyReLU,
    Linear,
    Logit,
    LowerTriangular,
    LULinear,
    Permutation,
    Reverse,
    Sigmoid,
    SplineKernel,
    Squeeze,
    Tanh,
    Unsqueeze,
    UpperTriangular,
)


class CausalLinear(nn.Module):
    """The simplest conditioner that meets :class:`Autoregressive`'s contract, written outside the library.

    Vectors ``(*, D) -> (*, P * D)``: block ``p`` of feature ``i`` is ``sum_{j < i} W_p[i, j] x_j + b + V c``.
    A factory ``(in_features, out_features, context_features)`` like every conditioner.
    """

    def __init__(self, in_features: int, out_features: int, context_features: int = 0):
        super().__init__()
        self.params = out_features // in_features
        self.weight = nn.Parameter(torch.zeros(self.params, in_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.register_buffer("mask", torch.ones(in_features, in_features).tril(-1))
        self.context = nn.Linear(context_features, out_features) if context_features else None
        self.context_features = context_features

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.einsum("pij,...j->...pi", self.weight * self.mask, x).flatten(-2) + self.bias
        return out if self.context is None else out + self.context(context)


class CausalTokens(nn.Module):
    """A causal conditioner over a sequence ``(*, N, P) -> (*, N, K * P)``, the shape of TarFlow's.

    Token ``n``'s parameters mix the linearly embedded tokens ``m < n`` with learned weights ``A[n, m]``
    (one fixed causal attention pattern), plus a learned start (the first token sees only it) and the context.
    """

    def __init__(self, in_features: int, out_features: int, context_features: int = 0, *, tokens: int):
        super().__init__()
        self.embed = nn.Linear(in_features, out_features)
        self.mix = nn.Parameter(torch.randn(tokens, tokens) / tokens)
        self.register_buffer("mask", torch.ones(tokens, tokens).tril(-1))
        self.start = nn.Parameter(torch.zeros(out_features))
        self.context = nn.Linear(context_features, out_features) if context_features else None
        self.context_features = context_features
        nn.init.zeros_(self.embed.weight)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.einsum("nm,...mf->...nf", self.mix * self.mask, self.embed(x)) + self.start
        return out if self.context is None else out + self.context(context)[..., None, :]


V = 5  # vector size (odd on purpose: uneven splits)
IMG = (2, 4, 4)
SEQ = (3, 4)  # a sequence of 3 tokens of 4 features (e.g. patches)
mlp = functools.partial(MLP, hidden=(16, 16))
mlp1 = functools.partial(MLP, hidden=(16,))
conv = functools.partial(ConvNet, hidden_channels=8)
resnet = functools.partial(ResNet, hidden_channels=8, blocks=1)
made = functools.partial(MADE, hidden=(16,))
made0 = functools.partial(MADE, hidden=())
made2 = functools.partial(MADE, hidden=(16, 16))
spline = functools.partial(SplineKernel, bins=4, tail_bound=2.0)
tokens = functools.partial(CausalTokens, tokens=SEQ[0])

CASES: dict[str, Case] = {
    # pointwise
    "leaky_relu": Case(lambda: LeakyReLU(0.3), (V,)),
    "sigmoid": Case(lambda: Sigmoid(), (V,)),
    "logit": Case(lambda: Logit(0.05), (V,), unit_interval=True),
    "logit_no_alpha": Case(lambda: Logit(0.0), (V,), unit_interval=True),
    "tanh": Case(lambda: Tanh(), (V,)),
    "inverse_sigmoid": Case(lambda: Inverse(Sigmoid()), (V,), unit_interval=True),
    # linear family
    "elementwise_affine": Case(lambda: ElementwiseAffine(V), (V,)),
    "nice_scaling": Case(lambda: ElementwiseAffine(V, shift=False), (V,)),
    "actnorm": Case(lambda: ActNorm(V), (V,)),
    "linear": Case(lambda: Linear(V), (V,)),
    "lower_triangular": Case(lambda: LowerTriangular(V), (V,)),
    "upper_triangular": Case(lambda: UpperTriangular(V), (V,)),
    "permutation": Case(lambda: Permutation(torch.randperm(V)), (V,)),
    "reverse": Case(lambda: Reverse(V), (V,)),
    "lu_linear": Case(lambda: LULinear(V), (V,)),
    # coupling
    "additive_half": Case(lambda: Coupling(HalfMask(V), AdditiveKernel(), mlp), (V,)),
    "affine_half_flip": Case(lambda: Coupling(HalfMask(V, flip=True), AffineKernel(), mlp), (V,)),
    "affine_alternating": Case(lambda: Coupling(AlternatingMask(V), AffineKernel(), mlp), (V,)),
    "affine_alternating_flip": Case(lambda: Coupling(AlternatingMask(V, flip=True), AffineKernel(), mlp),
                                    (V,)),
    "affine_context": Case(lambda: Coupling(HalfMask(V), AffineKernel(), mlp1, 3), (V,), context=3),
    "additive_context": Case(lambda: Coupling(AlternatingMask(V), AdditiveKernel(), mlp1, 3), (V,),
                             context=3),
    "inverse_coupling": Case(lambda: Inverse(Coupling(HalfMask(V), AffineKernel(), mlp)), (V,)),
    "compose": Case(lambda: Compose(ActNorm(V), LULinear(V), Coupling(HalfMask(V), AffineKernel(), mlp),
                                    Tanh()), (V,)),
    "spline_half": Case(lambda: Coupling(HalfMask(V), SplineKernel(bins=4, tail_bound=2.0), mlp), (V,)),
    "spline_alternating_context": Case(
        lambda: Coupling(AlternatingMask(V), SplineKernel(bins=5, tail_bound=1.5), mlp1, 3), (V,), context=3
    ),
    # autoregressive (MAF direction, and IAF as its inverse)
    "maf_affine": Case(lambda: Autoregressive(V, AffineKernel(), made2), (V,)),
    "maf_default_made": Case(lambda: Autoregressive(V, AffineKernel()), (V,)),
    "maf_additive": Case(lambda: Autoregressive(V, AdditiveKernel(), made), (V,)),
    "maf_spline": Case(lambda: Autoregressive(V, SplineKernel(bins=4, tail_bound=2.0), made), (V,)),
    "maf_context": Case(lambda: Autoregressive(V, AffineKernel(), made, 3), (V,), context=3),
    "maf_context_1d": Case(lambda: Autoregressive(1, AffineKernel(), made, 3), (1,), context=3),
    "maf_context_no_hidden": Case(lambda: Autoregressive(V, AffineKernel(), made0, 3), (V,), context=3),
    "maf_spline_context": Case(lambda: Autoregressive(V, SplineKernel(bins=4, tail_bound=2.0), made, 3), (V,),
                               context=3),
    "iaf_context": Case(lambda: Inverse(Autoregressive(V, AffineKernel(), made, 3)), (V,), context=3),
    "iaf_affine": Case(lambda: Inverse(Autoregressive(V, AffineKernel(), made)), (V,)),
    # autoregressive over another conditioner: one written in the tests, over vectors and over token sequences
    "ar_causal_linear": Case(lambda: Autoregressive(V, AffineKernel(), CausalLinear), (V,)),
    "ar_causal_linear_context": Case(lambda: Autoregressive(V, spline(), CausalLinear, 3), (V,), context=3),
    "ar_tokens": Case(lambda: Autoregressive(SEQ, AffineKernel(), tokens), SEQ),
    "ar_tokens_spline_context": Case(lambda: Autoregressive(SEQ, spline(), tokens, 3), SEQ, context=3),
    "tokens_reversed_between_layers": Case(
        lambda: Compose(Autoregressive(SEQ, AffineKernel(), tokens, 3), Reverse(SEQ[0], event_dim=2),
                        Autoregressive(SEQ, AffineKernel(), tokens, 3)), SEQ, context=3),
    "iaf_tokens_context": Case(lambda: Inverse(Autoregressive(SEQ, AffineKernel(), tokens, 3)), SEQ,
                               context=3),
    # image-shaped
    "img_leaky_relu": Case(lambda: LeakyReLU(0.3, event_dim=3), IMG),
    "img_logit": Case(lambda: Logit(0.05, event_dim=3), IMG, unit_interval=True),
    "img_actnorm": Case(lambda: ActNorm(2, event_dim=3), IMG),
    "img_elementwise_affine": Case(lambda: ElementwiseAffine(2, event_dim=3), IMG),
    "img_permutation": Case(lambda: Permutation([1, 0], event_dim=3), IMG),
    "img_reverse": Case(lambda: Reverse(2, event_dim=3), IMG),
    "seq_reverse": Case(lambda: Reverse(SEQ[0], event_dim=2), SEQ),
    "conv1x1": Case(lambda: InvertibleConv1x1(2), IMG),
    "img_additive_channel": Case(lambda: Coupling(ChannelMask(2), AdditiveKernel(), conv), IMG),
    "img_affine_channel": Case(lambda: Coupling(ChannelMask(2, flip=True), AffineKernel(), conv), IMG),
    "img_affine_checkerboard": Case(lambda: Coupling(CheckerboardMask(2, 4, 4), AffineKernel(), resnet), IMG),
    "img_checkerboard_flip": Case(
        lambda: Coupling(CheckerboardMask(2, 4, 4, flip=True), AffineKernel(), conv), IMG
    ),
    "img_affine_context": Case(lambda: Coupling(ChannelMask(2), AffineKernel(), conv, 3), IMG, context=3),
    "img_checkerboard_context": Case(lambda: Coupling(CheckerboardMask(2, 4, 4), AffineKernel(), resnet, 3),
                                     IMG, context=3),
    "img_spline_checkerboard": Case(
        lambda: Coupling(CheckerboardMask(2, 4, 4), SplineKernel(bins=4, tail_bound=2.0), conv), IMG
    ),
    "img_spline_channel": Case(lambda: Coupling(ChannelMask(2), spline(), conv), IMG),
    "squeeze": Case(lambda: Squeeze(), IMG),
    "unsqueeze": Case(lambda: Unsqueeze(), (4, 2, 2)),
    "factor_out": Case(lambda: FactorOut(2, ElementwiseAffine(1, event_dim=3)), IMG),
    # whole recipes, as transforms
    "nice": Case(lambda: models.nice(V, layers=3, hidden=(16,)).transform, (V,)),
    "realnvp": Case(lambda: models.realnvp(V, layers=3, hidden=(16,)).transform, (V,)),
    "maf": Case(lambda: models.maf(V, layers=2, hidden=(16,)).transform, (V,)),
    "iaf": Case(lambda: models.iaf(V, layers=2, hidden=(16,)).transform, (V,)),
    "nsf_coupling": Case(lambda: models.nsf(V, layers=2, hidden=(16,), bins=4, tail_bound=2.0).transform,
                         (V,)),
    "nsf_autoregressive": Case(
        lambda: models.nsf(V, layers=2, hidden=(16,), bins=4, tail_bound=2.0, autoregressive=True).transform,
        (V,),
    ),
    "maf_recipe_context": Case(lambda: models.maf(V, layers=2, hidden=(16,), context_features=3).transform,
                               (V,), context=3),
    "nsf_autoregressive_context": Case(
        lambda: models.nsf(V, layers=2, hidden=(16,), bins=4, tail_bound=2.0, autoregressive=True,
                           context_features=3).transform, (V,), context=3
    ),
    "realnvp_context": Case(lambda: models.realnvp(V, layers=3, hidden=(16,), context_features=3).transform,
                            (V,), context=3),
    "realnvp_image": Case(
        lambda: models.realnvp_image((1, 4, 4), levels=2, hidden_channels=8, blocks=1).transform, (1, 4, 4),
        unit_interval=True,
    ),
    "glow": Case(lambda: models.glow((1, 4, 4), levels=2, steps=2, hidden_channels=8).transform, (1, 4, 4),
                 unit_interval=True),
    "glow_context": Case(
        lambda: models.glow((1, 4, 4), levels=2, steps=2, hidden_channels=8, context_features=3).transform,
        (1, 4, 4), context=3, unit_interval=True,
    ),
}

# the families added after the lecture, one file each (their cases and small recipe instances)
for _family in (registry_transformer, registry_continuous, registry_neural, registry_variational):
    _clash = CASES.keys() & _family.CASES.keys()
    assert not _clash, f"registry names used twice: {_clash}"
    CASES.update(_family.CASES)

FAMILY_RECIPES: dict[str, Callable] = {}  # small instances of the families' recipes (test_io_dtype)
FAMILY_COMPILE: dict[str, Callable] = {}  # the ones that compile with fullgraph (test_compile)
for _family in (registry_transformer, registry_continuous, registry_neural, registry_variational):
    FAMILY_RECIPES.update(_family.RECIPES)
    FAMILY_COMPILE.update(_family.COMPILE)
