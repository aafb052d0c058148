"""The command line end to end on tiny data: train, resume, eval, sample, plot, and its errors."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pushforward.cli import main

torch.set_num_threads(1)

TINY_2D = ["--data", "moons", "--no-progress", "--set", "n_train=1000", "--set", "n_val=200",
           "--set", "n_test=300", "--set", "model.layers=2", "--set", "model.hidden=[16,16]",
           "--set", "batch_size=100", "--set", "warmup_steps=5"]
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
    assert main(["sample", str(run), "--n", "200", "--temperature", "0.8",
                 "--out", str(tmp_path / "s.png")]) == 0
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
    assert main(["train", "--data", "moons", "--set", "model.hiden=[4]", "--run-dir", str(tmp_path / "x")]) \
        == 2
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
    out = subprocess.run([sys.executable, "-m", "pushforward", *argv], capture_output=True, text=True,
                         timeout=60, check=False)
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
    from pushforward.config import dataset_entry, load_toml, model_kwargs, resolve_config

    path = Path(__file__).parents[1] / "configs" / f"{name}.toml"
    config = resolve_config(load_toml(path))
    entry = dataset_entry(config)
    assert config.recipe == entry.recipe and config.model == entry.models[config.recipe]
    shape = (2,) if name == "moons" else (1, 8, 8) if name == "digits" else (1, 28, 28)
    model_kwargs(config, shape)  # the recipe accepts every key


# -- the data set registry from the command line -------------------------------------------------------
def _blobs(config):
    """Three Gaussian blobs in 3-D, seeded: a data set that exists only in this test."""
    g = torch.Generator().manual_seed(config.seed)
    centres = torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])

    def draw(n):
        return centres[torch.randint(0, 3, (n,), generator=g)] + 0.3 * torch.randn(n, 3, generator=g)

    from pushforward.data import Dataset

    return Dataset("blobs3d", "table", draw(400), draw(100), draw(100), (3,))


def test_a_registered_dataset_trains_with_its_defaults_and_is_listed(tmp_path, capsys):
    from pushforward.data import register, unregister

    register("blobs3d", kind="table", load=_blobs, help="three Gaussian blobs in 3-D (a test entry)",
             recipe="maf", models={"maf": {"layers": 2, "hidden": [8]}},
             settings={"batch_size": 50, "max_steps": 6, "val_every": 3, "warmup_steps": 2,
                       "progress": False})
    try:
        run = tmp_path / "blobs"
        assert main(["train", "--data", "blobs3d", "--run-dir", str(run)]) == 0
        config = json.loads((run / "config.json").read_text())
        assert config["train"]["recipe"] == "maf" and config["train"]["batch_size"] == 50
        assert config["flow"]["recipe"] == "maf"
        assert {k: config["flow"]["kwargs"][k] for k in ("features", "layers", "hidden")} == {
            "features": 3, "layers": 2, "hidden": [8]}
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [3, 6]
        assert main(["eval", str(run)]) == 0 and json.loads((run / "eval.json").read_text())["n"] == 100
        capsys.readouterr()
        for argv in (["--help"], ["train", "--help"]):
            with pytest.raises(SystemExit) as exit_:
                main(argv)
            assert exit_.value.code == 0
            out = capsys.readouterr().out
            assert "blobs3d" in out and "three Gaussian blobs in 3-D (a test entry)" in out
    finally:
        unregister("blobs3d")
    assert main(["train", "--data", "blobs3d", "--run-dir", str(tmp_path / "gone")]) == 2
    assert "unknown dataset 'blobs3d'" in capsys.readouterr().err


def test_an_idx_directory_is_a_dataset(tmp_path):
    import gzip
    import struct

    import numpy as np

    def write_idx(path, array):
        blob = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
        blob += b"".join(struct.pack(">I", d) for d in array.shape)
        path.write_bytes(gzip.compress(blob + array.astype(">u1").tobytes()))

    rng = np.random.default_rng(0)
    idx = tmp_path / "tiny-mnist"
    idx.mkdir()
    for split, n in (("train", 40), ("t10k", 12)):
        write_idx(idx / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 8, 8)))
        write_idx(idx / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    run = tmp_path / "run"
    assert main(["train", "--data", str(idx), "--run-dir", str(run), "--max-steps", "2", "--no-progress",
                 "--set", "model.levels=1", "--set", "model.steps=1", "--set", "model.hidden_channels=4",
                 "--set", "batch_size=8", "--set", "warmup_steps=1", "--set", "val_fraction=0.25"]) == 0
    assert json.loads((run / "config.json").read_text())["flow"]["recipe"] == "glow"  # the IDX entry's
    assert main(["eval", str(run)]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["data"] == "tiny-mnist" and result["n"] == 12 and result["levels"] == 256


# -- module layout ------------------------------------------------------------------------------------------
def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False)


def test_the_parser_and_help_import_no_torch():
    """cli.py, config.py and the registry are torch-free: the package __init__ (which imports the models) is
    bypassed by a bare package module, so this checks the command line's own imports."""
    import pushforward

    src = str(Path(pushforward.__file__).parent)
    out = _python(
        "import sys, types\n"
        f"pkg = types.ModuleType('pushforward'); pkg.__path__ = [{src!r}]; sys.modules['pushforward'] = pkg\n"
        "import pushforward.cli as cli\n"
        "text = cli.build_parser().format_help()\n"
        "assert 'moons' in text and 'FILE.csv' in text, text\n"
        "heavy = ('torch', 'numpy', 'matplotlib', 'pushforward.runs')\n"
        "print('loaded:', sorted(m for m in heavy if m in sys.modules))\n")

    assert out.returncode == 0, out.stderr
    assert "loaded: []" in out.stdout


