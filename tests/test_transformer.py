"""Transformer flows (TarFlow, Jet) and the training options they brought: the key-value cache, the causal
structure, patch layout, classifier-free guidance, EMA, noise augmentation with denoising, label dropout."""

from __future__ import annotations

import pytest
import torch

from pushforward import models
from pushforward.checkpoint import read_state
from pushforward.config import config_from_dict
from pushforward.data.images import ImageData
from pushforward.nn import CausalTransformer, ViT, classifier_free_guidance
from pushforward.objectives import (
    NLL,
    Batch,
    NoiseAugmentation,
    Objective,
    UniformDequantization,
    denoise,
    with_noise,
)
from pushforward.train import fit
from pushforward.transforms import Autoregressive, Patchify

torch.set_num_threads(1)


def _perturbed(flow, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow


def _tarflow(**kw):
    torch.manual_seed(0)
    kw = {"patch_size": 2, "channels": 16, "blocks": 2, "layers_per_block": 2, "heads": 2, "logit": False,
          **kw}
    return _perturbed(models.tarflow((1, 4, 6), **kw).double())


def test_cached_inverse_equals_uncached_and_reads_one_token_per_step():
    flow = _tarflow(context_features=3)
    z = torch.randn(5, 1, 4, 6, dtype=torch.float64)
    c = torch.randn(5, 3, dtype=torch.float64)
    blocks = [m for m in flow.modules() if isinstance(m, Autoregressive)]
    seen: list[int] = []
    hooks = [b.net.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-2])) for b in blocks]
    x_cached, ladj_cached = flow.transform.inverse(z, c)
    assert set(seen) == {1} and len(seen) == 2 * 6  # one token per step, 6 tokens, 2 blocks
    seen.clear()
    for b in blocks:
        b.use_cache = False
    x_full, ladj_full = flow.transform.inverse(z, c)
    assert set(seen) == {6}  # the uncached inverse reads the whole sequence at every step
    for h in hooks:
        h.remove()
    torch.testing.assert_close(x_cached, x_full, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ladj_cached, ladj_full, atol=1e-12, rtol=1e-12)
    zz, ladj = flow.transform(x_cached, c)  # and both invert the forward pass
    torch.testing.assert_close(zz, z, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ladj, -ladj_cached, atol=1e-10, rtol=1e-10)


def test_causal_transformer_output_n_depends_on_tokens_before_n_only():
    torch.manual_seed(0)
    net = _perturbed(CausalTransformer(3, 6, 2, tokens=5, width=8, layers=2, heads=2).double(), 0.3)
    x = torch.randn(5, 3, dtype=torch.float64)
    c = torch.randn(2, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: net(v[None], c[None])[0], x)  # (5, 6, 5, 3)
    depends = jac.abs().sum(dim=(1, 3)) > 0  # output token n on input token m
    torch.testing.assert_close(depends, torch.ones(5, 5).tril(-1).bool(), atol=0, rtol=0)
    # the first token's parameters still move with the context (through the start token's position)
    out = net(x[None], c[None])
    assert (net(x[None], (c + 1)[None])[0, 0] != out[0, 0]).all()


def test_vit_sees_every_token():
    torch.manual_seed(0)
    net = _perturbed(ViT(3, 4, tokens=4, width=8, layers=1, heads=2).double(), 0.3)
    x = torch.randn(4, 3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: net(v[None])[0], x)
    assert (jac.abs().sum(dim=(1, 3)) > 0).all()


def test_patchify_layout():
    x = torch.arange(2 * 4 * 4.0).reshape(1, 2, 4, 4)
    z, ladj = Patchify((2, 4, 4), 2)(x)
    assert z.shape == (1, 4, 8) and (ladj == 0).all()
    # token 1 is the top-right 2x2 patch; its features are (row, column, channel) within the patch
    expected = torch.tensor([x[0, ch, r, 2 + col] for r in range(2) for col in range(2) for ch in range(2)])
    torch.testing.assert_close(z[0, 1], expected)
    with pytest.raises(ValueError, match="divides the height and width"):
        Patchify((1, 5, 4), 2)


@pytest.mark.parametrize("recipe", ["tarflow", "jet"])
def test_guidance_is_a_flow_and_moves_samples(recipe):
    torch.manual_seed(0)
    kw = {"patch_size": 2, "channels": 8, "heads": 2, "context_features": 3, "logit": False}
    flow = models.tarflow((1, 4, 4), blocks=2, **kw) if recipe == "tarflow" else models.jet((1, 4, 4), **kw)
    flow = _perturbed(flow.double(), 0.2)
    c = torch.eye(3, dtype=torch.float64)
    torch.manual_seed(5)
    plain = flow.sample(2, c)
    with classifier_free_guidance(flow, 2.0):
        torch.manual_seed(5)
        guided, log_p = flow.sample_and_log_prob(2, c)
        # the guided model is itself a flow: its log_prob at its own samples is what sampling returned
        torch.testing.assert_close(flow.log_prob(guided, c.expand(2, 3, 3)), log_p, atol=1e-8, rtol=1e-8)
    assert not torch.allclose(guided, plain)
    torch.manual_seed(5)
    torch.testing.assert_close(flow.sample(2, c), plain, atol=0, rtol=0)  # the setting was restored
    with classifier_free_guidance(flow, 0.0):
        torch.manual_seed(5)
        torch.testing.assert_close(flow.sample(2, c), plain, atol=0, rtol=0)
    glow = models.glow((1, 4, 4))
    with pytest.raises(ValueError, match="class-conditional"), classifier_free_guidance(glow, 1.0):
        pass


