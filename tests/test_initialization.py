"""Data-dependent initialisation (ActNorm) never poisons a model, and happens on the batch you choose."""

from __future__ import annotations

import warnings

import pytest
import torch

import pushforward as pf
from pushforward import models
from pushforward.config import config_from_dict
from pushforward.initialization import data_dependent, is_initialized
from pushforward.train import evaluate, fit, negative_log_likelihood
from pushforward.transforms import ActNorm

torch.set_num_threads(1)


def glow(alpha: float | None = 0.05):
    torch.manual_seed(0)
    return models.glow((1, 8, 8), levels=2, steps=2, hidden_channels=8, alpha=alpha)


def actnorms(flow) -> list[ActNorm]:
    return [m for m in flow.modules() if isinstance(m, ActNorm)]


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 0.9 + 0.05


def all_finite(flow) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in flow.state_dict().values() if t.is_floating_point())


def actnorm_outputs(flow, x, context=None) -> list[torch.Tensor]:
    """Each ActNorm's output (data -> latent) when ``flow`` evaluates ``x``."""
    outs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o[0].detach())) for m in actnorms(flow)]
    try:
        with torch.no_grad():
            flow.log_prob(x, context)
    finally:
        for h in hooks:
            h.remove()
    return outs


def channel_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(y.dim()) if d != y.dim() - 3]
    return y.mean(dims), y.var(dims, unbiased=False).sqrt()


# -- batches that cannot define the statistics ---------------------------------------------------------
def test_empty_batch_leaves_the_model_uninitialised_and_finite(tmp_path):
    g = glow()
    assert g.log_prob(torch.rand(0, 1, 8, 8)).shape == (0,)
    assert not any(bool(m.initialized) for m in actnorms(g)) and not is_initialized(g)
    assert all_finite(g)
    x = images(4)
    assert bool(torch.isfinite(g.log_prob(x)).all())  # the next real batch initialises it
    assert is_initialized(g)
    pf.save(g, tmp_path / "g.safetensors")
    assert all_finite(pf.load(tmp_path / "g.safetensors"))


