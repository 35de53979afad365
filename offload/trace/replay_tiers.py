"""Replaying a routing trace against two cache levels: K device slots per layer over a host tier of H_l
experts per layer, the rest read from the checkpoint on disk.

- The device level is ``offload.trace.replay``'s cache, unchanged (any of its policies, prefetch
  included). Its loads, prefetches first and then misses, are the host tier's requests, step by step;
  their bytes cross the link.
- The host level is the same cache code with H_l slots and a policy of its own (``HOST_POLICIES``),
  fed only those requests: a device hit never reaches it. A request it holds is a hit; any other is a
  miss, read from disk (one expert's bytes) and kept by evicting the policy's victim. Requests of one
  step never evict each other; a step asking for more than H_l streams the rest through (read, not kept).
- LRFU's counts decay once per step of the layer, whether or not that step reached the tier; ``lrfu:D``
  replays LRFU with decay D in place of ``offload.experts.policy.LRFU_DECAY`` (the same code).
- ``belady`` on the host level evicts the expert whose next request is furthest away: the fewest disk
  reads possible under that device policy (exact when no step asks for more than H_l experts).
- The levels are not inclusive: the tier may evict an expert that a device slot still holds.
- K = 0 means no device slots: every access goes to the host tier, as on a CPU that computes the experts
  straight from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from offload.errors import ProfileError, TraceError
from offload.experts.policy import LRFU_DECAY
from offload.settings.plan_tiers import GIB, host_experts_per_layer
from offload.trace.format import Trace
from offload.trace.replay import POLICIES, LayerCounts, layer_bytes, replay_layer

HOST_POLICIES = ("lru", "lrfu", "lfu", "belady")  # and lrfu:D, LRFU with decay D


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
    """The counters of one device policy at one K over one host policy at one H, summed over layers."""

    device_policy: str | None  # None when K = 0
    experts_per_layer: int  # K
    host_policy: str
    host_experts_per_layer: tuple[int, ...]  # H_l
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
    host_streamed: int  # reads that took no host slot (a step asking for more than H_l)
    disk_bytes: int | None  # host misses x the expert's bytes; None when the size is unknown

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
            "experts_per_layer": list(out.pop("host_experts_per_layer")),
            "accesses": out.pop("host_accesses"),
            "hits": out.pop("host_hits"),
            "misses": out.pop("host_misses"),
            "streamed": out.pop("host_streamed"),
            "disk_bytes_read": out.pop("disk_bytes"),
            "hit_rate": self.host_hit_rate,
            "disk_bytes_per_token": self.disk_bytes_per_token,
        }
        return {**out, "device": device, "host_tier": host}


def host_experts_for_budget(
    trace: Trace, memory_gib: float, expert_bytes: int | Sequence[int] | None = None
) -> tuple[int, ...]:
    """H_l for a host budget of ``memory_gib``, handed out as the plan does (``plan_tiers``)."""
    sizes = layer_bytes(trace, expert_bytes)
    if sizes is None:
        raise TraceError(
            "--host-memory needs an expert's size, and the trace does not record one: "
            "give --expert-bytes, or --host-experts N instead"
        )
    try:
        return host_experts_per_layer(
            int(memory_gib * GIB), sizes, trace.num_experts, f"--host-memory {memory_gib}"
        )
    except ProfileError as err:
        raise TraceError(str(err)) from None


def replay_two_level(
    trace: Trace,
    device_policy: str,
    experts_per_layer: int,
    host_policy: str,
    host_experts: int | Sequence[int],
    expert_bytes: int | Sequence[int] | None = None,
) -> TwoLevelResult:
    """Replay ``trace`` with K = ``experts_per_layer`` device slots (0: none) under ``device_policy`` over a
    host tier of ``host_experts`` per layer (one count, or one per layer) under ``host_policy``."""
    if device_policy not in POLICIES:
        raise TraceError(f"unknown cache policy {device_policy!r}: expected one of {', '.join(POLICIES)}")
    host_base, decay = parse_host_policy(host_policy)
    experts, k = trace.num_experts, experts_per_layer
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= experts:
        raise TraceError(f"experts_per_layer must be a whole number from 0 to {experts}, got {k!r}")
    held = [host_experts] * trace.num_layers if isinstance(host_experts, int) else list(host_experts)
    if len(held) != trace.num_layers or any(
        isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= experts for h in held
    ):
        raise TraceError(
            f"host experts per layer must be whole numbers from 1 to {experts}, one or one per layer "
            f"({trace.num_layers}), got {host_experts!r}"
        )
    sizes = layer_bytes(trace, expert_bytes)
    device, host = LayerCounts(), LayerCounts()
    link_bytes = disk_bytes = 0
    base_policy = device_policy.removesuffix("+prefetch")
    for layer in range(trace.num_layers):
        needed = trace.needed_by_layer[layer]
        if k:
            guesses = trace.guesses_by_layer[layer] if device_policy.endswith("+prefetch") else None
            requests: list[list[int]] = []
            counts = replay_layer(needed, guesses, base_policy, k, experts, requests)
            _add(device, counts)
        else:
            requests = needed
            counts = LayerCounts(accesses=sum(map(len, needed)), misses=sum(map(len, needed)))
            _add(device, counts)
        # The cache code wants each step's experts ascending, as the device level's needs are.
        steps = [sorted(step) for step in requests]
        tier = replay_layer(steps, None, host_base, held[layer], experts, decay=decay)
        _add(host, tier)
        if sizes is not None:
            link_bytes += counts.loads * sizes[layer] if k else 0
            disk_bytes += tier.misses * sizes[layer]
    return TwoLevelResult(
        device_policy=device_policy if k else None,
        experts_per_layer=k,
        host_policy=host_policy,
        host_experts_per_layer=tuple(held),
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
        disk_bytes=None if sizes is None else disk_bytes,
    )


def replay_two_level_table(
    trace: Trace,
    device_policies: Sequence[str],
    ks: Sequence[int],
    host_policies: Sequence[str],
    host_experts: int | Sequence[int],
    expert_bytes: int | Sequence[int] | None = None,
) -> list[TwoLevelResult]:
    """``replay_two_level`` for every K, device policy and host policy, in that nesting. At K = 0 there is
    no device level, so it is replayed once, not once per device policy."""
    rows = []
    for k in ks:
        for device_policy in device_policies if k else device_policies[:1]:
            rows += [
                replay_two_level(trace, device_policy, k, host_policy, host_experts, expert_bytes)
                for host_policy in host_policies
            ]
    return rows


def _add(total: LayerCounts, counts: LayerCounts) -> None:
    for name, value in vars(counts).items():
        setattr(total, name, getattr(total, name) + value)
