"""torch's CUDA int4 kernel for hqq 4-bit weights (offload/quant/device_kernels.py).

The layout helpers are pure tensor functions, checked here on the CPU against hqq's dequantization; the module's
shapes run on torch's fake tensors; the one-time probe and its fallback run with the GPU calls replaced. The
`cuda`-marked tests at the end run the kernel itself (benchmarks/cuda_check.sh).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from offload.quant import device_kernels, hqq_backend
from offload.quant.codec import FusedInt4Expert, QuantizedExpert, codec_for
from offload.quant.device_kernels import (
    CudaInt4Linear,
    codes_of,
    cuda_int4_fits,
    dequantized,
    packer_input,
    probe_error,
    scales_and_zeros,
    shape_fits,
)
from offload.quant.host_kernels import Int4Linear
from offload.quant.linear import build_linear, device_linear, quantize_linear
from offload.quant.spec import QuantSpec

SPEC = QuantSpec.parse("hqq:4:64")


def _stored(out_features: int = 48, in_features: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    return quantize_linear(weight, SPEC)


def _expanded(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float().repeat_interleave(SPEC.group_size, dim=1)


def test_the_packer_input_holds_even_columns_in_the_high_nibble() -> None:
    # torch's _group_quantize_tensor packs ``out[:, ::2] << 4 | out[:, 1::2]`` for CUDA.
    codes = torch.tensor([[1, 2, 3, 4], [15, 0, 7, 9]], dtype=torch.uint8)
    assert packer_input(codes).tolist() == [[0x12, 0x34], [0xF0, 0x79]]
    assert torch.equal(codes_of(packer_input(codes)), codes)


def test_the_packer_input_carries_hqq_codes_bit_for_bit() -> None:
    tensors = _stored()
    codes = hqq_backend.codes4(tensors["W_q"], 48, 256)
    through = codes_of(packer_input(codes))  # what the packer will read, decoded
    rebuilt = (through.float() - _expanded(tensors["zero"])) * _expanded(tensors["scale"])
    assert torch.equal(rebuilt, hqq_backend.dequantize(tensors, SPEC))


def test_scales_and_zeros_are_the_cpu_kernels_and_close_to_hqq() -> None:
    tensors = _stored()
    offset = (8 - tensors["zero"].float()) * tensors["scale"].float()
    pairs = scales_and_zeros(tensors["scale"], offset)
    assert pairs.shape == (256 // 64, 48, 2) and pairs.dtype == torch.bfloat16
    host = hqq_backend.host_linear(tensors, SPEC)
    assert isinstance(host, Int4Linear)
    assert torch.equal(pairs, host.scales_and_offsets)  # one convention, one rounding on both sides
    codes = hqq_backend.codes4(tensors["W_q"], 48, 256)
    weight = dequantized(codes, pairs, SPEC.group_size)
    want = hqq_backend.dequantize(tensors, SPEC)
    # Only the bf16 rounding of scale and offset differs from hqq's fp32 arithmetic.
    assert ((weight - want).norm() / want.norm()).item() < 1e-2
    # ... and the CPU kernel multiplies by exactly these weights (its output rounded to bf16).
    identity = torch.eye(256, dtype=torch.bfloat16)
    assert torch.equal(host(identity).T, weight.to(torch.bfloat16))


@pytest.mark.parametrize(
    ("out_features", "in_features", "group", "fits"),
    [
        (14336, 4096, 64, True),  # a Mixtral w1
        (4096, 14336, 64, True),  # w2: K = 14336 = 112 x 128, inner k-tiles 8
        (448, 256, 64, True),
        (48, 96, 32, True),  # K = 96: only 2 inner k-tiles (32) divide it
        (12, 256, 64, False),  # N not a multiple of 8
        (48, 256, 16, False),  # groups of 16: the kernel takes 32 to 256
        (48, 80, 80, False),  # K = 80 is no multiple of 32
    ],
)
def test_shape_fits(out_features: int, in_features: int, group: int, fits: bool) -> None:
    assert shape_fits(out_features, in_features, group) is fits


def test_no_cuda_kernel_on_a_cpu_device() -> None:
    tensors = _stored()
    assert not cuda_int4_fits(48, 256, 64, "cpu")
    assert device_linear(tensors, SPEC, "cpu") is None
    assert isinstance(build_linear(tensors, SPEC, torch.float32, "cpu"), Int4Linear)


def test_the_module_packs_to_the_stored_bytes_and_stacks_by_whole_tiles() -> None:
    with FakeTensorMode():  # torch's shape rules for the two ops, without a GPU
        codes = torch.zeros(48, 256, dtype=torch.uint8, device="meta")
        scale = torch.zeros(48, 4, device="meta")
        module = CudaInt4Linear.from_affine(codes, scale, scale, 64)
        assert module.packed.dtype == torch.int32 and module.packed.shape == (48 // 8, 256 // 128, 32, 4)
        assert module.packed.numel() * 4 == 48 * 256 // 2  # the stored codes' bytes: built in place in a slot
        assert module.scales_and_zeros.numel() * 2 == 2 * 48 * 4 * 2  # fp16 scale + zero, stored
        assert module(torch.zeros(2, 5, 256, device="meta")).shape == (2, 5, 48)
        w2 = CudaInt4Linear.from_affine(torch.zeros(256, 48 * 2, dtype=torch.uint8, device="meta"),
                                        torch.zeros(256, 3, device="meta"), torch.zeros(256, 3, device="meta"), 32)  # fmt: skip
        fused = QuantizedExpert(module, w2, module).fused()
        assert isinstance(fused, FusedInt4Expert) and fused.w13.out_features == 96
        assert fused.w3.packed.shape == module.packed.shape
        assert CudaInt4Linear.stacked([module, w2]) is None  # different K


def test_the_probe_tells_a_right_kernel_from_a_wrong_layout() -> None:
    # The CPU kernel follows the same convention: the probe's reference agrees with it.
    assert probe_error("cpu", Int4Linear) < device_kernels.PROBE_TOLERANCE

    class SwappedNibbles(Int4Linear):
        @classmethod
        def from_affine(cls, codes, scale, offset, group_size):  # type: ignore[no-untyped-def]
            swapped = codes.reshape(codes.shape[0], -1, 2).flip(-1).reshape(codes.shape)
            return super().from_affine(swapped, scale, offset, group_size)

    assert probe_error("cpu", SwappedNibbles) > 10 * device_kernels.PROBE_TOLERANCE


@pytest.fixture
def fresh_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_kernels, "_probed", {})


@pytest.mark.parametrize(
    ("capability", "error", "why"),
    [
        ((7, 5), None, "compute capability 7.5"),  # a T4
        ((8, 6), RuntimeError("_weight_int4pack_mm_cuda is not available for build."), "it failed"),
        ((8, 6), 0.9, "disagrees"),
        ((8, 6), float("nan"), "disagrees"),
    ],
)
def test_the_probe_falls_back_with_one_warning(
    fresh_probe: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capability: tuple[int, int],
    error: object,
    why: str,
) -> None:
    def probe(device: torch.device, linear: type) -> float:
        if isinstance(error, Exception):
            raise error
        return error

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    monkeypatch.setattr(device_kernels, "probe_error", probe)
    with caplog.at_level(logging.WARNING, logger="offload.quant.device_kernels"):
        assert not device_kernels.kernel_works(torch.device("cuda", 0))
        assert not device_kernels.kernel_works(torch.device("cuda", 0))  # probed once
        assert not cuda_int4_fits(48, 256, 64, "cuda:0")
    assert len(caplog.records) == 1
    assert why in caplog.text and "HQQLinear" in caplog.text


def test_a_passing_probe_enables_the_kernel(fresh_probe: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 6))
    monkeypatch.setattr(device_kernels, "probe_error", lambda device, linear: 1e-3)
    assert cuda_int4_fits(48, 256, 64, "cuda:1")
    assert not cuda_int4_fits(12, 256, 64, "cuda:1")


# ---- on a GPU --------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_kernel_runs_hqq_weights_close_to_the_dequantized_matmul() -> None:
    assert device_kernels.kernel_works(torch.device("cuda")), device_kernels.unusable_because(
        torch.device("cuda")
    )
    tensors = {key: t.cuda() for key, t in _stored(448, 256).items()}
    module = device_linear(tensors, SPEC, "cuda")
    assert isinstance(module, CudaInt4Linear)
    x = torch.randn(7, 256, device="cuda")
    want = x @ hqq_backend.dequantize(tensors, SPEC).T
    got = module(x)
    assert got.dtype == torch.float32
    assert ((got - want).norm() / want.norm()).item() < 1e-2
    # the CPU kernel, same bytes: close (bf16 arithmetic on both sides, in different orders)
    host = hqq_backend.host_linear({key: t.cpu() for key, t in tensors.items()}, SPEC)
    cpu = host(x.cpu())
    assert ((got.cpu() - cpu).norm() / cpu.norm()).item() < 1e-2


@pytest.mark.cuda
def test_cuda_stacked_matrices_keep_every_bit() -> None:
    tensors = [{key: t.cuda() for key, t in _stored(448, 256, seed).items()} for seed in (1, 2)]
    w1, w3 = (device_linear(t, SPEC, "cuda") for t in tensors)
    fused = CudaInt4Linear.stacked([w1, w3])
    for tokens in (1, 5, 37):
        x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
        both = fused(x)
        assert torch.equal(both[:, :448], w1(x)) and torch.equal(both[:, 448:], w3(x))
        assert torch.equal(fused.rows(448, 896)(x), w3(x))


@pytest.mark.cuda
def test_cuda_experts_run_the_int4_kernel() -> None:
    codec = codec_for(SPEC)
    weights = [torch.randn(448, 256), torch.randn(256, 448), torch.randn(448, 256)]
    tensors = {key: t.cuda() for key, t in codec.encode(*weights).items()}
    expert = codec.materialize(tensors, torch.bfloat16, "cuda")
    assert isinstance(expert, QuantizedExpert) and isinstance(expert.w2, CudaInt4Linear)
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(expert.fused()(x), expert(x))
