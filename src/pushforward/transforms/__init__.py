"""Every transform of the lecture, each a :class:`~pushforward.core.Transform`."""

from .autoregressive import Autoregressive
from .continuous import CNF, ConvVectorField, MLPVectorField
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
from .neural_autoregressive import DeepSigmoidalKernel, UMNNKernel
from .orthogonal import Householder
from .reshape import FactorOut, Patchify, Squeeze, Unpatchify, Unsqueeze
from .residual import LipSwish, ResidualBlock, RussianRoulette
from .splines import CircularSplineKernel, SplineKernel
from .variational import Planar, Radial, Sylvester

__all__ = [
    "ActNorm",
    "AdditiveKernel",
    "AffineKernel",
    "AlternatingMask",
    "Autoregressive",
    "CNF",
    "ChannelMask",
    "ConvVectorField",
    "CircularSplineKernel",
    "CheckerboardMask",
    "Coupling",
    "DeepSigmoidalKernel",
    "ElementwiseAffine",
    "FactorOut",
    "GaussianWhitening",
    "HalfMask",
    "Householder",
    "IndexMask",
    "InvertibleConv1x1",
    "LULinear",
    "LeakyReLU",
    "Linear",
    "LipSwish",
    "Logit",
    "LowerTriangular",
    "MLPVectorField",
    "Mask",
    "Patchify",
    "Permutation",
    "Planar",
    "Radial",
    "ResidualBlock",
    "Reverse",
    "RussianRoulette",
    "Sigmoid",
    "SplineKernel",
    "Squeeze",
    "Sylvester",
    "Tanh",
    "Triangular",
    "UMNNKernel",
    "Unpatchify",
    "Unsqueeze",
    "UpperTriangular",
]
