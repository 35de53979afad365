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

With a ``HostPath`` (hybrid execution), step 2 first asks its cost model where each miss is cheapest
(``offload.experts.cost_model``): misses sent to the host start there at once, on the caller's inputs,
and run while the device computes the hits; the rest are copied as above. Unless the mode is
``never``, the link then copies only while it is idle (a busy link would delay the copies that misses
may still choose): first the next layer's guesses, then the host-computed misses, so the cache keeps
learning which experts are hot.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from offload.errors import CacheError
from offload.experts.cache import ExpertCache, Materialize
from offload.experts.cost_model import HOST, CostModel, Miss, guess_pays
from offload.experts.host import HostJob, ThreadHost
from offload.experts.host_tier import HostTier
from offload.experts.source import Expert, ExpertMemory, Inputs
from offload.experts.stats import CacheStats


@dataclass
class HostPath:
    """What a source needs to compute misses on the host: the host, the cost model that chooses, and
    ``materialize[layer]``, which turns a host-store expert's tensors into an expert runnable on the host.
    """

    host: ThreadHost
    model: CostModel
    materialize: Sequence[Materialize]

    @property
    def hybrid(self) -> bool:
        """Whether the host may take misses at all."""
        return self.model.mode != "never"


class _Computed:
    """An expert already computed elsewhere: returns its output for the input it was given."""

    def __init__(self, output: Tensor) -> None:
        self.output = output

    def __call__(self, x: Tensor) -> Tensor:
        return self.output


def computed(output: Tensor) -> Expert:
    """The expert a source yields for one it computed on the host: ``output`` for the caller's input."""
    return _Computed(output)


