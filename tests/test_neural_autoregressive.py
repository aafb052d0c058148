"""NAF / UNAF kernels, Householder reflections and circular splines beyond the registry: monotonicity, the
numerical inverses' tolerance and implicit gradients, the quadrature's accuracy, orthogonality, and the
circle's periodicity."""

from __future__ import annotations

import math
import re

import pytest
import torch

from pushforward import models
from pushforward.transforms import (
    CircularSplineKernel,
    DeepSigmoidalKernel,
    Householder,
    UMNNKernel,
)
from pushforward.transforms.neural_autoregressive import clenshaw_curtis

KERNELS = {
    "dsf": lambda: DeepSigmoidalKernel(units=8),
    "ddsf": lambda: DeepSigmoidalKernel(units=4, layers=3),
    "umnn": lambda: UMNNKernel(units=8),
}


def _params(kernel, n: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, kernel.params, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernels_are_strictly_increasing_with_the_stated_log_derivative(name):
    kernel = KERNELS[name]()
    params = _params(kernel, 6, scale=2.0)
    x = torch.linspace(-30, 30, 6001, dtype=torch.float64)[:, None].expand(-1, 6)
    y, logd = kernel.forward(x, params.expand(len(x), -1, -1).reshape(len(x), -1), -1)
    assert (y.diff(dim=0) > 0).all()
    # the log-derivative is the derivative of the map applied (central differences, step 1e-5)
    x = x[::30]
    p = params.expand(len(x), -1, -1).reshape(len(x), -1)
    _, logd = kernel.forward(x, p, -1)
    slope = (kernel.forward(x + 1e-5, p, -1)[0] - kernel.forward(x - 1e-5, p, -1)[0]) / 2e-5
    torch.testing.assert_close(slope.log(), logd, atol=1e-5, rtol=0)


def test_dsf_maps_the_real_line_onto_the_real_line():
    kernel = DeepSigmoidalKernel(units=8, layers=2)
    params = _params(kernel, 4, scale=2.0)
    x = torch.tensor([-1e6, 1e6], dtype=torch.float64)[:, None].expand(-1, 4)
    y, logd = kernel.forward(x, params.expand(2, -1, -1).reshape(2, -1), -1)
    assert (y[0] < -1e6 * kernel.min_slope).all() and (y[1] > 1e6 * kernel.min_slope).all()
    assert torch.isfinite(logd).all()


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_bisection_meets_its_tolerance(name):
    """The inverse is accurate to the documented tolerance, inside and far outside the first bracket."""
    kernel = KERNELS[name]()
    params = _params(kernel, 8, scale=1.5, seed=1)
    x = torch.tensor([-2000.0, -37.0, -4.5, -1e-3, 0.0, 0.7, 3.99, 150.0], dtype=torch.float64)
    y, logd = kernel.forward(x[None], params.T.reshape(1, -1), -1)
    x2, logd2 = kernel.inverse(y, params.T.reshape(1, -1), -1)
    assert (x2 - x).abs().max() <= kernel.tolerance * x.abs().clamp_min(1).max()
    torch.testing.assert_close(logd2, -logd, atol=1e-9, rtol=0)


def test_bisection_alone_meets_a_coarse_tolerance():
    """With a coarse tolerance the bisection takes few steps; the error still stays within it."""
    kernel = DeepSigmoidalKernel(units=8, tolerance=1e-2)
    assert kernel._steps == math.ceil(math.log2(2 * kernel.bound / 1e-2))
    params = _params(kernel, 50, scale=1.5, seed=2)
    x = torch.randn(1, 50, dtype=torch.float64) * 3
    y, _ = kernel.forward(x, params.T.reshape(1, -1), -1)
    x2, _ = kernel.inverse(y, params.T.reshape(1, -1), -1)
    assert (x2 - x).abs().max() <= 1e-2


def test_dsf_inverse_names_a_value_beyond_its_brackets():
    kernel = DeepSigmoidalKernel(units=4, bound=1.0, expansions=2)
    params = torch.zeros(1, kernel.params, dtype=torch.float64)
    with pytest.raises(ValueError, match="beyond"):
        kernel.inverse(torch.tensor([[1e3]], dtype=torch.float64), params, -1)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_inverse_gradients_are_the_implicit_function_gradients(name):
    kernel = KERNELS[name]()
    params = _params(kernel, 3, scale=0.8, seed=3).T.reshape(1, -1).requires_grad_(True)
    y = torch.tensor([[-1.3, 0.2, 2.1]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, p: kernel.inverse(y, p, -1), (y, params), atol=1e-6)


def test_clenshaw_curtis_is_exact_for_polynomials_of_its_degree():
    points, weights = clenshaw_curtis(8)
    assert points[0] == 0 and points[-1] == 1 and (points.diff() > 0).all()
    for k in range(9):
        exact = torch.tensor(1 / (k + 1), dtype=torch.float64)
        torch.testing.assert_close((weights * points**k).sum(), exact)
    with pytest.raises(ValueError, match="even"):
        clenshaw_curtis(7)


def test_umnn_quadrature_error_is_below_the_float64_tests():
    """The default 64-node quadrature agrees with a 512-node one to ~1e-10 on parameters of unit scale."""
    coarse, fine = UMNNKernel(units=16), UMNNKernel(units=16, nodes=512)
    params = _params(coarse, 40, scale=1.0, seed=4).T.reshape(1, -1)
    x = torch.linspace(-8, 8, 40, dtype=torch.float64)[None]
    y, logd = coarse.forward(x, params, -1)
    y_ref, logd_ref = fine.forward(x, params, -1)
    torch.testing.assert_close(y, y_ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(logd, logd_ref, atol=0, rtol=0)  # log g(x) is exact, not quadrature


@pytest.mark.parametrize("layers", [1, 3])
def test_dsf_with_identity_init_starts_as_the_identity(layers):
    """identity_init=True: the kernel is the identity at zero parameters, so a layer on a zero-initialised
    conditioner starts as the identity (and a checkerboard mask's conditioning pixels get ladj 0)."""
    from pushforward.nn import MADE
    from pushforward.transforms import Autoregressive

    torch.manual_seed(0)
    t = Autoregressive(5, DeepSigmoidalKernel(units=4, layers=layers, identity_init=True), MADE).double()
    x = torch.randn(6, 5, dtype=torch.float64) * 3
    z, ladj = t(x)
    torch.testing.assert_close(z, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    default = DeepSigmoidalKernel(units=4, layers=layers)
    y, _ = default.forward(x, torch.zeros(6, 5 * default.params, dtype=torch.float64), -1)
    assert (y - x).abs().max() > 0.1  # the default starts elsewhere (distinct units by offsets)


def test_umnn_is_the_identity_at_zero_and_dsf_is_increasing_there():
    x = torch.randn(4, 3, dtype=torch.float64)
    umnn = UMNNKernel(units=4)
    y, logd = umnn.forward(x, torch.zeros(4, 3 * umnn.params, dtype=torch.float64), -1)
    torch.testing.assert_close(y, x, atol=1e-14, rtol=0)
    assert (logd == 0).all()


@pytest.mark.parametrize("reflections", [1, 2, 5, 8])
def test_householder_is_orthogonal_and_volume_preserving(reflections):
    torch.manual_seed(0)
    t = Householder(5, reflections).double()
    q = t.matrix()
    torch.testing.assert_close(q @ q.T, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(q), torch.tensor((-1.0) ** reflections, dtype=torch.float64))
    x = torch.randn(7, 5, dtype=torch.float64)
    z, ladj = t(x)
    torch.testing.assert_close(z.norm(dim=-1), x.norm(dim=-1))
    assert (ladj == 0).all() and ladj.shape == (7,)


def test_householder_reflects_its_vector_and_fixes_the_orthogonal_complement():
    t = Householder(3, 1).double()
    with torch.no_grad():
        t.vectors.copy_(torch.tensor([[0.0, 3.0, 4.0]]))
    z, _ = t(torch.tensor([[0.0, 3.0, 4.0], [1.0, 0.0, 0.0], [0.0, 4.0, -3.0]], dtype=torch.float64))
    torch.testing.assert_close(z, torch.tensor([[0.0, -3.0, -4.0], [1.0, 0.0, 0.0], [0.0, 4.0, -3.0]],
                                               dtype=torch.float64))
    with pytest.raises(ValueError, match="3 features"):
        t(torch.zeros(2, 4))


def _circle_params(kernel, n, seed=5):
    return _params(kernel, n, scale=1.5, seed=seed).T.reshape(1, -1)


def test_circular_spline_is_a_diffeomorphism_of_the_circle():
    kernel = CircularSplineKernel(bins=6)
    params = _circle_params(kernel, 4)
    ends = torch.tensor([[-math.pi] * 4, [math.pi] * 4], dtype=torch.float64)
    y, logd = kernel.forward(ends, params.expand(2, -1), -1)
    # -pi and pi are one point: same image on the circle, same derivative
    gap = torch.remainder(y[1] - y[0] + math.pi, 2 * math.pi) - math.pi
    torch.testing.assert_close(gap, torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(logd[0], logd[1], atol=1e-12, rtol=0)
    # continuity across the seam, and a derivative that integrates to one full turn
    x = torch.linspace(-math.pi, math.pi, 200001, dtype=torch.float64)[:, None].expand(-1, 4)
    y, logd = kernel.forward(x, params.expand(len(x), -1), -1)
    assert ((y >= -math.pi) & (y < math.pi)).all()
    steps = torch.remainder(y.diff(dim=0) + math.pi, 2 * math.pi) - math.pi
    assert (steps > 0).all() and steps.abs().max() < 1e-2  # increasing, no jump but the wrap itself
    turn = torch.trapezoid(logd.exp(), x, dim=0)
    torch.testing.assert_close(turn, torch.full((4,), 2 * math.pi, dtype=torch.float64), atol=1e-6, rtol=0)
    assert not torch.allclose(logd[0], logd[len(x) // 2])  # not a mere rotation


def test_circular_spline_round_trips_the_whole_circle_and_rejects_other_values():
    kernel = CircularSplineKernel(bins=5)
    params = _circle_params(kernel, 3, seed=6)
    x = (torch.rand(1000, 3, dtype=torch.float64) * 2 - 1) * math.pi
    y, logd = kernel.forward(x, params.expand(len(x), -1), -1)
    x2, logd2 = kernel.inverse(y, params.expand(len(x), -1), -1)
    torch.testing.assert_close(x2, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(logd2, -logd, atol=1e-12, rtol=0)
    y0, logd0 = kernel.forward(x, torch.zeros(len(x), 3 * kernel.params, dtype=torch.float64), -1)
    torch.testing.assert_close(y0, x, atol=1e-14, rtol=0)
    torch.testing.assert_close(logd0, torch.zeros_like(logd0), atol=1e-14, rtol=0)
    with pytest.raises(ValueError, match=r"angles in \[-pi, pi\]"):
        kernel.forward(torch.full((1, 3), 4.0, dtype=torch.float64), params, -1)


@pytest.mark.parametrize("recipe", ["naf", "unaf"])
def test_recipes_are_normalised_densities(recipe):
    """A randomly perturbed 2-D flow integrates to one on a grid."""
    torch.manual_seed(0)
    flow = getattr(models, recipe)(2, layers=2, hidden=(16,), units=4).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
        g = torch.linspace(-9, 9, 361, dtype=torch.float64)
        grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        mass = flow.log_prob(grid).exp().sum() * (g[1] - g[0]) ** 2
    assert abs(float(mass) - 1) < 1e-3


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="DeepSigmoidalKernel"):
        DeepSigmoidalKernel(units=0)
    with pytest.raises(ValueError, match="UMNNKernel"):
        UMNNKernel(nodes=7)
    with pytest.raises(ValueError, match="Householder"):
        Householder(3, 0)


@pytest.mark.parametrize("recipe", ["naf", "unaf"])
def test_the_command_line_trains_evaluates_and_samples_them(recipe, tmp_path, capsys):
    """``pushforward train --data moons --recipe naf`` (and unaf), eval (its inverse check), sample."""
    from pushforward.cli import main

    run = tmp_path / recipe
    tiny = ["--data", "moons", "--recipe", recipe, "--no-progress", "--set", "n_train=400",
            "--set", "n_val=100", "--set", "n_test=100", "--set", "model.layers=2",
            "--set", "model.hidden=[8,8]", "--set", "model.units=4", "--set", "batch_size=100"]
    assert main(["train", *tiny, "--run-dir", str(run), "--max-steps", "6"]) == 0
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    error = float(re.search(r"max \|f\^-1\(f\(x\)\) - x\| = (\S+)", out).group(1))
    assert error < 1e-4  # float32: bisection to the dtype's resolution
    assert main(["sample", str(run), "--n", "50", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").exists()


def test_checkerboard_coupling_refuses_a_kernel_that_is_not_the_identity_at_zero():
    """CheckerboardMask zeroes the kernel's parameters on its conditioning pixels and relies on the kernel
    being the identity there: the default NAF kernel is not, so the pairing is an error, not a wrong ladj."""
    import functools

    from pushforward.nn import ConvNet
    from pushforward.transforms import CheckerboardMask, Coupling, DeepSigmoidalKernel

    conv = functools.partial(ConvNet, hidden_channels=4)
    with pytest.raises(ValueError, match="identity at zero parameters"):
        Coupling(CheckerboardMask(2, 4, 4), DeepSigmoidalKernel(units=4), conv)
    Coupling(CheckerboardMask(2, 4, 4), DeepSigmoidalKernel(units=4, identity_init=True), conv)


def test_householder_and_circular_spline_compile_fullgraph():
    """Householder reflections and a circular-spline coupling trace without graph breaks (log_prob and its
    gradient, and sampling) and give the eager values."""
    import functools

    from pushforward import Compose, Flow
    from pushforward.distributions import StandardNormal
    from pushforward.nn import MLP
    from pushforward.transforms import CircularSplineKernel, Coupling, HalfMask, Householder

    torch._dynamo.reset()
    torch.manual_seed(0)
    mlp = functools.partial(MLP, hidden=(8,))
    flow = Flow(Compose(Coupling(HalfMask(4), CircularSplineKernel(bins=4), mlp), Householder(4, 2)),
                StandardNormal(4))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = (torch.rand(6, 4) * 2 - 1) * 3.0  # angles inside (-pi, pi)
    lp = torch.compile(flow.log_prob, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(lp, flow.log_prob(x))
    lp.sum().backward()
    assert all(p.grad is not None for p in flow.parameters())
    torch.manual_seed(1)
    s = torch.compile(flow.sample, fullgraph=True, backend="aot_eager")(5)
    torch.manual_seed(1)
    torch.testing.assert_close(s, flow.sample(5))
