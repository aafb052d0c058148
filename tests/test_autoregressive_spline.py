"""Autoregressive structure and the spline kernel: properties beyond the registry contract."""

from __future__ import annotations

import functools

import pytest
import torch
from registry import CausalLinear, CausalTokens

from pushforward import Inverse, models
from pushforward.nn import MADE, MLP
from pushforward.transforms import AffineKernel, Autoregressive, Coupling, HalfMask, SplineKernel


@pytest.mark.parametrize("context_features", [0, 2], ids=["plain", "context"])
def test_made_is_autoregressive_in_its_jacobian(context_features):
    torch.manual_seed(0)
    d, p = 6, 3
    made = MADE(d, p * d, context_features, hidden=(32, 32)).double()
    with torch.no_grad():
        for w in made.parameters():
            w.add_(torch.randn_like(w))
    x = torch.randn(d, dtype=torch.float64)
    c = torch.randn(context_features, dtype=torch.float64) if context_features else None
    # jac has shape (param, output, input)
    jac = torch.autograd.functional.jacobian(lambda v: made(v, c), x).reshape(p, d, d)
    strictly_lower = torch.ones(d, d).tril(-1).bool()
    assert (jac[:, ~strictly_lower] == 0).all(), "an output depends on itself or a later input"
    assert (jac[:, strictly_lower] != 0).all(), "MADE lost a connection it should have"
    if context_features:  # the context has degree 0: every output, the first feature's included, sees it
        jac_c = torch.autograd.functional.jacobian(lambda v: made(x, v), c).reshape(p, d, context_features)
        assert (jac_c.abs().sum(-1) != 0).all(), "an output does not depend on the context"


@pytest.mark.parametrize(("conditioner", "context_features"), [
    (functools.partial(MADE, hidden=(16, 16)), 0), (functools.partial(MADE, hidden=(16, 16)), 3),
    (functools.partial(MADE, hidden=()), 3), (CausalLinear, 0), (CausalLinear, 3),
], ids=["plain", "context", "context_no_hidden", "causal_linear", "causal_linear_context"])
@pytest.mark.parametrize("inverse", [False, True], ids=["maf", "iaf"])
def test_autoregressive_transform_jacobian_is_triangular(inverse, conditioner, context_features):
    torch.manual_seed(0)
    t = Autoregressive(5, AffineKernel(), conditioner, context_features).double()
    t = Inverse(t) if inverse else t
    with torch.no_grad():
        for w in t.parameters():
            w.add_(0.3 * torch.randn_like(w))
    x = torch.randn(5, dtype=torch.float64)
    c = torch.randn(1, context_features, dtype=torch.float64) if context_features else None
    jac = torch.autograd.functional.jacobian(lambda v: t(v[None], c)[0][0], x)
    assert (jac.triu(1) == 0).all()
    assert (jac.tril(-1) != 0).any()


