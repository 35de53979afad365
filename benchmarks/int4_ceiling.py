"""The fastest a 4-bit decode can be on torch's CPU int4 kernel: the kernels alone, no Python, no model.

For issue 15's random Mixtral (hidden 1024, FFN 3584, 4 layers, 8 experts of which 2 run, vocabulary 32000,
32 heads and 8 KV heads), one decode token multiplies these matrices at batch 1 (out x in):
- per layer, attention q, k, v, o: 1024x1024, 256x1024, 256x1024, 1024x1024;
- per layer, two experts' w1, w3 (3584x1024) and w2 (1024x3584);
- once, the lm_head: 32000x1024.
Each is timed on ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (``offload.quant.host_kernels.Int4Linear``,
group 64, random codes), all in one loop per round so every matrix is read from memory as in a decode step
(their codes do not stay in cache between rounds). The sum is a floor on a 4-bit decode step with this
kernel; 1 / floor is the ceiling on tok/s that no amount of Python or dispatch work can pass.

Optionally ``--llama-bench BIN --gguf Q4_K_M.gguf`` runs ``llama-bench -p 0 -n 64 -r 3 -t THREADS`` between
rounds, so the ceiling and llama.cpp's tok/s are taken under the same load; the report gives their ratio.

    OMP_NUM_THREADS=1 python benchmarks/int4_ceiling.py --threads 1 --rounds 7 \\
        --llama-bench /tmp/llama/build/bin/llama-bench --gguf /tmp/offload-bench/llama-compare/Q4_K_M.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload.quant.host_kernels import Int4Linear

GROUP = 64


def shapes(hidden: int, ffn: int, layers: int, top_k: int, heads: int, kv_heads: int, vocab: int) -> list:
    """(out, in) of every matrix one decode token multiplies, in the order a step does."""
    head_dim = hidden // heads
    attention = [
        (hidden, hidden),
        (kv_heads * head_dim, hidden),
        (kv_heads * head_dim, hidden),
        (hidden, hidden),
    ]
    experts = [(ffn, hidden), (ffn, hidden), (hidden, ffn)] * top_k
    return [*(attention + experts) * layers, (vocab, hidden)]


def random_int4(out_features: int, in_features: int) -> Int4Linear:
    codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8)
    groups = in_features // GROUP
    scale = torch.rand(out_features, groups) * 0.01 + 1e-3
    offset = torch.randn(out_features, groups) * 0.01
    return Int4Linear.from_affine(codes, scale, offset, GROUP)


def llama_tok_s(binary: str, gguf: str, threads: int) -> float:
    command = [binary, "-m", gguf, "-p", "0", "-n", "64", "-r", "3", "-t", str(threads), "-o", "json"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50, help="decode steps timed per round")
    parser.add_argument("--llama-bench", help="llama-bench binary, to measure llama.cpp between rounds")
    parser.add_argument("--gguf", help="the Q4_K_M GGUF of the same model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    matrices = [random_int4(o, i) for o, i in shapes(1024, 3584, 4, 2, 32, 8, 32000)]
    code_bytes = sum(m.packed.numel() + m.scales_and_offsets.numel() * 2 for m in matrices)
    x = {width: torch.randn(1, width) for width in (1024, 3584)}
    ceilings, llama = [], []
    with torch.inference_mode():
        for m in matrices:  # warm-up
            m(x[m.in_features])
        for _ in range(args.rounds):
            started = time.perf_counter()
            for _ in range(args.steps):
                for m in matrices:
                    m(x[m.in_features])
            ceilings.append(args.steps / (time.perf_counter() - started))
            if args.llama_bench and args.gguf:
                llama.append(llama_tok_s(args.llama_bench, args.gguf, args.threads))
    ceiling = statistics.median(ceilings)
    report = {
        "load_average": os.getloadavg()[0],
        "matrices_per_token": len(matrices),
        "bytes_per_token": code_bytes,
        "kernel_ceiling_tok_s": round(ceiling, 1),
        "kernel_ms_per_token": round(1e3 / ceiling, 3),
        "kernel_gb_s": round(code_bytes * ceiling / 1e9, 2),
        "rounds": [round(c, 1) for c in ceilings],
    }
    if llama:
        report["llama_q4_k_m_tok_s"] = round(statistics.median(llama), 1)
        report["llama_rounds"] = [round(t, 1) for t in llama]
        report["ceiling_over_llama"] = round(
            statistics.median(c / t for c, t in zip(ceilings, llama, strict=True)), 3
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
