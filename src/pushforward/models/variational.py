"""Recipes of the variational-inference family and of residual flows: ``planar``, ``radial``, ``sylvester``,
``residual``.

Every layer of these flows has one explicit direction, its paper's map ``y = x + (a residual)``
(:mod:`pushforward.transforms.variational`, :mod:`pushforward.transforms.residual`). ``variational``
chooses which direction of the flow it serves:

* ``variational=True`` (the default of ``planar``, ``radial``, ``sylvester``): each layer is wrapped in
  :class:`~pushforward.core.Inverse`, so **sampling** (latent -> data) runs the explicit maps, as in the
  papers: :meth:`~pushforward.core.Flow.sample_and_log_prob` gives reparameterised samples and their
  log-density in one explicit pass (reverse-KL training, :mod:`pushforward.objectives`), and
  :meth:`~pushforward.core.Flow.log_prob` runs the layers' inverses (numerical for planar, Sylvester and
  residual blocks, analytic for radial);
* ``variational=False`` (the default of ``residual``): the explicit maps evaluate the **density**
  (maximum likelihood), and sampling runs the inverses.

With the numerical inverses exact to the dtype's precision, both directions give exact densities; they
differ in cost, and ``sample_and_log_prob``'s invertibility check (a pass the other way, see
:meth:`~pushforward.core.Flow.sample_and_log_prob`) runs the numerical direction.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core import Compose, Flow, Inverse, Transform
from ..distributions import StandardNormal
from ..recipes import recipe
from ..transforms import Planar, Radial, ResidualBlock, Reverse, RussianRoulette, Sylvester

__all__ = ["planar", "radial", "residual", "sylvester"]


def _flow(layers: list[Transform], features: int, variational: bool) -> Flow:
    if variational:
        layers = [Inverse(t) for t in reversed(layers)]  # layers[0] is the first applied to a base sample
    return Flow(Compose(*layers), StandardNormal(features))


@recipe
def planar(features: int, layers: int = 16, variational: bool = True, context_features: int = 0) -> Flow:
    """A stack of ``layers`` planar layers (:class:`~pushforward.transforms.Planar`) on a standard normal.

    ``variational=True``: sampling is explicit (``x = f_K o ... o f_1 (z)``), the density numerical (one
    scalar bisection per layer); see the module docstring.

    References:
        Rezende & Mohamed, "Variational Inference with Normalizing Flows", 2015.
    """
    return _flow([Planar(features, context_features) for _ in range(layers)], features, variational)


@recipe
def radial(features: int, layers: int = 16, variational: bool = True, context_features: int = 0) -> Flow:
    """A stack of ``layers`` radial layers (:class:`~pushforward.transforms.Radial`) on a standard normal.

    Both directions are analytic; ``variational`` chooses which one is the layers' forward map.

    References:
        Rezende & Mohamed, "Variational Inference with Normalizing Flows", 2015.
    """
    return _flow([Radial(features, context_features) for _ in range(layers)], features, variational)


@recipe
def sylvester(features: int, layers: int = 8, reflections: int = 0, variational: bool = True,
              context_features: int = 0) -> Flow:
    """A stack of ``layers`` Sylvester layers (:class:`~pushforward.transforms.Sylvester`).

    ``reflections=0``: the triangular Sylvester flow (T-SNF), ``Q = I`` with the coordinates reversed
    between layers (the paper's alternating permutation); ``reflections > 0``: the Householder Sylvester
    flow (H-SNF) with that many reflections per layer.

    References:
        van den Berg, Hasenclever, Tomczak & Welling, "Sylvester Normalizing Flows for Variational
        Inference", 2018.
    """
    ts: list[Transform] = []
    for i in range(layers):
        if i and reflections == 0:
            ts.append(Reverse(features))
        ts.append(Sylvester(features, reflections, context_features))
    return _flow(ts, features, variational)


_LOGDETS = ("roulette", "exact")


@recipe
def residual(features: int, blocks: int = 8, hidden: Sequence[int] = (128, 128), coefficient: float = 0.97,
             train_logdet: str = "roulette", variational: bool = False, context_features: int = 0) -> Flow:
    """A Residual Flow: ``blocks`` invertible residual blocks (:class:`~pushforward.transforms.ResidualBlock`)

    Each block is ``x + g(x)`` with ``g`` an MLP of hidden widths ``hidden``, LipSwish activations and
    weights of spectral norm at most ``coefficient`` (exact norms). ``train_logdet`` is the log-determinant
    in **training mode**: ``"roulette"``, the unbiased Russian-roulette power-series estimate of Residual
    Flows (:class:`~pushforward.transforms.RussianRoulette` with its defaults: 2 exact terms, geometric
    ``p = 0.5``, one Hutchinson probe), or ``"exact"``. In **evaluation mode** (``flow.eval()``, used by
    :func:`pushforward.train.evaluate` and every reported figure) it is always exact.

    ``variational=True`` makes sampling explicit (reverse-KL training). With ``"roulette"``, a sample's
    returned log-density is then a random estimate in training mode, which the invertibility check of
    :meth:`~pushforward.core.Flow.sample_and_log_prob` would report as a mismatch; the flow is then built
    with ``validate=False`` (no input checks either). Call ``flow.eval()`` for exact log-densities.

    Raises:
        ValueError: If ``train_logdet`` is not ``"roulette"`` or ``"exact"``.

    References:
        Behrmann, Grathwohl, Chen, Duvenaud & Jacobsen, "Invertible Residual Networks", 2019.
        Chen, Behrmann, Duvenaud & Jacobsen, "Residual Flows for Invertible Generative Modeling", 2019.
    """
    if train_logdet not in _LOGDETS:
        raise ValueError(f"residual's train_logdet must be one of {list(_LOGDETS)}, got {train_logdet!r}")
    estimator = RussianRoulette() if train_logdet == "roulette" else None
    ts: list[Transform] = [ResidualBlock(features, tuple(hidden), coefficient, context_features, estimator)
                           for _ in range(blocks)]
    flow = _flow(ts, features, variational)
    flow.validate = not (variational and estimator is not None)
    return flow
