"""The CLI's allocator setting: a training step stops page-faulting fresh memory."""

import os
import subprocess
import sys

import pytest

from pushforward.runtime import tune_allocator

_STEPS = """
import resource, sys, torch
from pushforward import models
from pushforward.runtime import tune_allocator
torch.set_num_threads(1)
applied = tune_allocator() if sys.argv[1] == "1" else False
torch.manual_seed(0)
flow = models.glow((1, 28, 28), levels=2, steps=4, hidden_channels=64)
x = torch.rand(64, 1, 28, 28)
opt = torch.optim.Adam(flow.parameters(), 1e-4)
faults = []
for _ in range(8):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    opt.zero_grad()
    (-flow.log_prob(x).mean()).backward()
    opt.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(applied, sum(faults[3:]))
"""


def _faults(tuned: bool) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", _STEPS, "1" if tuned else "0"], capture_output=True,
                         text=True, check=True, env={**os.environ, "PUSHFORWARD_TUNE_MALLOC": "1"})
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_stops_page_faults_in_training_steps():
    applied, tuned = _faults(True)
    assert applied
    _, default = _faults(False)
    # glibc's default returns the freed activations to the system after each step and faults them
    # back in on the next (thousands of 4 KiB pages per step); tuned, the heap is reused
    assert tuned * 5 < default, (tuned, default)


def test_tune_allocator_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("PUSHFORWARD_TUNE_MALLOC", "0")
    assert tune_allocator() is False
