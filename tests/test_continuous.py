"""Continuous normalizing flows and flow matching (the registry checks the transform contract itself).

Densities against closed forms, the log-determinant against a finite-difference Jacobian, normalisation on
a grid, Hutchinson's estimator against the exact trace, the solver's tolerance, flow matching on moons,
the CLI path and the errors.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from pushforward import Compose, Flow, StandardNormal, load, models, save
from pushforward.objectives import (
    NLL,
    OBJECTIVES,
    Batch,
    ColumnDequantization,
    FlowMatching,
    UniformDequantization,
    _assignment,
    select_objective,
)
from pushforward.transforms.continuous import CNF, ConvVectorField, MLPVectorField

TIGHT = {"method": "dopri5", "rtol": 1e-10, "atol": 1e-10}


class LinearField(nn.Module):
    """``v(t, x) = A x``: the flow over ``[0, 1]`` is ``x -> expm(A) x``, with log-determinant ``tr A``."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t, x, context=None):
        return x @ self.a.T


def _perturbed(module: nn.Module, scale: float = 0.3, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def test_linear_field_pushes_a_gaussian_to_the_gaussian_of_known_density():
    g = torch.Generator().manual_seed(0)
    a = 0.5 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    flow = Flow(CNF(LinearField(a), **TIGHT), StandardNormal(3)).double()
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    # z = expm(A) x ~ N(0, I)  <=>  x ~ N(0, S) with S = expm(-A) expm(-A)^T
    m = torch.linalg.matrix_exp(-a)
    exact = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64), m @ m.T).log_prob(x)
    torch.testing.assert_close(flow.log_prob(x), exact, atol=1e-8, rtol=0)
    z, ladj = flow.transform(x)
    torch.testing.assert_close(z, x @ torch.linalg.matrix_exp(a).T, atol=1e-8, rtol=0)
    trace = torch.full((7,), float(a.trace()), dtype=torch.float64)
    torch.testing.assert_close(ladj, trace, atol=1e-9, rtol=0)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_linear_field_ladj_is_the_trace(divergence):
    """With a linear field Hutchinson's estimate ``eps^T A eps`` has a closed-form mean too, but not a
    fixed value: only the exact divergence gives ``tr A`` for every example."""
    a = torch.diag(torch.tensor([0.3, -0.7], dtype=torch.float64)) + torch.tensor([[0.0, 0.4], [0.0, 0.0]],
                                                                                   dtype=torch.float64)
    cnf = CNF(LinearField(a), divergence=divergence, **TIGHT).double().train()
    _, ladj = cnf(torch.randn(64, 2, dtype=torch.float64))
    if divergence == "exact":
        torch.testing.assert_close(ladj, torch.full_like(ladj, -0.4), atol=1e-9, rtol=0)
    else:  # Rademacher noise: eps^T A eps = tr A + 0.4 * eps_1 eps_2 = -0.4 +- 0.4
        assert set(torch.round(ladj, decimals=6).tolist()) <= {0.0, -0.8}


def _random_cnf(features: int, context: int = 0, **solver) -> CNF:
    torch.manual_seed(0)
    field = _perturbed(MLPVectorField(features, (16,), context).double())
    return CNF(field, **(solver or TIGHT)).double()


def test_ladj_matches_a_finite_difference_jacobian():
    cnf = _random_cnf(3)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, ladj = cnf(x)
    h = 1e-5
    with torch.no_grad():
        for i in range(len(x)):
            cols = [(cnf(x[i] + h * e)[0] - cnf(x[i] - h * e)[0]) / (2 * h)
                    for e in torch.eye(3, dtype=torch.float64)[:, None, :]]
            jac = torch.cat(cols).T
            assert abs(float(ladj[i]) - float(torch.linalg.slogdet(jac)[1])) < 1e-6
    assert ladj.abs().min() > 1e-2  # the field is far from volume preserving: the check has teeth


def test_log_prob_integrates_to_one_on_a_grid():
    torch.manual_seed(0)
    flow = Flow(_random_cnf(2, method="dopri5", rtol=1e-7, atol=1e-7), StandardNormal(2)).double().eval()
    side = torch.linspace(-7, 7, 141, dtype=torch.float64)
    grid = torch.cartesian_prod(side, side)
    with torch.no_grad():
        p = flow.log_prob(grid).exp()
    mass = float(p.sum() * (side[1] - side[0]) ** 2)
    assert abs(mass - 1) < 5e-3, mass
    # and the density is not the base's: the flow moved it
    base = StandardNormal(2).double().log_prob(grid).exp()
    assert float((p - base).abs().max()) > 1e-2


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(noise):
    """Mean of Hutchinson's ladj over many draws (each row of a batch draws its own noise) against the
    exact ladj: within 4 standard errors, and the draws do vary."""
    exact = _random_cnf(4)
    hutch = CNF(exact.vector_field, divergence="hutchinson", noise=noise, **TIGHT).train()
    x = torch.randn(1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).expand(4000, 4)
    torch.manual_seed(3)
    with torch.no_grad():
        z_est, est = hutch(x)
        z, ladj = exact(x[:1])
    torch.testing.assert_close(z_est, z.expand_as(z_est), atol=1e-8, rtol=0)  # the path is not estimated
    mean, se = float(est.mean()), float(est.std() / math.sqrt(len(est)))
    assert se > 1e-3
    assert abs(mean - float(ladj)) < 4 * se, (mean, float(ladj), se)


