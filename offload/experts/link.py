"""Moving expert bytes from the host tier to the device tier.

One interface, ``submit(src, dst, ready) -> handle`` then ``wait(handle)``:
- ``LocalLink``: a plain copy in the caller's thread (CPU).
- ``EmulatedLink``: really copies on a worker thread, but a copy completes only after
  ``latency + bytes / bandwidth`` on a serial link, so copies overlap compute as over PCIe.
- ``CudaLink``: a dedicated copy stream and events; waiting never blocks the host.

On a link that ``waits_for_sources``, a copy may come with ``ready``, which returns once ``src`` holds its bytes
(a host-tier read still landing: ``HostTier.buffer_on_arrival``), so that the caller need not wait for the disk
before it submits: the emulated link's worker waits for it, then copies, and never delivers before the read
landed plus the copy's own time. The local link copies in ``submit``, so its caller waits for the read first,
as before; the CUDA link does too, for now (it would need a thread that issues each copy once its read lands,
to be written on a machine with a GPU to test it).

Every link completes copies in submission order, so a later copy into the same ``dst`` wins.
A handle carries its copy's size; the bytes moved and the seconds blocked are counted once, per layer,
by the expert cache (``offload.experts.stats``), not again here.
"""

from __future__ import annotations

import queue
import threading
import time

import torch
from torch import Tensor

from offload.errors import CacheError
from offload.experts.host import Ready
from offload.workers import close_at_exit

LINK_FORMS = "'local', 'emulated:GBPS[:LATENCY_US]' (e.g. emulated:12 or emulated:12:5) or 'cuda'"


class LinkHandle:
    """A copy submitted to a link; pass it back to the same link's ``wait`` or ``is_done``."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


class Link:
    """The common part of every link: the argument checks."""

    waits_for_sources = False  # whether ``submit`` takes a ``ready`` and waits for it on the link's side

    def submit(self, src: Tensor, dst: Tensor, ready: Ready | None = None) -> LinkHandle:
        """Start copying ``src`` into ``dst`` (same shape and dtype); returns at once where it can. ``ready`` (only
        where ``waits_for_sources``) returns once ``src`` holds its bytes; the copy starts after it, and its error
        is ``wait``'s."""
        if src.shape != dst.shape or src.dtype != dst.dtype:
            raise ValueError(f"cannot copy {src.dtype}{list(src.shape)} into {dst.dtype}{list(dst.shape)}")
        assert ready is None or self.waits_for_sources, "this link copies at once: wait for the source first"
        return self._submit(src, dst, src.numel() * src.element_size(), ready)

    def wait(self, handle: LinkHandle) -> None:
        """Return once ``dst`` of ``handle`` may be read by work issued after this call."""
        self._wait(handle)

    def is_done(self, handle: LinkHandle) -> bool:
        """Whether ``wait(handle)`` would return without blocking."""
        return True

    def source_free(self, handle: LinkHandle) -> bool:
        """Whether the copy has finished reading ``src``, which may then be overwritten (the host tier's test)."""
        return self.is_done(handle)

    def wait_source(self, handle: LinkHandle) -> None:
        """Block the host until ``source_free(handle)``."""
        self._wait(handle)

    def close(self) -> None:
        """Release threads or streams; the link cannot be used afterwards."""

    def _submit(self, src: Tensor, dst: Tensor, nbytes: int, ready: Ready | None) -> LinkHandle:
        raise NotImplementedError

    def _wait(self, handle: LinkHandle) -> None:
        raise NotImplementedError

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LocalLink(Link):
    """A synchronous ``dst.copy_(src)``: the copy is done when ``submit`` returns."""

    def _submit(self, src: Tensor, dst: Tensor, nbytes: int, ready: Ready | None) -> LinkHandle:
        dst.copy_(src)
        return LinkHandle(nbytes)

    def _wait(self, handle: LinkHandle) -> None:
        pass


class _EmulatedHandle(LinkHandle):
    def __init__(self, nbytes: int, seconds: float, done_at: float) -> None:
        super().__init__(nbytes)
        self.seconds = seconds  # the copy's own time on the emulated link
        self.done_at = done_at  # perf_counter() time at which the emulated link delivers the bytes
        self.copied = threading.Event()  # set by the worker once the bytes are really in dst
        self.error: BaseException | None = None


