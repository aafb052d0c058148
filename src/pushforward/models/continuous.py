"""Recipes of the continuous family: continuous normalizing flows for vectors, tables and small images.

Each is a :class:`~pushforward.core.Flow` over a :class:`~pushforward.transforms.CNF` (an ODE solved by
torchdiffeq) and a standard normal base. Train it by maximum likelihood through the ODE (the default
:class:`~pushforward.objectives.NLL`) or by flow matching without one
(:class:`~pushforward.objectives.FlowMatching`; ``pushforward train --recipe cnf --objective
flow-matching``); either way ``log_prob`` is the exact likelihood by the ODE (to the solver's tolerance).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core import Compose, Flow, Transform
from ..distributions import StandardNormal
from ..recipes import recipe
from ..transforms import Logit
from ..transforms.continuous import CNF, ConvVectorField, MLPVectorField

__all__ = ["cnf", "cnf_image"]


@recipe
def cnf(features: int, hidden: Sequence[int] = (64, 64, 64), freqs: int = 3, divergence: str = "exact",
        method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5, step_size: float = 0.0,
        adjoint: bool = False, context_features: int = 0) -> Flow:
    """A continuous normalizing flow for vectors and tables: one CNF over an MLP vector field.

    ``dx/dt = v(t, x, context)`` with :class:`~pushforward.transforms.continuous.MLPVectorField` (SiLU,
    ``hidden`` layers, ``freqs`` time frequencies), solved by torchdiffeq's ``method`` at tolerances
    ``rtol`` / ``atol`` (or a fixed ``step_size``). ``divergence`` is the one used in training
    (``"exact"``, or Hutchinson's estimate ``"hutchinson"`` for many features); evaluation always uses
    the exact divergence. The field starts at zero: the untrained flow is the standard normal.

    References:
        Chen, Rubanova, Bettencourt & Duvenaud, "Neural Ordinary Differential Equations", 2018;
        Grathwohl et al., "FFJORD", 2019; Lipman et al., "Flow Matching for Generative Modeling", 2023.
    """
    field = MLPVectorField(features, tuple(hidden), context_features, freqs=freqs)
    transform = CNF(field, 1, divergence=divergence, method=method, rtol=rtol, atol=atol,
                    step_size=step_size, adjoint=adjoint)
    return Flow(Compose(transform), StandardNormal(features))


@recipe
def cnf_image(shape: Sequence[int], hidden_channels: int = 32, blocks: int = 2, freqs: int = 3,
              alpha: float | None = 0.05, divergence: str = "hutchinson", method: str = "dopri5",
              rtol: float = 1e-5, atol: float = 1e-5, step_size: float = 0.0, adjoint: bool = False,
              context_features: int = 0) -> Flow:
    """A small continuous normalizing flow for images in ``[0, 1]`` (dequantized pixels), e.g. digits.

    The logit preprocessing (``alpha``; ``None``: none) is a layer inside the flow, so its
    log-determinant is counted in bits/dim; then one CNF over a
    :class:`~pushforward.transforms.continuous.ConvVectorField` (``blocks + 1`` hidden 3x3 convolutions
    of ``hidden_channels``, time and context as per-channel biases). Training by maximum likelihood
    uses Hutchinson's estimate by default (``divergence``); evaluation uses the exact divergence
    (``D`` vector-Jacobian products per step: fine at 8x8, costly at 28x28). Flow matching
    (``--objective flow-matching``) applies the logit to the data and regresses the field behind it.

    References:
        Grathwohl et al., "FFJORD", 2019; Lipman et al., "Flow Matching for Generative Modeling", 2023.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"cnf_image expects an image shape (C, H, W), got {tuple(shape)}")
    field = ConvVectorField(shape, hidden_channels, blocks, context_features, freqs=freqs)
    layers: list[Transform] = [] if alpha is None else [Logit(alpha, event_dim=3)]
    layers.append(CNF(field, 3, divergence=divergence, method=method, rtol=rtol, atol=atol,
                      step_size=step_size, adjoint=adjoint))
    return Flow(Compose(*layers), StandardNormal(tuple(shape)))
