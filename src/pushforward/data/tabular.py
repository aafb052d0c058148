"""Numeric tables (CSV, ``.npy``, ``.npz``) split into train/val/test and standardised."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["TabularData", "load_table", "read_table"]

PathLike = str | os.PathLike[str]

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class TabularData:
    """Train/val/test splits of a table, each a float32 tensor of shape ``(n_split, D)``.

    ``mean`` and ``std`` (shape ``(D,)``) are the statistics that were used for
    standardisation (computed on ``train`` only); the raw data is ``x * std + mean``.
    Without standardisation they are zeros and ones.
    """

    train: Tensor
    val: Tensor
    test: Tensor
    mean: Tensor
    std: Tensor

    @property
    def dim(self) -> int:
        """Number of columns ``D``."""
        return int(self.train.shape[1])

    def unstandardize(self, x: Tensor) -> Tensor:
        """Map standardised rows back to the original units."""
        return x * self.std.to(x) + self.mean.to(x)


def _parse_float(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _split_line(line: str, delimiter: str | None) -> list[str]:
    return [c.strip() for c in (line.split(delimiter) if delimiter else line.split())]


def _read_text(path: Path) -> np.ndarray:
    """Parse a numeric delimited text file (comma, semicolon, tab or whitespace)."""
    with open(path, encoding="utf-8-sig") as fh:
        lines = [(i + 1, ln.rstrip("\r\n")) for i, ln in enumerate(fh)]
    lines = [(no, ln) for no, ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"{path}: the file contains no data rows")
    first = lines[0][1]
    delimiter = next((d for d in (",", ";", "\t") if d in first), None)
    header = _split_line(first, delimiter)
    if all(_parse_float(c) is None for c in header):
        lines = lines[1:]  # a header row: no cell is a number
        if not lines:
            raise ValueError(f"{path}: the file has a header row but no data rows")
    else:
        header = []
    n_cols = len(_split_line(lines[0][1], delimiter))
    try:  # fast path; on any problem the slow loop below finds and reports it precisely
        fast = np.loadtxt([ln for _, ln in lines], delimiter=delimiter, comments=None, ndmin=2)
        if fast.shape == (len(lines), n_cols) and np.isfinite(fast).all():
            return fast
    except ValueError:
        pass
    rows = np.empty((len(lines), n_cols), dtype=np.float64)
    for r, (line_no, line) in enumerate(lines):
        cells = _split_line(line, delimiter)
        if len(cells) != n_cols:
            raise ValueError(f"{path}: line {line_no} has {len(cells)} columns, expected {n_cols}")
        for c, cell in enumerate(cells):
            value = _parse_float(cell)
            if value is None or not math.isfinite(value):
                name = f" ({header[c]!r})" if c < len(header) else ""
                found = "an empty cell" if not cell else repr(cell)
                raise ValueError(
                    f"{path}: line {line_no} (data row {r + 1}), column {c + 1}{name}: "
                    f"expected a finite number, found {found}"
                )
            rows[r, c] = value
    return rows


def _as_table(arr: np.ndarray, source: str) -> np.ndarray:
    """Validate a loaded array: numeric, 1-D or 2-D, all finite."""
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{source}: expected a numeric array, found dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{source}: expected a 1-D or 2-D array, found shape {arr.shape}")
    arr = arr.astype(np.float64)
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        r, c = (int(v) for v in bad[0])
        raise ValueError(
            f"{source}: row {r}, column {c} (0-based): expected a finite number, found {arr[r, c]}"
        )
    return arr


def read_table(path: PathLike) -> np.ndarray:
    """Read a numeric table as a float64 array of shape ``(N, D)``.

    The format is detected from the file's first bytes: ``.npy`` (magic ``\\x93NUMPY``),
    ``.npz`` (a zip; key ``'x'``, else ``'data'``, else the first array), otherwise
    delimited text. In text files, blank lines and lines starting with ``#`` are ignored;
    the delimiter is the first of ``,`` ``;`` tab found in the first row (else
    whitespace); the first row is a header when none of its cells is a number.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: On a non-numeric, empty, NaN or infinite cell (naming the file, line
            and column and what was found), ragged rows, or an unusable array.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic.startswith(_NPY_MAGIC):
        return _as_table(np.load(path, allow_pickle=False), str(path))
    if magic.startswith(_ZIP_MAGIC):
        with np.load(path, allow_pickle=False) as npz:
            if not npz.files:
                raise ValueError(f"{path}: the .npz archive holds no arrays")
            key = next((k for k in ("x", "data") if k in npz.files), npz.files[0])
            return _as_table(npz[key], f"{path}[{key!r}]")
    return _read_text(path)


def _split_sizes(n: int, split: Sequence[float]) -> tuple[int, int, int]:
    if len(split) != 3 or any(not (f >= 0) for f in split) or not math.isclose(sum(split), 1.0):
        raise ValueError(f"split must be three non-negative fractions summing to 1, got {tuple(split)}")
    n_val, n_test = round(split[1] * n), round(split[2] * n)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"split {tuple(split)} of {n} rows leaves no training rows")
    return n_train, n_val, n_test


def load_table(
    path: PathLike | None = None,
    *,
    train: PathLike | None = None,
    val: PathLike | None = None,
    test: PathLike | None = None,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    standardize: bool = True,
    min_std: float = 1e-8,
) -> TabularData:
    """Load a numeric table and split/standardise it.

    Either pass one ``path``, whose rows are shuffled with ``numpy.random.default_rng(seed)``
    and cut into train/val/test with sizes ``round(split[1] * N)`` (val),
    ``round(split[2] * N)`` (test) and the rest (train); or pass all of ``train``, ``val``
    and ``test`` (files already split; ``split`` and ``seed`` are then unused).
    See :func:`read_table` for the accepted formats.

    With ``standardize``, every split is mapped to ``(x - mean) / std`` where ``mean`` and
    the population ``std`` come from the training rows only. A column whose training std
    is below ``min_std`` (e.g. constant) gets ``std = 1``: it is only centred, so val/test
    values are never blown up by a near-zero divisor.

    Raises:
        FileNotFoundError: If a file is missing.
        ValueError: Bad cells (see :func:`read_table`), mismatched column counts,
            an invalid ``split``, or an invalid combination of arguments.
    """
    given = [p is not None for p in (train, val, test)]
    if path is not None and any(given):
        raise ValueError("pass either path or train/val/test files, not both")
    if path is not None:
        table = read_table(path)
        n_train, n_val, _ = _split_sizes(table.shape[0], split)
        perm = np.random.default_rng(seed).permutation(table.shape[0])
        parts = np.split(table[perm], [n_train, n_train + n_val])
        sources = [str(path)] * 3
    elif all(given):
        sources = [str(p) for p in (train, val, test)]
        parts = [read_table(p) for p in sources]
    else:
        raise ValueError("pass a path, or all three of train=, val= and test=")
    dims = {p.shape[1] for p in parts}
    if len(dims) != 1:
        shown = ", ".join(f"{s}: {p.shape[1]}" for s, p in zip(sources, parts, strict=True))
        raise ValueError(f"the splits have different numbers of columns ({shown})")
    d = dims.pop()
    if standardize:
        mean, std = parts[0].mean(axis=0), parts[0].std(axis=0)
        std = np.where(std < min_std, 1.0, std)
    else:
        mean, std = np.zeros(d), np.ones(d)
    tensors = [torch.from_numpy(((p - mean) / std).astype(np.float32)) for p in parts]
    return TabularData(
        *tensors,
        mean=torch.from_numpy(mean.astype(np.float32)),
        std=torch.from_numpy(std.astype(np.float32)),
    )
