"""OffloadedExperts: the ExpertSource that serves experts from the device cache, loading misses
from the host store and prefetching the next layer's likely experts while this layer computes.

Per layer, in ``experts_for``:
1. score the guesses made for this layer one layer earlier (prefetch recall and precision);
2. submit copies for this layer's misses, as slots allow, never evicting a needed expert
   that has not been computed yet;
3. once every miss is submitted, prefetch the next layer's guesses (misses go first on the link);
   a guess never evicts an expert the previous token used in that layer (the likeliest to be used
   again) and is skipped when no other slot is left, so prefetching cannot empty a small cache;
4. yield ready experts first, then the others in the order the link delivers them.
When a layer needs more experts than it has slots (a long prefill), a slot is reused as soon as
the caller has finished with its expert.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from offload.errors import CacheError
from offload.experts.cache import ExpertCache
from offload.experts.source import Expert, ExpertMemory
from offload.experts.stats import CacheStats


class OffloadedExperts:
    """Experts served from ``cache``; ``gates`` are the routers of every layer, used to guess the next
    layer's experts, and ``prefetch`` is how many to guess (0 turns prefetching off; more than
    the next layer's slots is capped at its slots).
    """

    def __init__(self, cache: ExpertCache, gates: Sequence[nn.Module], prefetch: int = 0) -> None:
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise CacheError(f"prefetch must be a whole number of experts >= 0 (0 = off), got {prefetch!r}")
        if len(gates) != cache.num_layers:
            raise CacheError(f"got {len(gates)} gates for a cache of {cache.num_layers} layers")
        self.cache = cache
        self.gates = list(gates)
        self.prefetch = prefetch
        self._guesses_for: dict[int, list[int]] = {}  # layer -> the guesses made for it one layer earlier
        self._last_used: dict[int, frozenset[int]] = {}  # layer -> the experts its latest step used

    @property
    def stats(self) -> CacheStats:
        return self.cache.stats

    def reset_stats(self) -> None:
        """Zero the counters; the cache keeps its experts."""
        self.cache.reset_stats()

    def flush(self) -> None:
        """Empty every layer's slots and forget the pending guesses: the next step starts cold."""
        for layer in range(self.cache.num_layers):
            self.cache.flush(layer)
        self._guesses_for.clear()
        self._last_used.clear()

    def memory(self) -> ExpertMemory:
        """The slots, plus what materializing a full set of them builds beside their buffers; the store."""
        cache = self.cache
        built = sum(count * cache.built_bytes(layer) for layer, count in enumerate(cache.experts_per_layer))
        return ExpertMemory(device_bytes=cache.nbytes + built, host_bytes=cache.store.nbytes)

    def expert_bytes(self) -> tuple[int, ...]:
        """What one load moves in each layer: the expert's packed buffer."""
        store = self.cache.store
        return tuple(store.layout(layer).nbytes for layer in range(store.num_layers))

    def describe(self) -> str:
        cache = self.cache
        slots = cache.experts_per_layer
        return (
            f"experts: {cache.store.nbytes / 2**20:.1f} MiB in host RAM, "
            f"{cache.nbytes / 2**20:.1f} MiB of device slots "
            f"(K={slots[0] if len(set(slots)) == 1 else list(slots)} of {cache.store.num_experts} "
            f"per layer, {cache.policy.upper()}, prefetch {self.prefetch})"
        )

    def _guess_count(self, layer: int) -> int:
        if layer >= self.cache.num_layers:
            return 0
        return min(self.prefetch, self.cache.experts_per_layer[layer])

    def speculate(self, layer: int, hidden: Tensor) -> Tensor | None:
        """Layer+1's gate on this layer's normalised input (T, D): its top guesses, on the device.

        Over several tokens, the guesses are the experts with the largest summed routing probability.
        """
        count = self._guess_count(layer + 1)
        if count == 0:
            return None
        logits = self.gates[layer + 1](hidden)
        probs = torch.softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)  # (T, E)
        return torch.topk(probs.sum(dim=0), count).indices

    def experts_for(self, layer: int, needed: list[int], guesses: list[int]) -> Iterator[tuple[int, Expert]]:
        """Yield (expert id, expert) for every id in ``needed``; ``guesses`` are for layer+1."""
        cache = self.cache
        if layer == 0:  # a new forward pass: drop guesses left over by one that was interrupted
            self._guesses_for.clear()
        guessed_here = self._guesses_for.pop(layer, None)
        if guessed_here is not None:
            cache.stats.layers[layer].record_guesses(guessed_here, needed)
        next_guesses = list(dict.fromkeys(guesses))[: self._guess_count(layer + 1)]
        if next_guesses:
            self._guesses_for[layer + 1] = next_guesses

        remaining = list(dict.fromkeys(needed))
        uncomputed = set(remaining)  # protected from eviction until the caller has used them
        to_load = deque(e for e in remaining if not cache.lookup(layer, e))
        prefetched = False
        while remaining:
            while to_load and cache.load(layer, to_load[0], protected=uncomputed):
                to_load.popleft()
            if not to_load and not prefetched:
                self._prefetch(layer + 1, next_guesses)
                prefetched = True
            expert = self._next_usable(layer, remaining)
            yield expert, cache.acquire(layer, expert)
            remaining.remove(expert)
            uncomputed.discard(expert)
        if not prefetched:
            self._prefetch(layer + 1, next_guesses)
        # Recency follows ``needed``, not arrival order, so the eviction order (and every stat) is the same
        # whichever link delivered the experts.
        cache.touch(layer, [e for e in needed if cache.contains(layer, e)])
        cache.note_step(layer, needed)
        self._last_used[layer] = frozenset(needed)

    def _next_usable(self, layer: int, remaining: list[int]) -> int:
        """A ready expert if there is one, else the one the link delivers first."""
        in_cache = [e for e in remaining if self.cache.contains(layer, e)]
        # Some needed expert is always in a slot: a load fails only when all slots hold needed ones.
        assert in_cache, "no needed expert is in a slot"
        ready = next((e for e in in_cache if self.cache.is_ready(layer, e)), None)
        if ready is not None:
            return ready
        return min(in_cache, key=lambda e: self.cache.load_number(layer, e))

    def _prefetch(self, layer: int, guesses: list[int]) -> None:
        """Start copying the guesses not yet in ``layer``'s slots, best guess first, evicting neither
        this batch nor the experts ``layer`` used last; stop at the first guess that finds no slot.
        """
        keep = set(guesses) | self._last_used.get(layer, frozenset())
        for expert in guesses:
            if not self.cache.contains(layer, expert) and not self.cache.load(
                layer, expert, protected=keep, prefetch=True
            ):
                return
