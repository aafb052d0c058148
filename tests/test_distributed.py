"""Scaling out: DDP on gloo with 2 CPU processes, ActNorm across ranks, torchrun, and the single-process
options that go with it (bf16 autocast, torch.compile, gradient checkpointing, devices and dtypes).

The multi-process tests spawn 2 workers (``torch.multiprocessing.spawn``, gloo on a free localhost
port) or run ``torchrun --standalone``; each worker uses one thread. Every DDP result is compared
with a one-process run of the same global batch.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pushforward import cli, models
from pushforward.checkpoint import STATE_FILE, checkpoint_dir, load_checkpoint, read_state
from pushforward.config import config_from_dict
from pushforward.core import Transform
from pushforward.data.images import ImageData
from pushforward.data.toy import toy_sample
from pushforward.distributed import Distributed, LossStep, checkpoint_targets, conditioners, resolve_device
from pushforward.io import load
from pushforward.train import fit
from pushforward.transforms import ActNorm

torch.set_num_threads(1)

WORLD = 2


# -- shared set-up (imported by the spawned workers too) ----------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moons():
    return toy_sample("moons", 512, seed=0), toy_sample("moons", 131, seed=1)  # odd: uneven validation shards


def images():
    """Small 8x8 images with 17 grey levels (digits-like, without loading scikit-learn in every worker)."""
    g = torch.Generator().manual_seed(0)
    blobs = torch.rand(101, 1, 8, 8, generator=g).cumsum(-1).cumsum(-2)
    x = (16 * blobs / blobs.amax(dim=(-1, -2), keepdim=True)).round().to(torch.uint8)
    data = ImageData(x, torch.zeros(101, dtype=torch.long), 17)
    return data.subset(torch.arange(64)), data.subset(torch.arange(64, 101))


def moons_flow():
    torch.manual_seed(0)
    return models.realnvp(2, layers=2, hidden=(16,))


def glow_flow():
    torch.manual_seed(0)
    return models.glow((1, 8, 8), levels=2, steps=1, hidden_channels=4)


def variational_flow():
    torch.manual_seed(0)
    image_flow = models.realnvp_image((1, 8, 8), levels=2, hidden_channels=4, blocks=1)
    return models.dequantized(image_flow.recipe, quantization_levels=17, layers=2, hidden_channels=4)


def config(run_dir, **kw):
    values = {"data": "moons", "batch_size": 32, "lr": 5e-3, "warmup_steps": 2, "max_steps": 6,
              "val_every": 3, "patience": 0, "progress": False, "seed": 3, "clip": 5.0, "threads": 1,
              "restore_best": False, "run_dir": str(run_dir)}
    values.update(kw)
    return config_from_dict(values)


#: name -> (flow, data, config overrides): trained with 2 processes by the workers and with one by the tests.
RUNS = {
    "glow_one_step": (glow_flow, images,
                      {"data": "digits", "batch_size": 16, "max_steps": 1, "val_every": 1}),
    "moons_six_steps": (moons_flow, moons, {}),
    "moons_reference": (moons_flow, moons, {"max_steps": 12, "val_every": 4}),  # resumed runs must match it
}


def _stop_at(step_to_stop: int, only_rank: int | None, step, loss, flow):
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if step == step_to_stop and (only_rank is None or rank == only_rank):
        raise KeyboardInterrupt


def _worker(rank: int, world: int, port: int, out: str, scenarios: list[str]) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    out = Path(out)
    try:
        for scenario in scenarios:
            _scenario(scenario, rank, out)
    finally:
        torch.distributed.destroy_process_group()


def _scenario(scenario: str, rank: int, out: Path) -> None:
    """One scenario, run by every rank."""
    if scenario == "main":
        _actnorm_on_this_rank(rank, out)
        summary = {}
        for name, (flow, data, kw) in RUNS.items():
            fit(flow(), *data(), config(out / name / "ddp", **kw))
        # Ctrl-C on rank 1 only (a callback raising KeyboardInterrupt): every rank stops after step 5.
        h = fit(moons_flow(), *moons(), config(out / "interrupted" / "ddp", max_steps=12, val_every=4),
                callback=functools.partial(_stop_at, 5, 1))
        summary["interrupted"] = [h.stop_reason, h.step]
        # a one-process checkpoint (written by the test before spawning) resumed with two processes
        h = fit(moons_flow(), *moons(), config(out / "resumed_by_ddp", max_steps=12, val_every=4),
                resume=True)
        summary["resumed_by_ddp"] = [h.stop_reason, h.step]
        # variational dequantization: per-rank noise, but q(u|x)'s gradients are averaged like the flow's
        flow = variational_flow()
        fit(flow, *images(),
            config("", data="digits", batch_size=16, max_steps=3, dequantization="variational"))
        torch.save(flow.state_dict(), out / f"variational{rank}.pt")
        try:  # the global batch must split evenly
            fit(moons_flow(), *moons(), config("", batch_size=15))
        except ValueError as e:
            summary["odd_batch"] = str(e)
        (out / f"summary{rank}.json").write_text(json.dumps(summary))
    elif scenario == "kill":
        if rank == 0:  # SIGKILL rank 0 in the middle of writing its second checkpoint (step 10)
            import pushforward.checkpoint as ck

            real, calls = ck.optimizer_state, []

            def dying(optimizer):
                calls.append(1)
                if len(calls) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(optimizer)

            ck.optimizer_state = dying
        fit(moons_flow(), *moons(), config(out / "killed", max_steps=40, val_every=5))


def spawn(out: Path, scenarios: list[str]) -> None:
    mp.spawn(_worker, args=(WORLD, free_port(), str(out), scenarios), nprocs=WORLD, join=True)


def assert_same_weights(a: dict, b: dict, atol=2e-6, rtol=1e-4):
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], atol=atol, rtol=rtol, msg=k)


def checkpoint_tensors(run) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    ckpt = checkpoint_dir(run)
    state = load_file(str(ckpt / STATE_FILE))
    optim = {k: v for k, v in state.items() if k.startswith("optim.")}
    return load(ckpt / "model.safetensors").state_dict(), optim


# -- the 2-process runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Runs the "main" scenario with 2 processes; the one-process runs it is compared with are made here."""
    out = tmp_path_factory.mktemp("ddp")
    fit(moons_flow(), *moons(), config(out / "resumed_by_ddp", max_steps=12, val_every=4),
        callback=functools.partial(_stop_at, 6, None))
    assert read_state(out / "resumed_by_ddp")["step"] == 6
    # One pair of workers (starting processes is the slow part): the "main" runs, then "kill", where
    # rank 0 dies (SIGKILL) and torch.multiprocessing ends the other one.
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)) as ended:
        spawn(out, ["main", "kill"])
    if not all((out / f"summary{r}.json").exists() for r in range(WORLD)):
        raise ended.value  # the "main" runs failed: show why
    (out / "killed" / "how.txt").write_text(repr(ended.value))
    for name, (flow, data, kw) in RUNS.items():
        fit(flow(), *data(), config(out / name / "single", **kw))
    return out


