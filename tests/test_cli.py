"""The command line end to end on tiny data: train, resume, eval, sample, plot, and its errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from pushforward.cli import main

torch.set_num_threads(1)

TINY_2D = ["--data", "moons", "--no-progress", "--set", "n_train=1000", "--set", "n_val=200", "--set", "n_test=300",
           "--set", "model.layers=2", "--set", "model.hidden=[16,16]", "--set", "batch_size=100",
           "--set", "warmup_steps=5"]
TINY_DIGITS = ["--data", "digits", "--no-progress", "--set", "model.hidden_channels=8",
               "--set", "batch_size=32", "--set", "warmup_steps=2", "--set", "max_train=256"]


def png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_train_eval_sample_plot_2d(tmp_path, capsys):
    run = tmp_path / "moons"
    assert main(["train", *TINY_2D, "--run-dir", str(run), "--max-steps", "30", "--set", "val_every=10"]) == 0
    assert {"best.safetensors", "checkpoint", "config.json", "metrics.jsonl", "metrics.csv"} <= {
        p.name for p in run.iterdir()}
    assert main(["eval", str(run)]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["n"] == 300 and math.isfinite(result["nll"]) and 0 < result["nll_stderr"] < 1
    assert result["max_reconstruction_error"] < 1e-4
    assert "NLL" in capsys.readouterr().out
    assert main(["sample", str(run), "--n", "200", "--temperature", "0.8", "--out", str(tmp_path / "s.png")]) == 0
    assert png(tmp_path / "s.png")
    assert main(["plot", str(run)]) == 0 and png(run / "curves.png")
    # eval also accepts a checkpoint directory or a weights file
    assert main(["eval", str(run / "checkpoint")]) == 0
    assert main(["eval", str(run / "best.safetensors"), "--split", "val"]) == 0
    assert json.loads((run / "eval.json").read_text())["n"] == 200


def test_time_budget_then_resume(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", *TINY_2D, "--run-dir", str(run), "--max-steps", "20", "--max-minutes", "1e-6"]) == 0
    assert "stopped (time) at step 1" in capsys.readouterr().out
    assert main(["train", "--resume", "--run-dir", str(run), "--set", "max_minutes=0", "--no-progress"]) == 0
    assert "stopped (completed) at step 20" in capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 10, 20]  # 1000 / 100 = 10 steps per epoch
    # a second plain `train` into the same directory refuses to clobber it
    assert main(["train", *TINY_2D, "--run-dir", str(run), "--max-steps", "20"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", *TINY_2D, "--run-dir", str(run), "--max-steps", "10", "--overwrite"]) == 0


def test_digits_bits_per_dim_samples_and_interpolation(tmp_path):
    run = tmp_path / "digits"
    assert main(["train", *TINY_DIGITS, "--run-dir", str(run), "--max-steps", "8"]) == 0
    assert main(["eval", str(run)]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["levels"] == 17 and result["dims"] == 64
    # a barely trained flow is still a proper density: bits/dim is finite and near the uniform log2(17)
    assert 0 < result["bpd"] < 2 * math.log2(17) and result["bpd_stderr"] > 0
    assert result["max_reconstruction_error"] < 1e-3
    assert main(["sample", str(run), "--n", "16", "--interpolate"]) == 0
    assert png(run / "samples.png") and png(run / "interpolation.png")


def test_config_file_typo_lists_valid_keys(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('data = "moons"\nbatch_sise = 64\n')
    assert main(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "'batch_sise'" in err and "valid keys are:" in err and "batch_size" in err
    assert main(["train", "--data", "moons", "--set", "model.hiden=[4]", "--run-dir", str(tmp_path / "x")]) == 2
    assert "arguments are: features, layers, hidden" in capsys.readouterr().err
    assert main(["train", "--data", "no-such-data"]) == 2
    assert "unknown dataset" in capsys.readouterr().err


def test_eval_of_a_corrupted_run_is_an_error(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", *TINY_2D, "--run-dir", str(run), "--max-steps", "5"]) == 0
    (run / "checkpoint" / "state.safetensors").write_bytes(b"garbage")
    assert main(["train", "--resume", "--run-dir", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "state.safetensors" in err and "corrupted" in err


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_python_dash_m_entry_point(argv):
    out = subprocess.run([sys.executable, "-m", "pushforward", *argv], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and "pushforward" in out.stdout


def test_table_from_a_csv_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(600, 3, generator=g)
    x = z @ torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 1.0]]) * 10 + 100
    csv = tmp_path / "table.csv"
    csv.write_text("a,b,c\n" + "\n".join(",".join(f"{v:.5f}" for v in row) for row in x.tolist()))
    run = tmp_path / "table"
    assert main(["train", "--data", str(csv), "--run-dir", str(run), "--max-steps", "10", "--no-progress",
                 "--set", "model.hidden=[8]", "--set", "model.layers=2"]) == 0
    assert main(["eval", str(run)]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["n"] == 60 and result["dims"] == 3 and result["space"] == "standardised"
    assert main(["sample", str(run), "--n", "50"]) == 0
    samples = (run / "samples.csv").read_text().splitlines()
    assert len(samples) == 51 and png(run / "samples.png")
    # samples are returned in the original units, not the standardised space
    assert 50 < sum(float(r.split(",")[0]) for r in samples[1:]) / 50 < 150


@pytest.mark.parametrize("name", ["moons", "digits", "fashion-mnist"])
def test_shipped_configs_are_valid(name):
    from pathlib import Path

    from pushforward.config import DATASET_DEFAULTS, dataset_kind, load_toml, model_kwargs, resolve_config

    path = Path(__file__).parents[1] / "configs" / f"{name}.toml"
    config = resolve_config(load_toml(path))
    defaults = DATASET_DEFAULTS[dataset_kind(config.data)]
    assert config.recipe == defaults["recipe"] and config.model == defaults["models"][config.recipe]
    shape = (2,) if name == "moons" else (1, 8, 8) if name == "digits" else (1, 28, 28)
    model_kwargs(config, shape)  # the recipe accepts every key
