"""Admission control for the host tier: would streaming a miss through, instead of keeping it, close the gap to Belady?

Replays each trace's host-tier requests (the device level as ``offload.trace.replay_tiers`` replays it, LRFU with the
trace's guesses) through a pool of S slots under five rules, and prints the disk reads summed over the traces, as
ratios to Belady's (which must keep every miss, as the engine's tier does):

- ``belady``: the fewest reads when every miss is kept;
- ``belady+bypass``: Belady's rule that may also stream a miss through when it is needed later than every victim;
- ``adaptive``: the tier's default (``offload.experts.adaptive_policy``);
- ``adaptive+bypass``: the same, streaming a miss through when it is worth less than the victim (counts updated
  with the step first), with up to top_k stream buffers outside the pool;
- ``adaptive+bypass, buffers in the budget``: the same with those buffers taken from the pool's slots.

    PYTHONPATH=. python benchmarks/host_policy_bypass.py /tmp/h2/f32tr /tmp/h2/q4tr /tmp/h2/q4ho --host-experts 4

(trace directories as ``benchmarks/disk_tier_replay.py`` writes them; docs/BENCHMARKS.md, "Admission").
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offload.experts.adaptive_policy import AdaptivePolicy  # noqa: E402
from offload.experts.policy import starts_prompt  # noqa: E402
from offload.trace.format import Trace, load_trace  # noqa: E402
from offload.trace.replay import replay_layer  # noqa: E402

Key = tuple[int, int]
RULES = {  # name: (policy, bypass, slots taken from the pool for stream buffers)
    "belady": ("belady", False, 0),
    "belady+bypass": ("belady", True, 0),
    "adaptive": ("adaptive", False, 0),
    "adaptive+bypass": ("adaptive", True, 0),
    "adaptive+bypass, buffers in the budget": ("adaptive", True, -1),  # -1: top_k slots
}


def device_level(trace: Trace, k: int) -> tuple[list[list[list[int]]], list[list[set[int]]] | None]:
    """What the tier is asked for, [layer][step], and the device's slots after each step (None at K = 0)."""
    if not k:
        return [list(trace.needed_by_layer[layer]) for layer in range(trace.num_layers)], None
    requests, held = [], []
    for layer in range(trace.num_layers):
        loads: list[list[int]] = []
        after: list[set[int]] = []
        guesses = trace.guesses_by_layer[layer]
        replay_layer(trace.needed_by_layer[layer], guesses, "lrfu", k, trace.num_experts, loads, held=after)
        requests.append([sorted(step) for step in loads])
        held.append(after)
    return requests, held


def device_view(held: list[list[set[int]]] | None, step: int, now: int) -> Callable[[int, int], bool] | None:
    """Whether the device holds (layer, expert) while layer ``now`` of ``step`` is served (None: no device)."""
    if held is None:
        return None
    return lambda layer, expert: (
        expert in held[layer][step] if layer <= now else step > 0 and expert in held[layer][step - 1]
    )


def disk_reads(
    trace: Trace,
    requests: list[list[list[int]]],
    held: list[list[set[int]]] | None,
    policy: str,
    slots: int,
    bypass: bool,
) -> int:
    """The pool's misses under ``policy``; with ``bypass`` a miss worth less than the victim is not kept."""
    layers = trace.num_layers
    kept: dict[Key, int] = {}  # key -> tick of its latest request
    adaptive = AdaptivePolicy(slots, layers, trace.num_experts)
    upcoming: dict[Key, deque[int]] = {}
    for step in range(trace.steps):
        for layer in range(layers):
            for expert in requests[layer][step]:
                upcoming.setdefault((layer, expert), deque()).append(step * layers + layer)

    def next_use(key: Key) -> float:
        return upcoming[key][0] if upcoming.get(key) else math.inf

    reads = tick = 0
    for step in range(trace.steps):
        for layer in range(layers):
            asked = requests[layer][step]
            for expert in asked:
                upcoming[(layer, expert)].popleft()
            keys = [(layer, e) for e in asked]
            misses = [key for key in keys if key not in kept]
            reads += len(misses)
            device = device_view(held, step, layer)
            starts = starts_prompt(layer, trace.needed_by_layer[layer][step], trace.top_k)
            if policy == "adaptive" and bypass:  # this step counted first, so a miss's worth includes it
                adaptive.note_step(layer, asked, starts, device)
            if policy == "belady":
                misses.sort(key=lambda key: (next_use(key), key))
            for key in misses:
                if len(kept) >= slots:
                    candidates = [other for other in kept if other not in keys]
                    if not candidates:
                        continue  # streamed through: the step needs more than the pool holds
                    if policy == "belady":
                        victim = max(candidates, key=lambda o: (next_use(o), (-o[0], -o[1])))
                        if bypass and next_use(key) >= next_use(victim):
                            continue
                    else:
                        victim = adaptive.victim(sorted(candidates, key=kept.__getitem__), layer, device)
                        if bypass and adaptive.worth(key, layer, device) < adaptive.worth(
                            victim, layer, device
                        ):
                            continue
                    del kept[victim]
                kept[key] = 0
            for key in keys:
                if key in kept:
                    tick += 1
                    kept[key] = tick
            if policy == "adaptive" and not bypass:  # as the engine's tier: after the step
                adaptive.note_step(layer, asked, starts, device)
    return reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_dirs", nargs="+", type=Path)
    parser.add_argument(
        "--host-experts", type=int, default=4, help="the pool's slots per layer (4: half of 8)"
    )
    parser.add_argument("-k", default="0,2,4", help="device slots per layer, a comma list")
    args = parser.parse_args()
    for directory in args.trace_dirs:
        traces = [load_trace(path) for path in sorted(directory.glob("*.trace"))]
        for k in (int(text) for text in args.k.split(",")):
            totals = dict.fromkeys(RULES, 0)
            for trace in traces:
                requests, held = device_level(trace, k)
                slots = args.host_experts * trace.num_layers
                for name, (policy, bypass, taken) in RULES.items():
                    taken = trace.top_k if taken < 0 else taken
                    totals[name] += disk_reads(trace, requests, held, policy, slots - taken, bypass)
            base = totals["belady"]
            shown = ", ".join(f"{name} {reads} ({reads / base:.3f})" for name, reads in totals.items())
            print(f"{directory} K={k}: {shown}", flush=True)


if __name__ == "__main__":
    main()
