"""Residual flows beyond the registry: the Russian-roulette estimate is unbiased, the Lipschitz bound is
certified, the modes use the log-determinant they document, the inverse reports failure, and the explicit
directions compile."""

from __future__ import annotations

import warnings

import pytest
import torch

import pushforward as pf
from pushforward import InvertibilityWarning, models
from pushforward.transforms import ResidualBlock, RussianRoulette


def _block(estimator=None, scale=1.0, hidden=(16, 16), **kwargs) -> ResidualBlock:
    torch.manual_seed(0)
    block = ResidualBlock(3, hidden=hidden, estimator=estimator, **kwargs).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(scale * torch.randn_like(p))
    return block


def test_russian_roulette_estimate_is_unbiased():
    # g linear with ||W|| = 0.6: the series converges slowly enough for truncation to show, and the
    # estimate's variance is finite (it is not for p = 0.5 when Lip(g)^2 > 1/2)
    block = _block(RussianRoulette(p=0.5, exact_terms=1), scale=3.0, hidden=(), coefficient=0.6)
    x = torch.randn(4, 3, dtype=torch.float64)
    exact = block.eval()(x)[1]
    block.train()
    torch.manual_seed(1)
    draws = torch.stack([block(x)[1] for _ in range(4000)])
    mean, se = draws.mean(0), draws.std(0) / 4000**0.5
    assert (draws.std(0) > 1e-3).all()  # a random estimate, not the exact value
    assert ((mean - exact).abs() < 4 * se + 1e-3).all(), (mean, exact, se)
    # the first exact_terms terms alone are biased: the roulette weights are what makes the mean right
    first = RussianRoulette(p=0.999999, exact_terms=1)
    block.estimator = first
    assert ((torch.stack([block(x)[1] for _ in range(200)]).mean(0) - exact).abs() > 10 * se).any()


def test_training_mode_estimates_and_evaluation_mode_is_exact():
    block = _block(RussianRoulette())
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.manual_seed(0)
    a = block.train()(x)[1]
    b = block(x)[1]
    assert not torch.equal(a, b)
    exact = block.eval()(x)[1]
    reference = _block(None)
    torch.testing.assert_close(exact, reference(x)[1], atol=0, rtol=0)
    j = torch.func.vmap(torch.func.jacrev(lambda v: block(v[None])[0][0]))(x)
    torch.testing.assert_close(exact, torch.linalg.slogdet(j)[1])


def test_lipschitz_bound_is_certified_for_any_weights():
    block = _block(scale=30.0, coefficient=0.9)
    for w in block.weights():
        assert torch.linalg.matrix_norm(w, ord=2) <= 0.9 + 1e-12
    x = torch.randn(64, 3, dtype=torch.float64) * 3
    jac = ResidualBlock.jacobian(block.weights(), block.g(x, None, block.weights())[1], x.shape[:-1])
    assert torch.linalg.matrix_norm(jac, ord=2).max() < 0.9**3 + 1e-9
    z, _ = block(x)
    torch.testing.assert_close(block.inverse(z)[0], x, atol=1e-10, rtol=0)


def test_inverse_reports_what_it_could_not_do():
    block = _block(max_iter=2)
    with pytest.raises(RuntimeError, match="did not reach tol"):
        block.inverse(torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="non-finite"):
        _block().inverse(torch.full((2, 3), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="coefficient"):
        ResidualBlock(3, coefficient=1.0)
    with pytest.raises(ValueError, match="train_logdet"):
        models.residual(2, train_logdet="truncated")


def test_inverse_gradient_is_the_implicit_one():
    block = _block()
    """Derivatives of the fixed-point inverse, in z and in every parameter, match finite differences: the
    last Newton step carries them (without it they would be those of ``z - g(x*)``)."""
    block = _block()
    names = [n for n, _ in block.named_parameters()]

    def inverse(z, *values):
        return torch.func.functional_call(pf.Inverse(block), {f"transform.{n}": v for n, v in
                                                               zip(names, values, strict=True)}, (z,))

    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    values = [p.detach().clone().requires_grad_() for p in block.parameters()]
    assert torch.autograd.gradcheck(inverse, (z, *values))


def test_variational_residual_flow_samples_explicitly():
    torch.manual_seed(0)
    flow = models.residual(2, blocks=2, hidden=(8,), variational=True).double()
    assert not flow.validate  # training mode returns estimates, which the invertibility check would flag
    flow_exact = models.residual(2, blocks=2, hidden=(8,), variational=True, train_logdet="exact").double()
    assert flow_exact.validate
    with torch.no_grad():
        for p in flow_exact.parameters():
            p.add_(0.3 * torch.randn_like(p))
    flow_exact.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", InvertibilityWarning)
        x, lp = flow_exact.sample_and_log_prob(16)
    torch.testing.assert_close(flow_exact.log_prob(x), lp)


def test_explicit_directions_compile_fullgraph():
    torch.manual_seed(0)
    torch._dynamo.reset()
    flow = models.residual(2, blocks=2, hidden=(8,)).eval()
    x = torch.randn(6, 2)
    compiled = torch.compile(flow.log_prob, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), flow.log_prob(x))
    vi = models.residual(2, blocks=2, hidden=(8,), variational=True).eval()
    sample = torch.compile(vi.sample_and_log_prob, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    s, lp = sample(4)
    torch.manual_seed(1)
    s2, lp2 = vi.sample_and_log_prob(4)
    torch.testing.assert_close(s, s2)
    torch.testing.assert_close(lp, lp2)
