"""Pyro support: the distribution view of a flow as a Pyro distribution.

pushforward never imports Pyro. When Pyro is imported, ``flow(context)`` returns a
:class:`PyroFlowDistribution`, which adds Pyro's distribution interface (``d(sample_shape)``,
``to_event``, ``mask``, ``score_parts``, ...) to :class:`~pushforward.core.FlowDistribution`, so a flow
can be a ``pyro.sample`` site (a guide for SVI, a learned prior) and live inside ``pyro.plate``
(which calls :meth:`~pushforward.core.FlowDistribution.expand`). Register the flow's parameters with
``pyro.module("name", flow)``.

Example::

    import pyro
    def guide(x, y):
        pyro.module("posterior", flow)
        pyro.sample("w", flow())
"""

from __future__ import annotations

from pyro.distributions.torch_distribution import TorchDistributionMixin

from .core import FlowDistribution

__all__ = ["PyroFlowDistribution"]


# FlowDistribution.expand (a FlowDistribution) deliberately wins over Pyro's (an ExpandedDistribution)
class PyroFlowDistribution(FlowDistribution, TorchDistributionMixin):  # type: ignore[misc]
    """A :class:`~pushforward.core.FlowDistribution` that is also a Pyro distribution.

    Calling it draws a reparameterised sample: ``d(sample_shape)`` is ``d.rsample(sample_shape)``.
    """
