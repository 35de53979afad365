"""The host form of a 4-bit matrix: the CPU int4 kernel's own layout, in which the host store keeps experts.

A hybrid run computes some misses on the host, and a CPU device computes every expert there. Building the
kernel's layout from hqq's stored one costs about 70 to 120 ms for a Mixtral expert at one thread, against
about 11 ms for its three matmuls: paid at every host job, it made the host path useless at real size (docs/
DESIGN.md, "Host form"). The kernel's layout takes the stored bytes exactly (the codes stay 4-bit; each fp16
(scale, zero) pair becomes a bf16 (scale, offset) pair), so the host store writes it once, at load
(``codec.host_form``), and holds nothing else:
- the host builds its modules over views of the store (``host_linear``): no copy, no repacking per call;
- a CPU device's cache slot receives those bytes and does the same;
- a GPU takes the copied bytes apart on the device (``unpack_int4``) and packs them for its own kernel
  (``device_linear``): the repacking for the device happens after the copy, on the device, never on the host.

A matrix in host form is ``{"packed": (N, K / 2) uint8, "pairs": (K / group, N, 2) bf16}``: the output width,
the row length and the group are read from the shapes, never from tensor values. The packing's block of rows
depends on this CPU's vector width (``host_kernels.packs_as_blocks``), so the host form lives in memory only;
checkpoints keep hqq's layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from offload.quant.device_kernels import (
    CudaInt4Linear,
    cuda_int4_fits,
    dequantized,
)
from offload.quant.host_kernels import Int4Linear, unpack_int4

KEYS = ("packed", "pairs")


def is_host_form(matrix: dict[str, Tensor]) -> bool:
    """Whether one matrix's tensors (without the ``w1.`` prefix) are in the host form."""
    return set(matrix) == set(KEYS)


def shape(matrix: dict[str, Tensor]) -> tuple[int, int, int]:
    """(out_features, in_features, group_size) of a host-form matrix, from its shapes."""
    out_features, half_columns = matrix["packed"].shape
    in_features = 2 * half_columns
    return out_features, in_features, in_features // matrix["pairs"].shape[0]


def host_linear(matrix: dict[str, Tensor]) -> Int4Linear:
    """The CPU int4 kernel's linear over the host form's tensors themselves (views: nothing is copied)."""
    return Int4Linear(matrix["packed"], matrix["pairs"], shape(matrix)[2])


def device_linear(matrix: dict[str, Tensor], device: torch.device) -> CudaInt4Linear | None:
    """torch's CUDA int4 linear over a host-form matrix already on ``device``: its codes unpacked and packed
    again there; the (scale, offset) pairs are the CUDA kernel's as they are. None where the kernel does not fit
    the shape or the device."""
    out_features, in_features, group_size = shape(matrix)
    if not cuda_int4_fits(out_features, in_features, group_size, device):
        return None
    return CudaInt4Linear.from_pairs(unpack_int4(matrix["packed"]), matrix["pairs"], group_size)


def dequantize(matrix: dict[str, Tensor]) -> Tensor:
    """The fp32 (N, K) weights the kernels multiply by, on the tensors' device (the dense fallback)."""
    return dequantized(unpack_int4(matrix["packed"]), matrix["pairs"], shape(matrix)[2])
