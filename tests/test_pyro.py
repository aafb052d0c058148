"""A flow's distribution view inside Pyro: a sample site, plates, and an SVI guide (issue 14 item 9).

Pyro is an optional dependency (the dev extras install it); pushforward never imports it itself.
"""

import pytest
import torch

pyro = pytest.importorskip("pyro")
import pyro.distributions as dist  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402

from pushforward import models  # noqa: E402
from pushforward.pyro import PyroFlowDistribution  # noqa: E402


def test_view_is_a_pyro_sample_site_inside_plates():
    flow = models.realnvp(3, layers=2, hidden=(8,), context_features=2)
    context = torch.randn(5, 2)

    def model():
        with pyro.plate("rows", 5):
            return pyro.sample("x", flow(context))

    trace = pyro.poutine.trace(model).get_trace()
    trace.compute_log_prob()
    site = trace.nodes["x"]
    assert isinstance(site["fn"], PyroFlowDistribution)
    assert site["value"].shape == (5, 3)
    torch.testing.assert_close(site["log_prob"], flow.log_prob(site["value"], context))


def test_expand_broadcasts_batch_and_context():
    flow = models.realnvp(2, layers=2, hidden=(8,), context_features=1)
    d = flow(torch.tensor([[0.5]]))
    e = d.expand([4, 3])
    assert e.batch_shape == (4, 3) and e.context.shape == (4, 3, 1)
    assert e.sample((2,)).shape == (2, 4, 3, 2)
    x = torch.randn(3, 2)
    torch.testing.assert_close(e.log_prob(x), d.log_prob(x).expand(4, 3))
    unconditional = models.realnvp(2, layers=2, hidden=(8,))()
    assert unconditional.expand([6]).rsample((2,)).shape == (2, 6, 2)
    assert unconditional.expand([6]).log_prob(torch.randn(2)).shape == (6,)
    with pytest.raises(ValueError, match=r"cannot expand .* batch shape \(4, 3\) to \(2,\)"):
        e.expand([2])
    assert d.support.event_dim == 1 and d.event_dim == 1


def test_svi_guide_recovers_the_posterior_of_bayesian_linear_regression():
    """y = X w + N(0, s^2), w ~ N(0, I): the posterior is N(mu, Sigma) in closed form."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    n, d, s = 20, 2, 0.5
    X = torch.randn(n, d)
    y = X @ torch.tensor([1.0, -2.0]) + s * torch.randn(n)
    precision = torch.eye(d) + X.T @ X / s**2
    cov = torch.linalg.inv(precision)
    mu = cov @ X.T @ y / s**2

    def model():
        w = pyro.sample("w", dist.Normal(torch.zeros(d), 1.0).to_event(1))
        with pyro.plate("data", n):
            pyro.sample("y", dist.Normal((X * w).sum(-1), s), obs=y)  # w: (*particles, 1, d) when vectorised

    flow = models.realnvp(d, layers=4, hidden=(16,))

    def guide():
        pyro.module("posterior", flow)
        pyro.sample("w", flow())

    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.995}),
              Trace_ELBO(num_particles=16, vectorize_particles=True))
    for _ in range(600):
        svi.step()
    with torch.no_grad():  # KL(q || posterior) = E_q[log q - log p]: 0 when the posterior is recovered
        w, log_q = flow.sample_and_log_prob(20000)
        kl = float((log_q - torch.distributions.MultivariateNormal(mu, cov).log_prob(w)).mean())
    sd = cov.diagonal().sqrt()
    assert kl < 0.03, kl
    assert torch.all((w.mean(0) - mu).abs() < 0.25 * sd), (w.mean(0), mu)
    torch.testing.assert_close(w.T.cov(), cov, rtol=0, atol=0.2 * float(sd.min()) ** 2)
