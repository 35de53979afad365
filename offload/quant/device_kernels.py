"""A CUDA linear that computes from 4-bit codes: torch's int4 weight-only matmul (gpt-fast's "tinygemm").

``torch.ops.aten._weight_int4pack_mm(x, packed, group, scales_and_zeros)`` computes ``x @ W.T`` with
``W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]``, ``g = k // group``: the convention of the CPU kernel
(``host_kernels``), so hqq's ``(q - zero_hqq) * scale`` becomes an offset ``(8 - zero_hqq) * scale``, as there.
``packed`` is what ``torch.ops.aten._convert_weight_to_int4pack(u8, inner_k_tiles)`` makes, on the device, from
an (N, K / 2) uint8 holding column 2j in the high nibble of byte j and column 2j + 1 in the low one.

Checked in torch's own source and tests: aten/src/ATen/native/cuda/int4mm.cu; ``_group_quantize_tensor`` in
test/test_linalg.py and torch/testing/_internal/common_quantization.py (torch 2.13), which packs
``out[:, ::2] << 4 | out[:, 1::2]`` for CUDA (uint8 input since torch 2.5); torch/_meta_registrations.py's shapes:
- the packer: a contiguous 2-D uint8 (N, K / 2); ``inner_k_tiles`` 2, 4 or 8; K a multiple of
  ``inner_k_tiles * 16``. Its kernel reads byte k of row n as v[k]H (even column) then v[k]L (odd), and writes
  an int32 (N / 8, K / (inner_k_tiles * 16), 32, inner_k_tiles / 2): N * K / 2 bytes, the stored codes' size;
- the matmul: bf16 activations, contiguous and 2-D; group 32, 64, 128 or 256, dividing K; ``scales_and_zeros``
  a (K / group, N, 2) bf16; the output width is 8 times the packed tensor's first dimension, so N % 8 == 0.
  It dequantizes with a bf16 fma ``(q - 8) * scale + zero`` and accumulates in fp32;
- it is compiled only for CUDA 12 and compute capability 8.0 or more (its device code sits under
  ``__CUDA_ARCH__ >= 800``): elsewhere it raises, or has no kernel for the GPU. So a device is probed once
  (``kernel_works``), and its answer checked, before any module uses it.

Each output tile of 8 columns is one thread block, ``grid(1, N / 8, ceil(M / 16))``, whose k-loop order depends
on K alone: a column's bits do not depend on the other columns, so stacking matrices along N (``stacked``)
keeps every output bit (checked on a GPU by tests/test_device_kernels.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from offload.quant.host_kernels import Bf16KernelLinear

log = logging.getLogger(__name__)

CUDA_INT4_GROUP_SIZES = (32, 64, 128, 256)
CUDA_INT4_N_MULTIPLE = 8  # the kernel's n-tile
INNER_K_TILES = (8, 4, 2)  # the largest that divides K is taken: 16-byte loads (gpt-fast and torchao use 8)
MIN_CAPABILITY = (8, 0)
# The probe's bound on |kernel - reference| / |reference| (Frobenius): bf16 output rounding is about 2e-3; a
# wrong layout or an empty kernel body gives errors of order 1.
PROBE_TOLERANCE = 2e-2

_probed: dict[int, str | None] = {}  # device index -> why the kernel cannot be used there (None: it works)


def inner_k_tiles(in_features: int) -> int | None:
    """The packer's ``inner_k_tiles`` for a row of ``in_features``, or None when K fits none."""
    return next((tiles for tiles in INNER_K_TILES if in_features % (tiles * 16) == 0), None)


def shape_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether the kernel takes an (out, in) matrix with ``group_size`` weights per (scale, zero)."""
    return (
        group_size in CUDA_INT4_GROUP_SIZES
        and out_features > 0
        and out_features % CUDA_INT4_N_MULTIPLE == 0
        and in_features > 0
        and in_features % group_size == 0
        and inner_k_tiles(in_features) is not None
    )


def cuda_int4_fits(out_features: int, in_features: int, group_size: int, device: torch.device | str) -> bool:
    """Whether an (out, in) matrix runs the int4 kernel on ``device``: a CUDA device where the probe passed."""
    device = torch.device(device)
    return (
        device.type == "cuda" and shape_fits(out_features, in_features, group_size) and kernel_works(device)
    )


def packer_input(codes: Tensor) -> Tensor:
    """(N, K) codes in 0..15 -> the (N, K / 2) uint8 the CUDA packer reads: column 2j high, 2j + 1 low."""
    codes = codes.to(torch.uint8)
    return ((codes[:, 0::2] << 4) | codes[:, 1::2]).contiguous()


def codes_of(packer_bytes: Tensor) -> Tensor:
    """``packer_input``'s inverse: the (N, K) uint8 codes."""
    return torch.stack([packer_bytes >> 4, packer_bytes & 0xF], dim=-1).reshape(packer_bytes.shape[0], -1)


def scales_and_zeros(scale: Tensor, offset: Tensor) -> Tensor:
    """(N, K / group) scale and offset -> the kernel's (K / group, N, 2) bf16, rounded once from fp32."""
    return torch.stack([scale.float().T, offset.float().T], dim=-1).to(torch.bfloat16).contiguous()


