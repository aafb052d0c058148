"""Recipes of the neural family: neural autoregressive flows (NAF) and their unconstrained form (UNAF).

Both are MAF's structure (:class:`~pushforward.transforms.Autoregressive` layers over MADE conditioners,
orders reversed between layers) with a monotone neural network as the elementwise kernel: density
evaluation is one conditioner pass per layer; sampling inverts each layer numerically (``D``
conditioner passes, each with a batched bisection: see the kernels).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from ..core import Compose, Flow, Transform
from ..distributions import StandardNormal
from ..nn import MADE
from ..protocols import Kernel
from ..recipes import recipe
from ..transforms import Autoregressive, DeepSigmoidalKernel, Reverse, UMNNKernel

__all__ = ["naf", "unaf"]


def _layers(features: int, layers: int, kernel: Kernel, hidden: Sequence[int],
            context_features: int) -> list[Transform]:
    ts: list[Transform] = []
    for i in range(layers):
        if i:
            ts.append(Reverse(features))  # each layer sees the previous one's order reversed
        ts.append(Autoregressive(features, kernel, functools.partial(MADE, hidden=tuple(hidden)),
                                 context_features))
    return ts


@recipe
def naf(features: int, layers: int = 5, hidden: Sequence[int] = (64, 64), units: int = 16, depth: int = 1,
        identity_init: bool = False, context_features: int = 0) -> Flow:
    """Neural autoregressive flow: MADE layers whose kernel is a deep sigmoidal flow.

    Each layer maps feature ``i`` by ``logit(w . sigmoid(a x_i + b))`` with ``units`` sigmoid units whose
    ``a > 0``, ``b`` and ``w`` (on the simplex) a MADE with hidden sizes ``hidden`` computes from
    ``x_<i`` (and the context); ``depth >= 2`` stacks dense sigmoidal layers (DDSF) of ``units`` units
    (:class:`~pushforward.transforms.DeepSigmoidalKernel`; ``identity_init`` starts every layer as the
    exact identity, at some cost in training speed). Exact density; sampling by bisection, to ``1e-10``
    in float64.

    References:
        Huang, Krueger, Lacoste & Courville, "Neural Autoregressive Flows", 2018.
    """
    kernel = DeepSigmoidalKernel(units, layers=depth, identity_init=identity_init)
    ts = _layers(features, layers, kernel, hidden, context_features)
    return Flow(Compose(*ts), StandardNormal(features))


@recipe
def unaf(features: int, layers: int = 5, hidden: Sequence[int] = (64, 64), units: int = 16, nodes: int = 64,
         max_log_slope: float = 5.0, context_features: int = 0) -> Flow:
    """Unconstrained neural autoregressive flow: MADE layers whose kernel integrates a positive network.

    Each layer maps feature ``i`` by ``beta + int_0^x g(t) dt``, ``g = exp(L tanh(s / L))`` of a network
    ``s`` of ``units`` tanh units whose weights (and ``beta``) a MADE computes from ``x_<i``
    (:class:`~pushforward.transforms.UMNNKernel`); the integral by Clenshaw-Curtis quadrature with
    ``nodes + 1`` points (so ``z``, and with it the density, is exact only to the quadrature's error: see
    the kernel), the log-determinant ``log g(x)`` exactly; ``L = max_log_slope``. Sampling by bisection.

    References:
        Wehenkel & Louppe, "Unconstrained Monotonic Neural Networks", 2019.
    """
    kernel = UMNNKernel(units, nodes, max_log_slope=max_log_slope)
    ts = _layers(features, layers, kernel, hidden, context_features)
    return Flow(Compose(*ts), StandardNormal(features))
