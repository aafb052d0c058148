"""Bad and unusual command-line inputs (issue 15): each is a one-line error naming the problem, no traceback,
and a run directory that existed before is byte-identical afterwards.

Every case runs ``pushforward`` in this process (``main(argv)``) next to ``EXISTING``, a finished tiny run
that the module trains once; the cases that need a second process (locks, signals) start one. ``expect``
checks the exit status, that stderr is one line holding the expected words, that no traceback was printed
and that every file of the existing run hashes as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pushforward.cli import main

torch.set_num_threads(1)

TINY = ["--no-progress", "--set", "n_train=400", "--set", "n_val=100", "--set", "n_test=100",
        "--set", "model.layers=2", "--set", "model.hidden=[8]", "--set", "batch_size=100",
        "--set", "warmup_steps=2"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    """Waits until ``path`` exists; a process that ends first, or a timeout, fails the test (and ends the
    process and its group, so that nothing is left waiting)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            _end(process)
            out, err = process.communicate()
            pytest.fail(f"{path} did not appear: {out[-2000:]} {err[-2000:]}")
        time.sleep(0.05)


def _end(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # started with start_new_session: its whole group
        except (ProcessLookupError, PermissionError):
            process.kill()


def snapshot(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative path (directories included, as entries)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def expect(argv, capsys, code: int, *words: str, existing: Path | None = None) -> str:
    """Runs ``argv``; asserts the exit status, one line on stderr holding ``words``, no traceback, and that
    ``existing`` (a run directory) has not changed. Returns the error line."""
    before = snapshot(existing) if existing is not None else None
    got, out, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, (got, out, err)
    assert "Traceback" not in out + err
    assert len(lines) == 1, err
    assert "internal error" not in err, err
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    if existing is not None:
        assert snapshot(existing) == before, f"{existing} changed"
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny moons run (10 steps); tests copy it when they need to change it."""
    root = tmp_path_factory.mktemp("existing")
    run_dir = root / "moons"
    assert main(["train", "--data", "moons", *TINY, "--run-dir", str(run_dir), "--max-steps", "10",
                 "--set", "val_every=5"]) == 0
    assert main(["eval", str(run_dir)]) == 0
    return run_dir


@pytest.fixture
def existing(trained, tmp_path) -> Path:
    """A private copy of the finished run."""
    import shutil

    target = tmp_path / "existing"
    shutil.copytree(trained, target)
    return target


def bad_csv(tmp_path: Path) -> Path:
    path = tmp_path / "bad.csv"
    rows = [f"{i * 0.1:.2f},{(i * 7) % 5 - 2.0:.1f}" for i in range(50)]
    rows[17] = "1.5,abc"
    path.write_text("a,b\n" + "\n".join(rows) + "\n")
    return path


# -- 2. nothing is deleted before the new data and model are built and checked ------------------------------
def test_overwrite_with_a_bad_csv_keeps_the_run(existing, tmp_path, capsys):
    expect(["train", "--data", bad_csv(tmp_path), "--run-dir", existing, "--overwrite", *TINY[:1]], capsys, 2,
           "line 19", existing=existing)


@pytest.mark.parametrize("extra, words", [
    (["--set", "model.hiden=[4]"], ["hiden", "arguments are"]),            # a model that cannot be built
    (["--condition", "label"], ["labelled data"]),                          # data without labels
    (["--dequantization", "variational"], ["images", "moons"]),            # a dequantizer for 2-D points
    (["--recipe", "glow"], ["glow", "images"]),                             # a recipe for other data
    (["--data", "no-such-data"], ["unknown dataset"]),
], ids=["model", "condition", "dequantization", "recipe", "data"])
def test_overwrite_that_cannot_train_keeps_the_run(existing, capsys, extra, words):
    argv = ["train", "--data", "moons", *TINY, "--run-dir", existing, "--overwrite", *extra]
    expect(argv, capsys, 2, *words, existing=existing)


def test_overwrite_replaces_the_run_once_everything_is_checked(existing, capsys):
    before = (existing / "best.safetensors").read_bytes()
    code, out, err = run(["train", "--data", "moons", *TINY, "--run-dir", existing, "--overwrite",
                          "--max-steps", "3"], capsys)
    assert code == 0, err
    assert not (existing / "eval.json").exists()  # the previous run's files are gone ...
    assert (existing / "best.safetensors").read_bytes() != before  # ... and the new run's are there
    rows = [json.loads(x) for x in (existing / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3]


def test_resume_and_overwrite_together_are_refused(existing, capsys):
    expect(["train", "--resume", "--overwrite", "--run-dir", existing], capsys, 2, "--resume", "--overwrite",
           existing=existing)


def test_a_second_plain_train_says_how_to_continue(existing, capsys):
    line = expect(["train", "--data", "moons", *TINY, "--run-dir", existing], capsys, 2,
                  "already holds a run", "--resume", "--overwrite", existing=existing)
    assert "resume=True" not in line  # the command line's terms, not the Python API's


# -- 3. one writer per run directory -------------------------------------------------------------------------
def _holder(run_dir: Path, then: str = "time.sleep(60)") -> subprocess.Popen:
    """A process that takes the run directory's lock, says so, then runs ``then``."""
    code = ("import sys, time\nfrom pushforward.rundir import RunLock\n"
            f"lock = RunLock({str(run_dir)!r}).acquire()\nprint('locked', flush=True)\n{then}\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV,
                         start_new_session=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def test_a_locked_run_directory_refuses_a_second_writer(existing, capsys):
    holder = _holder(existing)
    try:
        before = snapshot(existing)
        for argv in (["train", "--data", "moons", *TINY, "--run-dir", existing, "--overwrite"],
                     ["train", "--resume", "--run-dir", existing, "--no-progress", "--max-steps", "20"]):
            line = expect(argv, capsys, 2, "in use", f"PID {holder.pid}", f"kill {holder.pid}")
            assert snapshot(existing) == before
            assert "\n" not in line
    finally:
        _end(holder)
        holder.wait()


def test_two_trainings_into_one_directory(tmp_path, capsys):
    """A real training holds the lock; a second one into the same directory is refused, the first goes on."""
    run_dir = tmp_path / "shared"
    first = subprocess.Popen([sys.executable, "-m", "pushforward", "train", "--data", "moons", *TINY,
                              "--run-dir", str(run_dir), "--max-steps", "100000", "--set", "val_every=50"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                             start_new_session=True)
    try:
        _wait_for(run_dir / "config.json", first)
        expect(["train", "--data", "moons", *TINY, "--run-dir", run_dir, "--overwrite"], capsys, 2,
               "in use", f"PID {first.pid}")
        assert first.poll() is None  # the first run goes on
    finally:
        _end(first)
        first.communicate()


def test_a_lock_left_by_a_killed_process_is_stale(existing, capsys):
    holder = _holder(existing, then="import os; os.kill(os.getpid(), 9)")
    holder.wait()
    assert (existing / ".pushforward.lock").exists()  # SIGKILL leaves the file behind
    code, out, err = run(["train", "--resume", "--run-dir", existing, "--no-progress", "--max-steps", "12"],
                         capsys)
    assert code == 0, err
    assert "stale lock" in err and f"PID {holder.pid}" in err and "no longer running" in err
    assert not (existing / ".pushforward.lock").exists()  # released at the end


# -- 4. a resumed run keeps its data and model ---------------------------------------------------------------
@pytest.mark.parametrize("extra, words", [
    (["--data", "circles"], ["data = 'moons' -> 'circles'"]),
    (["--recipe", "nice"], ["recipe = 'realnvp' -> 'nice'"]),
    (["--set", "model.layers=3"], ["model", "'layers': 2", "'layers': 3"]),
    (["--seed", "7"], ["seed = 0 -> 7"]),
    (["--set", "n_train=500"], ["n_train = 400 -> 500"]),
    (["--set", "batch_size=50"], ["batch_size = 100 -> 50"]),
    (["--dequantization", "variational"], ["dequantization"]),
    (["--condition", "label"], ["condition"]),
], ids=["data", "recipe", "model", "seed", "n_train", "batch_size", "dequantization", "condition"])
def test_resume_refuses_to_change_the_data_or_the_model(existing, capsys, extra, words):
    expect(["train", "--resume", "--run-dir", existing, "--no-progress", "--max-steps", "20", *extra], capsys,
           2, "cannot resume", *words, existing=existing)


def test_resume_may_change_the_budget(existing, capsys):
    code, out, err = run(["train", "--resume", "--run-dir", existing, "--data", "moons", "--max-steps", "12",
                          "--no-progress", "--set", "patience=3", "--set", "lr=5e-4"], capsys)
    assert code == 0, err
    assert "stopped (completed) at step 12" in out


def _table(path: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 3, generator=g)
    path.write_text("a,b,c\n" + "\n".join(",".join(f"{v:.4f}" for v in row) for row in x.tolist()) + "\n")
    return path


def test_resume_refuses_a_table_whose_values_changed(tmp_path, capsys):
    csv, run_dir = _table(tmp_path / "t.csv"), tmp_path / "table-run"
    table = ["--recipe", "maf", "--set", "model.layers=1", "--set", "model.hidden=[8]", "--no-progress"]
    assert run(["train", "--data", csv, "--run-dir", run_dir, "--max-steps", "4", *table], capsys)[0] == 0
    _table(csv, seed=1)  # same file, same shape, other values
    expect(["train", "--resume", "--run-dir", run_dir, "--max-steps", "8", "--no-progress"], capsys, 2,
           "cannot resume", "training data differ", existing=run_dir)


def test_resume_finds_the_default_run_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(["train", "--data", "moons", *TINY, "--max-steps", "4"], capsys)[0] == 0
    assert (tmp_path / "runs" / "moons" / "checkpoint").is_dir()
    code, out, err = run(["train", "--data", "moons", "--resume", "--max-steps", "6", "--no-progress"],
                         capsys)
    assert code == 0 and "stopped (completed) at step 6" in out, err
    expect(["train", "--resume", "--no-progress"], capsys, 2, "--resume needs", "--run-dir")
    expect(["train", "--data", "circles", "--resume"], capsys, 2, "runs/circles holds no checkpoint")


def test_different_runs_of_one_data_set_get_different_default_directories():
    from pushforward.config import default_run_dir, resolve_config

    def where(**values):
        return str(default_run_dir(resolve_config({}, values)))

    assert where(data="digits") == "runs/digits"
    assert where(data="digits", recipe="vae") == "runs/digits-vae"
    assert where(data="digits", dequantization="variational") == "runs/digits-variational"
    assert where(data="fashion-mnist", condition="label") == "runs/fashion-mnist-label"


# -- 6. every option and config key in its range, checked when the command line is parsed --------------------
RUN = "{run}"  # the existing run directory
OVER = ["--run-dir", RUN, "--overwrite"]  # a bad value must not cost the run it would replace
TRAIN = ["train", "--data", "moons", *TINY, *OVER]
BAD_VALUES = [
    # (id, argv, exit status, words the message holds)
    ("batch_size=0", [*TRAIN, "--set", "batch_size=0"], 2, ["batch_size", "= 0", "integer >= 1"]),
    ("batch_size=-5", [*TRAIN, "--set", "batch_size=-5"], 2, ["batch_size", "-5", "integer >= 1"]),
    ("batch_size=1.5", [*TRAIN, "--set", "batch_size=1.5"], 2, ["batch_size", "1.5", "integer"]),
    ("batch_size=true", [*TRAIN, "--set", "batch_size=true"], 2, ["batch_size", "true", "integer"]),
    ("max-steps -5", [*TRAIN, "--max-steps", "-5"], 2, ["--max-steps", "'-5'", "integer >= -1"]),
    ("epochs 0", [*TRAIN, "--epochs", "0"], 2, ["--epochs", "'0'", "integer >= 1"]),
    ("epochs x", [*TRAIN, "--epochs", "x"], 2, ["--epochs", "'x'", "integer"]),
    ("lr=0", [*TRAIN, "--set", "lr=0"], 2, ["'lr'", "= 0", "> 0"]),
    ("lr=-1e-3", [*TRAIN, "--set", "lr=-1e-3"], 2, ["'lr'", "-0.001", "> 0"]),
    ("lr=nan", [*TRAIN, "--set", "lr=nan"], 2, ["'lr'", "nan", "finite"]),
    ("lr=inf", [*TRAIN, "--set", "lr=inf"], 2, ["'lr'", "inf", "finite"]),
    ("lr=fast", [*TRAIN, "--set", "lr=fast"], 2, ["'lr'", "'fast'", "number"]),
    ("lr_min=2", [*TRAIN, "--set", "lr_min=2"], 2, ["lr_min", "[0, 1]"]),
    ("max-minutes -1", [*TRAIN, "--max-minutes", "-1"], 2, ["--max-minutes", "'-1'", ">= 0"]),
    ("max-minutes nan", [*TRAIN, "--max-minutes", "nan"], 2, ["--max-minutes", "'nan'", "finite"]),
    ("clip=-1", [*TRAIN, "--set", "clip=-1"], 2, ["clip", ">= 0"]),
    ("warmup_steps=-1", [*TRAIN, "--set", "warmup_steps=-1"], 2, ["warmup_steps", ">= 0"]),
    ("patience=-2", [*TRAIN, "--set", "patience=-2"], 2, ["patience", ">= 0"]),
    ("weight_decay=-0.5", [*TRAIN, "--set", "weight_decay=-0.5"], 2, ["weight_decay", ">= 0, or -1"]),
    ("n_train=0", [*TRAIN, "--set", "n_train=0"], 2, ["n_train", "integer >= 1"]),
    ("eval_batch_size=0", [*TRAIN, "--set", "eval_batch_size=0"], 2, ["eval_batch_size", ">= 1"]),
    ("threads=-1", [*TRAIN, "--set", "threads=-1"], 2, ["threads", ">= 0"]),
    ("val_fraction=1.5", [*TRAIN, "--set", "val_fraction=1.5"], 2, ["val_fraction", "(0, 1)"]),
    ("fractions sum", [*TRAIN, "--set", "val_fraction=0.6", "--set", "test_fraction=0.5"], 2,
     ["val_fraction + test_fraction", "below 1"]),
    ("seed -1", [*TRAIN, "--seed", "-1"], 2, ["--seed", "'-1'", "2**63"]),
    ("seed=2**64", [*TRAIN, "--set", "seed=18446744073709551616"], 2, ["seed", "2**63"]),
    ("progress=maybe", [*TRAIN, "--set", "progress=maybe"], 2, ["progress", "'maybe'", "true or false"]),
    ("restore_best=2", [*TRAIN, "--set", "restore_best=2"], 2, ["restore_best", "true or false"]),
    ("device gpu", [*TRAIN, "--device", "gpu"], 2, ["--device", "'gpu'", "cuda:N"]),
    ("model.layers=0", [*TRAIN, "--set", "model.layers=0"], 2, ["model.layers", "= 0", "integer >= 1"]),
    ("model.hidden=abc", [*TRAIN, "--set", "model.hidden=abc"], 2,
     ["model.hidden", "'abc'", "list of positive"]),
    ("model.hidden=[0]", [*TRAIN, "--set", "model.hidden=[0]"], 2,
     ["model.hidden", "[0]", "list of positive"]),
    ("model.hidden=[-3,4]", [*TRAIN, "--set", "model.hidden=[-3,4]"], 2, ["model.hidden", "positive"]),
    ("model.scale_bound=-1", [*TRAIN, "--set", "model.scale_bound=-1"], 2, ["model.scale_bound", "> 0"]),
    ("model.mask=diagonal", [*TRAIN, "--set", "model.mask=diagonal"], 2, ["diagonal"]),
    ("model.features=3", [*TRAIN, "--set", "model.features=3"], 2, ["model.features", "from the data"]),
    ("model.context_features", [*TRAIN, "--set", "model.context_features=3"], 2,
     ["context_features", "class-conditional"]),
    ("model.nosuch", [*TRAIN, "--set", "model.nosuch=1"], 2, ["'nosuch'", "arguments are"]),
    ("nosuchkey", [*TRAIN, "--set", "nosuchkey=1"], 2, ["unknown config key", "'nosuchkey'", "valid keys"]),
    ("set =5", [*TRAIN, "--set", "=5"], 2, ["--set", "key=value", "'=5'"]),
    ("set lr", [*TRAIN, "--set", "lr"], 2, ["--set", "key=value", "'lr'"]),
    ("set other.x", [*TRAIN, "--set", "other.x=1"], 2, ["model.<kwarg>", "'other.x'"]),
    ("recipe nosuch", [*TRAIN, "--recipe", "nosuch"], 2, ["unknown recipe", "'nosuch'", "realnvp"]),
    ("recipe glow on 2-D", [*TRAIN, "--recipe", "glow"], 2,
     ["'glow'", "models images", "2-D points", "realnvp"]),
    ("recipe maf on digits", ["train", "--data", "digits", "--recipe", "maf", *OVER], 2,
     ["'maf'", "models vectors", "images", "glow"]),
    ("dequantizer.layers=0", ["train", "--data", "digits", "--dequantization", "variational",
                              "--set", "dequantizer.layers=0", *OVER], 2, ["dequantizer.layers", ">= 1"]),
    ("condition on 2-D", [*TRAIN, "--condition", "label"], 2, ["labelled data", "moons"]),
    ("condition nope", [*TRAIN, "--condition", "nope"], 2, ["--condition", "'nope'", "label"]),
    ("recipe dequantized", [*TRAIN, "--recipe", "dequantized"], 2,
     ["'dequantized'", "does not model data on its own", "--dequantization variational"]),
    ("run-dir is a file", ["train", "--data", "moons", *TINY, "--run-dir", "{tmp}/file"], 2,
     ["is a file, not a directory"]),
    ("data nosuch", ["train", "--data", "nosuch", *OVER], 2, ["unknown dataset", "'nosuch'", "moons"]),
    ("data missing.csv", ["train", "--data", "missing.csv", *OVER], 2, ["missing.csv"]),
    # eval, sample, plot of the existing run
    ("eval batch-size -4", ["eval", RUN, "--batch-size", "-4"], 2, ["--batch-size", "'-4'", "integer >= 1"]),
    ("eval batch-size 0", ["eval", RUN, "--batch-size", "0"], 2, ["--batch-size", "'0'", ">= 1"]),
    ("eval split", ["eval", RUN, "--split", "holdout"], 2, ["--split", "'holdout'", "test"]),
    ("eval nothing there", ["eval", "{tmp}/nothing"], 2, ["no run", "nothing"]),
    ("eval empty dir", ["eval", "{tmp}"], 2, ["neither best.safetensors nor checkpoint"]),
    ("sample T -1", ["sample", RUN, "--temperature", "-1"], 2, ["--temperature", "'-1'", "> 0"]),
    ("sample T 0", ["sample", RUN, "--temperature", "0"], 2, ["--temperature", "'0'", "> 0"]),
    ("sample T nan", ["sample", RUN, "--temperature", "nan"], 2, ["--temperature", "'nan'", "finite"]),
    ("sample T inf", ["sample", RUN, "--temperature", "inf"], 2, ["--temperature", "'inf'", "finite"]),
    ("sample n 0", ["sample", RUN, "--n", "0"], 2, ["--n", "'0'", "[1, 100000]"]),
    ("sample n huge", ["sample", RUN, "--n", "1000000000"], 2, ["--n", "[1, 100000]"]),
    ("sample label -1", ["sample", RUN, "--label", "-1"], 2, ["--label", "'-1'", ">= 0"]),
    ("sample label unconditional", ["sample", RUN, "--label", "3"], 2, ["--label", "class-conditional"]),
    ("sample seed x", ["sample", RUN, "--seed", "x"], 2, ["--seed", "'x'"]),
    ("plot nothing there", ["plot", "{tmp}"], 2, ["no metrics.jsonl"]),
    # demo and compare
    ("demo max-minutes -1", ["demo", "--max-minutes", "-1"], 2, ["--max-minutes", "'-1'", ">= 0"]),
    ("demo image-steps 0", ["demo", "--image-steps", "0"], 2, ["--image-steps", "'0'", ">= 1"]),
    ("demo density", ["demo", "--density", "blob"], 2, ["--density", "'blob'", "moons"]),
    ("compare ks 0", ["compare", "--data", "moons", "--ks", "1,0"], 2, ["--ks", "'0'", ">= 1"]),
    ("compare ks abc", ["compare", "--data", "moons", "--ks", "abc"], 2, ["--ks", "'abc'"]),
    ("compare ks empty", ["compare", "--data", "moons", "--ks", ","], 2, ["--ks", "at least one"]),
    ("compare eval-n -1", ["compare", "--data", "moons", "--eval-n", "-1"], 2, ["--eval-n", ">= 0"]),
    ("compare minutes 0", ["compare", "--data", "moons", "--minutes", "0"], 2, ["--minutes", "> 0"]),
    ("compare minutes nan", ["compare", "--data", "moons", "--minutes", "nan"], 2, ["--minutes", "finite"]),
    ("compare match", ["compare", "--data", "moons", "--match", "size"], 2, ["--match", "'size'", "params"]),
    ("compare no data", ["compare"], 2, ["--data"]),
    # the command line itself
    ("no command", [], 2, ["required", "COMMAND"]),
    ("unknown command", ["fit"], 2, ["invalid choice", "'fit'"]),
    ("unknown option", ["eval", RUN, "--fast"], 2, ["unrecognized", "--fast"]),
]


def _config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("argv, code, words", [case[1:] for case in BAD_VALUES],
                         ids=[c[0] for c in BAD_VALUES])
def test_bad_values_are_named_at_parse_time(trained, tmp_path, capsys, argv, code, words):
    (tmp_path / "file").write_text("not a directory")
    argv = [str(a).replace(RUN, str(trained)).replace("{tmp}", str(tmp_path)) for a in argv]
    expect(argv, capsys, code, *words, existing=trained)


@pytest.mark.parametrize("text, words", [
    (None, ["no config file"]),
    ('data = "moons"\nbatch_size = \n', ["not valid TOML"]),
    ('data = "moons"\nbatch_sise = 64\n', ["unknown config key", "'batch_sise'", "batch_size"]),
    ('data = "moons"\nlr = "fast"\n', ["'lr'", "'fast'", "number"]),
    ('data = "moons"\nepochs = 0\n', ["'epochs'", "= 0", ">= 1"]),
    ('data = "moons"\n[model]\nlayers = -1\n', ["model.layers", "-1", ">= 1"]),
    ('data = "moons"\nmodel = 3\n', ["'model'", "table of keyword arguments"]),
], ids=["missing", "syntax", "typo", "lr type", "epochs", "model.layers", "model type"])
def test_bad_config_files(trained, tmp_path, capsys, text, words):
    path = tmp_path / "c.toml" if text is None else _config_file(tmp_path, text)
    expect(["train", "--config", path, "--run-dir", trained, "--overwrite"], capsys, 2, *words,
           existing=trained)


def test_every_config_key_and_option_has_a_rule():
    import dataclasses

    from pushforward.config import TrainConfig
    from pushforward.options import CONFIG_RULES

    assert set(CONFIG_RULES) == {f.name for f in dataclasses.fields(TrainConfig)}


# -- 5. SIGTERM is the first Ctrl-C: finish the step, save, exit 143, say how to resume ---------------------
def _training(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pushforward", "train", "--data", "moons", *TINY,
                             "--run-dir", str(run_dir), "--max-steps", "100000", "--set", "val_every=20",
                             *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)




@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_and_says_how_to_resume(tmp_path, capsys, signum, code):
    run_dir = tmp_path / "stopped"
    p = _training(run_dir)
    try:
        _wait_for(run_dir / "checkpoint" / "state.json", p)  # after the first validation
        p.send_signal(signum)
        out, err = p.communicate(timeout=60)
    finally:
        _end(p)
    assert p.returncode == code, (out, err)
    assert "Traceback" not in out + err
    name = signal.Signals(signum).name
    assert f"stopped by {name}" in out and f"pushforward train --resume --run-dir {run_dir}" in out
    step = json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"]
    assert f"stopped (interrupted) at step {step};" in out  # the checkpoint is the step it stopped at
    assert not (run_dir / ".pushforward.lock").exists()
    code, out, err = run(["train", "--resume", "--run-dir", run_dir, "--max-steps", str(step + 5),
                          "--no-progress"], capsys)
    assert code == 0 and f"stopped (completed) at step {step + 5}" in out, err


def test_sigterm_under_torchrun_saves_on_every_rank(tmp_path):
    """torchrun forwards SIGTERM to its workers; they stop at the same step, rank 0 saves, all exit."""
    pytest.importorskip("torch.distributed.run")
    run_dir = tmp_path / "ddp"
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "pushforward", "train", "--data", "moons", *TINY,
                          "--device", "cpu", "--run-dir", str(run_dir), "--max-steps", "100000",
                          "--set", "val_every=20"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                         start_new_session=True)
    try:
        _wait_for(run_dir / "checkpoint" / "state.json", p, timeout=120)
        p.send_signal(signal.SIGTERM)  # to the agent alone, as docker stop or systemd would
        out, err = p.communicate(timeout=90)
    finally:
        _end(p)
    assert "Traceback" not in out, out
    assert "stopped by SIGTERM" in out and "pushforward train --resume" in out, (out, err[-3000:])
    step = json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"]
    assert f"stopped (interrupted) at step {step};" in out


# -- 9. every weights file the command line loads is verified -----------------------------------------------
def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("target, argv, words", [
    ("best.safetensors", ["eval", RUN], ["best.safetensors", "corrupted", "SHA-256"]),
    ("best.safetensors", ["sample", RUN], ["best.safetensors", "corrupted"]),
    ("best.safetensors", ["train", "--resume", "--run-dir", RUN, "--max-steps", "20", "--no-progress"],
     ["best.safetensors", "corrupted"]),
    ("best.safetensors", ["compare", "--data", "moons", "--flow", RUN, "--run-dir", "{tmp}/cmp"],
     ["best.safetensors", "corrupted"]),
    ("checkpoint/model.safetensors", ["eval", RUN, "--checkpoint"], ["model.safetensors", "corrupted"]),
    ("checkpoint/model.safetensors", ["eval", f"{RUN}/checkpoint"], ["model.safetensors", "corrupted"]),
    ("checkpoint/model.safetensors", ["eval", f"{RUN}/checkpoint/model.safetensors"],
     ["model.safetensors", "corrupted"]),
    ("checkpoint/model.safetensors", ["train", "--resume", "--run-dir", RUN, "--max-steps", "20"],
     ["model.safetensors", "corrupted"]),
    ("checkpoint/state.safetensors", ["train", "--resume", "--run-dir", RUN, "--max-steps", "20"],
     ["state.safetensors", "corrupted"]),
], ids=["eval", "sample", "resume-best", "compare", "eval-checkpoint", "eval-checkpoint-dir",
        "eval-weights-file", "resume-model", "resume-state"])
def test_a_flipped_bit_is_an_error_on_every_path(existing, tmp_path, capsys, target, argv, words):
    _flip_last_byte(existing / target)
    argv = [str(a).replace(RUN, str(existing)).replace("{tmp}", str(tmp_path)) for a in argv]
    expect(argv, capsys, 2, *words, existing=existing)


def test_a_garbled_run_record_is_named(existing, capsys):
    (existing / "config.json").write_text("{not json")
    expect(["eval", existing], capsys, 2, "config.json", "corrupted", existing=existing)
    (existing / "checkpoint" / "state.json").write_text("{not json")
    expect(["train", "--resume", "--run-dir", existing], capsys, 2, "state.json", "corrupted",
           "not valid JSON", existing=existing)


def test_a_changed_architecture_record_is_an_error(existing, capsys):
    path = existing / "best.safetensors"
    data = path.read_bytes()
    assert data.count(b'\\"layers\\": 2') == 1
    path.write_bytes(data.replace(b'\\"layers\\": 2', b'\\"layers\\": 3'))  # same length, valid JSON
    expect(["eval", existing], capsys, 2, "best.safetensors", "corrupted", existing=existing)


def _crafted(path: Path, recipe: dict, tensors: dict) -> Path:
    import safetensors.torch as st

    st.save_file(tensors, str(path), metadata={"pushforward_recipe": json.dumps(recipe)})
    return path


def test_a_small_file_cannot_make_load_allocate_a_huge_model(tmp_path):
    import pushforward as pf

    huge = {"recipe": "realnvp", "kwargs": {"features": 2, "layers": 8, "hidden": [200_000, 200_000]}}
    path = _crafted(tmp_path / "tiny.safetensors", huge, {"x": torch.zeros(1)})
    assert path.stat().st_size < 400
    start = time.monotonic()
    with pytest.raises(ValueError, match="far larger than the 4 bytes"):
        pf.load(path)
    assert time.monotonic() - start < 5


def test_load_compares_the_header_with_the_recorded_architecture(tmp_path):
    import pushforward as pf
    from pushforward import models

    flow = models.realnvp(2, layers=2, hidden=(8,))
    state = {k: v.contiguous() for k, v in flow.state_dict().items()}
    renamed = {("renamed." + k if i == 0 else k): v for i, (k, v) in enumerate(state.items())}
    with pytest.raises(ValueError,
                       match="does not match the architecture it records: missing .*unexpected renamed"):
        pf.load(_crafted(tmp_path / "a.safetensors", flow.recipe, renamed))
    key = next(k for k, v in state.items() if v.dim() == 2)
    reshaped = {**state, key: torch.zeros(state[key].shape[0] + 1, state[key].shape[1])}
    with pytest.raises(ValueError, match=f"shape of {re.escape(key)}"):
        pf.load(_crafted(tmp_path / "b.safetensors", flow.recipe, reshaped))
    (tmp_path / "c.safetensors").write_bytes((tmp_path / "b.safetensors").read_bytes()[:-7])  # truncated
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        pf.load(tmp_path / "c.safetensors")


# -- 8. the file system: one-line errors naming the file and what is intact; eval prints first ---------------
def test_a_full_disk_during_a_checkpoint_names_the_file_and_the_intact_checkpoint(tmp_path, capsys,
                                                                                   monkeypatch):
    import errno

    from pushforward import checkpoint

    run_dir, calls = tmp_path / "full", []
    real = checkpoint._fsync

    def fsync(path):
        calls.append(path)
        if len(calls) > 1:  # the first checkpoint (step 5) is written, the second (step 10) is not
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path)

    monkeypatch.setattr(checkpoint, "_fsync", fsync)
    line = expect(["train", "--data", "moons", *TINY, "--run-dir", run_dir, "--max-steps", "20",
                   "--set", "val_every=5"], capsys, 1, "No space left on device", "state.safetensors",
                  f"the last intact checkpoint is {run_dir / 'checkpoint'} (step 5)", "--resume")
    assert "Traceback" not in line
    monkeypatch.setattr(checkpoint, "_fsync", real)
    assert checkpoint.read_state(run_dir)["step"] == 5 and not list(run_dir.glob(".checkpoint-tmp-*"))
    assert not (run_dir / ".pushforward.lock").exists()
    code, out, err = run(["train", "--resume", "--run-dir", run_dir, "--no-progress"], capsys)
    assert code == 0 and "stopped (completed) at step 20" in out, err


@pytest.mark.parametrize("errno_name", ["EROFS", "EACCES"])
def test_a_read_only_run_directory_is_one_line_and_changes_nothing(existing, capsys, monkeypatch, errno_name):
    import errno

    from pushforward import rundir

    real = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(existing)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            code = getattr(errno, errno_name)
            raise OSError(code, os.strerror(code), str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(rundir.os, "open", read_only)
    for argv in (["train", "--resume", "--run-dir", existing, "--max-steps", "20", "--no-progress"],
                 ["train", "--data", "moons", *TINY, "--run-dir", existing, "--overwrite"]):
        expect(argv, capsys, 1, "cannot write in the run directory", os.strerror(getattr(errno, errno_name)),
               ".pushforward.lock", "nothing in it was changed", existing=existing)


def test_eval_prints_its_result_before_a_failing_write(existing, capsys, monkeypatch):
    import errno

    from pushforward import runs

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(runs, "atomic_write", full)
    before = snapshot(existing)
    code, out, err = run(["eval", existing], capsys)
    assert code == 1 and "NLL" in out and "max |f^-1(f(x)) - x|" in out  # the result is on the screen
    assert err.count("\n") == 1 and "eval.json" in err and "No space left on device" in err
    assert "not saved" in err and "Traceback" not in err
    assert snapshot(existing) == before


def test_a_relative_data_path_is_stored_absolute(tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    _table(work / "t.csv")
    monkeypatch.chdir(work)
    assert run(["train", "--data", "t.csv", "--recipe", "maf", "--set", "model.layers=1", "--set",
                "model.hidden=[8]", "--max-steps", "3", "--no-progress"], capsys)[0] == 0
    run_dir = work / "runs" / "t-maf"
    assert json.loads((run_dir / "config.json").read_text())["train"]["data"] == str(work / "t.csv")
    monkeypatch.chdir(tmp_path)  # elsewhere
    code, out, err = run(["eval", run_dir], capsys)
    assert code == 0, err
    code, out, err = run(["train", "--resume", "--run-dir", run_dir, "--data", str(work / "t.csv"),
                          "--max-steps", "4", "--no-progress"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                         (0o002, 0o664, 0o775)])
def test_output_files_follow_the_umask(tmp_path, capsys, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        run_dir = tmp_path / "modes"
        argv = ["train", "--data", "moons", *TINY, "--run-dir", run_dir, "--max-steps", "4"]
        assert run(argv, capsys)[0] == 0
        assert run(["eval", run_dir], capsys)[0] == 0
        assert run(["sample", run_dir, "--n", "50"], capsys)[0] == 0
    finally:
        os.umask(old)
    modes = {str(p.relative_to(run_dir)): p.stat().st_mode & 0o777 for p in run_dir.rglob("*")}
    assert {name: mode for name, mode in modes.items()
            if mode != (dir_mode if (run_dir / name).is_dir() else file_mode)} == {}
    assert {"best.safetensors", "metrics.csv", "config.json", "eval.json", "samples.png", "checkpoint",
            "checkpoint/state.json"} <= set(modes)


# -- 11. reports say what was matched, and only that ---------------------------------------------------------
def test_compare_of_two_finished_runs_claims_no_match(trained, tmp_path, capsys):
    vae = tmp_path / "vae"
    assert run(["train", "--data", "moons", "--recipe", "vae", "--no-progress", "--run-dir", vae,
                "--max-steps", "6", "--set", "n_train=400", "--set", "n_val=100", "--set", "n_test=100",
                "--set", "model.hidden=[8]", "--set", "batch_size=100"], capsys)[0] == 0
    before = snapshot(trained)
    out_dir = tmp_path / "cmp"
    code, out, err = run(["compare", "--data", "moons", "--flow", trained, "--vae", vae, "--run-dir", out_dir,
                          "--ks", "1,2", "--eval-n", "50", "--no-progress", "--set", "n_test=100"], capsys)
    assert code == 0, err
    report = (out_dir / "report.md").read_text()
    line = next(x for x in report.splitlines() if "Matched:" in x)
    assert "Matched: nothing but the test examples" in line and "parameter counts" not in line.split(";")[0]
    assert "the flow and the VAE were trained elsewhere" in line
    assert "10 vs 6 training steps" in line
    assert json.loads((out_dir / "compare.json").read_text())["match_description"] in line
    assert snapshot(trained) == before


def test_compare_that_trains_both_states_the_matched_budget(tmp_path, capsys):
    out_dir = tmp_path / "both"
    code, out, err = run(["compare", "--data", "moons", "--run-dir", out_dir, "--max-steps", "4", "--ks", "1",
                          "--eval-n", "20", "--no-progress", "--set", "n_train=200", "--set", "n_val=50",
                          "--set", "n_test=50", "--set", "batch_size=50", "--flow-set", "model.layers=2",
                          "--flow-set", "model.hidden=[8]"], capsys)
    assert code == 0, err
    line = next(x for x in (out_dir / "report.md").read_text().splitlines() if "Matched:" in x)
    assert "parameter counts" in line and "the VAE's width was chosen for the flow's" in line, line
    assert "training steps (4 each)" in line, line


# -- 10. long work shows progress; the final validation fits inside --max-minutes ----------------------------
def test_the_final_validation_counts_inside_max_minutes(tmp_path, capsys):
    """A validation set that takes a good part of the budget to score: training stops early enough for
    the final validation and checkpoint to end within --max-minutes (they used to come on top of it)."""
    run_dir, budget_s = tmp_path / "budget", 3.0
    code, out, err = run(["train", "--data", "moons", "--no-progress", "--set", "n_train=2000",
                          "--set", "n_val=400000", "--set", "n_test=100", "--set", "model.layers=4",
                          "--set", "model.hidden=[32]", "--set", "batch_size=64",
                          "--set", "val_every=1000000", "--run-dir", run_dir, "--max-steps", "1000000",
                          "--max-minutes", str(budget_s / 60)],
                         capsys)
    assert code == 0 and "stopped (time)" in out, err
    assert "time budget:" in out and "to end within --max-minutes" in out  # shown, not silent
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] > 10
    assert rows[0]["elapsed_s"] <= budget_s  # measured when the validation had ended


def test_long_passes_show_progress(monkeypatch):
    """Every pass over data (validation, eval and its reference and reconstruction passes) goes through a
    progress bar that appears after two seconds."""
    from pushforward import models, train

    labels = []
    real = train._progress

    def spy(total, desc):
        labels.append(desc)
        return real(total, desc)

    monkeypatch.setattr(train, "_progress", spy)
    flow = models.realnvp(2, layers=2, hidden=(8,))
    train.evaluate(flow, torch.randn(50, 2), batch_size=20, progress="eval moons")
    assert labels == ["eval moons", "eval moons: reconstruction"]
    assert real(3, "x").delay == 2.0
