"""Probe: a hand-written int4 GEMV with int8 activations and AVX-512 VNNI against torch's CPU int4 kernel.

A benchmark only, nothing in the product uses it (shipping it would need a compiler at install or first use,
with torch's kernel as the fallback). It answers issue 15's question: can a kernel that does what llama.cpp
does (activations quantized to int8 per block, integer dot products with ``vpdpbusd``) stream 4-bit weights
fast enough for 0.8x llama.cpp's Q4_K_M tok/s, where torch's ``_weight_int4pack_mm_for_cpu`` tops out at
0.62 to 0.68x (``benchmarks/int4_ceiling.py``)?

One token, y = x @ W.T with ``W[n, k] = (q[n, k] - 8) * scale[g, n] + offset[g, n]``, g = k // 64 (torch's
convention, ``Int4Linear``). x is quantized per group of 64 to int8 with a float step d_g (llama.cpp's Q8
blocks: d_g = max|x| / 127). With x_k ~ d_g * xq_k and S_g = sum_k xq_k over the group,

    sum_k x_k W[n, k] ~ sum_g d_g * (scale * (sum_k q xq - 8 * S_g) + offset * S_g)

The integer dot sum_k q xq comes from ``_mm512_dpbusd_epi32`` (codes 0..15 as the unsigned operand, xq as
the signed one). Weights are laid out once, at build time, for that instruction: tiles of 64 rows; per tile,
per group, per step of 8 columns, four 64-byte chunks (one per 16 rows) whose byte 4 * i + j holds row i's
code for column k + j in its low nibble and for column k + 4 + j in its high nibble. Each 32-bit lane of a
``dpbusd`` is then one row, against 4 broadcast activations. Scales and offsets stay bf16 (4.5 bits a weight,
as torch's kernel reads), as (tiles, groups, 2, 64).

Per shape, out of cache: each kernel rotates through copies of the weights totalling at least ``--pool-mb``
(one pass over all copies a measurement; a plain read of the same bytes is the roofline), kernels interleaved
round by round, medians reported. Then both kernels on the 41 matrices of a decode token of issue 15's random
Mixtral, in a step's order, and the decode that our measured tok/s implies with the probe's kernel in place of
torch's (``--ours-tok-s``, ``--llama-tok-s``: session 6's figures by default). JSON on stdout.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/int4_vnni_probe.py --threads 1 --rounds 21
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload.huge_pages import huge_page_empty
from offload.quant import vnni_kernel
from offload.quant.host_kernels import pack_int4

GROUP = 64
TILE = 64  # output rows per tile: four 16-lane accumulators
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
FLAGS += ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]  # this CPU reports AMX, which faults

CPP = (
    vnni_kernel.QUANTIZE_SOURCE
    + r"""
