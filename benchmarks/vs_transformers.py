"""Resident decode speed of `offload` against transformers' `MixtralForCausalLM.generate`, one process.

Same checkpoint, same dtype, same prompt ids, greedy, exactly --new-tokens tokens each. transformers
is timed with a streamer that stamps every token, so its TTFT and decode time split exactly as ours
do (decode = every token after the first). Runs alternate between the two so a change in machine
load hits both alike; figures are medians.

    python benchmarks/vs_transformers.py --model offload/demo --dtype bfloat16 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _Stamps:
    """A transformers streamer that records when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt itself
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_transformers(
    model: object, prompt_ids: list[int], new_tokens: int
) -> tuple[list[int], float, float]:
    """(tokens, TTFT seconds, decode tok/s) of one greedy transformers generate."""
    stamps = _Stamps()
    inputs = torch.tensor([prompt_ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=stamps,
            pad_token_id=0,
        )
    tokens = out[0, len(prompt_ids) :].tolist()
    ttft = stamps.times[0] - start
    return tokens, ttft, (len(stamps.times) - 1) / (stamps.times[-1] - stamps.times[0])


def time_offload(model: object, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """(tokens, TTFT seconds, decode tok/s) of one greedy offload generation, all experts resident."""
    from offload.bench.measure import run_once

    run = run_once(model, prompt_ids, new_tokens)
    return run.tokens, run.timings.ttft_seconds, run.timings.decode_tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("offload/demo"))
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import MixtralForCausalLM

    from offload.bench.prompt import bench_prompt
    from offload.config import ModelConfig
    from offload.loading import load_model

    config = ModelConfig.from_file(args.model / "config.json")
    prompt_ids, source = bench_prompt(args.model, config.vocab_size, args.prompt_tokens, config.bos_token_id)
    dtype = getattr(torch, args.dtype)
    ours = load_model(args.model, dtype=args.dtype)
    theirs = MixtralForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    contenders = {"offload": (ours, time_offload), "transformers": (theirs, time_transformers)}
    results: dict[str, dict[str, list]] = {
        name: {"ttft": [], "decode": [], "tokens": []} for name in contenders
    }
    for model, timer in contenders.values():  # warm-up
        timer(model, prompt_ids, args.new_tokens)
    for _ in range(args.runs):
        for name, (model, timer) in contenders.items():
            tokens, ttft, decode = timer(model, prompt_ids, args.new_tokens)
            results[name]["ttft"].append(ttft)
            results[name]["decode"].append(decode)
            results[name]["tokens"] = tokens
    summary = {
        "model": str(args.model),
        "dtype": args.dtype,
        "prompt": {"tokens": len(prompt_ids), "source": source},
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "same_tokens": results["offload"]["tokens"] == results["transformers"]["tokens"],
    }
    for name, figures in results.items():
        summary[name] = {
            "decode_tokens_per_second": statistics.median(figures["decode"]),
            "decode_tokens_per_second_runs": figures["decode"],
            "ttft_seconds": statistics.median(figures["ttft"]),
        }
    ratio = (
        summary["offload"]["decode_tokens_per_second"] / summary["transformers"]["decode_tokens_per_second"]
    )
    summary["decode_ratio"] = ratio
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"| | decode tok/s (median of {args.runs}) | TTFT ms |")
    print("|---|---|---|")
    for name in contenders:
        figures = summary[name]
        print(f"| {name} | {figures['decode_tokens_per_second']:.1f} | {figures['ttft_seconds'] * 1e3:.1f} |")
    print(
        f"\noffload / transformers decode: {ratio:.2f} (target >= 2); same greedy tokens: {summary['same_tokens']}; "
        f"{args.dtype}, {len(prompt_ids)}-token prompt, {args.new_tokens} new tokens, "
        f"{summary['torch_threads']} threads, load average {summary['load_average']}"
    )


if __name__ == "__main__":
    main()