def test_actnorm_init_is_identical_across_ranks_and_equals_the_concatenated_batch(ddp_runs):
    ranks = [torch.load(ddp_runs / f"actnorm{r}.pt") for r in range(WORLD)]
    for key in ("vector", "image"):
        assert not torch.equal(ranks[0][key + ".x"], ranks[1][key + ".x"])  # the ranks saw different data
        for name in ("log_scale", "shift"):
            assert torch.equal(ranks[0][f"{key}.{name}"], ranks[1][f"{key}.{name}"]), (key, name)
        whole = ActNorm(3) if key == "vector" else ActNorm(2, event_dim=3)
        whole(torch.cat([r[key + ".x"] for r in ranks]))  # one process, the concatenated batch
        torch.testing.assert_close(ranks[0][key + ".log_scale"], whole.log_scale.detach(),
                                   atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ranks[0][key + ".shift"], whole.shift.detach(), atol=1e-6, rtol=1e-5)


def _actnorm_on_this_rank(rank: int, out: Path) -> None:
    g = torch.Generator().manual_seed(100 + rank)
    vector, image = ActNorm(3), ActNorm(2, event_dim=3)
    x = torch.randn(6, 3, generator=g) * (rank + 1) + 3 * rank
    y = torch.randn(4, 2, 3, 3, generator=g) * (2 * rank + 1) - rank
    vector(x)
    image(y)
    torch.save({"vector.x": x, "image.x": y,
                **{f"vector.{k}": v.detach() for k, v in vector.named_parameters()},
                **{f"image.{k}": v.detach() for k, v in image.named_parameters()}}, out / f"actnorm{rank}.pt")


