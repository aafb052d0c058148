"""Every transform of the lecture, each a :class:`~pushforward.core.Transform`."""

from .autoregressive import Autoregressive
from .coupling import (
    AdditiveKernel,
    AffineKernel,
    AlternatingMask,
    ChannelMask,
    CheckerboardMask,
    Coupling,
    HalfMask,
    IndexMask,
    Mask,
)
from .elementwise import ActNorm, ElementwiseAffine, LeakyReLU, Logit, Sigmoid, Tanh
from .linear import (
    GaussianWhitening,
    InvertibleConv1x1,
    Linear,
    LowerTriangular,
    LULinear,
    Permutation,
    Reverse,
    Triangular,
    UpperTriangular,
)
from .reshape import FactorOut, Patchify, Squeeze, Unpatchify, Unsqueeze
from .splines import SplineKernel

__all__ = [
    "ActNorm",
    "AdditiveKernel",
    "AffineKernel",
    "AlternatingMask",
    "Autoregressive",
    "ChannelMask",
    "CheckerboardMask",
    "Coupling",
    "ElementwiseAffine",
    "FactorOut",
    "GaussianWhitening",
    "HalfMask",
    "IndexMask",
    "InvertibleConv1x1",
    "LULinear",
    "LeakyReLU",
    "Linear",
    "Logit",
    "LowerTriangular",
    "Mask",
    "Patchify",
    "Permutation",
    "Reverse",
    "Sigmoid",
    "SplineKernel",
    "Squeeze",
    "Tanh",
    "Triangular",
    "Unpatchify",
    "Unsqueeze",
    "UpperTriangular",
]
