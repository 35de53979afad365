"""Replaying a routing trace against two cache levels: K device slots per layer over a host tier of S
slots shared by every layer (``offload.experts.host_tier``'s pool), the rest read from the checkpoint on disk.

- The device level is ``offload.trace.replay``'s cache, unchanged (any of its policies, prefetch
  included). Its loads, prefetches first and then misses, are the host tier's requests; their bytes
  cross the link.
- The host level is one pool of S slots holding experts of any layer, visited in time order: step by
  step, layer by layer. It is asked only for the device's loads: a device hit never reaches it. A request
  it holds is a hit; any other is a miss, read from disk (one expert's bytes) and kept by evicting the
  policy's victim among every layer's experts. Requests of one layer's step never evict each other; a
  step asking for more than the pool can give streams the rest through (read, not kept).
- Its policies (``HOST_POLICIES``) are the engine's and the device level's: ``adaptive`` (the tier's
  default, ``offload.experts.adaptive_policy``: cyclic's rule or an estimate of each expert's next request,
  whichever of two shadow pools has lately missed less), ``lru`` (recency of the
  requests), ``lrfu`` (each layer's decayed counts, aged after each of its steps with every expert the
  step used, device hits included, as ``HostTier.note_step`` does; victims compared across layers, ties
  to the least recently requested) with ``choose_victim``, ``lfu`` (uses over the whole trace, every
  access counted), ``cyclic`` (``choose_cyclic_victim``: the fewest decayed requests
  of the tier's own since the prompt began (``starts_prompt``: a first layer using more than top_k), less a tenth
  for each layer step until the model reaches the expert's layer again, a device-held expert's count
  weighed down; it always counts requests), and ``belady`` (the expert whose next request is furthest away: the fewest
  disk reads possible for that device stream, exact when no step overflows). ``lrfu:D`` is LRFU with
  decay D. With ``counts="requests"`` LRFU and LFU count only the tier's requests, not the device's
  hits: the alternative that docs/BENCHMARKS.md ("Disk tier") measured against the engine's way.
- Not replayed: the engine's own early reads of the next layer's guesses into the tier, and its
  reservations (an expert in use is not evicted; here a step's requests are protected the same way).
- The levels are not inclusive: the tier may evict an expert that a device slot still holds.
- K = 0 means no device slots: every access goes to the host tier, as when every expert is "resident"
  and a host budget makes the engine compute them on the host from the tier.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from offload.errors import ProfileError, TraceError
from offload.experts.adaptive_policy import AdaptivePolicy
from offload.experts.policy import (
    CYCLIC_DECAY,
    LRFU_DECAY,
    age_uses,
    choose_cyclic_victim,
    choose_victim,
    forget_requests,
    starts_prompt,
)
from offload.settings.plan_tiers import GIB, host_slots
from offload.trace.format import Trace
from offload.trace.replay import POLICIES, LayerCounts, layer_bytes, replay_layer

HOST_POLICIES = ("adaptive", "cyclic", "lru", "lrfu", "lfu", "belady")  # and lrfu:D, LRFU with decay D
HOST_COUNTS = ("accesses", "requests")  # what LRFU and LFU count: every access (the engine's), or the tier's
Key = tuple[int, int]  # (layer, expert)


def parse_host_policy(name: str) -> tuple[str, float]:
    """(policy, LRFU decay) for one of HOST_POLICIES or ``lrfu:D`` with 0 < D < 1."""
    if name in HOST_POLICIES:
        return name, LRFU_DECAY
    base, colon, text = name.partition(":")
    try:
        decay = float(text)
    except ValueError:
        decay = math.nan
    if base != "lrfu" or not colon or not 0 < decay < 1:
        raise TraceError(
            f"unknown host-tier policy {name!r}: expected one of {', '.join(HOST_POLICIES)}, "
            "or lrfu:D with a decay 0 < D < 1 (e.g. lrfu:0.98)"
        )
    return base, decay


@dataclass(frozen=True)
class TwoLevelResult:
    """The counters of one device policy at one K over one host policy with S slots, summed over layers."""

    device_policy: str | None  # None when K = 0
    experts_per_layer: int  # K
    host_policy: str
    host_slots: int  # S, experts of any layer
    steps: int
    tokens: int
    accesses: int  # distinct experts needed, per layer and step
    device_hits: int
    device_misses: int
    link_loads: int  # copies over the link: misses and prefetches (0 when K = 0)
    link_bytes: int | None
    host_accesses: int  # requests reaching the host tier: the device's loads, or every access when K = 0
    host_hits: int
    host_misses: int  # disk reads
    host_streamed: int  # reads that took no slot (a step asking for more than the pool could give)
    disk_bytes: int | None  # each miss x its layer's expert bytes; None when the size is unknown

    @property
    def device_hit_rate(self) -> float | None:
        return self.device_hits / self.accesses if self.accesses and self.experts_per_layer else None

    @property
    def host_hit_rate(self) -> float | None:
        """Hits over the requests that reached the host tier; None when none did."""
        return self.host_hits / self.host_accesses if self.host_accesses else None

    @property
    def link_bytes_per_token(self) -> float | None:
        return None if self.link_bytes is None or not self.tokens else self.link_bytes / self.tokens

    @property
    def disk_bytes_per_token(self) -> float | None:
        return None if self.disk_bytes is None or not self.tokens else self.disk_bytes / self.tokens

    def as_dict(self) -> dict[str, Any]:
        """Every counter and ratio, JSON-ready, grouped by level."""
        out = asdict(self)
        device = {
            "policy": out.pop("device_policy"),
            "experts_per_layer": out.pop("experts_per_layer"),
            "hits": out.pop("device_hits"),
            "misses": out.pop("device_misses"),
            "loads": out.pop("link_loads"),
            "bytes_moved": out.pop("link_bytes"),
            "hit_rate": self.device_hit_rate,
            "bytes_per_token": self.link_bytes_per_token,
        }
        host = {
            "policy": out.pop("host_policy"),
            "slots": out.pop("host_slots"),
            "accesses": out.pop("host_accesses"),
            "hits": out.pop("host_hits"),
            "misses": out.pop("host_misses"),
            "streamed": out.pop("host_streamed"),
            "disk_bytes_read": out.pop("disk_bytes"),
            "hit_rate": self.host_hit_rate,
            "disk_bytes_per_token": self.disk_bytes_per_token,
        }
        return {**out, "device": device, "host_tier": host}


def host_slots_for_budget(
    trace: Trace, memory_gib: float, expert_bytes: int | Sequence[int] | None = None
) -> int:
    """The host tier's slots under a budget of ``memory_gib``, as the engine and the plan count them."""
    sizes = layer_bytes(trace, expert_bytes)
    if sizes is None:
        raise TraceError(
            "--host-memory needs an expert's size, and the trace does not record one: "
            "give --expert-bytes, or --host-experts N instead"
        )
    try:
        return host_slots(
            int(memory_gib * GIB), sizes, trace.num_experts, trace.top_k, f"--host-memory {memory_gib:g}"
        )
    except ProfileError as err:
        raise TraceError(str(err)) from None


