"""The host tier over disk: a host-RAM cache of packed experts, read on demand from the checkpoint's files.

With a host budget (``--host-memory``), host RAM holds only ``budget // slot_bytes`` experts, in one arena
allocated once (pinned on CUDA, like ``HostStore``); every other expert stays in the checkpoint on disk. A slot
is the largest layer's packed size, so experts of any layer fit any slot and the arena never exceeds the budget.
An expert is read straight into its slot, one ``preadv`` per stored tensor at its packed offset
(``offload.experts.disk``), with no second copy; where the host computes from the tier, the reader then
converts it there to the CPU kernel's layout (``tier_form``), or builds it (``build``: host-only).

``HostTier`` has ``HostStore``'s interface (``layout``, ``buffer``, ``tensors``), so the device cache and the
host kernels read from either, plus what a tier needs:
- ``fetch(layer, e)``: a demand, counted as a hit or a miss; starts the read at once when room allows, so
  the reads of a layer's misses overlap each other and the compute of its hits;
- ``prefetch(layer, e)``: a guess for the next layer, read only into a free slot or in place of the policy's
  victim when the guess is worth clearly more (``guess_may_evict``), never into room that needs waiting;
- ``hold(layer, e, done, wait)``: a consumer (a link copy, a host job) still reads the slot until ``done()``;
- ``buffer_on_arrival``, ``tensors_on_arrival``: the slot at once, and a wait for its read that the consumer
  does on its own side (the host's worker, the link's), so the caller never blocks on the disk for it.
A slot is never evicted while its read is in flight, while it is held, or while it is reserved: fetched for
the current layer and not yet handed to a consumer. Among the rest, the victim is the tier's policy's over
every layer at once (``[host] policy``; its state in ``tier_policy``, its rules in ``policy``, ``adaptive_policy``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from offload.errors import CacheError
from offload.experts.disk import DiskHandle, FileDisk, TensorRead
from offload.experts.host import Ready
from offload.experts.in_place import Materialize, build_in_place
from offload.experts.packing import ExpertLayout, unpack_expert
from offload.experts.policy import DEFAULT_HOST_POLICY, HOST_TIER_POLICIES
from offload.experts.source import Expert
from offload.experts.store import HostForm, is_out_of_memory
from offload.experts.tier_form import TierForm
from offload.experts.tier_policy import TierPolicy
from offload.experts.tier_stats import TierStats

Key = tuple[int, int]  # (layer, expert)


@dataclass
class _Hold:
    done: Callable[[], bool]  # whether the consumer has finished reading the slot
    wait: Callable[[], None]  # block until it has


@dataclass
class _Entry:
    slot: int
    read: DiskHandle | None  # until someone has waited on it
    built: Expert | None = None  # with ``build``: the expert built in the slot, once the read is waited on
    reserved: int = 0  # fetches of the current layer not yet handed to a consumer
    holds: list[_Hold] = field(default_factory=list)


class HostTier:
    """``budget_bytes`` of host RAM caching the experts that ``reads`` locate on disk.

    ``reads[layer][expert]`` are the stored tensors of one expert, in the order and sizes of ``layouts[layer]``'s
    slices. ``min_slots`` is the fewest experts the budget must hold (one token's experts of one layer).
    ``where`` names the budget in errors: "--host-memory 8" (the default) or a profile's "FILE: host.memory_gib = 8".
    """

    def __init__(
        self,
        layouts: Sequence[ExpertLayout],
        reads: Sequence[Sequence[Sequence[TensorRead]]],
        budget_bytes: int,
        disk: FileDisk,
        *,
        device: torch.device | str = "cpu",
        policy: str = DEFAULT_HOST_POLICY,
        min_slots: int = 1,
        build: Sequence[Materialize] | None = None,
        host_forms: Sequence[HostForm | None] | None = None,
        where: str | None = None,
    ) -> None:
        if policy not in HOST_TIER_POLICIES:  # before the files are opened and the arena allocated
            raise CacheError(f"host-tier policy {policy!r} is not one of {', '.join(HOST_TIER_POLICIES)}")
        self.num_layers, self.num_experts = len(reads), len(reads[0])
        for layout, layer_reads in zip(layouts, reads, strict=True):
            for expert_reads in layer_reads:
                sizes = [read.nbytes for read in expert_reads]
                assert sizes == [piece.nbytes for piece in layout.slices], "reads must follow the layout"
                for read in expert_reads:
                    disk.open(read.path)  # now, at load: a file that changes size later is refused
        self._stored_layouts = list(layouts)  # what a read lands in the slot
        assert build is None or host_forms is None, "a tier builds its experts or converts them, not both"
        self._forms = TierForm.per_layer(layouts, host_forms)
        self._layouts = [
            layout if form is None else form.layout for layout, form in zip(layouts, self._forms, strict=True)
        ]
        self._build = build
        self._reads = reads
        self.disk = disk
        self.policy = policy
        self.pinned = torch.device(device).type == "cuda"
        self.budget_bytes = budget_bytes
        self.where = where or f"--host-memory {budget_bytes / 2**30:.4g}"
        self.slot_bytes = max(layout.nbytes for layout in layouts)
        self.slots = min(budget_bytes // self.slot_bytes, self.num_layers * self.num_experts)
        if self.slots < min_slots:
            needed = min_slots * self.slot_bytes
            raise CacheError(
                f"{self.where} GiB holds {self.slots} experts of "
                f"{self.slot_bytes / 2**20:.2f} MiB; one layer's step needs {min_slots} "
                f"(give at least {_round_up(needed / 2**30)} GiB)"
            )
        try:
            self._arena = torch.zeros(self.slots * self.slot_bytes, dtype=torch.uint8, pin_memory=self.pinned)
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            raise CacheError(
                f"out of host memory for the host tier's {self.slots * self.slot_bytes / 2**30:.2f} GiB"
                f"{' (pinned)' if self.pinned else ''}; lower the budget ({self.where}) or close other programs"
            ) from None
        self._free = list(range(self.slots))
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()  # least recently used first
        # What the policy counts, and its victims; min_slots is one token's experts (a prompt's start).
        self._policy = TierPolicy(policy, self.slots, self.num_layers, self.num_experts, min_slots)
        # Whether the device's slots hold an expert (the cache sets it; None: no device cache).
        self.on_device: Callable[[int, int], bool] | None = None
        self.stats = TierStats(self.num_layers)

    @property
    def builds(self) -> bool:
        """Whether experts are built in their slots as they are read (``expert``), for the host alone."""
        return self._build is not None

    @property
    def nbytes(self) -> int:
        """Host bytes held for experts: the arena, never more than the budget."""
        return self._arena.numel()

    @property
    def total_bytes(self) -> int:
        """What holding every expert would take: the whole model's packed experts."""
        return self.num_experts * sum(layout.nbytes for layout in self._stored_layouts)

    def describe(self) -> str:
        return (
            f"{self.nbytes / 2**20:.1f} MiB host tier ({self.slots} of {self.num_layers * self.num_experts} "
            f"experts, {self.policy.upper()}) over the {self.disk.describe()}"
        )

    def summary(self) -> dict[str, Any]:
        """What a report shows: the budget, the bytes held, the slots, the policy, the disk, and the counters."""
        return {
            "budget_bytes": self.budget_bytes,
            "bytes_held": self.nbytes,
            "slots": self.slots,
            "experts": self.num_layers * self.num_experts,
            "policy": self.policy,
            "disk": self.disk.spec,
            **self.stats.as_dict(),
        }

    def layout(self, layer: int) -> ExpertLayout:
        """The layout every expert of ``layer`` is packed with."""
        self._check_index(layer, 0)
        return self._layouts[layer]

    def resident(self) -> list[Key]:
        """The experts in the tier (read, or arriving), least recently used first."""
        return list(self._entries)

    def contains(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self._entries

    def is_ready(self, layer: int, expert: int) -> bool:
        """Whether ``buffer`` would return without waiting on the disk."""
        entry = self._entries.get((layer, expert))
        return entry is not None and (entry.read is None or self.disk.is_done(entry.read))

    def fetch(self, layer: int, expert: int) -> None:
        """Count a demand for ``expert`` and reserve it for the current layer; start its read if room allows."""
        self._check_index(layer, expert)
        stats = self.stats.layers[layer]
        entry = self._entries.get((layer, expert))
        stats.accesses += 1
        stats.hits += entry is not None
        stats.misses += entry is None
        if entry is None:
            entry = self._start_read(layer, expert, wait=False)
        if entry is not None:
            entry.reserved += 1

    def prefetch(self, layer: int, expert: int) -> bool:
        """Start reading a guess for ``layer`` (the next layer's) unless it is in the tier already: into a free
        slot, or in place of the policy's victim when the guess is worth clearly more (``guess_may_evict``);
        False when neither is possible without waiting."""
        self._check_index(layer, expert)
        if (layer, expert) in self._entries:
            return True
        if not self._free and not self._evict_for_guess(layer, expert):
            return False
        if self._start_read(layer, expert, wait=False) is None:
            return False
        self.stats.layers[layer].prefetch_reads += 1
        return True

    def buffer(self, layer: int, expert: int) -> Tensor:
        """The expert's packed bytes (a 1-D uint8 view of its slot), read from disk first if needed.

        The view is valid until the next call into the tier unless the caller ``hold``s the expert.
        """
        self._check_index(layer, expert)
        key = (layer, expert)
        entry = self._entries.get(key) or self._start_read(layer, expert, wait=True)
        assert entry is not None
        if entry.read is not None:
            started = time.perf_counter()
            try:
                self.disk.wait(entry.read)
            except BaseException:
                self._drop(key)  # the slot's bytes are not this expert's; a later demand reads again
                raise
            finally:
                self.stats.layers[layer].disk_wait_seconds += time.perf_counter() - started
            entry.built = entry.read.result  # type: ignore[assignment]  (build_in_place's)
            entry.read = None
        self._entries.move_to_end(key)
        return self._slot(entry.slot, layer)

    def expert(self, layer: int, expert: int) -> Expert | None:
        """With ``build`` (a tier that only the host computes from): the expert built in its slot by
        ``build_in_place`` as its read landed, valid while it is held; None when it must be built for each use.
        """
        assert self._build is not None, "a tier built without ``build`` holds stored bytes only"
        self.buffer(layer, expert)
        return self._entries[(layer, expert)].built

    def tensors(self, layer: int, expert: int) -> dict[str, Tensor]:
        """Zero-copy views of the expert's encoded tensors in its slot (valid as ``buffer``'s)."""
        buffer = self.buffer(layer, expert)
        assert self._entries[(layer, expert)].built is None, "a slot built in place holds no stored bytes"
        return unpack_expert(buffer, self.layout(layer))

    def buffer_on_arrival(self, layer: int, expert: int) -> tuple[Tensor, Ready | None]:
        """``buffer`` without waiting for the expert's read: the slot's bytes, and a function that returns once
        the read has landed (the ``perf_counter`` time it landed; it raises the read's error), or None when the
        bytes are there already. The consumer that waits for the read (a host job, a link copy) must ``hold`` the
        expert until it is done. An expert not in the tier starts its read here, waiting for room as ``buffer``.
        """
        self._check_index(layer, expert)
        entry = self._entries.get((layer, expert)) or self._start_read(layer, expert, wait=True)
        assert entry is not None
        landing = entry.read
        failed = landing is not None and landing.finished.is_set() and landing.error is not None
        if landing is None or failed or self.disk.is_done(landing):
            return self.buffer(layer, expert), None  # no wait (a failed read raises here, and is forgotten)
        self._entries.move_to_end((layer, expert))
        disk = self.disk

        def arrived() -> float:
            disk.wait(landing)
            return max(landing.finished_at, landing.done_at)

        return self._slot(entry.slot, layer), arrived

    def tensors_on_arrival(self, layer: int, expert: int) -> tuple[dict[str, Tensor], Ready | None]:
        """``buffer_on_arrival`` as the zero-copy views of the expert's encoded tensors (``tensors``)."""
        assert self._build is None, "a tier built without ``build`` holds stored bytes"
        buffer, arrived = self.buffer_on_arrival(layer, expert)
        return unpack_expert(buffer, self._layouts[layer]), arrived

    def hold(self, layer: int, expert: int, done: Callable[[], bool], wait: Callable[[], None]) -> None:
        """Keep ``expert``'s slot until ``done()`` (a copy or a job reading it); ends one reservation."""
        entry = self._entries[(layer, expert)]
        # Drop finished holds here too: a tier that never evicts would otherwise keep one per copy forever.
        entry.holds = [hold for hold in entry.holds if not hold.done()]
        entry.holds.append(_Hold(done, wait))
        self._policy.asked(layer, expert)  # a request served: what cyclic and adaptive count
        entry.reserved = max(0, entry.reserved - 1)

    def holds(self, layer: int, expert: int) -> int:
        """How many holds on ``expert``'s slot the tier keeps (finished ones are dropped as it goes)."""
        return len(self._entries[(layer, expert)].holds)

    def release(self, layer: int | None = None) -> None:
        """End every reservation of ``layer`` (its step is over), or of every layer (a new forward pass)."""
        for (entry_layer, _), entry in self._entries.items():
            if layer is None or entry_layer == layer:
                entry.reserved = 0

    def note_step(self, layer: int, used: Collection[int]) -> None:
        """Count one step of ``layer`` that used ``used`` (LRFU's decayed counts; cyclic's counts of the
        experts handed out for the layer since its last step, forgotten when the step starts a prompt)
        and end its reservations."""
        self._policy.note_step(layer, used, self.on_device)
        self.release(layer)

    def reset_stats(self) -> None:
        self.stats.reset()

    def empty(self) -> None:
        """Forget every expert and what the policy has counted: the tier as loaded, cold (the counters stay).

        Waits first for reads in flight and consumers still reading a slot, so no byte lands in a freed slot.
        ``offload bench`` empties the shared tier before each row, so no row starts with another's experts.
        """
        for entry in self._entries.values():
            if entry.read is not None:
                entry.read.finished.wait()
            for hold in entry.holds:
                hold.wait()
        self._entries.clear()
        self._free = list(range(self.slots))
        self._policy.reset()

    def close(self) -> None:
        """Finish the reads in flight and close the checkpoint's files."""
        self.disk.close()

    def _start_read(self, layer: int, expert: int, *, wait: bool) -> _Entry | None:
        slot = self._room(wait, layer)
        if slot is None:
            return None
        buffer = self._slot(slot, layer)
        landing = self._arena[slot * self.slot_bytes : (slot + 1) * self.slot_bytes]  # the stored layout's
        pieces = [
            (read, landing[piece.offset : piece.offset + piece.nbytes])
            for read, piece in zip(
                self._reads[layer][expert], self._stored_layouts[layer].slices, strict=True
            )
        ]
        then = None
        form = self._forms[layer]
        if self._build is not None:
            layout, materialize = self._layouts[layer], self._build[layer]
            then = lambda: build_in_place(buffer, layout, materialize)  # noqa: E731  (runs on the worker)
        elif form is not None:
            then = lambda: form.convert(landing)  # noqa: E731  (runs on the worker, after the read)
        handle = self.disk.submit(pieces, then)
        stats = self.stats.layers[layer]
        stats.reads += 1
        stats.disk_bytes_read += handle.nbytes
        entry = _Entry(slot, handle)
        self._entries[(layer, expert)] = entry
        return entry

    def _room(self, wait: bool, for_layer: int) -> int | None:
        """A free slot for an expert of ``for_layer``, evicting the policy's victim among the evictable; with
        ``wait``, block on a consumer or a read in flight until one is evictable."""
        while True:
            if self._free:
                return self._free.pop()
            evictable = self._evictable_keys()
            if evictable:
                self._drop(self._policy.victim(evictable, for_layer, self.on_device))
                continue
            if not wait:
                return None
            self._wait_for_one()

    def _evictable_keys(self) -> list[Key]:
        """The experts that may go now, least recently used first (as the policies' ties want)."""
        return [key for key, entry in self._entries.items() if self._evictable(entry)]

    def _evict_for_guess(self, layer: int, expert: int) -> bool:
        """Evict the policy's victim for a guess for ``layer`` if ``guess_may_evict``; whether it did."""
        evictable = self._evictable_keys()
        if not evictable:
            return False
        # Worth is judged from the layer being served, the one before the guess's: its guesses are next.
        now = (layer - 1) % self.num_layers
        victim = self._policy.victim(evictable, now, self.on_device)
        if not self._policy.guess_may_evict(victim, (layer, expert), now, self.on_device):
            return False
        self._drop(victim)
        return True

    def _wait_for_one(self) -> None:
        for entry in self._entries.values():
            if entry.reserved == 0 and entry.holds:
                entry.holds[0].wait()
                return
        for entry in self._entries.values():
            if entry.reserved == 0 and entry.read is not None:
                entry.read.finished.wait()
                return
        raise CacheError(
            f"the host tier's {self.slots} experts are all needed by the current layer at once; "
            f"raise the budget ({self.where})"
        )

    def _evictable(self, entry: _Entry) -> bool:
        if entry.reserved or (entry.read is not None and not entry.read.finished.is_set()):
            return False
        entry.holds = [hold for hold in entry.holds if not hold.done()]
        return not entry.holds

    def _drop(self, key: Key) -> None:
        self._free.append(self._entries.pop(key).slot)

    def _slot(self, slot: int, layer: int) -> Tensor:
        start = slot * self.slot_bytes
        return self._arena[start : start + self._layouts[layer].nbytes]

    def _check_index(self, layer: int, expert: int) -> None:
        if not (0 <= layer < self.num_layers and 0 <= expert < self.num_experts):
            raise CacheError(
                f"no expert ({layer}, {expert}) in a tier of {self.num_layers} layers x {self.num_experts} experts"
            )


def _round_up(gib: float) -> str:
    """A budget in GiB rounded up to three significant digits, as a user would type it."""
    digits = max(0, 2 - int(f"{gib:e}".split("e")[1]))
    scale = 10**digits
    return f"{-(-gib * scale // 1) / scale:g}"
