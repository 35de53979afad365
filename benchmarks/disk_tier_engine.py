"""The engine's host tier on an emulated disk against Belady's reads on the same run's trace (issue 17): for each
prompt, `offload generate` with a host budget of half the experts under each tier policy, with and without
prefetching, and `offload trace record` of the same greedy run, replayed with Belady on the pool.

The generate runs use profiles written next to the traces: the `cpu` profile with `[host] policy` set. A run's
routing does not depend on the tier (its tokens are the same bit for bit), so the trace is the run's.

    python benchmarks/disk_tier_engine.py -m /tmp/h6/demo-q4 --out /tmp/h6/eng -k 0,2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = (  # name, raw-completion prompt, new tokens: three of disk_tier_replay.py's
    ("fib", "def fibonacci(n):", 200),
    ("rome", "The history of the Roman Empire", 200),
    ("numpy", "import numpy as np", 300),
)
HELD_OUT = (  # --held-out: three of disk_tier_replay.py's HELD_OUT_PROMPTS, on which no constant was chosen
    ("sort", "def quicksort(arr):", 250),
    ("ocean", "The deep ocean is home to", 250),
    ("news", "Breaking news: scientists have discovered", 300),
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def offload(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "cli.main", *args], check=True, cwd=ROOT, env=ENV,
                          capture_output=True, text=True)  # fmt: skip
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-m", "--model", required=True, help="a converted checkpoint (the tier reads stored bytes)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("/tmp/offload-disk-engine"), help="traces and profiles"
    )
    parser.add_argument(
        "-k", "--experts-per-layer", default="0,2", help="device slots per layer (0: host only)"
    )
    parser.add_argument("--host-memory", default="0.0029", help="GiB: half the 4-bit demo's experts")
    parser.add_argument("--policies", default="adaptive,cyclic,lrfu")
    parser.add_argument("--held-out", action="store_true", help="the HELD_OUT prompts instead of PROMPTS")
    parser.add_argument("--prefetches", default="2,0", help="--prefetch values to run (0: no guesses)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from offload.trace.format import load_trace
    from offload.trace.replay_tiers import replay_two_level

    cpu = (ROOT / "profiles" / "cpu.toml").read_text()
    for policy in args.policies.split(","):
        text = cpu.replace('name = "cpu"', f'name = "cpu-{policy}"') + f'policy = "{policy}"\n'
        (args.out / f"cpu-{policy}.toml").write_text(text)  # [host] is the profile's last table
    print(
        "| prompt | K | tier policy | prefetch | demand misses | disk reads | of which guesses | Belady "
        "| reads / Belady | decode tok/s | disk wait s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, prompt, tokens in HELD_OUT if args.held_out else PROMPTS:
        trace_path = args.out / f"{name}.trace"
        if not trace_path.exists():
            offload("trace", "record", str(trace_path), "-m", args.model, "--prompt", prompt, "--no-chat",
                    "--max-new-tokens", str(tokens), "--threads", "1")  # fmt: skip
        trace = load_trace(trace_path)
        for k in (int(text) for text in args.experts_per_layer.split(",")):
            for policy in args.policies.split(","):
                for prefetch in (int(text) for text in args.prefetches.split(",")):
                    run = json.loads(offload(
                        "generate", prompt, "-m", args.model, "-p", str(args.out / f"cpu-{policy}.toml"), "--no-chat",
                        "--temperature", "0", "--max-new-tokens", str(tokens), "--threads", "1",
                        "--host-memory", args.host_memory, "--disk", "emulated:2", "--prefetch", str(prefetch),
                        "--json", *(["-k", str(k)] if k else []),
                    ))  # fmt: skip
                    tier = run["host_tier"]
                    device = "lrfu+prefetch" if prefetch else "lrfu"
                    belady = replay_two_level(trace, device, k, "belady", tier["slots"]).host_misses
                    print(f"| {name} | {k} | {policy} | {prefetch} | {tier['misses']} | {tier['reads']} "
                          f"| {tier['prefetch_reads']} | {belady} | {tier['reads'] / belady:.2f} "
                          f"| {run['timings']['decode_tokens_per_second']:.1f} | {tier['disk_wait_seconds']:.3f} |",
                          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
