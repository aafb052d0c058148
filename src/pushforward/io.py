"""Saving and loading flows without pickling: weights in safetensors, architecture as JSON.

A recipe-built flow (``flow.config`` set) is rebuilt from its recipe name and arguments, then its
weights are loaded strictly, so a mismatched or corrupted file is a clear error, never code execution.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .core import Flow

__all__ = ["save", "load"]

_KEY = "pushforward_config"


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("saving flows needs safetensors: pip install safetensors") from e
    return st


def atomic_write(path: str | os.PathLike, write) -> None:
    """Calls ``write(tmp_path)`` then renames the file into place, so ``path`` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(flow: Flow, path: str | os.PathLike) -> None:
    """Writes ``flow``'s weights and recipe to one ``.safetensors`` file, atomically.

    Args:
        flow: a recipe-built flow (``flow.config`` set), e.g. from :mod:`pushforward.models`.
        path: the file to write (its directory is created).

    Raises:
        ValueError: if the flow was not built by a recipe, so its architecture cannot be recorded.
    """
    if flow.config is None:
        raise ValueError(
            "this flow was not built by a recipe (flow.config is None), so its architecture cannot be "
            "recorded; save flow.state_dict() and rebuild the flow yourself"
        )
    state = {k: v.detach().contiguous().cpu() for k, v in flow.state_dict().items()}
    metadata = {_KEY: json.dumps(flow.config)}
    atomic_write(path, lambda tmp: _safetensors().save_file(state, tmp, metadata=metadata))


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Flow:
    """Rebuilds a flow saved by :func:`save`: its recipe from the JSON record, then its weights.

    Nothing is unpickled, so loading an untrusted file cannot run code.

    Args:
        path: a file written by :func:`save` (or a run's ``best.safetensors``).
        map_location: device to load the weights onto.

    Returns:
        The flow, on ``map_location``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is unreadable, has no architecture record or does not match it.
    """
    from .models import build

    st = _safetensors()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no saved flow at {path}")
    try:
        with st.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = st.load_file(str(path), device=str(map_location))
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from e
    if _KEY not in metadata:
        raise ValueError(f"{path} has no pushforward architecture record; was it written by pushforward.save?")
    flow = build(json.loads(metadata[_KEY]))
    try:
        flow.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not match the architecture it records: {e}") from e
    return flow.to(map_location)