def test_one_ddp_step_equals_one_process_on_the_same_global_batch(ddp_runs):
    """Glow (ActNorm, dequantized images, 2 x 8 of them) after one step. Adam's first moment after one
    step is 0.1 x the averaged gradient: it must equal the one-process gradient of the 16 images.
    The weights too, except where that gradient is at rounding level (ActNorm's shift right after its
    init): Adam's first step there is +-lr by the sign of the rounding, in any summation order."""
    run = ddp_runs / "glow_one_step"
    weights_ddp, moments_ddp = checkpoint_tensors(run / "ddp")
    weights_one, moments_one = checkpoint_tensors(run / "single")
    assert moments_ddp.keys() == moments_one.keys()
    grads = sorted(k for k in moments_one if k.endswith(".exp_avg"))
    assert grads
    scale = max(float(moments_one[k].abs().max()) for k in grads)
    for k in grads:
        torch.testing.assert_close(moments_ddp[k], moments_one[k], atol=1e-5 * scale, rtol=1e-4, msg=k)
    lr = 5e-3 / 2  # warm-up: step 1 of 2
    names = [n for n, p in glow_flow().named_parameters()]  # optimizer state is keyed by parameter order
    assert weights_ddp.keys() == weights_one.keys()
    for i, n in enumerate(names):
        g = moments_one[f"optim.{i}.exp_avg"]
        clear = g.abs() > 1e-3 * scale
        torch.testing.assert_close(weights_ddp[n][clear], weights_one[n][clear], atol=2e-6, rtol=1e-5, msg=n)
        assert float((weights_ddp[n] - weights_one[n]).abs().max()) <= 2 * lr + 1e-6, n
    for n in weights_one.keys() - set(names):  # buffers
        assert torch.equal(weights_ddp[n], weights_one[n]), n
    rows_ddp, rows_one = read_state(run / "ddp")["history"], read_state(run / "single")["history"]
    assert rows_ddp[0]["train_nll"] == pytest.approx(rows_one[0]["train_nll"], rel=1e-6)  # before the update
    # the same validation noise on any number of processes
    # (other noise moves it by ~0.2; the update by ~0.003)
    assert rows_ddp[0]["val_nll"] == pytest.approx(rows_one[0]["val_nll"], abs=0.02)


def test_ddp_run_matches_one_process_and_its_checkpoint_loads_in_one_process(ddp_runs):
    run = ddp_runs / "moons_six_steps"
    assert_same_weights(checkpoint_tensors(run / "ddp")[0], checkpoint_tensors(run / "single")[0], atol=1e-5)
    rows_ddp, rows_one = read_state(run / "ddp")["history"], read_state(run / "single")["history"]
    assert [r["step"] for r in rows_ddp] == [3, 6]
    assert [r["val_nll"] for r in rows_ddp] == pytest.approx([r["val_nll"] for r in rows_one], rel=1e-5)
    assert [r["train_nll"] for r in rows_ddp] == pytest.approx([r["train_nll"] for r in rows_one], rel=1e-5)
    # one writer: no temporary files left, one metrics row per validation
    assert sorted(p.name for p in (run / "ddp").iterdir()) == [
        "best.safetensors", "checkpoint", "config.json", "metrics.csv", "metrics.jsonl"]
    assert len((run / "ddp" / "metrics.jsonl").read_text().splitlines()) == 2
    flow = moons_flow()
    record = load_checkpoint(run / "ddp", flow)  # a plain single-process load: nothing rank-specific
    assert record["step"] == 6 and torch.isfinite(flow.log_prob(moons()[1])).all()


