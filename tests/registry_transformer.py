"""Registry entries of the transformer family: transform cases (test_transforms.py) and small recipe
instances (saved and loaded bit-exactly by test_io_dtype.py; compiled with fullgraph by test_compile.py when
listed in COMPILE)."""

from __future__ import annotations

from collections.abc import Callable

from registry_types import Case

CASES: dict[str, Case] = {}
RECIPES: dict[str, Callable] = {}
COMPILE: dict[str, Callable] = {}