static inline __m512 bf16x16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// packed: (N/64 tiles) x (K/64 groups) x (8 steps) x (4 chunks of 16 rows) x 64 bytes.
// so: bf16 (N/64, K/64, 2, 64): scales then offsets of the tile's 64 rows.
static void gemv_tiles(const int8_t* xq, const float* d, const float* ds, const uint8_t* w,
                       const uint16_t* so, float* y, int64_t N, int64_t K, int64_t prefetch) {
  const int64_t G = K / 64, T = N / 64;
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t t = 0; t < T; ++t) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* wg = w + (t * G + g) * 2048;
      const int8_t* xg = xq + g * 64;
      __m512i dot[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                        _mm512_setzero_si512()};
      if (prefetch)
        for (int line = 0; line < 2048; line += 64) _mm_prefetch((const char*)wg + prefetch + line, _MM_HINT_T0);
      for (int s = 0; s < 8; ++s) {
        int32_t lo4, hi4;
        std::memcpy(&lo4, xg + 8 * s, 4);
        std::memcpy(&hi4, xg + 8 * s + 4, 4);
        const __m512i xlo = _mm512_set1_epi32(lo4), xhi = _mm512_set1_epi32(hi4);
        for (int b = 0; b < 4; ++b) {
          const __m512i v = _mm512_loadu_si512((const void*)(wg + s * 256 + b * 64));
          dot[b] = _mm512_dpbusd_epi32(dot[b], _mm512_and_si512(v, low), xlo);
          dot[b] = _mm512_dpbusd_epi32(dot[b], _mm512_and_si512(_mm512_srli_epi16(v, 4), low), xhi);
        }
      }
      const uint16_t* sg = so + (t * G + g) * 128;
      const __m512 dg = _mm512_set1_ps(d[g]), dsg = _mm512_set1_ps(ds[g]);
      const __m512 eight_ds = _mm512_set1_ps(8.f * ds[g]);
      for (int b = 0; b < 4; ++b) {
        // d * (dot - 8 S) * scale + d * S * offset
        const __m512 u = _mm512_fmsub_ps(dg, _mm512_cvtepi32_ps(dot[b]), eight_ds);
        acc[b] = _mm512_fmadd_ps(bf16x16(sg + 16 * b), u, acc[b]);
        acc[b] = _mm512_fmadd_ps(bf16x16(sg + 64 + 16 * b), dsg, acc[b]);
      }
    }
    for (int b = 0; b < 4; ++b) _mm512_storeu_ps(y + t * 64 + 16 * b, acc[b]);
  }
}

torch::Tensor vnni_gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor so, int64_t prefetch) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1, "one token");
  auto xf = x.to(torch::kFloat32).contiguous();
  const int64_t K = xf.size(1), N = so.size(0) * 64;
  TORCH_CHECK(K % 64 == 0 && so.size(1) == K / 64 && packed.numel() == N * K / 2, "shapes");
  int8_t xq[K];
  float d[K / 64], ds[K / 64];
  quantize_groups(xf.data_ptr<float>(), K, xq, d, ds);
  auto y = torch::empty({1, N}, xf.options());
  gemv_tiles(xq, d, ds, packed.data_ptr<uint8_t>(), (const uint16_t*)so.data_ptr<at::BFloat16>(),
             y.data_ptr<float>(), N, K, prefetch);
  return y;
}

// The memory roofline at one thread: every 64-byte line of a buffer read once, nothing else done.
int64_t stream_read(torch::Tensor t) {
  const uint8_t* p = t.data_ptr<uint8_t>();
  const int64_t n = t.numel() / 256 * 256;
  __m512i a = _mm512_setzero_si512(), b = a, c = a, e = a;
  for (int64_t i = 0; i < n; i += 256) {
    a = _mm512_xor_si512(a, _mm512_loadu_si512((const void*)(p + i)));
    b = _mm512_xor_si512(b, _mm512_loadu_si512((const void*)(p + i + 64)));
    c = _mm512_xor_si512(c, _mm512_loadu_si512((const void*)(p + i + 128)));
    e = _mm512_xor_si512(e, _mm512_loadu_si512((const void*)(p + i + 192)));
  }
  return _mm512_reduce_add_epi64(_mm512_xor_si512(_mm512_xor_si512(a, b), _mm512_xor_si512(c, e)));
}

