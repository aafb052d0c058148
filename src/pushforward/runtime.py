"""Process-wide settings for the command-line tool (never applied by importing the library).

On CPU, torch allocates every tensor with the C library's ``malloc``. glibc serves large blocks (the
activations of a training step: megabytes) with fresh ``mmap`` pages and returns them to the system
on ``free`` once enough is free at the top of the heap, so each step touches new pages and pays a
page fault per 4 KiB: about 10,000 faults and 10-15% of a Glow training step on one thread, measured on
this project's machine. :func:`tune_allocator` makes glibc
keep freed memory in the heap and reuse it: the same effect as the allocators (jemalloc, tcmalloc)
that PyTorch's CPU performance guide suggests preloading, without a dependency. The process then
keeps its peak memory instead of giving it back between steps, which a training run reaches on its
first step anyway.

``pushforward`` (the CLI) calls it at start; ``PUSHFORWARD_TUNE_MALLOC=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_allocator"]

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def tune_allocator() -> bool:
    """Makes glibc's ``malloc`` reuse freed heap memory instead of mapping fresh pages each time.

    Sets ``M_MMAP_MAX = 0`` (large blocks come from the heap, not from ``mmap``) and a trim
    threshold of 2 GiB (freed memory stays in the process). Does nothing off Linux/glibc or when the
    environment variable ``PUSHFORWARD_TUNE_MALLOC`` is ``0``.

    Returns:
        ``True`` if both settings were applied.
    """
    if os.environ.get("PUSHFORWARD_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
