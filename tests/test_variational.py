"""Planar, radial and Sylvester flows beyond the registry: the invertibility constraints hold for any raw
parameters, the densities integrate to one, sampling and density agree, and the numerical inverses carry
the implicit gradient."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from pushforward import Inverse, InvertibilityWarning, models
from pushforward.transforms import Planar, Radial, Sylvester

BUILDERS = {
    "planar": lambda: models.planar(2, layers=4),
    "radial": lambda: models.radial(2, layers=4),
    "sylvester": lambda: models.sylvester(2, layers=3),
    "sylvester_householder": lambda: models.sylvester(2, layers=3, reflections=2),
}


def _perturbed(name: str, scale: float = 0.7):
    torch.manual_seed(0)
    flow = BUILDERS[name]().double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_recipes_start_as_the_identity(name):
    torch.manual_seed(0)
    flow = BUILDERS[name]().double()
    x = torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(flow.transform(x)[0], x, atol=1e-12, rtol=0)
    torch.testing.assert_close(flow.log_prob(x), flow.base.log_prob(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_density_integrates_to_one(name):
    flow = _perturbed(name)
    g = torch.linspace(-9, 9, 361, dtype=torch.float64)
    xy = torch.cartesian_prod(g, g)
    with torch.no_grad():
        mass = flow.log_prob(xy).exp().sum() * (g[1] - g[0]) ** 2
    assert abs(float(mass) - 1) < 5e-3


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_sample_and_log_prob_agree_with_log_prob(name):
    flow = _perturbed(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InvertibilityWarning)
        x, lp = flow.sample_and_log_prob(64)
    torch.testing.assert_close(flow.log_prob(x), lp, atol=1e-9, rtol=1e-9)


def test_planar_constraint_holds_for_any_u_and_w():
    layer = Planar(3).double()
    with torch.no_grad():
        layer.theta[:3] = torch.tensor([-4.0, 1.0, 0.0])  # u
        layer.theta[3:6] = torch.tensor([2.0, 0.5, 0.0])  # w: w.u = -7.5, the map would fold
    u_hat, w, _, kappa = layer._split(None)
    assert float((w * u_hat).sum()) > -1
    torch.testing.assert_close((w * u_hat).sum(), kappa)
    x = torch.randn(200, 3, dtype=torch.float64) * 3
    _, ladj = layer(x)
    assert torch.isfinite(ladj).all()
    jac = torch.func.vmap(torch.func.jacrev(lambda v: layer(v[None])[0][0]))(x)
    assert (torch.linalg.det(jac) > 0).all()
    torch.testing.assert_close(layer.inverse(layer(x)[0])[0], x, atol=1e-10, rtol=0)


def test_radial_constraint_and_analytic_inverse_at_every_radius():
    layer = Radial(2).double()
    with torch.no_grad():
        layer.theta[2:] = torch.tensor([1.0, -8.0])  # beta_raw very negative: beta near -alpha, contracting
    x0, alpha, beta = layer._split(None)
    assert float(beta) > -float(alpha)
    radii = torch.tensor([0.0, 1e-9, 1e-3, 0.5, 3.0, 1e6], dtype=torch.float64)
    x = x0 + radii[:, None] * torch.tensor([0.6, 0.8], dtype=torch.float64)
    y, ladj = layer(x)
    assert torch.isfinite(ladj).all()
    back, ladj_inv = layer.inverse(y)
    torch.testing.assert_close(back, x, atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(ladj_inv, -ladj)


@pytest.mark.parametrize("layer", [lambda: Planar(3), lambda: Sylvester(3, reflections=2),
                                   lambda: Sylvester(3)],
                         ids=["planar", "sylvester_householder", "sylvester_triangular"])
def test_numerical_inverse_gradient_is_the_implicit_one(layer):
    """The inverse's derivatives in its input and every parameter match finite differences: the final
    Newton step (with gradients) carries them; without it they would vanish."""
    torch.manual_seed(0)
    t = layer().double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.5 * torch.randn_like(p))
    names = [n for n, _ in t.named_parameters()]

    def inverse(y, *values):
        return torch.func.functional_call(Inverse(t), {f"transform.{n}": v for n, v in
                                                       zip(names, values, strict=True)}, (y,))

    y = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    values = [p.detach().clone().requires_grad_() for p in t.parameters()]
    assert torch.autograd.gradcheck(inverse, (y, *values))


def test_errors_name_what_was_expected():
    with pytest.raises(ValueError, match="reflections"):
        Sylvester(3, reflections=-1)
    with pytest.raises(ValueError, match="context of 2 features"):
        Planar(3, context_features=2)(torch.randn(4, 3))
    assert "Householder, 2 reflections" in repr(Sylvester(3, reflections=2))
    assert "triangular" in repr(Sylvester(3))


def test_reverse_kl_training_fits_a_gaussian():
    """A planar flow trained by reverse KL (reparameterised samples through the explicit maps) on an
    anisotropic Gaussian target lowers the KL from its start to near zero."""
    torch.manual_seed(0)
    flow = models.planar(2, layers=4)
    flow.validate = False
    cov = torch.tensor([[2.0, 1.2], [1.2, 1.0]])
    target = torch.distributions.MultivariateNormal(torch.tensor([1.0, -0.5]), cov)
    opt = torch.optim.Adam(flow.parameters(), lr=2e-2)

    def kl(n=512):
        x, lq = flow.sample_and_log_prob(n)
        return (lq - target.log_prob(x)).mean()

    with torch.no_grad():
        start = float(kl(4096))
    for _ in range(300):
        opt.zero_grad()
        kl().backward()
        opt.step()
    with torch.no_grad():
        end = float(kl(4096))
    assert end < 0.25 * start and end < 0.15, (start, end)
    assert math.isfinite(end)
