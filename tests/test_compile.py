"""torch.compile(fullgraph=True) traces every recipe's log_prob and sampling without graph breaks.

Graph breaks are a property of Dynamo's tracing, so most cases use the cheap ``aot_eager`` backend
(tracing + AOTAutograd, also through backward); one case runs the real inductor backend end to end.
"""

from __future__ import annotations

import pytest
import torch
from registry import FAMILY_COMPILE

from pushforward import models

RECIPES = {
    "nice": lambda: models.nice(4, layers=2, hidden=(8,)),
    "realnvp": lambda: models.realnvp(5, layers=3, hidden=(8,)),
    "realnvp_context": lambda: models.realnvp(2, layers=2, hidden=(8,), context_features=3),
    "realnvp_image": lambda: models.realnvp_image((1, 8, 8), levels=2, hidden_channels=4, blocks=1),
    "glow": lambda: models.glow((1, 8, 8), levels=2, steps=2, hidden_channels=4),
    "maf": lambda: models.maf(4, layers=2, hidden=(8,)),
    "iaf": lambda: models.iaf(4, layers=2, hidden=(8,)),
    "nsf": lambda: models.nsf(4, layers=2, hidden=(8,)),
    "nsf_autoregressive": lambda: models.nsf(4, layers=2, hidden=(8,), autoregressive=True),
    **FAMILY_COMPILE,  # the later families (tests/registry_*.py)
}


def _inputs(flow, n=6):
    x = torch.rand(n, *flow.event_shape) * 0.9 + 0.05
    c = torch.randn(n, 3) if flow.recipe["kwargs"].get("context_features") else None
    return x, c


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_log_prob_and_sample_compile_fullgraph(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    flow = RECIPES[name]()
    x, c = _inputs(flow)
    flow.log_prob(x, c)  # ActNorm initialisation happens eagerly, once
    log_prob = torch.compile(flow.log_prob, fullgraph=True, backend="aot_eager")
    lp = log_prob(x, c)
    torch.testing.assert_close(lp, flow.log_prob(x, c))
    lp.mean().backward()
    assert all(p.grad is not None for p in flow.parameters())

    sample = torch.compile(flow.sample, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    s = sample(4, c[:2] if c is not None else None, temperature=0.7)
    torch.manual_seed(1)
    s_eager = flow.sample(4, c[:2] if c is not None else None, temperature=0.7)
    torch.testing.assert_close(s, s_eager)


def test_inductor_compiles_glow_and_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    flow = models.glow((1, 8, 8), levels=2, steps=1, hidden_channels=4)
    x = torch.rand(8, 1, 8, 8)
    flow.log_prob(x)
    compiled = torch.compile(flow.log_prob, fullgraph=True)
    torch.testing.assert_close(compiled(x), flow.log_prob(x), atol=1e-4, rtol=1e-5)
