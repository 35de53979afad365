"""Which expert a full layer of the device cache evicts: the policies shared by the engine's
``ExpertCache`` and ``offload.trace.replay``, so that a replayed trace gives the engine's very counters.

- ``lru``: the least recently used expert (the paper's policy, arXiv 2312.17238).
- ``lrfu``: the expert with the smallest decayed use count. After each step of a layer, every
  expert's count is multiplied by ``LRFU_DECAY`` and each expert the step used gets +1; ties go to
  the least recently used. It keeps experts that a layer returns to often, where LRU drops them
  after one quiet spell (docs/BENCHMARKS.md, "Cache policy").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

CACHE_POLICIES = ("lrfu", "lru")
DEFAULT_CACHE_POLICY = "lrfu"
LRFU_DECAY = 0.9  # a use counts half after about 7 steps of its layer


def age_uses(uses: list[float], used: Iterable[int], decay: float = LRFU_DECAY) -> None:
    """One step of a layer: decay every expert's count in place, then count one use of each of ``used``."""
    for expert in range(len(uses)):
        uses[expert] *= decay
    for expert in used:
        uses[expert] += 1.0


def choose_victim(policy: str, candidates: Sequence[int], uses: Sequence[float]) -> int:
    """The expert that a full layer evicts under ``policy`` (one of CACHE_POLICIES).

    ``candidates`` are the experts that may go, least recently used first; ``uses`` are the layer's
    decayed use counts (``age_uses``), which only lrfu reads.
    """
    if policy == "lru":
        return candidates[0]
    assert policy == "lrfu", f"unknown cache policy {policy!r}"
    # min() keeps the first of equal counts: ties go to the least recently used.
    return min(candidates, key=uses.__getitem__)
