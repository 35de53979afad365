"""Reading experts' stored bytes from the checkpoint on disk straight into host buffers, on a worker thread.

One interface, like a link's: ``submit(reads) -> DiskHandle``, then ``wait(handle)`` or ``is_done(handle)``:
- ``FileDisk`` (``--disk file``, the default): a worker thread reads each tensor with one ``os.preadv`` into its
  place in the destination buffer, so a read overlaps the caller's compute and no second copy is made.
- ``EmulatedDisk`` (``--disk emulated:GBPS``): the same reads, but a batch completes only at
  ``max(submit time, previous completion) + bytes / bandwidth`` on a serial disk. The OS page cache makes a
  re-read of a small checkpoint nearly free here, so benchmarks emulate a disk as ``EmulatedLink`` emulates PCIe.

A read that comes back short, a file whose size changed since it was opened, or float bytes that are NaN or inf
fail the handle with a one-line ``CheckpointError`` naming the file and the tensor; ``wait`` raises it.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from offload.errors import CacheError, CheckpointError
from offload.workers import close_at_exit

DISK_FORMS = "'file' or 'emulated:GBPS' (e.g. emulated:2)"


@dataclass(frozen=True)
class TensorRead:
    """One stored tensor's bytes in a checkpoint file: what to read into one slice of an expert's buffer."""

    path: Path
    offset: int  # from the start of the file
    nbytes: int
    name: str  # the tensor's name in the checkpoint, for errors
    dtype: torch.dtype  # as stored; a float tensor is checked for NaN and inf once read


class DiskHandle:
    """Reads submitted to a disk; pass it back to the same disk's ``wait`` or ``is_done``."""

    def __init__(self, nbytes: int, done_at: float = 0.0) -> None:
        self.nbytes = nbytes
        self.done_at = done_at  # perf_counter() time before which an emulated disk does not deliver
        self.finished = threading.Event()  # set once every byte is in place (or a read failed)
        self.finished_at = 0.0  # perf_counter() time it was set
        self.error: BaseException | None = None
        self.result: object = None  # what the submitted ``then`` returned, once finished
        self.reads: list[tuple[TensorRead, Tensor]] = []
        self.then: Callable[[], object] | None = None
        self._claimed = threading.Lock()

    def claim(self) -> bool:
        """Whether the caller is the one to do these reads: the worker, or a waiter that got there first."""
        return self._claimed.acquire(blocking=False)


