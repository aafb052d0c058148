"""torch.func, tracing and scripting (issue 14 items 6, 8 and 10).

vmap / grad / jacrev of log_prob match the batched computation; a distribution view made under
functional_call keeps the parameters it was made with; torch.export, jit.trace and torch.compile give
the eager values; jit.script says it is not supported and what to use.
"""

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

from pushforward import models

FLOWS = {
    "realnvp": lambda: models.realnvp(3, layers=4, hidden=(16,)),
    "maf": lambda: models.maf(3, layers=2, hidden=(16,)),
    "nsf": lambda: models.nsf(3, layers=2, hidden=(16,)),
    "glow": lambda: models.glow((1, 4, 4), levels=1, steps=2, hidden_channels=8),
}


def _flow(name):
    torch.manual_seed(0)
    flow = FLOWS[name]().double()
    x = _data(flow, 16)
    flow.train()
    flow.log_prob(x)  # data-dependent initialisation (glow's ActNorm) happens here, not under vmap
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return flow.eval()


def _data(flow, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *flow.event_shape, generator=g, dtype=torch.float64) * 0.8 + 0.1


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_vmap_of_log_prob_and_of_its_gradient_match_the_batch(name):
    flow = _flow(name)
    x = _data(flow, 5)
    torch.testing.assert_close(vmap(flow.log_prob)(x), flow.log_prob(x), rtol=0, atol=1e-10)
    per_example = vmap(grad(flow.log_prob))(x)
    xr = x.clone().requires_grad_(True)
    (batched,) = torch.autograd.grad(flow.log_prob(xr).sum(), xr)
    torch.testing.assert_close(per_example, batched, rtol=0, atol=1e-10)
    torch.testing.assert_close(jacrev(flow.log_prob)(x[0]), batched[0], rtol=0, atol=1e-10)


def test_vmap_with_a_context():
    torch.manual_seed(0)
    flow = models.realnvp(2, layers=2, hidden=(8,), context_features=3).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, c = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(vmap(flow.log_prob)(x, c), flow.log_prob(x, c), rtol=0, atol=1e-12)


def test_value_checks_still_run_outside_torch_func():
    flow = models.realnvp(2, layers=2, hidden=(8,))
    x = torch.randn(3, 2)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        flow.log_prob(x)
    with pytest.raises(ValueError, match="expects a tensor of shape"):  # shape checks run under vmap
        vmap(flow.log_prob)(torch.randn(3, 5))


def test_view_made_under_functional_call_uses_those_parameters():
    """Issue 14 item 6: the view used the module's own weights once functional_call returned."""
    flow = _flow("realnvp")
    x = _data(flow, 6)
    params = {k: v.detach() * 1.5 for k, v in flow.named_parameters()}
    reference = models.realnvp(3, layers=4, hidden=(16,)).double()
    reference.load_state_dict({**flow.state_dict(), **params})
    view = functional_call(flow, params, ())
    torch.testing.assert_close(view.log_prob(x), reference.log_prob(x), rtol=0, atol=1e-12)
    assert not torch.allclose(view.log_prob(x), flow.log_prob(x))
    # gradients reach the parameters the view was made with
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    view = functional_call(flow, params, ())
    grads = torch.autograd.grad(view.log_prob(x).sum(), list(params.values()))
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)
    torch.manual_seed(3)
    s = view.sample(4)
    torch.manual_seed(3)
    torch.testing.assert_close(s, reference.sample(4))


def test_a_plain_view_follows_in_place_updates_and_refuses_a_converted_flow():
    flow = _flow("realnvp")
    x = _data(flow, 4)
    view = flow()
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(1.1)  # what an optimiser step does
    torch.testing.assert_close(view.log_prob(x), flow.log_prob(x), rtol=0, atol=0)
    flow.float()
    with pytest.raises(RuntimeError, match=r"made before the flow's layers, dtype or device changed"):
        view.log_prob(x.float())


def test_jit_script_says_what_to_use_instead():
    flow = models.realnvp(2, layers=2, hidden=(8,))
    with pytest.raises(TypeError,
                       match="cannot be compiled by TorchScript.*torch.compile.*torch.export.export"):
        torch.jit.script(flow)
    with pytest.raises(TypeError, match="cannot be compiled by TorchScript"):
        torch.jit.script(flow.transform)


class _LogProb(torch.nn.Module):
    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, x):
        return self.flow.log_prob(x)


@pytest.mark.parametrize("name", ["realnvp", "glow"])
def test_export_trace_and_compile_give_the_eager_values(name):
    flow = _flow(name)
    x = _data(flow, 5)
    eager = flow.log_prob(x)
    exported = torch.export.export(_LogProb(flow), (x,))
    torch.testing.assert_close(exported.module()(x), eager, rtol=0, atol=1e-12)
    traced = torch.jit.trace(_LogProb(flow), (x,), check_trace=False)
    torch.testing.assert_close(traced(x), eager, rtol=0, atol=1e-12)
    x2 = _data(flow, 5, seed=9)
    torch.testing.assert_close(traced(x2), flow.log_prob(x2), rtol=0, atol=1e-12)
    compiled = torch.compile(flow.log_prob, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), eager, rtol=0, atol=1e-12)


def test_view_support_and_what_has_no_closed_form():
    flow = models.glow((1, 4, 4), levels=1, steps=1, hidden_channels=4)
    d = flow()
    assert d.support.event_dim == 3 and bool(d.support.check(torch.randn(2, 1, 4, 4)).all())
    with pytest.raises(NotImplementedError, match=r"no closed-form mean; estimate it from samples"):
        _ = d.mean
    with pytest.raises(NotImplementedError, match=r"no closed-form variance"):
        _ = d.variance
    with pytest.raises(NotImplementedError, match=r"no closed-form entropy; estimate it by Monte Carlo"):
        d.entropy()
    with pytest.raises(ValueError, match="no layer that reads a context"):
        flow(torch.randn(3))
