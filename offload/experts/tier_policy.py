"""The host tier's eviction policy as state: what the policy counts, and its victim and worth, for ``HostTier``.

The rules themselves are in ``offload.experts.policy`` (lru, lrfu, cyclic, the guess bar) and
``offload.experts.adaptive_policy`` (adaptive), shared with the replay (``offload.trace.replay_tiers``), so
that a replayed trace gives the engine's reads. This class keeps what the engine's tier feeds them:
- lrfu's decayed use counts, aged once per step of their own layer, so counts of different layers compare;
- cyclic's decayed request counts: the experts handed to a consumer (a link copy, a host job) for a layer
  since its last step, forgotten when a step starts a prompt;
- adaptive's ``AdaptivePolicy`` (its shadow pools and counts), fed the same requests.
``on_device`` (whether the device's slots hold an expert; None: no device cache) is passed to each call,
since the device cache sets it on the tier after both are built.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from offload.experts.adaptive_policy import AdaptivePolicy
from offload.experts.policy import (
    CYCLIC_DECAY,
    HOST_TIER_POLICIES,
    age_uses,
    choose_cyclic_victim,
    choose_victim,
    cyclic_worth,
    forget_requests,
    guess_may_evict,
    starts_prompt,
)

Key = tuple[int, int]  # (layer, expert)
OnDevice = Callable[[int, int], bool] | None


class TierPolicy:
    """Policy ``name`` (one of ``HOST_TIER_POLICIES``) over a tier of ``slots`` experts of ``num_layers`` x
    ``num_experts``; ``top_k`` is one token's experts, so a first layer using more starts a prompt."""

    def __init__(self, name: str, slots: int, num_layers: int, num_experts: int, top_k: int) -> None:
        assert name in HOST_TIER_POLICIES, f"unknown host-tier policy {name!r}"  # HostTier says it to users
        self.name = name
        self.top_k = top_k
        self._slots, self._layers, self._experts = slots, num_layers, num_experts
        self.reset()

    def reset(self) -> None:
        """Forget everything counted: the policy as loaded (``HostTier.empty``)."""
        layers, experts = self._layers, self._experts
        self._uses = [[0.0] * experts for _ in range(layers)]  # lrfu's decayed counts
        self._requests = [[0.0] * experts for _ in range(layers)]  # cyclic's, decayed
        self._asked: list[set[int]] = [set() for _ in range(layers)]  # handed out since note_step
        self._adaptive = AdaptivePolicy(self._slots, layers, experts)  # adaptive's shadows and counts

    def asked(self, layer: int, expert: int) -> None:
        """A request served: ``expert`` of ``layer`` handed to a consumer (what cyclic and adaptive count)."""
        self._asked[layer].add(expert)

    def note_step(self, layer: int, used: Collection[int], on_device: OnDevice) -> None:
        """Count one step of ``layer`` that used ``used``: lrfu's decayed uses; cyclic's and adaptive's
        requests handed out for the layer since its last step (forgotten first when the step starts a prompt)."""
        if self.name == "lrfu":
            age_uses(self._uses[layer], used)
        elif self.name == "cyclic":
            if starts_prompt(layer, used, self.top_k):
                forget_requests(self._requests)
            age_uses(self._requests[layer], self._asked[layer], CYCLIC_DECAY)
        elif self.name == "adaptive":
            starts = starts_prompt(layer, used, self.top_k)
            self._adaptive.note_step(layer, sorted(self._asked[layer]), starts, on_device)
        self._asked[layer].clear()

    def victim(self, evictable: Sequence[Key], now: int, on_device: OnDevice) -> Key:
        """The policy's victim among ``evictable`` (least recently used first) while the model serves ``now``."""
        if self.name == "cyclic":
            return choose_cyclic_victim(evictable, self._requests, now, self._layers, on_device)
        if self.name == "adaptive":
            return self._adaptive.victim(evictable, now, on_device)
        flat = [layer * self._experts + expert for layer, expert in evictable]
        uses = {i: self._uses[layer][expert] for i, (layer, expert) in zip(flat, evictable, strict=True)}
        victim = choose_victim(self.name, flat, uses)  # type: ignore[arg-type]  (any __getitem__)
        return evictable[flat.index(victim)]

    def guess_may_evict(self, victim: Key, guess: Key, now: int, on_device: OnDevice) -> bool:
        """Whether a guess is worth clearly more than the victim it would evict (``guess_may_evict``)."""
        return guess_may_evict(
            self.name, self._worth(victim, now, on_device), self._worth(guess, now, on_device)
        )

    def _worth(self, key: Key, now: int, on_device: OnDevice) -> float:
        """What keeping ``key`` is worth while the model serves layer ``now`` (lru: nothing to compare;
        ``guess_may_evict`` does not ask)."""
        if self.name == "cyclic":
            return cyclic_worth(key, self._requests, now, self._layers, on_device)
        if self.name == "adaptive":
            return self._adaptive.guess_worth(key, now, on_device)
        layer, expert = key
        return self._uses[layer][expert] if self.name == "lrfu" else 0.0
