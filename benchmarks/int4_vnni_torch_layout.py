"""The product's VNNI int4 kernel (``offload/quant/vnni_kernel.py``, which grew out of this benchmark), reading
torch's own CPU int4 layout as it is, against torch's kernel, the probe and a plain read.

``int4_vnni_probe.py`` reads the weights at the one-thread
memory roofline, but from its own tiles; the product keeps every 4-bit matrix in torch's layout (``pack_int4``,
the host form). Can the same kernel read ``pack_int4(codes)``'s bytes and the (K/64, N, 2) bf16 (scale, offset)
pairs as torch stores them, with no second layout, at (nearly) the same speed?

torch's layout on this CPU: blocks of 64 output rows; within a block, byte (k, j) (input column k, j in 0..31)
holds row j's code in its low nibble and row j + 32's in its high nibble, so a block is a (K, 32) byte matrix and
4 consecutive columns are 128 contiguous bytes (column-major over 32 rows). ``vpdpbusd`` wants each row's 4 codes
in one dword lane. Two ``vpermt2b`` (AVX512-VBMI) turn the 128 bytes into two vectors whose dword i holds row i's
(resp. 16 + i's) 4 bytes, in row order; then a mask gives rows 0..31 and a shift rows 32..63, against one
broadcast dword of 4 int8 activations. The activations cannot be shuffled instead: the 4 bytes of a dword of the
raw layout belong to 4 different rows, and a dot product over them mixes rows whatever the activations are.
The pairs of a group g and 16 rows are 16 dwords (scale in the low half, offset in the high half): a shift and a
mask make them float32, in the same row order. The accumulators stay in row order, so nothing else moves.

T tokens (``--tokens``): each permuted chunk of weights serves up to 8 tokens before the next load (4 at a time
from registers; beyond 8, passes of 8, each reading the weights again); torch's kernel gets the same T rows.

Timing as ``int4_vnni_probe.py``: out of cache (copies totalling ``--pool-mb`` a shape and layout), kernels
interleaved round by round with a rotating start, medians; then the 41 matrices of a decode token. JSON on stdout.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/int4_vnni_torch_layout.py --threads 1 --rounds 21
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

from benchmarks import int4_vnni_probe as probe
from benchmarks.int4_vnni_probe import (
    GROUP,
    SHAPES,
    copies_of,
    dequantized,
    random_matrix,
    relative_error,
    token_matrices,
    vnni_layout,
)
from offload.quant import vnni_kernel
from offload.quant.host_kernels import pack_int4, unpack_int4

kernel = None  # the product's int4_gemm, built in main


def timed(runs: dict, rounds: int, per: int) -> dict[str, list[float]]:
    """Each of ``runs`` once to warm up, then ``rounds`` interleaved rounds with a rotating start: seconds/``per``."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs.items())
    for r in range(rounds):
        shift = r % len(order)
        for name, fn in order[shift:] + order[:shift]:
            started = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - started) / per)
    return times


def ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    return round(statistics.median(s / f for s, f in zip(times[slow], times[fast], strict=True)), 3)


def probe_shape(ext, rows: int, cols: int, args, generator: torch.Generator) -> dict:
    codes, pairs = random_matrix(rows, cols, generator)
    packed = pack_int4(codes)
    tiles, so = vnni_layout(codes, pairs)
    x = torch.randn(1, cols, generator=generator)
    x_bf16 = x.to(torch.bfloat16)
    weight = dequantized(codes, pairs)
    reference = x @ weight.T
    int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    ours = kernel(x, packed, pairs)
    as_seen = (ext.quantized_x(x).double() @ weight.double().T).float()
    errors = {
        "ours_vs_float": relative_error(ours, reference),
        "ours_vs_int8_x_reference": relative_error(ours, as_seen),
        "probe_vs_float": relative_error(ext.vnni_gemv(x, tiles, so, 0), reference),
        "torch_vs_float": relative_error(int4_mm(x_bf16, packed, GROUP, pairs), reference),
    }
    del weight
    weight_bytes = packed.numel() + pairs.numel() * 2
    count = max(2, math.ceil(args.pool_mb * 2**20 / weight_bytes))
    pool_torch = copies_of([packed, pairs], count, args.huge_pages)
    pool_probe = copies_of([tiles, so], count, args.huge_pages)

    def run_ours() -> None:
        for p, s in pool_torch:
            kernel(x, p, s)

    def run_torch() -> None:
        for p, s in pool_torch:
            int4_mm(x_bf16, p, GROUP, s)

    def run_probe() -> None:
        for p, s in pool_probe:
            ext.vnni_gemv(x, p, s, 0)

    def run_read() -> None:
        for p, s in pool_torch:
            ext.stream_read(p), ext.stream_read(s.view(torch.uint8))

    runs = {"ours": run_ours, "torch": run_torch, "probe": run_probe, "read": run_read}
    times = timed(runs, args.rounds, count)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    result = {
        "shape": f"{rows}x{cols}",
        "weight_mb": round(weight_bytes / 1e6, 2),
        "copies": count,
        **{f"{name}_ms": round(v, 4) for name, v in ms.items()},
        **{f"{name}_gb_s": round(weight_bytes / v / 1e6, 2) for name, v in ms.items()},
        "torch_over_ours": ratio(times, "torch", "ours"),
        "ours_over_probe": ratio(times, "ours", "probe"),
        "errors": {k: float(f"{v:.3g}") for k, v in errors.items()},
    }
    if args.tokens:
        result["tokens"] = batch_sweep(ext, packed, pairs, pool_torch, cols, args, generator)
    return result


