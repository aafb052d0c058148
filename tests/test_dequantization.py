"""Uniform and variational dequantization: valid noise, exact log q, a valid bound, clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from pushforward import models
from pushforward.dequantization import UniformDequantizer, VariationalDequantizer


def _perturb(m, scale=0.1):
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 4, 4)])
def test_variational_noise_lies_in_the_cell_and_log_q_is_exact(shape):
    torch.manual_seed(0)
    deq = VariationalDequantizer(shape, quantization_levels=17, layers=4, hidden_channels=8).double()
    _perturb(deq)
    x = torch.randint(0, 17, (6, *shape))
    y, log_q = deq(x, dtype=torch.float64)
    u = y * 17 - x
    assert ((u > 0) & (u < 1)).all()
    torch.testing.assert_close(deq.log_q(u, x), log_q, atol=1e-8, rtol=1e-8)
    # q depends on x: the same noise has another density under other pixels
    assert not torch.allclose(deq.log_q(u, (x + 1) % 17), log_q)


def test_variational_bound_is_never_below_the_true_nll():
    # Under a uniform model on [0, 1]^D, P(x) = K^-D exactly; the bound adds E_q[log q] = -H(q) >= 0.
    torch.manual_seed(0)
    deq = VariationalDequantizer((1, 2, 2), quantization_levels=4, layers=2, hidden_channels=8).double()
    _perturb(deq, 0.3)
    x = torch.randint(0, 4, (1, 1, 2, 2)).expand(4000, 1, 2, 2)
    _, log_q = deq(x, dtype=torch.float64)
    mean, se = log_q.mean().item(), log_q.std().item() / math.sqrt(log_q.numel())
    assert mean > -3 * se
    assert UniformDequantizer(4)(x)[1].abs().max() == 0  # uniform noise: the bound is tight here


def test_gradients_reach_the_dequantizer_through_model_and_log_q():
    torch.manual_seed(0)
    deq = VariationalDequantizer((1, 4, 4), quantization_levels=17, layers=2, hidden_channels=8)
    flow = models.glow((1, 4, 4), levels=1, steps=1, hidden_channels=8)
    x = torch.randint(0, 17, (8, 1, 4, 4))
    y, log_q = deq(x)
    loss = (-flow.log_prob(y) + log_q).mean()
    loss.backward()
    assert all(p.grad is not None for p in deq.parameters())
    assert sum(p.grad.abs().sum() for p in deq.parameters()) > 0


def test_dequantizers_reject_bad_data():
    deq = UniformDequantizer(256)
    with pytest.raises(TypeError, match="integer data in \\[0, 255\\], got torch.float32"):
        deq(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="got values in \\[0, 256\\]"):
        deq(torch.tensor([[[[0, 256]]]]))