def test_ctrl_c_on_one_rank_stops_all_and_resumes_in_one_process(ddp_runs, tmp_path):
    summaries = [json.loads((ddp_runs / f"summary{r}.json").read_text()) for r in range(WORLD)]
    assert [s["interrupted"] for s in summaries] == [["interrupted", 5]] * WORLD
    run = ddp_runs / "interrupted" / "ddp"
    assert read_state(run)["step"] == 5
    h = fit(moons_flow(), *moons(), config(run, max_steps=12, val_every=4), resume=True)  # now one process
    assert h.step == 12 and h.stop_reason == "completed"
    reference = ddp_runs / "moons_reference"
    assert_same_weights(checkpoint_tensors(run)[0], checkpoint_tensors(reference / "single")[0], atol=1e-5)
    assert_same_weights(checkpoint_tensors(reference / "ddp")[0], checkpoint_tensors(reference / "single")[0],
                        atol=1e-5)


def test_one_process_checkpoint_resumes_under_ddp(ddp_runs):
    summaries = [json.loads((ddp_runs / f"summary{r}.json").read_text()) for r in range(WORLD)]
    assert [s["resumed_by_ddp"] for s in summaries] == [["completed", 12]] * WORLD
    assert_same_weights(checkpoint_tensors(ddp_runs / "resumed_by_ddp")[0],
                        checkpoint_tensors(ddp_runs / "moons_reference" / "single")[0], atol=1e-5)
    assert all("divisible by the number of processes (2)" in s["odd_batch"] for s in summaries)


def test_variational_dequantizer_stays_in_sync_across_ranks(ddp_runs):
    ranks = [torch.load(ddp_runs / f"variational{r}.pt") for r in range(WORLD)]
    assert any(k.startswith("dequantizer.") for k in ranks[0])
    before = variational_flow().state_dict()
    for k, v in ranks[0].items():
        assert torch.equal(v, ranks[1][k]), k  # the noise differs per rank, the weights may not
    assert any(not torch.equal(v, before[k]) for k, v in ranks[0].items() if k.startswith("dequantizer."))


def test_a_worker_killed_while_saving_leaves_the_last_checkpoint_intact(ddp_runs):
    run = ddp_runs / "killed"
    assert read_state(run)["step"] == 5  # the checkpoint before the one rank 0 died writing
    assert list(run.glob(".checkpoint-tmp-*"))  # what the dead writer left
    flow = moons_flow()
    load_checkpoint(run, flow)  # hashes verify
    assert all(torch.isfinite(p).all() for p in flow.parameters())
    h = fit(moons_flow(), *moons(), config(run, max_steps=40, val_every=5), resume=True)
    assert h.step == 40 and read_state(run)["step"] == 40 and not list(run.glob(".checkpoint-tmp-*"))


