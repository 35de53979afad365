"""Our one-token float32 product on a CPU: a decode step's matrix-vector products at the memory's speed.

MKL's one-row kernels read a decode step's small matrices (the demo's 0.26 to 0.92 MB) at 7 to 14 GB/s at one
thread, where a plain ``sum`` of the same bytes reads 20 to 27 GB/s, and each call pays about 20 to 30 us besides
(docs/BENCHMARKS.md, "Per-token overhead"). This kernel streams the rows in order, with AVX-512:

- an input-major matrix (``one_token_layout``'s (in, out) memory) keeps up to 384 outputs in registers, or, when
  wider, sweeps 16 input rows at a time into the outputs held in L1;
- a row-major one takes 8 rows at a time, two 16-lane accumulators a row over the inputs.

Each output is one fixed chain of operations over the inputs in order, whatever the matrix's width, the rows
around it or the thread that computes it: fused matrices (w1 and w3, q, k and v) give their parts' bits, and
resident and offloaded experts stay bit-identical. Larger matrices split their outputs over torch's threads.

Built with ``cpu_build`` at the first float32 load on a CPU with AVX-512 (about 30 s once, then cached);
``OFFLOAD_CPU_KERNEL=torch``, another CPU or a failed build keeps ``F.linear``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from offload import cpu_build

CPU_FLAGS = ("avx512f",)
FLAGS = ["-O3", "-fopenmp", "-mavx512f"]
LANES = 16  # float32 lanes of a zmm register: both sides of a matrix must be whole multiples
# residual is an empty tensor when there is none (pybind's optional tensors cost a call more)
Product = Callable[[Tensor, Tensor, Tensor], Tensor]

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

// Input-major: y[n] = sum over k in order of x[k] * w[k * ld + n], one fma chain per output, started at 0.
template <int V>
static void outputs_in_registers(const float* x, const float* w, int64_t ld, int64_t K, float* y) {
  __m512 acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* row = w + k * ld;
    const __m512 xk = _mm512_set1_ps(x[k]);
    for (int v = 0; v < V; ++v) acc[v] = _mm512_fmadd_ps(xk, _mm512_loadu_ps(row + 16 * v), acc[v]);
  }
  for (int v = 0; v < V; ++v) _mm512_storeu_ps(y + 16 * v, acc[v]);
}

// The same chains for N outputs kept in L1 (y), 16 input rows streamed at a time.
static void outputs_in_memory(const float* x, const float* w, int64_t ld, int64_t K, int64_t N, float* y) {
  std::memset(y, 0, N * sizeof(float));
  const int64_t V = N / 16;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xs[16];
    for (int r = 0; r < 16; ++r) xs[r] = _mm512_set1_ps(x[k + r]);
    const float* base = w + k * ld;
    for (int64_t v = 0; v < V; ++v) {
      __m512 a = _mm512_loadu_ps(y + 16 * v);
      for (int r = 0; r < 16; ++r) a = _mm512_fmadd_ps(xs[r], _mm512_loadu_ps(base + r * ld + 16 * v), a);
      _mm512_storeu_ps(y + 16 * v, a);
    }
  }
  for (; k < K; ++k) {
    const __m512 xk = _mm512_set1_ps(x[k]);
    for (int64_t v = 0; v < V; ++v)
      _mm512_storeu_ps(y + 16 * v, _mm512_fmadd_ps(xk, _mm512_loadu_ps(w + k * ld + 16 * v), _mm512_loadu_ps(y + 16 * v)));
  }
}

static void input_major(const float* x, const float* w, int64_t ld, int64_t K, int64_t N, float* y) {
  switch (N / 16) {
#define CASE(v) case v: outputs_in_registers<v>(x, w, ld, K, y); return;
    CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
    CASE(13) CASE(14) CASE(15) CASE(16) CASE(17) CASE(18) CASE(19) CASE(20) CASE(21) CASE(22) CASE(23) CASE(24)
#undef CASE
    default: outputs_in_memory(x, w, ld, K, N, y);
  }
}

// Row-major: y[n] = the sum of two 16-lane fma chains over x (k in steps of 32), added lane-wise, reduced.
static inline float row_dot(const float* x, const float* row, int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(row + k), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(row + k + 16), _mm512_loadu_ps(x + k + 16), a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

static void row_major(const float* x, const float* w, int64_t ld, int64_t K, int64_t n0, int64_t n1, float* y) {
  int64_t n = n0;
  for (; n + 8 <= n1; n += 8) {  // eight rows' loads in flight; each row's arithmetic is row_dot's
    __m512 a[8][2];
    for (int r = 0; r < 8; ++r) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
      for (int r = 0; r < 8; ++r) {
        const float* row = w + (n + r) * ld + k;
        a[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(row), x0, a[r][0]);
        a[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(row + 16), x1, a[r][1]);
      }
    }
    for (int r = 0; r < 8; ++r) y[n + r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r][0], a[r][1]));
  }
  for (; n < n1; ++n) y[n] = row_dot(x, w + n * ld, K);
}

// x: one row of K floats (any leading shape); w: (N, K) with a unit stride on either side; residual: empty or N
// floats added to the products (one rounding each). Outputs split over threads in blocks of whole chains.
torch::Tensor f32_product(torch::Tensor x, torch::Tensor w, torch::Tensor residual) {
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.is_contiguous(), "float32");
  TORCH_CHECK(x.numel() == K && N % 16 == 0 && K % 32 == 0, "one row, whole vectors");
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = at::empty(sizes, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool inputs_outer = w.stride(0) == 1;
  TORCH_CHECK(inputs_outer || w.stride(1) == 1, "a unit stride");
  const int64_t ld = inputs_outer ? w.stride(1) : w.stride(0);
  // Blocks of 1024 outputs (whole vectors) or of 64 rows; a matrix under 2 MB stays on the calling thread.
  const bool small = N * K * 4 < (2 << 20);
  if (inputs_outer) {
    const int64_t block = 1024, blocks = (N + block - 1) / block;
    at::parallel_for(0, blocks, small ? blocks : 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        input_major(xp, wp + b * block, ld, K, std::min(block, N - b * block), yp + b * block);
    });
  } else {
    at::parallel_for(0, N, small ? N : 64, [&](int64_t n0, int64_t n1) { row_major(xp, wp, ld, K, n0, n1, yp); });
  }
  if (residual.numel() > 0) {
    TORCH_CHECK(residual.numel() == N && residual.is_contiguous() && residual.scalar_type() == at::kFloat, "residual");
    const float* r = residual.data_ptr<float>();
    for (int64_t n = 0; n < N; n += 16)
      _mm512_storeu_ps(yp + n, _mm512_add_ps(_mm512_loadu_ps(yp + n), _mm512_loadu_ps(r + n)));
  }
  return y;
}

// One query token's attention, batch 1: q (1, H, 1, K), keys and values (1, G, S, K) with unit stride over K
// (the cache's strided views); each query head h reads key/value head h / (H / G). Scores scaled by 1 / sqrt(K),
// softmax with the maximum subtracted, then the weighted sum of the values in position order.
torch::Tensor f32_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v) {
  const int64_t H = q.size(1), G = k.size(1), S = k.size(2), K = q.size(3);
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat, "f32");
  TORCH_CHECK(q.size(0) == 1 && q.size(2) == 1 && K % 16 == 0 && H % G == 0, "one token, batch 1");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && v.size(2) == S, "unit stride");
  auto out = at::empty({1, H, 1, K}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t qh = q.stride(1), kg = k.stride(1), ks = k.stride(2), vg = v.stride(1), vs = v.stride(2);
  const float scale = 1.f / std::sqrt((float)K);
  const int64_t per_group = H / G, V = K / 16;
  at::parallel_for(0, H, S * K < (1 << 16) ? H : 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> p(S);
    for (int64_t h = h0; h < h1; ++h) {
      const float* qv = qp + h * qh;
      const float* kb = kp + (h / per_group) * kg;
      const float* vb = vp + (h / per_group) * vg;
      float top = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < V; ++i)
          acc = _mm512_fmadd_ps(_mm512_loadu_ps(qv + 16 * i), _mm512_loadu_ps(kb + s * ks + 16 * i), acc);
        p[s] = _mm512_reduce_add_ps(acc) * scale;
        top = std::max(top, p[s]);
      }
      float total = 0.f;
      for (int64_t s = 0; s < S; ++s) total += (p[s] = std::exp(p[s] - top));
      const float inverse = 1.f / total;
      float* o = op + h * K;
      for (int64_t i = 0; i < V; ++i) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t s = 0; s < S; ++s)
          acc = _mm512_fmadd_ps(_mm512_set1_ps(p[s]), _mm512_loadu_ps(vb + s * vs + 16 * i), acc);
        _mm512_storeu_ps(o + 16 * i, _mm512_mul_ps(acc, _mm512_set1_ps(inverse)));
      }
    }
  });
  return out;
}
"""


