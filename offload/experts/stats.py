"""Counters of the expert cache and the prefetcher, per layer and in total.

Definitions (per layer):
- an access is one needed expert in one ``experts_for`` call; it is a hit when the expert was
  already in a slot (loaded, or still arriving from a prefetch) and a miss when it had to be loaded;
- a prefetch hit is the first use of an expert that a prefetch brought in;
- a wasted prefetch is a prefetched expert evicted before any use;
- loads count every copy into a slot (demand and prefetch), so bytes_moved = loads x expert bytes;
- wait_seconds are host seconds blocked on the link (on CUDA the wait is on the device: about 0);
- host_computes are experts computed on the host CPU instead of the device (``offload.experts.cost_model``:
  misses, arriving copies, and hits while the device is behind), and host_wait_seconds the seconds the
  caller then blocked on the host's output;
- prefetch recall = |guessed ∩ used| / |used| and precision = |guessed ∩ used| / |guessed|, summed
  over the steps in which a guess was made for the layer.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import Any


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


@dataclass
class LayerStats:
    """The counters of one layer (or, summed, of the whole model)."""

    accesses: int = 0
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    wasted_prefetches: int = 0
    loads: int = 0  # demand and prefetch copies into a slot
    prefetch_loads: int = 0  # the part of loads that prefetches issued
    bytes_moved: int = 0
    wait_seconds: float = 0.0
    host_computes: int = 0  # experts computed on the host, not on the device
    host_wait_seconds: float = 0.0
    guessed: int = 0  # experts guessed for this layer, over all steps with a guess
    used_when_guessed: int = 0  # experts used in those steps
    guessed_and_used: int = 0  # experts both guessed and used in those steps

    @property
    def hit_rate(self) -> float | None:
        """hits / accesses, or None before any access."""
        return _ratio(self.hits, self.accesses)

    @property
    def prefetch_recall(self) -> float | None:
        """The share of used experts that had been guessed, or None when nothing was guessed."""
        return _ratio(self.guessed_and_used, self.used_when_guessed)

    @property
    def prefetch_precision(self) -> float | None:
        """The share of guessed experts that were used, or None when nothing was guessed."""
        return _ratio(self.guessed_and_used, self.guessed)

    def record_guesses(self, guessed: Collection[int], used: Collection[int]) -> None:
        """Add one step's guesses for this layer against the experts it then used."""
        guessed, used = set(guessed), set(used)
        self.guessed += len(guessed)
        self.used_when_guessed += len(used)
        self.guessed_and_used += len(guessed & used)

    def __add__(self, other: LayerStats) -> LayerStats:
        return LayerStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


COUNTERS = tuple(f.name for f in fields(LayerStats))
RATIOS = ("hit_rate", "prefetch_recall", "prefetch_precision")


class CacheStats:
    """One LayerStats per layer, with totals and a JSON-ready summary."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerStats() for _ in range(num_layers)]

    def total(self) -> LayerStats:
        """Every layer's counters summed."""
        return sum(self.layers, LayerStats())

    def reset(self) -> None:
        """Zero every counter (between a benchmark's warm-up and its measured run, say)."""
        self.layers = [LayerStats() for _ in self.layers]

    def as_dict(self) -> dict[str, Any]:
        """Totals and ratios at the top level, and ``layers``: the same figures for each layer.

        A ratio with nothing to divide by (no access yet, no guess made) is None.
        """
        summary = _figures(self.total())
        summary["layers"] = [_figures(layer) for layer in self.layers]
        return summary


def _figures(stats: LayerStats) -> dict[str, Any]:
    return {name: getattr(stats, name) for name in COUNTERS + RATIOS}
