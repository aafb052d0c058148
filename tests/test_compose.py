"""Compose is a plain loop over its layers: whatever a user does to an ``nn.Module`` takes effect.

Issue 14 item 1: a cache of coupling chains refreshed only when the number of layers changed gave
log-densities several nats off after a layer was replaced, and bypassed ``nn.Module.__call__`` so
hooks never fired. Every test compares against an independently computed value.
"""

import copy

import pytest
import torch
from torch.nn.utils import parametrize

from pushforward import models
from pushforward.core import Compose, Flow
from pushforward.nn import MLP
from pushforward.transforms import AffineKernel, AlternatingMask, Coupling


def _perturbed(flow):
    torch.manual_seed(0)
    flow = flow.double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return flow


def _layer_by_layer(flow, x):
    """log p(x) computed here, by hand, from the layers the flow holds now."""
    ladj = torch.zeros(x.shape[0], dtype=x.dtype)
    for t in flow.transform.transforms:
        x, layer_ladj = t(x)
        ladj = ladj + layer_ladj
    return flow.base.log_prob(x) + ladj


def _coupling(flip: bool):
    return Coupling(AlternatingMask(4, flip=flip), AffineKernel(), lambda i, o, c: MLP(i, o, c, hidden=(16,)))


def test_replacing_a_layer_with_the_other_orientation_is_used():
    flow = _perturbed(models.realnvp(4, layers=4, hidden=(16,)))
    x = torch.randn(7, 4, dtype=torch.float64)
    before = flow.log_prob(x)
    new = _perturbed(Flow(Compose(_coupling(flip=True)), flow.base)).transform.transforms[0]
    assert flow.transform.transforms[2].mask.cond == (0, 2)  # realnvp alternates: layer 2 is flip=False
    flow.transform.transforms[2] = new  # the other orientation
    after = flow.log_prob(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, _layer_by_layer(flow, x), rtol=0, atol=1e-12)
    x_back, _ = flow.transform.inverse(flow.transform(x)[0])
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-10)


def test_appended_layers_are_run():
    flow = _perturbed(models.realnvp(4, layers=2, hidden=(16,)))
    new = _perturbed(Flow(Compose(_coupling(True)), flow.base)).transform.transforms[0]
    flow.transform.transforms.append(new)
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(flow.log_prob(x), _layer_by_layer(flow, x), rtol=0, atol=1e-12)


def test_forward_hooks_fire_on_every_layer():
    flow = models.realnvp(4, layers=4, hidden=(8,))
    fired = []
    for i, t in enumerate(flow.transform.transforms):
        t.register_forward_hook(lambda m, args, out, i=i: fired.append(i))
    flow.log_prob(torch.randn(3, 4))
    assert fired == [0, 1, 2, 3]


def test_forward_hook_that_changes_the_output_is_respected():
    flow = _perturbed(models.realnvp(4, layers=2, hidden=(8,)))
    x = torch.randn(3, 4, dtype=torch.float64)
    plain = flow.log_prob(x)
    flow.transform.transforms[1].register_forward_hook(lambda m, args, out: (out[0], out[1] + 1.0))
    torch.testing.assert_close(flow.log_prob(x), plain + 1.0)


def _last_linear(coupling):
    return [m for m in coupling.net.modules() if isinstance(m, torch.nn.Linear)][-1]


class _Double(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def test_parametrizations_are_seen():
    flow = _perturbed(models.realnvp(4, layers=4, hidden=(16,)))
    reference = copy.deepcopy(flow)
    with torch.no_grad():
        _last_linear(reference.transform.transforms[1]).weight.mul_(2)
    parametrize.register_parametrization(_last_linear(flow.transform.transforms[1]), "weight", _Double())
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(flow.log_prob(x), reference.log_prob(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_weight_and_spectral_norm_are_seen(norm):
    flow = _perturbed(models.realnvp(4, layers=4, hidden=(16,)))
    reference = copy.deepcopy(flow)
    layer = _last_linear(flow.transform.transforms[2])
    getattr(torch.nn.utils.parametrizations, norm)(layer)
    with torch.no_grad():
        torch.nn.init.normal_(layer.parametrizations.weight.original if norm == "spectral_norm"
                              else layer.parametrizations.weight.original1, std=0.3)
    flow.eval()  # spectral norm: no power iteration, the weight is fixed
    with torch.no_grad():
        _last_linear(reference.transform.transforms[2]).weight.copy_(layer.weight)
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(flow.log_prob(x), reference.log_prob(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(flow.log_prob(x), _layer_by_layer(flow, x), rtol=0, atol=1e-12)


def test_to_dtype_after_use():
    flow = models.realnvp(4, layers=4, hidden=(8,))
    x = torch.randn(3, 4)
    flow.log_prob(x)
    flow = _perturbed(flow)  # .double() after a float32 call
    x64 = x.double()
    torch.testing.assert_close(flow.log_prob(x64), _layer_by_layer(flow, x64), rtol=0, atol=1e-12)


def test_patched_layer_forward_is_called():
    """Gradient checkpointing and autocast patch a layer's forward; Compose calls it."""
    flow = models.realnvp(4, layers=2, hidden=(8,))
    calls = []
    for t in flow.transform.transforms:
        original = t.forward
        t.forward = lambda x, context=None, f=original: calls.append(1) or f(x, context)
    flow.log_prob(torch.randn(3, 4))
    assert len(calls) == 2


def test_empty_compose_is_an_error():
    with pytest.raises(ValueError, match="no transforms"):
        Compose()(torch.randn(2, 3))