def test_torchrun_cli_ctrl_c_saves_once_and_resumes_in_one_process(tmp_path):
    """``torchrun ... -m pushforward train``; a Ctrl-C to the whole process group (the agent forwards it
    again to the workers); the checkpoint then continues in a single process."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
           "-m", "pushforward", "train", "--data", "moons", "--run-dir", str(run), "--max-steps", "100000",
           "--no-progress", "--set", "n_train=1024", "--set", "n_val=256", "--set", "batch_size=64",
           "--set", "val_every=10", "--set", "warmup_steps=10", "--set", "model.layers=2",
           "--set", "model.hidden=[16]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint" / "state.json").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        output = proc.communicate(timeout=90)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert output.count("training realnvp") == 1, output  # rank 0 alone prints
    assert output.count("interrupt received") == 1, output
    state = read_state(run)
    assert state["step"] >= 10 and state["history"][0]["step"] == 10, output
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [r["step"] for r in state["history"]]
    code = cli.main(["train", "--resume", "--run-dir", str(run), "--max-steps", str(state["step"] + 10),
                     "--no-progress"])
    assert code == 0 and read_state(run)["step"] == state["step"] + 10


# -- one process: checkpointing, autocast, compile -----------------------------------------------------
def _image_flows():
    torch.manual_seed(0)
    return {
        "glow": models.glow((1, 8, 8), levels=2, steps=2, hidden_channels=8),
        "realnvp_image": models.realnvp_image((1, 8, 8), levels=2, hidden_channels=8, blocks=1),
    }


def _nll(flow, x):
    return -flow.log_prob(x)


@pytest.mark.parametrize("name", ["glow", "realnvp_image"])
def test_gradient_checkpointing_gives_the_same_gradients_with_fewer_saved_activations(name):
    flow = _image_flows()[name]
    x = torch.rand(16, 1, 8, 8) * 0.9 + 0.05
    flow.log_prob(x)  # ActNorm init

    def run(checkpoint_grads: bool):
        flow.zero_grad()
        step = LossStep(flow, Distributed(), checkpoint_grads=checkpoint_grads)
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step(_nll, x).mean()
        loss.backward()
        step.close()
        return float(loss.detach()), {n: p.grad.clone() for n, p in flow.named_parameters()}, saved[0]

    loss_plain, grads_plain, saved_plain = run(False)
    loss_ckpt, grads_ckpt, saved_ckpt = run(True)
    assert loss_ckpt == loss_plain
    for n in grads_plain:
        torch.testing.assert_close(grads_ckpt[n], grads_plain[n], atol=1e-7, rtol=1e-6, msg=n)
    assert saved_ckpt < 0.5 * saved_plain, (saved_ckpt, saved_plain)
    assert len(list(checkpoint_targets(flow.transform))) > len(flow.transform)  # FactorOut entered
    assert not any("forward" in vars(m) for m in flow.modules())  # patches removed


def test_bf16_autocast_runs_the_conditioners_only_and_keeps_the_flow_in_float32():
    flow = _image_flows()["glow"]
    x = torch.rand(16, 1, 8, 8) * 0.9 + 0.05
    reference = flow.log_prob(x).detach()
    seen = {}
    first_conv = next(m for m in conditioners(flow)[0].modules() if isinstance(m, torch.nn.Conv2d))

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)  # (a hook returning a value would replace the output)

        return hook

    first_conv.register_forward_hook(record("inner"))
    conditioners(flow)[0].register_forward_hook(record("outer"))
    step = LossStep(flow, Distributed(), amp=True)
    nll = step(_nll, x)
    assert seen == {"inner": torch.bfloat16, "outer": torch.float32}
    assert nll.dtype == torch.float32
    torch.testing.assert_close(-nll.detach(), reference, rtol=2e-2, atol=0.5)  # bf16 conditioners: close
    nll.mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in flow.parameters())
    step.close()
    torch.testing.assert_close(flow.log_prob(x).detach(), reference)  # the flow itself is unchanged
    with pytest.raises(ValueError, match="float32"):
        LossStep(models.realnvp(2, layers=1, hidden=(4,)).double(), Distributed(), amp=True)


class _ShiftCoupling(Transform):
    """A layer pushforward does not ship: its conditioner lives under ``shift_network`` (no ``.net``)."""

    def __init__(self, declare: bool = True):
        super().__init__()
        self.shift_network = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(),
                                                 torch.nn.Linear(8, 1))
        self.declare = declare

    def forward(self, x, context=None):
        a, b = x[..., :1], x[..., 1:]
        return torch.cat([a, b + self.shift_network(a)], -1), x.new_zeros(x.shape[:-1])

    def inverse(self, z, context=None):
        a, b = z[..., :1], z[..., 1:]
        return torch.cat([a, b - self.shift_network(a)], -1), z.new_zeros(z.shape[:-1])

    def conditioners(self):
        return [self.shift_network] if self.declare else []


def test_bf16_autocast_finds_a_conditioner_under_any_attribute_name():
    from pushforward import Compose, Flow
    from pushforward.distributions import StandardNormal

    torch.manual_seed(0)
    flow = Flow(Compose(_ShiftCoupling(), _ShiftCoupling()), StandardNormal((2,)))
    x = torch.randn(16, 2)
    reference = flow.log_prob(x).detach()
    assert conditioners(flow) == [t.shift_network for t in flow.transform]
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)  # (a hook returning a value would replace the output)

        return hook

    flow.transform[0].shift_network[0].register_forward_hook(record("inner"))
    flow.transform[0].shift_network.register_forward_hook(record("outer"))
    step = LossStep(flow, Distributed(), amp=True)
    nll = step(_nll, x)
    assert seen == {"inner": torch.bfloat16, "outer": torch.float32} and nll.dtype == torch.float32
    torch.testing.assert_close(-nll.detach(), reference, rtol=2e-2, atol=0.1)
    step.close()
    # a network the layer does not declare runs in float32, and amp says so
    quiet = Flow(Compose(_ShiftCoupling(declare=False)), StandardNormal((2,)))
    step = LossStep(quiet, Distributed(), amp=True)
    with pytest.warns(UserWarning, match=r"transform\.transforms\.0\.shift_network"):
        nll = step(_nll, x)
    assert nll.dtype == torch.float32
    step.close()


def test_a_first_step_that_initialises_actnorm_then_draws_the_same_noise():
    from pushforward.objectives import Batch, UniformDequantization

    flow, objective = glow_flow(), UniformDequantization(17)  # ActNorm not initialised yet
    x = images()[0].images[:16]
    step = LossStep(flow, Distributed())
    loss = step(objective.loss, Batch(x), torch.Generator().manual_seed(5))  # initialises, then the step
    assert all(m._initialized for m in flow.modules() if isinstance(m, ActNorm))
    torch.testing.assert_close(loss, objective.loss(flow, Batch(x), torch.Generator().manual_seed(5)))
    step.close()


def test_checkpointing_finds_the_layers_of_any_model():
    inner = models.realnvp_image((1, 8, 8), levels=2, hidden_channels=4, blocks=1)
    flow = models.dequantized(inner.recipe, quantization_levels=17, layers=2, hidden_channels=4)
    targets = list(checkpoint_targets(flow))
    transform_targets = list(checkpoint_targets(flow.transform))
    assert targets[: len(transform_targets)] == transform_targets
    assert set(map(id, flow.dequantizer.transform.transforms)) <= set(map(id, targets))  # q(u | x) too
    from pushforward.vae import vae

    model = vae((3,), latent=2, hidden=(8,))
    x = torch.randn(4, 3)
    step = LossStep(model, Distributed(), checkpoint_grads=True)  # a model without `.transform`
    step(lambda m, x: -m.log_prob(x), x).mean().backward()
    step.close()


def test_compiled_training_equals_eager(monkeypatch):
    """``compile=True`` trains through torch.compile (here the cheap aot_eager backend: the same
    tracing, without code generation) after ActNorm's eager init, and lands on the eager weights."""
    from pushforward import Compose

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()

    def flow():
        f = moons_flow()
        f.transform = Compose(ActNorm(2), *f.transform.transforms)  # data-dependent init first
        return f

    eager, compiled = flow(), flow()
    fit(eager, *moons(), config("", max_steps=4, val_every=4))
    fit(compiled, *moons(), config("", max_steps=4, val_every=4, compile=True))
    assert eager.transform[0]._initialized and compiled.transform[0]._initialized
    assert_same_weights(compiled.state_dict(), eager.state_dict(), atol=1e-5)


