"""The glue between a :class:`~pushforward.config.TrainConfig`, the data sets and a run directory.

:func:`load_dataset` turns ``config.data`` into train / validation / test splits through the data
set registry (deterministic in ``config.seed``); :func:`build_flow` builds the configured recipe for
that data; :func:`open_run` reopens a finished (or interrupted) run for evaluation and sampling.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import CHECKPOINT, JSON_FILE, MODEL_FILE, read_state, verify_file
from .config import TrainConfig, config_from_dict, dataset_entry, model_kwargs
from .core import Flow
from .data.registry import Dataset

__all__ = ["TEST_BUDGET", "Dataset", "Run", "build_flow", "load_dataset", "open_run", "test_budget"]


def _subset(data: Any, index: Tensor) -> Any:
    return data[index] if isinstance(data, Tensor) else data.subset(index)


#: The environment variable that shrinks every run to a smoke test (the README's commands in the test suite).
TEST_BUDGET = "PUSHFORWARD_TEST_BUDGET"


def test_budget() -> int:
    """``PUSHFORWARD_TEST_BUDGET=N``: every training run takes at most ``N`` optimizer steps and every split
    is cut to its first ``max(16, 32 N)`` examples (``0``: unset, the normal behaviour). It makes the
    README's commands run in seconds in the test suite; the figures it gives mean nothing."""
    text = os.environ.get(TEST_BUDGET, "").strip()
    if not text:
        return 0
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{TEST_BUDGET}={text!r}: must be a number of steps >= 1 (or unset)")
    return int(text)


def load_dataset(config: TrainConfig) -> Dataset:
    """Loads ``config.data`` through its registry entry; ``config.max_train`` caps the training set.

    Each entry's loader says how it splits (see :mod:`pushforward.data.builtin`): toy densities draw
    fresh seeded samples per split, digits use a fixed split, tables a seeded split standardised with
    the training statistics. Under :func:`test_budget` every split is cut short.
    """
    ds = dataset_entry(config).load(config)
    if config.max_train > 0 and config.max_train < n_examples(ds.train):
        ds.train = _subset(ds.train, torch.arange(config.max_train))
    if budget := test_budget():
        keep = max(16, 32 * budget)
        for split in ("train", "val", "test"):
            data = getattr(ds, split)
            if n_examples(data) > keep:
                setattr(ds, split, _subset(data, torch.arange(keep)))
        ds.info["test_budget"] = budget
    return ds


def build_flow(config: TrainConfig, dataset: Dataset) -> Flow:
    """Builds the configured recipe for ``dataset`` with ``torch.manual_seed(config.seed)`` first.

    ``config.dequantization = "variational"`` wraps it in :func:`pushforward.models.dequantized`
    (keyword arguments ``config.dequantizer``), so the dequantizer is saved and rebuilt with the flow.
    """
    from .models import build

    torch.manual_seed(config.seed)
    spec = {"recipe": config.recipe, "kwargs": model_kwargs(config, dataset.event_shape)}
    if config.dequantization == "variational":
        if not dataset.is_image:
            raise ValueError(f"dequantization = 'variational' is for discrete images; {dataset.name} "
                             "is not one")
        spec = {"recipe": "dequantized",
                "kwargs": {"flow": spec, "quantization_levels": dataset.levels, **config.dequantizer}}
    return build(spec)


@dataclass
class Run:
    """A reopened run: the flow (best weights if available), its config, and where its files are."""

    flow: Flow
    config: TrainConfig
    run_dir: Path
    weights: Path


def _find_config(start: Path) -> dict | None:
    for d in (start, *start.parents[:2]):
        if (d / "config.json").exists():
            try:
                values = json.loads((d / "config.json").read_text())["train"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{d / 'config.json'} is corrupted: not the JSON record of a run "
                                 f"({e})") from None
            if not isinstance(values, dict):
                raise ValueError(f"{d / 'config.json'} is corrupted: its 'train' entry is not a table")
            return values
        if (d / JSON_FILE).exists():
            return read_state(d)["train_config"]
    return None


def open_run(path: str | Path, checkpoint: bool = False, map_location: str = "cpu") -> Run:
    """Opens a run directory (its ``best.safetensors``; ``checkpoint=True``: the last checkpoint),
    a checkpoint directory, or a ``.safetensors`` file inside a run directory."""
    from .io import load

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no run, checkpoint or weights file at {path}")
    if path.is_file():
        weights = path
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT else path.parent
    elif (path / JSON_FILE).exists():
        weights, run_dir = path / MODEL_FILE, path.parent
    else:
        run_dir = path
        best, last = path / "best.safetensors", path / CHECKPOINT / MODEL_FILE
        weights = last if checkpoint or not best.exists() else best
        if not weights.exists():
            raise FileNotFoundError(f"{path} holds neither best.safetensors nor {CHECKPOINT}/{MODEL_FILE}")
    values = _find_config(weights.parent)
    if values is None:
        raise FileNotFoundError(f"no config.json (or checkpoint state) next to {weights}; "
                                "cannot tell its data")
    if (weights.parent / JSON_FILE).exists():  # a checkpoint's weights: also the hash its state.json recorded
        verify_file(weights)
    flow = load(weights, map_location=map_location)  # checks the SHA-256 the file carries
    flow.eval()
    return Run(flow, config_from_dict(values), run_dir, weights)


def quantize(y: Tensor, levels: int) -> Tensor:
    """Maps dequantized values ``y`` in ``[0, 1]`` back to grey levels, scaled to ``[0, 1]`` for display."""
    x = torch.floor(y.clamp(0, 1) * levels).clamp(0, levels - 1)
    return x / max(1, levels - 1)


def n_examples(data: Any) -> int:
    return len(data) if isinstance(data, Tensor) else len(data.images)
