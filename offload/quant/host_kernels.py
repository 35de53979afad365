"""CPU linears that compute from packed codes: torch's int4 and int8 weight-only matmuls.

- int4: ``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)`` computes ``x @ W.T``
  with ``W[n, k] = (q[n, k] - 8) * scale[g, n] + offset[g, n]``, ``g = k // group``, group 32, 64, 128 or 256,
  ``scales_and_zeros`` of shape (K / group, N, 2) holding (scale, offset), and ``packed`` the (N, K / 2) uint8 that
  ``_convert_weight_to_int4pack_for_cpu`` makes from the (N, K) codes. The output width N must be a multiple of 16.
- int8: ``torch._weight_int8pack_mm(x, W, scales)`` computes ``x @ (W * scales[:, None]).T`` for an int8 (N, K) W.

Both are fast only with bf16 activations (one thread, a 3584 x 1024 matrix, one token: int4 0.23 ms against
1.2 ms for an fp32 ``F.linear``; the int4 kernel with fp32 activations runs a scalar loop, 8.7 ms). So a linear
here rounds its input to bf16 and its output back to the caller's dtype: two casts of a (T, width) row block,
microseconds at decode. The weights are repacked once, when the module is built, never per call.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from offload.quant import vnni_kernel

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel accepts
INT4_N_MULTIPLE = 16  # the int4 packer refuses other output widths
_BLOCK_CANDIDATES = (64, 32, 16)  # the packer's block of output rows: 64 with AVX-512, less without
_SCRATCH_BYTES = 1 << 19  # repacking works through this many bytes at a time: they stay in the L2 cache


@functools.cache
def has_op(name: str) -> bool:
    """Whether this torch build has the aten op ``name`` (these private kernels come and go between releases)."""
    return hasattr(torch.ops.aten, name)


def int4_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether the int4 kernel can run an (out, in) matrix with ``group_size`` weights per (scale, offset)."""
    return (
        has_op("_weight_int4pack_mm_for_cpu")
        and group_size in INT4_GROUP_SIZES
        and out_features % INT4_N_MULTIPLE == 0
        and in_features % group_size == 0
        and out_features > 0
    )


def _pack_rows(codes: Tensor, block: int) -> Tensor:
    """Our vectorised copy of torch's CPU int4 packing for ``block`` output rows per block.

    Within a block of ``block`` rows, byte (k, j) holds row j's code in its low nibble and row j + block/2's
    in its high nibble, for each input column k in turn. ``codes`` is uint8 (N, K) with N a multiple of block.
    """
    out_features, in_features = codes.shape
    half = block // 2
    blocks = codes.view(out_features // block, 2, half, in_features).permute(0, 3, 1, 2)
    packed = blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)
    return packed.contiguous().view(out_features, in_features // 2)


@functools.cache
def _packing_block() -> int | None:
    """The block size whose ``_pack_rows`` reproduces torch's packer on this CPU, or None if none does.

    torch's packer is a scalar loop (23 ms for a 3584 x 1024 matrix against 2 ms vectorised); repacking runs at
    every cache miss on a CPU device, so use the fast copy, but only once it is checked against the original.
    """
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (128, 64), generator=generator, dtype=torch.uint8)
    reference = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 2)
    for block in _BLOCK_CANDIDATES:
        if torch.equal(_pack_rows(probe, block), reference):
            return block
    return None


def pack_int4(codes: Tensor) -> Tensor:
    """(N, K) codes in 0..15 (any integer dtype) -> the (N, K / 2) uint8 the int4 kernel reads."""
    block = _packing_block()
    if block is not None and codes.shape[0] % block == 0:
        return _pack_rows(codes.to(torch.uint8), block)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)


def packing_block() -> int | None:
    """The rows of one block of torch's int4 packing on this CPU (64 with AVX-512), or None if not ours."""
    return _packing_block()


def packs_as_blocks(out_features: int) -> bool:
    """Whether ``pack_int4`` lays an ``out_features``-row matrix out in our own blocks (``_pack_rows``), so that
    ``unpack_int4`` reads it back on any device: this CPU's block is known and divides the rows."""
    block = _packing_block()
    return block is not None and out_features % block == 0


