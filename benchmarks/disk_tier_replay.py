"""The disk tier on demo-model traces: a host tier of H x L experts (shared by the L layers) replayed under
device slots, each host policy's disk reads against Belady's (issue 17's target), as markdown.

Records seven traces with `offload trace record` (greedy, --threads 1; two chat prompts that stop at EOS,
five raw completions of up to 200 or 300 tokens), unless they are already in --out, then replays each as
`offload trace replay TRACE -k K --policy lrfu+prefetch --host-experts H [--host-counts requests]` does (cyclic,
the tier's default, first), and sums the reads over
the traces. Then the seven traces as one session (one process serving the prompts in a row: both levels
carry over from one prompt to the next). The plan's prediction of the host tier's hit rate
(``offload.settings.plan_tiers``) is shown beside the measured one. With --bounds, two oracles that no
online policy can beat by much: a pool told each expert's request count over the whole trace in advance,
and one told besides which experts the rest of the current token will ask for.

    python benchmarks/disk_tier_replay.py --out /tmp/offload-disk --host-experts 4 -k 0,2,4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = (  # name, prompt, chat, new tokens
    ("story", "Write a short story about a lighthouse keeper who finds a message in a bottle.", True, 200),
    ("bread", "List the steps to bake bread at home, and explain why each one matters.", True, 200),
    ("fib", "def fibonacci(n):", False, 200),
    ("rome", "The history of the Roman Empire", False, 200),
    ("village", "Once upon a time, in a small village by the sea,", False, 300),
    ("numpy", "import numpy as np", False, 300),
    ("letter", "Dear hiring manager, I am writing to apply for", False, 300),
)
# Prompts no policy constant was chosen on (--held-out): adaptive's were chosen on PROMPTS' float and 4-bit traces.
HELD_OUT_PROMPTS = (
    ("recipe", "How do I make a good tomato soup?", True, 200),
    ("email", "Write an email to my landlord about a broken heater.", True, 200),
    ("sort", "def quicksort(arr):", False, 250),
    ("ocean", "The deep ocean is home to", False, 250),
    ("news", "Breaking news: scientists have discovered", False, 300),
)
# (policy, what its lrfu and lfu count): every access, or the tier's requests only (adaptive and cyclic always
# count these).
HOST_POLICIES = (
    ("adaptive", "requests"),
    ("cyclic", "requests"),
    ("lru", "accesses"),
    ("lrfu", "accesses"),
    ("lrfu:0.98", "accesses"),
    ("lfu", "accesses"),
    ("lrfu", "requests"),
    ("lrfu:0.98", "requests"),
    ("lfu", "requests"),
    ("belady", "accesses"),
)
NAMED = ("adaptive", "cyclic", "lru", "belady")  # policies shown by name alone: they count one way


def record(out: Path, model: str | None = None, prompts: tuple = PROMPTS) -> list[Path]:
    """Each prompt's trace, recorded unless present: `offload trace record` in a child process (of ``model``,
    else the demo model)."""
    paths = []
    for name, prompt, chat, tokens in prompts:
        path = out / f"{name}.trace"
        if not path.exists():
            command = [sys.executable, "-m", "cli.main", "trace", "record", str(path), "--prompt", prompt,
                       "--max-new-tokens", str(tokens), "--threads", "1", *([] if chat else ["--no-chat"]),
                       *(["-m", model] if model else [])]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            subprocess.run(command, check=True, cwd=ROOT, env=env)
        paths.append(path)
    return paths


def device_requests(trace, device_policy: str, k: int) -> list[list[list[int]]]:
    """[layer][step]: what the device level asks the host tier for, as ``replay_two_level`` replays it."""
    from offload.trace.replay import replay_layer

    if not k:
        return trace.needed_by_layer
    requests = []
    for layer in range(trace.num_layers):
        guesses = trace.guesses_by_layer[layer] if device_policy.endswith("+prefetch") else None
        loads: list[list[int]] = []
        replay_layer(trace.needed_by_layer[layer], guesses, device_policy.removesuffix("+prefetch"), k,
                     trace.num_experts, loads)  # fmt: skip
        requests.append([sorted(step) for step in loads])
    return requests


def oracle_reads(trace, requests: list[list[list[int]]], slots: int, lookahead: bool) -> int:
    """Disk reads of a pool that knows each expert's requests over the whole trace before it starts, and
    evicts the fewest (ties: the layer that comes round last, then the least recent). With ``lookahead`` it
    also knows which experts the rest of the current token asks for, and evicts those last (furthest first).
    An analysis of what frequencies can give, not a policy: the future is not known."""
    from offload.experts.policy import cycle_distance

    layers = trace.num_layers
    total: dict[tuple[int, int], int] = {}
    for layer in range(layers):
        for step in requests[layer]:
            for expert in step:
                total[(layer, expert)] = total.get((layer, expert), 0) + 1
    held: dict[tuple[int, int], int] = {}  # key -> tick of its latest request
    reads = tick = 0
    for step in range(trace.steps):
        for layer in range(layers):
            keys = [(layer, e) for e in requests[layer][step]]
            later = {(after, e): after for after in range(layer + 1, layers) for e in requests[after][step]}
            missing = [key for key in keys if key not in held]
            reads += len(missing)
            for key in missing:
                if len(held) >= slots:
                    candidates = [other for other in held if other not in keys]
                    if not candidates:
                        break
                    victim = min(candidates, key=lambda o: (
                        lookahead and o in later, -later.get(o, 0) if lookahead else 0, total[o],
                        -cycle_distance(o[0], layer, layers), held[o]))  # fmt: skip
                    del held[victim]
                held[key] = 0
            for key in keys:
                if key in held:
                    tick += 1
                    held[key] = tick
    return reads


def foresight_reads(trace, requests: list[list[list[int]]], slots: int, visits: int) -> int:
    """Disk reads of cyclic (its online counts, no device weight) told, for every expert, whether one of its
    layer's next ``visits`` visits will ask for it: those are evicted last. With ``visits`` = 1 that is the
    rest of this token and, for the layers already served, the next token: what a perfect predictor of the
    router could tell. An analysis of how much foresight Belady's edge needs, not a policy."""
    from bisect import bisect_left

    from offload.experts.policy import CYCLIC_DECAY, age_uses, cyclic_worth, starts_prompt

    layers, experts = trace.num_layers, trace.num_experts
    steps_of: dict[tuple[int, int], list[int]] = {}  # key -> the steps that ask for it, ascending
    for layer in range(layers):
        for step, asked in enumerate(requests[layer]):
            for expert in asked:
                steps_of.setdefault((layer, expert), []).append(step)
    counts = [[0.0] * experts for _ in range(layers)]
    held: dict[tuple[int, int], int] = {}  # key -> tick of its latest request
    reads = tick = 0
    for step in range(trace.steps):
        for layer in range(layers):
            keys = [(layer, e) for e in requests[layer][step]]

            def soon(key: tuple[int, int], step: int = step, now: int = layer) -> bool:
                first = step if key[0] > now else step + 1  # its layer's next visit
                asked = steps_of.get(key, [])
                at = bisect_left(asked, first)
                return at < len(asked) and asked[at] < first + visits

            missing = [key for key in keys if key not in held]
            reads += len(missing)
            for key in missing:
                if len(held) >= slots:
                    candidates = sorted((o for o in held if o not in keys), key=held.__getitem__)
                    if not candidates:
                        break
                    del held[
                        min(
                            candidates,
                            key=lambda o, now=layer: (soon(o), cyclic_worth(o, counts, now, layers)),
                        )
                    ]
                held[key] = 0
            for key in keys:
                if key in held:
                    tick += 1
                    held[key] = tick
            if starts_prompt(layer, trace.needed_by_layer[layer][step], trace.top_k):
                for row in counts:
                    row[:] = [0.0] * experts
            age_uses(counts[layer], requests[layer][step], CYCLIC_DECAY)
    return reads


