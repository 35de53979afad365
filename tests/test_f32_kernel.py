"""Our one-token float32 kernel (``offload.f32_kernel``): close to ``F.linear``; each output the same bits
whatever the rows around it (fused matrices give their parts' bits), the thread count or a residual added;
``OFFLOAD_CPU_KERNEL=torch`` and shapes it does not take keep ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from offload import cpu_build, f32_kernel
from offload.quant.dense import DenseLinear

HAS_KERNEL_CPU = cpu_build.has_flags(f32_kernel.CPU_FLAGS)
needs_kernel = pytest.mark.skipif(not HAS_KERNEL_CPU, reason="this CPU lacks AVX-512")


def _weight(out_features: int, in_features: int, input_major: bool, seed: int = 0) -> torch.Tensor:
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    return weight.t().contiguous().t() if input_major else weight


@needs_kernel
@pytest.mark.parametrize("input_major", [True, False], ids=["input-major", "row-major"])
# registers (up to 384 outputs), L1 sweeps (wider), blocks over threads (over 2 MB), a 16-output tail block
@pytest.mark.parametrize("shape", [(256, 448), (896, 256), (4096, 160), (1040, 96)], ids=str)
def test_close_to_f_linear_and_each_output_its_own_bits(shape: tuple[int, int], input_major: bool) -> None:
    weight = _weight(*shape, input_major)
    kernel = f32_kernel.for_weight(weight)
    assert kernel is not None
    x = torch.randn(1, 1, shape[1], generator=torch.Generator().manual_seed(1))
    got = f32_kernel.linear(x, weight, kernel)
    want = F.linear(x, weight)
    assert got.shape == want.shape
    assert float((got - want).norm() / want.norm()) < 1e-6
    # A block of rows alone (a fused matrix's part) computes that block's bits.
    part = weight[32:96]
    assert torch.equal(f32_kernel.linear(x, part, f32_kernel.for_weight(part)), got[..., 32:96])
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            assert torch.equal(f32_kernel.linear(x, weight, kernel), got)
    finally:
        torch.set_num_threads(threads)
    residual = torch.randn(1, 1, shape[0])
    assert torch.equal(kernel(x, weight, residual), got + residual)


@needs_kernel
def test_a_dense_linear_uses_it_at_one_token_and_f_linear_otherwise() -> None:
    linear = DenseLinear(_weight(448, 256, input_major=False))
    assert linear.one_token is not None
    rows = torch.randn(3, 256)
    assert torch.equal(linear(rows), F.linear(rows, linear.weight))  # several tokens: MKL's
    assert float((linear(rows[:1]) - F.linear(rows[:1], linear.weight)).abs().max()) < 1e-5
    assert DenseLinear(_weight(8, 256, input_major=False)).one_token is None  # a router: not whole vectors
    assert DenseLinear(_weight(448, 256, input_major=False).to(torch.bfloat16)).one_token is None


def test_torch_kernels_when_asked_for(torch_cpu_kernels: None) -> None:
    assert f32_kernel.product() is None
    assert DenseLinear(_weight(448, 256, input_major=True)).one_token is None


@needs_kernel
@pytest.mark.parametrize("positions", [1, 7, 300])
def test_one_token_attention_matches_sdpa_over_a_strided_cache(positions: int) -> None:
    heads, kv_heads, head_dim = 8, 2, 32
    generator = torch.Generator().manual_seed(positions)
    # The cache's layout: per position, every key head then every value head (KVCache.rows), viewed strided.
    rows = torch.randn(1, positions, 2, kv_heads, head_dim, generator=generator)
    keys, values = rows[:, :, 0].transpose(1, 2), rows[:, :, 1].transpose(1, 2)  # (1, G, S, K)
    query = torch.randn(1, heads, head_dim, generator=generator).unsqueeze(2)  # (1, H, 1, K)
    got = f32_kernel.attention(query, keys, values)
    want = F.scaled_dot_product_attention(query, keys, values, enable_gqa=True)
    assert got is not None and got.shape == want.shape
    assert float((got - want).abs().max()) < 1e-5
    assert f32_kernel.attention(query.double(), keys.double(), values.double()) is None  # SDPA's then
