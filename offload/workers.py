"""Background worker threads (host jobs, disk reads, an emulated link) are finished before the interpreter exits.

Each worker is a daemon thread, so a forgotten one never keeps a process alive. But a daemon thread still inside
torch when Python finalizes is stopped by force, and unwinding through torch's C++ frames then aborts the process
("terminate called without an active exception", exit 134): for example when an error ends a run while a host
job is computing. So every worker registers here, and at exit each is closed (its queued work finished, its thread
joined) while the interpreter is still whole; the newest first, since later workers wait on earlier ones (a host
job waits on its disk read).
"""

from __future__ import annotations

import atexit
import contextlib
import weakref
from typing import Protocol


class Closable(Protocol):
    def close(self) -> None: ...


_open: list[weakref.ref[Closable]] = []


def close_at_exit(worker: Closable) -> None:
    """Close ``worker`` when the interpreter exits, unless it is gone (or closed) by then."""
    _open[:] = [ref for ref in _open if ref() is not None]  # forget the workers already collected
    _open.append(weakref.ref(worker))


@atexit.register
def _close_all() -> None:
    while _open:
        worker = _open.pop()()
        if worker is not None:
            with contextlib.suppress(
                Exception
            ):  # exiting anyway: one worker's failure must not stop the rest
                worker.close()
