"""The device tier: a fixed number of expert slots per layer, each layer with its own eviction order.

A slot is a device byte buffer of the layer's layout size plus the Expert materialized from it. Where the built
expert's tensors fit the buffer (a 4-bit expert in the int4 kernels' layouts, CPU or CUDA: the same bytes as the
stored ones), it is built in the slot itself (``offload.experts.in_place``): a slot then holds one expert's
bytes, not its stored bytes plus a repacked copy, and the next load into the slot overwrites it.
An eviction copies nothing back: the host store keeps every expert, and the host tier (``host_tier``) reads
any expert again from disk.
Loads go through a link; the cache never decides *what* to load, only *where*: the slot of the
expert that the cache policy (``offload.experts.policy``) evicts among those not protected.
``OffloadedExperts`` decides what to load.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from offload.errors import CacheError
from offload.experts.in_place import build_into
from offload.experts.link import Link, LinkHandle
from offload.experts.policy import CACHE_POLICIES, age_uses, choose_victim
from offload.experts.source import Expert, expert_tensors
from offload.experts.stats import CacheStats
from offload.experts.store import HostStore, is_out_of_memory

if TYPE_CHECKING:
    from offload.experts.host_tier import HostTier

Materialize = Callable[[dict[str, Tensor]], Expert]  # a slot's tensor views -> a runnable expert


@dataclass
class _Slot:
    buffer: Tensor  # (layout.nbytes,) uint8 on the device
    expert: int | None = None
    handle: LinkHandle | None = None  # the copy into buffer, until someone has waited on it
    materialized: Expert | None = None  # built from buffer once the copy is waited on (maybe inside it)
    prefetched: bool = False  # a prefetch brought the expert in and nobody has used it yet
    load_number: int = 0  # increases with every load: the link delivers in this order


@dataclass
class _LayerSlots:
    slots: list[_Slot]
    lru: OrderedDict[int, _Slot]  # expert -> its slot, least recently used first
    uses: list[float]  # expert -> its decayed use count (every expert, in a slot or not)


def slot_counts(
    experts_per_layer: int | Sequence[int],
    num_layers: int,
    num_experts: int,
    where: str = "experts_per_layer",
) -> tuple[int, ...]:
    """Validate ``experts_per_layer`` (one count, or one per layer) into one count per layer; errors name ``where``."""
    if isinstance(experts_per_layer, (list, tuple)):
        counts = list(experts_per_layer)
        if len(counts) != num_layers:
            raise CacheError(
                f"{where} lists {len(counts)} values but the model has {num_layers} layers; "
                "give one number, or one per layer"
            )
    else:
        counts = [experts_per_layer] * num_layers
    for layer, count in enumerate(counts):
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= num_experts:
            raise CacheError(
                f"{where} must be a whole number from 1 to {num_experts} (the experts per layer), "
                f"got {count!r} for layer {layer}"
            )
    return tuple(counts)


class ExpertCache:
    """``experts_per_layer`` device slots per layer, filled from ``store`` through ``link``.

    ``materialize`` turns the views of a slot's buffer into a runnable Expert (for dense experts,
    ``offload.experts.packing.materialize_dense``); it runs once per load, after the copy is waited on, and the
    expert's tensors are moved into the slot where they fit (``in_place.build_into``).
    Give one per layer when layers are encoded differently (mixed-bit experts). ``policy`` picks the
    victim of a full layer (``offload.experts.policy``); plain LRU here, while the product's default,
    LRFU, comes from the profile through ``offload.loading.OffloadOptions``.
    """

    def __init__(
        self,
        store: HostStore | HostTier,
        experts_per_layer: int | Sequence[int],
        link: Link,
        materialize: Materialize | Sequence[Materialize],
        device: torch.device | str = "cpu",
        policy: str = "lru",
    ) -> None:
        if policy not in CACHE_POLICIES:
            raise CacheError(f"cache policy {policy!r} is not one of {', '.join(CACHE_POLICIES)}")
        self.policy = policy
        self.store = store
        self.link = link
        if callable(materialize):
            materialize = [materialize] * store.num_layers
        if len(materialize) != store.num_layers:
            raise CacheError(f"got {len(materialize)} materialize functions for {store.num_layers} layers")
        self.materialize = list(materialize)
        self.experts_per_layer = slot_counts(experts_per_layer, store.num_layers, store.num_experts)
        self._layers = []
        for layer, count in enumerate(self.experts_per_layer):
            nbytes = store.layout(layer).nbytes
            try:
                slots = [_Slot(torch.zeros(nbytes, dtype=torch.uint8, device=device)) for _ in range(count)]
            except (RuntimeError, MemoryError) as error:
                if not is_out_of_memory(error):
                    raise
                self._layers = []  # the traceback keeps ``self`` alive: free the slots made so far
                total = sum(store.layout(i).nbytes * k for i, k in enumerate(self.experts_per_layer))
                raise CacheError(
                    f"out of memory on {device} allocating the expert cache ({total / 2**20:.1f} MiB for "
                    f"{max(self.experts_per_layer)} experts per layer); use a smaller profile or fewer experts "
                    "per layer (--experts-per-layer)"
                ) from None
            self._layers.append(_LayerSlots(slots, OrderedDict(), [0.0] * store.num_experts))
        self.stats = CacheStats(store.num_layers)
        self._loads_begun = 0

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def nbytes(self) -> int:
        """Device bytes held by all slots."""
        return sum(slot.buffer.numel() for layer in self._layers for slot in layer.slots)

    def resident(self, layer: int) -> list[int]:
        """The experts in ``layer``'s slots (loaded or arriving), least recently used first."""
        return list(self._layers[layer].lru)

    def contains(self, layer: int, expert: int) -> bool:
        """Whether ``expert`` is in a slot of ``layer``, loaded or still arriving."""
        return expert in self._layers[layer].lru

    def is_ready(self, layer: int, expert: int) -> bool:
        """Whether ``acquire`` would return without waiting on the link; the expert must be contained."""
        handle = self._layers[layer].lru[expert].handle
        return handle is None or self.link.is_done(handle)

    def load_number(self, layer: int, expert: int) -> int:
        """The contained expert's load order: the link delivers lower numbers first."""
        return self._layers[layer].lru[expert].load_number

    def lookup(self, layer: int, expert: int) -> bool:
        """Count one access to ``expert``; True (a hit) when it is in a slot, loaded or arriving."""
        stats = self.stats.layers[layer]
        hit = self.contains(layer, expert)
        stats.accesses += 1
        stats.hits += hit
        stats.misses += not hit
        return hit

    def load(self, layer: int, expert: int, protected: Collection[int] = (), prefetch: bool = False) -> bool:
        """Start copying ``expert`` into a free slot, or else into the slot of the expert that the policy
        evicts among those not in ``protected``. Returns False, loading nothing, when every slot is
        protected.

        The loaded expert becomes the most recently used one.
        """
        assert not self.contains(layer, expert), "load only experts that are not in a slot"
        slots = self._layers[layer]
        slot = next((s for s in slots.slots if s.expert is None), None)
        if slot is None:
            candidates = [e for e in slots.lru if e not in protected]  # least recently used first
            if not candidates:
                return False
            victim = choose_victim(self.policy, candidates, slots.uses)
            slot = slots.lru.pop(victim)
            self.stats.layers[layer].wasted_prefetches += slot.prefetched
        # A host tier's read still landing is waited for on the link's side where the link can (the emulated
        # one), not here: the caller goes on to the experts that are ready (``HostTier.buffer_on_arrival``).
        try:
            if self.link.waits_for_sources:
                source, arrived = self.store.buffer_on_arrival(layer, expert)
            else:
                source, arrived = self.store.buffer(layer, expert), None
        except BaseException:
            slot.expert, slot.materialized, slot.prefetched = None, None, False  # a free slot again
            raise
        self._loads_begun += 1
        slot.expert, slot.materialized, slot.prefetched = expert, None, prefetch
        slot.load_number = self._loads_begun
        handle = slot.handle = self.link.submit(source, slot.buffer, arrived)
        # A host tier keeps the source slot until the link has read it.
        self.store.hold(
            layer, expert, lambda: self.link.source_free(handle), lambda: self.link.wait_source(handle)
        )
        slots.lru[expert] = slot
        stats = self.stats.layers[layer]
        stats.loads += 1
        stats.prefetch_loads += prefetch
        stats.bytes_moved += slot.handle.nbytes  # the link sized the copy; this is its one count
        return True

    def acquire(self, layer: int, expert: int) -> Expert:
        """The contained ``expert``, ready to run: waits for its copy if needed and marks it used."""
        slots = self._layers[layer]
        slot = slots.lru[expert]
        stats = self.stats.layers[layer]
        if slot.handle is not None:
            started = time.perf_counter()
            try:
                self.link.wait(slot.handle)
            except BaseException:
                # Its source never landed (a damaged read): forget the slot, so a later demand loads it again.
                slot.expert, slot.handle, slot.prefetched = None, None, False
                del slots.lru[expert]
                raise
            finally:
                stats.wait_seconds += time.perf_counter() - started
            slot.handle = None
        if slot.materialized is None:
            # Nothing reads a slot's stored bytes after this: the next load overwrites the whole buffer.
            slot.materialized, _ = build_into(slot.buffer, self.store.layout(layer), self.materialize[layer])
        if slot.prefetched:
            stats.prefetch_hits += 1
            slot.prefetched = False
        slots.lru.move_to_end(expert)
        return slot.materialized

    def touch(self, layer: int, experts: Sequence[int]) -> None:
        """Mark the contained ``experts`` as the most recently used, the last one most recent."""
        for expert in experts:
            self._layers[layer].lru.move_to_end(expert)

    def note_step(self, layer: int, used: Collection[int]) -> None:
        """Count one step of ``layer`` that used ``used`` (the lrfu policy's decayed use counts)."""
        if self.policy == "lrfu":  # LRU needs no counts; skip the work on the decode path
            age_uses(self._layers[layer].uses, used)

    def flush(self, layer: int) -> None:
        """Forget every expert in ``layer``'s slots (the buffers stay allocated; nothing is copied back)."""
        slots = self._layers[layer]
        for slot in slots.slots:
            if slot.handle is not None:
                self.link.wait(slot.handle)  # a copy still in flight must land before the slot is reused
                slot.handle = None
            self.stats.layers[layer].wasted_prefetches += slot.prefetched
            slot.expert, slot.materialized, slot.prefetched = None, None, False
        slots.lru.clear()

    def built_bytes(self, layer: int) -> int:
        """What materializing one slot of ``layer`` adds beyond its buffer: 0 when the expert runs on views
        of the buffer (unquantized, or built in place), the dequantized weights when a CPU slot holds an
        expert without a CPU kernel (3-bit).

        Measured by building expert 0 into a scratch buffer of its own, as ``acquire`` builds a slot's.
        """
        layout = self.store.layout(layer)
        buffer = torch.empty(
            layout.nbytes, dtype=torch.uint8, device=self._layers[layer].slots[0].buffer.device
        )
        buffer.copy_(self.store.buffer(layer, 0))
        expert, _ = build_into(buffer, layout, self.materialize[layer])
        own = buffer.untyped_storage().data_ptr()
        return sum(
            t.numel() * t.element_size()
            for t in expert_tensors(expert)
            if t.untyped_storage().data_ptr() != own
        )

    def reset_stats(self) -> None:
        """Zero the counters; the slots keep their experts."""
        self.stats.reset()
