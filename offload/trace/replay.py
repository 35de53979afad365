"""Replaying a routing trace against expert-cache policies, to see how far LRU is from the optimum.

Each layer has its own cache of K slots, empty at the start. At each step a layer accesses the
distinct experts its tokens were routed to; an expert in a slot is a hit, any other a miss, which
loads it (one expert's bytes over the link).

- Experts needed in the same step never evict each other. When a step needs more than K experts
  (only a prefill can), the misses fill the slots that hold no needed expert, and the rest stream
  through: each still counts as a miss and a load, but it takes no slot. LRU, LFU and lru+prefetch
  keep the lowest ids; Belady keeps the ones used again soonest.
- ``lru``: evict the least recently used expert. Within a step, experts are used in ascending id
  order, as ``OffloadedExperts`` marks them.
- ``lrfu``: evict the expert with the smallest decayed use count, ties to the least recently used
  (the engine's default). Both choose their victim with the engine's own
  ``offload.experts.policy.choose_victim``.
- ``lfu``: evict the expert used at the fewest steps so far (counted over the whole trace, in a slot
  or not); ties go to the least recently used.
- ``belady``: evict the expert whose next use is furthest away (never again counts as infinitely far;
  ties go to the lowest id). With full knowledge of the future this is the fewest misses possible.
- ``lru+prefetch`` and ``lrfu+prefetch``: LRU or LRFU plus the recorded guesses, loaded before the
  layer's step exactly as ``OffloadedExperts`` does it: at most K of them, best first, each missing
  guess evicting (by the policy) an expert that is neither a guess nor used by the layer's previous
  step; the batch stops at the first guess that finds no such slot. A prefetched expert that is evicted unused is a wasted
  prefetch; its bytes still count.

With no step over K experts, ``lru``, ``lrfu`` and their ``+prefetch`` forms give the very counters
that ``OffloadedExperts`` reports for the same run under that cache policy.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from offload.errors import TraceError
from offload.experts.policy import LRFU_DECAY, age_uses, choose_victim
from offload.trace.format import Trace

POLICIES = ("lru", "lrfu", "lfu", "belady", "lru+prefetch", "lrfu+prefetch")
NEVER = math.inf  # the next use of an expert that is not used again


@dataclass(frozen=True)
class ReplayResult:
    """The counters of one policy at one K, summed over layers."""

    policy: str
    experts_per_layer: int  # K
    steps: int
    tokens: int
    accesses: int  # distinct experts needed, per layer and step
    hits: int
    misses: int
    loads: int  # copies over the link: every miss plus every prefetch
    streamed: int  # the misses that took no slot (a step needing more than K experts)
    prefetch_loads: int
    prefetch_hits: int  # first uses of prefetched experts
    wasted_prefetches: int  # prefetched experts evicted before any use
    bytes_moved: int | None  # loads x the expert's bytes; None when the size is unknown

    @property
    def hit_rate(self) -> float | None:
        """hits / accesses, or None for an empty trace."""
        return self.hits / self.accesses if self.accesses else None

    @property
    def bytes_per_token(self) -> float | None:
        """bytes_moved over every token of the trace (prefill and decode)."""
        if self.bytes_moved is None or not self.tokens:
            return None
        return self.bytes_moved / self.tokens

    @property
    def loads_per_token(self) -> float | None:
        return self.loads / self.tokens if self.tokens else None

    def as_dict(self) -> dict[str, Any]:
        """Every counter and ratio, JSON-ready."""
        return {
            **asdict(self),
            "hit_rate": self.hit_rate,
            "bytes_per_token": self.bytes_per_token,
            "loads_per_token": self.loads_per_token,
        }


@dataclass
class LayerCounts:
    """One layer's counters, or a sum of them."""

    accesses: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0
    streamed: int = 0
    prefetch_loads: int = 0
    prefetch_hits: int = 0
    wasted_prefetches: int = 0


def replay(
    trace: Trace,
    policy: str,
    experts_per_layer: int,
    expert_bytes: int | Sequence[int] | None = None,
) -> ReplayResult:
    """Replay ``trace`` with K = ``experts_per_layer`` slots per layer under ``policy`` (see POLICIES).

    ``expert_bytes`` (one size, or one per layer) overrides the sizes the trace recorded.
    """
    if policy not in POLICIES:
        raise TraceError(f"unknown cache policy {policy!r}: expected one of {', '.join(POLICIES)}")
    k = experts_per_layer
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= trace.num_experts:
        raise TraceError(f"experts_per_layer must be a whole number from 1 to {trace.num_experts}, got {k!r}")
    sizes = layer_bytes(trace, expert_bytes)
    total = LayerCounts()
    bytes_moved = 0
    for layer in range(trace.num_layers):
        guesses = trace.guesses_by_layer[layer] if policy.endswith("+prefetch") else None
        base_policy = policy.removesuffix("+prefetch")
        counts = replay_layer(trace.needed_by_layer[layer], guesses, base_policy, k, trace.num_experts)
        for name, value in vars(counts).items():
            setattr(total, name, getattr(total, name) + value)
        if sizes is not None:
            bytes_moved += counts.loads * sizes[layer]
    return ReplayResult(
        policy=policy,
        experts_per_layer=k,
        steps=trace.steps,
        tokens=trace.tokens,
        bytes_moved=None if sizes is None else bytes_moved,
        **vars(total),
    )