def test_amp_and_checkpointing_through_fit(tmp_path):
    data = images()
    kw = {"data": "digits", "batch_size": 16, "max_steps": 3, "val_every": 3}
    fit(glow_flow(), *data, config(tmp_path / "plain", **kw))
    fit(glow_flow(), *data, config(tmp_path / "ckpt", checkpoint_grads=True, **kw))
    assert_same_weights(checkpoint_tensors(tmp_path / "ckpt")[0], checkpoint_tensors(tmp_path / "plain")[0])
    h = fit(glow_flow(), *data, config(tmp_path / "amp", amp=True, **kw))
    plain_val_nll = read_state(tmp_path / "plain")["history"][-1]["val_nll"]
    assert h.step == 3 and abs(h.rows[-1]["val_nll"] - plain_val_nll) < 0.5


# -- devices and dtypes ---------------------------------------------------------------------------------
def _recipes():
    return {
        "nice": lambda: models.nice(3, layers=2, hidden=(8,)),
        "realnvp": lambda: models.realnvp(3, layers=2, hidden=(8,)),
        "realnvp_context": lambda: models.realnvp(2, layers=2, hidden=(8,), context_features=3),
        "realnvp_image": lambda: models.realnvp_image((1, 8, 8), levels=2, hidden_channels=4, blocks=1),
        "glow": lambda: models.glow((1, 8, 8), levels=2, steps=1, hidden_channels=4),
        "maf": lambda: models.maf(3, layers=2, hidden=(8,)),
        "iaf": lambda: models.iaf(3, layers=2, hidden=(8,)),
        "nsf": lambda: models.nsf(3, layers=2, hidden=(8,)),
        "nsf_autoregressive": lambda: models.nsf(3, layers=2, hidden=(8,), autoregressive=True),
        "dequantized_glow": lambda: models.dequantized(
            models.glow((1, 8, 8), levels=2, steps=1, hidden_channels=4).recipe, quantization_levels=17,
            layers=2, hidden_channels=4),
    }


