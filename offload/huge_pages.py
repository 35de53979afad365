"""Weights in 2 MiB pages: a decode step streams every weight it uses once, and 4 KiB pages make that a TLB miss
every 4 KiB (measured in the float32 demo's decode, one thread, in a VM: 1.09x faster a token with the model's
weights in 2 MiB pages)."""

from __future__ import annotations

import ctypes
import functools
import math
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise``, or None where there is none to ask (macOS, musl without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL("libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def huge_page_empty(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, in memory that Linux is asked to back with 2 MiB pages.

    Transparent huge pages in their default ``madvise`` mode give 2 MiB pages only to aligned ranges that ask for
    them, and torch's allocator asks for none; ``never`` mode or another OS makes this a plain ``torch.empty``.
    Smaller than one huge page, it is one too. The pages are only reserved: RSS grows as they are written.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    madvise = _madvise()
    if madvise is None or nbytes < HUGE_PAGE:
        return torch.empty(tuple(shape), dtype=dtype)
    padded = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    raw = torch.empty(padded + HUGE_PAGE, dtype=torch.uint8)  # room to start on a 2 MiB boundary
    start = -raw.data_ptr() % HUGE_PAGE
    madvise(raw.data_ptr() + start, padded, _MADV_HUGEPAGE)  # advice only: a refusal leaves 4 KiB pages
    return raw[start : start + nbytes].view(dtype).view(tuple(shape))


def into_huge_pages(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The same tensors (values, shapes, strides) in one block of 2 MiB pages, in the order given.

    Tensors that view one storage (q, k and v over their fused matrix) keep sharing it: each storage is copied
    once. CPU tensors only; the caller drops the originals, whose memory then goes back to the heap.
    """
    storages: dict[int, tuple[int, int]] = {}  # data_ptr -> (offset in the block, bytes)
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in storages:
            storages[storage.data_ptr()] = (total, storage.nbytes())
            total += -(-storage.nbytes() // 64) * 64  # keep every storage 64-byte aligned, as torch does
    block = huge_page_empty((total,), torch.uint8)
    copied: set[int] = set()
    moved = []
    for tensor in tensors:
        storage = tensor.untyped_storage()
        offset, nbytes = storages[storage.data_ptr()]
        target = block[offset : offset + nbytes]
        if storage.data_ptr() not in copied:
            target.copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
            copied.add(storage.data_ptr())
        typed = target.view(tensor.dtype)
        moved.append(
            typed.as_strided(tensor.shape, tensor.stride(), typed.storage_offset() + tensor.storage_offset())
        )
    return moved
