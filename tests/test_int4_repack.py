"""Repacking hqq's 4-bit codes for the CPU int4 kernel straight from hqq's packed bytes gives the same bytes as
the slow way (unpack every code, then pack in torch's layout), for every packing block and shape, including the
shapes that fall back to that slow way."""

from __future__ import annotations

import pytest
import torch

from offload.quant import host_kernels
from offload.quant.host_kernels import Int4Linear, pack_int4_halves
from offload.quant.linear import host_linear
from offload.quant.spec import QuantSpec

# (N, K): whole blocks in each half; one block per half (the shuffle's one-tile path); more blocks than one
# chunk holds (K wide); and halves that are not whole blocks at 64 or at 32 (the fallback).
SHAPES = [(256, 512), (128, 256), (512, 8192), (384, 128), (192, 256), (48, 64)]


def _slow_codes(halves: torch.Tensor) -> torch.Tensor:
    """hqq's layout unpacked: the high nibbles are the first half of the rows, the low nibbles the second."""
    return torch.cat([halves >> 4, halves & 0xF])


def _slow_pack(codes: torch.Tensor, block: int) -> torch.Tensor:
    """torch's CPU int4 layout for ``block`` rows per block, one byte at a time in spirit: within a block, byte
    (k, j) holds row j's code in its low nibble and row j + block/2's in its high nibble."""
    out_features, in_features = codes.shape
    packed = torch.empty(out_features // block, in_features, block // 2, dtype=torch.uint8)
    for start in range(0, out_features, block):
        tile = codes[start : start + block].to(torch.int32)
        low, high = tile[: block // 2], tile[block // 2 :]
        packed[start // block] = (low | (high << 4)).T.to(torch.uint8)
    return packed.reshape(out_features, in_features // 2)


def _halves(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (out_features // 2, in_features), generator=generator, dtype=torch.uint8)


@pytest.mark.parametrize("block", [64, 32, 16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
def test_repacking_from_hqq_bytes_gives_the_slow_ways_bytes(block, shape, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(host_kernels, "_packing_block", lambda: block)
    halves = _halves(shape)
    want = _slow_pack(_slow_codes(halves), block) if shape[0] % block == 0 else None
    got = pack_int4_halves(halves)
    assert got.shape == (shape[0], shape[1] // 2) and got.dtype == torch.uint8 and got.is_contiguous()
    if want is not None:
        assert torch.equal(got, want)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
def test_repacking_gives_torchs_own_packers_bytes(shape):
    """On this CPU's block, against torch's scalar packer itself."""
    halves = _halves(shape, seed=1)
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(_slow_codes(halves).to(torch.int32), 2)
    assert torch.equal(pack_int4_halves(halves), want)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize(
    "shape", [(256, 512), (192, 256), (48, 128)], ids=lambda shape: f"{shape[0]}x{shape[1]}"
)
def test_the_hqq_linear_is_the_slow_builds_linear(group, shape):
    """Codes, scales and offsets of ``host_linear`` equal the old build: unpacked codes, the offset
    ``(8 - zero) * scale`` in fp32, both rounded to bf16 and stacked."""
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(2)
    groups = (out_features, in_features // group)
    tensors = {
        "W_q": _halves(shape, seed=3).reshape(-1, group),
        "scale": (torch.rand(groups, generator=generator) * 0.02 + 1e-3).half(),
        "zero": torch.randint(0, 16, groups, generator=generator).half(),
    }
    spec = QuantSpec.parse(f"hqq:4:{group}")
    got = host_linear(tensors, spec)
    codes = _slow_codes(tensors["W_q"].reshape(out_features // 2, in_features))
    offset = (8 - tensors["zero"].float()) * tensors["scale"].float()
    want = Int4Linear.from_affine(codes, tensors["scale"], offset, group)
    assert isinstance(got, Int4Linear) and got.group_size == group
    assert torch.equal(got.packed, want.packed)
    assert torch.equal(got.scales_and_offsets.view(torch.int16), want.scales_and_offsets.view(torch.int16))
    x = torch.randn(3, in_features, generator=generator)
    assert torch.equal(got(x), want(x))
