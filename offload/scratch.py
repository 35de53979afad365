"""Per-thread scratch bytes, kept between calls: an in-place build or conversion copies an expert's stored bytes
here before writing its new form over them (``hqq_backend.host_linear``'s overwrite, ``experts.tier_form``)."""

from __future__ import annotations

import threading

import torch
from torch import Tensor

_scratch = threading.local()


def thread_scratch(nbytes: int) -> Tensor:
    """``nbytes`` of uint8 owned by the calling thread and kept between calls (grown when asked for more), so its
    pages are already mapped at the next call. The callers never nest, so one buffer a thread serves them all."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < nbytes:
        # A normal tensor even when first asked for inside inference mode (a decode step): an inference tensor
        # could not be written outside it later (the bench's memory report builds a slot there).
        with torch.inference_mode(False):
            _scratch.buffer = buffer = torch.empty(nbytes, dtype=torch.uint8)
    return buffer[:nbytes]
