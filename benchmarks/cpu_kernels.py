"""CPU-only decode of a float32 random Mixtral against 4-bit conversions of it, with and without host kernels.

The model is issue 15's: hidden 1024, FFN 3584, 4 layers, 8 experts, vocabulary 32000, float32, random weights
(``random_model.write_random_tensors``). It is converted once per scheme with ``offload convert``'s code (hqq
quantization at one thread takes minutes; the directories are reused). Rows:

- ``float32``: the float checkpoint, computed in float32;
- ``hqq4-dense``: attention and experts ``hqq:4:64``, dequantized to float32 at load (``host_kernels=False``: what
  a CPU did before the host kernels);
- ``hqq4``: the same checkpoint on the int4 kernel (codes kept, bf16 activations);
- ``hqq4-bf16``: the same, loaded with ``dtype=bfloat16`` (embedding, norms and the float lm_head in bf16);
- ``hqq4-lm8``: the lm_head in ``bnb:int8`` (the int8 kernel), attention and experts as ``hqq4``;
- ``hqq4-lm``: ``hqq:4:64`` for the lm_head too, on the int4 kernel.

The lm_head (32000 x 1024) is a quarter of float32's bytes read per token and, kept in float32 beside 4-bit
experts, about 45 % of ``hqq4``'s decode time; hence the two lm_head rows.

Decode tok/s: a 16-token prompt, then ``--tokens`` greedy steps; every step after the prefill is timed. All rows
are loaded in one process and run interleaved, ``--runs`` rounds, so a change in machine load hits them alike;
figures are medians, and ``paired`` is the median over rounds of each row's tok/s over the first row's. Peak RSS is measured per row in a child process that loads the row and decodes 16 tokens
(a process's peak is its own, so rows cannot share one).

    OMP_NUM_THREADS=1 python benchmarks/cpu_kernels.py --threads 1 --runs 7 --json /tmp/cpu_kernels.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.random_model import SHAPE, write_random_tensors  # noqa: E402
from offload.checkpoint.convert import convert_checkpoint  # noqa: E402
from offload.kv_cache import KVCache  # noqa: E402
from offload.loading import load_model  # noqa: E402
from offload.quant.scheme import QuantScheme  # noqa: E402

BASE = Path("/tmp/offload-bench/cpu-kernels")
PROMPT = list(range(5, 21))
# name -> (checkpoint directory name, compute dtype, host kernels)
ROWS: dict[str, tuple[str, str, bool]] = {
    "float32": ("float32", "float32", True),
    "hqq4-dense": ("hqq4", "float32", False),
    "hqq4": ("hqq4", "float32", True),
    "hqq4-bf16": ("hqq4", "bfloat16", True),
    "hqq4-lm8": ("hqq4-lm8", "float32", True),
    "hqq4-lm": ("hqq4-lm", "float32", True),
}
SCHEMES = {  # converted directory -> lm_head spec (attention and experts are hqq:4:64 in both)
    "hqq4": "none",
    "hqq4-lm8": "bnb:int8",
    "hqq4-lm": "hqq:4:64",
}


def checkpoints(base: Path) -> None:
    """Write the float32 model and its conversions unless they are there."""
    source = write_random_tensors(base / "float32", SHAPE, dtype=torch.float32)
    layers = SHAPE["num_hidden_layers"]
    for name, lm_head in SCHEMES.items():
        if not (base / name / "config.json").is_file():
            started = time.perf_counter()
            scheme = QuantScheme.build(layers, attention="hqq:4:64", experts="hqq:4:64", lm_head=lm_head)
            convert_checkpoint(source, base / name, scheme)
            print(f"converted {name} in {time.perf_counter() - started:.0f} s", file=sys.stderr)


def load(base: Path, row: str) -> Any:
    directory, dtype, host_kernels = ROWS[row]
    return load_model(base / directory, dtype=dtype, device="cpu", host_kernels=host_kernels)


def decode(model: Any, tokens: int) -> tuple[float, list[int]]:
    """Decode tok/s after a prefill of PROMPT, and the greedy tokens."""
    cache = KVCache(model.config, len(PROMPT) + tokens + 1, dtype=model.dtype, device=model.device)
    with torch.inference_mode():
        token = int(model(torch.tensor([PROMPT]), cache, last_only=True)[0, -1].argmax())
        made = [token]
        start = time.perf_counter()
        for _ in range(tokens):
            token = int(model(torch.tensor([[token]]), cache, last_only=True)[0, -1].argmax())
            made.append(token)
        return tokens / (time.perf_counter() - start), made


def peak_rss(base: Path, row: str, threads: int) -> float:
    """GB of peak resident memory of a child that loads ``row`` and decodes 16 tokens."""
    command = [sys.executable, __file__, "--base", str(base), "--threads", str(threads), "--rss-of", row]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=BASE, help="where the checkpoints are written")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--tokens", type=int, default=64, help="decode steps per run")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--rss-of", choices=list(ROWS), help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_of:
        decode(load(args.base, args.rss_of), 16)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)  # Linux reports KiB
        return

    checkpoints(args.base)
    rss = {row: peak_rss(args.base, row, args.threads) for row in args.rows}
    models = {row: load(args.base, row) for row in args.rows}
    for model in models.values():
        decode(model, 8)  # warm-up
    speeds: dict[str, list[float]] = {row: [] for row in args.rows}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.runs):
        for row, model in models.items():
            speed, made = decode(model, args.tokens)
            speeds[row].append(speed)
            tokens[row] = made
    reference = statistics.median(speeds[args.rows[0]])
    figures = {
        row: {
            "decode_tok_s": statistics.median(speeds[row]),
            "runs": speeds[row],
            "ratio_to_first_row": statistics.median(speeds[row]) / reference,
            # the same ratio within each round, then the median: a change of load between rounds cancels
            "paired_ratio": statistics.median(
                mine / first for mine, first in zip(speeds[row], speeds[args.rows[0]], strict=True)
            ),
            "peak_rss_gb": rss[row],
            "same_tokens_as_hqq4_dense": tokens[row] == tokens.get("hqq4-dense"),
        }
        for row in args.rows
    }
    print(f"{args.threads} thread(s), {args.runs} interleaved runs of {args.tokens} decode steps; medians")
    print(
        f"{'row':<12} {'tok/s':>7} {'x ' + args.rows[0]:>12} {'paired':>7} {'peak RSS GB':>12}  tokens as hqq4-dense"
    )
    for row, fig in figures.items():
        print(
            f"{row:<12} {fig['decode_tok_s']:7.2f} {fig['ratio_to_first_row']:12.2f} {fig['paired_ratio']:7.2f}"
            f" {fig['peak_rss_gb']:12.2f}"
            f"  {'same' if fig['same_tokens_as_hqq4_dense'] else 'differ'}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"threads": args.threads, "tokens": args.tokens, "rows": figures}, indent=1)
        )


if __name__ == "__main__":
    main()
