"""The transform contract, checked on every entry of the registry in float64."""

from __future__ import annotations

import io

import pytest
import torch
from registry import CASES

from pushforward.transforms import ActNorm

IDS = sorted(CASES)
CONTEXT_IDS = [name for name in IDS if CASES[name].context]


def _run(t, x, c, inverse=False):
    return t.inverse(x, c) if inverse else t(x, c)


@pytest.mark.parametrize("name", IDS)
def test_round_trip(name):
    case = CASES[name]
    t = case.make()
    x, c = case.data()
    z, ladj = t(x, c)
    assert z.numel() == x.numel() and z.shape[0] == x.shape[0] and ladj.shape == x.shape[:1]
    x2, ladj_inv = t.inverse(z, c)
    torch.testing.assert_close(x2, x, atol=1e-9, rtol=1e-9)
    # the inverse's log-determinant is minus the forward's at the corresponding point
    torch.testing.assert_close(ladj_inv, -ladj, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", IDS)
def test_ladj_matches_autograd_jacobian(name):
    case = CASES[name]
    t = case.make()
    x, c = case.data()
    _, ladj = t(x, c)
    for i in range(x.shape[0]):
        ci = None if c is None else c[i : i + 1]

        def f(v, ci=ci):
            return t(v.reshape(1, *case.shape), ci)[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(f, x[i].reshape(-1))
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign != 0
        torch.testing.assert_close(ladj[i], logabsdet, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", IDS)
def test_inverse_ladj_matches_autograd_jacobian(name):
    case = CASES[name]
    t = case.make()
    x, c = case.data()
    z, _ = t(x, c)
    _, ladj = t.inverse(z, c)
    ci = None if c is None else c[:1]
    jac = torch.autograd.functional.jacobian(
        lambda v: t.inverse(v.reshape(1, *z.shape[1:]), ci)[0].reshape(-1), z[0].reshape(-1)
    )
    torch.testing.assert_close(ladj[0], torch.linalg.slogdet(jac)[1], atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", CONTEXT_IDS)
def test_context_reaches_every_output(name):
    """Moving the context moves every output the transform does not pass through, and the ladj.

    An output element is *passed through* where, under both contexts, it equals an input element of
    its sample exactly: a coupling's conditioning part (the identity by construction) and a spline's
    linear tails (outside ``[-bound, bound]`` the kernel is the identity, whatever its parameters),
    possibly moved by a permutation. Every other element must change when the context changes, and
    so must each sample's ``ladj`` unless the transform is volume preserving (``ladj`` exactly 0,
    e.g. additive kernels) or passes the whole sample through. A conditional MADE whose first
    output never saw the context fails this.
    """
    case = CASES[name]
    t = case.make()
    x, c = case.data(n=8)
    c2 = c + torch.randn(c.shape, generator=torch.Generator().manual_seed(3), dtype=c.dtype)
    with torch.no_grad():
        z1, l1 = t(x, c)
        z2, l2 = t(x, c2)
    inputs = x.flatten(1)[:, None, :]
    passed = ((z1.flatten(1)[..., None] == inputs).any(-1) & (z2.flatten(1)[..., None] == inputs).any(-1))
    passed = passed.reshape(z1.shape)
    blind = (z1 == z2) & ~passed
    assert not blind.any(), (
        f"{int(blind.sum())} of {blind.numel()} output elements ignore the context; "
        f"per coordinate: {blind.sum(0).flatten().tolist()}"
    )
    assert not passed.all()
    if (l1 == 0).all() and (l2 == 0).all():
        return  # volume preserving: nothing to move
    transformed = (~passed).flatten(1).any(1)
    assert (l1 != l2)[transformed].all(), f"ladj ignores the context: {l1.tolist()} vs {l2.tolist()}"


@pytest.mark.parametrize("name", IDS)
def test_gradients_reach_every_parameter(name):
    case = CASES[name]
    t = case.make()
    x, c = case.data()
    x.requires_grad_(True)
    z, ladj = t(x, c)
    x2, _ = t.inverse(z.detach(), c)
    (z.square().sum() - ladj.sum() + x2.square().sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    modules = dict(t.named_modules())
    for pname, p in t.named_parameters():
        assert p.grad is not None, f"no gradient reached {pname}"
        owner = modules[pname.rpartition(".")[0]]
        if (pname.endswith("weight") and isinstance(getattr(owner, "mask", None), torch.Tensor)
                and not owner.mask.any()):
            continue  # a masked layer without connections (a 1-D MADE's input layer: z_1 sees no x)
        assert p.grad.abs().sum() > 0, f"zero gradient at {pname}"


@pytest.mark.parametrize("name", IDS)
def test_eval_equals_train(name):
    case = CASES[name]
    t = case.make()
    x, c = case.data(seed=5)
    z_train, l_train = t.train()(x, c)
    z_eval, l_eval = t.eval()(x, c)
    torch.testing.assert_close(z_eval, z_train, atol=0, rtol=0)
    torch.testing.assert_close(l_eval, l_train, atol=0, rtol=0)


@pytest.mark.parametrize("name", IDS)
def test_state_dict_round_trip(name):
    case = CASES[name]
    t = case.make(seed=0)
    buffer = io.BytesIO()
    torch.save(t.state_dict(), buffer)
    buffer.seek(0)
    fresh = case.make(seed=1) if not _has_actnorm(t) else _fresh_uninitialised(case)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x, c = case.data(seed=7)
    # A first call on other data must not re-initialise a loaded ActNorm.
    other = case.data(seed=8)[0]
    fresh(other.square() if case.unit_interval else other.flip(0) if case.circle else other * 3 + 1, c)
    z1, l1 = t(x, c)
    z2, l2 = fresh(x, c)
    torch.testing.assert_close(z2, z1, atol=0, rtol=0)
    torch.testing.assert_close(l2, l1, atol=0, rtol=0)


def _has_actnorm(t) -> bool:
    return any(isinstance(m, ActNorm) for m in t.modules())


def _fresh_uninitialised(case):
    torch.manual_seed(1)
    fresh = case.build().double()
    assert not any(m._initialized for m in fresh.modules() if isinstance(m, ActNorm))
    return fresh


def test_actnorm_initialises_to_zero_mean_unit_variance():
    x = torch.randn(256, 3, 5, 5, dtype=torch.float64) * torch.tensor([1.0, 4.0, 0.5])[:, None, None] + 2
    t = ActNorm(3, event_dim=3).double()
    z, _ = t(x)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert bool(t.initialized)
    # initialised once only: a second batch leaves the parameters alone
    before = (t.log_scale.detach().clone(), t.shift.detach().clone())
    z2, _ = t(x * 10)
    torch.testing.assert_close(t.log_scale.detach(), before[0], atol=0, rtol=0)
    torch.testing.assert_close(t.shift.detach(), before[1], atol=0, rtol=0)
    assert torch.allclose(z2.std(dim=(0, 2, 3)), 10 * z.std(dim=(0, 2, 3)), rtol=1e-6)


@pytest.mark.parametrize("name", ["affine_half_flip", "img_affine_checkerboard", "img_affine_channel",
                                  "realnvp", "maf_context", "maf_context_1d", "maf_context_no_hidden",
                                  "img_checkerboard_context"])
def test_couplings_start_as_identity(name):
    torch.manual_seed(0)
    case = CASES[name]
    t = case.build().double()
    x, c = case.data()
    z, ladj = t(x, c)
    torch.testing.assert_close(z, x, atol=0, rtol=0)
    torch.testing.assert_close(ladj, torch.zeros_like(ladj), atol=0, rtol=0)


def test_kernels_meet_the_kernel_protocol():
    from pushforward.protocols import Kernel
    from pushforward.transforms import AdditiveKernel, AffineKernel, SplineKernel

    for kernel in (AdditiveKernel(), AffineKernel(), SplineKernel()):
        assert isinstance(kernel, Kernel) and isinstance(kernel.params, int)
    assert not isinstance(object(), Kernel)
