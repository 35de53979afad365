"""Computing experts on the host CPU, beside the device, while the device computes the hits.

One interface, ``submit(run, x) -> HostJob`` then ``wait(job) -> output``, like a link's:
- ``ThreadHost``: a worker thread runs the expert on the host; only the activations ``x`` (T, D) cross,
  to the host and back to ``x``'s device.
- ``EmulatedHost``: the same worker really computes, but a job completes only at
  ``max(submit time, previous completion) + ratio x device_seconds(T)``: on a CPU-only machine the
  "host" and the "device" are the same CPU, so without this a host expert would look as cheap as a
  device one. ``device_seconds`` is measured (``offload.experts.probe``), the way the bench times one
  layer for ``--copy-ratio``.

Jobs complete in submission order (one worker: the host kernels use every thread torch has). A job may
come with ``ready``, which the worker runs first and which returns once the job's expert is in host memory
(a host-tier read still landing): the wait for the disk is then the worker's, not the caller's.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import torch
from torch import Tensor

from offload.errors import CacheError
from offload.workers import close_at_exit

HostRun = Callable[[Tensor], Tensor]  # (T, D) on the host -> (T, D) on the host
Ready = Callable[[], float]  # blocks until a job's expert is in host memory; returns when it got there
DeviceSeconds = Callable[[int], float]  # tokens -> the device's seconds for one expert


class HostJob:
    """An expert submitted to a host; pass it back to the same host's ``wait`` or ``is_done``."""

    def __init__(self, tokens: int, done_at: float = 0.0) -> None:
        self.tokens = tokens
        self.done_at = done_at  # perf_counter() time before which the output is not delivered
        self.finished = threading.Event()  # set by the worker once the output is computed
        self.output: Tensor | None = None
        self.error: BaseException | None = None


class ThreadHost:
    """Runs experts on the host on one worker thread, concurrently with the caller's device work."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[HostRun, Tensor, Ready | None, HostJob] | None] = (
            queue.SimpleQueue()
        )
        self._worker = threading.Thread(target=self._run_forever, name="HostExperts", daemon=True)
        self._closed = False
        self._threads = torch.get_num_threads()  # a new thread starts with torch's default, not ours
        self._worker.start()
        close_at_exit(self)  # joined before the interpreter exits (offload.workers)

    def describe(self) -> str:
        return "host CPU"

    def _run_forever(self) -> None:
        torch.set_num_threads(self._threads)
        while (job := self._queue.get()) is not None:
            run, x, ready, handle = job
            try:
                self._started(handle, ready() if ready is not None else 0.0)
                with torch.inference_mode():
                    handle.output = run(x.to("cpu")).to(x.device)
            except BaseException as error:  # handed to the waiter, which re-raises it
                handle.error = error
            handle.finished.set()

    def submit(self, run: HostRun, x: Tensor, ready: Ready | None = None) -> HostJob:
        """Start ``run`` on the host with ``x`` (T, D) copied there; returns at once. ``ready``, if given, runs
        first on the worker (``Ready``): a job whose expert is still being read waits there, not here."""
        if self._closed:
            raise RuntimeError("the host is closed")
        job = self._job(x.shape[0])
        self._queue.put((run, x, ready, job))
        return job

    def _job(self, tokens: int) -> HostJob:
        return HostJob(tokens)

    def _started(self, job: HostJob, ready_at: float) -> None:
        """On the worker, as ``job`` starts, its expert in memory since ``ready_at``."""

    def wait(self, job: HostJob) -> Tensor:
        """The job's output, on the device of its input."""
        job.finished.wait()
        if job.error is not None:
            raise job.error
        remaining = job.done_at - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        assert job.output is not None
        return job.output

    def is_done(self, job: HostJob) -> bool:
        """Whether ``wait(job)`` would return without blocking."""
        return job.finished.is_set() and time.perf_counter() >= job.done_at

    def close(self) -> None:
        """Finish the queued jobs and stop the worker; the host cannot be used afterwards."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._worker.join()

    def __enter__(self) -> ThreadHost:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class EmulatedHost(ThreadHost):
    """A host ``ratio`` times slower than the device for the same expert, emulated on one CPU.

    The worker really computes; a job completes at
    ``max(submit time, previous job's completion) + ratio * device_seconds(tokens)``.
    """

    def __init__(self, ratio: float, device_seconds: DeviceSeconds) -> None:
        if not ratio > 0:
            raise CacheError(f"--host-ratio must be > 0, got {ratio}")
        super().__init__()
        self.ratio = ratio
        self.device_seconds = device_seconds
        self._free_at = 0.0  # when the emulated host finishes the last submitted job
        self._delivered_at = 0.0  # the worker's: when the job it ran last is delivered

    def describe(self) -> str:
        return f"emulated host, {self.ratio:g}x the device's time per expert"

    def seconds(self, tokens: int) -> float:
        """How long the emulated host takes for one expert on ``tokens`` tokens."""
        return self.ratio * self.device_seconds(tokens)

    def _job(self, tokens: int) -> HostJob:
        starts = max(time.perf_counter(), self._free_at)
        self._free_at = starts + self.seconds(tokens)
        return HostJob(tokens, self._free_at)

    def _started(self, job: HostJob, ready_at: float) -> None:
        # Submitting assumed the job could start at once; an expert whose read landed later (or a job ahead
        # of it that slipped so) starts it later, so the emulated host never finishes before it could start.
        starts = max(self._delivered_at, ready_at)
        job.done_at = max(job.done_at, starts + self.seconds(job.tokens))
        self._delivered_at = job.done_at