// The activations as the kernel sees them: d_g * xq, for checking the kernel's arithmetic in Python.
torch::Tensor quantized_x(torch::Tensor x) {
  auto xf = x.to(torch::kFloat32).contiguous();
  const int64_t K = xf.size(1);
  std::vector<int8_t> xq(K);
  std::vector<float> d(K / 64), ds(K / 64);
  quantize_groups(xf.data_ptr<float>(), K, xq.data(), d.data(), ds.data());
  auto out = torch::empty({1, K}, xf.options());
  for (int64_t k = 0; k < K; ++k) out.data_ptr<float>()[k] = d[k / 64] * (float)xq[k];
  return out;
}
"""
)


def build_extension(build_dir: str):
    from torch.utils.cpp_extension import load_inline

    os.makedirs(build_dir, exist_ok=True)
    return load_inline(
        name="int4_vnni_probe",
        cpp_sources=CPP,
        functions=["vnni_gemv", "quantized_x", "stream_read"],
        extra_cflags=FLAGS,
        build_directory=build_dir,
        verbose=False,
    )


def vnni_layout(codes: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) uint8 codes and torch's (K/64, N, 2) bf16 (scale, offset) -> the probe kernel's two buffers."""
    rows, cols = codes.shape
    tiles, groups = rows // TILE, cols // GROUP
    # (tile, chunk b, row i, group, step s, high h, column j) -> (tile, group, step, chunk, row, column, high)
    split = codes.view(tiles, 4, 16, groups, 8, 2, 4).permute(0, 3, 4, 1, 2, 6, 5)
    packed = (split[..., 0] | (split[..., 1] << 4)).contiguous().view(-1)
    so = pairs.view(groups, tiles, TILE, 2).permute(1, 0, 3, 2).contiguous()
    return packed, so


def random_matrix(rows: int, cols: int, generator: torch.Generator):
    """Random codes and hqq-like (scale, offset): offset = (8 - zero) * scale with zero near 8."""
    codes = torch.randint(0, 16, (rows, cols), dtype=torch.uint8, generator=generator)
    scale = torch.rand(cols // GROUP, rows, generator=generator) * 0.01 + 1e-3
    zero = 8 + torch.randn(cols // GROUP, rows, generator=generator)
    pairs = torch.stack([scale, (8 - zero) * scale], dim=-1).to(torch.bfloat16)
    return codes, pairs


def dequantized(codes: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    scale = pairs[..., 0].float().T.repeat_interleave(GROUP, dim=1)
    offset = pairs[..., 1].float().T.repeat_interleave(GROUP, dim=1)
    return (codes.float() - 8) * scale + offset


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.float() - reference).norm() / reference.norm()).item()


def copies_of(tensors: list[torch.Tensor], count: int, huge: bool) -> list[list[torch.Tensor]]:
    """``count`` copies of ``tensors``, each in its own memory (in 2 MiB pages if ``huge``)."""
    out = []
    for _ in range(count):
        copy = []
        for t in tensors:
            target = huge_page_empty(t.shape, t.dtype) if huge else torch.empty_like(t)
            copy.append(target.copy_(t))
        out.append(copy)
    return out


def probe_shape(ext, rows: int, cols: int, args, generator: torch.Generator) -> dict:
    codes, pairs = random_matrix(rows, cols, generator)
    packed, so = vnni_layout(codes, pairs)
    torch_packed = pack_int4(codes)
    x = torch.randn(1, cols, generator=generator)
    x_bf16 = x.to(torch.bfloat16)
    weight = dequantized(codes, pairs)
    reference = x @ weight.T
    ours = ext.vnni_gemv(x, packed, so, args.prefetch)
    theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(x_bf16, torch_packed, GROUP, pairs)
    # Our kernel's arithmetic, apart from the int8 activations: against the same product in float64.
    as_seen = (ext.quantized_x(x).double() @ weight.double().T).float()
    errors = {
        "ours_vs_float": relative_error(ours, reference),
        "ours_vs_int8_x_reference": relative_error(ours, as_seen),
        "torch_vs_float": relative_error(theirs, reference),
        "torch_vs_bf16_x_reference": relative_error(theirs, x_bf16.float() @ weight.T),
    }
    del weight
    weight_bytes = packed.numel() + so.numel() * 2  # the same for both layouts
    count = max(2, math.ceil(args.pool_mb * 2**20 / weight_bytes))
    pool_ours = copies_of([packed, so], count, args.huge_pages)
    pool_torch = copies_of([torch_packed, pairs], count, args.huge_pages)
    int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    prefetch = args.prefetch

    def run_ours() -> None:
        for p, s in pool_ours:
            ext.vnni_gemv(x, p, s, prefetch)

    def run_torch() -> None:
        for p, s in pool_torch:
            int4_mm(x_bf16, p, GROUP, s)

    def run_read() -> None:  # our pool's bytes, read and nothing more
        for p, s in pool_ours:
            ext.stream_read(p), ext.stream_read(s.view(torch.uint8))

    run_ours(), run_torch(), run_read()  # warm-up: pages touched, code loaded
    times: dict[str, list[float]] = {"ours": [], "torch": [], "read": []}
    for r in range(args.rounds):
        order = [("ours", run_ours), ("torch", run_torch), ("read", run_read)]
        for name, fn in order[r % 3 :] + order[: r % 3]:  # a rotating start
            started = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - started) / count)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    speedups = [t / o for o, t in zip(times["ours"], times["torch"], strict=True)]
    return {
        "shape": f"{rows}x{cols}",
        "weight_mb": round(weight_bytes / 1e6, 2),
        "copies": count,
        "ours_ms": round(ms["ours"], 4),
        "torch_ms": round(ms["torch"], 4),
        "ours_gb_s": round(weight_bytes / ms["ours"] / 1e6, 2),
        "torch_gb_s": round(weight_bytes / ms["torch"] / 1e6, 2),
        "read_only_gb_s": round(weight_bytes / ms["read"] / 1e6, 2),
        "speedup": round(statistics.median(speedups), 3),
        "errors": {k: float(f"{v:.3g}") for k, v in errors.items()},
    }