@functools.cache
def kernels() -> Any | None:
    """The compiled module (``f32_product``, ``f32_attention``), or None (``OFFLOAD_CPU_KERNEL=torch``, no
    AVX-512, or a failed build)."""
    why_not = None if cpu_build.has_flags(CPU_FLAGS) else "this CPU lacks AVX-512"
    return cpu_build.compiled("float32 decode steps", build, why_not)


def active() -> bool:
    """Whether this process built the kernels for its float32 matrices (without building them to find out)."""
    return kernels.cache_info().currsize > 0 and kernels() is not None


def product() -> Product | None:
    """``f32_product(x, weight, residual)`` where our kernels run here, else None."""
    module = kernels()
    return None if module is None else module.f32_product


def attention(q: Tensor, keys: Tensor, values: Tensor) -> Tensor | None:
    """One query token's attention over the cached ``keys`` and ``values`` (no mask), (1, H, 1, K), by our
    kernel; None where it does not take these tensors (the caller runs SDPA)."""
    # The tensors first: a CUDA model's decode step never asks for (or builds) the CPU kernels.
    if q.dtype != torch.float32 or q.device.type != "cpu" or q.shape[0] != 1 or q.shape[-1] % LANES:
        return None
    if q.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        return None
    module = kernels()
    return None if module is None else module.f32_attention(q, keys, values)


def build(build_directory: str | None = None) -> Any:
    """The kernels, compiled whether or not the user asked for them (for benchmarks), as a module."""
    functions = ["f32_product", "f32_attention"]
    return cpu_build.build("offload_f32_kernels", _SOURCE, functions, FLAGS, build_directory)


def for_weight(weight: Tensor) -> Product | None:
    """The kernel where it computes one-token products of ``weight`` (out, in): a float32 CPU matrix with a unit
    stride on one side and whole vectors on both; else None. Decided by the weight alone, so a resident expert
    and its offloaded copy always take the same path."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    out_features, in_features = weight.shape
    if out_features % LANES or in_features % (2 * LANES) or 1 not in weight.stride():
        return None
    return product()


_NO_RESIDUAL = torch.empty(0)


def linear(x: Tensor, weight: Tensor, kernel: Product | None) -> Tensor:
    """``F.linear(x, weight)``, through ``kernel`` (``for_weight``'s) when ``x`` is one contiguous row."""
    if kernel is not None and x.numel() == weight.shape[1] and x.is_contiguous():
        return kernel(x, weight, _NO_RESIDUAL)
    return F.linear(x, weight)