def session(traces: list) -> object:
    """The traces one after another, as one process would see them: a prompt's prefill follows the last reply."""
    import numpy as np

    from offload.trace.format import Trace

    first = traces[0]
    joined = {name: np.concatenate([getattr(t, name) for t in traces])
              for name in ("step_tokens", "ids", "weights", "guess_counts", "guesses")}  # fmt: skip
    return Trace(model=first.model, num_layers=first.num_layers, num_experts=first.num_experts,
                 top_k=first.top_k, expert_bytes=first.expert_bytes, **joined)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("/tmp/offload-disk"), help="where the traces are kept"
    )
    parser.add_argument("--host-experts", type=int, default=4, help="H: the host tier holds H x L experts")
    parser.add_argument(
        "-k", "--experts-per-layer", default="0,2,4", help="device slots per layer, a comma list"
    )
    parser.add_argument("--device-policy", default="lrfu+prefetch")
    parser.add_argument("--model", help="record the traces from this model (default: the demo model)")
    parser.add_argument("--bounds", action="store_true", help="also the oracles' reads against Belady's")
    parser.add_argument("--held-out", action="store_true", help="HELD_OUT_PROMPTS instead of PROMPTS")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from offload.settings.plan_speed import LOCALITY_BONUS
    from offload.settings.plan_tiers import hit_rate
    from offload.trace.format import load_trace
    from offload.trace.replay_tiers import replay_two_level

    prompts = HELD_OUT_PROMPTS if args.held_out else PROMPTS
    traces = [load_trace(path) for path in record(args.out, args.model, prompts)]
    h = args.host_experts
    experts = traces[0].num_experts
    print(f"traces: {', '.join(f'{name} {t.tokens}' for (name, *_), t in zip(prompts, traces, strict=True))} "
          f"tokens ({sum(t.tokens for t in traces)} in all); host tier of {h} x {traces[0].num_layers} experts, "
          f"{h} of {experts} per layer on average\n")  # fmt: skip
    print("| K | device | host policy | host hit rate | disk reads | reads / Belady | per trace |")
    print("|---|---|---|---|---|---|---|")
    for k in (int(text) for text in args.experts_per_layer.split(",")):
        slots = h * traces[0].num_layers
        rows = {
            (p, c): [replay_two_level(t, args.device_policy, k, p, slots, counts=c) for t in traces]
            for p, c in HOST_POLICIES
        }
        optimum = [row.host_misses for row in rows[("belady", "accesses")]]
        for (name, counted), results in rows.items():
            policy = name if name in NAMED else f"{name}, counting {counted}"
            reads = [row.host_misses for row in results]
            hits = sum(row.host_hits for row in results) / sum(row.host_accesses for row in results)
            ratios = [r / o for r, o in zip(reads, optimum, strict=True)]
            device = args.device_policy if k else "none"
            print(f"| {k} | {device} | {policy} | {hits:.1%} | {sum(reads)} | {sum(reads) / sum(optimum):.2f} "
                  f"| {min(ratios):.2f} to {max(ratios):.2f} |")  # fmt: skip
    joined = session(traces)
    print(f"\nSession: the {len(traces)} prompts in a row, {joined.tokens} tokens\n")
    print("| K | device | host policy | host hit rate | disk reads | reads / Belady |")
    print("|---|---|---|---|---|---|")
    for k in (int(text) for text in args.experts_per_layer.split(",")):
        slots = h * joined.num_layers
        rows = {
            (p, c): replay_two_level(joined, args.device_policy, k, p, slots, counts=c)
            for p, c in HOST_POLICIES
        }
        optimum = rows[("belady", "accesses")].host_misses
        for (name, counted), row in rows.items():
            policy = name if name in NAMED else f"{name}, counting {counted}"
            device = args.device_policy if k else "none"
            print(f"| {k} | {device} | {policy} | {row.host_hit_rate:.1%} | {row.host_misses} "
                  f"| {row.host_misses / optimum:.2f} |")  # fmt: skip
    if args.bounds:
        print("\n| K | oracle | disk reads | reads / Belady | per trace |")
        print("|---|---|---|---|---|")
        for k in (int(text) for text in args.experts_per_layer.split(",")):
            slots = h * traces[0].num_layers
            optimum = [
                replay_two_level(t, args.device_policy, k, "belady", slots).host_misses for t in traces
            ]
            requested = [device_requests(t, args.device_policy, k) for t in traces]
            for name, lookahead, visits in (
                ("frequencies known", False, 0),
                ("frequencies + the rest of the token", True, 0),
                ("cyclic + each layer's next visit known", False, 1),
                ("cyclic + its next 2 visits known", False, 2),
            ):
                pairs = zip(traces, requested, strict=True)
                if visits:
                    reads = [foresight_reads(t, r, slots, visits) for t, r in pairs]
                else:
                    reads = [oracle_reads(t, r, slots, lookahead) for t, r in pairs]
                ratios = [r / o for r, o in zip(reads, optimum, strict=True)]
                print(f"| {k} | {name} | {sum(reads)} | {sum(reads) / sum(optimum):.2f} "
                      f"| {min(ratios):.2f} to {max(ratios):.2f} |")  # fmt: skip
    print(
        f"\nThe plan's host-tier hit rate for H = {h} of {experts}: {hit_rate(h, experts, LOCALITY_BONUS):.1%}"
    )


if __name__ == "__main__":
    main()
