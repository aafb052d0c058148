"""Saving and loading flows without pickling: weights in safetensors, architecture as JSON.

A recipe-built flow (``flow.recipe`` set) is rebuilt from its recipe name and arguments, then its
weights are loaded strictly, so a mismatched or corrupted file is a clear error, never code execution.
Files that record the former argument names (``bound``, now ``scale_bound`` or ``tail_bound``; the
dequantizer's ``levels``, now ``quantization_levels``) still load.
Loading is exact: every tensor comes back with the dtype and the bits it was saved with (a float64
flow stays float64), and a tensor whose dtype cannot be matched is an error, never a silent cast.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from .core import Flow

__all__ = ["load", "save"]

_KEY = "pushforward_recipe"
_OLD_KEY = "pushforward_config"  # the same record under its former name, with the former argument names
# argument names as they were under _OLD_KEY, per recipe
_RENAMED = {**{name: {"bound": "scale_bound"} for name in ("realnvp", "realnvp_image", "glow", "maf", "iaf")},
            "nsf": {"bound": "tail_bound"}, "dequantized": {"levels": "quantization_levels"}}


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


def _dtype_of(state: dict[str, Tensor]) -> torch.dtype | None:
    """The most common floating-point dtype among ``state``'s tensors (``None`` if there is none)."""
    counts = Counter(v.dtype for v in state.values() if v.is_floating_point())
    return counts.most_common(1)[0][0] if counts else None


def dtype_mismatches(module: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """``"key: saved -> module"`` for every entry of ``state`` whose dtype differs from ``module``'s tensor."""
    own = module.state_dict()
    return [f"{k}: {v.dtype} -> {own[k].dtype}" for k, v in state.items() if k in own and own[k].dtype != v.dtype]


def _match_dtypes(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Converts a freshly built ``module`` to the dtypes of ``state``, so loading it casts nothing.

    The whole module (non-persistent buffers included, which carry the dtype of samples) first
    goes to ``state``'s most common floating dtype; a floating tensor saved in another dtype (a
    mixed-precision model) is then converted on its own. A dtype mismatch of a non-floating tensor
    (an index, a flag) means the file does not fit the architecture: ``ValueError``.
    """
    dtype = _dtype_of(state)
    if dtype is not None:
        module.to(dtype)
    own = module.state_dict()
    for key, saved in state.items():
        if key not in own or own[key].dtype == saved.dtype:
            continue  # a missing / unexpected key is reported by the strict load
        if not (saved.is_floating_point() and own[key].is_floating_point()):
            raise ValueError(f"{key} is saved as {saved.dtype}, the architecture has {own[key].dtype}")
        owner_name, _, name = key.rpartition(".")
        owner = module.get_submodule(owner_name)
        with torch.no_grad():
            if name in owner._parameters:
                owner._parameters[name].data = owner._parameters[name].data.to(saved.dtype)
            else:
                owner._buffers[name] = owner._buffers[name].to(saved.dtype)


def _renamed(recipe: dict) -> dict:
    """A recipe record written under ``_OLD_KEY``, with today's argument names."""
    names = _RENAMED.get(str(recipe.get("recipe")), {})
    kwargs = {names.get(k, k): v for k, v in recipe.get("kwargs", {}).items()}
    if isinstance(kwargs.get("flow"), dict):  # dequantized(flow=<inner record>)
        kwargs["flow"] = _renamed(kwargs["flow"])
    return {**recipe, "kwargs": kwargs}


def save(flow: Flow, path: str | os.PathLike) -> None:
    """Writes ``flow``'s weights and recipe to one ``.safetensors`` file, atomically.

    Args:
        flow: a recipe-built flow (``flow.recipe`` set), e.g. from :mod:`pushforward.models`.
        path: the file to write (its directory is created).

    Raises:
        ValueError: if the flow was not built by a recipe, so its architecture cannot be recorded.
    """
    if flow.recipe is None:
        raise ValueError(
            "this flow was not built by a recipe (flow.recipe is None), so its architecture cannot be "
            "recorded; save flow.state_dict() and rebuild the flow yourself"
        )
    state = {k: v.detach().contiguous().cpu() for k, v in flow.state_dict().items()}
    metadata = {_KEY: json.dumps(flow.recipe)}
    atomic_write(path, lambda tmp: _safetensors().save_file(state, tmp, metadata=metadata))


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Flow:
    """Rebuilds a flow saved by :func:`save`: its recipe from the JSON record, then its weights.

    Nothing is unpickled, so loading an untrusted file cannot run code. The flow comes back in the
    precision it was saved in: every tensor has its saved dtype and exactly its saved value (a
    float64 flow is rebuilt in float64, not rounded to float32).

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
    if _KEY in metadata:
        recipe = json.loads(metadata[_KEY])
    elif _OLD_KEY in metadata:
        recipe = _renamed(json.loads(metadata[_OLD_KEY]))
    else:
        raise ValueError(f"{path} has no pushforward architecture record; was it written by pushforward.save?")
    flow = build(recipe)
    try:
        _match_dtypes(flow, state)
        flow.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path} does not match the architecture it records: {e}") from e
    if bad := dtype_mismatches(flow, state):  # pragma: no cover - _match_dtypes converted them all
        raise ValueError(f"{path}: tensors changed dtype on loading: {', '.join(bad)}")
    return flow.to(map_location)
