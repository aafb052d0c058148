"""Registry entries of the neural family: transform cases (test_transforms.py) and small recipe
instances (saved and loaded bit-exactly by test_io_dtype.py; compiled with fullgraph by test_compile.py when
listed in COMPILE).

Here: the neural autoregressive kernels (DSF / DDSF of NAF, UMNN of UNAF) in autoregressive and coupling
layers and in their inverse (IAF) direction, Householder reflections, and circular splines on angles."""

from __future__ import annotations

import functools
from collections.abc import Callable

from registry_types import Case

from pushforward import Compose, Inverse, models
from pushforward.nn import MADE, MLP, ConvNet
from pushforward.transforms import (
    Autoregressive,
    ChannelMask,
    CheckerboardMask,
    CircularSplineKernel,
    Coupling,
    DeepSigmoidalKernel,
    HalfMask,
    Householder,
    Reverse,
    UMNNKernel,
)

V = 5
IMG = (2, 4, 4)
made = functools.partial(MADE, hidden=(16,))
made_wide = functools.partial(MADE, hidden=(40,))  # context cases: many units see the context alone
mlp = functools.partial(MLP, hidden=(16,))
conv = functools.partial(ConvNet, hidden_channels=8)
dsf = functools.partial(DeepSigmoidalKernel, units=4)
ddsf = functools.partial(DeepSigmoidalKernel, units=3, layers=3)
umnn = functools.partial(UMNNKernel, units=4)
circular = functools.partial(CircularSplineKernel, bins=4)

CASES: dict[str, Case] = {
    # NAF: deep sigmoidal flows
    "naf_dsf": Case(lambda: Autoregressive(V, dsf(), made), (V,)),
    "naf_ddsf": Case(lambda: Autoregressive(V, ddsf(), made), (V,)),
    "naf_dsf_context": Case(lambda: Autoregressive(V, dsf(), made_wide, 3), (V,), context=3),
    "naf_inverse_dsf": Case(lambda: Inverse(Autoregressive(V, dsf(), made)), (V,)),
    "dsf_coupling": Case(lambda: Coupling(HalfMask(V), ddsf(), mlp), (V,)),
    "img_dsf_channel": Case(lambda: Coupling(ChannelMask(2), dsf(), conv), IMG),
    "naf_dsf_identity_init": Case(lambda: Autoregressive(V, dsf(identity_init=True), made), (V,)),
    "img_ddsf_checkerboard_identity_init": Case(
        lambda: Coupling(CheckerboardMask(2, 4, 4), ddsf(layers=2, identity_init=True), conv), IMG),
    # UNAF: unconstrained monotonic networks
    "unaf_umnn": Case(lambda: Autoregressive(V, umnn(), made), (V,)),
    "unaf_umnn_context": Case(lambda: Autoregressive(V, umnn(), made, 3), (V,), context=3),
    "unaf_inverse_umnn": Case(lambda: Inverse(Autoregressive(V, umnn(), made)), (V,)),
    "umnn_coupling_context": Case(lambda: Coupling(HalfMask(V), umnn(), mlp, 3), (V,), context=3),
    # orthogonal
    "householder": Case(lambda: Householder(V), (V,)),
    "householder_two": Case(lambda: Householder(V, reflections=2), (V,)),
    "householder_in_compose": Case(lambda: Compose(Householder(V), Autoregressive(V, dsf(), made)), (V,)),
    # circular splines on angles
    "circular_coupling": Case(lambda: Coupling(HalfMask(V), circular(), mlp), (V,), circle=True),
    "circular_autoregressive": Case(lambda: Autoregressive(V, circular(), made), (V,), circle=True),
    "circular_context": Case(lambda: Autoregressive(V, circular(), made, 3), (V,), context=3, circle=True),
    "circular_compose": Case(
        lambda: Compose(Autoregressive(V, circular(), made), Reverse(V),
                        Coupling(HalfMask(V), circular(bins=3), mlp)), (V,), circle=True),
    "circular_inverse": Case(lambda: Inverse(Autoregressive(V, circular(), made)), (V,), circle=True),
    # whole recipes, as transforms
    "naf": Case(lambda: models.naf(V, layers=2, hidden=(16,), units=4).transform, (V,)),
    "naf_deep_context": Case(lambda: models.naf(V, layers=2, hidden=(16,), units=3, depth=2,
                                                context_features=3).transform, (V,), context=3),
    "unaf": Case(lambda: models.unaf(V, layers=2, hidden=(16,), units=4).transform, (V,)),
}
RECIPES: dict[str, Callable] = {
    "naf": lambda: models.naf(4, layers=2, hidden=(8,), units=4, context_features=3),
    "unaf": lambda: models.unaf(4, layers=2, hidden=(8,), units=4),
}
COMPILE: dict[str, Callable] = {  # sampling unrolls each bisection: one small layer keeps tracing to seconds
    "naf": lambda: models.naf(2, layers=1, hidden=(8,), units=4),
    "unaf": lambda: models.unaf(2, layers=1, hidden=(8,), units=4, nodes=8),
}
