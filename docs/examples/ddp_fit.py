"""Data-parallel training from Python: 2 processes (gloo on the CPU) share one global batch.

Run it with ``python docs/examples/ddp_fit.py [steps]``. Under ``torchrun`` you would not start the
processes yourself; here ``torch.multiprocessing.spawn`` does, and each process joins the group
before calling ``fit``, which then trains with ``DistributedDataParallel`` on that group.
"""

import socket
import sys
import tempfile

import torch
import torch.distributed as dist

from pushforward import models
from pushforward.data import toy_sample
from pushforward.train import fit


def worker(rank: int, world: int, port: int, steps: int, run_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)  # DDP also broadcasts rank 0's weights when it wraps the flow
    flow = models.realnvp(2, layers=4, hidden=(64, 64))
    train, val = toy_sample("moons", 8192, seed=1), toy_sample("moons", 1024, seed=2)
    config = {"batch_size": 256, "max_steps": steps, "val_every": steps, "progress": False,
              "device": "cpu", "threads": 1}
    history = fit(flow, train, val, config, run_dir=run_dir)  # rank 0 alone writes run_dir
    if rank == 0:
        print(f"{world} processes x {256 // world} examples per step, {history.step} steps: "
              f"validation NLL {history.best_val_nll:.3f} nats")
    dist.destroy_process_group()


if __name__ == "__main__":
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as run_dir:
        torch.multiprocessing.spawn(worker, args=(2, port, steps, run_dir), nprocs=2)