def test_noise_augmentation_trains_noisy_and_reports_clean():
    flow = _tarflow(logit=False)
    x = torch.randint(0, 17, (6, 1, 4, 6))
    batch = Batch(x)
    clean = UniformDequantization(17)
    noisy = with_noise(clean, 0.05)
    assert isinstance(noisy, UniformDequantization) and isinstance(noisy.objective, NoiseAugmentation)
    def g():
        return torch.Generator().manual_seed(3)

    torch.testing.assert_close(noisy.evaluate(flow, batch, g())["loss"],
                               clean.evaluate(flow, batch, g())["loss"])
    assert not torch.allclose(noisy.loss(flow, batch, g()), clean.loss(flow, batch, g()))
    with pytest.raises(ValueError, match="sigma > 0"):
        NoiseAugmentation(0.0)
    assert with_noise(NLL(), 0.0).__class__ is NLL


def test_denoise_is_one_step_along_the_score():
    torch.manual_seed(0)
    flow = models.tarflow((1, 4, 4), patch_size=2, channels=8, blocks=1, heads=2, logit=False).double()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    # a new TarFlow is the identity, so p is the standard normal and the score is -x
    torch.testing.assert_close(denoise(flow, x, 0.3), x * (1 - 0.09))


class _Recorder(Objective):
    def __init__(self, inner: Objective):
        self.inner, self.levels, self.contexts = inner, inner.levels, []

    def loss(self, model, batch, generator):
        if batch.context is not None and torch.is_grad_enabled():
            self.contexts.append(batch.context.clone())
        return self.inner.loss(model, batch, generator)


def _digits(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageData(torch.randint(0, 17, (n, 1, 4, 4), generator=g), torch.arange(n) % 10, 17)


def test_label_drop_zeroes_that_share_of_labels():
    torch.manual_seed(0)
    flow = models.tarflow((1, 4, 4), patch_size=2, channels=8, blocks=1, heads=2, context_features=10)
    config = config_from_dict({"data": "digits", "condition": "label", "label_drop": 0.3, "batch_size": 32,
                               "max_steps": 20, "val_every": 20, "progress": False, "patience": 0})
    recorder = _Recorder(UniformDequantization(17))
    fit(flow, _digits(), _digits(16, 1), config, objective=recorder)
    contexts = torch.cat(recorder.contexts)
    dropped = contexts.sum(-1) == 0
    assert 0.2 < float(dropped.float().mean()) < 0.4
    assert (contexts[~dropped].sum(-1) == 1).all()  # the others keep their one-hot labels
    config.label_drop = 0.3
    with pytest.raises(ValueError, match="class-conditional"):
        fit(flow, _digits(), _digits(16, 1), config_from_dict({**config.to_dict(), "condition": ""}))


def test_ema_weights_are_validated_saved_and_checkpointed(tmp_path):
    torch.manual_seed(0)
    flow = models.tarflow((1, 4, 4), patch_size=2, channels=8, blocks=1, heads=2)
    config = config_from_dict({"data": "digits", "ema": 0.9, "batch_size": 16, "max_steps": 12,
                               "val_every": 12,
                               "progress": False, "patience": 0, "lr": 1e-2, "warmup_steps": 1,
                               "run_dir": str(tmp_path / "run")})
    names = [n for n, p in flow.named_parameters()]
    live: list[dict[str, torch.Tensor]] = []
    def record(step, loss, model):
        live.append({n: p.detach().clone() for n, p in model.named_parameters()})

    fit(flow, _digits(), _digits(16, 1), config, callback=record)
    average = dict(live[0])
    for t, w in enumerate(live[1:], start=1):
        d = min(0.9, (1 + t) / (10 + t))
        average = {n: d * average[n] + (1 - d) * w[n] for n in names}
    final = dict(flow.named_parameters())  # restore_best: the best (only) validation's weights
    for n in names:
        torch.testing.assert_close(final[n].detach(), average[n], atol=1e-6, rtol=1e-5, msg=n)
    assert not torch.allclose(final["transform.transforms.2.net.head.weight"],
                              live[-1]["transform.transforms.2.net.head.weight"])
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "run" / "checkpoint" / "state.safetensors"))
    assert sum(k.endswith(".ema") for k in state) == len(names)
    assert read_state(tmp_path / "run")["step"] == 12


def test_tarflow_trains_and_samples_from_the_cli(tmp_path):
    from pushforward.cli import main

    run = tmp_path / "run"
    common = ["--set", "model.patch_size=2", "--set", "model.channels=8", "--set", "model.blocks=1",
              "--set", "model.heads=2", "--set", "model.logit=false"]
    assert main(["train", "--data", "digits", "--recipe", "tarflow", "--condition", "label", *common,
                 "--set", "noise=0.02", "--set", "ema=0.9", "--set", "label_drop=0.2",
                 "--set", "max_train=128",
                 "--max-steps", "4", "--run-dir", str(run), "--no-progress"]) == 0
    assert main(["sample", str(run), "--n", "10", "--guidance", "1.0"]) == 0
    assert (run / "samples_cfg1.png").exists()
