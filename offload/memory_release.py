"""Handing freed heap pages back to the OS: glibc keeps the holes that freed tensors leave below the heap's top."""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None elsewhere (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Give the heap pages that freed tensors left behind back to the OS, where glibc allows it.

    Rebuilding an expert on a CPU (reading its codes, unpacking and repacking them for the int4 kernel, or
    dequantizing them) frees a few MB of temporaries per matrix between the tensors it keeps. glibc keeps such
    holes below the heap's top, so without this the process's peak RSS grows by about half the model's size
    (measured on a 4-bit checkpoint: 0.86 GB instead of 0.72 GB peak).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
