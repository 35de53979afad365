"""Decode-step fast paths (issue 15's per-token overhead): one-token layouts keep every result's bits.

Float32 matrices with at least as many outputs as inputs are held input-major on a CPU, resident experts
fuse w1 and w3 into one matrix, and the host store packs experts so that slots compute from their bytes.
None of this may change a bit between the places an expert computes, at any token count. A one-row RMSNorm
takes a shorter path whose values must match the fused op's.
"""

import pytest
import torch

from offload import f32_kernel
from offload.experts.packing import ExpertLayout, materialize_dense, pack_expert, unpack_expert
from offload.experts.source import DenseExpert, FusedDenseExpert, ResidentExperts, one_token_layout
from offload.experts.store import HostStore
from offload.model import RMSNorm
from offload.quant.codec import FusedInt4Expert, QuantizedExpert
from offload.quant.dense import DenseLinear
from offload.quant.host_kernels import Int4Linear, has_op


def dense(width: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "w1": (torch.randn(width, hidden, generator=generator) / hidden**0.5).to(dtype),
        "w2": (torch.randn(hidden, width, generator=generator) / width**0.5).to(dtype),
        "w3": (torch.randn(width, hidden, generator=generator) / hidden**0.5).to(dtype),
    }


def is_input_major(weight: torch.Tensor) -> bool:
    return weight.t().is_contiguous() and not weight.is_contiguous()


@pytest.mark.parametrize("width", [24, 40, 448])  # 24 and 40 leave a tail in silu's vectorised rows
@pytest.mark.parametrize("tokens", [1, 2, 5, 17])
def test_a_fused_expert_computes_the_bits_of_the_unfused_one(width, tokens):
    tensors = dense(width, 16 if width < 100 else 256, torch.float32)
    plain = DenseExpert(tensors["w1"], tensors["w2"], tensors["w3"])
    fused = plain.fused()
    assert isinstance(fused, FusedDenseExpert)
    x = torch.randn(tokens, tensors["w1"].shape[1], generator=torch.Generator().manual_seed(tokens))
    assert torch.equal(fused(x), plain(x))
    assert torch.equal(fused.w1, tensors["w1"]) and torch.equal(fused.w3, tensors["w3"])


def test_resident_experts_fuse_only_float32():
    experts = [[DenseExpert(**dense(24, 16, torch.float32)), DenseExpert(**dense(24, 16, torch.bfloat16))]]
    fused, kept = ResidentExperts(experts).experts[0]
    assert isinstance(fused, FusedDenseExpert)
    assert type(kept) is DenseExpert and kept.w1.is_contiguous()  # bf16's input-major kernel is slower


@pytest.mark.parametrize("tokens", [1, 5])
def test_an_expert_from_the_store_computes_without_a_copy_and_matches_the_resident_one(tokens):
    tensors = dense(24, 16, torch.float32, seed=3)
    store = HostStore(1, 1)
    store.put(0, 0, {name: t.clone() for name, t in tensors.items()})
    views = store.tensors(0, 0)
    assert is_input_major(views["w1"]) and is_input_major(views["w3"])
    # Wider than tall: input-major only where our float32 kernel runs (MKL's row kernel is faster for it).
    assert is_input_major(views["w2"]) == (f32_kernel.product() is not None)
    offloaded = materialize_dense(views)
    buffer = store.buffer(0, 0)
    for weight in (offloaded.w1, offloaded.w2, offloaded.w3):
        assert weight.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    resident = ResidentExperts([[DenseExpert(**tensors)]]).experts[0][0]
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(offloaded(x), resident(x))


def test_a_bfloat16_store_converted_to_float32_stays_input_major():
    """A half-precision checkpoint computed in float32 (the demo on a CPU): the store says so explicitly."""
    tensors = dense(24, 16, torch.bfloat16)
    layout = ExpertLayout.of(tensors, input_major=True)
    views = unpack_expert(pack_expert(tensors, layout), layout)
    assert is_input_major(views["w1"].to(torch.float32))
    assert not is_input_major(
        unpack_expert(pack_expert(tensors, ExpertLayout.of(tensors)), ExpertLayout.of(tensors))["w1"]
    )


