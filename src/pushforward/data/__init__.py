"""Data sets: one registry (:mod:`~pushforward.data.registry`), 2-D toy densities, tables and discrete images.

Importing the package loads only the registry and the built-in entries (no torch, no numpy); the
readers in :mod:`~pushforward.data.toy`, :mod:`~pushforward.data.images` and
:mod:`~pushforward.data.tabular` load on first use of one of their names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import builtin  # noqa: F401  (registers the shipped data sets)
from .registry import KINDS, Dataset, DatasetEntry, describe, entries, lookup, names, register, unregister

if TYPE_CHECKING:
    from .images import (
        FASHION_MNIST_ROOT,
        ImageData,
        dequantize,
        load_digits,
        load_fashion_mnist,
        load_idx_dir,
        read_idx,
        split_off,
    )
    from .tabular import TabularData, load_table, read_table
    from .toy import TOY_DENSITIES, toy_entropy, toy_log_prob, toy_sample

_LAZY = {
    **dict.fromkeys(("FASHION_MNIST_ROOT", "ImageData", "dequantize", "load_digits", "load_fashion_mnist",
                     "load_idx_dir", "read_idx", "split_off"), "images"),
    **dict.fromkeys(("TabularData", "load_table", "read_table"), "tabular"),
    **dict.fromkeys(("TOY_DENSITIES", "toy_entropy", "toy_log_prob", "toy_sample"), "toy"),
}

__all__ = [
    "FASHION_MNIST_ROOT",
    "KINDS",
    "TOY_DENSITIES",
    "Dataset",
    "DatasetEntry",
    "ImageData",
    "TabularData",
    "dequantize",
    "describe",
    "entries",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_dir",
    "load_table",
    "lookup",
    "names",
    "read_idx",
    "read_table",
    "register",
    "split_off",
    "toy_entropy",
    "toy_log_prob",
    "toy_sample",
    "unregister",
]


def __getattr__(name: str) -> Any:  # PEP 562: the torch-backed readers load on first use
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