def replay_two_level(
    trace: Trace,
    device_policy: str,
    experts_per_layer: int,
    host_policy: str,
    host_slots: int,
    expert_bytes: int | Sequence[int] | None = None,
    counts: str = "accesses",
) -> TwoLevelResult:
    """Replay ``trace`` with K = ``experts_per_layer`` device slots (0: none) under ``device_policy`` over a
    host tier of ``host_slots`` experts (of any layer) under ``host_policy``, whose LRFU and LFU count
    ``counts`` (one of HOST_COUNTS)."""
    if device_policy not in POLICIES:
        raise TraceError(f"unknown cache policy {device_policy!r}: expected one of {', '.join(POLICIES)}")
    host_base, decay = parse_host_policy(host_policy)
    if counts not in HOST_COUNTS:
        raise TraceError(f"host-tier counts {counts!r}: expected one of {', '.join(HOST_COUNTS)}")
    experts, layers, k = trace.num_experts, trace.num_layers, experts_per_layer
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= experts:
        raise TraceError(f"experts_per_layer must be a whole number from 0 to {experts}, got {k!r}")
    s = host_slots
    if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= layers * experts:
        raise TraceError(f"host slots must be a whole number from 1 to {layers * experts}, got {s!r}")
    sizes = layer_bytes(trace, expert_bytes)
    device = LayerCounts()
    link_bytes = 0
    requests: list[list[list[int]]] = []  # [layer][step]
    held: list[list[set[int]]] = []  # [layer][step]: the device's slots after the step (none when K = 0)
    base_policy = device_policy.removesuffix("+prefetch")
    for layer in range(layers):
        needed = trace.needed_by_layer[layer]
        if k:
            guesses = trace.guesses_by_layer[layer] if device_policy.endswith("+prefetch") else None
            loads: list[list[int]] = []
            slots_after: list[set[int]] = []
            layer_counts = replay_layer(needed, guesses, base_policy, k, experts, loads, held=slots_after)
            requests.append([sorted(step) for step in loads])
            held.append(slots_after)
            link_bytes += layer_counts.loads * sizes[layer] if sizes is not None else 0
        else:
            requests.append(needed)
            layer_counts = LayerCounts(accesses=sum(map(len, needed)), misses=sum(map(len, needed)))
        _add(device, layer_counts)
    counted = trace.needed_by_layer if counts == "accesses" else requests
    tier = _replay_pool(trace, requests, counted, host_base, decay, s, held if k else None)
    host = LayerCounts()
    for layer_counts in tier:
        _add(host, layer_counts)
    return TwoLevelResult(
        device_policy=device_policy if k else None,
        experts_per_layer=k,
        host_policy=host_policy,
        host_slots=s,
        steps=trace.steps,
        tokens=trace.tokens,
        accesses=device.accesses,
        device_hits=device.hits,
        device_misses=device.misses,
        link_loads=device.loads if k else 0,
        link_bytes=None if sizes is None else link_bytes,
        host_accesses=host.accesses,
        host_hits=host.hits,
        host_misses=host.misses,
        host_streamed=host.streamed,
        disk_bytes=None
        if sizes is None
        else sum(c.misses * size for c, size in zip(tier, sizes, strict=True)),
    )


