"""Our CPU kernel for 4-bit weights: int8 activations and AVX-512 VNNI dot products over torch's own int4 layout,
on by default where the CPU has it (``OFFLOAD_CPU_KERNEL=torch`` keeps torch's kernel).

torch's ``_weight_int4pack_mm_for_cpu`` reads the weights at 8 to 10 GB/s at one thread, bound by its own work
per weight; llama.cpp quantizes the activations to int8 per block and uses integer dot products, and reads at
the memory's speed. This kernel does the same over the bytes ``Int4Linear`` already holds (``pack_int4``'s blocks
of 64 rows and the (K / 64, N, 2) bf16 (scale, offset) pairs), so nothing is repacked: 2.2 to 2.4x faster than
torch's kernel on a decode token's matrices (docs/BENCHMARKS.md, "The VNNI kernel on torch's own layout").

Per group of 64 inputs, x is rounded to int8 with a step d = max|x| / 127 (S: the group's int8 sum); then
``sum_k x_k W[n, k] ≈ sum_g d * (scale * (dot_g - 8 S) + offset * S)`` with ``dot_g`` the integer dot of the
4-bit codes and the int8 x. Each row's result depends on that row alone, in a fixed order, and torch's threads
split whole blocks of rows, so a token computes the same bits alone or in a batch and at any thread count; the
int8 activations put the output about 0.6% from the float product where torch's kernel (bf16 activations) is
about 0.24% from it, the trade llama.cpp's Q8 blocks make.

It is compiled at first use with torch's ``load_inline`` (g++ and ninja; about 30 s once, said on the terminal,
then cached by torch under ``~/.cache/torch_extensions``), only on a CPU with AVX-512 VNNI and VBMI whose int4
packing block is 64 rows; a float checkpoint never builds it. Elsewhere torch's kernel runs; a failed build
says why in one warning.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor

from offload import cpu_build

ENV = cpu_build.ENV
GROUP = 64  # the kernel's group size and block of rows
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni", "avx512vbmi")
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512vbmi"]

Gemv = Callable[[Tensor, Tensor, Tensor], Tensor]

# The headers and the activations' int8 rounding, shared with benchmarks/int4_vnni_probe.py.
QUANTIZE_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <vector>

// x (K floats) -> int8 per group of 64 with step d = max|x| / 127; ds = d * the group's int8 sum.
static void quantize_groups(const float* x, int64_t K, int8_t* xq, float* d, float* ds) {
  for (int64_t g = 0; g < K / 64; ++g) {
    const float* xg = x + g * 64;
    __m512 m = _mm512_setzero_ps();
    for (int i = 0; i < 4; ++i) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xg + 16 * i)));
    const float amax = _mm512_reduce_max_ps(m);
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m512i sum = _mm512_setzero_si512();
    for (int i = 0; i < 4; ++i) {
      __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + 16 * i), inv));
      sum = _mm512_add_epi32(sum, q);
      _mm_storeu_si128((__m128i*)(xq + g * 64 + 16 * i), _mm512_cvtsepi32_epi8(q));
    }
    d[g] = amax / 127.f;
    ds[g] = d[g] * (float)_mm512_reduce_add_epi32(sum);
  }
}

"""