def token_matrices(hidden: int, ffn: int, layers: int, top_k: int, kv_width: int, vocab: int) -> list:
    """(out, in) of every matrix one decode token of issue 15's random Mixtral multiplies."""
    attention = [(hidden, hidden), (kv_width, hidden), (kv_width, hidden), (hidden, hidden)]
    experts = [(ffn, hidden), (ffn, hidden), (hidden, ffn)] * top_k
    return [*(attention + experts) * layers, (vocab, hidden)]


def token_loop(ext, args, generator: torch.Generator) -> dict:
    """Both kernels on the 41 matrices of one decode token, in a step's order, ``--steps`` tokens a round
    (74 MB a token: no matrix is still in the 32 MiB L3 when its turn comes again), as int4_ceiling.py does."""
    ours, theirs = [], []
    for rows, cols in token_matrices(1024, 3584, 4, 2, 256, 32000):
        codes, pairs = random_matrix(rows, cols, generator)
        packed, so = vnni_layout(codes, pairs)
        ours.append((*copies_of([packed, so], 1, args.huge_pages)[0], cols))
        theirs.append((*copies_of([pack_int4(codes), pairs], 1, args.huge_pages)[0], cols))
    weight_bytes = sum(p.numel() + s.numel() * 2 for p, s, _ in ours)
    x = {cols: torch.randn(1, cols, generator=generator) for cols in (1024, 3584)}
    x_bf16 = {cols: v.to(torch.bfloat16) for cols, v in x.items()}
    int4_mm, prefetch = torch.ops.aten._weight_int4pack_mm_for_cpu, args.prefetch

    def run_ours() -> None:
        for _ in range(args.steps):
            for p, s, cols in ours:
                ext.vnni_gemv(x[cols], p, s, prefetch)

    def run_torch() -> None:
        for _ in range(args.steps):
            for p, s, cols in theirs:
                int4_mm(x_bf16[cols], p, GROUP, s)

    run_ours(), run_torch()
    times: dict[str, list[float]] = {"ours": [], "torch": []}
    for r in range(args.rounds):
        order = [("ours", run_ours), ("torch", run_torch)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - started) / args.steps)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {
        "matrices": len(ours),
        "weight_mb": round(weight_bytes / 1e6, 2),
        "ours_ms": round(ms["ours"], 3),
        "torch_ms": round(ms["torch"], 3),
        "ours_gb_s": round(weight_bytes / ms["ours"] / 1e6, 2),
        "torch_gb_s": round(weight_bytes / ms["torch"] / 1e6, 2),
        "speedup": round(
            statistics.median(t / o for o, t in zip(times["ours"], times["torch"], strict=True)), 3
        ),
    }


