"""The host tier's default policy, ``adaptive`` (issue 17): of two victim rules, the one that has lately missed less.

The two rules weigh the same requests (what the tier was asked for since the prompt began) two ways:

- ``cyclic`` (``offload.experts.policy.cyclic_worth``): the expert asked for least often goes, ties to the
  layer that comes round last. It suits routing whose favourites hold through a prompt.
- ``next request`` (``next_request_worth``): the expert whose next request is expected furthest away goes,
  Belady's rule on an estimate: d layer steps until its layer comes round, plus L more per visit it is
  expected to sit out, where the chance that the next visit asks for it is its recent share (its requests
  decayed by ``RECENT_DECAY`` per visit of its layer) and the visits it then waits are about one over its
  rate since the prompt began. It suits routing that drifts within a prompt.

Neither wins everywhere (docs/BENCHMARKS.md, "A default that adapts"): so two shadow pools of the tier's
size replay the tier's requests, one under each rule, counting their misses with a decay of ``WINDOW`` per
request, and the tier evicts by the rule whose shadow missed less (set dueling; ties to cyclic). The shadows
hold keys only, no bytes. Both the engine's ``HostTier`` and the replay (``offload.trace.replay_tiers``) run
this one class, so that a replayed trace gives the engine's reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from offload.experts.policy import (
    CYCLIC_DECAY,
    CYCLIC_DEVICE_WEIGHT,
    CYCLIC_STEP_WEIGHT,
    cycle_distance,
    cyclic_worth,
)

Key = tuple[int, int]  # (layer, expert)
OnDevice = Callable[[int, int], bool] | None
RULES = ("cyclic", "next request")
# The first values tried on the float and 4-bit demo traces of disk_tier_replay.py; their neighbours, as disk
# reads on five held-out prompts (docs/BENCHMARKS.md, "A default that adapts"), changed none of them.
RECENT_DECAY = 0.9  # the recent share's memory, per visit of the layer (0.8 and 0.95: within 1%, mostly more)
MIN_RATE = 0.02  # an expert asked for once in 50 visits or less waits as long (0.05: the same to 0.1%)
WINDOW = 0.99  # a shadow's miss counts half after about 70 requests (0.98 and 0.999 within 0.6%)


def next_request_worth(
    key: Key,
    requests: Sequence[Sequence[float]],
    visits: Sequence[float],
    recent: Sequence[Sequence[float]],
    now: int,
    num_layers: int,
    on_device: OnDevice = None,
) -> float:
    """Minus the expected layer steps until (layer, expert) is next requested, while the model serves layer
    ``now``: d + (1 - q) x L / max(r, MIN_RATE), with d = ``cycle_distance``, q its ``recent`` share and r its
    ``requests`` per ``visits`` of its layer, both times ``CYCLIC_DEVICE_WEIGHT`` when the device holds it."""
    layer, expert = key
    share = recent[layer][expert]
    rate = requests[layer][expert] / max(visits[layer], 1.0)
    if on_device is not None and on_device(layer, expert):
        share *= CYCLIC_DEVICE_WEIGHT
        rate *= CYCLIC_DEVICE_WEIGHT
    distance = cycle_distance(layer, now, num_layers)
    return -(distance + (1.0 - share) * num_layers / max(rate, MIN_RATE))


class AdaptivePolicy:
    """The counts both rules read, the two shadow pools of ``slots`` experts, and the victim of the leader."""

    def __init__(self, slots: int, num_layers: int, num_experts: int) -> None:
        self.slots, self.num_layers, self.num_experts = slots, num_layers, num_experts
        self.requests = [[0.0] * num_experts for _ in range(num_layers)]  # decayed by CYCLIC_DECAY per visit
        self.visits = [0.0] * num_layers  # the layer's steps, decayed the same way
        self.recent = [[0.0] * num_experts for _ in range(num_layers)]  # decayed by RECENT_DECAY per visit
        self.missed = [0.0] * len(RULES)  # each shadow's recent misses
        self._shadows: list[dict[Key, int]] = [{} for _ in RULES]  # key -> tick of its latest request
        self._tick = 0

    @property
    def leader(self) -> int:
        """The index in RULES of the rule the tier follows now: the one whose shadow missed less."""
        return min(range(len(RULES)), key=self.missed.__getitem__)

    def worth(self, key: Key, now: int, on_device: OnDevice = None, rule: int | None = None) -> float:
        """What keeping ``key`` is worth under ``rule`` (default: the leader) while the model serves ``now``."""
        rule = self.leader if rule is None else rule
        if rule == 0:
            return cyclic_worth(key, self.requests, now, self.num_layers, on_device)
        return next_request_worth(
            key, self.requests, self.visits, self.recent, now, self.num_layers, on_device
        )

    def guess_worth(self, key: Key, now: int, on_device: OnDevice = None) -> float:
        """cyclic's worth, in requests: what ``guess_may_evict`` compares, whichever rule leads."""
        return self.worth(key, now, on_device, rule=0)

    def victim(
        self, candidates: Sequence[Key], now: int, on_device: OnDevice = None, rule: int | None = None
    ) -> Key:
        """The evictable expert of least worth under ``rule`` (default: the leader); ``candidates`` are least
        recently requested first, and ties go to the first."""
        worths = self._worths(candidates, now, on_device, self.leader if rule is None else rule)
        return candidates[worths.index(min(worths))]

    def _worths(self, keys: Sequence[Key], now: int, on_device: OnDevice, rule: int) -> list[float]:
        """``worth`` of each key, computed in one loop: the victim is chosen on the decode path, for every miss
        of the tier and of both shadows (the same operations as cyclic_worth and next_request_worth, so the
        same values)."""
        layers, requests, out = self.num_layers, self.requests, []
        visits, recent = self.visits, self.recent
        for layer, expert in keys:
            held = on_device is not None and on_device(layer, expert)
            distance = (layer - now) % layers or layers  # cycle_distance
            if rule == 0:
                count = requests[layer][expert] * CYCLIC_DEVICE_WEIGHT if held else requests[layer][expert]
                out.append(count - CYCLIC_STEP_WEIGHT * distance)
                continue
            share = recent[layer][expert]
            rate = requests[layer][expert] / max(visits[layer], 1.0)
            if held:
                share *= CYCLIC_DEVICE_WEIGHT
                rate *= CYCLIC_DEVICE_WEIGHT
            out.append(-(distance + (1.0 - share) * layers / max(rate, MIN_RATE)))
        return out

    def note_step(
        self, layer: int, asked: Sequence[int], starts_prompt: bool, on_device: OnDevice = None
    ) -> None:
        """One step of ``layer`` that asked the tier for ``asked``: each shadow serves the requests (they
        never evict each other), then the counts forget (a new prompt) and age as cyclic's do."""
        keys = [(layer, expert) for expert in asked]
        for rule, shadow in enumerate(self._shadows):
            misses = [key for key in keys if key not in shadow]
            self.missed[rule] = self.missed[rule] * WINDOW ** len(keys) + len(misses)
            for key in misses:
                if len(shadow) >= self.slots:
                    candidates = [k for k in shadow if k not in keys]
                    if not candidates:
                        break  # the step asks for more than the pool holds: the rest stream through
                    worths = self._worths(candidates, layer, on_device, rule)
                    # The least worth; among equals the least recently requested (the smallest tick).
                    best = min(range(len(candidates)), key=lambda i: (worths[i], shadow[candidates[i]]))
                    del shadow[candidates[best]]
                shadow[key] = 0
            for key in keys:
                if key in shadow:
                    self._tick += 1
                    shadow[key] = self._tick
        if starts_prompt:
            for rows in (self.requests, self.recent):
                for row in rows:
                    row[:] = [0.0] * self.num_experts
            self.visits[:] = [0.0] * self.num_layers
        requests, recent = self.requests[layer], self.recent[layer]
        for expert in range(self.num_experts):
            requests[expert] *= CYCLIC_DECAY
            recent[expert] *= RECENT_DECAY
        self.visits[layer] = self.visits[layer] * CYCLIC_DECAY + 1.0
        for expert in asked:
            requests[expert] += 1.0
            recent[expert] += 1.0 - RECENT_DECAY