class FileDisk:
    """Reads checkpoint files on one worker thread (the reads of one disk are serial anyway)."""

    def __init__(self) -> None:
        self._files: dict[Path, tuple[int, int]] = {}  # path -> (descriptor, size when opened)
        self._queue: queue.SimpleQueue[DiskHandle | None] = queue.SimpleQueue()
        self._threads = torch.get_num_threads()  # a new thread starts with torch's default, not ours
        self._worker = threading.Thread(target=self._read_forever, name="DiskReads", daemon=True)
        self._closed = False
        self._worker.start()
        close_at_exit(self)  # joined before the interpreter exits (offload.workers)

    @property
    def spec(self) -> str:
        """The --disk value that makes this disk."""
        return "file"

    def describe(self) -> str:
        return "disk"

    def open(self, path: Path) -> None:
        """Open ``path`` for reads and note its size: a file that later changes size is refused."""
        if path not in self._files:
            try:
                descriptor = os.open(path, os.O_RDONLY)
            except OSError as error:
                raise CheckpointError(f"{path}: cannot open it ({error.strerror or error})") from None
            self._files[path] = (descriptor, os.fstat(descriptor).st_size)

    def submit(
        self, reads: list[tuple[TensorRead, Tensor]], then: Callable[[], object] | None = None
    ) -> DiskHandle:
        """Start reading each ``TensorRead`` into its 1-D uint8 CPU tensor of the same size; returns at once.

        ``then`` runs on the worker once every read has landed (building the expert, say), so it overlaps the
        caller's compute too; its result is the handle's ``result``, its exception ``wait``'s.
        """
        if self._closed:
            raise RuntimeError("the disk is closed")
        for read, into in reads:
            assert into.dtype == torch.uint8 and into.numel() == read.nbytes, "a read's buffer must fit it"
            self.open(read.path)
        handle = self._handle(sum(read.nbytes for read, _ in reads))
        handle.reads, handle.then = reads, then
        self._queue.put(handle)
        return handle

    def _handle(self, nbytes: int) -> DiskHandle:
        return DiskHandle(nbytes)

    def wait(self, handle: DiskHandle) -> None:
        """Return once every byte of ``handle`` is in place; raise its CheckpointError if a read failed.

        Reads the worker has not started yet are done here, in the caller's thread: a caller about to block
        would otherwise pay two thread hand-offs per read (on a busy 2-core machine, about a millisecond).
        """
        if handle.claim():
            self._run(handle)
        handle.finished.wait()
        if handle.error is not None:
            raise handle.error
        remaining = handle.done_at - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)

    def is_done(self, handle: DiskHandle) -> bool:
        """Whether ``wait(handle)`` would return without blocking."""
        return handle.finished.is_set() and time.perf_counter() >= handle.done_at

    def close(self) -> None:
        """Finish the queued reads, stop the worker and close the files."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._worker.join()
            for descriptor, _ in self._files.values():
                os.close(descriptor)
            self._files.clear()

    def __enter__(self) -> FileDisk:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _read_forever(self) -> None:
        torch.set_num_threads(self._threads)
        while (handle := self._queue.get()) is not None:
            if handle.claim():  # else a waiter has read it already
                self._run(handle)

    def _run(self, handle: DiskHandle) -> None:
        try:
            for read, into in handle.reads:
                self._read(read, into)
            if handle.then is not None:
                handle.result = handle.then()
        except BaseException as error:  # handed to the waiter, which raises it
            handle.error = error
        handle.finished_at = time.perf_counter()
        handle.finished.set()

    def _read(self, read: TensorRead, into: Tensor) -> None:
        descriptor, size = self._files[read.path]
        where = f"{read.path}: tensor {read.name}"
        try:
            now = os.fstat(descriptor).st_size
            if now != size:
                raise CheckpointError(
                    f"{where}: the file changed size since it was loaded ({size} -> {now} bytes); "
                    "restart offload after replacing a checkpoint"
                )
            view = memoryview(into.numpy())
            done = 0
            while done < read.nbytes:  # preadv may return fewer bytes than asked for a large read
                got = os.preadv(descriptor, [view[done:]], read.offset + done)
                if got == 0:
                    break
                done += got
        except OSError as error:
            raise CheckpointError(f"{where} cannot be read ({error.strerror or error})") from None
        if done != read.nbytes:
            raise CheckpointError(f"{where} is cut short (the file is truncated)")
        if read.dtype.is_floating_point and not _finite(into, read.dtype):
            raise CheckpointError(f"{where} holds NaN or inf values (the file is damaged)")


class EmulatedDisk(FileDisk):
    """A serial disk of ``gbps`` GB/s (1e9 bytes/s), emulated over real reads.

    The worker really reads; a batch completes at ``max(submit time, previous completion) + bytes / bandwidth``.
    """

    def __init__(self, gbps: float) -> None:
        if not gbps > 0:
            raise CacheError(f"--disk emulated:GBPS needs GBPS > 0, got {gbps}")
        super().__init__()
        self.gbps = gbps
        self._free_at = 0.0  # when the emulated disk finishes the last submitted batch

    @property
    def spec(self) -> str:
        return f"emulated:{self.gbps:g}"

    def describe(self) -> str:
        return f"emulated disk, {self.gbps:g} GB/s"

    def _handle(self, nbytes: int) -> DiskHandle:
        starts = max(time.perf_counter(), self._free_at)
        self._free_at = starts + nbytes / (self.gbps * 1e9)
        return DiskHandle(nbytes, self._free_at)


# A float is NaN or inf exactly when every bit of its exponent is set.
_EXPONENTS = {
    torch.float32: (np.uint32, 0x7F80_0000),
    torch.float16: (np.uint16, 0x7C00),
    torch.bfloat16: (np.uint16, 0x7F80),
}


def _finite(raw: Tensor, dtype: torch.dtype) -> bool:
    """Whether the floats stored in ``raw`` (uint8) hold no NaN or inf: one numpy pass over their exponent bits,
    about 20 times cheaper than torch's isfinite on an expert's small scale tensors."""
    if dtype not in _EXPONENTS:
        return bool(torch.isfinite(raw.view(dtype)).all())
    unsigned, mask = _EXPONENTS[dtype]
    bits = raw.numpy().view(unsigned)
    return not bool(np.any(np.bitwise_and(bits, mask) == mask))


def parse_disk(spec: str) -> FileDisk:
    """Build a disk from ``file`` or ``emulated:GBPS``."""
    kind, _, params = spec.strip().partition(":")
    if kind == "file" and not params:
        return FileDisk()
    if kind == "emulated" and params:
        try:
            gbps = float(params)
        except ValueError:
            gbps = float("nan")
        if 0 < gbps < float("inf"):
            return EmulatedDisk(gbps)
    raise CacheError(f"--disk {spec!r}: expected {DISK_FORMS}, with GBPS > 0")