def estimate(torch_ms: float, probe_ms: float, ours_tok_s: float, llama_tok_s: float) -> dict:
    """Our decode with the probe kernel: the measured ms a token, less torch's kernel time, plus the probe's."""
    measured_ms = 1e3 / ours_tok_s
    overhead = measured_ms - torch_ms
    predicted_ms = probe_ms + overhead
    return {
        "measured_ms_per_token": round(measured_ms, 3),
        "torch_kernel_ms_per_token": round(torch_ms, 3),
        "overhead_ms_per_token": round(overhead, 3),
        "probe_kernel_ms_per_token": round(probe_ms, 3),
        "predicted_ms_per_token": round(predicted_ms, 3),
        "predicted_tok_s": round(1e3 / predicted_ms, 1),
        "predicted_over_llama": round(1e3 / predicted_ms / llama_tok_s, 3),
        "needed_ms_for_0.8x": round(1e3 / (0.8 * llama_tok_s), 3),
        "overhead_allowed_for_0.8x": round(1e3 / (0.8 * llama_tok_s) - probe_ms, 3),
        "kernel_only_ceiling_over_llama": round(1e3 / probe_ms / llama_tok_s, 3),
    }


SHAPES = ["14336x4096", "4096x14336", "3584x1024", "1024x3584", "32000x1024", "1024x1024", "256x1024"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--pool-mb", type=float, default=256, help="weight copies per shape and kernel, MiB")
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="N x K of W (out x in)")
    parser.add_argument(
        "--prefetch", type=int, default=0, help="software prefetch distance in bytes, 0: none"
    )
    parser.add_argument(
        "--huge-pages", action="store_true", help="weight copies in 2 MiB pages, both kernels"
    )
    parser.add_argument("--steps", type=int, default=20, help="tokens a round of the token loop, 0: skip it")
    parser.add_argument("--build-dir", default="/tmp/s7-vnni-build")
    parser.add_argument(
        "--ours-tok-s", type=float, default=98.0, help="our measured hqq:4:64 decode (session 6)"
    )
    parser.add_argument("--llama-tok-s", type=float, default=182.0, help="llama.cpp Q4_K_M (session 6)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ext = build_extension(args.build_dir)
    generator = torch.Generator().manual_seed(0)
    report: dict = {"load_average_start": os.getloadavg(), "threads": args.threads, "shapes": {}}
    with torch.inference_mode():
        for shape in args.shapes:
            rows, cols = (int(v) for v in shape.split("x"))
            result = probe_shape(ext, rows, cols, args, generator)
            report["shapes"][shape] = result
            print(json.dumps(result), file=sys.stderr, flush=True)
        if all(s in report["shapes"] for s in SHAPES[2:]):
            shapes = report["shapes"]
            token = [f"{o}x{i}" for o, i in token_matrices(1024, 3584, 4, 2, 256, 32000)]
            torch_ms = sum(shapes[m]["torch_ms"] for m in token)
            probe_ms = sum(shapes[m]["ours_ms"] for m in token)
            report["estimate_from_shapes"] = estimate(torch_ms, probe_ms, args.ours_tok_s, args.llama_tok_s)
        if args.steps:
            loop = report["token_loop"] = token_loop(ext, args, generator)
            print(json.dumps(loop), file=sys.stderr, flush=True)
            report["estimate_from_token_loop"] = estimate(
                loop["torch_ms"], loop["ours_ms"], args.ours_tok_s, args.llama_tok_s
            )
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
