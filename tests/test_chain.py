"""Compose's coupling chains (split once, merge once) give exactly what the layers give one by one."""

import pytest
import torch

from pushforward import models
from pushforward.core import Compose
from pushforward.nn import MLP
from pushforward.transforms import AdditiveKernel, AffineKernel, Coupling, HalfMask, LULinear

CASES = {
    "realnvp odd D": lambda: models.realnvp(5, layers=6, hidden=(16,)),
    "realnvp half masks": lambda: models.realnvp(6, layers=5, hidden=(16,), mask="half"),
    "nice": lambda: models.nice(6, layers=4, hidden=(16,)),
    "nsf": lambda: models.nsf(7, layers=4, hidden=(16,)),
    "context": lambda: models.realnvp(4, layers=4, hidden=(16,), context_features=3),
    "realnvp_image": lambda: models.realnvp_image((1, 8, 8), levels=2, hidden_channels=8),
}


def _composes(flow):
    return [m for m in flow.modules() if isinstance(m, Compose)]


def _perturbed(make):
    torch.manual_seed(0)
    flow = make().double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return flow


@pytest.mark.parametrize("name", sorted(CASES))
def test_chain_equals_layer_by_layer(name):
    flow = _perturbed(CASES[name])
    assert any(seg[2] is not None for c in _composes(flow) for seg in c._segments), "no chain was formed"
    x = torch.rand(9, *flow.event_shape, dtype=torch.float64) * 0.8 + 0.1
    ctx = torch.randn(9, 3, dtype=torch.float64) if name == "context" else None
    results = {}
    for chain in (True, False):
        for c in _composes(flow):
            c.chain = chain
        flow.zero_grad()
        z, ladj = flow.transform(x, ctx)
        x_back, ladj_inv = flow.transform.inverse(z, ctx)
        (z.square().sum() + ladj.sum()).backward()
        grads = [p.grad.clone() for p in flow.parameters()]
        results[chain] = (z, ladj, x_back, ladj_inv, grads)
    a, b = results[True], results[False]
    for u, v in zip(a[:4], b[:4]):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    for u, v in zip(a[4], b[4]):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a[2], x, rtol=0, atol=1e-10)



@pytest.mark.parametrize("name", sorted(CASES))
def test_chain_without_grad_equals_layer_by_layer(name):
    """Without grad a chain reduces each layer's log-derivatives at once (no elementwise accumulators)."""
    flow = _perturbed(CASES[name])
    x = torch.rand(9, *flow.event_shape, dtype=torch.float64) * 0.8 + 0.1
    ctx = torch.randn(9, 3, dtype=torch.float64) if name == "context" else None
    results = {}
    with torch.no_grad():
        for chain in (True, False):
            for c in _composes(flow):
                c.chain = chain
            z, ladj = flow.transform(x, ctx)
            results[chain] = (z, ladj, *flow.transform.inverse(z, ctx))
    for u, v in zip(results[True], results[False]):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    assert results[True][1].shape == (9,)


def test_chain_groups_only_matching_partitions():
    def net(i, o):
        return MLP(i, o, hidden=(8,))

    c = Compose(
        Coupling(HalfMask(4), AffineKernel(), net),
        Coupling(HalfMask(4, flip=True), AdditiveKernel(), net),  # same halves, other way round: chained
        LULinear(4),  # mixes all features: ends the chain
        Coupling(HalfMask(4), AffineKernel(), net),
        Coupling(HalfMask(6 - 2, flip=False), AffineKernel(), net),
    )
    assert c._segments == [(0, 2, (True, False)), (2, 3, None), (3, 5, (True, True))]


def test_patched_layers_are_called_one_by_one():
    """Gradient checkpointing patches each layer's forward; a chain must not bypass it."""
    flow = models.realnvp(4, layers=2, hidden=(8,))
    calls = []
    for t in flow.transform.transforms:
        original = t.forward
        t.forward = lambda x, context=None, f=original: calls.append(1) or f(x, context)
    flow.log_prob(torch.randn(3, 4))
    assert len(calls) == 2


def test_layers_appended_later_are_run():
    def net(i, o):
        return MLP(i, o, hidden=(8,))

    c = Compose(Coupling(HalfMask(4), AffineKernel(), net))
    c.transforms.append(Coupling(HalfMask(4, flip=True), AffineKernel(), net))
    for p in c.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(5, 4)
    y, ladj = c(x)
    y1, l1 = c.transforms[0](x)
    y2, l2 = c.transforms[1](y1)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(ladj, l1 + l2)
