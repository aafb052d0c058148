"""pushforward: normalizing flows in PyTorch with exact densities.

``log p(x) = log p_z(f(x)) + log|det Df(x)|``, where ``f`` maps data to latent.

Names are imported on first use (PEP 562), so ``import pushforward`` and ``pushforward --help``
do not import torch; ``from pushforward import Flow`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it (relative to this package)
_NAMES = {
    "Compose": ".core", "Flow": ".core", "FlowDistribution": ".core", "Inverse": ".core",
    "InvertibilityWarning": ".core", "Transform": ".core", "set_validation": ".core",
    "DiagonalNormal": ".distributions", "GaussianMixture": ".distributions",
    "StandardNormal": ".distributions",
    "initialize": ".initialization", "load": ".io", "save": ".io",
}
_MODULES = ("distributions", "models", "nn", "objectives", "protocols", "transforms", "vae")

# written out (sorted [*_NAMES, *_MODULES]) so that linters and type checkers see the re-exports
__all__ = [
    "Compose", "DiagonalNormal", "Flow", "FlowDistribution", "GaussianMixture", "Inverse",
    "InvertibilityWarning", "StandardNormal", "Transform", "distributions", "initialize", "load",
    "models", "nn", "objectives", "protocols", "save", "set_validation", "transforms", "vae",
]

if TYPE_CHECKING:
    from . import distributions, models, nn, objectives, protocols, transforms, vae
    from .core import (
        Compose,
        Flow,
        FlowDistribution,
        Inverse,
        InvertibilityWarning,
        Transform,
        set_validation,
    )
    from .distributions import DiagonalNormal, GaussianMixture, StandardNormal
    from .initialization import initialize
    from .io import load, save


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name], __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'pushforward' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
