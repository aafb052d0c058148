"""Distribution-level tests of Flow: normalisation, analytic Gaussians, shapes, temperature, save/load."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.distributions import Distribution, MultivariateNormal

import pushforward as pf
from pushforward import Compose, Flow, InvertibilityWarning, models
from pushforward.distributions import DiagonalNormal, StandardNormal
from pushforward.transforms import ActNorm, ElementwiseAffine, Linear, LULinear


def _perturb(module, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_2d_density_integrates_to_one():
    torch.manual_seed(0)
    flow = models.realnvp(2, layers=4, hidden=(32, 32)).double()
    _perturb(flow, 0.1)  # a visibly non-Gaussian density whose mass stays inside the grid
    n, lim = 800, 12.0
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    grid = torch.stack([xx, yy], -1).reshape(-1, 2)
    with torch.no_grad():
        p = flow.log_prob(grid).exp()
    mass = p.sum().item() * (g[1] - g[0]).item() ** 2
    assert abs(mass - 1) < 0.02, mass
    # and the flow is not the base: its density differs from N(0, I) somewhere by a lot
    base = StandardNormal(2).double().log_prob(grid).exp()
    assert (p - base).abs().max() > 0.01


def test_affine_flow_equals_analytic_gaussian():
    torch.manual_seed(0)
    d = 3
    flow = Flow(Compose(Linear(d), ElementwiseAffine(d), LULinear(d)), DiagonalNormal(d)).double()
    _perturb(flow, 0.5)
    # z = A x + b  =>  x ~ N(A^-1 (mu - b), A^-1 S A^-T) with S = diag(sigma^2)
    eye = torch.eye(d, dtype=torch.float64)
    b, _ = flow.transform(torch.zeros(1, d, dtype=torch.float64))
    a = flow.transform(eye)[0] - b  # rows: A e_i, i.e. A^T
    a = a.T.detach()
    b = b[0].detach()
    a_inv = torch.linalg.inv(a)
    mu, sigma = flow.base.loc.detach(), flow.base.log_scale.detach().exp()
    mvn = MultivariateNormal(a_inv @ (mu - b), a_inv @ torch.diag(sigma**2) @ a_inv.T)
    x = torch.randn(50, d, dtype=torch.float64) * 2
    torch.testing.assert_close(flow.log_prob(x), mvn.log_prob(x), atol=1e-10, rtol=1e-10)
    # samples have the analytic moments
    with torch.no_grad():
        s = flow.sample(200_000)
    torch.testing.assert_close(s.mean(0), mvn.mean, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(s.T), mvn.covariance_matrix, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("shape", [5, (4, 3)])
def test_sample_and_log_prob_shapes(shape):
    flow = models.realnvp(2, layers=2, hidden=(8,))
    expected = (shape,) if isinstance(shape, int) else shape
    x = flow.sample(shape)
    assert x.shape == (*expected, 2)
    assert flow.log_prob(x).shape == expected
    x2, lp = flow.sample_and_log_prob(shape)
    assert x2.shape == (*expected, 2) and lp.shape == expected


def test_sample_and_log_prob_agrees_with_log_prob():
    torch.manual_seed(0)
    flow = models.realnvp(3, layers=4, hidden=(16,)).double()
    _perturb(flow, 0.3)
    x, lp = flow.sample_and_log_prob(100)
    torch.testing.assert_close(lp, flow.log_prob(x), atol=1e-9, rtol=1e-9)


def test_image_flow_shapes_and_log_prob_consistency():
    torch.manual_seed(0)
    # alpha=None: no logit, so samples are real-valued and always in the flow's domain
    flow = models.glow((1, 8, 8), levels=2, steps=2, hidden_channels=8, alpha=None).double()
    flow.log_prob(torch.randn(16, 1, 8, 8, dtype=torch.float64))  # ActNorm init
    _perturb(flow, 0.05)
    x, lp = flow.sample_and_log_prob((2, 3))
    assert x.shape == (2, 3, 1, 8, 8) and lp.shape == (2, 3)
    torch.testing.assert_close(lp, flow.log_prob(x), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("recipe", ["realnvp", "glow"])
def test_temperature_zero_is_base_mode_mapped(recipe):
    torch.manual_seed(0)
    if recipe == "realnvp":
        flow = models.realnvp(2, layers=2, hidden=(8,))
    else:
        flow = models.glow((1, 4, 4), levels=1, steps=1, hidden_channels=8, alpha=None)
        flow.log_prob(torch.randn(8, 1, 4, 4))
    _perturb(flow, 0.2)
    with torch.no_grad():
        s = flow.sample(4, temperature=0.0)
        mode, _ = flow.transform.inverse(torch.zeros(1, *flow.event_shape))
    torch.testing.assert_close(s, mode.expand_as(s))
    # temperature scales the latent spread
    with torch.no_grad():
        z_cold = flow.transform(flow.sample(2000, temperature=0.5))[0]
    assert abs(z_cold.std().item() - 0.5) < 0.05


def test_distribution_view():
    flow = models.realnvp(2, layers=2, hidden=(8,))
    d = flow()
    assert isinstance(d, Distribution)
    assert d.event_shape == (2,) and d.batch_shape == ()
    x = d.sample((7,))
    assert x.shape == (7, 2) and not x.requires_grad
    torch.testing.assert_close(d.log_prob(x), flow.log_prob(x))
    y = d.rsample((3,))
    y.sum().backward()
    assert any(p.grad is not None for p in flow.parameters())
    assert not hasattr(torch.distributions.Distribution, "flow")  # torch is not patched


def test_context_batches_samples_over_contexts():
    torch.manual_seed(0)
    flow = models.realnvp(2, layers=2, hidden=(8,), context_features=3)
    _perturb(flow, 0.3)
    c = torch.randn(4, 3)
    x = flow.sample(5, context=c)
    assert x.shape == (5, 4, 2)
    lp = flow.log_prob(x, c)
    assert lp.shape == (5, 4)
    d = flow(c)
    assert d.batch_shape == (4,)
    # the context changes the density
    assert not torch.allclose(flow.log_prob(x[:, 0], c[0]), flow.log_prob(x[:, 0], c[1]))


_CONDITIONAL_RECIPES = {
    "maf_1d": lambda: models.maf(1, layers=2, hidden=(16,), context_features=2),
    "maf_3d": lambda: models.maf(3, layers=2, hidden=(16,), context_features=2),
    "maf_3d_one_layer": lambda: models.maf(3, layers=1, hidden=(16,), context_features=2),
    "iaf_1d": lambda: models.iaf(1, layers=2, hidden=(16,), context_features=2),
    "nsf_autoregressive_1d": lambda: models.nsf(1, layers=2, hidden=(16,), autoregressive=True,
                                                context_features=2),
    "nsf_autoregressive_3d": lambda: models.nsf(3, layers=2, hidden=(16,), autoregressive=True,
                                                context_features=2),
    "nice": lambda: models.nice(3, layers=2, hidden=(16,), context_features=2),
    "realnvp": lambda: models.realnvp(3, layers=2, hidden=(16,), context_features=2),
    "nsf_coupling": lambda: models.nsf(3, layers=2, hidden=(16,), context_features=2),
    "realnvp_image": lambda: models.realnvp_image((1, 4, 4), levels=2, hidden_channels=8, blocks=1,
                                                  context_features=2),
    "glow": lambda: models.glow((1, 4, 4), levels=2, steps=2, hidden_channels=8, context_features=2),
}


@pytest.mark.parametrize("name", sorted(_CONDITIONAL_RECIPES))
def test_conditional_recipes_depend_on_context(name):
    """Every conditional recipe, moved off its zero (identity) init, gives each point a density that
    depends on the context: a conditional MADE once kept the context from ``z_1``, so 1-D MAF and
    autoregressive NSF had the same ``log_prob`` for every context."""
    torch.manual_seed(0)
    flow = _CONDITIONAL_RECIPES[name]().double()
    shape = tuple(flow.event_shape)
    x = torch.rand(6, *shape, dtype=torch.float64) * 0.9 + 0.05  # in (0, 1): also valid for the image flows
    c1, c2 = torch.randn(2, 6, 2, dtype=torch.float64)
    flow.log_prob(x, c1)  # ActNorm's data-dependent initialisation, before the perturbation
    _perturb(flow, 0.3)
    with torch.no_grad():
        lp1, lp2 = flow.log_prob(x, c1), flow.log_prob(x, c2)
    assert (lp1 != lp2).all(), f"log_prob ignores the context: {lp1.tolist()} vs {lp2.tolist()}"


def test_diagonal_normal_base_temperature():
    base = DiagonalNormal(3)
    with torch.no_grad():
        base.loc.fill_(2.0)
        base.log_scale.fill_(math.log(3.0))
    s = base.sample((10000,), temperature=0.5)
    assert abs(s.mean().item() - 2.0) < 0.05 and abs(s.std().item() - 1.5) < 0.05


@pytest.mark.parametrize(
    "build",
    [
        lambda: models.nice(4, layers=2, hidden=(8,)),
        lambda: models.realnvp(4, layers=2, hidden=(8,)),
        lambda: models.realnvp_image((1, 8, 8), levels=2, hidden_channels=4, blocks=1),
        lambda: models.glow((1, 8, 8), levels=2, steps=1, hidden_channels=4),
    ],
    ids=["nice", "realnvp", "realnvp_image", "glow"],
)
def test_save_load_round_trip(build, tmp_path):
    torch.manual_seed(0)
    flow = build()
    shape = flow.event_shape
    x = torch.rand(6, *shape) * 0.9 + 0.05
    flow.log_prob(x)  # ActNorm initialisation
    _perturb(flow, 0.05)
    path = tmp_path / "flow.safetensors"
    pf.save(flow, path)
    loaded = pf.load(path)
    assert loaded.recipe == flow.recipe
    from pushforward.transforms import ActNorm

    assert all(m._initialized for m in loaded.modules() if isinstance(m, ActNorm))
    loaded.log_prob(torch.rand(6, *shape))  # must not re-initialise
    torch.testing.assert_close(loaded.log_prob(x), flow.log_prob(x), atol=0, rtol=0)


def test_save_refuses_flows_without_recipe(tmp_path):
    flow = Flow(ElementwiseAffine(2), StandardNormal(2))
    with pytest.raises(ValueError, match="not built by a recipe"):
        pf.save(flow, tmp_path / "f.safetensors")


def test_load_rejects_corrupt_and_mismatched_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        pf.load(bad)
    with pytest.raises(FileNotFoundError):
        pf.load(tmp_path / "missing.safetensors")
    flow = models.realnvp(2, layers=2, hidden=(8,))
    path = tmp_path / "f.safetensors"
    pf.save(flow, path)
    import json

    import safetensors.torch as st

    state = st.load_file(str(path))
    recipe = dict(flow.recipe, kwargs=dict(flow.recipe["kwargs"], layers=3))
    st.save_file(state, str(path), metadata={"pushforward_recipe": json.dumps(recipe)})
    with pytest.raises(ValueError, match="does not match"):
        pf.load(path)


def test_everything_follows_to():
    flow = models.glow((1, 4, 4), levels=1, steps=1, hidden_channels=4).double()
    assert all(t.dtype == torch.float64 for t in flow.state_dict().values() if t.is_floating_point())
    assert flow.sample(2).dtype == torch.float64


def test_gaussian_mixture_base_is_normalised_and_samples_match():
    from pushforward.distributions import GaussianMixture

    torch.manual_seed(0)
    base = GaussianMixture(2, components=3, spread=2.0).double()
    with torch.no_grad():
        base.logits.copy_(torch.tensor([0.0, 1.0, -1.0]))
        base.log_scale.add_(0.3 * torch.randn_like(base.log_scale))
    g = torch.linspace(-10, 10, 500, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    mass = base.log_prob(grid).exp().sum() * (g[1] - g[0]) ** 2
    assert abs(mass.item() - 1) < 1e-3
    s = base.sample((100_000,))
    weights = torch.softmax(base.logits, -1)
    torch.testing.assert_close(s.mean(0), (weights[:, None] * base.loc).sum(0).detach(), atol=0.03, rtol=0)
    flow = Flow(models.realnvp(2, layers=2, hidden=(8,)).transform.double(), base)
    x, lp = flow.sample_and_log_prob(50)
    torch.testing.assert_close(lp, flow.log_prob(x))


def test_glow_split_prior_is_a_coupling_on_the_factored_half():
    from pushforward.transforms import Coupling, FactorOut

    flow = models.glow((1, 8, 8), levels=2, steps=1, hidden_channels=4)
    layers = list(flow.transform.transforms)
    i = next(i for i, t in enumerate(layers) if isinstance(t, FactorOut))
    prior = layers[i - 1]
    assert isinstance(prior, Coupling)
    assert prior.mask.out_features == layers[i].factored
    assert not any(isinstance(t, Coupling) and t is not prior for t in layers[i - 1:i])
    no_prior = models.glow((1, 8, 8), levels=2, steps=1, hidden_channels=4, split_prior=False)
    assert sum(isinstance(m, Coupling) for m in no_prior.modules()) + 1 == sum(
        isinstance(m, Coupling) for m in flow.modules())


def _cancelling_realnvp(shift: float) -> Flow:
    """A 2-D RealNVP whose first layer shifts x_1 by ``shift * x_0``: its inverse returns x_1 of order
    ``shift`` that float32 rounds by ~``shift * 2**-24``, which the forward pass adds back to a latent of
    order 1."""
    flow = models.realnvp(2, layers=2, hidden=(2,))
    net = flow.transform[0].net  # conditions on x_0, outputs (raw log-scale, shift) for x_1
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[0].bias.zero_()
        net[-1].weight.copy_(torch.tensor([[0.0, 0.0], [shift, -shift]]))  # relu(x0) - relu(-x0) = x0
        net[-1].bias.zero_()
    return flow


def test_sample_and_log_prob_warns_where_the_flow_is_not_invertible_at_its_precision():
    torch.manual_seed(0)
    flow = _cancelling_realnvp(1e6).eval()
    with torch.no_grad():
        with pytest.warns(InvertibilityWarning, match="not invertible in torch.float32"):
            x, lp = flow.sample_and_log_prob(1000)
        assert float((lp - flow.log_prob(x)).abs().max()) > 1e-2  # the disagreement the warning reports
        flow.double()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # invertible in float64: no warning, and the two agree
            x, lp = flow.sample_and_log_prob(1000)
        torch.testing.assert_close(lp, flow.log_prob(x), atol=1e-9, rtol=1e-9)
        flow.float().validate = False
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # validate=False skips the check (and its forward pass)
            flow.sample_and_log_prob(1000)
    flow.validate = True
    with pytest.warns(InvertibilityWarning):  # with grad (a variational objective) it is checked too
        x, lp = flow.sample_and_log_prob(1000)
    assert lp.requires_grad


def test_sample_and_log_prob_check_leaves_actnorm_uninitialised():
    flow = models.glow((1, 8, 8), levels=2, steps=1, hidden_channels=4, alpha=None)  # training mode
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        flow.sample_and_log_prob(3)
    assert not any(bool(m.initialized) for m in flow.modules() if isinstance(m, ActNorm))


def test_base_is_checked_against_the_protocol_and_needs_no_base_class():
    from pushforward.distributions import GaussianMixture
    from pushforward.protocols import BaseDistribution

    for base in (StandardNormal(2), DiagonalNormal(2), GaussianMixture(2, components=2)):
        assert isinstance(base, BaseDistribution)
    with pytest.raises(TypeError, match="BaseDistribution"):
        Flow(ElementwiseAffine(2), torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expects a Transform"):
        Flow(torch.nn.Linear(2, 2), StandardNormal(2))

    class Logistic(torch.nn.Module):  # written here: nothing to inherit from pushforward
        event_shape = torch.Size((2,))

        def log_prob(self, z, context=None):
            return (-z - 2 * torch.nn.functional.softplus(-z)).sum(-1)

        def sample(self, shape, context=None, temperature=1.0):
            u = torch.rand(*shape, 2).clamp(1e-6, 1 - 1e-6)
            return temperature * (u.log() - (-u).log1p())

    flow = Flow(ElementwiseAffine(2), Logistic())
    x, lp = flow.sample_and_log_prob(5)
    torch.testing.assert_close(lp, flow.log_prob(x))


def test_conditioners_lists_every_network_that_computes_parameters():
    from pushforward.core import conditioners
    from pushforward.transforms import Autoregressive, Coupling

    glow = models.glow((1, 8, 8), levels=2, steps=2, hidden_channels=4)
    couplings = [m for m in glow.modules() if isinstance(m, Coupling)]
    assert len(couplings) == 5 and conditioners(glow) == [c.net for c in couplings]
    iaf = models.iaf(3, layers=2, hidden=(8,))  # inside Inverse(...)
    assert conditioners(iaf) == [m.net for m in iaf.modules() if isinstance(m, Autoregressive)]
    assert conditioners(Flow(ElementwiseAffine(2), StandardNormal(2))) == []
