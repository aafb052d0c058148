"""Every transform of the lecture, each a :class:`~pushforward.core.Transform`."""

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
    InvertibleConv1x1,
    Linear,
    LowerTriangular,
    LULinear,
    Permutation,
    Reverse,
    Triangular,
    UpperTriangular,
)
from .reshape import FactorOut, Squeeze, Unsqueeze
from .splines import SplineKernel
from .autoregressive import Autoregressive

__all__ = [
    "ActNorm", "AdditiveKernel", "Autoregressive", "SplineKernel", "AffineKernel", "AlternatingMask", "ChannelMask", "CheckerboardMask",
    "Coupling", "ElementwiseAffine", "FactorOut", "HalfMask", "IndexMask", "InvertibleConv1x1",
    "LeakyReLU", "Linear", "Logit", "LowerTriangular", "LULinear", "Mask", "Permutation", "Reverse",
    "Sigmoid", "Squeeze", "Tanh", "Triangular", "Unsqueeze", "UpperTriangular",
]
