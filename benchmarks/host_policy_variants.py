"""The host-tier policies tried before cyclic (issue 17), on disk_tier_replay.py's traces: disk reads against
Belady's, summed over the traces, as markdown.

Each variant ranks the pool's experts by a score (the smallest goes) built from p, an expert's count of the
tier's requests (decayed by D after each step of its layer), and d, the layer steps until the model reaches
its layer again (``offload.experts.policy.cycle_distance``); ties go to the least recently requested:

- ``p``: the count alone (LFU of the requests, D = 1 or 0.999);
- ``p, cyclic ties``: the count, then the larger d first; ``cyclic`` is this with 0.1 x d taken off the
  count, a device-held expert's count x 0.8, and the counts forgotten at each prompt (its row here is the
  library's, ``replay_two_level``);
- ``p / d``: expected requests per layer step the slot is held (benefit per slot-time);
- ``expected next use``: d + L (1/q - 1), q = p over the layer's decayed steps (Belady's rule with the
  geometric wait of an expert asked for with probability q a visit);
- ``+ next layer's guesses``: the count, with the prefetcher's guesses for the next layer raised to 1 + p;
- ``device's experts halved`` (or x 0.8): the count weighed down for experts the device holds (the tier's
  copy waits for the device to evict them).

    python benchmarks/host_policy_variants.py --out /tmp/offload-disk --host-experts 4 -k 0,2,4
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.disk_tier_replay import device_requests, record  # noqa: E402
from offload.experts.policy import cycle_distance  # noqa: E402

Score = Callable[[float, int, int, bool, bool], tuple[float, ...]]  # p, d, L, guessed, held -> rank
VARIANTS: tuple[tuple[str, float, Score], ...] = (
    ("p", 1.0, lambda p, d, L, g, h: (p,)),
    ("p", 0.999, lambda p, d, L, g, h: (p,)),
    ("p, cyclic ties", 1.0, lambda p, d, L, g, h: (p, -d)),
    ("p / d", 1.0, lambda p, d, L, g, h: (p / d,)),
    ("p / d", 0.999, lambda p, d, L, g, h: (p / d,)),
    ("expected next use", 0.999, lambda p, d, L, g, h: (-(d + L * (1 / max(p, 1e-9) - 1)),)),
    ("p + next layer's guesses", 1.0, lambda p, d, L, g, h: (p + (1 if g else 0), -d)),
    ("p, device's experts halved", 1.0, lambda p, d, L, g, h: (p / 2 if h else p, -d)),
    ("p, device's experts x 0.8", 1.0, lambda p, d, L, g, h: (p * 0.8 if h else p, -d)),
)


def held_by_device(trace, device_policy: str, k: int) -> list[list[set[int]]]:
    """[layer][step]: the experts in the layer's device slots after the step (the device level's replay)."""
    from offload.trace.replay import replay_layer

    held: list[list[set[int]]] = []
    for layer in range(trace.num_layers):
        rows: list[set[int]] = []
        if k:
            guesses = trace.guesses_by_layer[layer] if device_policy.endswith("+prefetch") else None
            replay_layer(trace.needed_by_layer[layer], guesses, device_policy.removesuffix("+prefetch"), k,
                         trace.num_experts, held=rows)  # fmt: skip
        held.append(rows or [set()] * trace.steps)
    return held


def _rank(o, where, counts, visits, held, pool, score: Score) -> tuple[float, ...]:
    """``score``'s rank of pool member ``o`` = (layer, expert) while ``layer`` of ``step`` is served."""
    step, layer, layers, guessed, decay = where
    lo, e = o
    p = counts[lo][e] / visits[lo] if decay < 1 and visits[lo] else counts[lo][e]
    before = step if lo <= layer else step - 1  # the layers still to run hold the last step's slots
    on_device = before >= 0 and e in held[lo][before]
    d = cycle_distance(lo, layer, layers)
    return (*score(p, d, layers, lo == layer + 1 and e in guessed, on_device), pool[o])


def variant_reads(trace, requests, held, slots: int, decay: float, score: Score) -> int:
    """The pool of ``slots`` experts under ``score`` (see the module docstring); its disk reads."""
    layers, experts = trace.num_layers, trace.num_experts
    counts = [[0.0] * experts for _ in range(layers)]
    visits = [0.0] * layers  # decayed steps of each layer, for q = p / visits
    pool: dict[tuple[int, int], int] = {}
    reads = tick = 0
    for step in range(trace.steps):
        for layer in range(layers):
            keys = [(layer, e) for e in requests[layer][step]]
            guessed = set(trace.guesses_by_layer[layer + 1][step]) if layer + 1 < layers else set()
            missing = [key for key in keys if key not in pool]
            reads += len(missing)
            for key in missing:
                if len(pool) >= slots:
                    candidates = [o for o in pool if o not in keys]
                    if not candidates:
                        break

                    where = (step, layer, layers, guessed, decay)
                    del pool[
                        min(candidates, key=lambda o, w=where: _rank(o, w, counts, visits, held, pool, score))
                    ]
                pool[key] = 0
            for key in keys:
                if key in pool:
                    tick += 1
                    pool[key] = tick
            row = counts[layer]
            for e in range(experts):
                row[e] *= decay
            visits[layer] = visits[layer] * decay + 1
            for e in requests[layer][step]:
                row[e] += 1
    return reads


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
    args = parser.parse_args()

    from offload.trace.format import load_trace
    from offload.trace.replay_tiers import replay_two_level

    traces = [load_trace(path) for path in record(args.out)]
    slots = args.host_experts * traces[0].num_layers
    print("| K | variant | decay | disk reads | reads / Belady | per trace |")
    print("|---|---|---|---|---|---|")
    for k in (int(text) for text in args.experts_per_layer.split(",")):
        optimum = [replay_two_level(t, args.device_policy, k, "belady", slots).host_misses for t in traces]
        requested = [device_requests(t, args.device_policy, k) for t in traces]
        held = [held_by_device(t, args.device_policy, k) for t in traces]
        rows = [(name, f"{decay:g}", [variant_reads(t, r, h, slots, decay, score)
                                      for t, r, h in zip(traces, requested, held, strict=True)])
                for name, decay, score in VARIANTS]  # fmt: skip
        rows.append(("cyclic (the default)", "0.999",
                     [replay_two_level(t, args.device_policy, k, "cyclic", slots).host_misses for t in traces]))  # fmt: skip
        for name, decay, reads in rows:
            ratios = [r / o for r, o in zip(reads, optimum, strict=True)]
            print(f"| {k} | {name} | {decay} | {sum(reads)} | {sum(reads) / sum(optimum):.2f} "
                  f"| {min(ratios):.2f} to {max(ratios):.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