class OffloadedExperts:
    """Experts served from ``cache``; ``gates`` are the routers of every layer, used to guess the next
    layer's experts, and ``prefetch`` is how many to guess (0 turns prefetching off; more than
    the next layer's slots is capped at its slots).
    """

    def __init__(
        self,
        cache: ExpertCache,
        gates: Sequence[nn.Module],
        prefetch: int = 0,
        host_path: HostPath | None = None,
    ) -> None:
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise CacheError(f"prefetch must be a whole number of experts >= 0 (0 = off), got {prefetch!r}")
        if len(gates) != cache.num_layers:
            raise CacheError(f"got {len(gates)} gates for a cache of {cache.num_layers} layers")
        self.cache = cache
        if isinstance(cache.store, HostTier):  # its cyclic policy weighs down copies of what the slots hold
            cache.store.on_device = cache.contains
        self.gates = list(gates)
        self.prefetch = prefetch
        self._guesses_for: dict[int, list[int]] = {}  # layer -> the guesses made for it one layer earlier
        self._last_used: dict[int, frozenset[int]] = {}  # layer -> the experts its latest step used
        self.host_path = host_path if host_path is not None and host_path.hybrid else None
        self._link_free_at = 0.0  # when the link will have moved every copy submitted (estimated)
        self._host_free_at = 0.0  # when the host will have run every job submitted (estimated)
        self._arrivals: dict[tuple[int, int], float] = {}  # (layer, expert) -> when its copy lands
        self._layer_seconds: float | None = None  # a layer's wall time, averaged (with a host path)
        self._layer_started: tuple[int, float] | None = None  # the latest experts_for call: (layer, time)

    @property
    def stats(self) -> CacheStats:
        return self.cache.stats

    def reset_stats(self) -> None:
        """Zero the counters (the host tier's too); the cache keeps its experts."""
        self.cache.reset_stats()
        self.cache.store.reset_stats()

    def flush(self) -> None:
        """Empty every layer's slots and forget the pending guesses: the next step starts cold."""
        for layer in range(self.cache.num_layers):
            self.cache.flush(layer)
        self._guesses_for.clear()
        self._last_used.clear()
        self._arrivals.clear()

    def memory(self) -> ExpertMemory:
        """The slots, plus what materializing a full set of them builds beside their buffers; the store."""
        cache = self.cache
        built = sum(count * cache.built_bytes(layer) for layer, count in enumerate(cache.experts_per_layer))
        return ExpertMemory(device_bytes=cache.nbytes + built, host_bytes=cache.store.nbytes)

    @property
    def host_tier(self) -> HostTier | None:
        """The host tier the experts are read through (None when the host store holds every expert)."""
        store = self.cache.store
        return store if isinstance(store, HostTier) else None

    def expert_bytes(self) -> tuple[int, ...]:
        """What one load moves in each layer: the expert's packed buffer."""
        store = self.cache.store
        return tuple(store.layout(layer).nbytes for layer in range(store.num_layers))

    def describe(self) -> str:
        cache = self.cache
        slots = cache.experts_per_layer
        prefetch = f"prefetch {self.prefetch}"
        if self.prefetch > min(slots):  # a layer guesses at most as many experts as it has slots
            prefetch += ", at most K a layer"
        return (
            f"experts: {cache.store.describe()}, "
            f"{cache.nbytes / 2**20:.1f} MiB of device slots "
            f"(K={slots[0] if len(set(slots)) == 1 else list(slots)} of {cache.store.num_experts} "
            f"per layer, {cache.policy.upper()}, {prefetch})"
            + (
                ""
                if self.host_path is None
                else f"; misses on the {self.host_path.host.describe()} when cheaper"
            )
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

    def experts_for(
        self, layer: int, needed: list[int], guesses: list[int], inputs: Inputs | None = None
    ) -> Iterator[tuple[int, Expert]]:
        """Yield (expert id, expert) for every id in ``needed``; ``guesses`` are for layer+1."""
        cache = self.cache
        if layer == 0:  # a new forward pass: drop guesses left over by one that was interrupted
            self._guesses_for.clear()
            cache.store.release()  # and a host tier's reservations that such a pass left behind
            if isinstance(cache.store, HostTier):  # weigh what these slots hold, not another source's (bench)
                cache.store.on_device = cache.contains
        guessed_here = self._guesses_for.pop(layer, None)
        if guessed_here is not None:
            cache.stats.layers[layer].record_guesses(guessed_here, needed)
        next_guesses = list(dict.fromkeys(guesses))[: self._guess_count(layer + 1)]
        if next_guesses:
            self._guesses_for[layer + 1] = next_guesses

        self._time_layer(layer)
        remaining = list(dict.fromkeys(needed))
        uncomputed = set(remaining)  # protected from eviction until the caller has used them
        misses = [e for e in remaining if not cache.lookup(layer, e)]
        store = cache.store
        # A host tier starts reading every miss now, so the reads overlap the hits; the experts it holds
        # are fetched (reserved) first, so that no read of this step evicts another expert the step needs.
        for expert in sorted(misses, key=lambda e: not store.is_ready(layer, e)):
            store.fetch(layer, expert)
        for expert in next_guesses:  # and then the next layer's guesses, behind the misses on the disk
            if not cache.contains(layer + 1, expert) and not store.prefetch(layer + 1, expert):
                break
        hosted = self._start_on_host(layer, remaining, misses, inputs) if inputs is not None else {}
        to_load = deque(e for e in misses if e not in hosted)
        if cache.link.waits_for_sources:
            # Experts in host memory first: the link copies in order, and a copy whose read is still landing
            # would hold up those behind it. (A link that copies at once keeps the order: ``is_ready`` depends
            # on timing, and its loads, hence a long prefill's evictions, would too.)
            to_load = deque(sorted(to_load, key=lambda e: not store.is_ready(layer, e)))
        prefetched = False
        while remaining:
            while to_load and self._load(layer, to_load[0], uncomputed):
                to_load.popleft()
            if not to_load and not prefetched:
                self._prefetch(layer + 1, next_guesses)
                self._admit(layer, hosted, uncomputed)
                prefetched = True
            expert = self._next_usable(layer, remaining, hosted)
            if expert in hosted:
                yield expert, self._host_output(layer, hosted[expert])
            else:
                yield expert, cache.acquire(layer, expert)
            remaining.remove(expert)
            uncomputed.discard(expert)
        if not prefetched:
            self._prefetch(layer + 1, next_guesses)
        # Recency follows ``needed``, not arrival order, so the eviction order (and every stat) is the same
        # whichever link delivered the experts.
        cache.touch(layer, [e for e in needed if cache.contains(layer, e)])
        cache.note_step(layer, needed)
        store.note_step(layer, needed)
        self._last_used[layer] = frozenset(needed)

    def _start_on_host(
        self, layer: int, remaining: list[int], misses: list[int], inputs: Inputs
    ) -> dict[int, HostJob]:
        """Start on the host the misses, arriving experts and ready hits that the cost model sends there."""
        path = self.host_path
        if path is None:
            return {}
        cache = self.cache
        candidates = [Miss(e, inputs(e).shape[0]) for e in misses]
        ready = []
        for expert in remaining:
            if expert in misses or not cache.store.is_ready(layer, expert):
                continue  # a hit is worth computing on the host only when its bytes need no disk read
            if cache.is_ready(layer, expert):
                ready.append(Miss(expert, inputs(expert).shape[0]))
            else:
                arriving = self._arrivals.get((layer, expert), self._link_free_at)
                candidates.append(Miss(expert, inputs(expert).shape[0], arriving))
        now = time.perf_counter()
        choices = path.model.choose(layer, candidates, now, self._link_free_at, self._host_free_at, ready)
        stats = cache.stats.layers[layer]
        store = cache.store
        chosen = [miss.expert for miss in [*candidates, *ready] if choices.get(miss.expert) == HOST]
        sizes = {miss.expert: miss.tokens for miss in [*candidates, *ready]}
        submitted = {}
        # Experts in host memory first: the host runs its jobs in order, and one still being read would hold
        # up those behind it. Each job holds its slot once submitted, before the next expert's slot is asked
        # for, so a host tier smaller than the step can wait for a finished job's slot (as the copies do).
        for expert in sorted(chosen, key=lambda expert: not store.is_ready(layer, expert)):
            # A host tier hands out the slot's views without waiting for a read still landing: the job waits
            # for it on the host's worker, so this thread goes on to the hits at once.
            tensors, arrived = store.tensors_on_arrival(layer, expert)
            materialize = path.materialize[layer]
            job = submitted[expert] = path.host.submit(
                lambda x, t=tensors, m=materialize: m(t)(x), inputs(expert), arrived
            )
            store.hold(layer, expert, job.finished.is_set, job.finished.wait)
            self._host_free_at = max(now, self._host_free_at) + path.model.inputs.host_seconds(sizes[expert])
            stats.host_computes += 1
        return {expert: submitted[expert] for expert in chosen}

    def _host_output(self, layer: int, job: HostJob) -> Expert:
        started = time.perf_counter()
        output = self.host_path.host.wait(job)  # type: ignore[union-attr]  (jobs exist only with a path)
        self.cache.stats.layers[layer].host_wait_seconds += time.perf_counter() - started
        return computed(output)

    def _load(self, layer: int, expert: int, protected: set[int], prefetch: bool = False) -> bool:
        """``cache.load``, keeping the estimate of when the link is free and the copy lands."""
        if not self.cache.load(layer, expert, protected=protected, prefetch=prefetch):
            return False
        if self.host_path is not None:
            starts = max(time.perf_counter(), self._link_free_at)
            self._link_free_at = starts + self.host_path.model.inputs.copy_seconds(layer)
            self._arrivals[(layer, expert)] = self._link_free_at
        return True

    def _link_idle(self) -> bool:
        """Always True without a host path: the copy-only engine prefetches whenever slots allow."""
        return self.host_path is None or time.perf_counter() >= self._link_free_at

    def _admit(self, layer: int, hosted: dict[int, HostJob], protected: set[int]) -> None:
        """Copy the host-computed misses into the cache while the link is idle, so hot experts settle there;
        an expert still being read from disk is left out (copying it now would wait for the read)."""
        for expert in hosted:
            if not self._link_idle():
                return
            if self.cache.contains(layer, expert) or not self.cache.store.is_ready(layer, expert):
                continue
            if not self._load(layer, expert, protected | set(hosted)):
                return

    def _next_usable(self, layer: int, remaining: list[int], hosted: dict[int, HostJob]) -> int:
        """A ready device expert, else a finished host job, else a pending host job, else the expert the
        link delivers first.
        """
        cache = self.cache
        on_device = [e for e in remaining if e not in hosted and cache.contains(layer, e)]
        ready = next((e for e in on_device if cache.is_ready(layer, e)), None)
        if ready is not None:
            return ready
        on_host = [e for e in remaining if e in hosted]
        if on_host:
            host = self.host_path.host  # type: ignore[union-attr]  (jobs exist only with a path)
            return next((e for e in on_host if host.is_done(hosted[e])), on_host[0])
        # Some needed expert is always in a slot: a load fails only when all slots hold needed ones.
        assert on_device, "no needed expert is in a slot"
        return min(on_device, key=lambda e: cache.load_number(layer, e))

    def _time_layer(self, layer: int) -> None:
        """Average the time from one layer's call to the next one's: a layer's compute, for ``_guesses_pay``."""
        if self.host_path is None:
            return
        now = time.perf_counter()
        if self._layer_started is not None and self._layer_started[0] == layer - 1:
            seconds = now - self._layer_started[1]
            previous = self._layer_seconds
            self._layer_seconds = seconds if previous is None else 0.9 * previous + 0.1 * seconds
        self._layer_started = (layer, now)

    def _guesses_pay(self, layer: int, rank: int) -> bool:
        """Whether a rank-``rank`` guess for ``layer`` is worth a copy: always without a host path (the copy-only
        engine); with one, while the measured precision of that layer's guesses at that rank says so
        (``cost_model.guess_pays``).
        """
        if self.host_path is None:
            return True
        precision = self.cache.stats.layers[layer].prefetch_precision_at(rank)
        return guess_pays(precision, self.host_path.model.inputs.copy_seconds(layer), self._layer_seconds)

    def _prefetch(self, layer: int, guesses: list[int]) -> None:
        """Start copying the guesses not yet in ``layer``'s slots, best guess first, evicting neither
        this batch nor the experts ``layer`` used last; stop at the first guess that finds no slot (or,
        with a host path, once the link is busy; a guess whose rank does not pay is skipped, ``_guesses_pay``).
        """
        if not guesses:
            return
        keep = set(guesses) | self._last_used.get(layer, frozenset())
        store = self.cache.store
        for rank, expert in enumerate(guesses):
            if not self._link_idle():
                return
            if not self._guesses_pay(layer, rank):
                continue
            if self.cache.contains(layer, expert):
                continue
            if not store.prefetch(layer, expert):
                return  # no room in the host tier without waiting
            if not store.is_ready(layer, expert):
                continue  # still on its way from disk: copying it now would wait for the read
            if not self._load(layer, expert, keep, prefetch=True):
                return