def test_dense_linear_holds_tall_float32_matrices_input_major_with_the_same_values():
    """Wide ones too where our float32 kernel runs; with torch's, MKL's row kernel reads them faster."""
    tall = torch.randn(64, 16)
    assert is_input_major(DenseLinear(tall).weight) and torch.equal(DenseLinear(tall).weight, tall)
    wide = torch.randn(16, 64)
    assert is_input_major(DenseLinear(wide).weight) == (f32_kernel.product() is not None)
    assert DenseLinear(tall.bfloat16()).weight.is_contiguous()
    held = one_token_layout(tall)
    assert one_token_layout(held) is held  # already so: no second copy


def int4_expert(width: int, hidden: int, group: int = 64, seed: int = 0) -> QuantizedExpert:
    generator = torch.Generator().manual_seed(seed)

    def matrix(rows: int, columns: int) -> Int4Linear:
        codes = torch.randint(0, 16, (rows, columns), generator=generator, dtype=torch.uint8)
        scale = torch.rand(rows, columns // group, generator=generator) * 0.1
        offset = torch.randn(rows, columns // group, generator=generator) * 0.1
        return Int4Linear.from_affine(codes, scale, offset, group)

    return QuantizedExpert(matrix(width, hidden), matrix(hidden, width), matrix(width, hidden))


@pytest.mark.skipif(not has_op("_weight_int4pack_mm_for_cpu"), reason="this torch has no CPU int4 kernel")
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_a_fused_int4_expert_computes_the_bits_of_the_unfused_one(tokens):
    plain = int4_expert(128, 64)
    fused = plain.fused()
    assert isinstance(fused, FusedInt4Expert)
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens))
    assert torch.equal(fused(x), plain(x))
    assert torch.equal(fused.w3(x), plain.w3(x))  # the parts stay usable on their own


@pytest.mark.skipif(not has_op("_weight_int4pack_mm_for_cpu"), reason="this torch has no CPU int4 kernel")
def test_an_int4_expert_whose_halves_may_not_be_whole_packing_blocks_keeps_its_bits():
    plain = int4_expert(
        96, 64, group=32
    )  # 96 rows: a multiple of 16 the kernel takes; the packer's block may be 64
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(plain.fused()(x), plain(x))


def test_rms_norm_of_one_float32_row_matches_the_fused_op_and_keeps_nan() -> None:
    norm = RMSNorm(64, 1e-5)
    norm.weight.data = torch.randn(64, generator=torch.Generator().manual_seed(7))
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(8)) * 30
    reference = torch.nn.functional.rms_norm(x, (64,), norm.weight, 1e-5)
    assert torch.allclose(norm(x), reference, rtol=1e-6, atol=1e-6)
    assert torch.allclose(norm(torch.zeros(1, 1, 64)), torch.zeros(1, 1, 64))
    x[0, 0, 3] = float("nan")
    assert norm(x).isnan().all()  # a damaged step must still read as NaN logits, not as numbers


@pytest.mark.parametrize("hidden, width", [(72, 50), (128, 24), (33, 17), (256, 448)])
def test_fusing_never_changes_a_bit_even_where_the_blas_would(hidden, width):
    """At some shapes MKL computes a column of the fused matrix otherwise than alone: those stay unfused."""
    generator = torch.Generator().manual_seed(hidden)
    plain = DenseExpert(
        torch.randn(width, hidden, generator=generator),
        torch.randn(hidden, width, generator=generator),
        torch.randn(width, hidden, generator=generator),
    )
    for tokens in (1, 4):
        x = torch.randn(tokens, hidden, generator=generator)
        assert torch.equal(plain.fused()(x), plain(x))
