"""Bad input gets a clear error naming what was expected and what came."""

from __future__ import annotations

import functools

import pytest
import torch

from pushforward import Compose, models
from pushforward.nn import ConvNet
from pushforward.transforms import (
    AffineKernel,
    ChannelMask,
    Coupling,
    FactorOut,
    HalfMask,
    LeakyReLU,
    Logit,
    Permutation,
    Squeeze,
    Tanh,
)


def test_wrong_event_shape():
    flow = models.realnvp(2, layers=2, hidden=(8,))
    with pytest.raises(ValueError, match=r"shape \(\*batch, 2\), got shape \(5, 3\)"):
        flow.log_prob(torch.randn(5, 3))
    img = models.glow((1, 8, 8), levels=1, steps=1, hidden_channels=4)
    with pytest.raises(ValueError, match=r"\(\*batch, 1, 8, 8\), got shape \(2, 1, 8, 6\)"):
        img.log_prob(torch.rand(2, 1, 8, 6))


def test_wrong_dtype():
    flow = models.realnvp(2, layers=2, hidden=(8,))
    with pytest.raises(TypeError, match="torch.float32.*got torch.float64"):
        flow.log_prob(torch.randn(5, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="got torch.uint8.*dequantize"):
        flow.log_prob(torch.zeros(5, 2, dtype=torch.uint8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input(bad):
    flow = models.realnvp(2, layers=2, hidden=(8,))
    x = torch.randn(5, 2)
    x[3, 1] = bad
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\) \(NaN or Inf\)"):
        flow.log_prob(x)


def test_logit_outside_unit_interval():
    with pytest.raises(ValueError,
                       match=r"Logit.forward expects values in \[0.0, 1.0\], got 1 outside.*max 1.5"):
        Logit(0.05)(torch.tensor([[0.2, 1.5, 0.3]]))
    img = models.glow((1, 8, 8), levels=1, steps=1, hidden_channels=4)
    x = torch.rand(2, 1, 8, 8)
    x[0, 0, 0, 0] = -0.1
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        img.log_prob(x)


def test_tanh_inverse_domain():
    with pytest.raises(ValueError, match=r"Tanh.inverse expects values in \(-1.0, 1.0\)"):
        Tanh().inverse(torch.tensor([[0.5, 1.0]]))


def test_image_shape_squeezes_cannot_divide():
    with pytest.raises(ValueError, match="divisible by 4; got 28x30"):
        models.glow((1, 28, 30), levels=2)
    with pytest.raises(ValueError, match="divisible by 2; got 7x7"):
        models.realnvp_image((1, 7, 7), levels=2)
    with pytest.raises(ValueError, match=r"needs height and width divisible by 2, got an image of 5x4"):
        Squeeze()(torch.randn(1, 1, 5, 4))
    with pytest.raises(ValueError, match=r"image shape \(C, H, W\)"):
        models.glow((28, 28))


def test_masks_that_cannot_split():
    net = functools.partial(ConvNet, hidden_channels=4)
    with pytest.raises(ValueError, match="must split 1 channels into two non-empty parts.*needs at least 2"):
        Coupling(ChannelMask(1), AffineKernel(), net)
    with pytest.raises(ValueError, match="must split 1 features"):
        HalfMask(1)
    with pytest.raises(ValueError, match="keep and factor out at least one channel each; got 1 channel"):
        FactorOut(1, Compose(LeakyReLU(event_dim=3)))


def test_mask_size_mismatch():
    t = Coupling(ChannelMask(4), AffineKernel(), functools.partial(ConvNet, hidden_channels=4))
    with pytest.raises(ValueError,
                       match=r"splits 4 features on dim -3, got a tensor of shape \(2, 3, 4, 4\)"):
        t(torch.randn(2, 3, 4, 4))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="permutation of range"):
        Permutation([0, 0, 1])
    with pytest.raises(ValueError, match="negative_slope > 0"):
        LeakyReLU(0.0)
    with pytest.raises(ValueError, match="0 <= alpha < 0.5"):
        Logit(0.5)
    with pytest.raises(TypeError, match="Compose expects Transform modules, got Linear at position 1"):
        Compose(LeakyReLU(), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mask must be one of"):
        models.realnvp(2, mask="diagonal")
    with pytest.raises(ValueError, match="unknown recipe 'glo'; known recipes: .*glow, .*realnvp"):
        models.build({"recipe": "glo", "kwargs": {}})


def test_missing_context():
    flow = models.realnvp(2, layers=1, hidden=(8,), context_features=3)
    # the conditioners name what they were built for (the flow leaves a missing context to them)
    with pytest.raises(ValueError, match="built for a context of 3 features; got none"):
        flow.log_prob(torch.randn(4, 2))
    with pytest.raises(ValueError, match="built for a context of 3 features; got none"):
        flow.sample(4)


CONDITIONAL = {
    "realnvp": lambda c: models.realnvp(2, layers=2, hidden=(8,), context_features=c),
    "maf": lambda c: models.maf(2, layers=2, hidden=(8,), context_features=c),
    "glow": lambda c: models.glow((1, 4, 4), levels=1, steps=1, hidden_channels=4, context_features=c),
    "realnvp_image": lambda c: models.realnvp_image((1, 4, 4), levels=1, hidden_channels=4, blocks=1,
                                                    context_features=c),
}


def _x(flow, n=5):
    return torch.rand(n, *flow.event_shape) * 0.8 + 0.1


@pytest.mark.parametrize("name", sorted(CONDITIONAL))
def test_context_given_to_an_unconditional_flow_is_an_error(name):
    """Issue 14 item 3: the context used to be ignored silently."""
    flow = CONDITIONAL[name](0)
    with pytest.raises(ValueError, match=r"no layer that reads a context, got a context of shape \(5, 7\)"):
        flow.log_prob(_x(flow), context=torch.randn(5, 7))
    with pytest.raises(ValueError, match="no layer that reads a context"):
        flow.sample(3, context=torch.randn(7))
    with pytest.raises(ValueError, match="no layer that reads a context"):
        flow(torch.randn(7))


@pytest.mark.parametrize("name", sorted(CONDITIONAL))
def test_context_of_the_wrong_width_or_batch_is_an_error(name):
    flow = CONDITIONAL[name](3)
    x = _x(flow)
    with pytest.raises(ValueError, match=r"context must have shape \(\*batch, 3\), got \(5, 7\)"):
        flow.log_prob(x, context=torch.randn(5, 7))
    with pytest.raises(ValueError, match=r"context's batch shape \(4,\) does not broadcast against the "
                                         r"input's batch shape \(5,\)"):
        flow.log_prob(x, context=torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"context must have shape \(\*batch, 3\), got \(2,\)"):
        flow.sample(2, context=torch.randn(2))
    with pytest.raises(TypeError, match="context must be torch.float32 like the flow, got torch.float64"):
        flow.log_prob(x, context=torch.randn(5, 3, dtype=torch.float64))
    flow.log_prob(x, context=torch.randn(3))  # one context broadcast over the batch is fine
    flow.log_prob(x, context=torch.randn(5, 3))


@pytest.mark.parametrize("name", sorted(CONDITIONAL))
def test_non_finite_context_is_an_error(name):
    flow = CONDITIONAL[name](3)
    c = torch.randn(5, 3)
    c[2, 1] = float("nan")
    with pytest.raises(ValueError,
                       match=r"log_prob got 1 non-finite value\(s\) \(NaN or Inf\) in its context"):
        flow.log_prob(_x(flow), context=c)
    c[2, 1] = float("inf")
    with pytest.raises(ValueError, match="non-finite value.* in its context"):
        flow.sample(1, context=c)


def test_context_check_follows_replaced_layers():
    """The flow's context width is read from its layers when used, not cached at construction."""
    from pushforward.nn import MLP
    from pushforward.transforms import AffineKernel, AlternatingMask, Coupling

    flow = models.realnvp(2, layers=2, hidden=(8,))
    flow.transform.transforms[1] = Coupling(AlternatingMask(2), AffineKernel(),
                                            lambda i, o, c: MLP(i, o, c, hidden=(8,)), context_features=4)
    with pytest.raises(ValueError, match="built for a context of 4 features; got none"):
        flow.log_prob(torch.randn(3, 2))
    assert flow.log_prob(torch.randn(3, 2), context=torch.randn(3, 4)).shape == (3,)


def test_flow_with_an_embedding_checks_the_embedding_input():
    from pushforward import Flow

    inner = models.realnvp(2, layers=2, hidden=(8,), context_features=4)
    flow = Flow(inner.transform, inner.base, embedding=torch.nn.Linear(6, 4))
    flow.log_prob(torch.randn(3, 2), context=torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"context must have shape \(\*batch, 6\), got \(3, 4\)"):
        flow.log_prob(torch.randn(3, 2), context=torch.randn(3, 4))


def test_validation_can_be_switched_off_globally():
    import pushforward as pf

    flow = models.realnvp(2, layers=1, hidden=(8,))
    x = torch.randn(3, 2)
    x[0, 0] = float("nan")
    pf.set_validation(False)
    try:
        assert torch.isnan(flow.log_prob(x)[0])  # no check, the NaN propagates
        Logit(0.05)(torch.tensor([[1.5]]))  # no domain check either
    finally:
        pf.set_validation(True)
    with pytest.raises(ValueError, match="non-finite"):
        flow.log_prob(x)