def batch_sweep(ext, packed, pairs, pool, cols: int, args, generator: torch.Generator) -> dict:
    """Ours against torch's kernel at T tokens on the same bytes: where does torch's kernel win?"""
    out = {}
    int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    weight = dequantized(unpack_int4(packed), pairs)  # the codes read back from torch's bytes
    for tokens in args.tokens:
        x = torch.randn(tokens, cols, generator=generator)
        x_bf16 = x.to(torch.bfloat16)
        reference = x @ weight.T
        errors = {
            "ours": relative_error(kernel(x, packed, pairs), reference),
            "torch": relative_error(int4_mm(x_bf16, packed, GROUP, pairs), reference),
        }

        def run_ours(x=x) -> None:
            for p, s in pool:
                kernel(x, p, s)

        def run_torch(x_bf16=x_bf16) -> None:
            for p, s in pool:
                int4_mm(x_bf16, p, GROUP, s)

        times = timed({"ours": run_ours, "torch": run_torch}, args.rounds, len(pool))
        out[str(tokens)] = {
            "ours_ms": round(statistics.median(times["ours"]) * 1e3, 4),
            "torch_ms": round(statistics.median(times["torch"]) * 1e3, 4),
            "torch_over_ours": ratio(times, "torch", "ours"),
            "errors": {k: float(f"{v:.3g}") for k, v in errors.items()},
        }
    return out


def token_loop(ext, args, generator: torch.Generator) -> dict:
    """Ours, torch's kernel (on the same bytes) and the probe on the 41 matrices of one decode token, in a step's
    order, ``--steps`` tokens a round (74 MB a token: out of the 32 MiB L3), as int4_vnni_probe.py does."""
    theirs, probe = [], []
    for rows, cols in token_matrices(1024, 3584, 4, 2, 256, 32000):
        codes, pairs = random_matrix(rows, cols, generator)
        theirs.append((*copies_of([pack_int4(codes), pairs], 1, args.huge_pages)[0], cols))
        probe.append((*copies_of(list(vnni_layout(codes, pairs)), 1, args.huge_pages)[0], cols))
    weight_bytes = sum(p.numel() + s.numel() * 2 for p, s, _ in theirs)
    x = {cols: torch.randn(1, cols, generator=generator) for cols in (1024, 3584)}
    x_bf16 = {cols: v.to(torch.bfloat16) for cols, v in x.items()}
    int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu

    def run_ours() -> None:
        for _ in range(args.steps):
            for p, s, cols in theirs:
                kernel(x[cols], p, s)

    def run_torch() -> None:
        for _ in range(args.steps):
            for p, s, cols in theirs:
                int4_mm(x_bf16[cols], p, GROUP, s)

    def run_probe() -> None:
        for _ in range(args.steps):
            for p, s, cols in probe:
                ext.vnni_gemv(x[cols], p, s, 0)

    times = timed({"ours": run_ours, "torch": run_torch, "probe": run_probe}, args.rounds, args.steps)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {
        "matrices": len(theirs),
        "weight_mb": round(weight_bytes / 1e6, 2),
        **{f"{name}_ms": round(v, 3) for name, v in ms.items()},
        **{f"{name}_gb_s": round(weight_bytes / v / 1e6, 2) for name, v in ms.items()},
        "torch_over_ours": ratio(times, "torch", "ours"),
        "ours_over_probe": ratio(times, "ours", "probe"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--pool-mb", type=float, default=256, help="weight copies per shape and layout, MiB")
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="N x K of W (out x in)")
    parser.add_argument("--tokens", type=int, nargs="*", default=[], help="also T tokens a call, per shape")
    parser.add_argument("--huge-pages", action="store_true", help="weight copies in 2 MiB pages, all kernels")
    parser.add_argument("--steps", type=int, default=20, help="tokens a round of the token loop, 0: skip it")
    parser.add_argument("--build-dir", default="/tmp/s7-vnni2-build")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global kernel
    ext = probe.build_extension(args.build_dir)  # the probe's kernel, its plain read and its int8 x
    kernel = vnni_kernel.build_gemm(args.build_dir)  # ours: the product's kernel itself
    generator = torch.Generator().manual_seed(0)
    report: dict = {"load_average_start": os.getloadavg(), "threads": args.threads, "shapes": {}}
    with torch.inference_mode():
        for shape in args.shapes:
            rows, cols = (int(v) for v in shape.split("x"))
            result = report["shapes"][shape] = probe_shape(ext, rows, cols, args, generator)
            print(json.dumps(result), file=sys.stderr, flush=True)
        if args.steps:
            loop = report["token_loop"] = token_loop(ext, args, generator)
            print(json.dumps(loop), file=sys.stderr, flush=True)
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
