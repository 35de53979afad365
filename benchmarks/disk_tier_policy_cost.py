"""What the host tier's policy costs per token (issue 17): the two-level replay at K = 0 (every access reaches
the tier, as on the host-only path) under each policy, timed on this thread's CPU clock, per token; LRU's loop
is the baseline, so the difference is the policy's bookkeeping (victim choice, counts, adaptive's shadows).

On disk_tier_replay.py's traces (--out), and on a synthetic Mixtral-shaped trace (32 layers x 8 experts, top-2,
a tier of half the experts: 128 slots), whose routing drifts (each layer favours 3 experts that change every 50
tokens).

    python benchmarks/disk_tier_policy_cost.py --out /tmp/offload-disk
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POLICIES = ("lru", "cyclic", "adaptive")


def mixtral_like(tokens: int, seed: int = 0):
    """A 32-layer, 8-expert, top-2 trace of ``tokens`` decode steps after a 32-token prompt."""
    from tests.test_trace import make_trace

    rng = random.Random(seed)
    favourites = [rng.sample(range(8), 3) for _ in range(32)]
    steps = []
    for step in range(tokens + 1):
        if step % 50 == 0:
            favourites = [rng.sample(range(8), 3) for _ in range(32)]
        count = 32 if step == 0 else 1
        steps.append([[sorted(rng.sample(fav if rng.random() < 0.7 else range(8), 2)) for _ in range(count)]
                      for fav in favourites])  # fmt: skip
    return make_trace(steps, num_experts=8)


def per_token_us(trace, policy: str, slots: int, repeats: int) -> float:
    """The median over ``repeats`` of the replay's CPU time per token, in microseconds."""
    from offload.trace.replay_tiers import replay_two_level

    times = []
    for _ in range(repeats):
        start = time.thread_time()
        replay_two_level(trace, "lru", 0, policy, slots)
        times.append((time.thread_time() - start) / trace.tokens * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("/tmp/offload-disk"), help="disk_tier_replay.py's traces"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from offload.trace.format import load_trace

    sets = {
        "demo traces (4 layers x 8, 16 slots)": (
            [load_trace(p) for p in sorted(args.out.glob("*.trace"))],
            16,
        )
    }
    sets["Mixtral-shaped, synthetic (32 x 8, 128 slots)"] = ([mixtral_like(500)], 128)
    print("| traces | policy | CPU µs per token (replay loop) | over LRU's |\n|---|---|---|---|")
    for name, (traces, slots) in sets.items():
        tokens = sum(t.tokens for t in traces)
        cost = {
            p: sum(per_token_us(t, p, slots, args.repeats) * t.tokens for t in traces) / tokens
            for p in POLICIES
        }
        for policy in POLICIES:
            print(f"| {name} | {policy} | {cost[policy]:.0f} | {cost[policy] - cost['lru']:+.0f} |")


if __name__ == "__main__":
    main()
