"""Resident decode speed of this working tree against an earlier revision, in one process.

The earlier revision's `offload` package is taken from git (`git archive`), renamed `offload_base`
(its imports rewritten to match) and imported beside ours. Both load the same checkpoint; they then
alternate short greedy decodes, so a change in machine load hits both alike, and the result is the
median of the paired ratios (base time / ours). Both must generate the same tokens.

    python benchmarks/decode_ab.py --base 81c54f1 --pairs 25 --threads 1
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def base_package(revision: str, into: Path) -> None:
    """Write ``revision``'s offload/ into ``into``/offload_base, with its imports renamed."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "offload"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "offload").rename(into / "offload_base")
    for source in (into / "offload_base").rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        text = re.sub(r"\b(from|import) offload\b", r"\1 offload_base", text)
        source.write_text(text, encoding="utf-8")


def decode_ms(
    package: str, model: Any, prompt: list[int], tokens: int, clock: Any = time.perf_counter
) -> tuple[float, list[int]]:
    """Milliseconds per greedy decode step after a prefill of ``prompt``, and the tokens made."""
    kv_cache = importlib.import_module(f"{package}.kv_cache")
    cache = kv_cache.KVCache(model.config, len(prompt) + tokens + 1, dtype=model.dtype, device=model.device)
    with torch.inference_mode():
        token = int(model(torch.tensor([prompt]), cache, last_only=True)[0, -1].argmax())
        made = [token]
        start = clock()
        for _ in range(tokens):
            token = int(model(torch.tensor([[token]]), cache, last_only=True)[0, -1].argmax())
            made.append(token)
        return (clock() - start) / tokens * 1e3, made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--model", default=str(ROOT / "offload" / "demo"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--pairs", type=int, default=25)
    parser.add_argument("--tokens", type=int, default=48, help="decode steps per run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this thread's CPU time (with --threads 1 on a shared machine: the time the decode "
        "ran, without the time other processes held the core; cache and memory contention still count)",
    )
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        base_package(args.base, Path(scratch))
        sys.path.insert(0, scratch)
        packages = ("offload_base", "offload")
        models = {
            name: importlib.import_module(f"{name}.loading").load_model(args.model, dtype=args.dtype)
            for name in packages
        }
        prompt = list(range(5, 37))
        for name in packages:  # warm-up
            decode_ms(name, models[name], prompt, 8)
        times: dict[str, list[float]] = {name: [] for name in packages}
        same_tokens = True
        for _ in range(args.pairs):
            runs = {name: decode_ms(name, models[name], prompt, args.tokens, clock) for name in packages}
            same_tokens &= runs["offload_base"][1] == runs["offload"][1]
            for name, (ms, _) in runs.items():
                times[name].append(ms)
    ratios = [base / ours for base, ours in zip(times["offload_base"], times["offload"], strict=True)]
    print(
        f"{args.base} {statistics.median(times['offload_base']):.3f} ms/token, this tree "
        f"{statistics.median(times['offload']):.3f} ms/token; speed-up, median of {args.pairs} pairs: "
        f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
        f"same tokens: {same_tokens}; {args.dtype}, {args.threads} thread(s), {args.tokens} steps a run, "
        f"{args.clock} clock"
    )


if __name__ == "__main__":
    main()