def replay_two_level_table(
    trace: Trace,
    device_policies: Sequence[str],
    ks: Sequence[int],
    host_policies: Sequence[str],
    host_slots: int,
    expert_bytes: int | Sequence[int] | None = None,
    counts: str = "accesses",
) -> list[TwoLevelResult]:
    """``replay_two_level`` for every K, device policy and host policy, in that nesting. At K = 0 there is
    no device level, so it is replayed once, not once per device policy."""
    rows = []
    for k in ks:
        for device_policy in device_policies if k else device_policies[:1]:
            rows += [
                replay_two_level(trace, device_policy, k, host_policy, host_slots, expert_bytes, counts)
                for host_policy in host_policies
            ]
    return rows


class _FlatUses:
    """Every layer's decayed counts, indexed by layer x E + expert, for ``choose_victim``."""

    def __init__(self, uses: list[list[float]], experts: int) -> None:
        self.uses, self.experts = uses, experts

    def __getitem__(self, flat: int) -> float:
        return self.uses[flat // self.experts][flat % self.experts]


def _replay_pool(
    trace: Trace,
    requests: list[list[list[int]]],
    counted: list[list[list[int]]],
    policy: str,
    decay: float,
    slots: int,
    held: list[list[set[int]]] | None,
) -> list[LayerCounts]:
    """The host pool through every (step, layer) in time order; per layer counters. ``requests`` and
    ``counted`` are [layer][step]: what the tier is asked for, and what LRFU and LFU count as used;
    ``held`` [layer][step] the device's slots after each step, for cyclic (None: no device level)."""
    layers, experts = trace.num_layers, trace.num_experts
    counts = [LayerCounts() for _ in range(layers)]
    last_used: dict[Key, int] = {}  # resident key -> the tick of its latest request
    uses = [[0.0] * experts for _ in range(layers)]  # LRFU's decayed counts, per layer
    flat_uses = _FlatUses(uses, experts)
    frequency: dict[Key, int] = {}  # LFU: every access so far
    requested = [[0.0] * experts for _ in range(layers)]  # cyclic's decayed counts of the tier's requests
    adaptive = AdaptivePolicy(slots, layers, experts)  # the same object the engine's tier asks
    upcoming: dict[Key, deque[int]] = {}  # Belady: the times (step x L + layer) it is requested
    if policy == "belady":
        for step in range(trace.steps):
            for layer in range(layers):
                for expert in requests[layer][step]:
                    upcoming.setdefault((layer, expert), deque()).append(step * layers + layer)

    def next_use(key: Key) -> float:
        pending = upcoming.get(key)
        return pending[0] if pending else math.inf

    def on_device(now: int) -> Callable[[int, int], bool] | None:
        """Whether the device holds an expert while layer ``now`` of ``step`` is served: the layers up to
        ``now`` have had this step's loads, the later ones still hold the last step's."""
        if held is None:
            return None
        return lambda layer, expert: (
            expert in held[layer][step] if layer <= now else step > 0 and expert in held[layer][step - 1]
        )

    def victim(candidates: list[Key], now: int) -> Key:
        if policy == "belady":
            return max(candidates, key=lambda key: (next_use(key), (-key[0], -key[1])))
        if policy == "lfu":
            return min(candidates, key=lambda key: (frequency.get(key, 0), last_used[key]))
        ordered = sorted(candidates, key=last_used.__getitem__)  # least recently requested first
        if policy == "cyclic":
            return choose_cyclic_victim(ordered, requested, now, layers, on_device(now))
        if policy == "adaptive":
            return adaptive.victim(ordered, now, on_device(now))
        flat = choose_victim(policy, [layer * experts + e for layer, e in ordered], flat_uses)  # type: ignore[arg-type]
        return divmod(flat, experts)  # type: ignore[return-value]

    tick = 0
    for step in range(trace.steps):
        for layer in range(layers):
            asked = requests[layer][step]
            layer_counts = counts[layer]
            if policy == "belady":
                for expert in asked:
                    upcoming[(layer, expert)].popleft()  # this request is now
            keys = [(layer, e) for e in asked]
            misses = [key for key in keys if key not in last_used]
            if policy == "belady":
                misses.sort(key=lambda key: (next_use(key), key))  # on overflow, keep the soonest asked again
            layer_counts.accesses += len(keys)
            layer_counts.hits += len(keys) - len(misses)
            layer_counts.misses += len(misses)
            layer_counts.loads += len(misses)
            protected = set(keys)
            for index, key in enumerate(misses):
                if len(last_used) >= slots:
                    candidates = [other for other in last_used if other not in protected]
                    if not candidates:
                        layer_counts.streamed += len(misses) - index
                        break
                    del last_used[victim(candidates, layer)]
                last_used[key] = 0  # a placeholder: the request's tick is set below
            for key in keys:
                if key in last_used:
                    tick += 1
                    last_used[key] = tick
            if policy == "cyclic":
                if starts_prompt(layer, trace.needed_by_layer[layer][step], trace.top_k):
                    forget_requests(requested)
                age_uses(requested[layer], asked, CYCLIC_DECAY)
            elif policy == "adaptive":
                starts = starts_prompt(layer, trace.needed_by_layer[layer][step], trace.top_k)
                adaptive.note_step(layer, asked, starts, on_device(layer))
            used = counted[layer][step]
            age_uses(uses[layer], used, decay)
            for expert in used:
                frequency[(layer, expert)] = frequency.get((layer, expert), 0) + 1
    return counts


def _add(total: LayerCounts, counts: LayerCounts) -> None:
    for name, value in vars(counts).items():
        setattr(total, name, getattr(total, name) + value)
