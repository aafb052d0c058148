"""The glue between a :class:`~pushforward.config.TrainConfig`, the data sets and a run directory.

:func:`load_dataset` turns ``config.data`` into train / validation / test splits (deterministic
in ``config.seed``); :func:`build_flow` builds the configured recipe for that data; :func:`open_run`
reopens a finished (or interrupted) run for evaluation and sampling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import CHECKPOINT, JSON_FILE, MODEL_FILE, read_state
from .config import TrainConfig, config_from_dict, dataset_kind, model_kwargs
from .core import Flow
from .train import seed_from

__all__ = ["Dataset", "Run", "build_flow", "load_dataset", "open_run"]


@dataclass
class Dataset:
    """Three splits of one data set. Images are ``ImageData`` (integers), everything else float tensors.

    ``info`` records how the data were prepared, e.g. the training mean and standard deviation
    used to standardise a table (the reported NLL is in that standardised space).
    """

    name: str
    kind: str
    train: Any
    val: Any
    test: Any
    event_shape: tuple[int, ...]
    levels: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def is_image(self) -> bool:
        return self.levels is not None


def _subset(data: Any, index: Tensor) -> Any:
    return data[index] if isinstance(data, Tensor) else data.subset(index)


def load_dataset(config: TrainConfig) -> Dataset:
    """Loads ``config.data`` and splits it; ``config.max_train`` caps the training set.

    Toy densities: fresh seeded samples per split. Digits: the fixed 1437/180/180 split of
    :func:`pushforward.data.load_digits`. Fashion-MNIST: 5000 random training images (seeded)
    for validation, the official test set. Tables: a seeded split, standardised with the
    training statistics (the NLL is in that space).
    """
    from . import data as D

    kind = dataset_kind(config.data)
    if kind == "toy":
        train, val, test = (D.toy_sample(config.data, n, seed=seed_from(config.seed, 10 + i))
                            for i, n in enumerate((config.n_train, config.n_val, config.n_test)))
        ds = Dataset(config.data, kind, train, val, test, (2,), info={"density": config.data})
    elif kind == "digits":
        train, val, test = (D.load_digits(s) for s in ("train", "val", "test"))
        ds = Dataset(kind, "image", train, val, test, tuple(train.images.shape[1:]), train.levels,
                     info={"split": "fixed 1437/180/180 split of pushforward.data.load_digits"})
    elif kind == "fashion-mnist":
        train, val = D.split_off(D.load_fashion_mnist("train"), 5000, seed=config.seed)
        test = D.load_fashion_mnist("test")
        ds = Dataset(kind, "image", train, val, test, tuple(train.images.shape[1:]), train.levels,
                     info={"split": "5000 random training images for validation; the official test set"})
    else:
        fractions = (1 - config.val_fraction - config.test_fraction, config.val_fraction, config.test_fraction)
        table = D.load_table(config.data, split=fractions, seed=config.seed)
        info = {"standardised": True, "mean": table.mean.tolist(), "std": table.std.tolist(),
                "note": "NLL is reported in the standardised space (training-set mean and std)"}
        ds = Dataset(Path(config.data).stem, "table", table.train, table.val, table.test, (table.dim,), info=info)
    if config.max_train > 0 and config.max_train < n_examples(ds.train):
        ds.train = _subset(ds.train, torch.arange(config.max_train))
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
            raise ValueError(f"dequantization = 'variational' is for discrete images; {dataset.name} is not one")
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
            return json.loads((d / "config.json").read_text())["train"]
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
        raise FileNotFoundError(f"no config.json (or checkpoint state) next to {weights}; cannot tell its data")
    flow = load(weights, map_location=map_location)
    flow.eval()
    return Run(flow, config_from_dict(values), run_dir, weights)


def quantize(y: Tensor, levels: int) -> Tensor:
    """Maps dequantized values ``y`` in ``[0, 1]`` back to grey levels, scaled to ``[0, 1]`` for display."""
    x = torch.floor(y.clamp(0, 1) * levels).clamp(0, levels - 1)
    return x / max(1, levels - 1)


def n_examples(data: Any) -> int:
    return len(data) if isinstance(data, Tensor) else len(data.images)
