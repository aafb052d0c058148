"""Saving and loading flows without pickling: weights in safetensors, architecture as JSON.

A recipe-built flow (``flow.recipe`` set) is rebuilt from its recipe name and arguments, then its
weights are loaded strictly, so a mismatched or corrupted file is a clear error, never code execution.
Files that record the former argument names (``bound``, now ``scale_bound`` or ``tail_bound``; the
dequantizer's ``levels``, now ``quantization_levels``) still load.
Loading is exact: every tensor comes back with the dtype and the bits it was saved with (a float64
flow stays float64), and a tensor whose dtype cannot be matched is an error, never a silent cast.

Integrity: :func:`save` records the SHA-256 of the recipe record and of every tensor in the file's
metadata, and :func:`load` checks it, so a flipped bit anywhere in the tensors or the record is an
error naming the file. Before reading any tensor, :func:`load` builds the recorded architecture under
an allocation limit tied to the size of the file's tensors and compares its tensor names and shapes
with the file's header: a small file cannot make it allocate an arbitrary amount of memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .core import Flow
from .rundir import file_mode

__all__ = ["load", "save"]

_KEY = "pushforward_recipe"
_SHA_KEY = "pushforward_sha256"  # of the recipe record and every tensor's name, dtype, shape and bytes
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
    """Calls ``write(tmp_path)`` then renames the file into place, so ``path`` is never half-written.

    The file gets the mode the umask gives any new file (``0o644`` under the usual ``022``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp made it 0600: give it the mode any new file gets (the umask's)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dtype_of(state: dict[str, Tensor]) -> torch.dtype | None:
    """The most common floating-point dtype among ``state``'s tensors (``None`` if there is none)."""
    counts = Counter(v.dtype for v in state.values() if v.is_floating_point())
    return counts.most_common(1)[0][0] if counts else None


def dtype_mismatches(module: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """``"key: saved -> module"`` for every entry of ``state`` whose dtype differs from ``module``'s
    tensor."""
    own = module.state_dict()
    return [f"{k}: {v.dtype} -> {own[k].dtype}" for k, v in state.items()
            if k in own and own[k].dtype != v.dtype]


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
            param, buffer = owner._parameters.get(name), owner._buffers.get(name)
            if param is not None:
                param.data = param.data.to(saved.dtype)
            elif buffer is not None:
                owner._buffers[name] = buffer.to(saved.dtype)


def _renamed(recipe: dict) -> dict:
    """A recipe record written under ``_OLD_KEY``, with today's argument names."""
    names = _RENAMED.get(str(recipe.get("recipe")), {})
    kwargs = {names.get(k, k): v for k, v in recipe.get("kwargs", {}).items()}
    if isinstance(kwargs.get("flow"), dict):  # dequantized(flow=<inner record>)
        kwargs["flow"] = _renamed(kwargs["flow"])
    return {**recipe, "kwargs": kwargs}


def _digest(recipe_json: str, state: dict[str, Tensor]) -> str:
    """SHA-256 of the recipe record and of every tensor (name, dtype, shape, bytes), in name order: what
    a file written by :func:`save` must still hold when it is loaded."""
    h = hashlib.sha256(recipe_json.encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_FACTORIES = ("empty", "empty_strided", "zeros", "ones", "full", "rand", "randn", "randint", "normal", "eye",
              "arange", "randperm", "new_empty", "new_zeros", "new_ones", "new_full")


class _AllocationLimit(TorchDispatchMode):
    """Refuses (``MemoryError``) to allocate more than ``limit`` bytes in all while it is active: building
    the architecture a file records must not cost far more than the file's own tensors."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.used = limit, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _FACTORIES:  # count what is asked for before it is allocated
            dims = [a for a in args if isinstance(a, list | tuple) and all(isinstance(d, int) for d in a)]
            ints = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
            numel = math.prod(dims[0]) if dims else (max(ints) ** (2 if name == "eye" else 1) if ints else 1)
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            self.used += numel * torch.empty((), dtype=dtype).element_size()
            if self.used > self.limit:
                raise MemoryError(f"{self.used:,} bytes")
        return func(*args, **kwargs)


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
    record = json.dumps(flow.recipe)
    metadata = {_KEY: record, _SHA_KEY: _digest(record, state)}
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
            header = {}
            for key in f.keys():
                part = f.get_slice(key)
                header[key] = (tuple(part.get_shape()), part.get_dtype())
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({_one_line(e)})") from e
    text = metadata.get(_KEY)
    try:
        state = st.load_file(str(path), device="cpu")  # no more memory than the file's own tensors
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({_one_line(e)})") from e
    if _SHA_KEY in metadata and (text is None or _digest(text, state) != metadata[_SHA_KEY]):
        raise ValueError(f"{path} is corrupted: its tensors or architecture record differ from the SHA-256 "
                         "recorded when it was saved")
    try:
        if text is not None:
            recipe = json.loads(text)
        elif _OLD_KEY in metadata:
            recipe = _renamed(json.loads(metadata[_OLD_KEY]))
        else:
            raise ValueError(f"{path} has no pushforward architecture record; was it written by "
                             "pushforward.save?")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupted: its architecture record is not valid JSON ({e})") from e
    if not isinstance(recipe, dict):
        raise ValueError(f"{path} is corrupted: its architecture record is not a recipe")
    flow = _skeleton(path, recipe, header, build)
    try:
        _match_dtypes(flow, state)
        flow.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path} does not match the architecture it records: {_one_line(e)}") from e
    if bad := dtype_mismatches(flow, state):  # pragma: no cover - _match_dtypes converted them all
        raise ValueError(f"{path}: tensors changed dtype on loading: {', '.join(bad)}")
    return flow.to(map_location)


def _skeleton(path: Path, recipe: dict, header: dict[str, tuple[tuple[int, ...], str]], build) -> Flow:
    """The recorded architecture, built without letting it allocate far more than the file holds, and
    checked against the tensor names and shapes of the file's header before any tensor is read."""
    sizes = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
             "U16": 2}
    data_bytes = sum(math.prod(shape) * sizes.get(dtype, 1) for shape, dtype in header.values())
    limit = 4 * data_bytes + (64 << 20)  # float32 build of a float64/bf16 file, buffers the file omits
    try:
        with _AllocationLimit(limit):
            flow = build(recipe)
    except MemoryError as e:
        raise ValueError(f"{path} records an architecture far larger than the {data_bytes:,} bytes of "
                         f"tensors it holds (building it asked for more than {limit:,} bytes): it does not "
                         f"match its record {json.dumps(recipe)[:200]}") from e
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{path} records an architecture that cannot be built ({_one_line(e)})") from e
    expected = {k: tuple(v.shape) for k, v in flow.state_dict().items()}
    saved = {k: shape for k, (shape, _) in header.items()}
    if expected != saved:
        missing = sorted(set(expected) - set(saved))
        extra = sorted(set(saved) - set(expected))
        shapes = sorted(k for k in set(expected) & set(saved) if expected[k] != saved[k])
        parts = [f"missing {', '.join(missing[:3])}" if missing else "",
                 f"unexpected {', '.join(extra[:3])}" if extra else "",
                 ("shape of " + ", ".join(f"{k} {saved[k]} != {expected[k]}" for k in shapes[:3]))
                 if shapes else ""]
        raise ValueError(f"{path} does not match the architecture it records: "
                         f"{'; '.join(p for p in parts if p)}")
    return flow


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