def dequantized(codes: Tensor, scales_zeros: Tensor, group_size: int) -> Tensor:
    """The fp32 (N, K) weights the kernel multiplies by: ``(q - 8) * scale + zero`` from the bf16 pairs."""
    pairs = scales_zeros.float().repeat_interleave(group_size, dim=0)  # (K, N, 2)
    return (codes.float() - 8) * pairs[..., 0].T + pairs[..., 1].T


class CudaInt4Linear(Bf16KernelLinear):
    """A bias-free linear over 4-bit codes in torch's CUDA int4 layout; computes in bf16."""

    def __init__(self, packed: Tensor, scales_zeros: Tensor, group_size: int) -> None:
        super().__init__()
        self.register_buffer("packed", packed)  # (N / 8, K / (tiles * 16), 32, tiles / 2) int32
        self.register_buffer("scales_and_zeros", scales_zeros)  # (K / group, N, 2) bf16
        self.group_size = group_size
        self.out_features = scales_zeros.shape[1]
        self.in_features = scales_zeros.shape[0] * group_size

    @classmethod
    def from_affine(cls, codes: Tensor, scale: Tensor, offset: Tensor, group_size: int) -> CudaInt4Linear:
        """W[n, k] = (codes[n, k] - 8) * scale[n, g] + offset[n, g]; codes (N, K) on the device."""
        return cls.from_pairs(codes, scales_and_zeros(scale, offset), group_size)

    @classmethod
    def from_pairs(cls, codes: Tensor, scales_zeros: Tensor, group_size: int) -> CudaInt4Linear:
        """``from_affine`` with the (scale, offset) pairs already in the kernel's (K / group, N, 2) bf16, kept as
        they are; codes (N, K) on the device."""
        tiles = inner_k_tiles(codes.shape[1])
        assert tiles is not None, "check shape_fits first"
        packed = torch.ops.aten._convert_weight_to_int4pack(packer_input(codes), tiles)
        return cls(packed, scales_zeros, group_size)

    @classmethod
    def stacked(cls, parts: Sequence[CudaInt4Linear]) -> CudaInt4Linear | None:
        """One module computing each part's outputs in turn (the same bits: see the module docstring), or None
        when the parts differ in K, group or packing."""
        if len({(part.packed.shape[1:], part.group_size) for part in parts}) != 1:
            return None
        return cls(
            torch.cat([part.packed for part in parts]),
            torch.cat([part.scales_and_zeros for part in parts], dim=1),
            parts[0].group_size,
        )

    def rows(self, start: int, end: int) -> CudaInt4Linear:
        """Outputs [start, end) as a module of their own; both multiples of 8 (the packed n-tiles)."""
        tile = CUDA_INT4_N_MULTIPLE
        assert start % tile == 0 and end % tile == 0
        return CudaInt4Linear(
            self.packed[start // tile : end // tile],
            self.scales_and_zeros[:, start:end].contiguous(),
            self.group_size,
        )

    def kernel(self, rows: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm(rows, self.packed, self.group_size, self.scales_and_zeros)


def kernel_works(device: torch.device) -> bool:
    """Whether the int4 kernel runs, and agrees with the dequantized matmul, on ``device``: probed once per
    device; the first failure logs one warning (the engine then runs hqq's HQQLinear there)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _probed:
        why = unusable_because(torch.device("cuda", index))
        _probed[index] = why
        if why is not None:
            log.warning(
                "torch's int4 CUDA kernel is not used on cuda:%d (%s): 4-bit weights run hqq's HQQLinear, "
                "which dequantizes every matrix at each call",
                index,
                why,
            )
    return _probed[index] is None


def unusable_because(device: torch.device) -> str | None:
    """Why the int4 kernel cannot run on ``device`` (no such op, too old a GPU, an error, a wrong answer), or
    None when it can."""
    ops = ("_convert_weight_to_int4pack", "_weight_int4pack_mm")
    missing = [op for op in ops if not hasattr(torch.ops.aten, op)]
    if missing:
        return f"this torch has no {', '.join(missing)}"
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        return f"compute capability {capability[0]}.{capability[1]}; it needs 8.0 or more"
    try:
        error = probe_error(device, CudaInt4Linear)
    except (RuntimeError, NotImplementedError) as failure:
        return f"it failed: {str(failure).splitlines()[0] if str(failure) else type(failure).__name__}"
    if not error <= PROBE_TOLERANCE:  # also catches NaN
        return f"it disagrees with the dequantized matmul: relative error {error:.3g}"
    return None


def probe_error(device: torch.device | str, linear: type = CudaInt4Linear) -> float:
    """The relative error of ``linear.from_affine`` against the float matmul it stands for, on a small random
    matrix (every shape constraint at work: 3 k-tiles of 16 rows, 2 groups, 5 tokens)."""
    generator = torch.Generator().manual_seed(0)
    out_features, in_features, group = 48, 256, 128
    codes = torch.randint(0, 16, (out_features, in_features), generator=generator, dtype=torch.uint8)
    scale = torch.rand(out_features, in_features // group, generator=generator) / 8 + 0.01
    offset = torch.randn(out_features, in_features // group, generator=generator) / 4
    x = torch.randn(5, in_features, generator=generator).to(torch.bfloat16)
    module = linear.from_affine(codes.to(device), scale.to(device), offset.to(device), group)
    got = module.forward(x.to(device)).float().cpu()
    reference = x.float() @ dequantized(codes, scales_and_zeros(scale, offset), group).T
    return float((got - reference).norm() / reference.norm())