def test_hutchinson_model_evaluates_with_the_exact_divergence():
    exact = _random_cnf(4)
    hutch = CNF(exact.vector_field, divergence="hutchinson", **TIGHT)
    x = torch.randn(5, 4, dtype=torch.float64)
    hutch.eval()
    torch.testing.assert_close(hutch(x)[1], exact(x)[1], atol=0, rtol=0)
    hutch.train()
    assert not torch.equal(hutch(x)[1], exact(x)[1])
    with pytest.raises(ValueError, match="eval_divergence"):
        CNF(exact.vector_field, eval_divergence="estimate")


def test_round_trip_within_the_solvers_tolerance():
    """Round trip and forward ladj = -inverse ladj hold to the tolerance asked, not to rounding: tighter
    tolerances give smaller errors (so the registry's 1e-9 needs its tight solvers). rtol / atol bound the
    error of each step; the global error of the two solves is a multiple of it (here ~30-100x)."""
    errors = []
    for tol in (1e-4, 1e-7, 1e-10):
        cnf = _random_cnf(3, method="dopri5", rtol=tol, atol=tol)
        x = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            z, ladj = cnf(x)
            back, ladj_inv = cnf.inverse(z)
        err = max(float((back - x).abs().max()), float((ladj + ladj_inv).abs().max()))
        assert err < 1000 * tol, (tol, err)
        errors.append(err)
    assert errors[0] > 1e-9  # a loose solver does not pass the registry's round trip
    assert errors[0] > errors[1] > errors[2]


def test_adjoint_gives_the_gradients_of_backpropagation():
    cnf = _random_cnf(3, context=2)
    adj = CNF(cnf.vector_field, adjoint=True, **TIGHT)
    x = torch.randn(6, 3, dtype=torch.float64)
    c = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    grads = []
    for t in (cnf, adj):
        z, ladj = t(x, c)
        loss = (z.square().sum(-1) / 2 - ladj).mean()
        grads.append(torch.autograd.grad(loss, [*t.parameters(), c]))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert all(float(g.abs().sum()) > 0 for g in grads[1])


def _moons(n: int = 1024) -> torch.Tensor:
    from pushforward.data import toy_sample

    return toy_sample("moons", n, seed=0).float()


def test_flow_matching_loss_decreases_on_moons_and_the_ode_likelihood_improves():
    torch.manual_seed(0)
    x = _moons()
    flow = models.cnf(2, hidden=(32, 32))
    objective = FlowMatching()
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    nll_before = float(NLL().loss(flow.eval(), Batch(x[:256]), g).mean())
    flow.train()
    losses = []
    for _ in range(300):
        idx = torch.randint(0, len(x), (128,), generator=g)
        loss = objective.loss(flow, Batch(x[idx]), g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < 0.8 * first, (first, last)
    flow.eval()
    with torch.no_grad():
        nll_after = float(-flow.log_prob(x[:256]).mean())
    assert nll_after < nll_before - 0.5, (nll_before, nll_after)


def test_flow_matching_target_is_the_straight_line_velocity():
    """With a field that returns the path's own velocity the loss is zero; with sigma_min > 0 the path
    starts at the data blurred by sigma_min and ends at the noise."""

    class Oracle(nn.Module):  # knows the pair (x, z): returns u = (1 - s) z - x at x_t
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))
            self.u: torch.Tensor | None = None

        def forward(self, t, x, context=None):
            assert self.u is not None
            return self.u + 0 * self.w

    field = Oracle()
    flow = Flow(Compose(CNF(field)), StandardNormal(2))
    x = torch.randn(8, 2)
    for sigma in (0.0, 0.1):
        objective = FlowMatching(sigma_min=sigma)
        g = torch.Generator().manual_seed(5)
        z = torch.randn((8, 2), generator=g)  # what the objective draws first from the same seed
        field.u = (1 - sigma) * z - x
        loss = objective.loss(flow, Batch(x), torch.Generator().manual_seed(5))
        torch.testing.assert_close(loss, torch.zeros(8), atol=1e-6, rtol=0)
        field.u = -x  # a wrong target
        assert float(objective.loss(flow, Batch(x), torch.Generator().manual_seed(5)).min()) > 0