class EmulatedLink(Link):
    """A serial link of ``gbps`` GB/s (1e9 bytes/s) with ``latency_us`` per copy, emulated on a CPU.

    A worker thread really copies; a copy completes at
    ``max(submit time, previous copy's completion, its source's ready time) + latency + bytes / bandwidth``.
    """

    waits_for_sources = True

    def __init__(self, gbps: float, latency_us: float = 0.0) -> None:
        if not gbps > 0 or not latency_us >= 0:
            raise CacheError(f"emulated link needs gbps > 0 and latency_us >= 0, got {gbps} and {latency_us}")
        self.gbps = gbps
        self.latency_us = latency_us
        self._link_free_at = 0.0  # when the emulated link finishes the last submitted copy
        self._delivered_at = 0.0  # the worker's: when the copy it ran last is delivered
        self._queue: queue.SimpleQueue[tuple[Tensor, Tensor, Ready | None, _EmulatedHandle] | None] = (
            queue.SimpleQueue()
        )
        self._worker = threading.Thread(target=self._copy_forever, name="EmulatedLink", daemon=True)
        self._closed = False
        self._worker.start()
        close_at_exit(self)  # joined before the interpreter exits (offload.workers)

    def _copy_forever(self) -> None:
        while (job := self._queue.get()) is not None:
            src, dst, ready, handle = job
            try:
                ready_at = ready() if ready is not None else 0.0
                dst.copy_(src)
            except BaseException as error:  # handed to the waiter, which re-raises it
                handle.error = error
            else:
                # Submitting assumed the copy could start at once; a source that landed later (or a copy ahead
                # of it that slipped so) starts it later: the link never delivers before it could have copied.
                starts = max(self._delivered_at, ready_at)
                handle.done_at = max(handle.done_at, starts + handle.seconds)
                self._delivered_at = handle.done_at
            handle.copied.set()

    def _submit(self, src: Tensor, dst: Tensor, nbytes: int, ready: Ready | None) -> LinkHandle:
        if self._closed:
            raise RuntimeError("EmulatedLink is closed")
        seconds = self.latency_us * 1e-6 + nbytes / (self.gbps * 1e9)
        self._link_free_at = max(time.perf_counter(), self._link_free_at) + seconds
        handle = _EmulatedHandle(nbytes, seconds, self._link_free_at)
        self._queue.put((src, dst, ready, handle))
        return handle

    def _wait(self, handle: LinkHandle) -> None:
        assert isinstance(handle, _EmulatedHandle), "handle comes from another link"
        handle.copied.wait()
        if handle.error is not None:
            raise handle.error
        remaining = handle.done_at - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)

    def is_done(self, handle: LinkHandle) -> bool:
        assert isinstance(handle, _EmulatedHandle), "handle comes from another link"
        return handle.copied.is_set() and time.perf_counter() >= handle.done_at

    def source_free(self, handle: LinkHandle) -> bool:
        assert isinstance(handle, _EmulatedHandle), "handle comes from another link"
        return handle.copied.is_set()  # the bytes are in dst; only the emulated delivery time is left

    def wait_source(self, handle: LinkHandle) -> None:
        assert isinstance(handle, _EmulatedHandle), "handle comes from another link"
        handle.copied.wait()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)  # after every queued copy, so pending copies still land
            self._worker.join()


class _CudaHandle(LinkHandle):
    def __init__(self, nbytes: int, event: torch.cuda.Event) -> None:
        super().__init__(nbytes)
        self.event = event


class CudaLink(Link):
    """Host-to-device copies on a dedicated stream; ``wait`` orders the compute stream after the copy.

    ``src`` should be pinned so the copy is truly asynchronous.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device if device is not None else "cuda")
        self.stream = torch.cuda.Stream(self.device)

    def _submit(self, src: Tensor, dst: Tensor, nbytes: int, ready: Ready | None) -> LinkHandle:
        # dst is a cache slot that kernels already queued on the compute stream may still read.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            event = self.stream.record_event()
        return _CudaHandle(nbytes, event)

    def _wait(self, handle: LinkHandle) -> None:
        assert isinstance(handle, _CudaHandle), "handle comes from another link"
        torch.cuda.current_stream(self.device).wait_event(handle.event)

    def is_done(self, handle: LinkHandle) -> bool:
        assert isinstance(handle, _CudaHandle), "handle comes from another link"
        return handle.event.query()

    def wait_source(self, handle: LinkHandle) -> None:
        assert isinstance(handle, _CudaHandle), "handle comes from another link"
        handle.event.synchronize()  # ``wait`` only orders the device's stream; the host must block here

    def close(self) -> None:
        self.stream.synchronize()


def parse_link(spec: str) -> Link:
    """Build a link from ``local``, ``emulated:GBPS[:LATENCY_US]`` or ``cuda``."""
    kind, _, params = spec.strip().partition(":")
    if kind == "local" and not params:
        return LocalLink()
    if kind == "cuda" and not params:
        if not torch.cuda.is_available():
            raise CacheError(
                "link 'cuda' needs a CUDA GPU, and torch sees none; use 'local' or 'emulated:GBPS'"
            )
        return CudaLink()
    if kind == "emulated" and params:
        numbers = params.split(":")
        try:
            values = [float(n) for n in numbers]
        except ValueError:
            values = []
        if len(numbers) <= 2 and len(values) == len(numbers) and values[0] > 0 and values[-1] >= 0:
            return EmulatedLink(*values)
    raise CacheError(f"bad link {spec!r}: expected {LINK_FORMS}, with GBPS > 0 and LATENCY_US >= 0")
