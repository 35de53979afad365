"""Counters of the host tier (``offload.experts.host_tier``), per layer and in total.

Definitions (per layer):
- an access is one demand for an expert's host bytes: a device-cache miss that must be copied, or an expert
  computed on the host; it is a hit when the expert was in the tier (read, or still arriving from a read
  already submitted) and a miss when a read had to start;
- reads count every read from disk (demand and prefetch), ``disk_bytes_read`` their stored bytes;
- ``disk_wait_seconds`` are seconds the caller blocked waiting for a read to land.
Prefetch reads are not accesses: the hit rate measures demand only, as the device cache's does.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class TierLayerStats:
    """The host tier's counters for one layer (or, summed, for the whole model)."""

    accesses: int = 0
    hits: int = 0
    misses: int = 0
    reads: int = 0  # demand and prefetch reads from disk
    prefetch_reads: int = 0  # the part of reads that guesses of the next layer started
    disk_bytes_read: int = 0
    disk_wait_seconds: float = 0.0

    @property
    def hit_rate(self) -> float | None:
        """hits / accesses, or None before any access."""
        return self.hits / self.accesses if self.accesses else None

    def __add__(self, other: TierLayerStats) -> TierLayerStats:
        return TierLayerStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )


TIER_COUNTERS = tuple(f.name for f in fields(TierLayerStats))


class TierStats:
    """One TierLayerStats per layer, with totals and a JSON-ready summary."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [TierLayerStats() for _ in range(num_layers)]

    def total(self) -> TierLayerStats:
        return sum(self.layers, TierLayerStats())

    def reset(self) -> None:
        self.layers = [TierLayerStats() for _ in self.layers]

    def as_dict(self) -> dict[str, Any]:
        """Totals and the hit rate at the top level, and ``layers``: the same for each layer."""
        summary = _figures(self.total())
        summary["layers"] = [_figures(layer) for layer in self.layers]
        return summary


def _figures(stats: TierLayerStats) -> dict[str, Any]:
    return {**{name: getattr(stats, name) for name in TIER_COUNTERS}, "hit_rate": stats.hit_rate}
