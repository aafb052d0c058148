"""Objectives: each value equals a hand computation on a tiny model; fit trains whatever an objective can
score."""

from __future__ import annotations

import ast
import inspect
import math
import textwrap

import pytest
import torch
from torch import nn

from pushforward import models
from pushforward.config import config_from_dict
from pushforward.data.images import ImageData
from pushforward.objectives import (
    ELBO,
    NLL,
    Batch,
    Objective,
    UniformDequantization,
    VariationalDequantization,
    default_objective,
    seeded_rng,
)
from pushforward.train import evaluate, fit
from pushforward.vae import vae

torch.set_num_threads(1)


class Gaussian(nn.Module):
    """A module fit has never seen: a learnable diagonal Gaussian with a ``log_prob``, nothing else."""

    def __init__(self, features: int, loc: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.loc = nn.Parameter(torch.full((features,), loc))
        self.log_scale = nn.Parameter(torch.full((features,), math.log(scale)))

    def log_prob(self, x, context=None):
        flat = x.reshape(len(x), -1)
        return torch.distributions.Normal(self.loc, self.log_scale.exp()).log_prob(flat).sum(-1)


def images(n: int = 40, levels: int = 17, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
    return ImageData(x, torch.arange(n) % 10, levels)


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def config(**kw):
    values = {"data": "moons", "batch_size": 20, "lr": 1e-2, "warmup_steps": 1, "max_steps": 6,
              "val_every": 3, "patience": 0, "progress": False, "seed": 0, "clip": 5.0, "run_dir": "",
              "restore_best": False}
    values.update(kw)
    return config_from_dict(values)


# -- each objective by hand -----------------------------------------------------------------------------
def test_nll_is_the_exact_negative_log_density():
    model = Gaussian(2, loc=0.5, scale=2.0)
    x = torch.randn(5, 2)
    by_hand = -(torch.distributions.Normal(0.5, 2.0).log_prob(x)).sum(-1)
    torch.testing.assert_close(NLL().loss(model, Batch(x), gen()), by_hand)
    assert (NLL().name, NLL().unit, NLL().is_bound, NLL().levels) == ("nll", "nats", False, None)
    with pytest.raises(TypeError, match="UniformDequantization"):
        NLL().loss(model, Batch(torch.zeros(2, 2, dtype=torch.uint8)), gen())


def test_uniform_dequantization_and_its_bits_per_dim_by_hand():
    levels, model = 17, Gaussian(16, loc=0.5, scale=0.3)
    x = images(6).images
    objective = UniformDequantization(levels)
    u = torch.rand((6, 1, 4, 4), generator=gen())  # what the objective draws from the same generator
    y = (x.float() + u) / levels
    nll = -(torch.distributions.Normal(0.5, 0.3).log_prob(y.reshape(6, -1))).sum(-1)
    loss = objective.loss(model, Batch(x), gen()).detach()
    torch.testing.assert_close(loss, nll)
    d, mean = 16, float(loss.double().mean())
    assert objective.bits_per_dim(mean, d) == pytest.approx((mean + d * math.log(levels)) / (d * math.log(2)),
                                                            rel=1e-12)
    assert (objective.is_bound and objective.levels == levels
            and objective.describe() == {"dequantization": "uniform"})


def test_noise_of_a_shard_is_the_shard_of_the_global_noise():
    """Under torchrun each process holds rows of the global batch; its losses are those rows of the
    one-process losses."""
    model, x = Gaussian(16, loc=0.5, scale=0.3), images(8).images
    whole = UniformDequantization(17).loss(model, Batch(x), gen())
    parts = [UniformDequantization(17).loss(model, Batch(x[s], part=s, total=8), gen())
             for s in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)


def test_variational_dequantization_adds_log_q_of_the_drawn_noise():
    torch.manual_seed(0)
    inner = models.realnvp_image((1, 4, 4), levels=1, hidden_channels=4, blocks=1)
    flow = models.dequantized(inner.recipe, quantization_levels=17, layers=2, hidden_channels=4)
    x = images(6).images
    objective = VariationalDequantization(17)
    batch, log_q = objective.dequantize(flow, Batch(x), gen())
    u = batch.x * 17 - x.float()
    assert bool(((u > 0) & (u < 1)).all())
    torch.testing.assert_close(log_q, flow.dequantizer.log_q(u, x), atol=1e-4, rtol=1e-4)  # the density of u
    by_hand = -flow.log_prob(batch.x) + log_q
    torch.testing.assert_close(objective.loss(flow, Batch(x), gen()), by_hand)
    figures = objective.evaluate(flow, Batch(x), gen())
    torch.testing.assert_close(figures["loss"], by_hand)
    torch.testing.assert_close(figures["log_q"], log_q)
    assert isinstance(objective.references["uniform"], UniformDequantization)
    with pytest.raises(TypeError, match="dequantizer"):
        objective.check(inner)


@pytest.mark.parametrize("k", [1, 5])
def test_elbo_and_iwae_are_the_vae_bounds_with_seeded_noise(k):
    torch.manual_seed(0)
    model = vae((3,), latent=2, hidden=(8,))
    x = torch.randn(7, 3)
    objective = ELBO(k)
    with seeded_rng(Batch(x), gen()):
        by_hand = -(model.elbo(x)[0] if k == 1 else model.iwae(x, k))
    torch.testing.assert_close(objective.loss(model, Batch(x), gen()), by_hand)
    figures = objective.evaluate(model, Batch(x), gen())
    if k == 1:
        torch.testing.assert_close(figures["loss"], -(figures["recon"] - figures["kl"]))
    assert objective.is_bound and objective.describe()["bound"] == ("negative ELBO" if k == 1
                                                                    else "negative IWAE (k=5)")
    with pytest.raises(TypeError, match="elbo"):
        objective.check(Gaussian(3))


def test_dequantization_wraps_any_continuous_objective():
    torch.manual_seed(0)
    model = vae((1, 4, 4), latent=2, hidden=(8,), arch="mlp")
    x = images(5).images
    objective = UniformDequantization(17, ELBO())
    y = UniformDequantization(17).dequantize(model, Batch(x), gen())  # draws u first, then the ELBO's seed
    g = gen()
    torch.rand((5, 1, 4, 4), generator=g)
    with seeded_rng(y, g):
        by_hand = -model.elbo(y.x)[0]
    torch.testing.assert_close(objective.loss(model, Batch(x), gen()), by_hand)
    assert objective.describe() == {"dequantization": "uniform", "bound": "negative ELBO"}


# -- the one place that chooses -------------------------------------------------------------------------
def test_default_objective_is_chosen_from_the_model_and_the_data():
    flow, vectors, pictures = models.realnvp(2, layers=1, hidden=(4,)), torch.randn(4, 2), images(4)
    assert repr(default_objective(flow, vectors)) == "NLL()"
    assert repr(default_objective(flow, pictures)) == "UniformDequantization(levels=17, objective=NLL())"
    assert repr(default_objective(vae((2,), latent=1, hidden=(4,), k=3), vectors)) == "ELBO(k=3)"
    assert repr(default_objective(vae((1, 4, 4), latent=1, hidden=(4,)), pictures)) == (
        "UniformDequantization(levels=17, objective=ELBO(k=1))")
    inner = models.realnvp_image((1, 4, 4), levels=1, hidden_channels=4, blocks=1)
    dequantized = models.dequantized(inner.recipe, quantization_levels=17, layers=1, hidden_channels=4)
    assert repr(default_objective(dequantized, pictures)) == (
        "VariationalDequantization(levels=17, objective=NLL())")
    with pytest.raises(ValueError, match="train it with dequantization = 'variational'"):
        default_objective(dequantized, pictures, "uniform")
    with pytest.raises(ValueError, match="needs image data and a flow with a dequantizer"):
        default_objective(inner, pictures, "variational")
    with pytest.raises(ValueError, match="needs image data"):
        default_objective(dequantized, vectors, "variational")
    with pytest.raises(ValueError, match="'uniform' or 'variational'"):
        default_objective(flow, pictures, "gaussian")


# -- fit takes the objective as an argument -------------------------------------------------------------
def test_fit_with_an_explicit_objective_equals_the_default():
    def glow():
        torch.manual_seed(0)
        return models.glow((1, 4, 4), levels=1, steps=1, hidden_channels=4)

    train, val = images(40), images(12, seed=1)
    implicit, explicit = glow(), glow()
    h1 = fit(implicit, train, val, config(data="digits"))
    h2 = fit(explicit, train, val, config(data="digits"), objective=UniformDequantization(17))
    for k, v in implicit.state_dict().items():
        assert torch.equal(v, explicit.state_dict()[k]), k
    assert [r["val_bpd"] for r in h1.rows] == [r["val_bpd"] for r in h2.rows]


def test_fit_trains_a_module_it_has_never_seen_with_a_log_prob():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(400, 2, generator=g) * torch.tensor([0.5, 2.0]) + torch.tensor([3.0, -1.0])
    model = Gaussian(2)
    history = fit(model, data[:300], data[300:],
                  config(batch_size=100, max_steps=300, val_every=100, lr=5e-2), objective=NLL())
    assert history.stop_reason == "completed"
    torch.testing.assert_close(model.loc.detach(), data[:300].mean(0), atol=0.05, rtol=0)
    torch.testing.assert_close(model.log_scale.detach().exp(), data[:300].std(0), atol=0.05, rtol=0)
    result = evaluate(model, data[300:], objective=NLL())
    assert result["nll"] == pytest.approx(history.rows[-1]["val_nll"], rel=1e-5) and "bpd" not in result


class Regression(Objective):
    """A loss that is no log-density: squared error of ``model(x[:, :1])`` against ``x[:, 1:]``; uses noise
    too."""

    name, unit = "mse", "squared units"

    def loss(self, model, batch, generator):
        jitter = batch.draw(lambda n: 1e-3 * torch.randn(n, 1, generator=generator))
        return (model(batch.x[:, :1] + jitter) - batch.x[:, 1:]).square().sum(-1)


def test_fit_minimises_a_toy_loss_of_a_plain_network():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(300, 1, generator=g)
    data = torch.cat([t, 2 * t + 1], -1)
    torch.manual_seed(0)
    net = nn.Linear(1, 1)
    history = fit(net, data[:200], data[200:], config(batch_size=50, max_steps=400, val_every=100, lr=5e-2),
                  objective=Regression())
    assert (history.rows[0]["val_nll"] > 10 * history.rows[-1]["val_nll"]
            and history.rows[-1]["val_nll"] < 2e-3)
    assert (float(net.weight) == pytest.approx(2.0, abs=0.1)
            and float(net.bias) == pytest.approx(1.0, abs=0.05))


def _code(fn) -> str:
    """The source of ``fn`` without its docstrings."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def test_the_loop_knows_no_model_family():
    """No branch of the loop (or of evaluate) asks what the model is; the objective does the model-specific
    work."""
    from pushforward import train

    loop = [train.fit, train._fit, train._prepare, train._load_state, train._start, train._Order,
            train._initialise, train._optimizer_step,
            train._validation_figures, train._validate, train._loop, train._show, train._checkpoint,
            train.evaluate]
    for fn in loop:
        source = _code(fn)
        for word in ("hasattr(", "dequantizer", "elbo", "VAE", "vae", "variational", "ImageData", "images"):
            assert word not in source, (fn.__name__, word)


def test_resuming_with_another_objective_is_refused(tmp_path):
    class Scaled(NLL):
        def __repr__(self):
            return "Scaled()"

    def flow():
        torch.manual_seed(0)
        return models.realnvp(2, layers=1, hidden=(4,))

    data = torch.randn(60, 2)
    cfg = config(run_dir=str(tmp_path / "run"), max_steps=3)
    fit(flow(), data, data, cfg)
    with pytest.raises(ValueError, match=r"trained with NLL\(\), this run uses Scaled\(\)"):
        fit(flow(), data, data, config(run_dir=str(tmp_path / "run"), max_steps=6), objective=Scaled(),
            resume=True)