def unpack_int4(packed: Tensor) -> Tensor:
    """``pack_int4``'s inverse where ``packs_as_blocks``: the (N, K / 2) packed bytes -> the (N, K) uint8 codes,
    on ``packed``'s device (a GPU takes the host's layout apart after the copy, not the host)."""
    block = _packing_block()
    out_features, half_columns = packed.shape
    assert block is not None and out_features % block == 0, "check packs_as_blocks first"
    tiles = packed.reshape(out_features // block, 2 * half_columns, block // 2)  # (blocks, K, rows / 2)
    codes = torch.stack([tiles & 0xF, tiles >> 4], dim=2)  # (blocks, K, low/high, rows / 2)
    return codes.permute(0, 2, 3, 1).reshape(out_features, 2 * half_columns)


def kernel_pairs(scale: Tensor, zero: Tensor, out: Tensor | None = None) -> Tensor:
    """hqq's (N, K / group) ``scale`` and ``zero`` -> the kernel's (K / group, N, 2) bf16 (scale, offset) pairs.

    ``(q - zero) * scale`` is ``(q - 8) * scale + offset`` with the offset ``(8 - zero) * scale``, computed in fp32
    and rounded once to bf16, as the scale is. Written into ``out`` if given (contiguous, of that shape, clear of
    ``scale`` and ``zero``).
    """
    pairs = torch.empty(*scale.shape[::-1], 2, dtype=torch.bfloat16) if out is None else out
    by_group = scale.T
    pairs[..., 0].copy_(by_group)
    pairs[..., 1].copy_(zero.T.float().neg_().add_(8).mul_(by_group))
    return pairs


def pack_int4_halves(halves: Tensor, out: Tensor | None = None) -> Tensor:
    """(N / 2, K) uint8 holding rows 0..N/2-1's codes in the high nibbles and rows N/2..N-1's in the low ones
    (hqq's 4-bit packing) -> the (N, K / 2) uint8 the int4 kernel reads (into ``out`` if given, which must not
    overlap ``halves``); the same bytes as unpacking and ``pack_int4``, several times faster.

    Each half's output row block takes the high (or low) nibbles of ``block`` consecutive input rows: the
    nibbles of rows j and j + block/2 meet in one byte, then the (block/2, K) byte tile is transposed to
    (K, block/2). Both steps run on a few blocks at a time in reused scratch that stays in cache, and the
    transpose is torch's vectorised channel shuffle (a byte-wise ``transpose().contiguous()`` costs ten times
    as much). Where a half is not a whole number of blocks, the codes are unpacked and packed as before.
    """
    half_rows, in_features = halves.shape
    out_features = 2 * half_rows
    block = _packing_block()
    if block is None or half_rows % block or halves.dtype != torch.uint8:
        packed = pack_int4(torch.cat([halves >> 4, halves & 0xF]))
        return packed if out is None else out.copy_(packed)
    tile = block // 2
    blocks = half_rows // block
    # Per block: its first tile rows, then its last tile rows.
    source = halves.contiguous().view(blocks, 2, tile, in_features)
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8) if out is None else out
    target = packed.view(2, blocks, in_features, tile)  # [0]: rows from the high nibbles, [1]: the low ones
    # Chunks of at least two blocks (one block alone would take the shuffle's scalar path), near the scratch size.
    chunks = max(1, blocks // max(2, _SCRATCH_BYTES // (tile * in_features)))
    bounds = [blocks * chunk // chunks for chunk in range(chunks + 1)]
    low_rows = torch.empty(
        max(b - a for a, b in itertools.pairwise(bounds)), tile, in_features, dtype=torch.uint8
    )
    high_rows = torch.empty_like(low_rows)
    for start, end in itertools.pairwise(bounds):
        first, second = source[start:end, 0], source[start:end, 1]
        low, high = low_rows[: end - start], high_rows[: end - start]
        # Output byte = row j's code (low nibble) | row j + tile's code (high nibble).
        torch.bitwise_right_shift(first, 4, out=low)
        torch.bitwise_and(second, 0xF0, out=high)
        target[0, start:end].copy_(_transposed_tiles(low.bitwise_or_(high)))
        torch.bitwise_and(first, 0x0F, out=low)
        torch.bitwise_left_shift(second, 4, out=high)
        target[1, start:end].copy_(_transposed_tiles(low.bitwise_or_(high)))
    return packed


def _transposed_tiles(tiles: Tensor) -> Tensor:
    """(B, R, K) -> (B, K, R), contiguous, as ``tiles.transpose(1, 2).contiguous()``.

    Read as a channels-last image of B pixels with R * K channels in R groups, the transpose is a channel
    shuffle, whose CPU kernel transposes each pixel's channels with SIMD shuffles. Autograd's composite version
    (a plain permute and copy) would run instead outside inference mode.
    """
    count, rows, columns = tiles.shape
    if count == 1:  # one pixel is also a contiguous image: the kernel would take its scalar path
        return tiles.transpose(1, 2).contiguous()
    image = tiles.view(1, count, 1, rows * columns).permute(0, 3, 1, 2)
    with torch.inference_mode():
        shuffled = torch.native_channel_shuffle(image, rows)
    return shuffled.permute(0, 2, 3, 1).reshape(count, columns, rows)


class Bf16KernelLinear(nn.Module):
    """A bias-free linear whose ``kernel`` takes contiguous (T, in) bf16 rows: the input is rounded to bf16 and
    the output cast back to the caller's dtype (both weight-only kernels, CPU and CUDA, want bf16 activations)."""

    in_features: int
    out_features: int
    group_size: int | None

    def kernel(self, rows: Tensor) -> Tensor:
        """(T, in) contiguous bf16 (any float dtype where ``takes_any_float``) -> (T, out)."""
        raise NotImplementedError

    @property
    def takes_any_float(self) -> bool:
        """Whether ``kernel`` takes the rows in the caller's float dtype (no rounding to bf16 first)."""
        return False

    def forward(self, x: Tensor) -> Tensor:
        # Each skipped call is a dispatched op: 40 of these run per decode step of the demo model.
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if rows.dtype != torch.bfloat16 and not self.takes_any_float:
            rows = rows.to(torch.bfloat16)
        out = self.kernel(rows.contiguous())
        if x.dim() != 2:
            out = out.reshape(*x.shape[:-1], self.out_features)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        group = "" if self.group_size is None else f", group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}{group}"


class Int4Linear(Bf16KernelLinear):
    """A bias-free linear over 4-bit codes in torch's CPU int4 layout; computes in bf16."""

    def __init__(self, packed: Tensor, scales_and_offsets: Tensor, group_size: int) -> None:
        super().__init__()
        self.register_buffer("packed", packed)  # (N, K / 2) uint8
        self.register_buffer("scales_and_offsets", scales_and_offsets)  # (K / group, N, 2) bf16
        self.group_size = group_size
        self.in_features = 2 * packed.shape[1]
        self.out_features = packed.shape[0]
        # Our VNNI kernel over these same bytes (``vnni_kernel``), where it built and fits; else None.
        fast = vnni_kernel.gemm()
        fits = fast is not None and vnni_kernel.fits(self.out_features, self.in_features, group_size)
        self._fast = fast if fits else None

    @property
    def takes_any_float(self) -> bool:
        return self._fast is not None  # the VNNI kernel rounds x to int8 itself, and returns float32

    @classmethod
    def from_affine(cls, codes: Tensor, scale: Tensor, offset: Tensor, group_size: int) -> Int4Linear:
        """W[n, k] = (codes[n, k] - 8) * scale[n, g] + offset[n, g]; scale and offset are (N, K / group)."""
        scales_and_offsets = torch.stack([scale.float().T, offset.float().T], dim=-1)
        return cls(pack_int4(codes), scales_and_offsets.to(torch.bfloat16).contiguous(), group_size)

    @classmethod
    def from_zero_point(
        cls, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, out: Tensor | None = None
    ) -> Int4Linear:
        """W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g] for ``packed`` codes q (``pack_int4``'s layout).

        The (scale, offset) pairs are ``kernel_pairs``', in ``out`` if given.
        """
        return cls(packed, kernel_pairs(scale, zero, out), group_size)

    @classmethod
    def stacked(cls, parts: Sequence[Int4Linear]) -> Int4Linear | None:
        """One module computing each part's outputs in turn, or None where that could change a bit.

        The kernel computes each output column from its own packed rows and scales, so the stacked product
        equals the parts' products bit for bit (checked at 1 to 64 tokens). The packing interleaves blocks of
        rows, so each part's height must be a whole number of blocks.
        """
        block = _packing_block()
        if (
            block is None
            or len({(part.in_features, part.group_size) for part in parts}) != 1
            or any(part.out_features % block for part in parts)
        ):
            return None
        return cls(
            torch.cat([part.packed for part in parts]),
            torch.cat([part.scales_and_offsets for part in parts], dim=1),
            parts[0].group_size,
        )

    def rows(self, start: int, end: int) -> Int4Linear:
        """Outputs [start, end) as a module of their own (the codes shared; ``stacked``'s parts back)."""
        return Int4Linear(
            self.packed[start:end], self.scales_and_offsets[:, start:end].contiguous(), self.group_size
        )

    def kernel(self, rows: Tensor) -> Tensor:
        if self._fast is not None:
            return self._fast(rows, self.packed, self.scales_and_offsets)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, self.packed, self.group_size, self.scales_and_offsets
        )


class Int8Linear(Bf16KernelLinear):
    """A bias-free linear over int8 codes with one scale per output row; computes in bf16."""

    group_size = None  # one scale per row

    def __init__(self, codes: Tensor, scales: Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes)  # (N, K) int8
        self.register_buffer("scales", scales.to(torch.bfloat16).contiguous())  # (N,)
        self.out_features, self.in_features = codes.shape

    def kernel(self, rows: Tensor) -> Tensor:
        return torch._weight_int8pack_mm(rows, self.codes, self.scales)
