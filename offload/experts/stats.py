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
  over the steps in which a guess was made for the layer;
- precision by rank: for each rank r (0: the gate's best guess), the share of the layer's rank-r guesses that
  were used. The prefetcher copies a rank's guesses only while that share pays (``cost_model.guess_pays``): a
  layer's second guess is often much less precise than its first. Kept per layer only: ``total()`` and the
  counter fields leave it out.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
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

    def __post_init__(self) -> None:
        # Not dataclass fields, so sums and differences of the counters leave them out (see the docstring).
        self.guessed_by_rank: list[int] = []  # guesses made at each rank, over all steps
        self.used_by_rank: list[int] = []  # of those, the ones the layer then used

    @property
    def hit_rate(self) -> float | None:
        """Device-cache hits over hits and misses; None before any, or where no device cache serves the experts
        (every access computed on the host counts as neither)."""
        return _ratio(self.hits, self.hits + self.misses)

    @property
    def prefetch_recall(self) -> float | None:
        """The share of used experts that had been guessed, or None when nothing was guessed."""
        return _ratio(self.guessed_and_used, self.used_when_guessed)

    @property
    def prefetch_precision(self) -> float | None:
        """The share of guessed experts that were used, or None when nothing was guessed."""
        return _ratio(self.guessed_and_used, self.guessed)

    def prefetch_precision_at(self, rank: int) -> float | None:
        """The share of this layer's rank-``rank`` guesses that were used, or None when none was made."""
        if rank >= len(self.guessed_by_rank):
            return None
        return _ratio(self.used_by_rank[rank], self.guessed_by_rank[rank])

    def record_guesses(self, guessed: Sequence[int], used: Collection[int]) -> None:
        """Add one step's guesses for this layer, best first, against the experts it then used."""
        ranked, used = list(dict.fromkeys(guessed)), set(used)
        self.guessed += len(ranked)
        self.used_when_guessed += len(used)
        self.guessed_and_used += len(set(ranked) & used)
        missing = len(ranked) - len(self.guessed_by_rank)
        if missing > 0:
            self.guessed_by_rank += [0] * missing
            self.used_by_rank += [0] * missing
        for rank, expert in enumerate(ranked):
            self.guessed_by_rank[rank] += 1
            self.used_by_rank[rank] += expert in used

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
        summary["layers"] = [
            {**_figures(layer), "prefetch_precision_by_rank": _by_rank(layer)} for layer in self.layers
        ]
        return summary


def _by_rank(stats: LayerStats) -> list[float | None]:
    return [stats.prefetch_precision_at(rank) for rank in range(len(stats.guessed_by_rank))]


def _figures(stats: LayerStats) -> dict[str, Any]:
    return {name: getattr(stats, name) for name in COUNTERS + RATIOS}
