"""The training loop: it learns, it resumes exactly, and it fails loudly and safely."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from pushforward import models
from pushforward.checkpoint import load_checkpoint, read_state
from pushforward.config import TrainConfig, config_from_dict, parse_overrides, resolve_config
from pushforward.data.toy import toy_sample
from pushforward.io import load
from pushforward.train import NonFiniteLossError, evaluate, fit, lr_at

torch.set_num_threads(1)


def small_flow(seed: int = 0):
    torch.manual_seed(seed)
    return models.realnvp(2, layers=4, hidden=(32, 32))


def small_config(tmp_path, **kw) -> TrainConfig:
    values = {"data": "moons", "batch_size": 128, "lr": 3e-3, "warmup_steps": 20, "max_steps": 60,
              "val_every": 20,
              "patience": 0, "progress": False, "seed": 3, "run_dir": str(tmp_path / "run"), "clip": 5.0}
    values.update(kw)
    return config_from_dict(values)


@pytest.fixture(scope="module")
def moons():
    return (toy_sample("moons", 2000, seed=0), toy_sample("moons", 500, seed=1),
            toy_sample("moons", 2000, seed=2))


def gaussian_nll(train, test) -> float:
    """NLL of the test data under the maximum-likelihood Gaussian of the training data."""
    g = torch.distributions.MultivariateNormal(train.double().mean(0), torch.cov(train.double().T))
    return float(-g.log_prob(test.double()).mean())


def test_training_beats_the_best_gaussian(tmp_path, moons):
    train, val, test = moons
    flow = small_flow()
    before = evaluate(flow, test, reconstruction=False)["nll"]
    history = fit(flow, train, val, small_config(tmp_path, max_steps=400, val_every=100, lr=5e-3))
    after = evaluate(flow, test)
    bound = gaussian_nll(train, test)
    assert history.stop_reason == "completed" and history.step == 400
    assert after["nll"] < bound - 0.1 < before, (after, bound, before)
    assert after["max_reconstruction_error"] < 1e-4 and after["finite"]
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [100, 200, 300, 400]
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("step,epoch,train_nll,val_nll")
    best = load(run / "best.safetensors")  # the best weights are what fit left in the flow
    assert torch.equal(best.log_prob(test[:50]), flow.log_prob(test[:50]))


def weights(path) -> dict[str, torch.Tensor]:
    return load(path / "checkpoint" / "model.safetensors").state_dict()


def test_resume_equals_uninterrupted(tmp_path, moons):
    train, val, _ = moons
    # 2000 / 128 = 15 steps per epoch, so the interruption at step 23 is in the middle of epoch 1.
    config_a = small_config(tmp_path / "a", max_steps=46, val_every=0)
    fit(small_flow(), train, val, config_a)

    def stop_at_23(step, loss, flow):
        if step == 23:
            raise KeyboardInterrupt

    config_b = small_config(tmp_path / "b", max_steps=46, val_every=0)
    history = fit(small_flow(), train, val, config_b, callback=stop_at_23)
    assert history.stop_reason == "interrupted" and history.step == 23
    assert read_state(tmp_path / "b" / "run")["step"] == 23
    # fit uses the fused Adam kernel, and a resumed run keeps it (the flag travels in the checkpoint)
    assert [g["fused"] for g in read_state(tmp_path / "b" / "run")["optimizer"]["param_groups"]] == [True]
    # the initialisation is overwritten by the checkpoint
    resumed = fit(small_flow(seed=99), train, val, config_b, resume=True)
    assert resumed.step == 46 and resumed.stop_reason == "completed"
    wa, wb = weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)
    rows_a = read_state(tmp_path / "a" / "run")["history"]
    rows_b = read_state(tmp_path / "b" / "run")["history"]
    assert [r["val_nll"] for r in rows_a] == pytest.approx([r["val_nll"] for r in rows_b], abs=1e-6)
    assert [r["train_nll"] for r in rows_a] == pytest.approx([r["train_nll"] for r in rows_b], abs=1e-5)


def test_sigint_saves_a_checkpoint_then_stops(tmp_path, moons):
    train, val, _ = moons

    def ctrl_c(step, loss, flow):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)  # the handler finishes the step, saves and stops

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the tests run as a background job
    history = fit(small_flow(), train, val, small_config(tmp_path), callback=ctrl_c)
    assert history.stop_reason == "interrupted" and history.step == 7
    assert read_state(tmp_path / "run")["step"] == 7
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is restored


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, moons):
    train, val, _ = moons
    run = tmp_path / "run"

    def poison(step, loss, flow):
        if step == 30:  # after the checkpoint at step 20
            with torch.no_grad():
                next(flow.parameters()).fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="step 31") as error:
        fit(small_flow(), train, val, small_config(tmp_path), callback=poison)
    assert f"the last intact checkpoint is {run / 'checkpoint'} (step 20)" in str(error.value)
    state = read_state(run)
    assert state["step"] == 20
    flow = small_flow()
    load_checkpoint(run, flow)  # hashes verify: untouched
    assert all(torch.isfinite(p).all() for p in flow.parameters())


def test_nan_validation_is_reported_too(tmp_path, moons):
    train, val, _ = moons

    def poison(step, loss, flow):
        if step == 20:  # right before the validation at step 20
            with torch.no_grad():
                next(flow.parameters()).fill_(float("inf"))

    with pytest.raises(NonFiniteLossError, match="after step 20") as error:
        fit(small_flow(), train, val, small_config(tmp_path), callback=poison)
    assert not (tmp_path / "run" / "checkpoint").exists()
    # the message promises only what exists (it said "the last good checkpoint ... is untouched")
    assert "no checkpoint has been written" in str(error.value) and "untouched" not in str(error.value)


def test_corrupted_checkpoint_is_a_clear_error(tmp_path, moons):
    train, val, _ = moons
    fit(small_flow(), train, val, small_config(tmp_path, max_steps=20))
    ckpt = tmp_path / "run" / "checkpoint"
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors.*corrupted"):
        load_checkpoint(tmp_path / "run", small_flow())
    (ckpt / "state.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"state\.json.*corrupted"):
        load_checkpoint(tmp_path / "run", small_flow())


def test_checkpoint_of_another_architecture_is_rejected(tmp_path, moons):
    train, val, _ = moons
    fit(small_flow(), train, val, small_config(tmp_path, max_steps=20))
    with pytest.raises(ValueError, match="different flow"):
        load_checkpoint(tmp_path / "run", models.realnvp(2, layers=2, hidden=(8,)))


def test_existing_run_needs_resume(tmp_path, moons):
    train, val, _ = moons
    config = small_config(tmp_path, max_steps=20)
    fit(small_flow(), train, val, config)
    with pytest.raises(FileExistsError, match="resume"):
        fit(small_flow(), train, val, config)


def test_early_stopping_and_time_budget(tmp_path, moons):
    train, val, _ = moons
    # lr = 1e-30 moves no weight by a float32 step (lr = 0 is refused): it never improves on the first
    # validation, so patience 2 stops at the third.
    config = small_config(tmp_path / "a", lr=1e-30, patience=2, max_steps=200, val_every=10)
    h = fit(small_flow(), train, val, config)
    assert h.stop_reason == "early_stopping" and h.step == 30 and h.best_step == 10
    h = fit(small_flow(), train, val, small_config(tmp_path / "b", max_minutes=1e-6, max_steps=1000))
    assert h.stop_reason == "time" and h.step == 1 and read_state(tmp_path / "b" / "run")["step"] == 1


def test_in_memory_training_writes_nothing(tmp_path, moons, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train, val, _ = moons
    h = fit(small_flow(), train, val, small_config(tmp_path, run_dir="", max_steps=20))
    assert h.run_dir is None and len(h.rows) == 1 and list(tmp_path.iterdir()) == []


def test_learning_rate_schedule():
    c = TrainConfig(lr=1.0, lr_min=0.1, warmup_steps=10)
    assert lr_at(0, c, 110) == pytest.approx(0.1)
    assert lr_at(9, c, 110) == pytest.approx(1.0)
    assert lr_at(60, c, 110) == pytest.approx(0.55)
    assert lr_at(110, c, 110) == pytest.approx(0.1)


def test_config_typo_lists_the_valid_keys():
    with pytest.raises(ValueError, match=r"'batchsize'.*valid keys are: data, recipe, model, batch_size"):
        resolve_config({"batchsize": 3})
    with pytest.raises(ValueError, match="must be an integer"):
        config_from_dict({"epochs": "many"})
    with pytest.raises(ValueError, match="arguments are: features, layers, hidden"):
        from pushforward.config import model_kwargs

        model_kwargs(resolve_config({}, {"model": {"hiden": [3]}}), (2,))


def test_config_layers_and_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('data = "digits"\nrecipe = "glow"\nlr = 3e-4\n[model]\nhidden_channels = 16\n')
    from pushforward.config import load_toml

    c = resolve_config(load_toml(toml), parse_overrides(["epochs=2", "model.steps=2", "progress=false"]))
    assert (c.data, c.recipe, c.lr, c.epochs, c.progress) == ("digits", "glow", 3e-4, 2, False)
    assert c.model == {"levels": 2, "steps": 2, "hidden_channels": 16}
    assert resolve_config({"data": "digits"}).model == {"levels": 2, "hidden_channels": 32, "blocks": 1}
    c = resolve_config({}, parse_overrides(["data=8gaussians", "recipe=nice"]))
    assert c.recipe == "nice" and c.batch_size == 512
    assert math.isclose(resolve_config({}, {}).lr, 2e-3)


def test_resume_equals_uninterrupted_for_images(tmp_path):
    """Glow on dequantized digits: ActNorm's data-dependent init and the per-batch noise resume exactly."""
    from pushforward.data import load_digits

    data = load_digits("train").subset(torch.arange(256))
    val = load_digits("val")

    def glow():
        torch.manual_seed(0)
        return models.glow((1, 8, 8), levels=2, steps=1, hidden_channels=4)

    def config(name):
        return small_config(tmp_path / name, data="digits", batch_size=32, max_steps=12, val_every=0)

    fit(glow(), data, val, config("a"))

    def stop(step, loss, flow):
        if step == 5:
            raise KeyboardInterrupt

    assert fit(glow(), data, val, config("b"), callback=stop).step == 5
    h = fit(glow(), data, val, config("b"), resume=True)
    assert h.step == 12 and "val_bpd" in h.rows[-1]
    wa, wb = weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)


def test_a_crash_between_the_renames_falls_back_to_the_previous_checkpoint(tmp_path, moons):
    train, val, _ = moons
    config = small_config(tmp_path, max_steps=40)
    fit(small_flow(), train, val, config)
    run = tmp_path / "run"
    (run / "checkpoint").rename(run / ".checkpoint-old")  # the state right after the first rename
    (run / ".checkpoint-tmp-dead").mkdir()  # and a half-written directory of a killed process
    assert read_state(run)["step"] == 40
    h = fit(small_flow(), train, val, small_config(tmp_path, max_steps=60), resume=True)
    assert h.step == 60 and read_state(run)["step"] == 60
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".", "check"))) == ["checkpoint"]
