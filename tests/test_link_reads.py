"""A device copy of a host-tier miss waits for its disk read on the link's side, not in the caller: the caller
submits the copy at once and goes on to the experts that are ready, and the emulated link never delivers such
a copy before its read landed plus the copy's own time."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from offload.errors import CheckpointError
from offload.experts.cache import ExpertCache
from offload.experts.disk import DiskHandle, FileDisk, TensorRead
from offload.experts.link import EmulatedLink
from tests.test_host_tier import expert_tensors, make_tier


class GatedDisk(FileDisk):
    """A disk whose reads wait until the test opens the gate, and which refuses to make the test's own thread
    wait for a read while the gate is shut (it would wait forever)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.caller = threading.get_ident()

    def _read(self, read: TensorRead, into: torch.Tensor) -> None:
        assert threading.get_ident() != self.caller or self.gate.is_set(), "the caller waits for a read"
        self.gate.wait()
        super()._read(read, into)

    def wait(self, handle: DiskHandle) -> None:
        assert threading.get_ident() != self.caller or self.gate.is_set(), "the caller waits for a read"
        super().wait(handle)


class Scaled:
    """A stand-in expert: its input times the slot's tensor ``a``."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.a = tensors["a"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.a


def test_the_caller_does_not_wait_for_a_copys_read(tmp_path: Path) -> None:
    disk = GatedDisk()
    tier = make_tier(tmp_path, slots=3, disk=disk)
    with EmulatedLink(100.0) as link:
        cache = ExpertCache(tier, 2, link, Scaled)
        disk.gate.set()
        tier.fetch(0, 1)  # a hit in the tier: its bytes are there
        tier.buffer(0, 1)
        disk.gate.clear()
        tier.fetch(1, 2)  # a miss: its read starts, and hangs at the gate
        assert cache.load(0, 1)  # the link copies in order: what is in memory first, as the engine does
        assert cache.load(1, 2)  # returns although the read has not landed
        assert not cache.is_ready(1, 2) and tier.contains(1, 2)
        ready = cache.acquire(0, 1)(torch.ones(4))  # the caller computes what is ready meanwhile
        assert torch.equal(ready, expert_tensors(0, 1)["a"])
        tier.note_step(1, [2])
        tier.fetch(0, 3)  # and goes on with other demands; the slot the copy reads is not evicted
        assert tier.contains(1, 2)
        disk.gate.set()
        assert torch.equal(cache.acquire(1, 2)(torch.ones(4)), expert_tensors(1, 2)["a"])
    tier.close()


def test_a_damaged_read_fails_the_copy_in_one_line_and_both_tiers_forget_it(tmp_path: Path) -> None:
    disk = GatedDisk()
    tier = make_tier(tmp_path, slots=2, disk=disk)
    data = tmp_path / "experts.bin"
    data.write_bytes(data.read_bytes()[:-10])  # cut after load: every read of the file now fails
    with EmulatedLink(100.0) as link:
        cache = ExpertCache(tier, 1, link, Scaled)
        tier.fetch(1, 3)
        assert cache.load(1, 3)
        disk.gate.set()
        with pytest.raises(CheckpointError, match=r"experts\.bin: tensor l1\.e3\.a: the file changed size"):
            cache.acquire(1, 3)
        assert not cache.contains(1, 3)  # a later demand loads it again
        # The tier raises it once more, then forgets it.
        with pytest.raises(CheckpointError, match=r"l1\.e3\.a"):
            tier.buffer(1, 3)
        assert not tier.contains(1, 3)
    tier.close()


def test_an_emulated_link_delivers_no_earlier_than_the_read_landed_plus_the_copy() -> None:
    src, dst = torch.ones(1000, dtype=torch.uint8), torch.zeros(1000, dtype=torch.uint8)
    with EmulatedLink(1e-3, latency_us=2000) as link:  # 1 MB/s: 1 ms for the bytes, 2 ms of latency
        landed = time.perf_counter() + 0.05  # a read that lands 50 ms from now, as an emulated disk says
        first = link.submit(src, dst, lambda: landed)
        second = link.submit(src, torch.zeros_like(dst))  # its source is in memory, but it queues behind
        link.wait(first)
        link.wait(second)
        assert torch.equal(dst, src)
        assert first.done_at >= landed + 3e-3  # type: ignore[attr-defined]  (the emulated link's handle)
        assert second.done_at >= first.done_at + 3e-3  # type: ignore[attr-defined]
