"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint is a directory holding three files:

- ``model.safetensors``: the flow's weights with its recipe in the metadata, so
  :func:`pushforward.load` opens it directly;
- ``state.safetensors``: the optimizer's tensors and the torch RNG states (uint8 tensors);
- ``state.json``: the flow's recipe, the training config, the objective, step/epoch/position, the
  scheduler, the optimizer's scalars, the python/numpy RNG states, the history, and the SHA-256 of
  both safetensors files.

The directory is written under a temporary name and then renamed into place, so a crash never
leaves a half-written or mismatched set: the previous checkpoint is moved aside first and only
deleted once the new one is in place (:func:`load_checkpoint` falls back to it if a crash hit
between the two renames). Loading verifies the hashes, so a corrupted or swapped file is a
``ValueError`` naming the file; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from .io import _dtype_of, _safetensors, dtype_mismatches, save
from .rundir import file_mode

__all__ = ["CHECKPOINT", "checkpoint_dir", "load_checkpoint", "read_state", "save_checkpoint", "verify_file"]

CHECKPOINT = "checkpoint"
_OLD = ".checkpoint-old"
_FORMAT = "pushforward-checkpoint"
_VERSION = 1
MODEL_FILE, STATE_FILE, JSON_FILE = "model.safetensors", "state.safetensors", "state.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# -- RNG and optimizer state <-> (tensors, JSON) ------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Torch RNG states as uint8 tensors; python and numpy states as JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    name, keys, pos, has_gauss, cached = legacy
    json_state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, json_state


def set_rng_state(tensors: dict[str, torch.Tensor], json_state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = json_state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json_state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Splits ``optimizer.state_dict()`` into tensors (``optim.<param>.<name>``) and JSON scalars."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def set_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        json_state: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entry in json_state["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = []
    for g in json_state["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- writing and reading ------------------------------------------------------------------------
def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint directory for a run directory or a checkpoint directory itself."""
    path = Path(path)
    if (path / JSON_FILE).exists() or path.name == CHECKPOINT:
        return path
    if not (path / CHECKPOINT).exists() and (path / _OLD).exists():
        return path / _OLD  # a crash hit between the two renames of save_checkpoint
    return path / CHECKPOINT


def save_checkpoint(run_dir: str | os.PathLike, flow, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    """Writes ``run_dir/checkpoint/`` atomically; ``state`` is JSON-serialisable training state."""
    st = _safetensors()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-tmp-", dir=run_dir))
    try:
        os.chmod(tmp, file_mode(directory=True))  # mkdtemp made it 0700: the umask decides, as anywhere
        save(flow, tmp / MODEL_FILE)
        opt_tensors, opt_json = optimizer_state(optimizer)
        rng_tensors, rng_json = rng_state()
        st.save_file({**opt_tensors, **rng_tensors}, str(tmp / STATE_FILE))
        os.chmod(tmp / STATE_FILE, file_mode())  # safetensors writes 0600
        _fsync(tmp / STATE_FILE)
        record = {
            "format": _FORMAT, "version": _VERSION, **state,
            "flow_config": flow.recipe, "optimizer": opt_json, "rng": rng_json,
            "files": {MODEL_FILE: _sha256(tmp / MODEL_FILE), STATE_FILE: _sha256(tmp / STATE_FILE)},
        }
        with open(tmp / JSON_FILE, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        final, old = run_dir / CHECKPOINT, run_dir / _OLD
        if final.exists():  # else `old` may be the only good checkpoint (a crash hit mid-swap): keep it
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        for stale in run_dir.glob(".checkpoint-tmp-*"):  # left by a process killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        try:  # make the renames durable
            fd = os.open(run_dir, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError:  # pragma: no cover - e.g. platforms without directory fsync
            pass
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks ``state.json`` of a checkpoint (run directory or checkpoint directory)."""
    ckpt = checkpoint_dir(path)
    file = ckpt / JSON_FILE
    if not file.exists():
        raise FileNotFoundError(f"no checkpoint at {ckpt} (missing {JSON_FILE})")
    try:
        record = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint file {file} is corrupted: not valid JSON ({e})") from e
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        raise ValueError(f"checkpoint file {file} is not a pushforward checkpoint (no format record)")
    if record.get("version") != _VERSION:
        raise ValueError(f"checkpoint file {file} has version {record.get('version')}, expected {_VERSION}")
    for key in ("flow_config", "optimizer", "rng", "files", "step"):
        if key not in record:
            raise ValueError(f"checkpoint file {file} is corrupted: missing {key!r}")
    return record


def verify_file(path: str | os.PathLike) -> Path:
    """Checks a file of a checkpoint directory (``model.safetensors``, ``state.safetensors``) against the
    SHA-256 its ``state.json`` recorded; returns the path.

    Raises:
        ValueError: the file is missing, corrupted or belongs to another checkpoint.
    """
    path = Path(path)
    return _verified(path.parent, path.name, read_state(path.parent))


def _verified(ckpt: Path, name: str, record: dict) -> Path:
    file = ckpt / name
    if not file.exists():
        raise ValueError(f"checkpoint file {file} is missing")
    expected = record["files"].get(name)
    if _sha256(file) != expected:
        raise ValueError(
            f"checkpoint file {file} is corrupted or does not belong to {ckpt / JSON_FILE} "
            f"(its SHA-256 differs from the one recorded)"
        )
    return file


def load_checkpoint(path: str | os.PathLike, flow, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Loads weights (and optimizer / RNG state) into ``flow`` and ``optimizer``; returns the JSON state.

    Nothing is cast: ``flow`` must have the dtypes the checkpoint was written with (a float64 run
    resumes with a float64 flow), else it is a ``ValueError`` rather than a silent rounding.

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: a corrupted file, a hash mismatch, a checkpoint of a different architecture or dtype.
    """
    st = _safetensors()
    ckpt = checkpoint_dir(path)
    record = read_state(ckpt)
    if flow.recipe is not None and record["flow_config"] != flow.recipe:
        raise ValueError(
            f"checkpoint {ckpt / JSON_FILE} was written for a different flow: "
            f"{record['flow_config']} != {flow.recipe}"
        )
    model_file = _verified(ckpt, MODEL_FILE, record)
    state_file = _verified(ckpt, STATE_FILE, record)
    try:
        weights = st.load_file(str(model_file))
        tensors = st.load_file(str(state_file))
    except Exception as e:
        raise ValueError(f"checkpoint in {ckpt} could not be read as safetensors ({e})") from e
    device = next((p.device for p in flow.parameters()), torch.device("cpu"))
    if bad := dtype_mismatches(flow, weights):  # load_state_dict would cast them silently
        raise ValueError(
            f"checkpoint file {model_file} holds tensors of another dtype than the flow ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); convert the flow first, e.g. flow.to({_dtype_of(weights)})"
        )
    try:
        flow.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint file {model_file} does not match the flow: {e}") from e
    if optimizer is not None:
        try:
            set_optimizer_state(optimizer, tensors, record["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"checkpoint file {state_file} has optimizer state that does not fit: "
                             f"{e}") from e
    if restore_rng:
        set_rng_state(tensors, record["rng"])
    return record
