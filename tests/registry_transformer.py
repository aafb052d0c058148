"""Registry entries of the transformer family: transform cases (test_transforms.py) and small recipe
instances (saved and loaded bit-exactly by test_io_dtype.py; compiled with fullgraph by test_compile.py when
listed in COMPILE)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from registry_types import Case

from pushforward import Compose, Inverse, models
from pushforward.nn import CausalTransformer, ViT
from pushforward.transforms import AffineKernel, Autoregressive, Coupling, IndexMask, Reverse, SplineKernel
from pushforward.transforms.reshape import Patchify, Unpatchify

IMG = (2, 4, 4)
SEQ = (3, 4)  # 3 tokens of 4 features
jet = functools.partial(models.jet, channels=8, couplings=2, layers=1, heads=2)
tf = functools.partial(models.tarflow, patch_size=4, channels=8, blocks=2, layers_per_block=1, heads=2)
causal = functools.partial(CausalTransformer, tokens=SEQ[0], width=8, layers=2, heads=2, mlp_ratio=2)
vit = functools.partial(ViT, tokens=SEQ[0], width=8, layers=1, heads=2, mlp_ratio=2)
spline = functools.partial(SplineKernel, bins=4, tail_bound=2.0)


def _uncached(t: Autoregressive) -> Autoregressive:
    t.use_cache = False
    return t


CASES: dict[str, Case] = {
    "patchify": Case(lambda: Patchify(IMG, 2), IMG),
    "unpatchify": Case(lambda: Unpatchify(IMG, 2), (4, 8)),
    "ar_causal_transformer": Case(lambda: Autoregressive(SEQ, AffineKernel(), causal), SEQ),
    "ar_causal_transformer_context": Case(lambda: Autoregressive(SEQ, AffineKernel(), causal, 3), SEQ,
                                          context=3),
    "ar_causal_transformer_uncached": Case(lambda: _uncached(Autoregressive(SEQ, AffineKernel(), causal, 3)),
                                           SEQ, context=3),
    "ar_causal_transformer_spline_context": Case(lambda: Autoregressive(SEQ, spline(), causal, 3), SEQ,
                                                 context=3),
    "iaf_causal_transformer": Case(lambda: Inverse(Autoregressive(SEQ, AffineKernel(), causal, 3)), SEQ,
                                   context=3),
    "tarflow_blocks_reversed": Case(
        lambda: Compose(Autoregressive(SEQ, AffineKernel(), causal), Reverse(SEQ[0], event_dim=2),
                        Autoregressive(SEQ, AffineKernel(), causal)), SEQ),
    "jet_coupling": Case(lambda: Coupling(IndexMask(4, [0, 3], event_dim=2), AffineKernel(), vit), SEQ),
    "jet_coupling_context": Case(lambda: Coupling(IndexMask(4, [1], event_dim=2), AffineKernel(), vit, 3),
                                 SEQ, context=3),
    "tarflow": Case(lambda: models.tarflow((1, 4, 4), patch_size=2, channels=8, blocks=2, layers_per_block=1,
                                           heads=2).transform, (1, 4, 4), unit_interval=True),
    "tarflow_context": Case(lambda: models.tarflow((2, 4, 4), patch_size=2, channels=8, blocks=2,
                                                   layers_per_block=1, heads=2, logit=False,
                                                   context_features=3).transform, (2, 4, 4), context=3),
    "jet": Case(lambda: jet((1, 4, 4), patch_size=2).transform, (1, 4, 4), unit_interval=True),
    "jet_context": Case(lambda: jet((2, 4, 4), patch_size=2, logit=False, context_features=3).transform,
                        (2, 4, 4), context=3),
}

RECIPES: dict[str, Callable] = {
    "tarflow": lambda: tf((1, 8, 8), context_features=3),
    "jet": lambda: jet((1, 8, 8), patch_size=4),
}
COMPILE: dict[str, Callable] = {
    "tarflow": lambda: tf((1, 8, 8)),
    "tarflow_context": lambda: tf((1, 8, 8), context_features=3),
    "jet_context": lambda: jet((1, 8, 8), patch_size=4, context_features=3),
}
