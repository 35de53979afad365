"""A host job for a host-tier miss waits for its disk read on the host's worker, not in the caller: the caller
gets the slot's views at once and goes on, and the job computes once the bytes have landed. An emulated host
never delivers such a job before its read landed plus its own time."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from offload.errors import CheckpointError
from offload.experts.disk import FileDisk, TensorRead
from offload.experts.host import EmulatedHost, ThreadHost
from tests.test_host_tier import expert_tensors, make_tier


class GatedDisk(FileDisk):
    """A disk whose reads wait until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def _read(self, read: TensorRead, into: torch.Tensor) -> None:
        self.gate.wait()
        super()._read(read, into)


def test_the_caller_does_not_wait_for_a_host_jobs_read(tmp_path: Path) -> None:
    disk = GatedDisk()
    tier = make_tier(tmp_path, slots=2, disk=disk)
    x = torch.ones(3, 4)
    with ThreadHost() as host:
        tier.fetch(1, 2)  # a miss: its read starts, and hangs at the gate
        tensors, arrived = tier.tensors_on_arrival(1, 2)  # returns although the read has not landed
        assert arrived is not None and not tier.is_ready(1, 2)
        job = host.submit(lambda v: v * tensors["a"], x, arrived)
        tier.hold(1, 2, job.finished.is_set, job.finished.wait)
        tier.note_step(1, [2])
        assert not host.is_done(job)
        tier.fetch(0, 3)  # the caller goes on with other demands meanwhile; the held slot is not evicted
        assert tier.contains(1, 2)
        disk.gate.set()
        assert torch.equal(host.wait(job), x * expert_tensors(1, 2)["a"])
    assert torch.equal(tier.tensors(1, 2)["b"], expert_tensors(1, 2)["b"])
    _, arrived = tier.tensors_on_arrival(1, 2)
    assert arrived is None  # landed and waited on: nothing left to wait for
    tier.close()


def test_a_damaged_read_fails_the_job_in_one_line_and_is_forgotten(tmp_path: Path) -> None:
    disk = GatedDisk()
    tier = make_tier(tmp_path, slots=2, disk=disk)
    data = tmp_path / "experts.bin"
    data.write_bytes(data.read_bytes()[:-10])  # cut after load: every read of the file now fails
    with ThreadHost() as host:
        tier.fetch(1, 3)
        tensors, arrived = tier.tensors_on_arrival(1, 3)
        job = host.submit(lambda v: v + tensors["a"], torch.zeros(4), arrived)
        tier.hold(1, 3, job.finished.is_set, job.finished.wait)
        disk.gate.set()
        with pytest.raises(CheckpointError, match=r"experts\.bin: tensor l1\.e3\.a: the file changed size"):
            host.wait(job)
        with pytest.raises(CheckpointError, match=r"l1\.e3\.a"):  # the next use raises it and forgets it
            tier.tensors_on_arrival(1, 3)
        assert not tier.contains(1, 3)
    tier.close()


def test_an_emulated_host_starts_a_job_no_earlier_than_its_read_landed() -> None:
    with EmulatedHost(2.0, lambda tokens: 1e-3 * tokens) as host:  # 2 ms a token
        landed = time.perf_counter() + 0.05  # a read that lands 50 ms from now, as an emulated disk says
        first = host.submit(lambda v: v * 2, torch.ones(1, 3), lambda: landed)
        second = host.submit(lambda v: v + 1, torch.ones(2, 3))  # in memory already, but queued behind
        assert torch.equal(host.wait(first), torch.full((1, 3), 2.0))
        host.wait(second)
        assert first.done_at >= landed + 2e-3
        assert second.done_at >= first.done_at + 4e-3