def replay_table(
    trace: Trace,
    policies: Sequence[str] = POLICIES,
    ks: Sequence[int] | None = None,
    expert_bytes: int | Sequence[int] | None = None,
) -> list[ReplayResult]:
    """``replay`` for every K in ``ks`` (default 1..E) and every policy: K-major, policies in order."""
    ks = range(1, trace.num_experts + 1) if ks is None else ks
    return [replay(trace, policy, k, expert_bytes) for k in ks for policy in policies]


def layer_bytes(trace: Trace, expert_bytes: int | Sequence[int] | None) -> list[int] | None:
    if expert_bytes is None:
        return None if trace.expert_bytes is None else list(trace.expert_bytes)
    sizes = [expert_bytes] * trace.num_layers if isinstance(expert_bytes, int) else list(expert_bytes)
    if len(sizes) != trace.num_layers or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes
    ):
        raise TraceError(
            f"expert bytes must be one whole number > 0, or one per layer ({trace.num_layers}), got {expert_bytes!r}"
        )
    return sizes


def replay_layer(
    needed_steps: list[list[int]],
    guess_steps: list[list[int]] | None,
    policy: str,
    k: int,
    num_experts: int,
    loaded: list[list[int]] | None = None,
    decay: float = LRFU_DECAY,
    held: list[set[int]] | None = None,
) -> LayerCounts:
    """One layer's cache through every step; ``needed_steps`` are ascending and distinct.

    ``loaded``, when given, receives each step's loads (prefetches first, then misses): what the level
    below (``offload.trace.replay_tiers``) is asked for. ``decay`` is lrfu's, per step. ``held``, when
    given, receives the experts in the slots after each step.
    """
    counts = LayerCounts()
    last_used: dict[int, int] = {}  # resident expert -> its recency tick (larger is more recent)
    prefetched: set[int] = set()  # resident experts a prefetch brought in, not used yet
    frequency: dict[int, int] = {}  # expert -> steps that used it so far
    decayed = [0.0] * num_experts  # expert -> its decayed use count (lrfu)
    uses: dict[int, deque[int]] = {}  # expert -> the steps that use it and are still to come
    if policy == "belady":
        for step, needed in enumerate(needed_steps):
            for expert in needed:
                uses.setdefault(expert, deque()).append(step)
    tick = 0

    def next_use(expert: int) -> float:
        pending = uses.get(expert)
        return pending[0] if pending else NEVER

    def evict(candidates: list[int]) -> None:
        if policy == "belady":
            victim = max(candidates, key=lambda e: (next_use(e), -e))
        elif policy == "lfu":
            victim = min(candidates, key=lambda e: (frequency.get(e, 0), last_used[e]))
        else:  # the engine's own rule, given the candidates least recently used first
            victim = choose_victim(policy, sorted(candidates, key=last_used.__getitem__), decayed)
        del last_used[victim]
        if victim in prefetched:
            prefetched.discard(victim)
            counts.wasted_prefetches += 1

    for step, needed in enumerate(needed_steps):
        step_loads: list[int] = []
        if loaded is not None:
            loaded.append(step_loads)
        if guess_steps is not None:
            batch = list(dict.fromkeys(guess_steps[step]))[:k]
            keep = set(batch) | set(needed_steps[step - 1] if step else ())
            for expert in batch:
                if expert in last_used:
                    continue  # already in a slot: a prefetch neither reloads nor refreshes it
                if len(last_used) >= k:
                    candidates = [e for e in last_used if e not in keep]
                    if not candidates:
                        break
                    evict(candidates)
                tick += 1
                last_used[expert] = tick
                prefetched.add(expert)
                step_loads.append(expert)
                counts.loads += 1
                counts.prefetch_loads += 1
        if policy == "belady":
            for expert in needed:
                uses[expert].popleft()  # this use is now; next_use looks past it
        misses = [e for e in needed if e not in last_used]
        if policy == "belady":
            misses.sort(key=lambda e: (next_use(e), e))  # on overflow, keep the soonest reused
        counts.accesses += len(needed)
        counts.hits += len(needed) - len(misses)
        counts.misses += len(misses)
        counts.loads += len(misses)
        step_loads += misses
        needed_set = set(needed)
        for expert in misses:
            if len(last_used) >= k:
                candidates = [e for e in last_used if e not in needed_set]
                if not candidates:
                    counts.streamed += len(misses) - misses.index(expert)
                    break
                evict(candidates)
            last_used[expert] = 0  # a placeholder: the step's use below sets the tick
        age_uses(decayed, needed, decay)
        for expert in needed:
            frequency[expert] = frequency.get(expert, 0) + 1
            if expert in last_used:
                tick += 1
                last_used[expert] = tick
                if expert in prefetched:
                    prefetched.discard(expert)
                    counts.prefetch_hits += 1
        if held is not None:
            held.append(set(last_used))
    return counts
