"""Recipes for tables: the full-covariance Gaussian floor and the default tabular flow built on it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..core import Compose, Flow, Transform
from ..distributions import StandardNormal
from ..nn import MADE
from ..recipes import recipe
from ..transforms import Autoregressive, GaussianWhitening, Reverse, SplineKernel

__all__ = ["SoftClippedInputs", "gaussian", "tabular"]


@recipe
def gaussian(features: int) -> Flow:
    """The full-covariance Gaussian: one :class:`~pushforward.transforms.GaussianWhitening` layer.

    Initialised (:func:`pushforward.initialize`, or the first training batch) it is the maximum-likelihood
    Gaussian of the data: the floor every tabular flow should beat.
    """
    return Flow(Compose(GaussianWhitening(features)), StandardNormal(features))


class SoftClippedInputs(nn.Module):
    """A conditioner that reads its inputs through ``bound * tanh(x / bound)``.

    Elementwise and monotone, so an autoregressive (or coupling) conditioner stays one: output ``i``
    still depends on inputs ``< i`` only, the Jacobian keeps its structure and the density stays exact;
    only the parameters the network produces change. Near zero the map is the identity; a value far
    outside the data (an outlier row, a whitened value of 50) reaches the network as at most ``bound``,
    so the parameters it produces for the *other* coordinates stay in the range seen in training
    instead of growing linearly with the outlier (extreme spline slopes: thousands of nats). ``bound``
    ``<= 0`` passes the inputs unchanged.

    Args:
        net: the conditioner, called as ``net(x)`` or ``net(x, context)``.
        bound: the soft bound on the inputs.
    """

    def __init__(self, net: nn.Module, bound: float):
        super().__init__()
        self.net, self.bound = net, float(bound)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.bound > 0:
            x = self.bound * torch.tanh(x / self.bound)
        return self.net(x) if context is None else self.net(x, context)

    def extra_repr(self) -> str:
        return f"bound={self.bound}"


def _soft_clipped_made(hidden: Sequence[int], bound: float) -> Callable[..., nn.Module]:
    def factory(in_features: int, out_features: int, context_features: int = 0) -> nn.Module:
        made = MADE(in_features, out_features, context_features, hidden=tuple(hidden))
        return SoftClippedInputs(made, bound)

    return factory


@recipe
def tabular(features: int, layers: int = 4, hidden: Sequence[int] = (64, 64), bins: int = 8,
            tail_bound: float = 4.0, input_bound: float = 4.0, gaussian_at: str = "start",
            shrinkage: str = "none", context_features: int = 0) -> Flow:
    """The default model of tables: autoregressive spline layers and the full-covariance Gaussian.

    A :class:`~pushforward.transforms.GaussianWhitening` layer (initialised from the training rows)
    maps its input to ``L^-1 (x - mean)``; ``layers`` rational-quadratic spline layers with MADE
    conditioners (reversed orders in between; ``bins`` bins on ``[-tail_bound, tail_bound]``) start as
    the identity, so the untrained flow *is* the Gaussian fit and training starts from that floor. One
    feature works too (the spline is then unconditional).

    ``gaussian_at`` places the Gaussian layer: ``"start"`` (data side: the splines see whitened,
    decorrelated inputs; better on large correlated tables), ``"end"`` (latent side, a full-covariance
    Gaussian base: the splines see the standardised columns, so atoms and zero-inflated columns stay
    axis-aligned; better on small tables), or ``"none"`` (no Gaussian layer: the flow starts at the
    standard normal). The ``table`` entry picks ``"end"`` below 1,000 training rows, else ``"start"``
    (:func:`pushforward.data.tabular.sized_defaults`). The conditioners read their inputs softly
    clipped to ``input_bound`` (:class:`SoftClippedInputs`; ``0`` turns it off): the density stays
    exact, and a row far outside the training data (whitened values of 50) gets spline parameters from
    the range seen in training, so its NLL stays near the Gaussian's instead of exploding.
    ``shrinkage`` (:class:`~pushforward.transforms.GaussianWhitening`): ``"none"`` starts at the
    maximum-likelihood Gaussian; ``"ledoit-wolf"`` (the ``table`` entry's default) at the Gaussian with
    the Ledoit-Wolf shrunk covariance, which generalises better from few rows (on many rows it is the
    maximum-likelihood one to within a small weight).

    References:
        Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", 2019 (autoregressive RQ splines);
        Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density Estimation", 2017.
    """
    if gaussian_at not in ("start", "end", "none"):
        raise ValueError(f"tabular: gaussian_at is 'start', 'end' or 'none', got {gaussian_at!r}")
    if shrinkage not in ("none", "ledoit-wolf"):
        raise ValueError(f"tabular: shrinkage is 'none' or 'ledoit-wolf', got {shrinkage!r}")
    gauss = GaussianWhitening(features, shrinkage=0.0 if shrinkage == "none" else shrinkage)
    ts: list[Transform] = [gauss] if gaussian_at == "start" else []
    kernel = SplineKernel(bins, tail_bound)
    net = _soft_clipped_made(hidden, input_bound)
    for i in range(layers):
        if i:
            ts.append(Reverse(features))  # each layer sees the previous one's order reversed
        ts.append(Autoregressive(features, kernel, net, context_features))
    if gaussian_at == "end":
        ts.append(gauss)
    return Flow(Compose(*ts), StandardNormal(features))