_GEMM_SOURCE = r"""
// One group (64 columns x 64 rows: 2048 bytes at wg, torch's (K, 32) block bytes) for C tokens, into acc.
// Two vpermt2b turn 4 columns x 32 rows (128 bytes) into dwords of one row's 4 codes, rows in order.
template <int C>
static inline __attribute__((always_inline)) void group_tokens(
    const uint8_t* wg, const uint32_t* pg, const int8_t* xq, const float* d, const float* ds, float* acc,
    int64_t K, int64_t G, int64_t g, __m512i idx0, __m512i idx1) {
  const __m512i low = _mm512_set1_epi8(0x0F), high16 = _mm512_set1_epi32((int)0xFFFF0000u);
  __m512i dot[C][4];
  for (int t = 0; t < C; ++t)
    for (int c = 0; c < 4; ++c) dot[t][c] = _mm512_setzero_si512();
  for (int s = 0; s < 16; ++s) {
    const __m512i a = _mm512_loadu_si512((const void*)(wg + 128 * s));
    const __m512i e = _mm512_loadu_si512((const void*)(wg + 128 * s + 64));
    const __m512i p0 = _mm512_permutex2var_epi8(a, idx0, e), p1 = _mm512_permutex2var_epi8(a, idx1, e);
    const __m512i v[4] = {_mm512_and_si512(p0, low), _mm512_and_si512(p1, low),
                          _mm512_and_si512(_mm512_srli_epi16(p0, 4), low),
                          _mm512_and_si512(_mm512_srli_epi16(p1, 4), low)};
    for (int t = 0; t < C; ++t) {
      int32_t x4;
      std::memcpy(&x4, xq + t * K + g * 64 + 4 * s, 4);
      const __m512i xb = _mm512_set1_epi32(x4);
      for (int c = 0; c < 4; ++c) dot[t][c] = _mm512_dpbusd_epi32(dot[t][c], v[c], xb);
    }
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i so = _mm512_loadu_si512((const void*)(pg + 16 * c));
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(so, 16));
    const __m512 offset = _mm512_castsi512_ps(_mm512_and_si512(so, high16));
    for (int t = 0; t < C; ++t) {
      float* a = acc + t * 64 + 16 * c;
      const float dg = d[t * G + g], dsg = ds[t * G + g];
      const __m512 u = _mm512_fmsub_ps(_mm512_set1_ps(dg), _mm512_cvtepi32_ps(dot[t][c]), _mm512_set1_ps(8.f * dsg));
      _mm512_storeu_ps(a, _mm512_fmadd_ps(offset, _mm512_set1_ps(dsg), _mm512_fmadd_ps(scale, u, _mm512_loadu_ps(a))));
    }
  }
}

template <int T>
static void gemv(const int8_t* xq, const float* d, const float* ds, const uint8_t* w, const uint32_t* pairs,
                 float* y, int64_t N, int64_t K, int64_t b0, int64_t b1) {
  const int64_t G = K / 64;
  alignas(64) uint8_t i0[64], i1[64];
  for (int i = 0; i < 16; ++i)
    for (int c = 0; c < 4; ++c) i0[4 * i + c] = 32 * c + i, i1[4 * i + c] = 32 * c + 16 + i;
  const __m512i idx0 = _mm512_load_si512((const void*)i0), idx1 = _mm512_load_si512((const void*)i1);
  alignas(64) float acc[T * 64];
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* wb = w + b * 32 * K;
    std::memset(acc, 0, sizeof(acc));
    for (int64_t g = 0; g < G; ++g) {
      const uint32_t* pg = pairs + g * N + b * 64;
      // The pairs stride 4 N bytes from group to group: fetch the next block's early.
      for (int line = 0; line < 256; line += 64) _mm_prefetch((const char*)(pg + 64) + line, _MM_HINT_T0);
      group_tokens<(T < 4 ? T : 4)>(wb + g * 2048, pg, xq, d, ds, acc, K, G, g, idx0, idx1);
      if constexpr (T > 4)
        group_tokens<T - 4>(wb + g * 2048, pg, xq + 4 * K, d + 4 * G, ds + 4 * G, acc + 256, K, G, g, idx0, idx1);
    }
    for (int64_t t = 0; t < T; ++t) std::memcpy(y + t * N + b * 64, acc + t * 64, 64 * sizeof(float));
  }
}

// Threads split the 64-row blocks (each block whole on one thread, so the bits do not depend on the split);
// a thread takes at least 64 KiB of weights, so small matrices stay on the calling thread.
torch::Tensor int4_gemm(torch::Tensor x, torch::Tensor packed, torch::Tensor pairs) {
  auto xf = x.to(torch::kFloat32).contiguous();
  const int64_t T = xf.size(0), K = xf.size(1), N = pairs.size(1), G = K / 64, B = N / 64;
  TORCH_CHECK(K % 64 == 0 && N % 64 == 0 && pairs.size(0) == G && pairs.size(2) == 2, "shapes");
  TORCH_CHECK(packed.numel() == N * K / 2 && packed.is_contiguous() && pairs.is_contiguous(), "layout");
  std::vector<int8_t> xq(T * K);
  std::vector<float> d(T * G), ds(T * G);
  for (int64_t t = 0; t < T; ++t)
    quantize_groups(xf.data_ptr<float>() + t * K, K, xq.data() + t * K, d.data() + t * G, ds.data() + t * G);
  auto y = torch::empty({T, N}, xf.options());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const uint32_t* p = (const uint32_t*)pairs.data_ptr<at::BFloat16>();
  float* out = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (32 * K));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t t0 = 0; t0 < T; t0 += 8) {
      const int64_t n = T - t0 < 8 ? T - t0 : 8;
      const int8_t* xt = xq.data() + t0 * K;
      const float *dt = d.data() + t0 * G, *dst = ds.data() + t0 * G;
      float* yt = out + t0 * N;
      switch (n) {
#define CASE(c) case c: gemv<c>(xt, dt, dst, w, p, yt, N, K, b0, b1); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
      }
    }
  });
  return y;
}
"""


def cpu_has_flags() -> bool:
    """Whether this CPU reports every instruction set the kernel is compiled for."""
    return cpu_build.has_flags(CPU_FLAGS)


@functools.cache
def gemm() -> Gemv | None:
    """The compiled ``int4_gemm(x, packed, pairs) -> float32 y``, or None: ``OFFLOAD_CPU_KERNEL=torch``, not
    this CPU, or the build failed (``cpu_build.compiled`` says why where it should)."""
    from offload.quant.host_kernels import packing_block

    why_not = None
    if not cpu_has_flags():
        why_not = f"this CPU lacks one of {', '.join(CPU_FLAGS)}"
    elif packing_block() != GROUP:
        why_not = f"torch's int4 packing here is not in blocks of {GROUP} rows"
    return cpu_build.compiled("4-bit matrices", build_gemm, why_not)


def active() -> bool:
    """Whether this process built the kernel for its 4-bit matrices (without building it to find out)."""
    return gemm.cache_info().currsize > 0 and gemm() is not None


def build_gemm(build_directory: str | None = None) -> Gemv:
    """The kernel, compiled whether or not the user asked for it (for benchmarks): ``int4_gemm(x, packed,
    pairs)``."""
    source = QUANTIZE_SOURCE + _GEMM_SOURCE
    return cpu_build.build("offload_int4_vnni", source, ["int4_gemm"], FLAGS, build_directory).int4_gemm


def fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether an (out, in) int4 matrix with ``group_size`` runs this kernel (given that it built)."""
    return group_size == GROUP and out_features % GROUP == 0 and in_features % GROUP == 0
