"""pushforward: normalizing flows in PyTorch with exact densities.

``log p(x) = log p_z(f(x)) + log|det Df(x)|``, where ``f`` maps data to latent.
"""

from . import (
    distributions,
    models,
    nn,
    protocols,
    transforms,
    vae,  # registers the "vae" recipe (the lecture's baseline)
)
from .core import Compose, Flow, FlowDistribution, Inverse, InvertibilityWarning, Transform, set_validation
from .distributions import DiagonalNormal, GaussianMixture, StandardNormal
from .initialization import initialize
from .io import load, save

__version__ = "0.1.0"

__all__ = [
    "Compose",
    "DiagonalNormal",
    "Flow",
    "FlowDistribution",
    "GaussianMixture",
    "Inverse",
    "InvertibilityWarning",
    "StandardNormal",
    "Transform",
    "distributions",
    "initialize",
    "load",
    "models",
    "nn",
    "protocols",
    "save",
    "set_validation",
    "transforms",
    "vae",
]