def test_initialize_from_an_empty_batch_is_an_error_that_changes_nothing():
    g = glow()
    g.log_prob(images(4))
    before = {k: v.clone() for k, v in g.state_dict().items()}
    with pytest.raises(ValueError, match="empty batch"):
        pf.initialize(g, torch.rand(0, 1, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in g.state_dict().items())
    with pytest.raises(ValueError, match="empty batch"):
        ActNorm(3).initialize(torch.zeros(0, 3))


def test_one_sample_and_constant_channels_give_finite_centred_parameters():
    layer = ActNorm(3)
    with pytest.warns(UserWarning, match="no measurable variance"):
        z, ladj = layer(torch.tensor([[1.0, -2.0, 1e3]]))  # one sample: no variance at all
    assert torch.equal(layer.log_scale.detach(), torch.zeros(3))  # scale 1 ...
    assert torch.equal(z, torch.zeros(1, 3)) and bool(torch.isfinite(ladj).all())  # ... centred
    layer = ActNorm(2)
    x = torch.stack([torch.randn(64, generator=torch.Generator().manual_seed(0)) * 3 + 1,
                     torch.full((64,), 0.3)], 1)
    with pytest.warns(UserWarning, match="1 of 2 features"):
        z, _ = layer(x)
    assert layer.log_scale[1] == 0 and torch.allclose(z[:, 1], torch.zeros(64), atol=1e-6)
    torch.testing.assert_close(z[:, 0].mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(z[:, 0].std(unbiased=False), torch.tensor(1.0), atol=1e-4, rtol=0)
    # a whole model on one sample: finite, and a later batch gets a finite density
    g = models.realnvp(4, layers=2, hidden=(8,))
    g.transform = pf.Compose(ActNorm(4), *g.transform.transforms)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g.log_prob(torch.randn(1, 4))
    assert all_finite(g) and bool(torch.isfinite(g.log_prob(torch.randn(8, 4))).all())


def test_non_finite_batch_is_a_clear_error_and_leaves_the_layer_unchanged():
    layer = ActNorm(2)
    with pytest.raises(ValueError, match="not finite"):
        layer(torch.tensor([[1.0, float("nan")], [2.0, 0.5]]))
    assert not layer._initialized and not bool(layer.initialized)
    assert torch.equal(layer.log_scale.detach(), torch.zeros(2))
    assert torch.equal(layer.shift.detach(), torch.zeros(2))
    with pytest.raises(ValueError, match="not finite"):
        layer(torch.tensor([[3e38, 1.0], [-3e38, 2.0]]))  # finite, but the squares overflow float32
    assert not bool(layer.initialized)


def test_evaluation_never_initialises():
    g = glow()
    g.eval()
    g.log_prob(images(4))
    assert not is_initialized(g)
    g.train()
    evaluate(g, images(8, seed=1), batch_size=4, reconstruction=False)
    assert not is_initialized(g)
    negative_log_likelihood(g, images(8, seed=2), 4, torch.device("cpu"))
    assert not is_initialized(g) and g.training  # mode restored, model untouched


# -- the explicit API ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_initialize_normalises_every_actnorm_on_the_given_batch(mode):
    g = glow()
    g.log_prob(images(16, seed=5) * 0.2)  # e.g. a validation batch seen first: initialise again
    getattr(g, mode)()
    train = images(32, seed=6)
    assert pf.initialize(g, train) is g
    assert g.training == (mode == "train")  # modes untouched
    assert all(m.training == (mode == "train") for m in g.modules())
    outs = actnorm_outputs(g, train)
    assert len(outs) == len(actnorms(g)) == 4  # 2 levels x 2 steps
    for y in outs:
        mean, std = channel_stats(y)
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
        torch.testing.assert_close(std, torch.ones_like(std), atol=1e-4, rtol=0)
    # a different batch is not normalised by them
    mean, _ = channel_stats(actnorm_outputs(g, images(16, seed=5) * 0.2)[0])
    assert float(mean.abs().max()) > 1


def test_initialize_with_context_and_in_float64():
    torch.manual_seed(0)
    g = models.glow((1, 8, 8), levels=1, steps=2, hidden_channels=8, context_features=3).double()
    x, c = images(8).double(), torch.randn(8, 3, dtype=torch.float64)
    pf.initialize(g, x, c)
    for y in actnorm_outputs(g, x, c):
        mean, std = channel_stats(y)
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-10, rtol=0)
        torch.testing.assert_close(std, torch.ones_like(std), atol=1e-5, rtol=0)


def test_initialize_rolls_back_when_it_fails():
    g = glow(alpha=None)
    g.log_prob(images(4))
    before = {k: v.clone() for k, v in g.state_dict().items()}
    bad = images(4)
    bad[0, 0, 0, 0] = 3e38  # finite (the flow accepts it), but its square overflows: ActNorm refuses
    with pytest.raises(ValueError, match="not finite"):
        pf.initialize(g, bad)  # every ActNorm was reset before the first one failed
    assert all(torch.equal(before[k], v) for k, v in g.state_dict().items())
    assert all(m._initialized for m in actnorms(g))


def test_flows_without_data_dependent_layers_are_returned_unchanged():
    g = models.realnvp(2, layers=2, hidden=(8,))
    before = {k: v.clone() for k, v in g.state_dict().items()}
    assert data_dependent(g) == [] and is_initialized(g)
    assert pf.initialize(g, torch.randn(4, 2)) is g
    assert all(torch.equal(before[k], v) for k, v in g.state_dict().items())


# -- fit -----------------------------------------------------------------------------------------------
def test_fit_initialises_from_training_not_validation_data(tmp_path):
    """Training data ~ N(3, 2^2), validation data ~ N(-5, 0.5^2). A validation pass before training (what
    Lightning's sanity check does) must not initialise; fit initialises from its first training batch."""
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(256, 1, 8, 8, generator=gen) * 2 + 3
    val = torch.randn(64, 1, 8, 8, generator=gen) * 0.5 - 5
    g = glow(alpha=None)
    negative_log_likelihood(g, val, 32, torch.device("cpu"))  # the validation "sanity check"
    config = config_from_dict({"data": "moons", "batch_size": 64, "lr": 1e-9, "warmup_steps": 1,
                               "max_steps": 1, "val_every": 1, "patience": 0, "progress": False, "seed": 0,
                               "restore_best": False})
    fit(g, train, val, config, run_dir=None)
    first = actnorms(g)[0]  # after the squeeze: 4 channels, each ~ N(3, 2^2) on training data
    torch.testing.assert_close(first.shift.detach().flatten(), torch.full((4,), -1.5), atol=0.3, rtol=0)
    torch.testing.assert_close(first.log_scale.detach().flatten(), torch.full((4,), -0.693), atol=0.1, rtol=0)
    # and it is the first training batch exactly: every ActNorm normalises it
    from pushforward.train import _Data, seed_from

    idx = torch.randperm(256, generator=torch.Generator().manual_seed(seed_from(0, 0, 0)))[:64]
    for y in actnorm_outputs(g, _Data(train).get(idx, 0, torch.float32)):
        mean, std = channel_stats(y)
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-3, rtol=0)
        torch.testing.assert_close(std, torch.ones_like(std), atol=1e-3, rtol=0)


def test_fit_keeps_an_explicit_initialisation(tmp_path):
    gen = torch.Generator().manual_seed(1)
    train, val = torch.rand(128, 1, 8, 8, generator=gen), torch.rand(32, 1, 8, 8, generator=gen)
    g = glow(alpha=None)
    chosen = torch.randn(16, 1, 8, 8, generator=gen) * 4 + 1
    pf.initialize(g, chosen)
    expected = [(m.log_scale.detach().clone(), m.shift.detach().clone()) for m in actnorms(g)]
    config = config_from_dict({"data": "moons", "batch_size": 64, "lr": 1e-9, "warmup_steps": 1,
                               "max_steps": 1, "val_every": 1, "patience": 0, "progress": False, "seed": 0,
                               "restore_best": False})
    fit(g, train, val, config, run_dir=None)
    for m, (log_scale, shift) in zip(actnorms(g), expected):
        torch.testing.assert_close(m.log_scale.detach(), log_scale, atol=1e-6, rtol=0)
        torch.testing.assert_close(m.shift.detach(), shift, atol=1e-6, rtol=0)