def _stray_tensors(module: torch.nn.Module) -> list[str]:
    """Tensor attributes that are neither parameters nor buffers: they would not follow ``.to()``."""
    return [f"{name or 'flow'}.{k}" for name, m in module.named_modules() for k, v in vars(m).items()
            if isinstance(v, torch.Tensor) and k not in m._parameters and k not in m._buffers]


@pytest.mark.parametrize("name", sorted(_recipes()))
def test_to_moves_every_parameter_and_buffer(name):
    torch.manual_seed(0)
    flow = _recipes()[name]()
    assert _stray_tensors(flow) == []
    x = torch.rand(5, *flow.event_shape) * 0.9 + 0.05
    c = torch.randn(5, 3) if flow.recipe["kwargs"].get("context_features") else None
    lp32 = flow.log_prob(x, c).detach()  # ActNorm init in float32
    flow.to(torch.float64)
    tensors = dict(flow.named_parameters()) | dict(flow.named_buffers())
    assert {k for k, v in tensors.items() if v.is_floating_point() and v.dtype != torch.float64} == set()
    lp64 = flow.log_prob(x.double(), None if c is None else c.double())
    assert lp64.dtype == torch.float64
    torch.testing.assert_close(lp64.float(), lp32, atol=1e-3, rtol=1e-4)
    assert flow.sample(3, None if c is None else c[:1].double()).dtype == torch.float64
    if getattr(flow, "dequantizer", None) is not None:
        y, log_q = flow.dequantizer(torch.randint(0, 17, (3, 1, 8, 8)), torch.float64)
        assert y.dtype == log_q.dtype == torch.float64
    flow.to("meta")  # another device, without a GPU: nothing may stay behind on the CPU
    assert {k for k, v in (dict(flow.named_parameters()) | dict(flow.named_buffers())).items()
            if v.device.type != "meta"} == set()


def test_device_names():
    assert resolve_device("CPU") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="cuda"):
            resolve_device("cuda")
    else:  # pragma: no cover - GPU machines
        assert resolve_device("cuda", local_rank=1, distributed=True) == torch.device("cuda", 1)
    if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        with pytest.raises(ValueError, match="mps"):
            resolve_device("mps")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu7")