def test_conditional_maf_learns_a_conditional_density():
    """x | c ~ N(c, 0.1^2), c ~ N(0, 1): the true conditional NLL is -0.88 nats, the best unconditional
    one 1.42. A 1-D MAF whose MADE kept the context from ``z_1`` stayed at 1.43."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def draw(n):
        c = torch.randn(n, 1, generator=g)
        return c + 0.1 * torch.randn(n, 1, generator=g), c

    flow = models.maf(1, layers=2, hidden=(32,), context_features=1)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(300):
        x, c = draw(256)
        loss = -flow.log_prob(x, c).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, c = draw(4096)
    with torch.no_grad():
        nll = -flow.log_prob(x, c).mean().item()
    assert nll < -0.5, f"test NLL {nll:.3f} nats; the true conditional NLL is -0.88, the unconditional 1.42"


def _random_spline_params(n, d, kernel, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, kernel.params * d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_spline_never_nan_for_extreme_inputs(direction):
    k = SplineKernel(bins=8, tail_bound=3.0)
    values = torch.tensor([-1e30, -1e8, -3.0, -3.0 + 1e-12, -1e-300, 0.0, 2.999999, 3.0, 3.0 + 1e-9, 1e8,
                           1e30], dtype=torch.float64)
    x = values.repeat(4, 1).requires_grad_(True)
    params = _random_spline_params(4, values.numel(), k, scale=10.0).requires_grad_(True)
    y, logd = getattr(k, direction)(x, params, -1)
    assert torch.isfinite(y).all() and torch.isfinite(logd).all()
    (y.sum() + logd.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(params.grad).all()
    outside = values.abs() >= 3.0
    torch.testing.assert_close(y[:, outside], x[:, outside].detach())  # linear (identity) tails


def test_spline_round_trip_and_monotone():
    k = SplineKernel(bins=6, tail_bound=2.0)
    x = torch.linspace(-4, 4, 2001, dtype=torch.float64)[None]
    params = _random_spline_params(1, x.shape[-1], k, scale=0.0)
    params = params + _random_spline_params(1, 1, k, scale=2.0).repeat_interleave(x.shape[-1], dim=-1)
    y, logd = k.forward(x, params, -1)
    assert (y.diff() > 0).all()
    x2, logd_inv = k.inverse(y, params, -1)
    torch.testing.assert_close(x2, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(logd_inv, -logd, atol=1e-9, rtol=0)


def test_spline_is_identity_at_zero_params():
    k = SplineKernel(bins=8, tail_bound=5.0)
    x = torch.randn(10, 7, dtype=torch.float64) * 3
    y, logd = k.forward(x, torch.zeros(10, 7 * k.params, dtype=torch.float64), -1)
    torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(logd, torch.zeros_like(logd), atol=1e-12, rtol=0)


def test_spline_coupling_compiles_without_graph_breaks():
    torch._dynamo.reset()
    t = Coupling(HalfMask(6), SplineKernel(), functools.partial(MLP, hidden=(16,)))
    with torch.no_grad():
        for w in t.parameters():
            w.add_(0.1 * torch.randn_like(w))
    x = torch.randn(32, 6) * 4  # a fraction of the inputs fall in the linear tails
    f = torch.compile(t, fullgraph=True, backend="aot_eager")
    z, _ = f(x)
    torch.testing.assert_close(z, t(x)[0])
    inv = torch.compile(t.inverse, fullgraph=True, backend="aot_eager")
    # (the float64 round trip is in the registry; float32 inverses of steep splines lose digits)
    torch.testing.assert_close(inv(z)[0], t.inverse(z)[0], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("recipe", ["maf", "iaf", "nsf"])
def test_conditional_recipes_sample_per_context(recipe):
    torch.manual_seed(0)
    flow = getattr(models, recipe)(3, layers=2, hidden=(16,), context_features=2)
    with torch.no_grad():
        for w in flow.parameters():
            w.add_(0.3 * torch.randn_like(w))
    c = torch.randn(5, 2)
    x, lp = flow.sample_and_log_prob(4, context=c)
    assert x.shape == (4, 5, 3) and lp.shape == (4, 5)
    torch.testing.assert_close(lp, flow.log_prob(x, c), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("inverse", [False, True], ids=["maf", "iaf"])
def test_autoregressive_over_tokens_is_block_triangular(inverse):
    """Over a sequence (N, P) the order runs over the tokens: token n of the output depends on the input
    tokens <= n only, and on token n elementwise (diagonal blocks are diagonal)."""
    torch.manual_seed(0)
    n, p = 4, 3
    t = Autoregressive((n, p), AffineKernel(), functools.partial(CausalTokens, tokens=n)).double()
    t = Inverse(t) if inverse else t
    with torch.no_grad():
        for w in t.parameters():
            w.add_(0.3 * torch.randn_like(w))
    x = torch.randn(n, p, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: t(v[None])[0][0], x)  # (n, p, n, p)
    blocks = jac.permute(0, 2, 1, 3)  # (out token, in token, p, p)
    later = torch.ones(n, n).triu(1).bool()
    assert (blocks[later] == 0).all(), "a token depends on a later one"
    diagonal = blocks[torch.arange(n), torch.arange(n)]
    off_diagonal = diagonal * (1 - torch.eye(p, dtype=torch.float64))
    assert (off_diagonal == 0).all(), "a feature depends on its token's other features"
    assert (blocks[torch.ones(n, n).tril(-1).bool()] != 0).any()


def test_autoregressive_checks_what_it_is_given():
    with pytest.raises(ValueError, match="needs a conditioner factory"):
        Autoregressive((3, 4), AffineKernel())  # MADE orders features, not tokens
    with pytest.raises(ValueError, match=r"vectors \(D,\) or sequences \(N, P\)"):
        Autoregressive((2, 3, 4), AffineKernel(), CausalLinear)
    with pytest.raises(TypeError, match="kernel instance"):
        Autoregressive(3, AffineKernel)  # the class, not an instance
    with pytest.raises(TypeError, match="kernel instance"):
        Coupling(HalfMask(4), object(), functools.partial(MLP, hidden=(8,)))
    with pytest.raises(ValueError, match="multiple of in_features"):
        MADE(3, 4)
    t = Autoregressive(3, AffineKernel())
    with pytest.raises(ValueError, match=r"events of shape \(3,\) got a tensor of shape \(2, 4\)"):
        t(torch.randn(2, 4))


class _Scale:
    """A kernel written outside the library: ``y = x * exp(a)``, one parameter per element."""

    params = 1

    def forward(self, x, params, dim):
        return x * params.exp(), params

    def inverse(self, y, params, dim):
        return y * (-params).exp(), -params


@pytest.mark.parametrize("structure", ["coupling", "autoregressive"])
def test_a_new_kernel_is_one_class_that_both_structures_take(structure):
    torch.manual_seed(0)
    if structure == "coupling":
        t = Coupling(HalfMask(4), _Scale(), functools.partial(MLP, hidden=(8,)), 2).double()
    else:
        t = Autoregressive(4, _Scale(), functools.partial(MADE, hidden=(8,)), 2).double()
    with torch.no_grad():
        for w in t.parameters():
            w.add_(0.3 * torch.randn_like(w))
    x, c = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    z, ladj = t(x, c)
    x2, ladj_inv = t.inverse(z, c)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(ladj_inv, -ladj)
    jac = torch.autograd.functional.jacobian(lambda v: t(v[None], c[:1])[0][0], x[0])
    torch.testing.assert_close(ladj[0], torch.linalg.slogdet(jac)[1])
