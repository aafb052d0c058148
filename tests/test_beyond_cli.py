"""Beyond the basics, from the command line: variational dequantization, class-conditional image
models and tabular density estimation with NSF (tiny runs, seconds each)."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from pushforward.cli import main
from pushforward.experiment import load_dataset, open_run
from pushforward.runs import eval_run
from pushforward.train import evaluate

torch.set_num_threads(1)

TINY_DIGITS = ["--data", "digits", "--no-progress", "--set", "model.hidden_channels=8",
               "--set", "batch_size=32", "--set", "warmup_steps=2", "--set", "max_train=128",
               "--set", "lr=3e-3"]


def png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_variational_dequantization_trains_and_its_checkpoint_round_trips(tmp_path, capsys):
    run = tmp_path / "vd"
    assert main(["train", *TINY_DIGITS, "--dequantization", "variational", "--set", "dequantizer.layers=2",
                 "--set", "dequantizer.hidden_channels=8", "--run-dir", str(run), "--max-steps", "16",
                 "--set", "val_every=8"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the validation bound -log p(y) + log q(u|x) decreases as flow and q(u|x) train together
    assert rows[-1]["val_nll"] < rows[0]["val_nll"] - 1.0
    assert all("val_log_q" in r for r in rows)
    config = json.loads((run / "config.json").read_text())
    assert config["flow"]["recipe"] == "dequantized" and config["train"]["dequantization"] == "variational"

    first = eval_run(run)
    assert first["dequantization"] == "variational" and first["levels"] == 17
    assert math.isfinite(first["bpd"]) and math.isfinite(first["uniform_bpd"]) and first["bpd_stderr"] > 0
    # the bound is bits/dim of nll = -log p(y) + log q, by the one formula
    assert abs(first["bpd"] - (first["nll"] / 64 + math.log(17)) / math.log(2)) < 1e-9
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert "variational bound" in capsys.readouterr().out
    second = json.loads((run / "eval.json").read_text())
    for key in ("nll", "bpd", "uniform_nll", "uniform_bpd", "log_q"):
        assert second[key] == first[key], key  # reloaded from best.safetensors: identical numbers
    # the dequantizer is part of the saved weights, also in the resumable checkpoint
    reopened = open_run(run, checkpoint=True)
    assert any(k.startswith("dequantizer.") for k in reopened.flow.state_dict())
    again = evaluate(reopened.flow, load_dataset(reopened.config).test, seed=reopened.config.seed)
    assert again["nll"] == eval_run(run / "checkpoint")["nll"]
    # an unconditional run has no labels to sample
    assert main(["sample", str(run), "--label", "3", "--n", "4"]) == 2
    assert "--condition label" in capsys.readouterr().err


def test_class_conditional_training_sampling_and_eval(tmp_path, capsys):
    run = tmp_path / "cond"
    assert main(["train", *TINY_DIGITS, "--recipe", "glow", "--set", "model.steps=1",
                 "--set", "model.levels=1", "--condition", "label", "--run-dir", str(run),
                 "--max-steps", "20", "--set", "val_every=20"]) == 0
    assert main(["eval", str(run)]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert "label" in result["conditional"] and math.isfinite(result["bpd"]) and result["n"] == 180
    assert main(["sample", str(run), "--label", "3", "--n", "12"]) == 0
    assert png(run / "samples_label3.png")
    assert main(["sample", str(run), "--n", "20"]) == 0  # one row per class, 2 samples each
    assert png(run / "samples.png")
    assert main(["sample", str(run), "--label", "10"]) == 2
    assert "[0, 9]" in capsys.readouterr().err

    flow = open_run(run).flow
    assert flow.recipe["kwargs"]["context_features"] == 10
    onehot = torch.nn.functional.one_hot(torch.arange(10), 10).float()
    with torch.no_grad():
        assert flow.sample(5, context=onehot[3]).shape == (5, 1, 8, 8)
        assert flow.sample(2, context=onehot).shape == (2, 10, 1, 8, 8)
        x = torch.rand(4, 1, 8, 8)
        lp = flow.log_prob(x[:, None], context=onehot)  # (4, 10): every image under every label
    assert lp.shape == (4, 10)
    assert (lp.max(1).values - lp.min(1).values).min() > 1e-3  # the label changes the density


def test_tabular_csv_defaults_to_the_tabular_recipe_and_reports_both_spaces(tmp_path):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 3, generator=g)
    x = torch.cat([z[:, :1] * 50 + 10, torch.sinh(z[:, 1:2]) * 0.01, z[:, 2:] + z[:, :1] ** 2], dim=1)
    csv = tmp_path / "table.csv"
    csv.write_text("a,b,c\n" + "\n".join(",".join(f"{v:.6g}" for v in row) for row in x.tolist()))
    run = tmp_path / "table"
    assert main(["train", "--data", str(csv), "--run-dir", str(run), "--max-steps", "10", "--no-progress",
                 "--set", "model.hidden=[16]"]) == 0
    config = json.loads((run / "config.json").read_text())
    # the Gaussian then autoregressive splines, sized to the 400 training rows (data.tabular.sized_defaults)
    assert config["flow"]["recipe"] == "tabular" and config["flow"]["kwargs"]["bins"] == 8
    assert config["flow"]["kwargs"]["layers"] == 3 and config["flow"]["kwargs"]["hidden"] == [16]
    result = eval_run(run)
    assert result["space"] == "standardised" and result["n"] == 50
    assert result["nll_stderr"] > 0 and result["nll_original_stderr"] == result["nll_stderr"]
    std = np.asarray(load_dataset(open_run(run).config).info["std"], dtype=np.float64)
    assert abs(result["nll_original"] - result["nll"] - np.log(std).sum()) < 1e-9
    assert "standardised" in result["note"] and "original" in result["note"]


def test_variational_conditional_run_resumes_exactly(tmp_path):
    from pushforward.config import resolve_config
    from pushforward.experiment import build_flow
    from pushforward.train import fit

    def config(run):
        return resolve_config({}, {
            "data": "digits", "dequantization": "variational", "condition": "label", "max_train": 64,
            "batch_size": 32, "warmup_steps": 2, "max_steps": 8, "val_every": 4, "progress": False,
            "model": {"hidden_channels": 4}, "dequantizer": {"layers": 2, "hidden_channels": 4},
            "run_dir": str(run)})

    c = config(tmp_path / "straight")
    ds = load_dataset(c)
    straight = build_flow(c, ds)
    fit(straight, ds.train, ds.val, c)

    def stop_at_4(step, loss, flow):
        if step == 4:
            raise KeyboardInterrupt

    c = config(tmp_path / "resumed")
    assert fit(build_flow(c, ds), ds.train, ds.val, c, callback=stop_at_4).stop_reason == "interrupted"
    resumed = build_flow(c, ds)
    fit(resumed, ds.train, ds.val, c, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the dequantizer's noise and weights continue exactly