def test_ot_coupling_is_the_optimal_assignment():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    p = _assignment(x, z)
    cost = float((x - z[p]).square().sum())
    best = min(float((x - z[list(q)]).square().sum()) for q in itertools.permutations(range(6)))
    assert abs(cost - best) < 1e-5
    assert sorted(p.tolist()) == list(range(6))


def test_conditional_flow_matching_and_image_flow_matching():
    torch.manual_seed(0)
    flow = _perturbed(models.cnf(2, hidden=(8,), context_features=3))  # a zero last layer passes no gradient
    c = torch.randn(16, 3)
    loss = FlowMatching().loss(flow, Batch(torch.randn(16, 2), c), torch.Generator().manual_seed(0))
    loss.mean().backward()
    assert loss.shape == (16,)
    assert flow.transform[0].vector_field.net[0].weight.grad[:, -3:].abs().sum() > 0  # the context is read
    with pytest.raises(ValueError, match="context"):
        FlowMatching(coupling="ot").loss(flow, Batch(torch.randn(16, 2), c), torch.Generator())
    # images: integers dequantized first, then the logit (no gradient), then the conv field
    image = models.cnf_image((1, 4, 4), hidden_channels=4, blocks=1)
    objective = select_objective("flow-matching", UniformDequantization(17))
    ints = torch.randint(0, 17, (8, 1, 4, 4))
    loss = objective.loss(image, Batch(ints), torch.Generator().manual_seed(0))
    assert loss.shape == (8,) and torch.isfinite(loss).all()
    with pytest.raises(TypeError, match="continuous"):
        FlowMatching().loss(image, Batch(ints), torch.Generator())


def test_select_objective_and_errors():
    assert OBJECTIVES == __import__("pushforward.config", fromlist=["OBJECTIVES"]).OBJECTIVES
    nll = NLL()
    assert select_objective("nll", nll) is nll
    assert isinstance(select_objective("flow-matching", nll), FlowMatching)
    assert select_objective("ot-flow-matching", nll).coupling == "ot"
    fm = select_objective("flow-matching", ColumnDequantization([0.0, 0.5]))
    assert isinstance(fm.references["ode"], ColumnDequantization)
    with pytest.raises(ValueError, match="objective must be one of"):
        select_objective("fm", nll)
    with pytest.raises(TypeError, match="CNF"):
        FlowMatching().check(models.realnvp(2, layers=2, hidden=(8,)))
    with pytest.raises(ValueError, match="sigma_min"):
        FlowMatching(sigma_min=1.0)
    with pytest.raises(ValueError, match="step_size"):
        CNF(MLPVectorField(2), method="rk4")
    with pytest.raises(ValueError, match="torchdiffeq solver"):
        CNF(MLPVectorField(2), method="rk45")
    with pytest.raises(ValueError, match="divergence"):
        CNF(MLPVectorField(2), divergence="trace")
    with pytest.raises(ValueError, match="context of 3"):
        MLPVectorField(2, context_features=3)(torch.zeros(()), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="image shape"):
        ConvVectorField((4, 4))


def test_missing_torchdiffeq_is_a_one_line_error():
    code = ("import sys; sys.modules['torchdiffeq'] = None\n"
            "from pushforward import models\n"
            "try:\n    models.cnf(2)\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().count("\n") == 0 and "pip install torchdiffeq" in out


def test_trained_flow_matching_model_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    flow = models.cnf(2, hidden=(8,))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(5):
        loss = FlowMatching().loss(flow, Batch(_moons(64)), torch.Generator().manual_seed(0)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    save(flow, tmp_path / "cnf.safetensors")
    loaded = load(tmp_path / "cnf.safetensors")
    x = _moons(16)
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x), flow.log_prob(x))
    assert loaded.transform[0].method == "dopri5"


def test_cli_trains_by_flow_matching_and_evaluates_by_the_ode(tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "pushforward"]
    train = subprocess.run([*base, "train", "--data", "moons", "--recipe", "cnf", "--objective",
                            "flow-matching",
                            "--max-steps", "20", "--run-dir", str(run), "--no-progress",
                            "--set", "n_train=512", "--set", "n_val=128", "--set", "n_test=128",
                            "--set", "model.hidden=[16]"], capture_output=True, text=True)
    assert train.returncode == 0, train.stderr
    state = (run / "checkpoint" / "state.json").read_text()
    assert "FlowMatching(sigma_min=0.0, coupling='independent')" in state
    assert "val flow_matching loss (squared velocity)" in train.stdout + train.stderr  # not called an NLL
    assert "val NLL" not in train.stdout + train.stderr
    ev = subprocess.run([*base, "eval", str(run), "--no-progress"], capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    assert "NLL" in ev.stdout
    bad = subprocess.run([*base, "train", "--data", "moons", "--recipe", "realnvp", "--objective",
                          "flow-matching", "--max-steps", "1", "--run-dir", str(tmp_path / "bad"),
                          "--no-progress"], capture_output=True, text=True)
    assert bad.returncode != 0 and "CNF" in bad.stderr
