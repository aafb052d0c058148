"""Recipes: functions that build a ready-to-train :class:`~pushforward.core.Flow`, one module per family.

Every recipe records its name and arguments in ``flow.recipe`` so that :func:`build` (and
:func:`pushforward.io.load`) can rebuild the same architecture without unpickling code. Importing this
package registers every recipe in :data:`RECIPES`.

* :mod:`~pushforward.models.lecture`: NICE, RealNVP, Glow, MAF, IAF, NSF, variational dequantization;
* :mod:`~pushforward.models.tabular`: the full-covariance Gaussian and the default tabular flow;
* :mod:`~pushforward.models.transformer`: Transformer flows over image patches (TarFlow, Jet);
* :mod:`~pushforward.models.continuous`: continuous normalizing flows;
* :mod:`~pushforward.models.neural`: neural autoregressive flows (NAF, UNAF);
* :mod:`~pushforward.models.variational`: residual, planar, radial and Sylvester flows;
* the VAE baseline the lecture compares against lives in :mod:`pushforward.vae`.
"""

from .. import vae as _vae  # noqa: F401  registers the "vae" recipe (the lecture's baseline) in RECIPES
from ..recipes import RECIPES, build
from . import continuous, neural, transformer, variational
from .lecture import dequantized, glow, iaf, maf, nice, nsf, realnvp, realnvp_image
from .tabular import SoftClippedInputs, gaussian, tabular

__all__ = ["RECIPES", "SoftClippedInputs", "build", "dequantized", "gaussian", "glow", "iaf", "maf", "nice",
           "nsf", "realnvp", "realnvp_image", "tabular",
           *continuous.__all__, *neural.__all__, *transformer.__all__, *variational.__all__]


def __getattr__(name: str):
    for family in (continuous, neural, transformer, variational):
        if name in family.__all__:
            return getattr(family, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
