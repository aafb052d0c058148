"""The VAE baseline: the bounds' order, IWAE -> log p(x) on a linear-Gaussian model with a known
likelihood, a proper decoder density, training through fit / the CLI, and ``pushforward compare``."""

from __future__ import annotations

import json
import math

import pytest
import torch

import pushforward
from pushforward import models
from pushforward.cli import main
from pushforward.data import load_digits, toy_sample
from pushforward.vae import VAE, _soft_clamp, vae

torch.set_num_threads(1)


def png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def _perturb(model: torch.nn.Module, std: float, seed: int = 0) -> None:
    """Random weights everywhere (the recipe zero-initialises the output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = max(1, p.shape[-1] if p.dim() > 1 else 1)
            p.add_(std * torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def _paired_se(a: torch.Tensor) -> float:
    return float(a.std() / math.sqrt(len(a)))


# -- the bounds are ordered ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vector", "image"])
def test_elbo_below_iwae_increasing_in_k(kind):
    torch.manual_seed(0)
    if kind == "vector":  # random weights
        model = vae(event_shape=[2], hidden=[32, 32])
        _perturb(model, 0.5)
        x = toy_sample("moons", 2000, seed=1)
    else:  # briefly trained on digits (random image decoders have absurdly heavy-tailed weights)
        model = vae(event_shape=[1, 8, 8], arch="mlp", hidden=[64, 64])
        images = load_digits("train").images
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(80):
            y = pushforward.data.dequantize(images[torch.randint(0, len(images), (128,))], 17)
            loss = -model.elbo(y)[0].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        g = torch.Generator().manual_seed(1)
        x = pushforward.data.dequantize(load_digits("test").images, 17, generator=g)
    with torch.no_grad():
        elbo = model.elbo(x, samples=50)[0]  # the same expectation as samples=1, less noise
        iw = {k: model.iwae(x, k) for k in (1, 10, 100)}
    # E[IWAE_1] = ELBO; then E[IWAE_k] grows with k
    assert abs(float((iw[1] - elbo).mean())) < 4 * _paired_se(iw[1] - elbo) + 1e-6
    for lo, hi in ((elbo, iw[10]), (iw[10], iw[100])):
        d = hi - lo
        assert float(d.mean()) > 3 * _paired_se(d), (float(d.mean()), _paired_se(d))


def test_elbo_terms_and_shapes():
    torch.manual_seed(0)
    model = vae(event_shape=[1, 8, 8], hidden_channels=8)
    _perturb(model, 0.1)
    x = torch.rand(6, 1, 8, 8)
    elbo, recon, kl = model.elbo(x)
    assert elbo.shape == recon.shape == kl.shape == (6,)
    assert torch.allclose(elbo, recon - kl)
    assert bool((kl >= 0).all())
    assert model.log_prob(x).shape == (6,)
    # k drawn in chunks (logsumexp of the chunks' logsumexps): the same estimator
    a, b = model.iwae(x, 12, chunk=12), model.iwae(x, 12, chunk=5)
    assert a.shape == b.shape == (6,) and bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    assert torch.allclose(a, b, atol=0.5 + 0.05 * float(a.detach().abs().max()))
    assert model.sample(5).shape == (5, 1, 8, 8)
    assert model.sample((2, 3), decoder_noise=False).shape == (2, 3, 1, 8, 8)
    with pytest.raises(ValueError, match="shape"):
        model.log_prob(torch.rand(6, 64))
    with pytest.raises(TypeError, match="dequantize"):
        model.log_prob(torch.zeros(6, 1, 8, 8, dtype=torch.long))


# -- a linear-Gaussian model: log p(x) is known --------------------------------------------------
def _linear_gaussian(
    d: int, w: torch.Tensor, b: torch.Tensor, raw_log_sigma: float
) -> tuple[VAE, torch.Tensor]:
    """``x = W z + b + sigma * eps``: a VAE whose decoder is exactly that; returns it and the covariance
    of x."""
    model = vae(event_shape=[d], latent=w.shape[1], hidden=[]).double()
    dec = model.decoder[-1]
    with torch.no_grad():
        dec.weight.zero_()
        dec.bias.zero_()
        dec.weight[:d] = w
        dec.bias[:d] = b
        dec.bias[d:] = raw_log_sigma
    sigma = float(_soft_clamp(torch.tensor(raw_log_sigma, dtype=torch.float64), *model.scale_range).exp())
    return model, w @ w.T + sigma**2 * torch.eye(d, dtype=torch.float64)


def _set_encoder(model: VAE, a: torch.Tensor, c: torch.Tensor, raw_log_sigma: torch.Tensor) -> None:
    lin = model.encoder.net[-1]
    m = a.shape[0]
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[:m] = a
        lin.bias[:m] = c
        lin.bias[m:] = raw_log_sigma


def test_iwae_approaches_exact_log_likelihood_of_linear_gaussian():
    torch.manual_seed(0)
    d = 2
    w = torch.tensor([[1.0, 0.5], [-0.3, 0.8]], dtype=torch.float64)
    b = torch.tensor([0.2, -0.1], dtype=torch.float64)
    model, cov = _linear_gaussian(d, w, b, math.log(0.4))
    sigma2 = float(cov[0, 0] - (w @ w.T)[0, 0])
    # the exact posterior: N(A (x - b), S); the encoder gets its mean but a diagonal, inflated variance
    s = torch.linalg.inv(torch.eye(2, dtype=torch.float64) + w.T @ w / sigma2)
    a = s @ w.T / sigma2
    _set_encoder(model, a, -a @ b, 0.5 * torch.log(torch.diagonal(s)) + 0.4)
    p = torch.distributions.MultivariateNormal(b, cov)
    x = p.sample((300,))
    log_p = p.log_prob(x)
    with torch.no_grad():
        elbo = model.elbo(x, samples=2000)[0]
        gaps = {k: float((log_p - model.iwae(x, k)).mean()) for k in (1, 10, 100, 1000)}
    # the ELBO is below log p(x) on every example (here its gap KL(q || posterior) is the same for all x)
    assert bool((elbo < log_p).all())
    elbo_gap = float((log_p - elbo).mean())
    assert elbo_gap > 0.1
    assert abs(gaps[1] - elbo_gap) < 0.05
    assert gaps[1] > gaps[10] > gaps[100] > gaps[1000] > -0.005, gaps
    assert gaps[1000] < 0.01 and gaps[1000] < elbo_gap / 20, gaps


def test_trained_encoder_closes_the_gap_from_below():
    """1-D latent and data: the exact posterior is Gaussian with a mean linear in x, so the
    encoder can match it; training it alone on the ELBO drives ELBO -> log p(x), never above."""
    torch.manual_seed(0)
    w, b = torch.tensor([[1.5]], dtype=torch.float64), torch.tensor([0.2], dtype=torch.float64)
    model, cov = _linear_gaussian(1, w, b, math.log(0.5))
    for prm in model.decoder.parameters():
        prm.requires_grad_(False)
    p = torch.distributions.MultivariateNormal(b, cov)
    opt = torch.optim.Adam(model.encoder.parameters(), lr=0.05)
    x_test = p.sample((500,))
    log_p = p.log_prob(x_test)
    with torch.no_grad():
        before = float((log_p - model.elbo(x_test, samples=500)[0]).mean())
    for _ in range(300):
        loss = -model.elbo(p.sample((256,)))[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = log_p - model.elbo(x_test, samples=2000)[0]
        iw = float((log_p - model.iwae(x_test, 100)).mean())
    assert before > 0.3
    assert -0.005 < float(after.mean()) < 0.01
    assert abs(iw) < 0.01


# -- the image likelihood is a density on [0, 1] ---------------------------------------------------
def test_logit_gaussian_decoder_is_a_density_on_the_unit_interval():
    model = vae(event_shape=[1, 1, 1], arch="mlp", latent=1, hidden=[]).double()
    assert model.likelihood == "logit_gaussian"
    with torch.no_grad():
        model.decoder[-1].bias.copy_(torch.tensor([0.7, -0.3], dtype=torch.float64))
    y = torch.linspace(0, 1, 200001, dtype=torch.float64).reshape(-1, 1, 1, 1)
    t, ladj = model.encoder_input(y)
    with torch.no_grad():
        density = model._log_px_z(t, ladj, torch.zeros(1, len(y), 1, dtype=torch.float64), None)[0].exp()
    mass = float(torch.trapezoid(density, y.reshape(-1)))
    with torch.no_grad():
        loc, log_scale = model.decode(torch.zeros(1, 1, dtype=torch.float64))
    normal = torch.distributions.Normal(loc.reshape(()), log_scale.exp().reshape(()))
    lo, hi = math.log(0.05 / 0.95), math.log(0.95 / 0.05)  # logit(alpha), logit(1 - alpha)
    with torch.no_grad():
        expected = float(normal.cdf(torch.tensor(hi, dtype=torch.float64))
                         - normal.cdf(torch.tensor(lo, dtype=torch.float64)))
    assert abs(mass - expected) < 1e-6 and mass <= 1


# -- the recipe, save/load, fit and the CLI ------------------------------------------------------
def test_recipe_records_itself_and_save_load_round_trip(tmp_path):
    model = models.build({"recipe": "vae",
                          "kwargs": {"event_shape": [1, 8, 8], "hidden_channels": 8, "k": 4}})
    assert isinstance(model, VAE) and model.recipe["recipe"] == "vae" and model.k == 4
    _perturb(model, 0.5)
    pushforward.save(model, tmp_path / "v.safetensors")
    again = pushforward.load(tmp_path / "v.safetensors")
    x = torch.rand(3, 1, 8, 8)
    torch.manual_seed(1)
    a = model.log_prob(x)
    torch.manual_seed(1)
    assert torch.equal(a, again.log_prob(x))


def test_fit_trains_a_vae():
    from pushforward.train import fit

    torch.manual_seed(0)
    model = vae(event_shape=[2], hidden=[32, 32])
    x = toy_sample("8gaussians", 2000, seed=0)
    val = toy_sample("8gaussians", 500, seed=1)
    with torch.no_grad():
        before = float(-model.elbo(val, samples=20)[0].mean())
    hist = fit(model, x, val, {"max_steps": 150, "batch_size": 200, "lr": 3e-3, "warmup_steps": 10,
                               "val_every": 50, "progress": False, "patience": 0, "threads": 1})
    with torch.no_grad():
        after = float(-model.elbo(val, samples=20)[0].mean())
    assert len(hist.rows) == 3 and after < before - 0.2, (before, after)


def test_cli_train_eval_sample_digits_vae(tmp_path, capsys):
    run = tmp_path / "v"
    tiny = ["--data", "digits", "--recipe", "vae", "--no-progress", "--set", "model.hidden_channels=8",
            "--set", "batch_size=32", "--set", "warmup_steps=2", "--set", "max_train=256"]
    assert main(["train", *tiny, "--run-dir", str(run), "--max-steps", "16", "--set", "val_every=8"]) == 0
    assert main(["train", "--resume", "--run-dir", str(run), "--max-steps", "24", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [8, 16, 24] and all("val_bpd" in r for r in rows)
    assert main(["eval", str(run)]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert (result["bound"] == "negative ELBO" and math.isfinite(result["bpd"])
            and "max_reconstruction_error" not in result)
    assert "negative ELBO" in capsys.readouterr().out
    assert main(["sample", str(run), "--n", "16"]) == 0 and png(run / "samples.png")


# -- pushforward compare ------------------------------------------------------------------------------
def test_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--data", "moons", "--run-dir", str(out), "--max-steps", "30", "--no-progress",
            "--set", "n_train=600", "--set", "n_val=200", "--set", "n_test=300", "--set", "batch_size=100",
            "--set", "warmup_steps=5", "--set", "val_every=15", "--flow-set", "model.layers=2",
            "--flow-set", "model.hidden=[16,16]",
            "--ks", "1,10,100", "--eval-n", "150"]
    assert main(args) == 0
    for name in ("report.md", "compare.json", "samples.png", "bound.png"):
        assert (out / name).exists(), name
    assert png(out / "samples.png") and png(out / "bound.png")
    result = json.loads((out / "compare.json").read_text())
    s = result["scores"]
    assert result["n_eval"] == 150 and result["ks"] == [1, 10, 100]
    flow_parameters = result["flow"]["parameters"]
    assert abs(result["vae"]["parameters"] - flow_parameters) < 0.1 * flow_parameters
    assert result["flow"]["steps"] == result["vae"]["steps"] == 30
    for key in ("flow_nll", "neg_elbo", "neg_iwae_1", "neg_iwae_100", "true_nll"):
        assert math.isfinite(s[key]["nats"]), key
    assert s["flow_nll"]["nats"] > s["true_nll"]["nats"] - 0.5
    report = (out / "report.md").read_text()
    assert "-IWAE k=100" in report and "![bound](bound.png)" in report
    # a second run that reuses both trained models only scores them
    again = tmp_path / "again"
    assert main(["compare", "--data", "moons", "--run-dir", str(again), "--flow", str(out / "flow"),
                 "--vae", str(out / "vae"), "--ks", "1,10", "--eval-n", "100", "--no-progress"]) == 0
    assert json.loads((again / "compare.json").read_text())["vae"]["steps"] == 30
    # reusing the wrong kind of run, or retraining into an existing one, is a clear error
    capsys.readouterr()
    assert main(["compare", "--data", "moons", "--run-dir", str(again), "--flow", str(out / "vae"),
                 "--no-progress"]) == 2
    assert "not a flow" in capsys.readouterr().err
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_compare_digits_images_in_bits_per_dim(tmp_path):
    out = tmp_path / "d"
    assert main(["compare", "--data", "digits", "--run-dir", str(out), "--max-steps", "10", "--no-progress",
                 "--set", "max_train=128", "--set", "batch_size=32", "--set", "warmup_steps=2",
                 "--set", "val_every=5",
                 "--flow-set", "model.hidden_channels=8", "--ks", "1,10", "--eval-n", "40"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["levels"] == 17 and result["vae"]["arch"] == "conv"
    for key in ("flow_nll", "neg_elbo", "neg_iwae_10"):
        assert 0 < result["scores"][key]["bpd"] < 10
    assert png(out / "samples.png") and png(out / "bound.png")


def test_compare_matched_wall_clock(tmp_path):
    out = tmp_path / "t"
    assert main(["compare", "--data", "moons", "--run-dir", str(out), "--match", "time", "--minutes", "0.04",
                 "--no-progress", "--set", "n_train=600", "--set", "n_val=200", "--set", "n_test=200",
                 "--set", "batch_size=100", "--set", "warmup_steps=5", "--flow-set", "model.layers=2",
                 "--flow-set", "model.hidden=[16,16]", "--vae-set", "model.hidden=[16,16]", "--ks", "1,10",
                 "--eval-n", "100"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["match"] == "time" and "wall-clock" in result["match_description"]
    for who in ("flow", "vae"):  # each trained for about its budget (calibrated steps, then the time limit)
        assert result[who]["steps"] >= 1 and result[who]["train_seconds"] < 60