def test_compare_builds_on_runs_not_on_the_cli():
    out = _python("import sys, pushforward.compare\n"
                  "print('cli' if 'pushforward.cli' in sys.modules else 'no cli', "
                  "'runs' if 'pushforward.runs' in sys.modules else 'no runs')")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["no", "cli", "runs"]
    src = Path(__file__).parents[1] / "src" / "pushforward"
    imports_cli = re.compile(r"^\s*(from (\.|pushforward\.)cli import|import pushforward\.cli"
                             r"|from (\.|pushforward) import .*\bcli\b)", re.MULTILINE)
    importers = sorted(p.name for p in src.rglob("*.py")
                       if p.name != "__main__.py" and imports_cli.search(p.read_text()))
    assert importers == []  # only `python -m pushforward` enters through the CLI


# -- what users notice first ---------------------------------------------------------------------------------
def _options():
    import argparse

    from pushforward.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                yield name, action


def test_every_option_has_help_that_states_its_default():
    import argparse

    missing = []
    for command, action in _options():
        flag = "/".join(action.option_strings) or action.dest
        if not action.help:
            missing.append(f"{command} {flag}: no help")
        elif action.option_strings and not isinstance(action, argparse._StoreTrueAction) \
                and "default" not in action.help and not action.required:
            missing.append(f"{command} {flag}: no default in {action.help!r}")
    assert missing == []


def test_the_demo_trains_a_fixed_number_of_steps(monkeypatch):
    from pushforward import runs
    from pushforward.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert (args.density_steps, args.image_steps, args.max_minutes) == (6000, 3000, 0.0)
    seen = []

    def train_run(config, **kwargs):
        seen.append((config.data, config.max_steps, config.max_minutes))
        raise KeyboardInterrupt

    def no_timing(*args, **kwargs):
        raise AssertionError("the demo must not size itself from a timing trial")

    monkeypatch.setattr(runs, "train_run", train_run)
    monkeypatch.setattr(runs, "calibrate_steps", no_timing)
    monkeypatch.delenv("PUSHFORWARD_TEST_BUDGET", raising=False)
    with pytest.raises(KeyboardInterrupt):
        runs.demo("unused", "moons", "digits")
    assert seen == [("moons", 6000, 0.0)]


def test_help_is_quick():
    """pushforward --help imports no torch (see test_the_parser_and_help_import_no_torch): well under a
    second."""
    import time

    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pushforward", "--help"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0
    assert time.monotonic() - start < 1.5  # 0.07-0.2 s here; a loaded CI machine gets slack
